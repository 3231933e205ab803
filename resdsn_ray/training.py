"""Training the coarse and fine ResDSN with Ray Train (paper Sec. 4.1-4.2): the worker loop and
the driver. What a worker does with its data is in `sampling`, the optimisation in `recipes`;
this module only distributes them, so both stay testable without Ray.

- Ray Train `TorchTrainer` runs one DDP replica per worker (gloo on CPU, NCCL on GPU); each
  worker loads its share of the cases once and samples patches from memory.
- Checkpoints go to `OUTPUT/train/` every K iterations (Ray keeps the last few); a worker that
  dies is restarted from the newest (`max_failures`), and a run started again with the same
  OUTPUT and recipe resumes from it at the same iteration, optimiser state and LR.
- Validation segments held-out cases with the engine itself (`engine.CoarseToFine`), so the
  DSC it reports is the one inference would get. The log lines show the share of organ voxels
  in the sampled patches ("fg 3.1%"): a stage that sees almost no organ learns background.

Output layout under OUTPUT (local folder or s3://):
  run.json           settings, recipe, cases used and skipped, provenance, status, final figures
  refused.json       only when too few cases were readable: why, and which were skipped
  train/checkpoint_<iteration>/state.pt   model + optimiser + iteration (last `keep` kept)
  bundle/            the final model bundle (config.json, weights.safetensors)
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from resdsn_ray import runs, storage
from resdsn_ray.archive import Case, list_cases
from resdsn_ray.boxes import bounding_box
from resdsn_ray.bundle import Bundle, save_bundle
from resdsn_ray.config import EngineConfig, TrainConfig, WindowConfig, from_dict, recipe, to_dict
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.errors import InputError
from resdsn_ray.metrics import confusion_counts
from resdsn_ray.model import build_model
from resdsn_ray.postprocess import finish_mask
from resdsn_ray.preprocess import preprocess
from resdsn_ray.progress import duration
from resdsn_ray.provenance import provenance, utc_iso
from resdsn_ray.recipes import make_optimizer, parameter_checksum, poly_lr, split_batch, train_step
from resdsn_ray.sampling import PatchSampler, ValidationCase, load_training_cases, load_validation_cases

RUN_NAME = "train"  # Ray Train's run folder under OUTPUT
RUN_RECORD = "run.json"
REFUSAL = "refused.json"  # written instead of training when too few cases are usable
BUNDLE_DIR = "bundle"
STATE_FILE = "state.pt"


def say(message: str) -> None:
    """One progress line on stdout, flushed (bypasses Ray Train's print patch, which doubles lines)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ validation


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    tp, fp, fn = confusion_counts(pred, ref)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def validate(module: torch.nn.Module, config: TrainConfig, cases: list[ValidationCase],
             device: torch.device) -> tuple[list[float], int]:
    """DSC of each held-out case, segmented by the engine with this stage alone, and the
    foreground voxels predicted over all of them (0: the model has collapsed to background).

    Coarse: the engine in `coarse` mode over the whole volume. Fine: the ground-truth box plus
    `val_margin` stands in for the coarse box (the engine's c2f crop with an oracle coarse
    stage), then the engine's fine stage and post-processing on that crop (outside the box both
    masks are empty, so the crop's DSC is the volume's).

    The engine sets its model's mode and memory layout in place, so it gets a copy: the model
    being trained (and DDP's gradient buckets, laid out for its parameters) stays as it was.
    """
    bundle = Bundle(model=copy.deepcopy(module), model_config=config.model, stage=config.stage, preprocess=config.preprocess)
    window = WindowConfig(n=config.val_n)
    if config.stage == "coarse":
        engine = CoarseToFine(bundle, None, EngineConfig(mode="coarse", coarse=window, device=str(device)))
    else:
        engine = CoarseToFine(None, bundle, EngineConfig(mode="fine", fine=window, device=str(device)))
    scores: list[float] = []
    predicted = 0
    for case in cases:
        if config.stage == "coarse":
            mask, label = engine.segment(case.image).mask, case.label
        else:
            box = bounding_box(case.label, config.val_margin)
            assert box is not None  # validation labels are never empty (load_validation_cases)
            crop = preprocess(case.image.array, config.preprocess, case.case_id)[box.slices]
            mask = finish_mask(engine.run_stage("fine", crop)[0], engine.config.post_ratio)[0]
            label = case.label[box.slices]
        scores.append(dice(mask, label))
        predicted += int(np.count_nonzero(mask))
    return scores, predicted


def unfit_reason(val_dsc: float | None, predicted: int | None, cases: int) -> str | None:
    """Why the last validation shows a collapsed model (None: it does not, or there was none)."""
    if val_dsc is None or predicted is None:
        return None
    if predicted == 0:
        return f"predicts no foreground on the {cases} validation case(s) (validation DSC {val_dsc:.4f})"
    if val_dsc <= 0.0:
        return f"validation DSC 0.0 over {cases} case(s): its foreground misses the organ"
    return None


# ------------------------------------------------------------------- the per-worker loop


def _all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _load_state(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: load this rank's cases once, then step, log, validate, checkpoint."""
    import ray.train
    import ray.train.torch

    config = from_dict(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(int(loop_config.get("threads", 1)))
    device = ray.train.torch.get_device()
    log = rank == 0
    chatty = log and not loop_config["quiet"]  # progress lines; warnings (skipped cases) print anyway

    # Cases: each rank loads its share once; all ranks then agree on what is usable.
    train_cases: list[dict[str, Any]] = loop_config["train_cases"]
    cases, skipped = load_training_cases(train_cases[rank::world], config)
    val, val_skipped = load_validation_cases(loop_config["val_cases"][rank::world])
    shares = _all_gather(([c.case_id for c in cases], skipped + val_skipped))
    usable = sorted(i for ids, _ in shares for i in ids)
    skipped_all = sorted((s for _, lost in shares for s in lost), key=lambda s: s["case_id"])
    if log:
        for item in skipped_all:
            say(f"[train] skipping case {item['case_id']}: {item['reason']}")
    if len(usable) < config.min_cases:
        # A refusal, not a failure: raising would make Ray retry (FailureConfig) to no avail.
        if rank == 0:
            refusal = {"error": f"only {len(usable)} usable training case(s), need {config.min_cases}", "skipped": skipped_all}
            storage.write_json(storage.join(loop_config["output"], REFUSAL), refusal)
        return
    if not cases:  # this rank's share was all unusable: borrow one usable case
        borrowed = [c for c in train_cases if c["case_id"] == usable[rank % len(usable)]]
        cases, _ = load_training_cases(borrowed, config)

    state = _load_state(ray.train.get_checkpoint())
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, config.model.width, config.model.in_channels, config.model.classes)
    if state is not None:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    module = getattr(model, "module", model)
    optimizer = make_optimizer(model, config)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    start = int(state["iteration"]) if state is not None else 0
    history: list[dict[str, float]] = list(state["history"]) if state is not None else []
    val_dsc: float | None = state.get("val_dsc") if state is not None else None
    val_foreground: int | None = state.get("val_foreground") if state is not None else None
    rng = np.random.default_rng([config.seed, rank, start])
    sampler = PatchSampler(cases, config.stage, config.model.patch, rng, config.foreground_share)
    local = split_batch(config.batch_size, world, rank)
    scale = local * world / config.batch_size
    if chatty:
        note = f"resuming at iteration {start}" if start else "starting"
        say(f"[train] {config.stage}: {note}; {len(usable)} cases on {world} worker(s), {local} patches/worker/iteration")

    has_val = bool(loop_config["val_cases"])  # the same on every rank: validation is collective
    window_loss = torch.zeros((), device=device)
    window_count, window_start = 0, time.perf_counter()
    loss_value = float(history[-1]["loss"]) if history else float("nan")
    for iteration in range(start, config.iterations):
        lr = poly_lr(config.lr, iteration, config.iterations, config.lr_power)
        images, labels = sampler.batch(local)
        loss = train_step(model, optimizer, torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device).long(), lr,
                          config.model.aux_weights, scale, config.loss)
        window_loss += loss
        window_count += 1
        done = iteration + 1
        last = done == config.iterations
        if done % config.log_every == 0 or last:
            total, count, organ, voxels = _all_sum([float(window_loss), window_count, *sampler.take_foreground_share()], device)
            loss_value = total / count
            rate = window_count / max(time.perf_counter() - window_start, 1e-9)
            history.append({"iteration": done, "loss": loss_value, "lr": lr, "fg": organ / voxels})
            if chatty:
                say(f"[train] {config.stage} it {done}/{config.iterations} loss {loss_value:.4f} fg {100 * organ / voxels:.1f}% "
                    f"lr {lr:.6f} {rate:.2f} it/s {rate * config.batch_size:.1f} samples/s "
                    f"ETA {duration((config.iterations - done) / rate)}")
            window_loss.zero_()
            window_count, window_start = 0, time.perf_counter()
        paused = time.perf_counter()
        if has_val and (done % config.validate_every == 0 or last):
            scores, predicted = validate(module, config, val, device)
            total, count, predicted_all = _all_sum([sum(scores), len(scores), predicted], device)
            val_dsc = total / count if count else None
            val_foreground = int(predicted_all) if count else None
            if chatty and val_dsc is not None:
                say(f"[train] {config.stage} it {done}: validation mean DSC {val_dsc:.4f} over {int(count)} case(s), "
                    f"{val_foreground} foreground voxels predicted")
        if done % config.checkpoint_every == 0 or last:
            metrics = {
                "iteration": done,
                "loss": loss_value,
                "lr": lr,
                "val_dsc": val_dsc,
                "val_foreground": val_foreground,
                "start_iteration": start,
                "checksums": _all_gather(parameter_checksum(model)),
                "skipped": skipped_all,
                "cases": len(usable),
            }
            _report(metrics, rank, module, optimizer, done, history, skipped_all, config)
        window_start += time.perf_counter() - paused  # its/s counts training steps only


def _report(metrics: dict[str, Any], rank: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
            history: list[dict[str, float]], skipped: list[dict[str, str]], config: TrainConfig) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        state = {
            "iteration": iteration,
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "val_dsc": metrics["val_dsc"],
            "val_foreground": metrics["val_foreground"],
            "skipped": skipped,
            "config": to_dict(config),
        }
        torch.save(state, os.path.join(folder, STATE_FILE))
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{iteration:07d}")


# ---------------------------------------------------------------------------- the driver


@dataclass
class TrainResult:
    """What a finished run left under OUTPUT."""

    output: str
    bundle_uri: str
    bundle_id: str
    iterations: int
    final_loss: float
    val_dsc: float | None
    skipped: list[dict[str, str]]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    unfit: str | None = None  # why the bundle is marked unfit (a collapsed model); None: fit or not checked


def training_cases(data: str | None, cases_uri: str | None) -> tuple[list[Case], list[dict[str, str]]]:
    """Labelled, well-named cases of the archive (or of the `cases_uri` manifest), and the rest.

    A manifest's entries may point inside `data` when both are given (a cross-validation fold's
    train.csv lists cases of its archive), else inside the manifest's own folder. The rest (bad
    ids, no label, outside those) come back as {case_id, reason}: they cannot train anything.
    """
    source = cases_uri or data
    if not source:
        raise InputError("--data", "give an archive (--data) or a manifest (--cases)")
    usable: list[Case] = []
    rejected: list[dict[str, str]] = []
    for case in list_cases(source, allow_prefixes=[data] if cases_uri and data else None):
        if case.error:
            rejected.append({"case_id": case.case_id, "reason": case.error})
        elif not case.label_uri:
            rejected.append({"case_id": case.case_id, "reason": "no label"})
        else:
            usable.append(case)
    return usable, rejected


def split_validation(cases: list[Case], count: int, seed: int) -> tuple[list[Case], list[Case]]:
    """(training, held-out) with `count` cases held out, chosen by `seed`."""
    if count <= 0:
        return cases, []
    if count >= len(cases):
        raise InputError("--val-cases", f"cannot hold out {count} of {len(cases)} cases for validation")
    order = np.random.default_rng(seed).permutation(len(cases))
    held = {int(i) for i in order[:count]}
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def storage_target(output: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train; s3 gets a pyarrow S3FileSystem.

    pyarrow ignores AWS_ENDPOINT_URL (apache/arrow#49643), so the endpoint (and region) are
    passed explicitly. Never keys: the filesystem travels pickled to Ray's controller and
    workers, and pyarrow's default credential chain on each node finds that node's own.
    """
    if output.startswith("s3://"):
        from pyarrow import fs

        options: dict[str, Any] = {}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return output.removeprefix("s3://").rstrip("/"), fs.S3FileSystem(**options)
    if "://" in output and not output.startswith("file://"):
        raise InputError(output, "training output must be a local folder, file:// or s3:// URI")
    return os.path.abspath(output.removeprefix("file://")), None


def _row(case: Case) -> dict[str, Any]:
    return {"case_id": case.case_id, "image_uri": case.image_uri, "label_uri": case.label_uri}


def train(
    config: TrainConfig,
    output: str,
    data: str | None = None,
    cases_uri: str | None = None,
    val_data: str | None = None,
    val_cases: int = 0,
    workers: int = 1,
    gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    quiet: bool = False,
) -> TrainResult:
    """Train one stage on a Ray cluster (a local one is started if none is found); write the bundle.

    `quiet`: no progress lines from the workers (skipped cases and the result still print).
    Raises InputError for unusable input (too few readable cases, a mismatched earlier run under
    OUTPUT) and ray.train.TrainingFailedError when workers fail more than `max_failures` times.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from resdsn_ray import cluster  # Ray itself: imported here so that `resdsn --help` stays quick

    if config.batch_size < workers:
        raise InputError("--workers", f"{workers} workers cannot share a global batch of {config.batch_size}")
    # Ray's workers run in other folders: relative paths would name other places there.
    output = storage.absolute(output)
    data, cases_uri, val_data = (storage.absolute(u) if u else u for u in (data, cases_uri, val_data))
    cases, rejected = training_cases(data, cases_uri)
    for item in rejected:
        say(f"[train] skipping case {item['case_id']}: {item['reason']}")
    if val_data:
        held, val_rejected = training_cases(val_data, None)
        rejected += [{"case_id": r["case_id"], "reason": f"validation: {r['reason']}"} for r in val_rejected]
    else:
        cases, held = split_validation(cases, val_cases, config.seed)
    if len(cases) < config.min_cases:
        raise InputError(cases_uri or str(data), f"only {len(cases)} labelled case(s) to train on, need {config.min_cases}")
    cluster.connect(dashboard=True)  # Ray Train's placement-group cleaner needs the State API
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu and gpus < workers:  # Ray would wait for them forever
        raise InputError("--gpu", f"the Ray cluster has {gpus:g} GPU(s); {workers} worker(s) need one each")
    record_uri = storage.join(output, RUN_RECORD)
    earlier = storage.read_json(record_uri) if storage.exists(record_uri) else None
    if earlier is not None:
        runs.check_resume(output, earlier.get("recipe", {}), recipe(config), "training run")
        say(f"[train] {output} holds this run: resuming from its newest checkpoint")
    record = {
        "config": to_dict(config),
        "recipe": recipe(config),
        "data": data,
        "cases_uri": cases_uri,
        "val_data": val_data,
        "train_cases": [c.case_id for c in cases],
        "val_cases": [c.case_id for c in held],
        "rejected": rejected,
        "workers": workers,
        "gpu": gpu,
        "provenance": provenance(device="cuda" if gpu else "cpu"),
        "status": "running",
        "started_at": (earlier or {}).get("started_at") or utc_iso(),
    }
    storage.write_json(record_uri, record)

    storage_path, filesystem = storage_target(output)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "train_cases": [_row(c) for c in cases],
            "val_cases": [_row(c) for c in held],
            "threads": max(1, int(cpus_per_worker)),
            "output": output,
            "quiet": quiet,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env=cluster.runtime_env(),
            logging_config=LoggingConfig(log_level="WARNING"),  # progress comes from our own lines
        ),
    )
    refusal_uri = storage.join(output, REFUSAL)
    if storage.exists(refusal_uri):
        storage.filesystem(refusal_uri)[0].rm(storage.filesystem(refusal_uri)[1])
    result = trainer.fit()
    if storage.exists(refusal_uri):
        refusal = storage.read_json(refusal_uri)
        skipped = ", ".join(f"{s['case_id']} ({s['reason']})" for s in refusal["skipped"])
        raise InputError(cases_uri or str(data), f"{refusal['error']}; skipped: {skipped or 'none'}")
    state = _load_state(result.checkpoint)
    if state is None:
        raise RuntimeError(f"training under {output} ended without a checkpoint")
    model = build_model(config.model.name, config.model.width, config.model.in_channels, config.model.classes)
    model.load_state_dict(state["model"])
    history = list(state["history"])
    final_loss = float(history[-1]["loss"]) if history else float("nan")
    iterations, val_dsc = int(state["iteration"]), state.get("val_dsc")
    unfit = unfit_reason(val_dsc, state.get("val_foreground"), len(held))
    if not held:
        say("[train] fitness not checked: no validation cases (--val-cases or --val-data would show a collapse)")
    elif unfit:
        say(f"[train] UNFIT: {unfit}; the bundle is written but marked unfit (fit: false)")
    bundle_provenance = {
        "preset": config.preset,
        "data": data,
        "cases": cases_uri,
        "train_cases": len(cases) - len(state["skipped"]),
        "iterations": iterations,
        "final_loss": final_loss,
        "val_dsc": val_dsc,
        "val_cases": [c.case_id for c in held],
        "train_config": to_dict(config),
        "workers": workers,
        **record["provenance"],
    }
    bundle_uri = storage.join(output, BUNDLE_DIR)
    bundle_id = save_bundle(bundle_uri, model, config.model, config.stage, config.preprocess, bundle_provenance, unfit)
    record.update(status="done", finished_at=utc_iso(), iterations=iterations, final_loss=final_loss, val_dsc=val_dsc,
                  skipped=state["skipped"], bundle=bundle_uri, bundle_id=bundle_id, history=history, fit=unfit is None,
                  **({"unfit": unfit} if unfit else {}))
    storage.write_json(record_uri, record)
    say(f"[train] wrote bundle {bundle_id} to {bundle_uri} (final loss {final_loss:.4f}, validation DSC {val_dsc})")
    return TrainResult(output, bundle_uri, bundle_id, iterations, final_loss, val_dsc, state["skipped"],
                       dict(result.metrics or {}), history, unfit)
