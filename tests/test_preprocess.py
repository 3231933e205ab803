"""HU window and z-score: bounds, statistics, degenerate inputs, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from resdsn_ray.config import PreprocessConfig
from resdsn_ray.errors import InputError
from resdsn_ray.preprocess import preprocess


def _ct(shape=(64, 64, 40), seed=0) -> np.ndarray:
    """int16 HU with air, fat, soft tissue and bone, like a CT volume."""
    rng = np.random.default_rng(seed)
    levels = rng.choice([-1000, -100, 40, 80, 700], size=shape)
    return (levels + rng.normal(0, 30, size=shape)).astype(np.int16)


def test_clip_only_keeps_window_values_and_clips_the_rest():
    image = _ct()
    out = preprocess(image, PreprocessConfig(zscore=False))
    assert out.dtype == np.float32
    assert out.min() == -100.0 and out.max() == 240.0
    inside = (image >= -100) & (image <= 240)
    np.testing.assert_array_equal(out[inside], image[inside].astype(np.float32))
    assert np.all(out[image < -100] == -100.0) and np.all(out[image > 240] == 240.0)


def test_custom_window():
    out = preprocess(_ct(), PreprocessConfig(hu_min=0.0, hu_max=100.0, zscore=False))
    assert out.min() == 0.0 and out.max() == 100.0


def test_zscore_gives_zero_mean_unit_std_and_matches_float64_reference():
    image = _ct(shape=(96, 96, 41))  # many accumulation chunks, the last one partial
    out = preprocess(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(out.mean(dtype=np.float64)) < 1e-5
    assert abs(out.std(dtype=np.float64) - 1.0) < 1e-5
    clipped = np.clip(image.astype(np.float64), -100, 240)
    reference = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_input_is_not_modified():
    image = _ct().astype(np.float32)
    before = image.copy()
    preprocess(image)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("value", [0, -1000, 3000])
def test_constant_image_gives_zeros_not_nan(value):
    """Constant inside the window, or clipped flat at either bound."""
    out = preprocess(np.full((16, 16, 8), value, dtype=np.int16))
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_nan_is_refused_with_the_source_named():
    image = _ct().astype(np.float32)
    image[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="scan-7") as caught:
        preprocess(image, source="scan-7")
    assert "NaN" in caught.value.reason
    with pytest.raises(InputError):
        preprocess(image, PreprocessConfig(zscore=False), source="scan-7")


def test_infinities_are_clipped_like_any_extreme_value():
    image = _ct().astype(np.float32)
    image[0, 0, 0], image[1, 1, 1] = np.inf, -np.inf
    out = preprocess(image, PreprocessConfig(zscore=False))
    assert out[0, 0, 0] == 240.0 and out[1, 1, 1] == -100.0


def test_empty_image_is_refused():
    with pytest.raises(InputError, match="empty"):
        preprocess(np.zeros((0, 4, 4), dtype=np.int16), source="empty.nii.gz")


def test_empty_window_is_a_settings_error():
    """Refused when the settings are made, by the field's name: no case ever sees it."""
    with pytest.raises(InputError, match="hu_max: must be above hu_min"):
        PreprocessConfig(hu_min=240.0, hu_max=-100.0)


def test_peak_memory_is_one_float32_copy():
    """No float64 volume (or second float32 one) is ever made: the peak stays well under
    twice the float32 output size."""
    image = _ct(shape=(160, 160, 96))
    float32_bytes = image.size * 4
    tracemalloc.start()
    try:
        out = preprocess(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == float32_bytes
    assert peak < 1.25 * float32_bytes
