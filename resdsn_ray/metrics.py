"""Per-case segmentation metrics: overlap from confusion counts, surface distances in mm.

Definitions (fixed so numbers compare across runs and with the literature):
- dsc = 2TP / (2TP + FP + FN), iou = TP / (TP + FP + FN), precision = TP / (TP + FP),
  recall = TP / (TP + FN); volumes in ml = voxels x prod(spacing) / 1000.
- Surface voxels: mask voxels with at least one of their 6 face neighbours outside the mask
  (mask minus its 6-connected erosion; outside the volume counts as background), as MONAI's
  and medpy's defaults.
- hd95_mm: max of the two directed 95th percentiles (numpy linear interpolation) of
  surface-to-surface distances, as MONAI `compute_hausdorff_distance(percentile=95)`.
- assd_mm: mean of the pooled distances of both directions (MONAI symmetric ASD).
- nsd_2mm: share of both surfaces' voxels within 2 mm (inclusive) of the other surface,
  counting boundary voxels (MONAI `compute_surface_dice` without sub-voxel areas).
Empty masks (MetricsReloaded's convention):
- both empty: a perfect answer -- dsc = iou = precision = recall = nsd = 1, hd95 = assd = 0;
- one empty: dsc = iou = nsd = 0; distances None (undefined, not infinite); precision is
  None when nothing was predicted (0 / 0) and 0 otherwise, recall is None when the reference
  is empty and 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from resdsn_ray.boxes import bounding_box
from resdsn_ray.errors import InputError

NSD_TOLERANCE_MM = 2.0
METRIC_KEYS = (
    "dsc",
    "iou",
    "precision",
    "recall",
    "hd95_mm",
    "assd_mm",
    "nsd_2mm",
    "pred_volume_ml",
    "ref_volume_ml",
)
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two binary masks of the same shape."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred surface voxel to ref's surface, and back.

    Both masks must be non-empty. Works on the union's bounding box padded by one voxel, so
    the cost follows the organ's size, not the scan's.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    box = bounding_box(pred | ref, margin=0)
    if box is None or not pred.any() or not ref.any():
        raise ValueError("surface_distances needs two non-empty masks")
    p = np.pad(pred[box.slices], 1)
    r = np.pad(ref[box.slices], 1)
    surf_p, surf_r = _surface(p), _surface(r)
    to_ref = ndimage.distance_transform_edt(~surf_r, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    return to_ref[surf_p], to_pred[surf_r]


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float | None]:
    """All metrics of one case; see the module docstring for definitions and empty rules."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise InputError(
            "reference mask",
            f"shape {ref.shape} does not match the prediction's {pred.shape}",
        )
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise InputError("spacing", f"needs three positive voxel sizes in mm, got {tuple(spacing)}")
    spacing = tuple(float(s) for s in spacing)
    tp, fp, fn = confusion_counts(pred, ref)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {
        "pred_volume_ml": (tp + fp) * voxel_ml,
        "ref_volume_ml": (tp + fn) * voxel_ml,
    }
    if tp + fp + fn == 0:
        perfect = {"dsc": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
        return {**perfect, "hd95_mm": 0.0, "assd_mm": 0.0, "nsd_2mm": 1.0, **volumes}
    overlap = {
        "dsc": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }
    if tp + fp == 0 or tp + fn == 0:
        return {**overlap, "hd95_mm": None, "assd_mm": None, "nsd_2mm": 0.0, **volumes}
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    pooled = np.concatenate([d_pred, d_ref])
    surface = {
        "hd95_mm": float(max(np.percentile(d_pred, 95), np.percentile(d_ref, 95))),
        "assd_mm": float(pooled.mean()),
        "nsd_2mm": float(np.count_nonzero(pooled <= NSD_TOLERANCE_MM) / pooled.size),
    }
    return {**overlap, **surface, **volumes}
