"""The archive job: coarse-to-fine segmentation of a whole CT archive as one Ray Data stream.

Rows are cases, never windows. A case row carries URIs and small metadata; arrays ride along
only between the stages that need them:

    list cases (driver) -> read + preprocess (CPU tasks) -> model stage(s) (actor pools)
        -> DeCrop, post-processing, mask write, metrics (CPU tasks) -> rows (driver) -> Parquet

Two shapes of the model stage, chosen with `--shape`:
- `split` (DESIGN): a coarse actor pool cuts, batches and stitches the coarse windows on its
  device and sends only the crop box and the cropped sub-volume on; a fine actor pool runs the
  fine windows on that crop. Pools can be sized apart, and the whole volume leaves the object
  store once the coarse stage is done.
- `whole`: one actor pool holds both models and runs both stages of a case in one call; the
  cropped sub-volume never crosses processes.
Both run exactly the engine's computation (`CoarseToFine.run_stage`, `locate`,
`segment_prepared`), so their masks are identical. `whole` is the default: in bench/pipeline.py
(2 cores, demo bundles, 40 cases) it ran 25.5 cases/min against 22.7 for `split` with the same
two single-threaded actors, since in `split` the faster pool waits for the slower one. `split`
is for clusters where the two stages want different pools (sizes, GPU fractions).

Pools have a fixed size (default: the GPUs shared out, or one single-threaded actor per CPU),
so the processes do not depend on the archive. Memory is bounded by the cases in flight: the
read tasks are a bounded pool, each actor holds at most `MAX_IN_FLIGHT_PER_ACTOR` cases, and
Ray Data's streaming executor backpressures the reads when the object store fills. No groupby
or shuffle anywhere. Reservations are fitted so the pools can never starve the tasks
(`fit_cpus`); a pool that cannot start (GPUs asked, none present) fails after
`--actor-timeout` instead of hanging.

The driver consumes the stream row by row: it prints progress (done/failed/left, cases/min),
appends rows to `metrics/run_id=<id>/part-*.parquet` every `flush_rows` rows or `flush_s`
seconds (its own files, written whole, so a killed driver loses at most the unflushed rows,
whose cases a rerun recomputes), and writes `runs/<id>.json`. Ray's `write_parquet` is not used:
it gives no per-case progress, and its APPEND default would make each rerun pile up files
named by Ray rather than by run and sequence.

A bad case (unreadable, corrupt, not 3-D, NaNs, unsafe id, bad label) becomes one `error` row
naming the reason; the coarse stage finding nothing is the `no_organ` status; a case whose
worker process dies on every retry becomes an error row too. Nothing stops the run but a bad
archive or bundle, which fail before any work starts. Resume rules: `resdsn_ray.runs`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
from ray.exceptions import GetTimeoutError

import resdsn_ray
from resdsn_ray import runs, storage
from resdsn_ray.archive import Case, is_manifest, list_cases
from resdsn_ray.bundle import load_bundle
from resdsn_ray.config import EngineConfig, PreprocessConfig, to_dict
from resdsn_ray.engine import STATUS_NO_ORGAN, CoarseToFine, finish_mask, prepare_inputs
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import Volume, read_volume, write_mask
from resdsn_ray.metrics import case_metrics
from resdsn_ray.query import latest, summarise
from resdsn_ray.windows import Box, bounding_box, decrop

SHAPES = ("split", "whole")
DEFAULT_SHAPE = "whole"
MAX_IN_FLIGHT_PER_ACTOR = 2
MAX_AUTO_CPU_ACTORS = 8  # without GPUs, default pools get one single-threaded actor per CPU, up to this
# A case whose actor process dies (killed for memory, a crash in native code) is retried this
# many times, then dropped from the stream and reported as an error row: never retried forever.
PROCESS_RETRIES = 2
EMPTY = np.zeros((0, 0, 0), dtype=np.float32)
AWS_PASSTHROUGH = ("NO_PROXY", "no_proxy")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """How the job uses the cluster."""

    shape: str = DEFAULT_SHAPE
    coarse_actors: int | None = None  # actors of the coarse pool (the `whole` pool); None: `auto_actors`
    fine_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: fitted to the cluster's nodes (`fit_cpus`)
    task_cpus: float | None = None  # each read/preprocess and finish/write task; None: fitted
    threads_per_actor: int | None = None  # torch CPU threads per actor; None: round(cpus_per_actor), at least 1
    read_tasks: int = 2
    actor_start_timeout_s: float = 600.0  # fail instead of hanging when no node can host an actor


@dataclass(frozen=True)
class ArchiveJob:
    """One archive run: what to segment, with which models and settings, and where to."""

    input: str
    output: str
    coarse: str | None
    fine: str | None
    engine: EngineConfig = field(default_factory=EngineConfig)
    resources: Resources = field(default_factory=Resources)
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS / the submitting job, else a local Ray
    overwrite: bool = False
    run_id: str | None = None
    fold: int | None = None
    flush_rows: int = 32
    flush_s: float = 15.0
    progress_s: float = 10.0


@dataclass
class RunResult:
    run_id: str
    rows: list[dict[str, Any]]  # this run's rows (`runs.COLUMNS`), in the order they finished
    counts: dict[str, int]
    seconds: float
    record: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Stages (run on the cluster). Each takes and returns one case row; a failing case becomes an
# error row that the later stages pass through.


def _failed(row: dict[str, Any], stage: str, err: BaseException) -> dict[str, Any]:
    reason = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
    out = {k: v for k, v in row.items() if not isinstance(v, np.ndarray)}
    out.update(status=runs.STATUS_ERROR, error=f"{stage}: {reason}")
    return _with_arrays(out)


def _with_arrays(row: dict[str, Any], **arrays: np.ndarray) -> dict[str, Any]:
    """Every array column present in every row (empty where unused): blocks stay one schema."""
    for name in ("coarse_input", "fine_input", "mask_box"):
        row[name] = arrays.get(name, EMPTY)
    return row


def _node() -> dict[str, str]:
    return {"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}


def _quiet_numpy_views() -> None:
    # Arrays from the object store are read-only views; torch warns when it wraps them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def read_case(row: dict[str, Any], coarse: PreprocessConfig | None, fine: PreprocessConfig | None) -> dict[str, Any]:
    """CPU task: decode the image and preprocess it for each stage's bundle."""
    row = dict(row, started_at=time.time())
    try:
        start = time.perf_counter()
        volume = read_volume(row["image_uri"])
        row["t_read_s"] = time.perf_counter() - start
        start = time.perf_counter()
        coarse_input, fine_input = prepare_inputs(volume.array, coarse, fine)
        row["t_preprocess_s"] = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001  any failure of one case is that case's error row
        return _failed(row, "read", err)
    shared = coarse_input is fine_input
    row.update(
        shape=list(volume.shape),
        spacing_mm=list(volume.spacing),
        affine=volume.affine.astype(np.float64).ravel().tolist(),
        shared_input=shared,
    )
    return _with_arrays(
        row,
        coarse_input=coarse_input if coarse_input is not None else EMPTY,
        fine_input=EMPTY if shared or fine_input is None else fine_input,
    )


