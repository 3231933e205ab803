"""Archive pipeline benchmark: throughput against a plain engine loop, memory against archive size.

    python bench/pipeline.py [--cases 40 --small 10 --shapes whole split ...]

On one synthetic archive and the same cores, in one run:
1. a plain loop in this process: read, `CoarseToFine.segment`, write the mask, metrics, case by
   case, with 1 torch thread and with all cores (the faster is the baseline);
2. the Ray Data pipeline (`run_archive`) on a fresh local Ray, per pipeline shape; its time
   includes starting the actor pools (not `ray.init`);
3. peak memory of the whole local Ray cluster (this driver and every process it started:
   GCS, raylet with the object store, workers), as summed PSS sampled every 0.2 s, for the
   full archive and for a manifest of its first `--small` cases (the same cases).
Goals: pipeline/loop throughput >= 0.8; peak memory(full)/peak memory(small) <= 1.2.
Without trained demo bundles it uses random ResDSN bundles (width 8, patch 32): the timing
and memory figures hold, the masks mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
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


class PeakMemory:
    """Peak summed PSS of this process and all its descendants (the local Ray cluster)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(pss_bytes(p) for p in descendants(os.getpid())))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
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


def pipeline(archive: str, out: str, coarse: str, fine: str, engine: EngineConfig, shape: str,
             actors: int) -> tuple[float, float, int, int]:
    """(seconds, steady cases/min, peak cluster bytes, idle cluster bytes) of a run on a fresh local Ray.

    Steady throughput counts the cases after the first finished one over the time since then,
    i.e. without the start of the actor pools."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        time.sleep(2)
        idle = sum(pss_bytes(p) for p in descendants(os.getpid()))
        resources = Resources(shape=shape, coarse_actors=actors, fine_actors=actors, threads_per_actor=1)
        job = ArchiveJob(input=archive, output=out, coarse=coarse, fine=fine, engine=engine, resources=resources)
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = run_archive(job, say=lambda line: None)
            seconds = time.perf_counter() - start
        bad = [r for r in result.rows if r["status"] not in ("ok", "no_organ")]
        assert not bad, bad
        ends = sorted(r["finished_at"].timestamp() for r in result.rows)
        steady = 60 * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
        return seconds, steady, memory.peak, idle
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--shapes", nargs="+", default=["whole", "split"], choices=["whole", "split"])
    parser.add_argument("--actors", type=int, default=None,
                        help="actors per pool, each with 1 torch thread (default: one per core over all pools)")
    parser.add_argument("--n-coarse", type=int, default=2)
    parser.add_argument("--n-fine", type=int, default=2)
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-pipeline-"))
    archive = str(work / "archive")
    if not (work / "archive" / "dataset.json").exists():
        write_archive(archive, cases=args.cases, seed=0, shape=tuple(args.shape))
    small = work / "small.csv"
    small.write_text("case_id,image_uri,label_uri\n" + "".join(
        f"{c.case_id},{c.image_uri},{c.label_uri}\n" for c in list_cases(archive)[: args.small]))
    if (Path(demo_bundle_uri("coarse")) / CONFIG_FILE).exists():
        coarse, fine, models = demo_bundle_uri("coarse"), demo_bundle_uri("fine"), "demo bundles"
    else:
        torch.manual_seed(0)
        coarse, fine, models = str(work / "coarse"), str(work / "fine"), "random ResDSN width 8, patch 32"
        for stage, uri in (("coarse", coarse), ("fine", fine)):
            save_bundle(uri, build_model("resdsn", width=8), ModelConfig(width=8, patch=32), stage)
    engine = EngineConfig(coarse=WindowConfig(n=args.n_coarse), fine=WindowConfig(n=args.n_fine), device="cpu")

    print(f"{args.cases} cases {tuple(args.shape)}, {models}, n={args.n_coarse}/{args.n_fine}, "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}", flush=True)
    loops = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        seconds, stopped = plain_loop(archive, str(work / f"loop-{threads}"), coarse, fine, engine, threads,
                                      give_up=2 * min(loops.values(), default=float("inf")))
        loops[threads] = seconds
        print(f"plain loop, {threads} torch thread(s): {seconds:.1f} s{' (extrapolated from 3 cases; stopped)' if stopped else ''}, "
              f"{60 * args.cases / seconds:.2f} cases/min", flush=True)
    best = min(loops.values())
    actors = {s: args.actors or max(1, (os.cpu_count() or 1) // (2 if s == "split" else 1)) for s in args.shapes}
    for shape in args.shapes:
        seconds, steady, peak, idle = pipeline(archive, str(work / f"out-{shape}"), coarse, fine, engine, shape, actors[shape])
        print(f"pipeline {shape} ({actors[shape]} actor(s)/pool): {seconds:.1f} s, {60 * args.cases / seconds:.2f} cases/min "
              f"(steady {steady:.2f}), throughput ratio vs best loop {best / seconds:.2f}; "
              f"peak cluster memory {peak / 2**20:.0f} MiB (idle {idle / 2**20:.0f} MiB)", flush=True)
        if shape == args.shapes[0]:
            full_peak = peak
    shape = args.shapes[0]
    seconds, _, small_peak, idle = pipeline(str(small), str(work / "out-small"), coarse, fine, engine, shape, actors[shape])
    print(f"pipeline {shape} on the first {args.small} cases: {seconds:.1f} s, peak cluster memory "
          f"{small_peak / 2**20:.0f} MiB (idle {idle / 2**20:.0f} MiB)", flush=True)
    print(f"memory ratio {args.cases}-case / {args.small}-case archive: {full_peak / small_peak:.2f}")
    print(f"load average now {os.getloadavg()[0]:.1f}; masks and rows under {work}")


if __name__ == "__main__":
    main()
