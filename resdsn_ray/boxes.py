"""Crop / DeCrop (paper Eq. 4, 5): boxes of voxels around a mask and putting a sub-volume back.

numpy only: the CPU tasks that put masks back on the image's grid, the post-processing and the
metrics use boxes without importing torch (1.3 s and ~200 MiB per worker process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A box of voxels [start, stop) per axis; stop is exclusive, like Python slices."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3:
            raise ValueError(f"Box needs 3-D start and stop, got {self.start}, {self.stop}")
        if any(a < 0 or b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"Box needs 0 <= start < stop on every axis, got {self.start}, {self.stop}")

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def to_list(self) -> list[int]:
        """[x0, y0, z0, x1, y1, z1] as plain ints, for JSON and a Parquet list column."""
        return [int(v) for v in (*self.start, *self.stop)]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Box:
        """Inverse of `to_list`."""
        if len(values) != 6:
            raise ValueError(f"Box.from_list needs 6 integers, got {list(values)}")
        v = [int(x) for x in values]
        return cls(start=(v[0], v[1], v[2]), stop=(v[3], v[4], v[5]))


def bounding_box(mask: np.ndarray, margin: int) -> Box | None:
    """Box of the nonzero voxels plus `margin` voxels per side, clipped to the volume (Eq. 4).

    None when the mask is empty: there is nothing to crop around.
    """
    if mask.ndim != 3:
        raise ValueError(f"bounding_box needs a 3-D mask, got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    start: list[int] = []
    stop: list[int] = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=others))
        if hit.size == 0:
            return None
        start.append(max(int(hit[0]) - margin, 0))
        stop.append(min(int(hit[-1]) + 1 + margin, mask.shape[axis]))
    return Box(start=tuple(start), stop=tuple(stop))  # type: ignore[arg-type]


def decrop(sub: np.ndarray, box: Box, shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """`sub` put back at `box` in a new array of `shape` filled with `fill` (Eq. 5).

    The box covers every foreground voxel of the coarse mask it came from, so filling the
    rest with 0 equals the paper's replacement of that box inside the coarse mask.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(sub.shape) != box.shape:
        raise ValueError(f"decrop: sub-volume shape {tuple(sub.shape)} differs from box shape {box.shape}")
    if len(shape) != 3 or any(b > s for b, s in zip(box.stop, shape)):
        raise ValueError(f"decrop: box {box.to_list()} does not fit in shape {shape}")
    out = np.full(shape, fill, dtype=sub.dtype)
    out[box.slices] = sub
    return out
