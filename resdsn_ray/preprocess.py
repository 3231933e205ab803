"""HU window and per-case z-score (paper Sec. 4.1), the only intensity transform the models see.

Training and inference both go through `preprocess`, so a model never meets intensities scaled
differently from the ones it learnt on. It runs once per case on whole volumes (512x512x300 is
78 M voxels), so it works in place on one float32 copy and never makes a float64 volume.
"""

from __future__ import annotations

import numpy as np

from resdsn_ray.config import PreprocessConfig
from resdsn_ray.errors import InputError

# Below this standard deviation (HU) a case counts as constant: it is centred, not scaled, so a
# blank or fully clipped volume becomes zeros instead of NaN or huge values.
MIN_STD = 1e-6
# Voxels per float32 dot product when summing squared deviations.
_CHUNK = 1 << 13


def preprocess(
    array: np.ndarray,
    config: PreprocessConfig = PreprocessConfig(),
    source: str = "<array>",
) -> np.ndarray:
    """A new float32 array: HU clipped to [hu_min, hu_max], then z-scored over the case.

    Mean and standard deviation are taken over the clipped volume, accumulated in float64.
    When the standard deviation is below `MIN_STD` the result is only centred (all zeros for a
    constant volume). The input is never modified. `source` names the input in errors.
    """
    if array.size == 0:
        raise InputError(source, f"empty image of shape {array.shape}")
    out = np.array(array, dtype=np.float32, copy=True)
    np.clip(out, config.hu_min, config.hu_max, out=out)  # NaN stays NaN, +-inf is clipped
    if not config.zscore:
        if np.isnan(out.mean(dtype=np.float64)):
            raise InputError(source, "image contains NaN")
        return out
    mean = float(out.mean(dtype=np.float64))
    if not np.isfinite(mean):
        raise InputError(source, "image contains NaN")
    out -= np.float32(mean)
    std = _rms(out)
    if std >= MIN_STD:
        out *= np.float32(1.0 / std)
    return out


def _rms(centred: np.ndarray) -> float:
    """Root mean square of a centred volume: float32 dot products over chunks small enough to
    keep ~1e-7 relative accuracy, summed in float64 (no float64 volume)."""
    flat = centred.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        total += float(np.dot(chunk, chunk))
    return float(np.sqrt(total / flat.size))


def prepare_inputs(
    array: np.ndarray, coarse: PreprocessConfig | None, fine: PreprocessConfig | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each stage's preprocessed input (None where the stage does not run); one array when the
    two bundles preprocess alike. Apart from the engine (no torch): it runs in a CPU task."""
    coarse_input = preprocess(array, coarse) if coarse is not None else None
    if fine is None:
        return coarse_input, None
    return coarse_input, coarse_input if fine == coarse else preprocess(array, fine)
