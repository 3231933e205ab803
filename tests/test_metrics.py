"""Metrics on hand-made masks with known answers, and against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from resdsn_ray.errors import InputError
from resdsn_ray.metrics import METRIC_KEYS, case_metrics, confusion_counts


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int = 10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_force_surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float, float, float]:
    """hd95, assd, nsd(2 mm) from explicit point sets and all pairwise distances."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        exposed = np.zeros_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                exposed |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & exposed) * np.asarray(spacing)

    sp, sr = surface_points(pred), surface_points(ref)
    pairwise = cdist(sp, sr)
    d_pred, d_ref = pairwise.min(axis=1), pairwise.min(axis=0)
    pooled = np.concatenate([d_pred, d_ref])
    hd95 = max(np.percentile(d_pred, 95), np.percentile(d_ref, 95))
    return float(hd95), float(pooled.mean()), float(np.mean(pooled <= 2.0))


def test_confusion_counts() -> None:
    pred = cube((20, 20, 20), (0, 0, 0))
    ref = cube((20, 20, 20), (1, 0, 0))
    assert confusion_counts(pred, ref) == (900, 100, 100)


def test_identical_masks_are_perfect() -> None:
    mask = cube((30, 30, 30), (5, 6, 7))
    m = case_metrics(mask, mask, (0.7, 0.7, 1.5))
    assert tuple(m) == METRIC_KEYS
    assert m["dsc"] == m["iou"] == m["precision"] == m["recall"] == m["nsd_2mm"] == 1.0
    assert m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0


def test_one_voxel_shift_isotropic() -> None:
    pred = cube((20, 20, 20), (2, 3, 4))
    ref = cube((20, 20, 20), (3, 3, 4))
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0))
    # TP = 9 x 10 x 10 = 900, FP = FN = 100
    assert m["dsc"] == pytest.approx(1800 / 2000)
    assert m["iou"] == pytest.approx(900 / 1100)
    assert m["precision"] == pytest.approx(0.9) and m["recall"] == pytest.approx(0.9)
    # 488 surface voxels per cube; 100 (outer x face) + 64 (inner x face, not on a side) are 1 mm
    # away, the rest lie on the other cube's surface: hd95 = 1, assd = 2 x 164 / 976, nsd = 1
    assert m["hd95_mm"] == pytest.approx(1.0)
    assert m["assd_mm"] == pytest.approx(328 / 976)
    assert m["nsd_2mm"] == pytest.approx(1.0)


def test_thick_voxels_along_the_shift_axis() -> None:
    pred = cube((20, 20, 20), (2, 3, 4))
    ref = cube((20, 20, 20), (3, 3, 4))
    m = case_metrics(pred, ref, (3.0, 1.0, 1.0))
    # outer x face (100) at 3 mm; inner x face voxels at min(3, in-plane distance to a side) mm,
    # > 2 mm for the 4 x 4 = 16 with y, z in 3..6: 116 of 488 per cube beyond 2 mm
    assert m["hd95_mm"] == pytest.approx(3.0)
    assert m["nsd_2mm"] == pytest.approx(1 - 232 / 976)
    assert m["dsc"] == pytest.approx(0.9)


def test_anisotropic_shift_along_z_gives_the_z_spacing() -> None:
    spacing = (0.8, 0.8, 2.5)
    pred = cube((16, 16, 16), (3, 3, 3))
    ref = cube((16, 16, 16), (3, 3, 4))
    m = case_metrics(pred, ref, spacing)
    assert m["hd95_mm"] == pytest.approx(2.5)
    # volumes: 1000 voxels x 0.8 x 0.8 x 2.5 mm^3 = 1600 mm^3 = 1.6 ml
    assert m["pred_volume_ml"] == pytest.approx(1.6) and m["ref_volume_ml"] == pytest.approx(1.6)
    hd95, assd, nsd = brute_force_surface_metrics(pred, ref, spacing)
    assert m["hd95_mm"] == pytest.approx(hd95) and m["assd_mm"] == pytest.approx(assd)
    assert m["nsd_2mm"] == pytest.approx(nsd)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_surface_metrics_match_brute_force_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (24, 22, 18)
    grid = np.indices(shape).transpose(1, 2, 3, 0)

    def blob() -> np.ndarray:
        centre = rng.uniform(6, 14, size=3)
        radii = rng.uniform(3, 6, size=3)
        return (((grid - centre) / radii) ** 2).sum(axis=-1) <= 1.0

    pred, ref = blob(), blob()
    pred[tuple(rng.integers(0, 18, size=3))] = True  # a stray voxel
    spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, size=3))
    m = case_metrics(pred, ref, spacing)
    hd95, assd, nsd = brute_force_surface_metrics(pred, ref, spacing)
    assert m["hd95_mm"] == pytest.approx(hd95)
    assert m["assd_mm"] == pytest.approx(assd)
    assert m["nsd_2mm"] == pytest.approx(nsd)
    tp, fp, fn = confusion_counts(pred, ref)
    assert m["dsc"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_masks_touching_the_volume_border_treat_outside_as_background() -> None:
    spacing = (1.0, 1.5, 2.0)
    inside = case_metrics(cube((30, 30, 30), (10, 10, 10)), cube((30, 30, 30), (11, 10, 10)), spacing)
    at_border = case_metrics(cube((11, 10, 10), (0, 0, 0)), cube((11, 10, 10), (1, 0, 0)), spacing)
    assert at_border == pytest.approx(inside)


def test_empty_rules() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    full = cube((8, 8, 8), (2, 2, 2), size=3)
    both = case_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert both["dsc"] == both["iou"] == both["precision"] == both["recall"] == both["nsd_2mm"] == 1.0
    assert both["hd95_mm"] == 0.0 and both["assd_mm"] == 0.0 and both["pred_volume_ml"] == 0.0

    missed = case_metrics(empty, full, (1.0, 1.0, 2.0))
    assert missed["dsc"] == missed["iou"] == missed["recall"] == missed["nsd_2mm"] == 0.0
    assert missed["precision"] is None and missed["hd95_mm"] is None and missed["assd_mm"] is None
    assert missed["ref_volume_ml"] == pytest.approx(27 * 2 / 1000)

    spurious = case_metrics(full, empty, (1.0, 1.0, 1.0))
    assert spurious["dsc"] == spurious["precision"] == spurious["nsd_2mm"] == 0.0
    assert spurious["recall"] is None and spurious["hd95_mm"] is None


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="reference mask"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 0.0, 1.0))
