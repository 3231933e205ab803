"""Pictures of a case for people: CT slices in grey with the masks coloured over them, turned for
the screen. Shared by the report's QA overlays and the per-case preview PNGs.

Voxel arrays are in nibabel's (i, j, k) order with RAS+ affines, so a slice is turned for the
screen from its affine, not from the array order: the in-plane axis nearer world x
(left-right) runs along screen columns (else the one nearer y), the other along rows, and every
screen axis runs towards the negative RAS direction. For an axial slice that is the radiological
convention: the patient's right on the left of the screen, anterior at the top; coronal and
sagittal slices get superior at the top. Pixels are scaled to the voxel spacing.
"""

from __future__ import annotations

import io
import math

import matplotlib.image
import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window for the grey CT
ALPHA = 0.5  # weight of the overlay colour over the CT
GROUND_TRUTH, PREDICTION, OVERLAP = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)  # red, green, yellow
MIN_SIDE_PX = 256  # small phantoms are enlarged by whole pixels per voxel up to this
PLANES = ("axial", "coronal", "sagittal")  # slices across voxel axis k, j, i (for a usual CT stack)


def coloured(image: np.ndarray, label: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """RGB floats in [0, 1] of same-shaped arrays: CT in grey, ground truth red, prediction green,
    both yellow (no label: the prediction alone, green)."""
    low, high = WINDOW_HU
    grey = np.clip((image.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    pred = mask > 0
    truth = label > 0 if label is not None else np.zeros_like(pred)
    for region, colour in ((truth & ~pred, GROUND_TRUTH), (pred & ~truth, PREDICTION), (truth & pred, OVERLAP)):
        rgb[region] = (1 - ALPHA) * rgb[region] + ALPHA * np.asarray(colour)
    return rgb


def overlay(image: np.ndarray, label: np.ndarray | None, mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, int]:
    """The RGB picture of the k slice with the largest ground-truth area (no label: the largest
    predicted area), and that k."""
    k = int(np.argmax(np.count_nonzero(label if label is not None else mask, axis=(0, 1))))
    return for_screen(coloured(image[:, :, k], None if label is None else label[:, :, k], mask[:, :, k]), affine), k


def plane(volume: np.ndarray, affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice `index` across voxel `axis` of an (i, j, k, ...) array, turned for the screen."""
    kept = [a for a in range(3) if a != axis]
    turned = affine[:, [*kept, axis, 3]]  # the slice's two voxel axes first, as `for_screen` reads them
    return for_screen(np.take(volume, index, axis=axis), turned)


def for_screen(slice_ij: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An (i, j, ...) slice turned and flipped for display (see the module docstring), scaled to
    the voxel spacing by whole pixels; `affine`'s first two columns are the slice's axes."""
    ornt = nib.orientations.io_orientation(affine)  # per voxel axis: (world axis, +1/-1)
    rows_axis, cols_axis = (0, 1) if ornt[0, 0] > ornt[1, 0] else (1, 0)
    picture = np.moveaxis(slice_ij, (rows_axis, cols_axis), (0, 1))
    for screen_axis, voxel_axis in enumerate((rows_axis, cols_axis)):
        if ornt[voxel_axis, 1] > 0:
            picture = np.flip(picture, screen_axis)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[[rows_axis, cols_axis]]
    scale = max(1, math.ceil(MIN_SIDE_PX / min(picture.shape[:2])))
    for screen_axis, size in enumerate(spacing):
        picture = np.repeat(picture, max(1, round(scale * size / spacing.min())), axis=screen_axis)
    return picture


def centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the mask's centre of mass, rounded (the volume's centre for an empty mask)."""
    if not mask.any():
        return tuple(s // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(float(c))) for c in np.argwhere(mask > 0).mean(axis=0))  # type: ignore[return-value]


def planes(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """The axial, coronal and sagittal pictures through the mask's centre (prediction in green),
    each with where it lies (`k = 12`)."""
    rgb = coloured(image, None, mask)
    at = centre(mask)
    out = {}
    for name, world_axis in zip(PLANES, (2, 1, 0)):
        axis = _crossed(affine, world_axis)
        out[name] = (plane(rgb, affine, axis, at[axis]), f"{'ijk'[axis]} = {at[axis]}")
    return out


def preview(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, title: str = "") -> bytes:
    """PNG of three orthogonal slices through the mask's centre, the prediction in green over
    the CT (like TotalSegmentator's --preview): a look at an unlabelled case without a viewer."""
    figure = Figure(figsize=(12, 4.4), dpi=100)
    for n, (name, (picture, where)) in enumerate(planes(image, mask, affine).items()):
        ax = figure.add_subplot(1, 3, n + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(f"{name} ({where})", fontsize="small")
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _crossed(affine: np.ndarray, world_axis: int) -> int:
    """The voxel axis nearest world axis `world_axis` (0 x, 1 y, 2 z): its slices are that plane."""
    ornt = nib.orientations.io_orientation(affine)
    return int(np.flatnonzero(ornt[:, 0] == world_axis)[0])


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.ascontiguousarray(picture), format="png")
    return buffer.getvalue()
