"""Does the input path starve the model? Samples/s of the training loop against the bare
forward+backward+step of the same model on pre-made batches, in the same run.

Feeds compared (each inside Ray Train workers, DDP, global batch 16 split over the workers):
- local:   worker-local samplers over volumes preloaded in the worker (what training.py does, with sampling.py);
- raydata: patches cut by a Ray Data actor pool holding the volumes, streamed to the workers
           with `get_dataset_shard(...).iter_torch_batches`.
Phases alternate in short blocks (bare, loop, bare, loop, ...) so drift hits both alike; medians
over blocks, in wall and in CPU time. Goal: loop/bare >= 0.8.

    python bench/train.py                       # demo model (P=32, width 8), 1 and 2 workers
    python bench/train.py --torch-only --device cuda --preset paper   # one GPU, no Ray

CPU budget: 2 cores in all; 1 worker uses 2 threads, 2 workers 1 thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from resdsn_ray.config import STAGES, TrainConfig, from_dict, to_dict
from resdsn_ray.recipes import PRESETS, make_optimizer, poly_lr, preset_config, split_batch, train_step
from resdsn_ray.sampling import PatchSampler, load_training_cases
from resdsn_ray.synthetic import write_archive


def _timed(fn, iterations: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds for `iterations` calls of fn, synchronised at the end."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = None
    for _ in range(iterations):
        loss = fn()
    if loss is not None:
        float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(model, config, next_batch, device: torch.device, local: int, scale: float, iterations: int, blocks: int) -> dict:
    """Per-rank seconds per iteration, bare step on a fixed batch vs step on `next_batch()`.

    Blocks alternate; the figures are medians over blocks, in wall time and in this process's
    CPU time (the latter holds up when other programs share the cores).
    """
    optimizer = make_optimizer(model, config)
    images, labels = next_batch()
    fixed = (torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device).long())
    lr = poly_lr(config.lr, 0, config.iterations, config.lr_power)

    def bare():
        return train_step(model, optimizer, fixed[0], fixed[1], lr, config.model.aux_weights, scale)

    def loop():
        x, y = next_batch()
        return train_step(model, optimizer, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device).long(), lr, config.model.aux_weights, scale)

    _timed(bare, 2, device)  # warm-up
    _timed(loop, 1, device)
    runs = {"bare": [], "loop": []}
    for _ in range(blocks):
        for name, fn in (("bare", bare), ("loop", loop)):
            runs[name].append(_timed(fn, iterations, device))
    out = {}
    for name, values in runs.items():
        out[f"{name}_wall_s"] = float(np.median([w for w, _ in values])) / iterations
        out[f"{name}_cpu_s"] = float(np.median([c for _, c in values])) / iterations
    return out


def worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from resdsn_ray.model import build_model

    config = from_dict(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    local = split_batch(config.batch_size, world, rank)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(config.model.name, config.model.width))
    if loop_config["feed"] == "local":
        cases, _ = load_training_cases(loop_config["cases"][rank::world], config)
        sampler = PatchSampler(cases, config.stage, config.model.patch, np.random.default_rng(rank))
        next_batch = lambda: sampler.batch(local)
    else:
        batches = ray.train.get_dataset_shard("train").iter_batches(batch_size=local, batch_format="numpy")
        iterator = iter(batches)

        def next_batch():
            batch = next(iterator)
            return batch["image"], batch["label"]

    result = measure(model, config, next_batch, device, local, local * world / config.batch_size, loop_config["iterations"], loop_config["blocks"])
    times = [None] * world
    import torch.distributed as dist

    dist.all_gather_object(times, result) if dist.is_initialized() else times.__setitem__(0, result)
    if rank == 0:
        with open(loop_config["out"], "w") as handle:
            json.dump(times, handle)


class PatchProducer:
    """Ray Data actor: holds the volumes, turns each batch of row ids into augmented patches."""

    def __init__(self, cases: list, config: dict) -> None:
        self.config = from_dict(TrainConfig, config)
        loaded, _ = load_training_cases(cases, self.config)
        self.sampler = PatchSampler(loaded, self.config.stage, self.config.model.patch, np.random.default_rng(99))

    def __call__(self, batch: dict) -> dict:
        images, labels = self.sampler.batch(len(batch["id"]))
        return {"image": images, "label": labels}


def run_ray(args, config, cases: list, workers: int, feed: str) -> dict:
    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = max(1, 2 // workers)
    datasets = None
    if feed == "raydata":
        total = (3 + args.iterations * args.blocks * 2 + 8) * config.batch_size
        datasets = {
            # from_items: the row ids live in the object store, so no read task needs a whole CPU
            # (a 1-CPU ReadRange task next to the workers and the actor deadlocks on 2 CPUs).
            "train": ray.data.from_items([{"id": i} for i in range(total)], override_num_blocks=8).map_batches(
                PatchProducer,
                fn_constructor_kwargs={"cases": cases, "config": to_dict(config)},
                batch_size=config.batch_size,
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=0.25,
            )
        }
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        TorchTrainer(
            worker,
            train_loop_config={"config": to_dict(config), "cases": cases, "threads": threads, "feed": feed, "iterations": args.iterations, "blocks": args.blocks, "out": out},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"bench-{feed}-{workers}", storage_path=folder),
            datasets=datasets,
        ).fit()
        with open(out) as handle:
            times = json.load(handle)
    # DDP steps in lock-step: the slowest rank sets the pace.
    row = {"feed": feed, "workers": workers}
    for kind in ("wall", "cpu"):
        bare = max(t[f"bare_{kind}_s"] for t in times)
        loop = max(t[f"loop_{kind}_s"] for t in times)
        row.update({f"bare_{kind}": config.batch_size / bare, f"loop_{kind}": config.batch_size / loop, f"ratio_{kind}": bare / loop})
    return row


def run_torch_only(args, config, cases: list) -> dict:
    from resdsn_ray.model import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(config.model.name, config.model.width).to(device)
    loaded, _ = load_training_cases(cases, config)
    sampler = PatchSampler(loaded, config.stage, config.model.patch, np.random.default_rng(0))
    times = measure(model, config, lambda: sampler.batch(config.batch_size), device, config.batch_size, 1.0, args.iterations, args.blocks)
    row = {"feed": "local (torch only)", "device": str(device), "workers": 1}
    for kind in ("wall", "cpu"):
        bare, loop = times[f"bare_{kind}_s"], times[f"loop_{kind}_s"]
        row.update({f"bare_{kind}": config.batch_size / bare, f"loop_{kind}": config.batch_size / loop, f"ratio_{kind}": bare / loop})
    row.update(bare_its_s=1 / times["bare_wall_s"], loop_its_s=1 / times["loop_wall_s"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="demo")
    parser.add_argument("--stage", choices=STAGES, default="coarse")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size, help="global mini-batch (default: the paper's)")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per timed block")
    parser.add_argument("--blocks", type=int, default=6, help="bare/loop block pairs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--feeds", nargs="+", choices=["local", "raydata"], default=["local", "raydata"])
    parser.add_argument("--cases", type=int, default=4, help="synthetic training cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--torch-only", action="store_true", help="no Ray: one process on --device")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = preset_config(args.preset, args.stage, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        cases = write_archive(os.path.join(folder, "data"), cases=args.cases, seed=0, shape=tuple(args.shape))
        print(f"model {config.model.name} width {config.model.width}, P={config.model.patch}, global batch {config.batch_size}, {config.optimizer}, "
              f"{args.cases} synthetic cases {tuple(args.shape)}, {args.iterations}x{args.blocks} timed iterations per phase", flush=True)
        if args.torch_only:
            rows = [run_torch_only(args, config, cases)]
        else:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
            rows = [run_ray(args, config, cases, w, feed) for feed in args.feeds for w in args.workers]
            ray.shutdown()
    print("samples/s (global batch), median over blocks; wall clock and per-process CPU time")
    print(f"{'feed':<20} {'workers':>7} {'bare wall':>10} {'loop wall':>10} {'ratio':>7} {'bare cpu':>10} {'loop cpu':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['feed']:<20} {r['workers']:>7} {r['bare_wall']:>10.2f} {r['loop_wall']:>10.2f} {r['ratio_wall']:>7.3f} "
              f"{r['bare_cpu']:>10.2f} {r['loop_cpu']:>10.2f} {r['ratio_cpu']:>7.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
