"""Training data in worker memory (paper Sec. 4.1): cases loaded and preprocessed once, P^3 patches
cut from them, and the cube-symmetry augmentation.

- coarse: patches uniformly anywhere in the volume (hard negatives included), as the paper; a
  `foreground_share` of them may instead be centred on a random organ voxel (nnU-Net draws a
  third of its patches so): where the organ is a few tenths of a percent of the volume, uniform
  patches almost never show it, and a short training learns to predict background everywhere;
- fine: around a random ground-truth voxel, so every patch covers organ voxels;
- every patch gets one of the cube's 48 symmetries (90/180/270 degree rotations and flips on
  all three axes), drawn uniformly and applied identically to image and label.

Ray-free: the Ray Train loop (`training`) runs these inside each worker, and `bench/train.py`
times them against the bare training step. Patches are cheap to cut from memory but each
volume is big, so volumes move once to the worker that samples them, never patch by patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from resdsn_ray.config import PreprocessConfig, TrainConfig
from resdsn_ray.errors import InputError
from resdsn_ray.preprocess import preprocess
from resdsn_ray.volumes import Volume, check_same_grid, read_volume


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


@dataclass
class ValidationCase:
    """A held-out case: the image in HU on its grid and its binary label (uint8)."""

    case_id: str
    image: Volume
    label: np.ndarray


def prepare_case(case_id: str, image: Volume, label: Volume, stage: str, patch: int, config: PreprocessConfig) -> TrainingCase:
    """Preprocess as at inference, pad axes shorter than P (image: its minimum, label: 0).

    Raises InputError for a label on another grid (shape or affine), or an empty label on the
    fine stage (no patch could cover organ voxels).
    """
    check_same_grid(label, image.shape, image.affine)
    mask = np.asarray(label.array > 0, dtype=np.uint8)
    if stage == "fine" and not mask.any():
        raise InputError(case_id, "label is empty: the fine sampler needs organ voxels")
    array = preprocess(image.array, config, source=case_id)
    pad = [(0, max(0, patch - s)) for s in array.shape]
    if any(after for _, after in pad):
        array = np.pad(array, pad, constant_values=float(array.min()))
        mask = np.pad(mask, pad)
    if stage == "coarse":
        return TrainingCase(case_id, array, mask)
    coords = np.argwhere(mask)
    lo = np.maximum(coords.min(axis=0) - patch + 1, 0)
    hi = np.minimum(coords.max(axis=0) + patch, array.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return TrainingCase(
        case_id,
        np.ascontiguousarray(array[region]),
        np.ascontiguousarray(mask[region]),
        (coords - lo).astype(np.int32),
    )


def coarse_origin(shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniformly random patch corner anywhere in the volume."""
    return tuple(int(rng.integers(0, s - patch + 1)) for s in shape)  # type: ignore[return-value]


def centred_origin(voxel: np.ndarray, shape: tuple[int, ...], patch: int) -> tuple[int, int, int]:
    """The patch corner that centres the patch on `voxel`, moved inside the volume."""
    corner = np.clip(np.asarray(voxel) - patch // 2, 0, np.asarray(shape) - patch)
    return tuple(int(c) for c in corner)  # type: ignore[return-value]


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
    """Augmented training patches of one stage from cases held in memory.

    It counts the label voxels it hands out, so the training log can show how much organ the
    model sees (`take_foreground_share`).
    """

    def __init__(self, cases: list[TrainingCase], stage: str, patch: int, rng: np.random.Generator,
                 foreground_share: float = 0.0) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        if stage == "fine" and any(case.organ is None for case in cases):
            raise ValueError("the fine sampler needs cases prepared for the fine stage (organ voxels)")
        if not 0.0 <= foreground_share <= 1.0:
            raise ValueError(f"foreground_share must be in [0, 1], not {foreground_share}")
        self.cases, self.stage, self.patch, self.rng = cases, stage, patch, rng
        self.foreground_share = foreground_share if stage == "coarse" else 0.0
        # Coarse cases keep their whole volume; their organ voxels are listed only when needed.
        self.organ = {id(c): np.argwhere(c.label) for c in cases} if self.foreground_share else {}
        self.voxels = np.zeros(2, dtype=np.int64)  # [foreground, all] handed out since the last take

    def origin(self, case: TrainingCase) -> tuple[int, int, int]:
        if case.organ is not None and self.stage == "fine":
            return fine_origin(case.organ, case.image.shape, self.patch, self.rng)
        organ = self.organ.get(id(case))
        if organ is not None and len(organ) and self.rng.random() < self.foreground_share:
            return centred_origin(organ[self.rng.integers(len(organ))], case.image.shape, self.patch)
        return coarse_origin(case.image.shape, self.patch, self.rng)

    def take_foreground_share(self) -> tuple[int, int]:
        """(foreground voxels, all voxels) in the patches handed out since the last call."""
        counts = (int(self.voxels[0]), int(self.voxels[1]))
        self.voxels[:] = 0
        return counts

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
        self.voxels += (np.count_nonzero(labels), labels.size)
        return images, labels


# --------------------------------------------------------------------------- case loading


def load_case(case: dict[str, Any]) -> tuple[Volume, Volume]:
    """(image, label) Volumes of a case row {case_id, image_uri, label_uri}; InputError names the
    case when either cannot be read."""
    try:
        return read_volume(case["image_uri"]), read_volume(case["label_uri"])
    except InputError as err:
        raise InputError(case["case_id"], f"unreadable: {err}") from err
    except Exception as err:  # any reader failure skips this case, never the run
        raise InputError(case["case_id"], f"unreadable: {type(err).__name__}: {err}") from err


def load_training_cases(cases: list[dict[str, Any]], config: TrainConfig) -> tuple[list[TrainingCase], list[dict[str, str]]]:
    """Load and prepare case rows; the ones that cannot be used come back as {case_id, reason}."""
    loaded: list[TrainingCase] = []
    skipped: list[dict[str, str]] = []
    for case in cases:
        try:
            image, label = load_case(case)
            loaded.append(prepare_case(case["case_id"], image, label, config.stage, config.model.patch, config.preprocess))
        except InputError as err:
            skipped.append({"case_id": case["case_id"], "reason": err.reason})
    return loaded, skipped


def load_validation_cases(cases: list[dict[str, Any]]) -> tuple[list[ValidationCase], list[dict[str, str]]]:
    """Load held-out case rows; unreadable ones, labels off the image's grid and empty labels
    (nothing to score) come back as {case_id, reason}."""
    loaded: list[ValidationCase] = []
    skipped: list[dict[str, str]] = []
    for case in cases:
        try:
            image, label = load_case(case)
            check_same_grid(label, image.shape, image.affine)
            mask = np.asarray(label.array > 0, dtype=np.uint8)
            if not mask.any():
                raise InputError(case["case_id"], "label is empty: nothing to score")
            loaded.append(ValidationCase(case["case_id"], image, mask))
        except InputError as err:
            skipped.append({"case_id": case["case_id"], "reason": f"validation: {err.reason}"})
    return loaded, skipped
