"""What carrying a real-size case costs between the archive job's processes, raw image as float32
against `stages.compact_hu` (int16 where lossless).

    python bench/transit.py [--cases 8 --shape 512 512 300]

A Ray Data stream shaped like the job's (a read task -> a model actor -> a finish task, one case
per block, the job's row columns) carries synthetic integer HU and a float32 preprocessed input;
the actor drops the input and passes the image on, as `WholeCase` does, without running a model
(the model's time does not depend on how the image travels). Both variants run in one process on
one local Ray, alternating, and the script prints per-case seconds, the read task's seconds per
call (building its output block is most of it) and bytes per case in the object store at each hop.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from resdsn_ray.stages import EMPTY, compact_hu


def read(row: dict, shape: tuple[int, int, int], compact: bool) -> dict:
    tile = np.random.default_rng(int(row["i"])).integers(-1024, 1500, size=(64, 64, shape[2]), dtype=np.int16)
    hu = np.asfortranarray(np.resize(tile, shape), dtype=np.float32)  # as decoded: float32 HU
    coarse_input = (np.clip(hu, -100, 240) - 70) / 100  # stands in for `preprocess`: a float32 copy
    return {"i": row["i"], "image": compact_hu(hu) if compact else hu, "coarse_input": coarse_input}


class PassOn:
    """The model actor's traffic without its model: takes the input, returns the image and a mask box."""

    def __call__(self, row: dict) -> dict:
        row.update(coarse_input=EMPTY, mask_box=np.zeros((120, 120, 80), np.uint8))
        return row


def finish(row: dict) -> dict:
    return {"i": row["i"], "hu_mean": float(row["image"][::8, ::8, ::8].mean(dtype=np.float64))}


def stream(cases: int, shape: tuple[int, int, int], compact: bool) -> dict[str, float]:
    start = time.perf_counter()
    ds = ray.data.from_items([{"i": i} for i in range(cases)], override_num_blocks=cases)
    # max_retries set apart from the actor's, as the job does: the read is its own task, not fused.
    ds = ds.map(read, fn_kwargs={"shape": shape, "compact": compact}, num_cpus=0.5,
                compute=TaskPoolStrategy(size=1), max_retries=2)
    ds = ds.map(PassOn, num_cpus=1, compute=ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1))
    ds = ds.map(finish, num_cpus=0.5, compute=TaskPoolStrategy(size=1), max_retries=2)
    rows = ds.take_all()
    seconds = time.perf_counter() - start
    assert len(rows) == cases
    stats = ds.stats()
    wall = dict(re.findall(r"Operator \d+ Map\((\w+)\).*?Remote wall time: .*?, ([\d.]+(?:ms|s|us)) mean", stats, re.S))
    size = dict(re.findall(r"Operator \d+ Map\((\w+)\).*?Output size bytes per block: .*?, ([\d.]+) mean", stats, re.S))
    return {"per_case_s": seconds / cases, "read_s": _seconds(wall["read"]),
            "read_mb": float(size["read"]) / 1e6, "actor_mb": float(size["PassOn"]) / 1e6}


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(ms|s|us)", text).groups()
    return float(value) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(args.shape)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    DataContext.get_current().enable_progress_bars = False
    try:
        stream(2, shape, True)  # workers and actor started, imports done
        runs = {"float32": [], "compact": []}
        for _ in range(args.repeats):
            for name in runs:
                runs[name].append(stream(args.cases, shape, name == "compact"))
    finally:
        ray.shutdown()
    print(f"{args.cases} cases {shape}, {os.cpu_count()} CPUs, {args.repeats} runs each, alternating (medians):")
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
    for name, m in med.items():
        print(f"  image as {name}: {m['per_case_s']:.2f} s per case; read task {m['read_s']:.2f} s per call; "
              f"object store per case: read -> actor {m['read_mb']:.0f} MB, actor -> finish {m['actor_mb']:.0f} MB")
    f, c = med["float32"], med["compact"]
    print(f"compact / float32: per case {c['per_case_s'] / f['per_case_s']:.2f}, read task {c['read_s'] / f['read_s']:.2f}, "
          f"bytes read -> actor {c['read_mb'] / f['read_mb']:.2f}, actor -> finish {c['actor_mb'] / f['actor_mb']:.2f}")


if __name__ == "__main__":
    main()
