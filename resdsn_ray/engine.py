"""Coarse-to-fine segmentation of one volume (paper Sec. 3.3, Fig. 2).

COARSE: sliding windows (n = 6) over the whole volume -> stitched scores -> mask -> drop small
components -> bounding box + margin. FINE: sliding windows (n = 12) over the cropped region ->
DeCrop into the full grid -> drop small components. Ray only schedules this; the engine runs
on a bare torch box.

The fine stage sees the cropped *image* (not the image multiplied by the coarse mask, as a
literal reading of Eq. 4 suggests): the fine model is trained on patches of the unmasked image
inside the ground-truth box (Sec. 4.1), so that is the input distribution it knows.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from resdsn_ray.bundle import Bundle
from resdsn_ray.config import STATUS_NO_ORGAN, STATUS_OK, EngineConfig, PreprocessConfig, WindowConfig
from resdsn_ray.postprocess import remove_small_components
from resdsn_ray.preprocess import preprocess
from resdsn_ray.volumes import Volume
from resdsn_ray.windows import Box, bounding_box, decrop, plan_windows, sliding_window_inference


@dataclass
class Segmentation:
    """The result of one case: a mask on the volume's grid and what it took to get it."""

    mask: np.ndarray
    status: str
    box: Box | None = None
    coarse_windows: int = 0
    fine_windows: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_inputs(
    array: np.ndarray, coarse: PreprocessConfig | None, fine: PreprocessConfig | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each stage's preprocessed input (None where the stage does not run); one array when the
    two bundles preprocess alike. Separate from the engine so it can run in a CPU task."""
    coarse_input = preprocess(array, coarse) if coarse is not None else None
    if fine is None:
        return coarse_input, None
    return coarse_input, coarse_input if fine == coarse else preprocess(array, fine)


def finish_mask(mask: np.ndarray, post_ratio: float) -> tuple[np.ndarray, str]:
    """The final uint8 mask (small components dropped) and its status (ok / no_organ)."""
    final = remove_small_components(mask, post_ratio)
    return final.astype(np.uint8), STATUS_OK if final.any() else STATUS_NO_ORGAN


class CoarseToFine:
    """Runs the coarse and fine bundles over one volume; modes `c2f`, `coarse`, `fine`."""

    def __init__(self, coarse: Bundle | None, fine: Bundle | None, config: EngineConfig = EngineConfig()):
        needs = {"c2f": ("coarse", "fine"), "coarse": ("coarse",), "fine": ("fine",)}[config.mode]
        bundles = {"coarse": coarse, "fine": fine}
        missing = [stage for stage in needs if bundles[stage] is None]
        if missing:
            raise ValueError(f"mode {config.mode!r} needs the {' and '.join(missing)} bundle")
        self.config = config
        self.device = resolve_device(config.device)
        self.coarse = coarse
        self.fine = fine
        for bundle in (coarse, fine):
            if bundle is not None:
                bundle.model.to(self.device).eval()
                if config.channels_last:
                    bundle.model.to(memory_format=torch.channels_last_3d)

    def segment(self, volume: Volume) -> Segmentation:
        start = time.perf_counter()
        coarse_cfg = self.coarse.preprocess if self.config.mode != "fine" and self.coarse else None
        fine_cfg = self.fine.preprocess if self.config.mode != "coarse" and self.fine else None
        coarse_input, fine_input = prepare_inputs(volume.array, coarse_cfg, fine_cfg)
        seconds = time.perf_counter() - start
        result = self.segment_prepared(coarse_input, fine_input)
        result.timings = {"preprocess": seconds, **result.timings}
        return result

    def segment_prepared(self, coarse_input: np.ndarray | None, fine_input: np.ndarray | None) -> Segmentation:
        """`segment` on inputs already preprocessed for each stage's bundle (`prepare_inputs`)."""
        timings: dict[str, float] = {}
        if self.config.mode == "fine":
            assert fine_input is not None
            mask, windows, timings["fine"] = self.run_stage("fine", fine_input)
            return self._finish(mask, Segmentation(mask=mask, status=STATUS_OK, fine_windows=windows), timings)

        assert coarse_input is not None
        shape = tuple(coarse_input.shape)
        scores, coarse_windows, timings["coarse"] = self.run_stage("coarse", coarse_input)
        result = Segmentation(mask=scores, status=STATUS_OK, coarse_windows=coarse_windows)
        if self.config.mode == "coarse":
            return self._finish(scores, result, timings)

        assert fine_input is not None
        start = time.perf_counter()
        box = self.locate(scores)
        timings["post"] = time.perf_counter() - start
        if box is None:
            result.mask = np.zeros(shape, dtype=np.uint8)
            result.status = STATUS_NO_ORGAN
            result.timings = timings
            return result
        fine_scores, result.fine_windows, timings["fine"] = self.run_stage("fine", fine_input[box.slices])
        result.box = box
        # DeCrop (Eq. 5): outside the box the coarse mask is empty by construction of the box.
        return self._finish(decrop(fine_scores, box, shape), result, timings)

    def run_stage(self, stage: str, image: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int, float]:
        """One stage over a preprocessed image (whole volume or crop): boolean mask, windows, seconds.

        Public so that a scheduler can run the two stages in different processes (the archive
        pipeline's coarse and fine actor pools) with exactly the engine's computation.
        """
        bundle = {"coarse": self.coarse, "fine": self.fine}[stage]
        if bundle is None:
            raise ValueError(f"this engine has no {stage} bundle")
        start = time.perf_counter()
        tensor = torch.as_tensor(image).to(self.device)
        mask, windows = self._run(bundle, tensor, self.config.coarse if stage == "coarse" else self.config.fine)
        return mask, windows, self._elapsed(start)

    def locate(self, coarse_mask: np.ndarray) -> Box | None:
        """The crop box of a coarse mask: small components dropped, bounding box + margin (Eq. 4)."""
        return bounding_box(remove_small_components(coarse_mask, self.config.post_ratio), self.config.margin)

    def _finish(self, mask: np.ndarray, result: Segmentation, timings: dict[str, float]) -> Segmentation:
        start = time.perf_counter()
        result.mask, result.status = finish_mask(mask, self.config.post_ratio)
        timings["post"] = timings.get("post", 0.0) + time.perf_counter() - start
        result.timings = timings
        return result

    def _run(self, bundle: Bundle, image: torch.Tensor, window: WindowConfig) -> tuple[np.ndarray, int]:
        """Sliding-window scores of one stage, thresholded to a boolean mask, and the window count."""
        patch = bundle.model_config.patch
        model = bundle.model
        accumulate = torch.device("cpu") if self.config.accumulate_on == "cpu" else self.device
        autocast = self.precision_context()
        memory_format = torch.channels_last_3d if self.config.channels_last else torch.contiguous_format

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            with autocast:
                logits = model(batch.contiguous(memory_format=memory_format))
            return torch.softmax(logits.float(), dim=1)[:, 1]

        with torch.inference_mode():
            scores = sliding_window_inference(
                image,
                predictor,
                patch=patch,
                n=window.n,
                fusion=window.fusion,
                batch_size=window.batch_size,
                accumulate_device=accumulate,
            )
            mask = (scores > 0.5).cpu().numpy()
        return mask, len(plan_windows(tuple(image.shape), patch, window.n))

    def precision_context(self):
        """Autocast to the configured reduced precision (a no-op for fp32)."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.config.precision not in dtypes:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.config.precision])

    def _elapsed(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
