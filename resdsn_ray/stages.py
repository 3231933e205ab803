"""The per-case stages the archive job runs, as plain functions and classes: testable without
Ray Data, and the same computation as `engine.CoarseToFine` (`run_stage`, `locate`,
`segment_prepared`), so every pipeline shape gives the engine's masks.

Each takes and returns one case row (a dict); a failing case becomes an error row, naming the
stage and the reason, that the later stages pass through. Arrays ride along only between the
stages that need them:

    read_case (CPU task) -> CoarseStage -> FineStage (actor pools, `split`)
                         -> WholeCase (one actor pool, `whole`)        -> finish_case (CPU task)

The raw image (HU) rides from read_case to finish_case for the statistics and the preview. A
case already segmented that lacks an asked file goes through `complete_case` alone.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from resdsn_ray import runs, storage
from resdsn_ray.bundle import load_bundle
from resdsn_ray.case_files import algorithm_version, seg_meta, write_case_files
from resdsn_ray.config import STATUS_ERROR, STATUS_NO_ORGAN, STATUS_OK, EngineConfig, OutputConfig, PreprocessConfig
from resdsn_ray.deadline import CaseTimeout, deadline, time_limit
from resdsn_ray.engine import CoarseToFine, finish_mask, prepare_inputs
from resdsn_ray.errors import InputError
from resdsn_ray.metrics import case_metrics
from resdsn_ray.volumes import Volume, check_same_grid, read_volume
from resdsn_ray.windows import Box, bounding_box, decrop

EMPTY = np.zeros((0, 0, 0), dtype=np.float32)
ARRAY_COLUMNS = ("coarse_input", "fine_input", "mask_box", "image", "probabilities")
CARRIED = ("image", "probabilities")  # once set, kept by every later stage until finish_case


# What ends one case as its error row (a timeout is a BaseException, see `deadline`).
CASE_FAILURES = (Exception, CaseTimeout)


def _failed(row: dict[str, Any], stage: str, err: BaseException) -> dict[str, Any]:
    reason = str(err) if isinstance(err, (InputError, CaseTimeout)) else f"{type(err).__name__}: {err}"
    out = {k: v for k, v in row.items() if not isinstance(v, np.ndarray)}
    out.update(status=STATUS_ERROR, error=f"{stage}: {reason}",
               retryable=isinstance(err, CaseTimeout) or storage.is_retryable(err))
    return _with_arrays(out)


def _limit(row: dict[str, Any]) -> Any:
    """The rest of the case's time (`read_case` set its deadline) as a limit on one stage."""
    return time_limit(row.get("deadline"), row.get("timeout_s"))


def _with_arrays(row: dict[str, Any], **arrays: np.ndarray) -> dict[str, Any]:
    """Every array column present in every row (empty where unused): blocks stay one schema."""
    for name in ARRAY_COLUMNS:
        kept = row.get(name) if name in CARRIED and isinstance(row.get(name), np.ndarray) else EMPTY
        row[name] = arrays.get(name, kept)
    return row


def _node() -> dict[str, str | None]:
    """This process's host, and its Ray node when it runs as a Ray worker (no Ray import here)."""
    ray = sys.modules.get("ray")
    node_id = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"node": socket.gethostname(), "node_id": node_id}


def _quiet_numpy_views() -> None:
    # Arrays from the object store are read-only views; torch warns when it wraps them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def read_case(row: dict[str, Any], coarse: PreprocessConfig | None, fine: PreprocessConfig | None,
              max_bytes: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """CPU task: decode the image and preprocess it for each stage's bundle; a case whose header says
    it needs more than `max_bytes` to segment is refused before decoding (`volumes.peak_bytes`).
    The case must be finished within `timeout_s` of now, every later stage included."""
    started = time.time()
    row = dict(row, started_at=started, deadline=deadline(timeout_s, started), timeout_s=timeout_s)
    try:
        with _limit(row):
            return _read(row, coarse, fine, max_bytes)
    except CASE_FAILURES as err:  # any failure of one case is that case's error row
        return _failed(row, "read", err)


def _read(row: dict[str, Any], coarse: PreprocessConfig | None, fine: PreprocessConfig | None,
          max_bytes: int | None) -> dict[str, Any]:
    start = time.perf_counter()
    volume = read_volume(row["image_uri"], series_uid=row.get("series_uid") or None, max_bytes=max_bytes)
    row["t_read_s"] = time.perf_counter() - start
    start = time.perf_counter()
    coarse_input, fine_input = prepare_inputs(volume.array, coarse, fine)
    row["t_preprocess_s"] = time.perf_counter() - start
    shared = coarse_input is fine_input
    row.update(
        shape=list(volume.shape),
        spacing_mm=list(volume.spacing),
        affine=volume.affine.astype(np.float64).ravel().tolist(),
        shared_input=shared,
        seg_meta=seg_meta(volume),
    )
    return _with_arrays(
        row,
        coarse_input=coarse_input if coarse_input is not None else EMPTY,
        fine_input=EMPTY if shared or fine_input is None else fine_input,
        image=volume.array,
    )


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
            with _limit(row):
                image = row["coarse_input"]
                mask, row["coarse_windows"], row["t_coarse_s"] = self.engine.run_stage("coarse", image)
                start = time.perf_counter()
                box = self.engine.locate(mask)
                row["t_post_s"] = time.perf_counter() - start
        except CASE_FAILURES as err:  # one case's failure is its error row
            return _failed(row, "coarse", err)
        source = image if row["shared_input"] else row["fine_input"]
        row.update(self.node)
        if box is None and self.engine.config.on_no_organ == "fine":  # the fine pool takes the whole volume
            row.update(coarse_bbox=None, fine_fallback=True, fine_at=[0, 0, 0, *source.shape])
            return _with_arrays(row, fine_input=source)
        if box is None:
            row.update(status=STATUS_NO_ORGAN, coarse_bbox=None, fine_fallback=False, fine_at=None)
            return _with_arrays(row)
        row.update(coarse_bbox=box.to_list(), fine_fallback=False, fine_at=box.to_list())
        # Only the crop travels on, as the fine pool's input.
        return _with_arrays(row, fine_input=np.ascontiguousarray(source[box.slices]))


