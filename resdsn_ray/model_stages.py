"""The stages that hold a model (actors of the archive job's pools): the coarse and fine stages
of the `split` shape and `WholeCase` of the `whole` shape. They take and return the case rows of
`stages`, whose CPU tasks run before and after them.
"""

from __future__ import annotations

import socket
import sys
import time
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from resdsn_ray.boxes import bounding_box
from resdsn_ray.bundle import load_bundle
from resdsn_ray.config import STATUS_ERROR, STATUS_NO_ORGAN, EngineConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.errors import InputError
from resdsn_ray.stages import CASE_FAILURES, case_limit, error_row, with_arrays


def _node() -> dict[str, str | None]:
    """This process's host, and its Ray node when it runs as a Ray worker (no Ray import here)."""
    ray = sys.modules.get("ray")
    node_id = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"node": socket.gethostname(), "node_id": node_id}


def _quiet_numpy_views() -> None:
    # Arrays from the object store are read-only views; torch warns when it wraps them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def device_name(device: torch.device) -> str:
    """The device as rows record it: `cuda:0 NVIDIA H100 80GB HBM3`, `cpu`."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


class _Stage:
    """An actor holding loaded bundles: the model loads once per actor, not once per case.

    An actor given a GPU (`gpu=True`) that sees no CUDA device refuses to start: a CPU build of
    torch on a GPU node would otherwise segment the archive on the CPU, slowly and silently.
    """

    def __init__(self, coarse: str | None, fine: str | None, engine: EngineConfig, threads: int = 1, gpu: bool = False) -> None:
        _quiet_numpy_views()
        torch.set_num_threads(max(1, threads))
        if gpu and not torch.cuda.is_available():
            raise InputError("--gpus-per-actor", f"this model actor holds a GPU but torch {torch.__version__} sees no "
                                                 "CUDA device (a CPU build of torch, or no driver, on this node)")
        # The job refused unfit bundles before it started (`pipeline`), or was told to allow them.
        self.engine = CoarseToFine(
            load_bundle(coarse, allow_unfit=True) if coarse else None,
            load_bundle(fine, allow_unfit=True) if fine else None,
            engine,
        )
        self.node = _node() | {"device": device_name(self.engine.device), "compute_dtype": self.engine.precision}


class CoarseStage(_Stage):
    """COARSE on the device: windows over the whole volume -> mask -> crop box -> cropped input."""

    def __init__(self, coarse: str, engine: EngineConfig, threads: int = 1, gpu: bool = False) -> None:
        super().__init__(coarse, None, replace(engine, mode="coarse"), threads, gpu)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") == STATUS_ERROR:
            return row
        try:
            with case_limit(row):
                image = row["coarse_input"]
                mask, row["coarse_windows"], row["t_coarse_s"] = self.engine.run_stage("coarse", image)
                start = time.perf_counter()
                box = self.engine.locate(mask)
                row["t_post_s"] = time.perf_counter() - start
        except CASE_FAILURES as err:  # one case's failure is its error row
            return error_row(row, "coarse", err)
        source = image if row["shared_input"] else row["fine_input"]
        row.update(self.node)
        if box is None and self.engine.config.on_no_organ == "fine":  # the fine pool takes the whole volume
            row.update(coarse_bbox=None, fine_fallback=True, fine_at=[0, 0, 0, *source.shape])
            return with_arrays(row, fine_input=source)
        if box is None:
            row.update(status=STATUS_NO_ORGAN, coarse_bbox=None, fine_fallback=False, fine_at=None)
            return with_arrays(row)
        row.update(coarse_bbox=box.to_list(), fine_fallback=False, fine_at=box.to_list())
        # Only the crop travels on, as the fine pool's input.
        return with_arrays(row, fine_input=np.ascontiguousarray(source[box.slices]))


class FineStage(_Stage):
    """FINE on the device: windows over the cropped sub-volume -> its mask."""

    def __init__(self, fine: str, engine: EngineConfig, threads: int = 1, gpu: bool = False) -> None:
        super().__init__(None, fine, replace(engine, mode="fine"), threads, gpu)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") in (STATUS_ERROR, STATUS_NO_ORGAN):
            return row
        try:
            with case_limit(row):
                mask, row["fine_windows"], row["t_fine_s"] = self.engine.run_stage("fine", row["fine_input"])
        except CASE_FAILURES as err:  # one case's failure is its error row
            return error_row(row, "fine", err)
        row.update(mask_at=row["fine_at"], post_done=False)
        return with_arrays(row, mask_box=mask.astype(np.uint8))


class WholeCase(_Stage):
    """Both stages of a case in one actor call (`segment_prepared`); returns the final mask (and
    the probabilities, when asked)."""

    def __init__(self, coarse: str | None, fine: str | None, engine: EngineConfig, threads: int = 1, gpu: bool = False,
                 probabilities: bool = False) -> None:
        super().__init__(coarse, fine, engine, threads, gpu)
        self.probabilities = probabilities

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") == STATUS_ERROR:
            return row
        try:
            coarse_input = row["coarse_input"] if row["coarse_input"].size else None
            fine_input = coarse_input if row["shared_input"] else row["fine_input"] if row["fine_input"].size else None
            with case_limit(row):
                result = self.engine.segment_prepared(coarse_input, fine_input, self.probabilities)
        except CASE_FAILURES as err:  # one case's failure is its error row
            return error_row(row, "segment", err)
        row.update(self.node)
        row.update(
            coarse_windows=result.coarse_windows,
            fine_windows=result.fine_windows,
            coarse_bbox=result.box.to_list() if result.box else None,
            fine_fallback=result.fine_fallback,
            t_coarse_s=result.timings.get("coarse"),
            t_fine_s=result.timings.get("fine"),
            t_post_s=result.timings.get("post"),
            post_done=True,
        )
        box = bounding_box(result.mask, 0)
        probabilities = {"probabilities": result.probabilities} if result.probabilities is not None else {}
        if box is None:  # the final mask is empty
            row.update(status=STATUS_NO_ORGAN, mask_at=None)
            return with_arrays(row, **probabilities)
        row["mask_at"] = box.to_list()
        return with_arrays(row, mask_box=np.ascontiguousarray(result.mask[box.slices]), **probabilities)
