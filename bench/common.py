"""Shared set-up of the engine benchmarks: a synthetic case and a C2F run on a known box.

Random weights make the coarse stage's box meaningless, so the benchmarks time the coarse stage
over the whole volume and the fine stage over the ground-truth box plus margin, which is the
region a trained coarse model hands over. The window counts printed make that explicit.

Imports torch, numpy and the engine only (no Ray, nibabel or s3fs), so that `gpu_engine.py`
runs on a bare GPU box; `case` alone needs the synthetic phantoms (and so nibabel).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from resdsn_ray.boxes import bounding_box
from resdsn_ray.bundle import Bundle
from resdsn_ray.config import EngineConfig, ModelConfig, PreprocessConfig, WindowConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.model import build_model
from resdsn_ray.preprocess import prepare_inputs


def random_bundle(stage: str, width: int, patch: int, seed: int) -> Bundle:
    torch.manual_seed(seed)
    return Bundle(model=build_model("resdsn", width=width), model_config=ModelConfig(width=width, patch=patch), stage=stage)


def engine(width: int, patch: int, device: str, batch_size: int, precision: str = "auto",
           channels_last: str = "auto", n_coarse: int = 6, margin: int = 20) -> CoarseToFine:
    """An engine on freshly initialised coarse and fine models (seeds 0 and 1)."""
    config = EngineConfig(
        coarse=WindowConfig(n=n_coarse, batch_size=batch_size),
        fine=WindowConfig(n=12, batch_size=batch_size),
        margin=margin, device=device, precision=precision, channels_last=channels_last,
    )
    return CoarseToFine(random_bundle("coarse", width, patch, 0), random_bundle("fine", width, patch, 1), config)


def describe(eng: CoarseToFine) -> str:
    """What an engine's "auto" settings resolved to, as the rows record it."""
    return f"{eng.precision}, {'channels-last' if eng.channels_last else 'contiguous'}"


def case(shape: tuple[int, int, int], seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed synthetic volume and its organ label."""
    from resdsn_ray.synthetic import make_case  # nibabel: not on the bare GPU box

    image, label, _ = make_case(seed, shape)
    prepared, _ = prepare_inputs(image.astype(np.float32), PreprocessConfig(), None)
    return prepared, label


def timed_c2f(eng: CoarseToFine, image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Seconds and windows of the coarse stage (whole volume) and the fine stage (organ box)."""
    box = bounding_box(label > 0, eng.config.margin)
    _, coarse_windows, coarse_s = eng.run_stage("coarse", image)
    _, fine_windows, fine_s = eng.run_stage("fine", image[box.slices])
    return {"coarse_s": coarse_s, "coarse_windows": coarse_windows, "fine_s": fine_s,
            "fine_windows": fine_windows, "c2f_s": coarse_s + fine_s, "box": str(box.shape)}


def bare_forward_windows_per_s(eng: CoarseToFine, windows: int, batch_size: int, repeats: int = 1) -> float:
    """Windows/s of the model alone on ready-made batches (the ceiling the engine is held to)."""
    bundle = eng.coarse
    patch = bundle.model_config.patch
    batch = torch.randn(batch_size, 1, patch, patch, patch, device=eng.device).contiguous(memory_format=eng.memory_format)
    batches = max(1, windows // batch_size)
    with torch.inference_mode(), eng.precision_context():
        bundle.model(batch)  # warm-up
        sync(eng.device)
        start = time.perf_counter()
        for _ in range(batches * repeats):
            torch.softmax(bundle.model(batch).float(), dim=1)[:, 1]
        sync(eng.device)
    return batches * repeats * batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
