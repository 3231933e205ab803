"""Archive pipeline benchmark: throughput against a plain engine loop, memory against archive size.

    python bench/pipeline.py [--cases 40 --small 10 --shapes whole split ...]

On one synthetic archive and the same cores, in one run:
1. a plain loop in this process: read, `CoarseToFine.segment`, write the mask, metrics, case by
   case, with 1 torch thread and with all cores (the faster is the baseline);
2. the Ray Data pipeline (`run_archive`) on a fresh local Ray, per pipeline shape; its time
   includes starting the actor pools (not `ray.init`);
3. peak memory of the whole local Ray cluster (this driver and every process it started:
   GCS, raylet with the object store, workers), as summed PSS sampled every second, for the
   full archive and for a manifest of its first `--small` cases (the same cases).
4. the driver's own CPU time per case (this process, all its threads: Ray Data's scheduling
   loop, row conversion, Parquet parts) in every pipeline run;
5. with `--tiny N`, the orchestration ceiling: N tiny cases (32^3, one window per stage, random
   width-8 bundles; a manifest of N ids over a few real files) through `run_archive`, in cases/s,
   at the job's default block size and at each of `--tiny-blocks` cases per block.
Goals: pipeline/loop steady throughput >= 1.0 (start-up shown apart); peak memory(full)/peak
memory(small) <= 1.2; driver CPU <= 10 ms per case; tiny-case ceiling >= 30 cases/s on 2 cores.
Without trained demo bundles it uses random ResDSN bundles (width 8, patch 32): the timing
and memory figures hold, the masks mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
from collections import Counter
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from resdsn_ray import storage
from resdsn_ray.archive import list_cases
from resdsn_ray.bundle import CONFIG_FILE, demo_bundle_uri, load_bundle, save_bundle
from resdsn_ray.config import ArchiveJob, EngineConfig, ModelConfig, Resources, WindowConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.metrics import case_metrics
from resdsn_ray.model import build_model
from resdsn_ray.pipeline import run_archive
from resdsn_ray.synthetic import write_archive
from resdsn_ray.volumes import read_volume, write_mask


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class StackSampler:
    """Where the driver's Python threads spend CPU: every `every` s each thread's stack from
    `sys._current_frames`, weighted by the CPU ticks the thread used since the last sample
    (`/proc/self/task/<tid>/stat`). cProfile sees one thread only, and Ray Data schedules in its own."""

    def __init__(self, every: float = 0.01) -> None:
        self.every, self._stop, self.own_cpu = every, threading.Event(), 0.0
        self.inclusive: Counter[str] = Counter()
        self.leaf: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me, ticks = threading.get_ident(), {}
        while not self._stop.wait(self.every):
            native = {t.ident: t.native_id for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me or ident not in native:
                    continue
                used = thread_ticks(native[ident])
                weight, ticks[ident] = used - ticks.get(ident, used), used
                if weight:
                    self.leaf[_where(frame)] += weight
                    for name in {_where(f) for f in _stack(frame)}:
                        self.inclusive[name] += weight
        self.own_cpu = time.thread_time()

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 45) -> str:
        total = sum(self.leaf.values()) or 1
        lines = [f"{total} CPU ticks of the driver's Python threads, sampled every {self.every * 1000:g} ms", "inclusive:"]
        lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in self.inclusive.most_common(top)]
        lines += ["self:"] + [f"{100 * n / total:5.1f}%  {name}" for name, n in self.leaf.most_common(top)]
        return "\n".join(lines)


def thread_ticks(tid: int) -> int:
    try:
        with open(f"/proc/self/task/{tid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _stack(frame):  # noqa: ANN001, ANN202 (frames)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _where(frame) -> str:  # noqa: ANN001
    code = frame.f_code
    return f"{code.co_name} ({'/'.join(code.co_filename.split('/')[-2:])}:{code.co_firstlineno})"


def cluster_pss() -> int:
    """Summed PSS of this process and all its descendants: the driver and its local Ray cluster."""
    return sum(pss_bytes(p) for p in descendants(os.getpid()))


class Monitor:
    """Peak summed PSS of this process and all its descendants (the local Ray cluster) every
    `pss_every` s, and the driver's CPU seconds over time (without this thread's own) every `every`
    s. PSS is dear to read (the kernel walks each process's page tables: ~50 ms a sweep of a busy
    local cluster); sampled every 0.2 s it took a third of a core from the run it measured."""

    def __init__(self, every: float = 0.2, pss_every: float = 1.0) -> None:
        self.every, self.pss_every, self.peak, self._stop = every, pss_every, 0, threading.Event()
        self.cpu: list[tuple[float, float]] = []  # (time.time(), driver CPU s)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        swept = 0.0
        while not self._stop.is_set():
            self.cpu.append((time.time(), driver_cpu_s() - time.thread_time()))
            if time.time() - swept >= self.pss_every:
                swept, self.peak = time.time(), max(self.peak, cluster_pss())
            self._stop.wait(self.every)
        self.cpu.append((time.time(), driver_cpu_s() - time.thread_time()))
        self.peak = max(self.peak, cluster_pss())

    def cpu_at(self, when: float) -> float:
        """The driver's CPU seconds at `when` (the last sample before it)."""
        return max((cpu for t, cpu in self.cpu if t <= when), default=self.cpu[0][1])

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(archive: str, out: str, coarse: str, fine: str, engine: EngineConfig, threads: int,
               give_up: float = float("inf")) -> tuple[float, bool]:
    """Seconds to segment every case of `archive` in one process, as the engine alone would.

    Stops after 3 cases when that pace would take over `give_up` seconds for the archive, and
    returns the extrapolated time with True (torch's thread pool collapses when other processes
    hold cores: on this shared 2-core machine 2 threads ran 15x slower than 1).
    """
    torch.set_num_threads(threads)
    c2f = CoarseToFine(load_bundle(coarse), load_bundle(fine), engine)
    cases = list_cases(archive)
    start = time.perf_counter()
    for i, case in enumerate(cases):
        volume = read_volume(case.image_uri)
        result = c2f.segment(volume)
        write_mask(storage.join(out, f"{case.case_id}.nii.gz"), result.mask, like=volume)
        if case.label_uri:
            case_metrics(result.mask > 0, read_volume(case.label_uri).array > 0, volume.spacing)
        pace = (time.perf_counter() - start) / (i + 1) * len(cases)
        if i == 2 and pace > give_up:
            return pace, True
    return time.perf_counter() - start, False


