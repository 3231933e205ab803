"""Coarse-to-fine segmentation of one volume (paper Sec. 3.3, Fig. 2).

COARSE: sliding windows (n = 6) over the whole volume -> stitched scores -> mask -> drop small
components -> bounding box + margin. FINE: sliding windows (n = 12) over the cropped region ->
DeCrop into the full grid -> drop small components. Ray only schedules this; the engine runs
on a bare torch box.

When the coarse stage finds nothing, C2F ends with status no_organ, as the paper; with
`on_no_organ="fine"` the fine model runs on the whole volume instead (`fine_fallback`), for
archives where a coarse model misses small organs a fine model would find.

The fine stage sees the cropped *image* (not the image multiplied by the coarse mask, as a
literal reading of Eq. 4 suggests): the fine model is trained on patches of the unmasked image
inside the ground-truth box (Sec. 4.1), so that is the input distribution it knows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from resdsn_ray.boxes import Box, bounding_box, decrop
from resdsn_ray.bundle import Bundle
from resdsn_ray.config import STATUS_NO_ORGAN, STATUS_OK, EngineConfig, WindowConfig
from resdsn_ray.devices import resolve_channels_last, resolve_device, resolve_precision
from resdsn_ray.postprocess import finish_mask, remove_small_components
from resdsn_ray.preprocess import prepare_inputs
from resdsn_ray.windows import plan_windows, sliding_window_inference

if TYPE_CHECKING:  # the engine runs without the readers (nibabel, pydicom): a bare GPU box needs torch only
    from resdsn_ray.volumes import Volume

# What the engine tells a caller as a stage runs: (stage, windows done, windows of the stage).
WindowCallback = Callable[[str, int, int], None]

# Host-to-device copies go in slabs of about this size, so the first windows compute while the
# rest of the volume is still on its way.
SLAB_BYTES = 16 << 20


@dataclass
class Segmentation:
    """The result of one case: a mask on the volume's grid and what it took to get it."""

    mask: np.ndarray
    status: str
    box: Box | None = None
    coarse_windows: int = 0
    fine_windows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    fine_fallback: bool = False  # the coarse stage found nothing and the fine model ran on the whole volume
    probabilities: np.ndarray | None = None  # float32 on the volume's grid, when asked


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
        # "auto" resolved once, here; rows record these, not the setting.
        self.precision = resolve_precision(config.precision, self.device)
        self.channels_last = resolve_channels_last(config.channels_last, self.device, self.precision)
        self.memory_format = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        self.coarse = coarse
        self.fine = fine
        for bundle in (coarse, fine):
            if bundle is not None:  # in place: engines sharing a bundle share its layout (the last one's)
                bundle.model.to(self.device, memory_format=self.memory_format).eval()

    def segment(self, volume: Volume, probabilities: bool = False, progress: WindowCallback | None = None) -> Segmentation:
        start = time.perf_counter()
        coarse_cfg = self.coarse.preprocess if self.config.mode != "fine" and self.coarse else None
        fine_cfg = self.fine.preprocess if self.config.mode != "coarse" and self.fine else None
        coarse_input, fine_input = prepare_inputs(volume.array, coarse_cfg, fine_cfg)
        seconds = time.perf_counter() - start
        result = self.segment_prepared(coarse_input, fine_input, probabilities, progress)
        result.timings = {"preprocess": seconds, **result.timings}
        return result

    def segment_prepared(self, coarse_input: np.ndarray | None, fine_input: np.ndarray | None,
                         probabilities: bool = False, progress: WindowCallback | None = None) -> Segmentation:
        """`segment` on inputs already preprocessed for each stage's bundle (`prepare_inputs`).

        `probabilities`: also return the fused foreground probabilities on the full grid: the
        fine stage's inside the crop box, the coarse stage's elsewhere (what made the mask there).
        `progress(stage, done, total)` is told of the windows as they are computed.
        """
        timings: dict[str, float] = {}
        if self.config.mode == "fine":
            assert fine_input is not None
            mask, windows, timings["fine"], probs = self._stage("fine", fine_input, probabilities, progress)
            result = Segmentation(mask=mask, status=STATUS_OK, fine_windows=windows, probabilities=probs)
            return self._finish(mask, result, timings)

        assert coarse_input is not None
        shape = tuple(coarse_input.shape)
        scores, coarse_windows, timings["coarse"], probs = self._stage("coarse", coarse_input, probabilities, progress)
        result = Segmentation(mask=scores, status=STATUS_OK, coarse_windows=coarse_windows, probabilities=probs)
        if self.config.mode == "coarse":
            return self._finish(scores, result, timings)

        assert fine_input is not None
        start = time.perf_counter()
        box = self.locate(scores)
        timings["post"] = time.perf_counter() - start
        if box is None and self.config.on_no_organ == "fine":
            fine_scores, result.fine_windows, timings["fine"], result.probabilities = self._stage(
                "fine", fine_input, probabilities, progress)
            result.fine_fallback = True
            return self._finish(fine_scores, result, timings)
        if box is None:
            result.mask = np.zeros(shape, dtype=np.uint8)
            result.status = STATUS_NO_ORGAN
            result.timings = timings
            return result
        fine_scores, result.fine_windows, timings["fine"], fine_probs = self._stage(
            "fine", fine_input[box.slices], probabilities, progress)
        if probs is not None and fine_probs is not None:
            probs[box.slices] = fine_probs
        result.box = box
        # DeCrop (Eq. 5): outside the box the coarse mask is empty by construction of the box.
        return self._finish(decrop(fine_scores, box, shape), result, timings)

    def run_stage(self, stage: str, image: np.ndarray | torch.Tensor,
                  progress: WindowCallback | None = None) -> tuple[np.ndarray, int, float]:
        """One stage over a preprocessed image (whole volume or crop): boolean mask, windows, seconds.

        Public so that a scheduler can run the two stages in different processes (the archive
        pipeline's coarse and fine actor pools) with exactly the engine's computation.
        """
        return self._stage(stage, image, progress=progress)[:3]

    def _stage(self, stage: str, image: np.ndarray | torch.Tensor, probabilities: bool = False,
               progress: WindowCallback | None = None) -> tuple[np.ndarray, int, float, np.ndarray | None]:
        """`run_stage`, and the stage's float32 probabilities when asked."""
        bundle = {"coarse": self.coarse, "fine": self.fine}[stage]
        if bundle is None:
            raise ValueError(f"this engine has no {stage} bundle")
        start = time.perf_counter()
        window = self.config.coarse if stage == "coarse" else self.config.fine
        told = (lambda done, total: progress(stage, done, total)) if progress else None
        if self.device.type == "cuda" and isinstance(image, np.ndarray):
            upload = SlabUpload(image, self.device)
            scores, windows = self._run(bundle, upload.tensor, window, upload.ensure, told)
        else:
            scores, windows = self._run(bundle, torch.as_tensor(image).to(self.device), window, progress=told)
        mask = (scores > 0.5).cpu().numpy()
        seconds = self._elapsed(start)
        return mask, windows, seconds, scores.float().cpu().numpy() if probabilities else None

    def locate(self, coarse_mask: np.ndarray) -> Box | None:
        """The crop box of a coarse mask: small components dropped, bounding box + margin (Eq. 4)."""
        return bounding_box(remove_small_components(coarse_mask, self.config.post_ratio), self.config.margin)

    def _finish(self, mask: np.ndarray, result: Segmentation, timings: dict[str, float]) -> Segmentation:
        start = time.perf_counter()
        result.mask, result.status = finish_mask(mask, self.config.post_ratio)
        timings["post"] = timings.get("post", 0.0) + time.perf_counter() - start
        result.timings = timings
        return result

    def _run(self, bundle: Bundle, image: torch.Tensor, window: WindowConfig,
             ready: Callable[[int], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, int]:
        """Sliding-window scores (foreground probabilities) of one stage, and the window count."""
        patch = bundle.model_config.patch
        model = bundle.model
        accumulate = torch.device("cpu") if self.config.accumulate_on == "cpu" else self.device
        autocast = self.precision_context()

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            with autocast:
                logits = model(batch.contiguous(memory_format=self.memory_format))
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
                ready=ready,
                progress=progress,
                # One batch shape on CUDA (cuDNN autotuning, torch.compile); on a CPU the spare
                # windows would cost more than oneDNN's few ms for a new shape.
                fixed_batch=self.device.type == "cuda",
            )
        return scores, len(plan_windows(tuple(image.shape), patch, window.n))

    def precision_context(self):
        """Autocast to the engine's reduced precision (a no-op for fp32)."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.precision not in dtypes:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.precision])

    def _elapsed(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


class SlabUpload:
    """A host volume copied to a CUDA device in slabs along its first axis, on a side stream
    through pinned staging buffers, so each voxel crosses once and the windows of the first
    slabs compute while later slabs are in flight. `ensure(rows)` makes the device's current
    stream wait (on the GPU, not the host) until rows [0, rows) have arrived.
    """

    def __init__(self, image: np.ndarray, device: torch.device) -> None:
        self.host = image if image.dtype == np.float32 else image.astype(np.float32)
        self.tensor = torch.empty(self.host.shape, dtype=torch.float32, device=device)
        self.stream = torch.cuda.Stream(device)
        # The block may still be in use by queued work of its earlier owner on the compute stream;
        # and it must not be handed out again before the copies end.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.tensor.record_stream(self.stream)
        row_bytes = max(1, self.host[:1].nbytes)
        self.rows = max(1, SLAB_BYTES // row_bytes)
        # Two staging buffers: the host fills one while the other is being copied.
        self.staging = [torch.empty((self.rows, *self.host.shape[1:]), dtype=torch.float32, pin_memory=True)
                        for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.done = 0

    def ensure(self, rows: int) -> None:
        while self.done < min(rows, self.host.shape[0]):
            slot = (self.done // self.rows) % 2
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # this buffer's previous slab has left it
            stop = min(self.done + self.rows, self.host.shape[0])
            buffer = self.staging[slot][: stop - self.done]
            np.copyto(buffer.numpy(), self.host[self.done : stop])
            with torch.cuda.stream(self.stream):
                self.tensor[self.done : stop].copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.copied[slot] = event
            torch.cuda.current_stream(self.tensor.device).wait_event(event)
            self.done = stop
