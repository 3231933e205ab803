"""Post-processing of a binary prediction (paper Sec. 4.2, 4.3).

Small isolated predictions are mostly false positives: a component smaller than a fraction
of all predicted foreground is dropped (0.2 on NIH, 0.05 on JHMI).
"""

from __future__ import annotations

import cc3d
import numpy as np

from resdsn_ray.boxes import bounding_box
from resdsn_ray.config import STATUS_NO_ORGAN, STATUS_OK


def remove_small_components(mask: np.ndarray, ratio: float) -> np.ndarray:
    """`mask` without the 26-connected components smaller than `ratio` x all foreground.

    A component is kept when its size >= ratio * total; ratio 0 keeps all, an empty mask stays
    empty. Labelling runs on the foreground's bounding box only, with cc3d (connected-
    components-3d), which labels large volumes several times faster than scipy.ndimage.label.
    Returns a new bool array of the same shape.
    """
    if mask.ndim != 3:
        raise ValueError(f"remove_small_components needs a 3-D mask, got shape {mask.shape}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask, margin=0)
    if box is None:
        return out
    region = np.ascontiguousarray(mask[box.slices], dtype=bool)
    labels = cc3d.connected_components(region, connectivity=26)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= ratio * sizes[1:].sum()
    keep[0] = False
    out[box.slices] = keep[labels]
    return out


def finish_mask(mask: np.ndarray, post_ratio: float) -> tuple[np.ndarray, str]:
    """The final uint8 mask (small components dropped) and its status (ok / no_organ)."""
    final = remove_small_components(mask, post_ratio)
    return final.astype(np.uint8), STATUS_OK if final.any() else STATUS_NO_ORGAN
