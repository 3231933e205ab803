"""The Python entry points a team scripts against, in one import: the names here are the supported
surface (the rest of the package may move). Thin re-exports and wrappers over the library, the
same functions the command line calls; see the README's "Use from Python".

    from resdsn_ray import api
    engine = api.build_engine(coarse_uri, fine_uri)             # or api.FAST_ENGINE for a first look
    volume, result = api.segment(engine, "s3://bucket/ct.nii.gz")  # or api.segment_array(engine, array, affine)
    api.write_mask("mask.nii.gz", result.mask, like=volume)
    rows = api.run_archive("s3://bucket/archive", "s3://bucket/out", coarse_uri, fine_uri).rows
    print(api.summary("s3://bucket/out").text())

Importing this module needs no Ray: only `run_archive` does (and starts a local Ray when no
cluster is given or found).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from resdsn_ray.bundle import Bundle, demo_bundle_uri, load_bundle
from resdsn_ray.config import DEMO_ENGINE, FAST_ENGINE, ArchiveJob, EngineConfig, Resources, WindowConfig
from resdsn_ray.engine import CoarseToFine, Segmentation, WindowCallback
from resdsn_ray.errors import InputError
from resdsn_ray.metrics import case_metrics
from resdsn_ray.progress import WindowProgress
from resdsn_ray.query import load as load_rows
from resdsn_ray.query import query, summary
from resdsn_ray.volumes import Volume, read_volume, write_mask

if TYPE_CHECKING:
    from resdsn_ray.pipeline import RunResult

__all__ = [
    "ArchiveJob", "Bundle", "CoarseToFine", "DEMO_ENGINE", "EngineConfig", "FAST_ENGINE", "InputError", "Resources",
    "Segmentation", "Volume", "WindowConfig", "WindowProgress", "build_engine", "case_metrics", "demo_bundle_uri",
    "load_bundle", "load_rows", "query", "read_volume", "run_archive", "segment", "segment_array", "summary",
    "write_mask",
]


def build_engine(coarse: str | None, fine: str | None, config: EngineConfig = EngineConfig()) -> CoarseToFine:
    """An engine on the bundles at these URIs; a bundle its mode does not use may be None."""
    return CoarseToFine(load_bundle(coarse) if coarse and config.mode != "fine" else None,
                        load_bundle(fine) if fine and config.mode != "coarse" else None, config)


def segment(engine: CoarseToFine, image: str, series_uid: str | None = None,
            progress: WindowCallback | None = None) -> tuple[Volume, Segmentation]:
    """Read one volume (NIfTI file or DICOM series folder, any URI) and segment it; the volume
    comes back too, as the grid to write the mask on (`write_mask(uri, result.mask, like=volume)`)."""
    volume = read_volume(image, series_uid=series_uid)
    return volume, engine.segment(volume, progress=progress)


def segment_array(engine: CoarseToFine, array: np.ndarray, affine: np.ndarray,
                  progress: WindowCallback | None = None) -> Segmentation:
    """Segment a volume already in memory: HU values [X, Y, Z] and its 4x4 voxel-to-world affine."""
    volume = Volume(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64), source="array")
    return engine.segment(volume, progress=progress)


def run_archive(archive: str, output: str, coarse: str | None, fine: str | None,
                engine: EngineConfig = EngineConfig(), say: Callable[[str], None] = print,
                **settings: Any) -> RunResult:
    """The archive job (Ray Data) on `archive` (folder or manifest), written under `output`; the run's rows are
    `.rows`. `settings`: any other `ArchiveJob` field (address, resources, overwrite, ...)."""
    from resdsn_ray.pipeline import run_archive as run  # Ray: only here

    job = ArchiveJob(input=archive, output=output, coarse=coarse, fine=fine, engine=engine)
    return run(replace(job, **settings), say=say)