class _Stage:
    """An actor holding loaded bundles: the model loads once per actor, not once per case."""

    def __init__(self, coarse: str | None, fine: str | None, engine: EngineConfig, threads: int) -> None:
        _quiet_numpy_views()
        torch.set_num_threads(max(1, threads))
        self.engine = CoarseToFine(
            load_bundle(coarse) if coarse else None, load_bundle(fine) if fine else None, engine
        )
        self.node = _node()


class CoarseStage(_Stage):
    """COARSE on the device: windows over the whole volume -> mask -> crop box -> cropped input."""

    def __init__(self, coarse: str, engine: EngineConfig, threads: int = 1) -> None:
        super().__init__(coarse, None, replace(engine, mode="coarse"), threads)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") == runs.STATUS_ERROR:
            return row
        try:
            image = row["coarse_input"]
            mask, row["coarse_windows"], row["t_coarse_s"] = self.engine.run_stage("coarse", image)
            start = time.perf_counter()
            box = self.engine.locate(mask)
            row["t_post_s"] = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001  (one case's failure is its error row)
            return _failed(row, "coarse", err)
        source = image if row["shared_input"] else row["fine_input"]
        row.update(self.node)
        if box is None:
            row.update(status=STATUS_NO_ORGAN, coarse_bbox=None)
            return _with_arrays(row)
        row["coarse_bbox"] = box.to_list()
        # Only the crop travels on, as the fine pool's input.
        return _with_arrays(row, fine_input=np.ascontiguousarray(source[box.slices]))


class FineStage(_Stage):
    """FINE on the device: windows over the cropped sub-volume -> its mask."""

    def __init__(self, fine: str, engine: EngineConfig, threads: int = 1) -> None:
        super().__init__(None, fine, replace(engine, mode="fine"), threads)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") in (runs.STATUS_ERROR, STATUS_NO_ORGAN):
            return row
        try:
            mask, row["fine_windows"], row["t_fine_s"] = self.engine.run_stage("fine", row["fine_input"])
        except Exception as err:  # noqa: BLE001  (one case's failure is its error row)
            return _failed(row, "fine", err)
        row.update(mask_at=row["coarse_bbox"], post_done=False)
        return _with_arrays(row, mask_box=mask.astype(np.uint8))


class WholeCase(_Stage):
    """Both stages of a case in one actor call (`segment_prepared`); returns the final mask."""

    def __init__(self, coarse: str | None, fine: str | None, engine: EngineConfig, threads: int = 1) -> None:
        super().__init__(coarse, fine, engine, threads)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") == runs.STATUS_ERROR:
            return row
        try:
            coarse_input = row["coarse_input"] if row["coarse_input"].size else None
            fine_input = coarse_input if row["shared_input"] else row["fine_input"] if row["fine_input"].size else None
            result = self.engine.segment_prepared(coarse_input, fine_input)
        except Exception as err:  # noqa: BLE001  (one case's failure is its error row)
            return _failed(row, "segment", err)
        row.update(self.node)
        row.update(
            coarse_windows=result.coarse_windows,
            fine_windows=result.fine_windows,
            coarse_bbox=result.box.to_list() if result.box else None,
            t_coarse_s=result.timings.get("coarse"),
            t_fine_s=result.timings.get("fine"),
            t_post_s=result.timings.get("post"),
            post_done=True,
        )
        box = bounding_box(result.mask, 0)
        if box is None:  # the final mask is empty
            row.update(status=STATUS_NO_ORGAN, mask_at=None)
            return _with_arrays(row)
        row["mask_at"] = box.to_list()
        return _with_arrays(row, mask_box=np.ascontiguousarray(result.mask[box.slices]))


def finish_case(row: dict[str, Any], post_ratio: float) -> dict[str, Any]:
    """CPU task: DeCrop, post-processing, label check, mask write, metrics -> the output row."""
    if row.get("status") != runs.STATUS_ERROR:
        try:
            row = _finish(row, post_ratio)
        except Exception as err:  # noqa: BLE001  (one case's failure is its error row)
            row = _failed(row, "finish", err)
    finished = time.time()
    out = {name: row.get(name) for name in runs.COLUMNS if name in row}
    timings = [row.get(key) for key in runs.TIMING_KEYS]
    out.update(
        status=row.get("status") or runs.STATUS_OK,
        label_uri=row.get("label_uri") or None,
        mask_uri=row.get("mask_uri") if row.get("status") != runs.STATUS_ERROR else None,
        t_total_s=float(sum(t for t in timings if t is not None)),
        t_wall_s=finished - row["started_at"] if row.get("started_at") else None,
        started_at=row.get("started_at"),
        finished_at=finished,
    )
    return out


def _finish(row: dict[str, Any], post_ratio: float) -> dict[str, Any]:
    shape = tuple(row["shape"])
    start = time.perf_counter()
    if row.get("mask_at") is not None:
        mask = decrop(row["mask_box"].astype(bool), Box.from_list(row["mask_at"]), shape)
    else:
        mask = np.zeros(shape, dtype=bool)
    if row.get("post_done"):
        final = mask.astype(np.uint8)
        status = runs.STATUS_OK if final.any() else STATUS_NO_ORGAN
    else:
        final, status = finish_mask(mask, post_ratio)
    row["t_post_s"] = (row.get("t_post_s") or 0.0) + time.perf_counter() - start
    affine = np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)
    like = Volume(array=np.broadcast_to(np.float32(0), shape), affine=affine, source=row["image_uri"])

    start = time.perf_counter()
    reference = None
    if row.get("label_uri"):  # checked before the mask is written: an error row has no mask
        label = read_volume(row["label_uri"])
        if label.shape != shape:
            raise InputError(row["label_uri"], f"label shape {label.shape} differs from the image's {shape}")
        if not np.allclose(label.affine, affine, atol=1e-3):
            raise InputError(row["label_uri"], "label grid (affine) differs from the image's")
        reference = label.array > 0
    t_label = time.perf_counter() - start

    start = time.perf_counter()
    write_mask(row["mask_uri"], final, like=like)
    row["t_write_s"] = time.perf_counter() - start
    if reference is not None:
        start = time.perf_counter()
        row.update(case_metrics(final > 0, reference, row["spacing_mm"]))
        row["t_metrics_s"] = time.perf_counter() - start + t_label
    row["status"] = status
    return row


