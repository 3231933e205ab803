"""Training the coarse and fine ResDSN with Ray Train (paper Sec. 4.1-4.2).

What a run does:
- Samplers draw P^3 patches from volumes held in each worker's memory (loaded once,
  preprocessed as at inference): coarse -- uniformly anywhere in the volume (hard negatives
  included); fine -- around a random ground-truth voxel, so every patch covers organ voxels.
- Every patch gets a random symmetry of the cube: the 90/180/270 degree rotations and flips on
  all three axes generate the 48-element octahedral group; one element is drawn uniformly and
  applied identically to image and label.
- SGD (momentum 0.9, weight decay 5e-4 = the L2 term of Eq. 3), lr 0.01 with poly decay
  (power 0.9) over the run, global mini-batch 16 split over the workers, loss of Eq. 3.
- Ray Train `TorchTrainer` runs one DDP replica per worker (gloo on CPU, NCCL on GPU).
  Checkpoints go to `OUTPUT/train/` every K iterations (Ray keeps the last few); a run started
  again with the same OUTPUT resumes from the newest at the same iteration, optimiser and LR.

Output layout under OUTPUT (local folder or s3://):
  run.json           settings, cases used and skipped, status, final figures
  refused.json       only when too few cases were readable: why, and which were skipped
  train/checkpoint_<iteration>/state.pt   model + optimiser + iteration (last `keep` kept)
  bundle/            the final model bundle (config.json, weights.safetensors)

Why worker-local samplers and not Ray Data shards: see `bench/train.py` and the README; in
short, patches are cheap to cut from memory but each volume is big, so moving volumes once to
the worker that samples them beats moving every patch through the object store.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resdsn_ray import storage
from resdsn_ray.archive import Case, list_cases
from resdsn_ray.bundle import Bundle, save_bundle
from resdsn_ray.config import (
    EngineConfig,
    ModelConfig,
    PreprocessConfig,
    WindowConfig,
    from_dict,
    to_dict,
)
from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model, deep_supervision_loss
from resdsn_ray.preprocess import preprocess

STAGES = ("coarse", "fine")
PRESETS = ("paper", "demo")
JHMI_ITERATIONS = 300_000
RUN_NAME = "train"  # Ray Train's run folder under OUTPUT
RUN_RECORD = "run.json"
REFUSAL = "refused.json"  # written instead of training when too few cases are usable
BUNDLE_DIR = "bundle"
STATE_FILE = "state.pt"
# Settings that define the trained model; the others (cadences) may change on resume.
RECIPE = ("stage", "iterations", "batch_size", "optimizer", "lr", "momentum", "lr_power", "weight_decay", "seed", "model", "preprocess")


def say(message: str) -> None:
    """One progress line on stdout, flushed (bypasses Ray Train's print patch, which doubles lines)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainConfig:
    """One training run of one stage. `iterations` count global mini-batches."""

    stage: str = "coarse"
    preset: str = "paper"
    iterations: int = 80_000
    batch_size: int = 16
    optimizer: str = "sgd"  # paper: SGD; the demo preset uses Adam (see preset_config)
    lr: float = 0.01
    momentum: float = 0.9
    lr_power: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    validate_every: int = 5000
    val_n: int = 6  # sliding-window n for validation (paper: 6 coarse, 12 fine)
    val_margin: int = 20  # fine validation: ground-truth box + this margin, as the engine crops
    log_every: int = 20
    min_cases: int = 1
    fail_at: int = 0  # testing hook: the last rank raises once at this iteration (0: never)


def preset_config(preset: str, stage: str, **overrides: Any) -> TrainConfig:
    """The `paper` or `demo` recipe of a stage, with `overrides` (None values ignored).

    paper: P = 64, width 32, 80,000 iterations (NIH; 300,000 for JHMI), as Sec. 4.2.
    demo: P = 32, width 8, 800 iterations of batch 8: minutes on a 2-core CPU, for the shipped
    demo bundles and synthetic phantoms (96x96x64 voxels). It uses Adam (lr 3e-3, same poly
    decay): with the paper's SGD at lr 0.01, 600-1500 iterations left both stages predicting
    background only (held-out DSC 0.0), while Adam reached DSC ~0.9 in 400 iterations. SGD needs
    the paper's tens of thousands of iterations, which a CPU demo cannot afford.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, not {preset!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    if preset == "paper":
        base = TrainConfig(stage=stage, preset=preset, val_n=6 if stage == "coarse" else 12)
    else:
        base = TrainConfig(
            stage=stage,
            preset=preset,
            iterations=800,
            batch_size=8,
            optimizer="adam",
            lr=3e-3,
            model=ModelConfig(width=8, patch=32),
            checkpoint_every=100,
            validate_every=300,
            val_n=2,
            log_every=10,
        )
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    model_overrides = {k: v for k, v in overrides.items() if k in model_keys and v is not None}
    rest = {k: v for k, v in overrides.items() if k not in model_keys and v is not None}
    if model_overrides:
        rest["model"] = dataclasses.replace(base.model, **model_overrides)
    config = dataclasses.replace(base, **rest)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    if config.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {config.stage!r}")
    if config.optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be sgd or adam, not {config.optimizer!r}")
    if config.model.patch < 8 or config.model.patch % 8:
        raise ValueError(f"patch must be a positive multiple of 8, not {config.model.patch}")
    for name in ("iterations", "batch_size", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, not {getattr(config, name)}")


def poly_lr(base: float, iteration: int, total: int, power: float = 0.9) -> float:
    """The paper's polynomial decay: base * (1 - iteration / total) ** power."""
    return base * (1.0 - iteration / total) ** power


def split_batch(global_batch: int, world: int, rank: int) -> int:
    """This rank's share of the global mini-batch (the first ranks take the remainder)."""
    if global_batch < world:
        raise ValueError(f"global batch {global_batch} cannot be split over {world} workers")
    return global_batch // world + (rank < global_batch % world)


# ------------------------------------------------------------------------ sampling, augment


@dataclass
class TrainingCase:
    """One case in worker memory: the preprocessed image (float32) and label (uint8).

    For the fine stage only the region a patch touching the organ can reach is kept, and
    `organ` holds the organ voxels' coordinates in it (int32 [N, 3]).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    organ: np.ndarray | None = None


def prepare_case(
    case_id: str, image_hu: np.ndarray, label: np.ndarray, stage: str, patch: int, config: PreprocessConfig
) -> TrainingCase:
    """Preprocess as at inference, pad axes shorter than P (image: its minimum, label: 0).

    Raises InputError for a label of another shape, or an empty label on the fine stage
    (no patch could cover organ voxels).
    """
    if label.shape != image_hu.shape:
        raise InputError(case_id, f"label shape {label.shape} differs from the image's {image_hu.shape}")
    mask = np.asarray(label > 0, dtype=np.uint8)
    if stage == "fine" and not mask.any():
        raise InputError(case_id, "label is empty: the fine sampler needs organ voxels")
    image = preprocess(image_hu, config, source=case_id)
    pad = [(0, max(0, patch - s)) for s in image.shape]
    if any(after for _, after in pad):
        image = np.pad(image, pad, constant_values=float(image.min()))
        mask = np.pad(mask, pad)
    if stage == "coarse":
        return TrainingCase(case_id, image, mask)
    coords = np.argwhere(mask)
    lo = np.maximum(coords.min(axis=0) - patch + 1, 0)
    hi = np.minimum(coords.max(axis=0) + patch, image.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return TrainingCase(
        case_id,
        np.ascontiguousarray(image[region]),
        np.ascontiguousarray(mask[region]),
        (coords - lo).astype(np.int32),
    )


def coarse_origin(shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniformly random patch corner anywhere in the volume."""
    return tuple(int(rng.integers(0, s - patch + 1)) for s in shape)  # type: ignore[return-value]


def fine_origin(organ: np.ndarray, shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random patch corner such that the patch contains a random organ voxel."""
    voxel = organ[rng.integers(len(organ))]
    lo = np.maximum(voxel - patch + 1, 0)
    hi = np.minimum(voxel, np.asarray(shape) - patch)
    return tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def cube_symmetry(array: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """`array` (trailing three axes spatial) with its axes permuted, then flipped (a view)."""
    lead = tuple(range(array.ndim - 3))
    out = array.transpose(*lead, *(len(lead) + p for p in perm))
    index = (Ellipsis, *(slice(None, None, -1) if f else slice(None) for f in flips))
    return out[index]


def draw_symmetry(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """A uniformly random element of the cube's 48 symmetries (axis permutation + flips).

    90-degree rotations about each axis and flips on each axis generate exactly this group,
    so this is the paper's rotation/flip augmentation with every combination reachable.
    """
    perm = tuple(int(p) for p in rng.permutation(3))
    flips = tuple(bool(f) for f in rng.integers(0, 2, size=3))
    return perm, flips


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random cube symmetry applied to a cubic image patch and its label."""
    perm, flips = draw_symmetry(rng)
    return cube_symmetry(image, perm, flips), cube_symmetry(label, perm, flips)


class PatchSampler:
    """Augmented training patches of one stage from cases held in memory."""

    def __init__(self, cases: list[TrainingCase], stage: str, patch: int, rng: np.random.Generator) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases, self.stage, self.patch, self.rng = cases, stage, patch, rng

    def origin(self, case: TrainingCase) -> tuple[int, int, int]:
        if self.stage == "fine":
            assert case.organ is not None
            return fine_origin(case.organ, case.image.shape, self.patch, self.rng)
        return coarse_origin(case.image.shape, self.patch, self.rng)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Images [size, 1, P, P, P] float32 and labels [size, P, P, P] uint8.

        Labels stay uint8 until they reach the device (`.long()` there): 8x less to copy.
        """
        p = self.patch
        images = np.empty((size, 1, p, p, p), dtype=np.float32)
        labels = np.empty((size, p, p, p), dtype=np.uint8)
        for i in range(size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            x, y, z = self.origin(case)
            window = (slice(x, x + p), slice(y, y + p), slice(z, z + p))
            images[i, 0], labels[i] = augment(case.image[window], case.label[window], self.rng)
        return images, labels


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD as the paper (momentum 0.9, weight decay 5e-4 = Eq. 3's L2 term), or Adam for the
    CPU demo preset; the lr is set per step by the poly schedule."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    aux_weights: tuple[float, float],
    scale: float = 1.0,
) -> torch.Tensor:
    """One SGD step on Eq. 3 at learning rate `lr`; returns the (unscaled) loss, detached.

    `scale` = local batch x workers / global batch, so DDP's gradient average is the exact
    global-batch mean even when the batch does not split evenly.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = deep_supervision_loss(model(images), labels, aux_weights)
    (loss * scale).backward()
    optimizer.step()
    return loss.detach()


def parameter_checksum(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all replicas iff they are identical."""
    digest = hashlib.sha256()
    for tensor in getattr(model, "module", model).parameters():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------ validation


@dataclass
class ValidationCase:
    case_id: str
    image_hu: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    from resdsn_ray.metrics import confusion_counts

    tp, fp, fn = confusion_counts(pred, ref)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def validate(module: torch.nn.Module, config: TrainConfig, cases: list[ValidationCase], device: torch.device) -> list[float]:
    """DSC of each held-out case, segmented by this stage alone.

    Coarse: the engine in `coarse` mode over the whole volume. Fine: the ground-truth box plus
    `val_margin` stands in for the coarse box (the engine's c2f crop, with an oracle coarse
    stage), then the same sliding windows and post-processing as the engine.
    """
    from resdsn_ray.engine import CoarseToFine
    from resdsn_ray.volumes import Volume
    from resdsn_ray.postprocess import remove_small_components
    from resdsn_ray.windows import bounding_box, sliding_window_inference

    bundle = Bundle(model=module, model_config=config.model, stage=config.stage, preprocess=config.preprocess)
    window = WindowConfig(n=config.val_n)
    engine_config = EngineConfig(coarse=window, fine=window, mode="coarse", device=str(device))
    scores: list[float] = []
    try:
        for case in cases:
            if config.stage == "coarse":
                volume = Volume(array=case.image_hu, affine=case.affine, source=case.case_id)
                mask = CoarseToFine(bundle, None, engine_config).segment(volume).mask
                scores.append(dice(mask > 0, case.label > 0))
                continue
            module.to(device).eval()
            box = bounding_box(case.label, config.val_margin)
            image = torch.from_numpy(preprocess(case.image_hu, config.preprocess, case.case_id)).to(device)

            def predictor(batch: torch.Tensor) -> torch.Tensor:
                return torch.softmax(module(batch).float(), dim=1)[:, 1]

            with torch.inference_mode():
                prob = sliding_window_inference(
                    image[box.slices], predictor, patch=config.model.patch, n=config.val_n, batch_size=window.batch_size
                )
            pred = remove_small_components((prob > 0.5).cpu().numpy(), engine_config.post_ratio)
            scores.append(dice(pred, case.label[box.slices] > 0))
    finally:
        module.train()
    return scores


# --------------------------------------------------------------------------- case loading


def load_case_arrays(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image HU float32, label, affine) of a case row; InputError names the case on failure."""
    from resdsn_ray.volumes import read_volume

    try:
        image = read_volume(case["image_uri"])
        label = read_volume(case["label_uri"])
    except InputError as err:
        raise InputError(case["case_id"], f"unreadable: {err}") from err
    except Exception as err:  # any reader failure skips this case, never the run
        raise InputError(case["case_id"], f"unreadable: {type(err).__name__}: {err}") from err
    return image.array, label.array, image.affine


def load_training_cases(cases: list[dict[str, Any]], config: TrainConfig) -> tuple[list[TrainingCase], list[dict[str, str]]]:
    """Load and prepare cases; the ones that cannot be used come back as {case_id, reason}."""
    loaded: list[TrainingCase] = []
    skipped: list[dict[str, str]] = []
    for case in cases:
        try:
            image, label, _ = load_case_arrays(case)
            loaded.append(prepare_case(case["case_id"], image, label, config.stage, config.model.patch, config.preprocess))
        except InputError as err:
            skipped.append({"case_id": case["case_id"], "reason": err.reason})
            say(f"[train] skipping case {case['case_id']}: {err.reason}")
    return loaded, skipped


def load_validation_cases(cases: list[dict[str, Any]]) -> tuple[list[ValidationCase], list[dict[str, str]]]:
    loaded: list[ValidationCase] = []
    skipped: list[dict[str, str]] = []
    for case in cases:
        try:
            image, label, affine = load_case_arrays(case)
            if label.shape != image.shape or not (label > 0).any():
                raise InputError(case["case_id"], "label empty or of another shape than the image")
            loaded.append(ValidationCase(case["case_id"], image, (label > 0).astype(np.uint8), affine))
        except InputError as err:
            skipped.append({"case_id": case["case_id"], "reason": f"validation: {err.reason}"})
            say(f"[train] skipping validation case {case['case_id']}: {err.reason}")
    return loaded, skipped


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

    # Cases: each rank loads its share once; all ranks then agree on what is usable.
    train_cases: list[dict[str, Any]] = loop_config["train_cases"]
    cases, skipped = load_training_cases(train_cases[rank::world], config)
    val, val_skipped = load_validation_cases(loop_config["val_cases"][rank::world])
    shares = _all_gather(([c.case_id for c in cases], skipped + val_skipped))
    usable = sorted(i for ids, _ in shares for i in ids)
    skipped_all = sorted((s for _, lost in shares for s in lost), key=lambda s: s["case_id"])
    if len(usable) < max(config.min_cases, 1):
        # A refusal, not a failure: raising would make Ray retry (FailureConfig) to no avail.
        if rank == 0:
            refusal = {"error": f"only {len(usable)} usable training case(s), need {config.min_cases}", "skipped": skipped_all}
            storage.write_text(storage.join(loop_config["output"], REFUSAL), json.dumps(refusal, indent=2))
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
    rng = np.random.default_rng([config.seed, rank, start])
    sampler = PatchSampler(cases, config.stage, config.model.patch, rng)
    local = split_batch(config.batch_size, world, rank)
    scale = local * world / config.batch_size
    if log:
        note = f"resuming at iteration {start}" if start else "starting"
        say(f"[train] {config.stage}: {note}; {len(usable)} cases on {world} worker(s), {local} patches/worker/iteration")

    has_val = bool(loop_config["val_cases"])  # the same on every rank: validation is collective
    window_loss = torch.zeros((), device=device)
    window_count, window_start = 0, time.perf_counter()
    loss_value = float(history[-1]["loss"]) if history else float("nan")
    for iteration in range(start, config.iterations):
        if config.fail_at and iteration == config.fail_at and state is None and rank == world - 1:
            raise RuntimeError(f"injected failure at iteration {iteration} (fail_at)")
        lr = poly_lr(config.lr, iteration, config.iterations, config.lr_power)
        images, labels = sampler.batch(local)
        loss = train_step(model, optimizer, torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device).long(), lr, config.model.aux_weights, scale)
        window_loss += loss
        window_count += 1
        done = iteration + 1
        last = done == config.iterations
        if done % config.log_every == 0 or last:
            total, count = _all_sum([float(window_loss), window_count], device)
            loss_value = total / count
            rate = window_count / max(time.perf_counter() - window_start, 1e-9)
            history.append({"iteration": done, "loss": loss_value, "lr": lr})
            if log:
                say(f"[train] {config.stage} it {done}/{config.iterations} loss {loss_value:.4f} lr {lr:.6f} {rate:.2f} it/s {rate * config.batch_size:.1f} samples/s")
            window_loss.zero_()
            window_count, window_start = 0, time.perf_counter()
        paused = time.perf_counter()
        if has_val and (done % config.validate_every == 0 or last):
            scores = validate(module, config, val, device)
            total, count = _all_sum([sum(scores), len(scores)], device)
            val_dsc = total / count if count else None
            if log and val_dsc is not None:
                say(f"[train] {config.stage} it {done}: validation mean DSC {val_dsc:.4f} over {int(count)} case(s)")
        if done % config.checkpoint_every == 0 or last:
            metrics = {
                "iteration": done,
                "loss": loss_value,
                "lr": lr,
                "val_dsc": val_dsc,
                "start_iteration": start,
                "checksums": _all_gather(parameter_checksum(model)),
                "skipped": skipped_all,
                "cases": len(usable),
            }
            _report(metrics, rank, module, optimizer, done, history, val_dsc, skipped_all, config)
        window_start += time.perf_counter() - paused  # its/s counts training steps only


def _report(metrics: dict[str, Any], rank: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
            history: list[dict[str, float]], val_dsc: float | None, skipped: list[dict[str, str]], config: TrainConfig) -> None:
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
            "val_dsc": val_dsc,
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


def training_cases(data: str | None, cases_uri: str | None) -> tuple[list[Case], list[dict[str, str]]]:
    """Labelled, well-named cases of the archive (or of the `cases_uri` manifest), and the rest.

    The rest (bad ids, no label) come back as {case_id, reason}: they cannot train anything.
    """
    source = cases_uri or data
    if not source:
        raise InputError("--data", "give an archive (--data) or a manifest (--cases)")
    usable: list[Case] = []
    rejected: list[dict[str, str]] = []
    for case in list_cases(source):
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

    pyarrow ignores AWS_ENDPOINT_URL (apache/arrow#49643), so it is passed as endpoint_override.
    Explicit keys travel with the (pickled) filesystem to Ray's controller and workers.
    """
    if output.startswith("s3://"):
        from pyarrow import fs

        options: dict[str, Any] = {}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
            if os.environ.get("AWS_SESSION_TOKEN"):
                options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return output.removeprefix("s3://").rstrip("/"), fs.S3FileSystem(**options)
    if "://" in output and not output.startswith("file://"):
        raise InputError(output, "training output must be a local folder, file:// or s3:// URI")
    return os.path.abspath(output.removeprefix("file://")), None


def _aws_env() -> dict[str, str]:
    """The AWS variables the workers need to read s3:// cases (s3fs honours them)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _check_resume(output: str, config: TrainConfig) -> dict[str, Any] | None:
    """The existing run record under OUTPUT; InputError if it was made with another recipe."""
    uri = storage.join(output, RUN_RECORD)
    if not storage.exists(uri):
        return None
    record = json.loads(storage.read_bytes(uri))
    old, new = record.get("config", {}), to_dict(config)
    changed = [k for k in RECIPE if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]
    if changed:
        raise InputError(output, f"holds a run with other settings ({', '.join(changed)}); resume with the same ones or use a new --output")
    return record


def _code_version() -> str:
    """Package version, plus the git commit (and `-dirty`) when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("resdsn_ray")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(__file__),
                                capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package}+{commit}" if commit else package


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
) -> TrainResult:
    """Train one stage on a Ray cluster (started locally if none is connected); write the bundle.

    Raises InputError for unusable input (too few readable cases, a mismatched earlier run under
    OUTPUT) and ray.train.TrainingFailedError when workers fail more than `max_failures` times.
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    check_config(config)
    if config.batch_size < workers:
        raise InputError("--workers", f"{workers} workers cannot share a global batch of {config.batch_size}")
    output = str(output).rstrip("/")
    cases, rejected = training_cases(data, cases_uri)
    for item in rejected:
        say(f"[train] skipping case {item['case_id']}: {item['reason']}")
    if val_data:
        held, val_rejected = training_cases(val_data, None)
        rejected += [{"case_id": r["case_id"], "reason": f"validation: {r['reason']}"} for r in val_rejected]
    else:
        cases, held = split_validation(cases, val_cases, config.seed)
    if len(cases) < max(config.min_cases, 1):
        raise InputError(cases_uri or str(data), f"only {len(cases)} labelled case(s) to train on, need {config.min_cases}")
    if not ray.is_initialized():
        ray.init()
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu and gpus < workers:  # Ray would wait for them forever
        raise InputError("--gpu", f"the Ray cluster has {gpus:g} GPU(s); {workers} worker(s) need one each")
    record = _check_resume(output, config)
    if record is not None:
        say(f"[train] {output} holds this run: resuming from its newest checkpoint")
    record = {
        "config": to_dict(config),
        "data": data,
        "cases_uri": cases_uri,
        "val_data": val_data,
        "train_cases": [c.case_id for c in cases],
        "val_cases": [c.case_id for c in held],
        "rejected": rejected,
        "workers": workers,
        "gpu": gpu,
        "code_version": _code_version(),
        "status": "running",
        "started_at": (record or {}).get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_text(storage.join(output, RUN_RECORD), json.dumps(record, indent=2))

    storage_path, filesystem = storage_target(output)
    env = _aws_env()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "train_cases": [_row(c) for c in cases],
            "val_cases": [_row(c) for c in held],
            "threads": max(1, int(cpus_per_worker)),
            "output": output,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            logging_config=LoggingConfig(log_level="WARNING"),  # progress comes from our own lines
        ),
    )
    refusal_uri = storage.join(output, REFUSAL)
    if storage.exists(refusal_uri):
        storage.filesystem(refusal_uri)[0].rm(storage.filesystem(refusal_uri)[1])
    result = trainer.fit()
    if storage.exists(refusal_uri):
        refusal = json.loads(storage.read_bytes(refusal_uri))
        skipped = ", ".join(f"{s['case_id']} ({s['reason']})" for s in refusal["skipped"])
        raise InputError(cases_uri or str(data), f"{refusal['error']}; skipped: {skipped or 'none'}")
    metrics = dict(result.metrics or {})
    if result.checkpoint is None:
        raise RuntimeError(f"training under {output} ended without a checkpoint")
    state = _load_state(result.checkpoint)
    assert state is not None
    model = build_model(config.model.name, config.model.width, config.model.in_channels, config.model.classes)
    model.load_state_dict(state["model"])
    history = list(state["history"])
    final_loss = float(history[-1]["loss"]) if history else float("nan")
    provenance = {
        "preset": config.preset,
        "data": data,
        "cases": cases_uri,
        "train_cases": len(cases) - len(state["skipped"]),
        "iterations": int(state["iteration"]),
        "final_loss": final_loss,
        "val_dsc": state.get("val_dsc"),
        "val_cases": [c.case_id for c in held],
        "train_config": to_dict(config),
        "workers": workers,
        "code_version": record["code_version"],
    }
    bundle_uri = storage.join(output, BUNDLE_DIR)
    bundle_id = save_bundle(bundle_uri, model, config.model, config.stage, config.preprocess, provenance)
    record.update(
        status="done",
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        iterations=int(state["iteration"]),
        final_loss=final_loss,
        val_dsc=state.get("val_dsc"),
        skipped=state["skipped"],
        bundle=bundle_uri,
        bundle_id=bundle_id,
        history=history,
    )
    storage.write_text(storage.join(output, RUN_RECORD), json.dumps(record, indent=2))
    say(f"[train] wrote bundle {bundle_id} to {bundle_uri} (final loss {final_loss:.4f}, validation DSC {state.get('val_dsc')})")
    return TrainResult(output, bundle_uri, bundle_id, int(state["iteration"]), final_loss, state.get("val_dsc"), state["skipped"], metrics, history)


# ------------------------------------------------------------------------- command line


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `resdsn train` and `jobs/train.py`."""
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--data", help="training archive URI (MSD layout, folder or manifest)")
    parser.add_argument("--cases", help="manifest (CSV/Parquet/JSONL: case_id,image_uri,label_uri) of the training cases; overrides --data's listing")
    parser.add_argument("--output", required=True, help="run folder or s3:// URI: checkpoints, run.json, bundle/")
    parser.add_argument("--preset", choices=PRESETS, default="paper", help="paper: P=64, width 32, 80,000 iterations; demo: minutes on a CPU")
    parser.add_argument("--jhmi", action="store_true", help=f"JHMI protocol: {JHMI_ITERATIONS:,} iterations")
    parser.add_argument("--iterations", type=int, help="global mini-batches (overrides the preset)")
    parser.add_argument("--workers", type=int, default=1, help="DDP replicas (Ray Train workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (fractions allowed)")
    parser.add_argument("--batch-size", type=int, help="global mini-batch, split over workers (paper: 16)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], help="paper: sgd; demo preset: adam")
    parser.add_argument("--lr", type=float, help="base learning rate (paper: 0.01)")
    parser.add_argument("--model", dest="name", help="network: resdsn, fresdsn, sresdsn, dsn, res")
    parser.add_argument("--width", type=int, help="channels of the first layer (paper: 32)")
    parser.add_argument("--patch", type=int, help="patch size P, a multiple of 8 (paper: 64)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    parser.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    parser.add_argument("--validate-every", type=int, help="iterations between validations")
    parser.add_argument("--val-cases", type=int, help="cases held out of the training set for validation (demo: 2, paper: 0)")
    parser.add_argument("--val-data", help="validation archive or manifest instead of held-out cases")
    parser.add_argument("--min-cases", type=int, help="refuse to train with fewer readable cases")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures survived by restarting from the last checkpoint")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    iterations = args.iterations or (JHMI_ITERATIONS if args.jhmi else None)
    return preset_config(
        args.preset,
        args.stage,
        iterations=iterations,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        name=args.name,
        width=args.width,
        patch=args.patch,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        min_cases=args.min_cases,
    )


def run_train(args: argparse.Namespace) -> int:
    """`resdsn train`: 0 on success, 1 when training failed (InputError propagates: exit 2)."""
    from ray.train import TrainingFailedError

    config = config_from_args(args)
    val_cases = args.val_cases if args.val_cases is not None else (2 if config.preset == "demo" else 0)
    try:
        train(
            config,
            args.output,
            data=args.data,
            cases_uri=args.cases,
            val_data=args.val_data,
            val_cases=val_cases,
            workers=args.workers,
            gpu=args.gpu,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
        )
    except TrainingFailedError as err:
        print(f"error: training failed: {err}\nrun the same command again to resume from the last checkpoint", file=sys.stderr)
        return 1
    return 0
