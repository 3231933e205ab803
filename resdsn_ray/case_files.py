"""The files of one segmented case and its mask statistics, written the same way by `resdsn
segment` and the archive job's finish (and complete) tasks: the NIfTI mask, the DICOM SEG, the
probability map and the preview PNG (kinds of `runs.OUTPUT_FILES`), each whole or not at all.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from resdsn_ray import storage
from resdsn_ray.archive import NIFTI_SUFFIXES
from resdsn_ray.config import OutputConfig, Probabilities
from resdsn_ray.mask_stats import mask_stats
from resdsn_ray.provenance import provenance
from resdsn_ray.runs import OUTPUT_FILES
from resdsn_ray.volumes import Volume, write_mask, write_nifti

ALGORITHM = "resdsn_ray"  # the SEG's algorithm name; its version names the package and the bundles
NO_SEG = "no DICOM SEG: the input is not a DICOM series (no source instances to reference); the NIfTI mask is written"
SEG_META = ("format", "series_uid", "study_uid", "slice_uris", "sop_instance_uids")
"""What a DICOM SEG needs of the source volume's meta besides its grid (carried in rows as JSON)."""


def algorithm_version(coarse_model: str | None, fine_model: str | None) -> str:
    """`resdsn_ray <version> coarse=<bundle id> fine=<bundle id>`: what made the mask (64 chars max)."""
    return f"{provenance()['resdsn_ray']} coarse={coarse_model} fine={fine_model}"[:64]


def seg_meta(volume: Volume) -> str:
    """The part of `volume.meta` a DICOM SEG needs, as JSON for a row."""
    return json.dumps({key: volume.meta.get(key) for key in SEG_META})


def sibling_uris(mask_uri: str, kinds: tuple[str, ...]) -> dict[str, str]:
    """URIs beside a mask for `resdsn segment`: `case.nii.gz` -> `case.dcm`, `case_probabilities.nii.gz`, `case.png`."""
    stem = next((mask_uri[: -len(s)] for s in NIFTI_SUFFIXES if mask_uri.lower().endswith(s)), mask_uri)
    names = {"mask": mask_uri, "seg": f"{stem}.dcm", "probabilities": f"{stem}_probabilities.nii.gz", "preview": f"{stem}.png"}
    return {kind: names[kind] for kind in kinds}


def write_case_files(uris: dict[str, str], mask: np.ndarray, volume: Volume, outputs: OutputConfig,
                     probabilities: np.ndarray | None = None, stamp: str = "", version: str = "",
                     title: str = "") -> dict[str, Any]:
    """Write the files of `uris` (kind -> URI) for `mask` on `volume`'s grid; the row columns they
    fill: each written file's URI column, `note`, and the mask statistics (`mask_stats`).

    A DICOM SEG asked of a volume that is not a DICOM series is not written: `note` says so.
    The SEG and preview writers are imported when asked: highdicom and matplotlib cost every
    worker process ~3 s of CPU at start-up (`python -X importtime`), most runs ask for neither.
    """
    row: dict[str, Any] = mask_stats(mask, volume.array, volume.affine)
    notes = []
    for kind, uri in uris.items():
        if kind == "mask":
            write_mask(uri, mask, like=volume, description=stamp)
        elif kind == "seg" and volume.meta.get("format") != "dicom":
            notes.append(NO_SEG)
            continue
        elif kind == "seg":
            from resdsn_ray.dicom_seg import write_dicom_seg  # see `write_case_files`: imported when asked

            write_dicom_seg(uri, mask, volume, ALGORITHM, version)
        elif kind == "probabilities":
            if probabilities is None:
                raise ValueError(f"{uri}: probabilities asked but not computed")
            write_probabilities(uri, probabilities, volume, outputs.probabilities)
        elif kind == "preview":
            from resdsn_ray.pictures import preview  # see `write_case_files`: imported when asked

            storage.write_bytes(uri, preview(volume.array, mask, volume.affine, title))
        row[OUTPUT_FILES[kind].column] = uri
    if outputs.seg and "seg" not in uris and volume.meta.get("format") != "dicom":
        notes.append(NO_SEG)
    row["note"] = "; ".join(notes) or None
    return row


def write_probabilities(uri: str, probabilities: np.ndarray, like: Volume, kind: Probabilities) -> None:
    """The foreground probabilities on `like`'s grid: uint8 0..255 with scale 1/255, or float32."""
    if tuple(probabilities.shape) != like.shape:
        raise ValueError(f"{uri}: probabilities shape {probabilities.shape} differs from the input's {like.shape}")
    if kind == "uint8":
        quantised = np.round(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
        write_nifti(uri, quantised, like.affine, scale=1 / 255)
    else:
        write_nifti(uri, probabilities.astype(np.float32), like.affine)