# ---------------------------------------------------------------------------------------------
# Driver


def aws_env() -> dict[str, str]:
    """The S3 settings of this process, for the workers (they may have been started without)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k in AWS_PASSTHROUGH}


def connect(address: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or the job's), else start a local Ray."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=dashboard, logging_level=logging.WARNING)


def build_dataset(rows: list[dict[str, Any]], job: ArchiveJob, preprocess: dict[str, PreprocessConfig | None]):
    """The lazy Ray Data stream of `rows` (one case per block) through all stages."""
    res = job.resources
    context = DataContext.get_current()
    context.wait_for_min_actors_s = res.actor_start_timeout_s
    context.enable_progress_bars = False
    context.max_errored_blocks = -1  # a case lost with its worker must not end the run
    env = {"env_vars": aws_env()} if aws_env() else None
    task = {"num_cpus": res.task_cpus, "compute": TaskPoolStrategy(size=max(1, res.read_tasks)), "runtime_env": env}
    threads = res.threads_per_actor or max(1, round(res.cpus_per_actor or 1))

    def pool(size: int | None) -> dict[str, Any]:
        # Fixed size: the same processes whatever the archive, so memory does not depend on it.
        return {
            "compute": ActorPoolStrategy(size=size or 1, max_tasks_in_flight_per_actor=MAX_IN_FLIGHT_PER_ACTOR),
            "num_cpus": res.cpus_per_actor,
            "num_gpus": res.gpus_per_actor or None,
            "runtime_env": env,
            # Ray Data retries an actor task forever when its actor dies, so one case that kills
            # its worker would stall the run. Extra remote args are deprecated (Ray 2.64) with no
            # named replacement yet; tasks keep Ray's default of 3 retries.
            "max_task_retries": PROCESS_RETRIES,
        }

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(read_case, fn_kwargs=preprocess, **task)
    engine = job.engine
    common = {"engine": engine, "threads": threads}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        if pools(job) == 2:
            ds = ds.map(CoarseStage, fn_constructor_kwargs={"coarse": job.coarse, **common}, **pool(res.coarse_actors))
            ds = ds.map(FineStage, fn_constructor_kwargs={"fine": job.fine, **common}, **pool(res.fine_actors))
        else:
            ds = ds.map(WholeCase, fn_constructor_kwargs={"coarse": job.coarse, "fine": job.fine, **common},
                        **pool(res.coarse_actors))
    return ds.map(finish_case, fn_kwargs={"post_ratio": engine.post_ratio}, **task)


def _settings(job: ArchiveJob, bundle_ids: dict[str, str | None]) -> dict[str, Any]:
    """What decides a mask: bundles and the engine settings that change results."""
    e = job.engine
    return {
        "coarse_model": bundle_ids["coarse"],
        "fine_model": bundle_ids["fine"],
        "mode": e.mode,
        "coarse": to_dict(e.coarse) | {"batch_size": None},
        "fine": to_dict(e.fine) | {"batch_size": None},
        "margin": e.margin,
        "post_ratio": e.post_ratio,
        "precision": e.precision,
    }


def _versions() -> dict[str, str]:
    import pyarrow

    return {
        "resdsn_ray": resdsn_ray.__version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


def _check_output(job: ArchiveJob) -> None:
    if is_manifest(job.input):
        return
    archive, output = storage.absolute(job.input), storage.absolute(job.output)
    if output == archive or output.startswith(archive + "/"):
        raise InputError(job.output, f"output must not lie inside the archive {job.input} (it would be listed as cases)")


def pools(job: ArchiveJob) -> int:
    """Actor pools the job starts: two in the split shape of a coarse-to-fine run, else one."""
    return 2 if job.resources.shape == "split" and job.engine.mode == "c2f" else 1


def auto_actors(resources: Resources, n_pools: int, cluster: dict[str, float]) -> int:
    """Actors per pool when not given: the cluster's GPUs shared out, else one per CPU (capped)."""
    if resources.gpus_per_actor > 0:
        return max(1, int(cluster.get("GPU", 0.0) / resources.gpus_per_actor / n_pools))
    return max(1, min(MAX_AUTO_CPU_ACTORS, int(cluster.get("CPU", 1.0) // n_pools)))


def fit_cpus(actors: int, node_cpus: list[float], actor: float | None = None, task: float | None = None) -> tuple[float, float]:
    """CPUs to reserve per actor and per task so that the job cannot stall on this cluster.

    Ray Data starts every actor of a fixed pool up front. If those reservations leave no node
    with room for a read or finish task, nothing ever moves and no error is raised (measured:
    two 0.5-CPU actors on two 1-CPU nodes starved 1-CPU read tasks forever). Defaults are 1
    CPU each, lowered where nodes are small or actors many (fractions are fine: reservations
    are bookkeeping) so that all `actors` and one task fit, and any node hosting an actor keeps
    room for a task. Given values must at least fit: actors x actor + task on the cluster,
    actor + task on one node. A cluster without CPU nodes yet (autoscaling from zero) is not
    checked.
    """
    total, smallest = sum(node_cpus), min(node_cpus)
    if total <= 0:  # no worker node yet: an autoscaling cluster will bring them
        return actor if actor is not None else 1.0, task if task is not None else 1.0
    task = task if task is not None else min(1.0, smallest / 2)
    if actor is None:
        actor = min(1.0, smallest - task, (total - task) / actors)
    if actor <= 0 or actors * actor + task > total + 1e-9 or actor + task > max(node_cpus) + 1e-9:
        raise InputError(
            "--cpus-per-actor",
            f"{actors} actor(s) x {actor:g} CPU plus a {task:g}-CPU task do not fit on nodes with "
            f"{node_cpus} CPUs; the job would stall. Lower --cpus-per-actor / --task-cpus or the actor counts.",
        )
    return actor, task


def node_cpus() -> list[float]:
    """Logical CPUs of each alive node of the connected cluster."""
    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0] or [0.0]


def run_archive(job: ArchiveJob, say: Callable[[str], None] = print) -> RunResult:
    """Segment every case of `job.input` not already done under `job.output`."""
    started = time.time()
    _check_output(job)
    cases = list_cases(job.input)
    mode = job.engine.mode
    coarse = load_bundle(job.coarse) if mode != "fine" else None
    fine = load_bundle(job.fine) if mode != "coarse" else None
    ids = {"coarse": coarse.id if coarse else None, "fine": fine.id if fine else None}
    settings = _settings(job, ids)
    cfg = runs.config_id(settings)
    run_id = job.run_id or runs.new_run_id()
    history = runs.History.load(job.output, mode)

    base = {"run_id": run_id, "coarse_model": ids["coarse"], "fine_model": ids["fine"], "config_id": cfg, "mode": mode,
            "fold": job.fold}
    immediate: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for case in cases:
        row = dict(base, case_id=case.case_id, image_uri=case.image_uri, label_uri=case.label_uri or "")
        if case.error:
            immediate.append(_listing_error(row, case, history))
        elif not job.overwrite and history.is_done(case.case_id, cfg):
            immediate.append(_skipped(row, history))
        else:
            todo.append(dict(row, attempt=history.next_attempt(case.case_id), mask_uri=runs.mask_uri(job.output, case.case_id, mode)))

    record = {
        "run_id": run_id,
        "status": "running",
        "input": job.input,
        "output": job.output,
        "bundles": {"coarse": {"uri": job.coarse, "id": ids["coarse"]}, "fine": {"uri": job.fine, "id": ids["fine"]}},
        "engine": to_dict(job.engine),
        "resources": to_dict(job.resources),
        "overwrite": job.overwrite,
        "fold": job.fold,
        "config_id": cfg,
        "settings": settings,
        "versions": _versions(),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started_at": _iso(started),
        "cases": len(cases),
        "to_segment": len(todo),
    }
    runs.write_run_record(job.output, run_id, record)
    say(f"run {run_id}: {len(cases)} cases in {job.input}; {len(todo)} to segment, "
        f"{sum(r['status'] == runs.STATUS_SKIPPED for r in immediate)} already done, "
        f"{sum(r['status'] == runs.STATUS_ERROR for r in immediate)} rejected at listing")

    writer = _RowWriter(job, run_id)
    for row in immediate:
        writer.add(row)
    progress = _Progress(len(todo), job.progress_s, say)
    if todo:
        connect(job.address)
        job = replace(job, resources=_resolve(job))
        record["resources"] = to_dict(job.resources)
        preprocess = {"coarse": coarse.preprocess if coarse else None, "fine": fine.preprocess if fine else None}
        seen: set[str] = set()
        try:
            for row in build_dataset(todo, job, preprocess).iter_rows():
                row = _from_stream(row)
                seen.add(row["case_id"])
                writer.add(row)
                progress.update(row)
        except GetTimeoutError as err:
            res = job.resources
            failure = InputError(
                "--actor-timeout",
                f"the actor pools did not start within {res.actor_start_timeout_s:g} s; the cluster has "
                f"{ray.cluster_resources()} and each actor asks {res.cpus_per_actor:g} CPU, {res.gpus_per_actor:g} GPU",
            )
            writer.flush()
            record.update(status="failed", error=str(failure), ended_at=_iso(time.time()))
            runs.write_run_record(job.output, run_id, record)
            raise failure from err
        for row in todo:
            if row["case_id"] not in seen:
                lost = _lost(row)
                writer.add(lost)
                progress.update(lost)
    writer.flush()
    progress.report(final=True)

    ended = time.time()
    counts = dict(Counter(r["status"] for r in writer.rows))
    record.update(status="finished", ended_at=_iso(ended), seconds=ended - started, counts=counts,
                  parts=writer.parts, cases_per_min=progress.rate())
    runs.write_run_record(job.output, run_id, record)
    return RunResult(run_id=run_id, rows=writer.rows, counts=counts, seconds=ended - started, record=record)


def _resolve(job: ArchiveJob) -> Resources:
    """The job's resources with every automatic value fixed for the connected cluster."""
    res, n_pools = job.resources, pools(job)
    auto = auto_actors(res, n_pools, ray.cluster_resources())
    coarse, fine = res.coarse_actors or auto, (res.fine_actors or auto) if n_pools == 2 else 0
    actor_cpus, task_cpus = fit_cpus(coarse + fine, node_cpus(), res.cpus_per_actor, res.task_cpus)
    return replace(res, coarse_actors=coarse, fine_actors=fine or None, cpus_per_actor=actor_cpus, task_cpus=task_cpus)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def _listing_error(row: dict[str, Any], case: Case, history: runs.History) -> dict[str, Any]:
    now = runs.utc_now()
    return dict(row, status=runs.STATUS_ERROR, error=f"listing: {case.error}", label_uri=case.label_uri,
                attempt=history.next_attempt(case.case_id), started_at=now, finished_at=now)


def _lost(row: dict[str, Any]) -> dict[str, Any]:
    now = runs.utc_now()
    return dict(row, status=runs.STATUS_ERROR, label_uri=row["label_uri"] or None, mask_uri=None, started_at=now,
                finished_at=now, error="worker: the process handling this case died on every retry "
                                   "(killed for memory?); see the Ray logs")


def _skipped(row: dict[str, Any], history: runs.History) -> dict[str, Any]:
    done = history.done[row["case_id"]]
    now = runs.utc_now()
    return dict(row, status=runs.STATUS_SKIPPED, label_uri=row["label_uri"] or None, mask_uri=done["mask_uri"],
                attempt=done["attempt"], done_in_run=done["run_id"], started_at=now, finished_at=now)


def _from_stream(row: dict[str, Any]) -> dict[str, Any]:
    """A streamed row as plain Python values with UTC timestamps."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    for name in ("started_at", "finished_at"):
        if isinstance(out.get(name), (int, float)):
            out[name] = datetime.fromtimestamp(out[name], timezone.utc)
    return out


class _RowWriter:
    """Buffers rows and appends them as part files of this run, whole file at a time."""

    def __init__(self, job: ArchiveJob, run_id: str) -> None:
        self.job, self.run_id = job, run_id
        self.rows: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        row = {name: row.get(name) for name in runs.COLUMNS}
        self.rows.append(row)
        self.pending.append(row)
        if len(self.pending) >= self.job.flush_rows or time.monotonic() - self.last >= self.job.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.parts.append(runs.write_rows(self.job.output, self.run_id, len(self.parts), self.pending))
            self.pending = []
        self.last = time.monotonic()


class _Progress:
    """Cases done / failed / left and cases per minute, printed every `every` seconds."""

    def __init__(self, total: int, every: float, say: Callable[[str], None]) -> None:
        self.total, self.every, self.say = total, every, say
        self.counts: Counter[str] = Counter()
        self.start = self.last = time.monotonic()

    def update(self, row: dict[str, Any]) -> None:
        self.counts[row["status"]] += 1
        if time.monotonic() - self.last >= self.every:
            self.report()

    def rate(self) -> float:
        minutes = (time.monotonic() - self.start) / 60
        return sum(self.counts.values()) / minutes if minutes > 0 else 0.0

    def report(self, final: bool = False) -> None:
        done = sum(self.counts.values())
        failed = self.counts[runs.STATUS_ERROR]
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        self.say(f"{'finished' if final else 'progress'}: {done}/{self.total} segmented ({parts or 'none yet'}), "
                 f"{failed} failed, {self.total - done} left, {self.rate():.1f} cases/min")
        self.last = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Command line (jobs/segment_archive.py)

DEMO_DIR = "demo-output"
DEMO_CASES = 6
# The demo must finish in minutes on a 2-core laptop: fewer overlapping windows than the paper's
# n = 6 / 12 (EngineConfig defaults), unless --n-coarse / --n-fine are given.
DEMO_N_COARSE, DEMO_N_FINE = 2, 4


def add_archive_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the archive job besides the engine's (`cli.add_engine_flags`)."""
    parser.add_argument("--input", help="archive prefix or manifest (CSV/Parquet/JSONL); none: build the demo archive")
    parser.add_argument("--output", help=f"output prefix (default with no --input: {DEMO_DIR}/run)")
    parser.add_argument("--overwrite", action="store_true", help="recompute cases already done under --output")
    parser.add_argument("--shape", choices=SHAPES, default=DEFAULT_SHAPE,
                        help="split: coarse and fine actor pools; whole: one pool runs both stages of a case")
    parser.add_argument("--coarse-actors", type=int, help="coarse pool size (the whole pool with --shape whole); "
                        "default: GPUs / --gpus-per-actor per pool, or without GPUs one per CPU (up to 8)")
    parser.add_argument("--fine-actors", type=int, help="fine pool size (--shape split); default as --coarse-actors")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor; fractions share a GPU")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs reserved per actor (default: 1, less where the nodes have few CPUs)")
    parser.add_argument("--task-cpus", type=float, default=None,
                        help="CPUs reserved per read or finish task (default: 1, less where the nodes have few CPUs)")
    parser.add_argument("--read-tasks", type=int, default=2, help="concurrent read/preprocess and write/metrics tasks")
    parser.add_argument("--actor-timeout", type=float, default=600.0,
                        help="seconds to wait for the actor pools to start before failing (e.g. no GPU node)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS / the submitting job, else a local Ray)")
    parser.add_argument("--run-id", help="run id (default: UTC time + random suffix)")
    parser.add_argument("--fold", type=int, help="cross-validation fold recorded in every row")
    parser.add_argument("--flush-rows", type=int, default=32, help="write a Parquet part every N rows ...")
    parser.add_argument("--flush-seconds", type=float, default=15.0, help="... or every S seconds, whichever first")
    parser.add_argument("--progress-seconds", type=float, default=10.0, help="progress line interval")
    parser.add_argument("--demo-dir", default=DEMO_DIR, help="folder of the demo archive and outputs (no --input)")
    parser.add_argument("--demo-cases", type=int, default=DEMO_CASES, help="cases in the demo archive")


def main(argv: list[str] | None = None) -> int:
    from resdsn_ray.cli import add_engine_flags, bundle_uri, engine_config

    parser = argparse.ArgumentParser(prog="segment_archive", description=__doc__.split("\n\n")[0])
    add_engine_flags(parser)
    add_archive_flags(parser)
    defaults = {"n_coarse": parser.get_default("n_coarse"), "n_fine": parser.get_default("n_fine")}
    parser.set_defaults(n_coarse=None, n_fine=None)  # None: not given, so the demo may lighten them
    args = parser.parse_args(argv)
    demo = args.input is None
    if args.n_coarse is None:
        args.n_coarse = DEMO_N_COARSE if demo else defaults["n_coarse"]
    if args.n_fine is None:
        args.n_fine = DEMO_N_FINE if demo else defaults["n_fine"]
    logging.basicConfig(level=logging.WARNING)
    try:
        engine = engine_config(args)
        coarse = bundle_uri(args.coarse, "coarse") if engine.mode != "fine" else None
        fine = bundle_uri(args.fine, "fine") if engine.mode != "coarse" else None
        source, output = args.input, args.output
        if demo:
            source, output = _demo_archive(args), output or storage.join(args.demo_dir, "run")
            print(f"demo: windows n = {args.n_coarse} (coarse) / {args.n_fine} (fine); the paper's are 6 / 12", flush=True)
        if output is None:
            raise InputError("--output", "required with --input")
        resources = Resources(
            shape=args.shape, coarse_actors=args.coarse_actors, fine_actors=args.fine_actors,
            gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, task_cpus=args.task_cpus,
            read_tasks=args.read_tasks, actor_start_timeout_s=args.actor_timeout,
        )
        job = ArchiveJob(
            input=source, output=output, coarse=coarse, fine=fine, engine=engine, resources=resources,
            address=args.address, overwrite=args.overwrite, run_id=args.run_id, fold=args.fold, flush_rows=args.flush_rows,
            flush_s=args.flush_seconds, progress_s=args.progress_seconds,
        )
        result = run_archive(job, say=lambda line: print(line, flush=True))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    current = latest(this_runs_cases(runs.read_rows(output), result.rows, engine.mode))
    print(f"\nmasks: {runs.masks_uri(output, engine.mode)}\nrows:  {runs.metrics_uri(output, result.run_id)}\n"
          f"run:   {runs.run_record_uri(output, result.run_id)}\n")
    print(summarise(runs.row_table(current), output).text(), flush=True)
    for row in current:
        if row["status"] == runs.STATUS_ERROR:
            print(f"error {row['case_id']!r}: {row['error']}", flush=True)
    return 0


def this_runs_cases(rows: pa.Table, run_rows: list[dict[str, Any]], mode: str) -> pa.Table:
    """Every row, of any run, of the cases of `run_rows` in `mode`: the history their summary needs."""
    ids = pa.array(sorted({r["case_id"] for r in run_rows}), pa.string())
    return rows.filter(pc.and_(pc.is_in(rows["case_id"], value_set=ids), pc.equal(rows["mode"], mode)))


def _demo_archive(args: argparse.Namespace) -> str:
    """The demo's synthetic archive (written once, reused by later demo runs)."""
    from resdsn_ray.synthetic import write_archive

    archive = storage.join(args.demo_dir, "archive")
    if not storage.exists(storage.join(archive, "dataset.json")):
        print(f"writing a synthetic archive of {args.demo_cases} cases to {archive}", flush=True)
        write_archive(archive, cases=args.demo_cases, seed=0)
    return archive
