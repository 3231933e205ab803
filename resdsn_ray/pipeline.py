"""The archive job: coarse-to-fine segmentation of a whole CT archive as one Ray Data stream.

Rows are cases, never windows (the stages are `resdsn_ray.stages`):

    list cases (driver) -> read + preprocess (CPU tasks) -> model stage(s) (actor pools)
        -> DeCrop, post-processing, mask write, metrics (CPU tasks) -> rows (driver) -> Parquet

Two shapes of the model stage, chosen with `--shape`: `whole` (default) — one actor pool holds
both models and runs both stages of a case in one call; `split` (DESIGN) — a coarse pool sends
only the crop box and the cropped sub-volume on to a fine pool, for clusters where the stages
want different pool sizes or GPU fractions. Both give the engine's masks. `whole` is the
default: in bench/pipeline.py (2 cores, demo bundles, 40 cases) it ran 25.5 cases/min against
22.7 for `split` with the same two single-threaded actors (the faster pool waits for the other).

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

import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
from ray.exceptions import GetTimeoutError

from resdsn_ray import lease, runs, storage
from resdsn_ray.archive import Case, is_manifest, is_nifti, scan
from resdsn_ray.bundle import load_bundle
from resdsn_ray.cluster import HostWatch, connect, end_leftover_actors, fit_cpus, node_cpus, node_memory, runtime_env
from resdsn_ray.config import (
    STATUS_ERROR,
    STATUS_SKIPPED,
    ArchiveJob,
    PreprocessConfig,
    Resources,
    mask_settings,
    to_dict,
)
from resdsn_ray.errors import InputError
from resdsn_ray.model_stages import CoarseStage, FineStage, WholeCase
from resdsn_ray.progress import eta
from resdsn_ray.provenance import provenance, utc_iso, utc_now
from resdsn_ray.stages import complete_case, finish_case, read_case

# One case in flight per actor: a case that kills its actor (out of memory) must not take a
# neighbour's retries with it (measured with two in flight: 4 good cases lost to 8 kills).
MAX_IN_FLIGHT_PER_ACTOR = 1
UPSCALE_WHEN_BUSY = 0.99  # pool utilisation (busy actors / actors) past which a pool adds actors
CASES_PER_NODE = 8  # the default case budget is this share of the smallest node's memory
SKIPPED_SHOWN = 100  # files the listing set aside that the run record names
MAX_AUTO_CPU_ACTORS = 8  # without GPUs, default pools get one single-threaded actor per CPU, up to this
# A case whose task or actor process dies (killed for memory, a crash in native code) is retried
# this many times, then dropped from the stream and reported as an error row: never retried
# forever (Ray Data's defaults are unlimited: tasks `max_retries=-1`, actors `max_task_retries=-1`).
# Ray 2.60 takes both only through the extra remote args of `map`, deprecated for removal in
# Ray 2.64 with no named replacement yet: the project pins Ray 2.60.x.
PROCESS_RETRIES = 2
# Every Ray Data block costs the driver ~2.4 ms CPU and ~0.6 KB when the dataset is made (ray.put
# and its ref; bench/driver.py: 5,000 blocks of one case 2.4 ms/case, of 8 cases 0.32), and more
# in the scheduling loop as the stream runs: past this many cases a stream puts several cases in a block.
MAX_BLOCKS = 2000
# Small cases share blocks of about this many stored bytes: a block costs the driver ~30-40 ms CPU
# as it streams and each task and actor call tens of ms more, which a tiny case cannot carry (32^3,
# 41 KB stored, ~45 ms of stage work on a CPU); a CT of real size (tens of MB) stays alone in its block.
BLOCK_BYTES = 2_000_000
BLOCKS_PER_ACTOR = 8  # sharing blocks leaves at least this many per model actor, so the actors stay balanced
SIZE_SAMPLE = 16  # cases whose stored size, spread evenly over a stream's rows, gives its typical case
# Cases a stream lost (their processes died on every retry) go through a fresh stream this many
# more times: a node lost mid-run fails the calls in flight on it at once, before Ray has moved
# its actors, so their retries are spent in seconds; a new stream schedules them on the nodes left.
LOST_CASE_PASSES = 1
ATTEMPTS_PER_CASE = (PROCESS_RETRIES + 1) * (LOST_CASE_PASSES + 1)


@dataclass
class RunResult:
    run_id: str
    output: str
    counts: dict[str, int]
    seconds: float
    record: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """This run's rows (`runs.COLUMNS`) in the order they were written, read back from its
        Parquet parts: the driver keeps none (a million-case run would hold a million dicts)."""
        return runs.read_rows(self.output, self.run_id).to_pylist()


# ---------------------------------------------------------------------------------------------
# Driver


def _task_args(job: ArchiveJob) -> dict[str, Any]:
    """The reservation of each read, finish and complete task (one case's memory each)."""
    res = job.resources
    case_bytes = int(res.max_case_gb * 1e9) if res.max_case_gb else None
    return {"num_cpus": res.task_cpus, "memory": case_bytes, "compute": TaskPoolStrategy(size=max(1, res.read_tasks)),
            "runtime_env": runtime_env(), "max_retries": PROCESS_RETRIES}


def blocks(rows: pa.Table, cases_per_block: int = 1):
    """`rows` as a Ray Data dataset of blocks of `cases_per_block` cases (each block is one task of
    every stage: a process lost with it fails all its cases). `from_blocks`, not `from_arrow`:
    the latter runs a remote task per block for metadata the driver has at hand (1.4x the
    driver's CPU per block, 2.7x its memory, and a worker process to start before the first case)."""
    return ray.data.from_blocks([rows.slice(start, cases_per_block) for start in range(0, rows.num_rows, cases_per_block)])


def build_completion(rows: pa.Table, job: ArchiveJob, cases_per_block: int = 1):
    """The lazy Ray Data stream of done cases that lack asked files (no model: CPU tasks only)."""
    ds = blocks(rows, cases_per_block)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map(complete_case, fn_kwargs={"outputs": job.outputs}, **_task_args(job))


def build_dataset(rows: pa.Table, job: ArchiveJob, preprocess: dict[str, PreprocessConfig | None],
                  cases_per_block: int = 1):
    """The lazy Ray Data stream of `rows` through all stages."""
    res = job.resources
    context = DataContext.get_current()
    context.wait_for_min_actors_s = res.actor_start_timeout_s
    context.enable_progress_bars = False
    context.max_errored_blocks = -1  # a case lost with its worker must not end the run
    # With one case in flight per actor a pool is at most 100 % busy, under Ray Data's default
    # threshold to grow (175 %): grow as soon as every actor is busy.
    context.autoscaling_config = replace(context.autoscaling_config, actor_pool_util_upscaling_threshold=UPSCALE_WHEN_BUSY)
    # Every task and actor reserves one case's memory: a node never runs more big cases than fit.
    task = _task_args(job)
    env, case_bytes = task["runtime_env"], task["memory"]
    threads = res.threads_per_actor or max(1, round(res.cpus_per_actor or 1))

    sizes = {"coarse": res.coarse_actors or 1} | ({"fine": res.fine_actors or 1} if pools(job) == 2 else {})
    starts = dict(zip(sizes, starting_actors(res, list(sizes.values()), ray.cluster_resources())))

    def pool(stage: str) -> dict[str, Any]:
        # Each pool is bounded whatever the archive, so memory does not depend on it.
        return {
            "compute": ActorPoolStrategy(min_size=starts[stage], max_size=sizes[stage],
                                         max_tasks_in_flight_per_actor=MAX_IN_FLIGHT_PER_ACTOR),
            "num_cpus": res.cpus_per_actor,
            "num_gpus": res.gpus_per_actor or None,
            "memory": case_bytes,
            "runtime_env": env,
            "max_task_retries": PROCESS_RETRIES,
        }

    ds = blocks(rows, cases_per_block)
    engine = job.engine
    common = {"engine": engine, "threads": threads, "gpu": bool(res.gpus_per_actor)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map(read_case, fn_kwargs=preprocess | {"max_bytes": case_bytes, "timeout_s": res.case_timeout_s}, **task)
        if pools(job) == 2:
            ds = ds.map(CoarseStage, fn_constructor_kwargs={"coarse": job.coarse, **common}, **pool("coarse"))
            ds = ds.map(FineStage, fn_constructor_kwargs={"fine": job.fine, **common}, **pool("fine"))
        else:
            ds = ds.map(WholeCase, fn_constructor_kwargs={"coarse": job.coarse, "fine": job.fine, **common,
                                                          "probabilities": job.outputs.probabilities != "none"},
                        **pool("coarse"))
        return ds.map(finish_case, fn_kwargs={"post_ratio": engine.post_ratio, "outputs": job.outputs}, **task)


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


def starting_actors(resources: Resources, sizes: list[int], cluster: dict[str, float]) -> list[int]:
    """The actors each pool (of `sizes`) starts with: all of them when the cluster's nodes hold
    them now, else as many as fit now, at least one; a pool grows to its size as nodes join (an
    autoscaling cluster starts on its first node). Starting from one actor on a fixed cluster cost
    a ramp: Ray Data adds one actor at a time, each after its model loads (bench/pipeline.py, 2
    actors: steady rate 0.68 of the best plain loop growing from one, 1.11 starting with both)."""
    if resources.fixed_pools:
        return sizes
    room = sum(sizes)
    if resources.gpus_per_actor:
        room = min(room, int(cluster.get("GPU", 0.0) / resources.gpus_per_actor))
    if resources.cpus_per_actor:  # beside room for one read or write task (`cluster.fit_cpus`)
        room = min(room, int((cluster.get("CPU", 0.0) - (resources.task_cpus or 0.0)) / resources.cpus_per_actor + 1e-9))
    return [max(1, min(size, room * size // sum(sizes))) for size in sizes]


def run_archive(job: ArchiveJob, say: Callable[[str], None] = print) -> RunResult:
    """Segment every case of `job.input` not already done under `job.output`, as its only writer."""
    started = time.time()
    # Ray's workers run in other folders: a relative path must mean what it means here.
    job = replace(job, input=storage.absolute(job.input), output=storage.absolute(job.output),
                  **{stage: storage.absolute(uri) for stage, uri in (("coarse", job.coarse), ("fine", job.fine)) if uri})
    _check_output(job)
    run_id = job.run_id or runs.new_run_id()
    if job.run_id and storage.exists(runs.run_record_uri(job.output, run_id)):
        raise InputError("--run-id", f"{run_id!r} is a run of {job.output} already; a rerun takes a new id")
    if not job.hold_output:  # a cross-validation holds its output for all its folds' runs
        return _run(job, run_id, None, started, say)
    with lease.hold(job.output, run_id, job.lease_heartbeat_s, say) as held:
        return _run(job, run_id, held, started, say)


def _run(job: ArchiveJob, run_id: str, held: lease.Lease | None, started: float, say: Callable[[str], None]) -> RunResult:
    listing = scan(job.input, allow_prefixes=job.allow_prefixes)
    listed = len(listing.cases)
    mode = job.engine.mode
    coarse = load_bundle(job.coarse, allow_unfit=job.allow_unfit) if mode != "fine" else None
    fine = load_bundle(job.fine, allow_unfit=job.allow_unfit) if mode != "coarse" else None
    ids = {"coarse": coarse.id if coarse else None, "fine": fine.id if fine else None}
    settings = {"coarse_model": ids["coarse"], "fine_model": ids["fine"], **mask_settings(job.engine)}
    cfg = runs.config_id(settings)
    base = {"run_id": run_id, "coarse_model": ids["coarse"], "fine_model": ids["fine"], "config_id": cfg, "mode": mode,
            "fold": job.fold, "demo_models": job.demo_models}
    plan = plan_run(listing.cases, job, base, runs.History.load(job.output, mode))
    listing = replace(listing, cases=[])  # the plan holds what the run needs of them
    todo, complete = plan.todo, plan.complete
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
        "provenance": provenance(job.engine.device),
        "started_at": utc_iso(started),
        "cases": listed,
        "to_segment": todo.num_rows,
        "to_complete": complete.num_rows,
        "outputs": to_dict(job.outputs),
        "skipped_files": [f"{s.uri}: {s.reason}" for s in listing.skipped[:SKIPPED_SHOWN]],
        "skipped_files_count": len(listing.skipped),
    }
    runs.write_run_record(job.output, run_id, record)
    immediate = {count["values"]: count["counts"] for count in pc.value_counts(plan.immediate["status"]).to_pylist()}
    say(f"run {run_id}: {listed} cases in {job.input}; {todo.num_rows} to segment, "
        + (f"{complete.num_rows} segmented but lacking asked files, " if complete.num_rows else "")
        + f"{immediate.get(STATUS_SKIPPED, 0)} already done, {immediate.get(STATUS_ERROR, 0)} rejected at listing")
    if listing.skipped:
        say(f"{len(listing.skipped)} file(s) not a case (localizers, reports, non-images), e.g. "
            + "; ".join(f"{s.uri}: {s.reason}" for s in listing.skipped[:3]) + f" (run record: up to {SKIPPED_SHOWN})")

    writer = _RowWriter(job, run_id, held)
    for row in _pylist(plan.immediate):
        writer.add(row)
    del plan
    progress = _Progress(todo.num_rows + complete.num_rows, job.progress_s, say)
    watch: HostWatch | None = None
    try:
        if todo.num_rows or complete.num_rows:
            job = replace(job, resources=_connect_and_resolve(job))
            record["resources"] = to_dict(job.resources)
            preprocess = {"coarse": coarse.preprocess if coarse else None, "fine": fine.preprocess if fine else None}
            _stream(complete, lambda rows, k: build_completion(rows, job, k), block_size(job, complete), writer, progress,
                    say)
            if todo.num_rows:
                res = job.resources
                watch = HostWatch(res.cpus_per_actor, res.gpus_per_actor, res.actor_start_timeout_s).start()
                _stream(todo, lambda rows, k: build_dataset(rows, job, preprocess, k), block_size(job, todo), writer,
                        progress, say)
    except BaseException as err:  # any failure, Ctrl-C or SIGTERM: keep what is done, say why the run ended
        failure = watch.failure if watch and watch.failure else _start_failure(job) if isinstance(err, GetTimeoutError) else err
        if held is None or not held.lost:  # a run that lost its lease to another writes nothing more
            writer.flush()
            record.update(status="failed", error=_reason(failure), ended_at=utc_iso(),
                          counts=dict(writer.counts))
            runs.write_run_record(job.output, run_id, record)
        if failure is err:
            raise
        raise failure from err
    finally:
        if watch is not None:
            watch.stop()
    writer.flush()
    progress.report(final=True)

    ended = time.time()
    counts = dict(writer.counts)
    record.update(status="finished", ended_at=utc_iso(ended), seconds=ended - started, counts=counts,
                  parts=writer.parts, cases_per_min=progress.rate())
    runs.write_run_record(job.output, run_id, record)
    return RunResult(run_id=run_id, output=job.output, counts=counts, seconds=ended - started, record=record)


def _stream(rows: pa.Table, build: Callable[[pa.Table, int], Any], cases_per_block: int, writer: _RowWriter,
            progress: _Progress, say: Callable[[str], None]) -> None:
    """Run `rows` through the stream `build` makes, `cases_per_block` cases per block, each output
    row written as it comes. Cases the stream loses (their processes or node died on every retry)
    go through a fresh stream `LOST_CASE_PASSES` more times, one case per block (a case that kills
    its process does not fail its neighbours), then become error rows."""
    for again in range(LOST_CASE_PASSES + 1):
        if not rows.num_rows:
            return
        if not again and cases_per_block > 1:
            say(f"{cases_per_block} cases per block (`--cases-per-block`)")
        if again:
            say(f"{rows.num_rows} case(s) lost with their worker processes or nodes: streaming them again, "
                f"one per block ({again} of {LOST_CASE_PASSES})")
        seen: set[str] = set()
        for row in build(rows, 1 if again else cases_per_block).iter_rows():
            row = _from_stream(row)
            seen.add(row["case_id"])
            writer.add(row)
            progress.update(row)
        end_leftover_actors()  # a restarted actor must not hold the resources the next pass needs
        rows = rows.filter(pc.invert(pc.is_in(rows["case_id"], value_set=pa.array(seen, pa.string()))))
    for row in _pylist(rows):
        lost = _lost(row)
        writer.add(lost)
        progress.update(lost)


def block_size(job: ArchiveJob, rows: pa.Table) -> int:
    """Cases per block: as asked; else enough to share `BLOCK_BYTES` of typical cases, as long as
    every model actor gets `BLOCKS_PER_ACTOR` blocks; at least enough for `MAX_BLOCKS` blocks."""
    res = job.resources
    if res.cases_per_block:
        return res.cases_per_block
    fewest = max(1, -(-rows.num_rows // MAX_BLOCKS))
    spread = rows.num_rows // (BLOCKS_PER_ACTOR * (res.coarse_actors or 1))
    typical = typical_bytes(rows["image_uri"]) if spread > fewest else None
    return max(fewest, min(spread, BLOCK_BYTES // max(typical, 1))) if typical is not None else fewest


def typical_bytes(uris: pa.ChunkedArray) -> int | None:
    """The median stored size of `SIZE_SAMPLE` of `uris` spread evenly (None: none could be sized).
    A size is a hint: a case that cannot be sized, even for a store down after its retries, is
    left to its read, which makes it an error row naming why."""
    picks = np.unique(np.linspace(0, len(uris) - 1, SIZE_SAMPLE).round().astype(np.int64))
    sizes = []
    for uri in uris.take(pa.array(picks)).to_pylist():
        try:
            sizes.append(storage.stored_bytes(uri))
        except Exception as err:
            if not (isinstance(err, OSError) or storage.is_retryable(err)):
                raise
    return int(np.median(sizes)) if sizes else None


def _start_failure(job: ArchiveJob) -> InputError:
    res = job.resources
    return InputError(
        "--actor-timeout",
        f"no model actor started within {res.actor_start_timeout_s:g} s; the cluster has "
        f"{ray.cluster_resources()} and each actor asks {res.cpus_per_actor:g} CPU, {res.gpus_per_actor or 0:g} GPU",
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "stopped (interrupt or SIGTERM); a rerun finishes the cases left"
    return f"{type(err).__name__}: {err}"


def _connect_and_resolve(job: ArchiveJob) -> Resources:
    """Join the cluster; the job's resources with every automatic value fixed for it."""
    connect(job.address)
    cluster, n_pools = ray.cluster_resources(), pools(job)
    res = job.resources
    if res.gpus_per_actor is None:  # a GPU cluster's actors take a GPU each unless told otherwise
        res = replace(res, gpus_per_actor=1.0 if cluster.get("GPU", 0.0) > 0 else 0.0)
    auto = auto_actors(res, n_pools, cluster)
    coarse, fine = res.coarse_actors or auto, (res.fine_actors or auto) if n_pools == 2 else 0
    actor_cpus, task_cpus = fit_cpus(coarse + fine, node_cpus(), res.cpus_per_actor, res.task_cpus)
    return replace(res, coarse_actors=coarse, fine_actors=fine or None, cpus_per_actor=actor_cpus, task_cpus=task_cpus,
                   max_case_gb=fit_case_memory(res.max_case_gb, node_memory()))


def fit_case_memory(asked_gb: float | None, node_memory: list[float]) -> float | None:
    """The case budget in GB: as asked, else an eighth of the smallest node's memory, room for an
    actor and a few read and write tasks on each node (None: nodes not known yet). A budget over
    half a node's memory could leave no room for a task beside an actor."""
    if not node_memory:
        return asked_gb
    smallest = min(node_memory) / 1e9
    if asked_gb is not None and asked_gb > smallest / 2:
        raise InputError("--max-case-gb", f"{asked_gb:g} GB per case does not fit twice on the smallest node "
                                          f"({smallest:.1f} GB for Ray); lower it or use larger nodes")
    return asked_gb if asked_gb is not None else round(smallest / CASES_PER_NODE, 3)


@dataclass(frozen=True)
class Plan:
    """A run's cases by what they need, as Arrow tables: no Python object per case is kept."""

    immediate: pa.Table  # rows written as they are (`runs.ROW_SCHEMA`): already done, rejected at listing
    complete: pa.Table  # done cases lacking asked files: the rows `complete_case` takes
    todo: pa.Table  # cases to segment: the rows `read_case` takes


def plan_run(cases: list[Case], job: ArchiveJob, base: dict[str, Any], history: runs.History) -> Plan:
    """Sort the listed cases by what earlier runs left: done, rejected, to complete, to segment."""
    cfg, mode = base["config_id"], base["mode"]
    immediate, complete, todo = _Tables(runs.ROW_SCHEMA), _Tables(), _Tables()
    for case in cases:
        row = dict(base, case_id=case.case_id, image_uri=case.image_uri, series_uid=case.series_uid or "",
                   label_uri=case.label_uri or "")
        needed = runs.asked_files(job.outputs, not is_nifti(case.image_uri))
        files = {f.column: None for f in runs.OUTPUT_FILES.values()} | {
            runs.OUTPUT_FILES[kind].column: runs.file_uri(job.output, kind, case.case_id, mode) for kind in needed}
        done = None if job.overwrite or case.error else history.done_row(case.case_id, cfg)
        missing = history.missing(case.case_id, needed) if done else list(needed)
        if case.error:
            immediate.append(_listing_error(row, case, history))
        elif done and not missing:
            immediate.append(_skipped(row, done))
        elif done and "probabilities" not in missing:  # the mask stands: write only what is missing
            complete.append(_completing(done, row, files, missing))
        else:
            todo.append(dict(row, **files, to_write=list(needed), attempt=history.next_attempt(case.case_id)))
    return Plan(immediate.table(), complete.table(), todo.table())


PLAN_CHUNK = 4096  # case rows turned into Arrow at a time while planning: bounds the dicts alive at once
_STREAM_FIELDS = {field.name: field for field in runs.ROW_SCHEMA} | {"to_write": pa.field("to_write", pa.list_(pa.string()))}


class _Tables:
    """Rows gathered into one Arrow table, `PLAN_CHUNK` dicts at a time (schema: `schema`, else
    the first row's keys typed as in `runs.ROW_SCHEMA`)."""

    def __init__(self, schema: pa.Schema | None = None) -> None:
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self.tables: list[pa.Table] = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= PLAN_CHUNK:
            self._convert()

    def _convert(self) -> None:
        if self.rows:
            self.schema = self.schema or pa.schema([_STREAM_FIELDS[name] for name in self.rows[0]])
            self.tables.append(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def table(self) -> pa.Table:
        self._convert()
        if not self.tables:
            return (self.schema or pa.schema([_STREAM_FIELDS["case_id"]])).empty_table()
        return pa.concat_tables(self.tables)


def _pylist(rows: pa.Table) -> Iterator[dict[str, Any]]:
    """A table's rows as dicts, a batch at a time."""
    for batch in rows.to_batches(max_chunksize=PLAN_CHUNK):
        yield from batch.to_pylist()


def _listing_error(row: dict[str, Any], case: Case, history: runs.History) -> dict[str, Any]:
    now = utc_now()
    return dict(row, status=STATUS_ERROR, error=f"listing: {case.error}", retryable=False, label_uri=case.label_uri,
                attempt=history.next_attempt(case.case_id), started_at=now, finished_at=now)


def _lost(row: dict[str, Any]) -> dict[str, Any]:
    now = utc_now()
    return dict(row, **{f.column: None for f in runs.OUTPUT_FILES.values()},
                status=STATUS_ERROR, retryable=True, label_uri=row["label_uri"] or None, started_at=now, finished_at=now,
                error=f"worker: the process handling this case died on each of its {ATTEMPTS_PER_CASE} attempts "
                      "(killed for memory?); see the Ray logs")


def _completing(done: dict[str, Any], row: dict[str, Any], files: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    """The row that adds `missing` files to a done case: the done attempt's results (mask,
    metrics, stage timings, model info) under this run, `done_in_run` naming the run that made
    the mask; its `t_wall_s` is the time the files took."""
    return dict(done, **row, **files, to_write=missing, attempt=done["attempt"], done_in_run=runs.mask_run(done),
                error=None, note=None)


def _skipped(row: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    now = utc_now()
    return dict(row, status=STATUS_SKIPPED, label_uri=row["label_uri"] or None,
                **{f.column: done[f.column] for f in runs.OUTPUT_FILES.values()},
                attempt=done["attempt"], done_in_run=runs.mask_run(done), started_at=now, finished_at=now)


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
            out[name] = utc_now(out[name])
    return out


class _RowWriter:
    """Buffers rows and appends them as part files of this run, whole file at a time; keeps only
    the counts by status (the rows are in the parts: `RunResult.rows`)."""

    def __init__(self, job: ArchiveJob, run_id: str, held: lease.Lease | None) -> None:
        self.job, self.run_id, self.held = job, run_id, held
        self.counts: Counter[str] = Counter()
        self.pending: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.counts[row["status"]] += 1
        self.pending.append({name: row.get(name) for name in runs.COLUMNS})
        if len(self.pending) >= self.job.flush_rows or time.monotonic() - self.last >= self.job.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            if self.held is not None:
                self.held.check()  # still this output's writer (InputError once another run took over)
            self.parts.append(runs.write_rows(self.job.output, self.run_id, len(self.parts), self.pending))
            self.pending = []
        self.last = time.monotonic()


class _Progress:
    """Cases done / failed / left, cases per minute and the time left, printed every `every` seconds
    as whole lines (what `ray job logs` can show)."""

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
        failed = self.counts[STATUS_ERROR]
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        left = "" if final else f", ETA {eta(done, self.total, time.monotonic() - self.start)}"
        self.say(f"{'finished' if final else 'progress'}: {done}/{self.total} segmented ({parts or 'none yet'}), "
                 f"{failed} failed, {self.total - done} left, {self.rate():.1f} cases/min{left}")
        self.last = time.monotonic()


def this_runs_cases(rows: pa.Table, run_id: str, mode: str) -> pa.Table:
    """Every row, of any run, of the cases of run `run_id` in `mode`: the history their summary needs."""
    ids = pc.unique(rows.filter(pc.equal(rows["run_id"], run_id))["case_id"])
    return rows.filter(pc.and_(pc.is_in(rows["case_id"], value_set=ids), pc.equal(rows["mode"], mode)))
