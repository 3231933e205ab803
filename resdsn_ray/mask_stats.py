"""Per-case statistics of a mask that need no label: useful on unlabelled archives, where no DSC
can be computed. Columns `STAT_KEYS` of the metrics rows (null where the mask is empty):

- `pred_volume_ml`: voxels x voxel volume (|det| of the affine's 3x3, so oblique grids count right);
- `mask_hu_mean`, `mask_hu_std`: HU of the raw image inside the mask (population std, ddof = 0);
- `bbox_ras_mm`: the mask's bounding box in world (RAS+) mm, `[x0, y0, z0, x1, y1, z1]` with
  x0 <= x1 ...: the world extent of the centres of the 8 corner voxels of its voxel bounding
  box, so a flipped (LPS) or oblique affine gives the box where the organ lies in the scanner.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

STAT_KEYS = ("pred_volume_ml", "mask_hu_mean", "mask_hu_std", "bbox_ras_mm")


def mask_stats(mask: np.ndarray, image: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """The `STAT_KEYS` of `mask` (any nonzero voxel counts) over `image` (HU) on grid `affine`."""
    inside = np.asarray(mask) != 0
    if inside.shape != image.shape:
        raise ValueError(f"mask shape {inside.shape} differs from the image's {image.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    count = int(np.count_nonzero(inside))
    volume_ml = count * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    if count == 0:
        return {"pred_volume_ml": 0.0, "mask_hu_mean": None, "mask_hu_std": None, "bbox_ras_mm": None}
    hu = np.asarray(image)[inside].astype(np.float64)
    lows, highs = _extent(inside)
    corners = np.array(list(itertools.product(*zip(lows, highs))), dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    box = [*world.min(axis=0), *world.max(axis=0)]
    return {"pred_volume_ml": volume_ml, "mask_hu_mean": float(hu.mean()), "mask_hu_std": float(hu.std()),
            "bbox_ras_mm": [float(v) for v in box]}


def _extent(inside: np.ndarray) -> tuple[list[int], list[int]]:
    """Lowest and highest voxel index of the mask along each axis."""
    lows, highs = [], []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        lows.append(int(hits[0]))
        highs.append(int(hits[-1]))
    return lows, highs