def driver_cpu_s() -> float:
    """CPU seconds this process (every thread of the Ray driver) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class PipelineRun:
    seconds: float
    first_s: float  # from the call to the first finished case: start-up (listing, pools, first case)
    start_s: float  # from the call to the first case's read: start-up (listing, the pools' actors)
    steady: float  # cases/min from the first case's read to the last finished case
    driver_ms: float  # driver CPU per case, the whole run
    steady_driver_ms: float  # driver CPU per case from the first case's read to the last finished case
    peak: int  # cluster bytes
    idle: int


def pipeline(archive: str, out: str, coarse: str, fine: str, engine: EngineConfig, shape: str,
             actors: int | None, cases_per_block: int | None = None) -> PipelineRun:
    """A run on a fresh local Ray: its time, start-up, steady rate, driver CPU and cluster memory.

    Steady throughput counts every case over the time from the first case's read to the last
    finished case, i.e. without the start of the actor pools. (Counted from the first *finished*
    case, it measured only the finish tasks' tail when reads kept the task slot until the last
    read: the first row came after all reads, and the rate after it was the finishing alone.)"""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        time.sleep(2)
        idle = cluster_pss()
        resources = Resources(shape=shape, coarse_actors=actors, fine_actors=actors, threads_per_actor=1,
                              cases_per_block=cases_per_block)
        job = ArchiveJob(input=archive, output=out, coarse=coarse, fine=fine, engine=engine, resources=resources)
        with Monitor() as monitor:
            wall, start = time.time(), time.perf_counter()
            result = run_archive(job, say=lambda line: None)
            seconds = time.perf_counter() - start
        rows = result.rows
        bad = [r for r in rows if r["status"] not in ("ok", "no_organ")]
        assert not bad, bad[:3]
        ends = sorted(r["finished_at"].timestamp() for r in rows)
        begun = min(r["started_at"].timestamp() for r in rows)
        steady = 60 * len(rows) / (ends[-1] - begun)
        cpu = monitor.cpu[-1][1] - monitor.cpu[0][1]
        steady_cpu = monitor.cpu_at(ends[-1]) - monitor.cpu_at(begun)
        return PipelineRun(seconds, ends[0] - wall, begun - wall, steady, 1000 * cpu / len(rows),
                           1000 * steady_cpu / len(rows), monitor.peak, idle)
    finally:
        ray.shutdown()


def random_bundles(work: Path) -> tuple[str, str]:
    """Coarse and fine bundles of freshly initialised ResDSN (width 8, patch 32) under `work`."""
    torch.manual_seed(0)
    uris = str(work / "coarse"), str(work / "fine")
    for stage, uri in zip(("coarse", "fine"), uris):
        if not (Path(uri) / CONFIG_FILE).exists():
            save_bundle(uri, build_model("resdsn", width=8), ModelConfig(width=8, patch=32), stage)
    return uris


def tiny_ceiling(work: Path, cases: int, cases_per_block: int | None, profile: str | None) -> None:
    """Cases/s and driver CPU per case when the cases cost almost nothing: the orchestration ceiling."""
    files = list_cases(str(work / "tiny-files")) if (work / "tiny-files").exists() else []
    if not files:
        write_archive(str(work / "tiny-files"), cases=4, seed=0, shape=(32, 32, 32))
        files = list_cases(str(work / "tiny-files"))
    manifest = work / f"tiny-{cases}.csv"
    manifest.write_text("case_id,image_uri,label_uri\n" + "".join(
        f"tiny{i:06d},{files[i % len(files)].image_uri},{files[i % len(files)].label_uri}\n" for i in range(cases)))
    coarse, fine = random_bundles(work)
    engine = EngineConfig(coarse=WindowConfig(n=0), fine=WindowConfig(n=0), device="cpu")  # one 32^3 window each
    out = tempfile.mkdtemp(prefix="tiny-out-", dir=work)
    sampler = StackSampler()
    with sampler if profile else contextlib.nullcontext():
        run = pipeline(str(manifest), out, coarse, fine, engine, "whole", None, cases_per_block)
    if profile:
        Path(profile).write_text(sampler.report())
    print(f"tiny-case ceiling ({cases} cases 32^3, one window per stage, {cases_per_block or 'default'} case(s) per block, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}): "
          f"{cases / run.seconds:.1f} cases/s overall, {run.steady / 60:.1f} cases/s steady, first read after "
          f"{run.start_s:.1f} s, first case after {run.first_s:.1f} s; driver CPU {run.driver_ms:.1f} ms/case (steady {run.steady_driver_ms:.1f}); peak cluster memory {run.peak / 2**20:.0f} MiB"
          + (f"; profile in {profile}" if profile else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="0: only the tiny-case ceiling")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--shapes", nargs="+", default=["whole", "split"], choices=["whole", "split"])
    parser.add_argument("--actors", type=int, default=None,
                        help="actors per pool, each with 1 torch thread (default: one per core over all pools)")
    parser.add_argument("--n-coarse", type=int, default=2)
    parser.add_argument("--n-fine", type=int, default=2)
    parser.add_argument("--tiny", type=int, default=300, help="tiny cases for the orchestration ceiling (0: none)")
    parser.add_argument("--tiny-blocks", type=int, nargs="+", default=[0, 1],
                        help="cases per block of the tiny runs (0: the job's default, `pipeline.block_size`)")
    parser.add_argument("--profile", help="write where the driver's threads spent the tiny run (sampled stacks) to this file")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}", flush=True)
    if args.cases:
        compare(args, work)
    for cases_per_block in args.tiny_blocks if args.tiny else ():
        tiny_ceiling(work, args.tiny, cases_per_block or None, args.profile and f"{args.profile}.{cases_per_block}")
    print(f"load average now {os.getloadavg()[0]:.1f}; masks and rows under {work}")


def compare(args: argparse.Namespace, work: Path) -> None:
    """The pipeline against the best plain loop, and its memory on the full against the small archive."""
    archive = str(work / "archive")
    if not (work / "archive" / "dataset.json").exists():
        write_archive(archive, cases=args.cases, seed=0, shape=tuple(args.shape))
    small = work / "small.csv"
    small.write_text("case_id,image_uri,label_uri\n" + "".join(
        f"{c.case_id},{c.image_uri},{c.label_uri}\n" for c in list_cases(archive)[: args.small]))
    if (Path(demo_bundle_uri("coarse")) / CONFIG_FILE).exists():
        coarse, fine, models = demo_bundle_uri("coarse"), demo_bundle_uri("fine"), "demo bundles"
    else:
        (coarse, fine), models = random_bundles(work), "random ResDSN width 8, patch 32"
    engine = EngineConfig(coarse=WindowConfig(n=args.n_coarse), fine=WindowConfig(n=args.n_fine), device="cpu")

    print(f"{args.cases} cases {tuple(args.shape)}, {models}, n={args.n_coarse}/{args.n_fine}", flush=True)
    loops = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        seconds, stopped = plain_loop(archive, str(work / f"loop-{threads}"), coarse, fine, engine, threads,
                                      give_up=2 * min(loops.values(), default=float("inf")))
        loops[threads] = seconds
        print(f"plain loop, {threads} torch thread(s): {seconds:.1f} s{' (extrapolated from 3 cases; stopped)' if stopped else ''}, "
              f"{60 * args.cases / seconds:.2f} cases/min", flush=True)
    best = 60 * args.cases / min(loops.values())
    actors = {s: args.actors or max(1, (os.cpu_count() or 1) // (2 if s == "split" else 1)) for s in args.shapes}
    for shape in args.shapes:
        run = pipeline(archive, tempfile.mkdtemp(prefix=f"out-{shape}-", dir=work), coarse, fine, engine, shape, actors[shape])
        print(f"pipeline {shape} ({actors[shape]} actor(s)/pool): {run.seconds:.1f} s, {60 * args.cases / run.seconds:.2f} "
              f"cases/min, ratio vs best loop {60 * args.cases / run.seconds / best:.2f}; steady {run.steady:.2f} cases/min, "
              f"steady ratio vs best loop {run.steady / best:.2f}; start-up: first read {run.start_s:.1f} s, first case {run.first_s:.1f} s; "
              f"driver CPU {run.driver_ms:.1f} ms/case (steady {run.steady_driver_ms:.1f}); peak cluster memory {run.peak / 2**20:.0f} MiB "
              f"(idle {run.idle / 2**20:.0f} MiB)", flush=True)
        if shape == args.shapes[0]:
            full_peak = run.peak
    shape = args.shapes[0]
    run = pipeline(str(small), tempfile.mkdtemp(prefix="out-small-", dir=work), coarse, fine, engine, shape, actors[shape])
    print(f"pipeline {shape} on the first {args.small} cases: {run.seconds:.1f} s, peak cluster memory "
          f"{run.peak / 2**20:.0f} MiB (idle {run.idle / 2**20:.0f} MiB)", flush=True)
    print(f"memory ratio {args.cases}-case / {args.small}-case archive: {full_peak / run.peak:.2f}")


if __name__ == "__main__":
    main()