class FineStage(_Stage):
    """FINE on the device: windows over the cropped sub-volume -> its mask."""

    def __init__(self, fine: str, engine: EngineConfig, threads: int = 1, gpu: bool = False) -> None:
        super().__init__(None, fine, replace(engine, mode="fine"), threads, gpu)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") in (STATUS_ERROR, STATUS_NO_ORGAN):
            return row
        try:
            with _limit(row):
                mask, row["fine_windows"], row["t_fine_s"] = self.engine.run_stage("fine", row["fine_input"])
        except CASE_FAILURES as err:  # one case's failure is its error row
            return _failed(row, "fine", err)
        row.update(mask_at=row["fine_at"], post_done=False)
        return _with_arrays(row, mask_box=mask.astype(np.uint8))


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
            with _limit(row):
                result = self.engine.segment_prepared(coarse_input, fine_input, self.probabilities)
        except CASE_FAILURES as err:  # one case's failure is its error row
            return _failed(row, "segment", err)
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
            return _with_arrays(row, **probabilities)
        row["mask_at"] = box.to_list()
        return _with_arrays(row, mask_box=np.ascontiguousarray(result.mask[box.slices]), **probabilities)


def finish_case(row: dict[str, Any], post_ratio: float, outputs: OutputConfig) -> dict[str, Any]:
    """CPU task: DeCrop, post-processing, label check, the case's files, statistics, metrics -> the output row."""
    if row.get("status") != STATUS_ERROR:
        try:
            with _limit(row):
                row = _finish(row, post_ratio, outputs)
        except CASE_FAILURES as err:  # one case's failure is its error row
            row = _failed(row, "finish", err)
    return _output_row(row)


def complete_case(row: dict[str, Any], outputs: OutputConfig) -> dict[str, Any]:
    """CPU task: the missing files of a case already segmented (`row["to_write"]`), from its
    image and its existing mask; the row of the done attempt (its stage timings kept) with them added."""
    row = dict(row, started_at=time.time())
    try:
        volume = read_volume(row["image_uri"], series_uid=row.get("series_uid") or None)
        mask = read_volume(row["mask_uri"])
        check_same_grid(mask, volume.shape, volume.affine)
        row.update(write_case_files(_file_uris(row), mask.array.astype(np.uint8), volume, outputs,
                                    version=algorithm_version(row.get("coarse_model"), row.get("fine_model")),
                                    title=row["case_id"]))
    except CASE_FAILURES as err:  # one case's failure is its error row
        row = _failed(row, "complete", err)
    return _output_row(row)


def _file_uris(row: dict[str, Any]) -> dict[str, str]:
    """Kind -> URI of the files this row writes (`to_write`; their URIs are in the row)."""
    return {kind: row[runs.OUTPUT_FILES[kind].column] for kind in row["to_write"]}


def _output_row(row: dict[str, Any]) -> dict[str, Any]:
    finished = time.time()
    out = {name: row.get(name) for name in runs.COLUMNS if name in row}
    timings = [row.get(key) for key in runs.TIMING_KEYS]
    failed = row.get("status") == STATUS_ERROR
    out.update({f.column: None for f in runs.OUTPUT_FILES.values()} if failed else {})
    out.update(
        status=row.get("status") or STATUS_OK,
        label_uri=row.get("label_uri") or None,
        t_total_s=float(sum(t for t in timings if t is not None)),
        t_wall_s=finished - row["started_at"] if row.get("started_at") else None,
        started_at=row.get("started_at"),
        finished_at=finished,
    )
    return out


def _finish(row: dict[str, Any], post_ratio: float, outputs: OutputConfig) -> dict[str, Any]:
    shape = tuple(row["shape"])
    start = time.perf_counter()
    if row.get("mask_at") is not None:
        mask = decrop(row["mask_box"].astype(bool), Box.from_list(row["mask_at"]), shape)
    else:
        mask = np.zeros(shape, dtype=bool)
    if row.get("post_done"):
        final = mask.astype(np.uint8)
        status = STATUS_OK if final.any() else STATUS_NO_ORGAN
    else:
        final, status = finish_mask(mask, post_ratio)
    row["t_post_s"] = (row.get("t_post_s") or 0.0) + time.perf_counter() - start
    affine = np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)
    volume = Volume(array=row["image"], affine=affine, source=row["image_uri"], meta=json.loads(row["seg_meta"]))

    start = time.perf_counter()
    reference = None
    if row.get("label_uri"):  # checked before the mask is written: an error row has no mask
        label = read_volume(row["label_uri"])
        check_same_grid(label, shape, affine)
        reference = label.array > 0
    t_label = time.perf_counter() - start

    start = time.perf_counter()
    stamp = runs.mask_stamp(row.get("config_id"), row.get("run_id"), row.get("attempt"))
    probabilities = row["probabilities"] if row["probabilities"].size else None
    row.update(write_case_files(_file_uris(row), final, volume, outputs, probabilities, stamp,
                                algorithm_version(row.get("coarse_model"), row.get("fine_model")), row["case_id"]))
    row["t_write_s"] = time.perf_counter() - start
    if reference is not None:
        start = time.perf_counter()
        row.update(case_metrics(final > 0, reference, row["spacing_mm"]))
        row["t_metrics_s"] = time.perf_counter() - start + t_label
    row["status"] = status
    return row
