"""Small-component removal on hand-made components with known sizes."""

from __future__ import annotations

import numpy as np
import pytest

from resdsn_ray.postprocess import remove_small_components


def three_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Components of 100, 30 and 5 voxels, two empty voxels apart."""
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    big = (slice(1, 6), slice(1, 6), slice(1, 5))  # 5 x 5 x 4 = 100
    mid = (slice(8, 13), slice(8, 11), slice(8, 10))  # 5 x 3 x 2 = 30
    small = (slice(15, 20), slice(15, 16), slice(15, 16))  # 5 x 1 x 1 = 5
    for region in (big, mid, small):
        mask[region] = 1
    parts = []
    for region in (big, mid, small):
        part = np.zeros(mask.shape, dtype=bool)
        part[region] = True
        parts.append(part)
    return mask, parts[0], parts[1], parts[2]


def test_ratio_drops_components_below_a_share_of_all_foreground() -> None:
    mask, big, mid, small = three_blobs()
    assert mask.sum() == 135
    # 0.2 x 135 = 27: keeps 100 and 30, drops 5
    out = remove_small_components(mask, 0.2)
    assert out.dtype == bool and out.shape == mask.shape
    np.testing.assert_array_equal(out, big | mid)
    # 0.25 x 135 = 33.75: keeps only 100
    np.testing.assert_array_equal(remove_small_components(mask, 0.25), big)
    # 0.05 x 135 = 6.75: still drops the 5-voxel one
    np.testing.assert_array_equal(remove_small_components(mask, 0.05), big | mid)
    # 0.03 x 135 = 4.05: keeps everything
    np.testing.assert_array_equal(remove_small_components(mask, 0.03), big | mid | small)


def test_ratio_zero_keeps_all_and_empty_stays_empty() -> None:
    mask, *_ = three_blobs()
    np.testing.assert_array_equal(remove_small_components(mask, 0.0), mask.astype(bool))
    empty = remove_small_components(np.zeros((5, 6, 7), dtype=bool), 0.2)
    assert empty.shape == (5, 6, 7) and not empty.any()


def test_corner_touching_voxels_form_one_26_component() -> None:
    mask = np.zeros((30, 30, 30), dtype=bool)
    mask[0:5, 0:5, 0:4] = True  # 100 voxels
    for i in range(10):  # 10 voxels touching only at corners: 10 singletons under 6-connectivity
        mask[15 + i, 15 + i, 15 + i] = True
    # total 110, 0.05 x 110 = 5.5: the diagonal line (10) survives as one component
    np.testing.assert_array_equal(remove_small_components(mask, 0.05), mask)
    # 0.1 x 110 = 11: now it is too small
    out = remove_small_components(mask, 0.1)
    assert out.sum() == 100 and out[0:5, 0:5, 0:4].all()


def test_equal_sized_components_are_all_kept_at_the_threshold() -> None:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0:2, 0:2, 0:2] = True
    mask[5:7, 5:7, 5:7] = True
    # each is exactly 0.5 of the foreground: "smaller than" does not apply
    np.testing.assert_array_equal(remove_small_components(mask, 0.5), mask)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_ratio_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError):
        remove_small_components(np.ones((3, 3, 3), dtype=bool), ratio)
