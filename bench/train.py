"""Does the input path starve the model? Samples/s of the training loop against the bare
forward+backward+step of the same model on pre-made batches, in the same run.

Feeds compared (each inside Ray Train workers, DDP, global batch 16 split over the workers):
- local:   worker-local samplers over volumes preloaded in the worker (what training.py does);
- raydata: patches cut by a Ray Data actor pool holding the volumes, streamed to the workers
           with `get_dataset_shard(...).iter_torch_batches`.
Phases alternate (bare, loop, bare, loop) so drift hits both alike. Goal: loop/bare >= 0.8.

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

from resdsn_ray.synthetic import write_archive
from resdsn_ray.training import (
    PatchSampler,
    load_training_cases,
    make_optimizer,
    poly_lr,
    preset_config,
    split_batch,
    train_step,
)


def _timed(fn, iterations: int, device: torch.device) -> float:
    """Seconds for `iterations` calls of fn (the last one's loss is synchronised)."""
    start = time.perf_counter()
    loss = None
    for _ in range(iterations):
        loss = fn()
    if loss is not None:
        float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(model, config, next_batch, device: torch.device, local: int, scale: float, iterations: int, blocks: int) -> dict:
    """Per-rank seconds per iteration: bare step on a fixed batch vs step on `next_batch()`."""
    optimizer = make_optimizer(model, config)
    images, labels = next_batch()
    fixed = (torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device))
    lr = poly_lr(config.lr, 0, config.iterations, config.lr_power)

    def bare():
        return train_step(model, optimizer, fixed[0], fixed[1], lr, config.model.aux_weights, scale)

    def loop():
        x, y = next_batch()
        return train_step(model, optimizer, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), lr, config.model.aux_weights, scale)

    _timed(bare, 2, device)  # warm-up
    _timed(loop, 1, device)
    bare_s = loop_s = 0.0
    for _ in range(blocks):
        bare_s += _timed(bare, iterations, device)
        loop_s += _timed(loop, iterations, device)
    n = iterations * blocks
    return {"bare_s_per_it": bare_s / n, "loop_s_per_it": loop_s / n}


def worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from resdsn_ray.model import build_model
    from resdsn_ray.config import from_dict
    from resdsn_ray.training import TrainConfig

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
        next_batch = lambda: sampler.batch(local)  # noqa: E731
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
        from resdsn_ray.config import from_dict
        from resdsn_ray.training import TrainConfig

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
            "train": ray.data.range(total).map_batches(
                PatchProducer,
                fn_constructor_kwargs={"cases": cases, "config": _to_dict(config)},
                batch_size=config.batch_size,
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=0.25,
            )
        }
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        TorchTrainer(
            worker,
            train_loop_config={"config": _to_dict(config), "cases": cases, "threads": threads, "feed": feed, "iterations": args.iterations, "blocks": args.blocks, "out": out},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"bench-{feed}-{workers}", storage_path=folder),
            datasets=datasets,
        ).fit()
        with open(out) as handle:
            times = json.load(handle)
    # DDP steps in lock-step: the slowest rank sets the pace.
    bare = max(t["bare_s_per_it"] for t in times)
    loop = max(t["loop_s_per_it"] for t in times)
    return {"feed": feed, "workers": workers, "bare_samples_s": config.batch_size / bare, "loop_samples_s": config.batch_size / loop, "ratio": bare / loop}


def _to_dict(config) -> dict:
    from resdsn_ray.config import to_dict

    return to_dict(config)


def run_torch_only(args, config, cases: list) -> dict:
    from resdsn_ray.model import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(config.model.name, config.model.width).to(device)
    loaded, _ = load_training_cases(cases, config)
    sampler = PatchSampler(loaded, config.stage, config.model.patch, np.random.default_rng(0))
    times = measure(model, config, lambda: sampler.batch(config.batch_size), device, config.batch_size, 1.0, args.iterations, args.blocks)
    return {"feed": "local (torch only)", "device": str(device), "workers": 1,
            "bare_its_s": 1 / times["bare_s_per_it"], "loop_its_s": 1 / times["loop_s_per_it"],
            "bare_samples_s": config.batch_size / times["bare_s_per_it"], "loop_samples_s": config.batch_size / times["loop_s_per_it"],
            "ratio": times["bare_s_per_it"] / times["loop_s_per_it"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["demo", "paper"], default="demo")
    parser.add_argument("--stage", choices=["coarse", "fine"], default="coarse")
    parser.add_argument("--iterations", type=int, default=4, help="iterations per timed block")
    parser.add_argument("--blocks", type=int, default=2, help="bare/loop block pairs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--feeds", nargs="+", choices=["local", "raydata"], default=["local", "raydata"])
    parser.add_argument("--cases", type=int, default=4, help="synthetic training cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--torch-only", action="store_true", help="no Ray: one process on --device")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = preset_config(args.preset, args.stage)
    with tempfile.TemporaryDirectory() as folder:
        cases = write_archive(os.path.join(folder, "data"), cases=args.cases, seed=0, shape=tuple(args.shape))
        print(f"model {config.model.name} width {config.model.width}, P={config.model.patch}, global batch {config.batch_size}, "
              f"{args.cases} synthetic cases {tuple(args.shape)}, {args.iterations}x{args.blocks} timed iterations per phase", flush=True)
        if args.torch_only:
            rows = [run_torch_only(args, config, cases)]
        else:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            rows = [run_ray(args, config, cases, w, feed) for feed in args.feeds for w in args.workers]
            ray.shutdown()
    print(f"{'feed':<20} {'workers':>7} {'bare samples/s':>15} {'loop samples/s':>15} {'loop/bare':>10}")
    for row in rows:
        print(f"{row['feed']:<20} {row['workers']:>7} {row['bare_samples_s']:>15.2f} {row['loop_samples_s']:>15.2f} {row['ratio']:>10.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
