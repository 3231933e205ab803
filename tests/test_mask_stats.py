"""Mask statistics against values worked out by hand, on a RAS grid, an LPS (flipped) grid and an
oblique one: the volume uses the voxel size, the HU are the image's inside the mask, and the
bounding box is where the voxels lie in the world, whatever the affine."""

from __future__ import annotations

import numpy as np
import pytest

from resdsn_ray.mask_stats import STAT_KEYS, mask_stats


def case() -> tuple[np.ndarray, np.ndarray]:
    """A 2 x 3 x 1 block of voxels at i 1..2, j 2..4, k 3 with HU 10, 20, ..., 60."""
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1:3, 2:5, 3] = 1
    image = np.full(mask.shape, -1000.0, np.float32)
    image[1:3, 2:5, 3] = np.arange(10, 70, 10).reshape(2, 3)
    return mask, image


def test_ras_grid():
    mask, image = case()
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    stats = mask_stats(mask, image, affine)
    assert stats["pred_volume_ml"] == pytest.approx(6 * 0.5 * 2.0 * 3.0 / 1000)
    assert stats["mask_hu_mean"] == pytest.approx(35.0)
    assert stats["mask_hu_std"] == pytest.approx(np.sqrt(np.mean((np.arange(10, 70, 10) - 35.0) ** 2)))
    # x: 10 + 0.5 * (1, 2); y: 20 + 2 * (2, 4); z: 30 + 3 * 3
    assert stats["bbox_ras_mm"] == pytest.approx([10.5, 24.0, 39.0, 11.0, 28.0, 39.0])


def test_lps_flipped_grid_gives_the_box_in_ras():
    mask, image = case()
    affine = np.diag([-0.5, -2.0, 3.0, 1.0])  # i runs to the right, j to the back (a DICOM series read as is)
    affine[:3, 3] = [100.0, 50.0, 0.0]
    stats = mask_stats(mask, image, affine)
    assert stats["pred_volume_ml"] == pytest.approx(6 * 0.5 * 2.0 * 3.0 / 1000)
    # x: 100 - 0.5 * (2, 1) = 99 .. 99.5; y: 50 - 2 * (4, 2) = 42 .. 46; z: 9
    assert stats["bbox_ras_mm"] == pytest.approx([99.0, 42.0, 9.0, 99.5, 46.0, 9.0])


def test_oblique_grid():
    mask, image = case()
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, 1.0, 2.0])
    stats = mask_stats(mask, image, affine)
    assert stats["pred_volume_ml"] == pytest.approx(6 * 2.0 / 1000)  # a rotation keeps the volume
    corners = np.array([[i, j, 3] for i in (1, 2) for j in (2, 4)], float) @ affine[:3, :3].T
    assert stats["bbox_ras_mm"] == pytest.approx([*corners.min(axis=0), *corners.max(axis=0)])
    assert stats["bbox_ras_mm"][0] == pytest.approx(c * 1 - s * 4)  # the lowest x: voxel (1, 4)


def test_empty_mask_has_no_hu_and_no_box():
    mask, image = case()
    stats = mask_stats(np.zeros_like(mask), image, np.eye(4))
    assert set(stats) == set(STAT_KEYS)
    assert stats == {"pred_volume_ml": 0.0, "mask_hu_mean": None, "mask_hu_std": None, "bbox_ras_mm": None}


def test_mask_off_the_image_grid_is_refused():
    mask, image = case()
    with pytest.raises(ValueError, match="mask shape"):
        mask_stats(mask[:4], image, np.eye(4))
