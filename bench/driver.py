"""Driver scale: the archive driver's CPU and memory per case for a large manifest, without
running its cases.

    python bench/driver.py [--rows 100000 --history-runs 2]

One run, each step of `run_archive`'s driver before the first case is processed, on a manifest
of `--rows` distinct case ids over a few real tiny NIfTI files:
1. listing (`archive.scan`);
2. `runs.History.load` on an output holding `--history-runs` earlier runs of every case (rows
   written with `runs.write_rows`, as the driver writes them; the masks are absent, so every
   case is to segment again and no mask header is read);
3. planning (`pipeline.plan_run`: the rows to write, complete and segment);
4. the dataset plan (`pipeline.blocks` of the rows to segment on a local Ray, 2 CPUs), for
   each `--cases-per-block`.
For each: CPU ms per case (this process, all threads) and memory per case: the Python heap
(tracemalloc) plus Arrow's pool, kept after the step and at its peak, in a second pass.
Goals: <= 10 ms driver CPU per case, <= 1 KB driver memory per listed case.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from resdsn_ray import runs
from resdsn_ray.archive import list_cases, scan
from resdsn_ray.config import ArchiveJob
from resdsn_ray.pipeline import blocks, plan_run
from resdsn_ray.provenance import utc_now
from resdsn_ray.synthetic import write_archive


def cpu_s() -> float:
    return time.process_time()


def measured(name: str, rows: int, step: Callable[[], Any]) -> Any:
    """Run `step` twice: once for its CPU time, once under tracemalloc for its memory; print both."""
    gc.collect()
    start = cpu_s()
    result = step()
    cpu = cpu_s() - start
    del result
    gc.collect()
    arrow0 = pa.total_allocated_bytes()
    tracemalloc.start()
    result = step()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrow = pa.total_allocated_bytes() - arrow0
    print(f"{name:<34} {1000 * cpu / rows:7.3f} ms/case CPU   memory kept {(kept + arrow) / rows:7.0f} B/case "
          f"(Python {kept / rows:.0f}, Arrow {arrow / rows:.0f}), Python peak {peak / rows:.0f} B/case", flush=True)
    return result


def history_rows(ids: list[str], run: str, config: str) -> list[dict[str, Any]]:
    now = utc_now()
    return [{"run_id": run, "case_id": case, "status": "ok", "attempt": 1, "mode": "c2f", "config_id": config,
             "image_uri": f"/data/{case}.nii.gz", "mask_uri": f"/out/masks/{case}.nii.gz", "shape": [32, 32, 32],
             "spacing_mm": [1.0, 1.0, 1.0], "coarse_bbox": [0, 32, 0, 32, 0, 32], "dsc": 0.8, "t_total_s": 1.0,
             "started_at": now, "finished_at": now, "node": "node-1", "device": "cpu"} for case in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--history-runs", type=int, default=2)
    parser.add_argument("--cases-per-block", type=int, nargs="+", default=[8, 50],
                        help="one case per block costs ~2.4 ms and 0.6 KB a block: try 1 with --rows 5000")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-driver-"))
    files = list_cases(str(work / "files")) if (work / "files").exists() else []
    if not files:
        write_archive(str(work / "files"), cases=3, seed=0, shape=(32, 32, 16))
        files = list_cases(str(work / "files"))
    manifest = work / f"manifest-{args.rows}.csv"
    ids = [f"study-{i:07d}" for i in range(args.rows)]
    manifest.write_text("case_id,image_uri,label_uri\n" + "".join(
        f"{case},{files[i % 3].image_uri},{files[i % 3].label_uri}\n" for i, case in enumerate(ids)))
    output = str(work / f"out-{args.rows}")
    if not Path(runs.metrics_uri(output)).exists():
        for r in range(args.history_runs):
            for seq, start in enumerate(range(0, len(ids), 10_000)):
                runs.write_rows(output, f"run{r}", seq, history_rows(ids[start:start + 10_000], f"run{r}", "C"))
    print(f"{args.rows} manifest rows, {args.history_runs} earlier runs of each, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    n = args.rows
    listing = measured("listing (archive.scan)", n, lambda: scan(str(manifest)))
    history = measured("History.load", n, lambda: runs.History.load(output))
    job = ArchiveJob(input=str(manifest), output=output, coarse=None, fine=None)
    base = {"run_id": "bench", "coarse_model": "c", "fine_model": "f", "config_id": "C", "mode": "c2f", "fold": None,
            "demo_models": False}
    plan = measured("planning (plan_run)", n, lambda: plan_run(listing.cases, job, base, history))
    print(f"  {plan.todo.num_rows} to segment, {plan.todo.nbytes / n:.0f} B/case of Arrow rows for the stream")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        for k in args.cases_per_block:
            dataset = measured(f"dataset plan, {k} case(s)/block", n, lambda: blocks(plan.todo, k))
            print(f"  {dataset.num_blocks()} blocks", flush=True)
            del dataset
    finally:
        ray.shutdown()
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
