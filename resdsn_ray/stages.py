"""The per-case stages the archive job runs, as plain functions and classes: testable without
Ray Data, and the same computation as `engine.CoarseToFine`, so every pipeline shape gives the
engine's masks. This module holds the CPU tasks and the case row they pass on; the stages that
hold a model are `model_stages`:

    read_case (CPU task) -> CoarseStage -> FineStage (actor pools, `split`)
                         -> WholeCase (one actor pool, `whole`)        -> finish_case (CPU task)

Each takes and returns one case row (a dict); a failing case becomes an error row, naming the
stage and the reason, that the later stages pass through. Arrays ride along only between the
stages that need them; the raw image (HU, int16 where lossless) rides from read_case to
finish_case for the statistics and the preview. A case already segmented that lacks an asked
file goes through `complete_case` alone. No torch here: a CPU task's worker process starts
without it (1.3 s and ~200 MiB each).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from resdsn_ray import runs, storage
from resdsn_ray.boxes import Box, decrop
from resdsn_ray.case_files import algorithm_version, seg_meta, write_case_files
from resdsn_ray.config import STATUS_ERROR, STATUS_NO_ORGAN, STATUS_OK, OutputConfig, PreprocessConfig
from resdsn_ray.deadline import CaseTimeout, deadline, time_limit
from resdsn_ray.errors import InputError
from resdsn_ray.metrics import case_metrics
from resdsn_ray.postprocess import finish_mask
from resdsn_ray.preprocess import prepare_inputs
from resdsn_ray.volumes import Volume, check_same_grid, read_volume

EMPTY = np.zeros((0, 0, 0), dtype=np.float32)
ARRAY_COLUMNS = ("coarse_input", "fine_input", "mask_box", "image", "probabilities")
CARRIED = ("image", "probabilities")  # once set, kept by every later stage until finish_case


# What ends one case as its error row (a timeout is a BaseException, see `deadline`).
CASE_FAILURES = (Exception, CaseTimeout)


def error_row(row: dict[str, Any], stage: str, err: BaseException) -> dict[str, Any]:
    """The row of a case that failed in `stage`: the reason named, its arrays dropped, and whether
    another attempt may succeed (a timeout, a storage hiccup)."""
    reason = str(err) if isinstance(err, (InputError, CaseTimeout)) else f"{type(err).__name__}: {err}"
    out = {k: v for k, v in row.items() if not isinstance(v, np.ndarray)}
    out.update(status=STATUS_ERROR, error=f"{stage}: {reason}",
               retryable=isinstance(err, CaseTimeout) or storage.is_retryable(err))
    return with_arrays(out)


def case_limit(row: dict[str, Any]) -> Any:
    """The rest of the case's time (`read_case` set its deadline) as a limit on one stage."""
    return time_limit(row.get("deadline"), row.get("timeout_s"))


def with_arrays(row: dict[str, Any], **arrays: np.ndarray) -> dict[str, Any]:
    """Every array column present in every row (empty where unused): blocks stay one schema."""
    for name in ARRAY_COLUMNS:
        kept = row.get(name) if name in CARRIED and isinstance(row.get(name), np.ndarray) else EMPTY
        row[name] = arrays.get(name, kept)
    return row


def read_case(row: dict[str, Any], coarse: PreprocessConfig | None, fine: PreprocessConfig | None,
              max_bytes: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """CPU task: decode the image and preprocess it for each stage's bundle; a case whose header says
    it needs more than `max_bytes` to segment is refused before decoding (`volumes.peak_bytes`).
    The case must be finished within `timeout_s` of now, every later stage included."""
    started = time.time()
    row = dict(row, started_at=started, deadline=deadline(timeout_s, started), timeout_s=timeout_s)
    try:
        with case_limit(row):
            return _read(row, coarse, fine, max_bytes)
    except CASE_FAILURES as err:  # any failure of one case is that case's error row
        return error_row(row, "read", err)


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
    return with_arrays(
        row,
        coarse_input=coarse_input if coarse_input is not None else EMPTY,
        fine_input=EMPTY if shared or fine_input is None else fine_input,
        image=compact_hu(volume.array),
    )


def compact_hu(image: np.ndarray) -> np.ndarray:
    """`image` as int16 where that is lossless (CT stores integer HU; a rescaled or resampled image
    stays float32). The raw image rides from the read task through the model actor to the finish
    task: at 512x512x300 a case then carries 472 instead of 629 MB into the actor and 158 instead
    of 316 MB out of it (bench/transit.py)."""
    with np.errstate(invalid="ignore"):  # inf: not an int16, kept as it is
        small = image.astype(np.int16)
    return small if all(np.array_equal(small[..., k:k + 16], image[..., k:k + 16])  # no image-sized temporary
                        for k in range(0, image.shape[-1], 16)) else image


def finish_case(row: dict[str, Any], post_ratio: float, outputs: OutputConfig) -> dict[str, Any]:
    """CPU task: DeCrop, post-processing, label check, the case's files, statistics, metrics -> the output row."""
    if row.get("status") != STATUS_ERROR:
        try:
            with case_limit(row):
                row = _finish(row, post_ratio, outputs)
        except CASE_FAILURES as err:  # one case's failure is its error row
            row = error_row(row, "finish", err)
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
        row = error_row(row, "complete", err)
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
