"""Deterministic CT-like abdominal phantoms with one small pancreas-like organ.

They stand in for a labelled pancreas archive in demos, tests, benchmarks and demo-model
training, so they keep what makes the real task hard: a small, curved, elongated organ whose HU
overlaps its neighbours (a duodenum-like tube hugging its head, veins along its back, liver,
bowel walls), so a model must use shape and context, not a threshold.

Anatomy is drawn from the seed in a patient frame in millimetres (x to the patient's right,
y anterior, z superior; the organ sits near z = 0) and is independent of the voxel grid: the
same seed gives the same patient at any `shape`. The grid is drawn from the seed too: a field
of view divided by `shape` (0.7-0.85 mm in-plane at 512x512), an orientation (70 % RAS, the
rest LPS, one flipped axis or a slightly oblique RAS grid) and a table offset. The voxel array
always matches the affine, so in world space the anatomy stays put whatever the orientation.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from resdsn_ray import io, storage

DEFAULT_SHAPE = (96, 96, 64)
# Orientations as nibabel axis codes: the world direction each voxel axis increases towards.
_FLIPS = {"R": False, "L": True, "A": False, "P": True, "S": False, "I": True}
_NOISE_KERNEL = np.exp(-0.5 * (np.arange(-2, 3) / 0.8) ** 2)
_NOISE_KERNEL /= _NOISE_KERNEL.sum()
_UNIFORM_INT8_STD = float(np.sqrt((256**2 - 1) / 12))


def make_case(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (image int16 HU [i, j, k], label uint8 {0, 1}, affine voxel -> RAS+ mm).

    `spacing` (mm along i, j, k) overrides the seed's field of view. `orientation` forces an
    axis code such as "RAS" (canonical), "LPS" or "RAI" on an axis-aligned grid; by default the
    seed picks one. All forced orientations of a seed sample the same world points.
    """
    shape = _check_shape(shape)
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing}")
    anatomy_seq, grid_seq, noise_seq = np.random.SeedSequence(_check_seed(seed)).spawn(3)
    rng = np.random.default_rng(anatomy_seq)
    body = _Body.draw(rng)
    grid, flips, offset = _draw_grid(np.random.default_rng(grid_seq), body, shape, spacing)
    if orientation is not None:
        flips = _parse_orientation(orientation)
        grid = _Grid(shape, _axis_aligned(grid))
    scene = _Scene(grid)
    _paint_anatomy(scene, body, rng)
    _add_noise(scene.image, np.random.default_rng(noise_seq), sigma=rng.uniform(10.0, 20.0))
    image = np.clip(np.rint(scene.image, out=scene.image), -1024, 3071).astype(np.int16)
    label = scene.label
    affine = grid.affine.copy()
    for axis, flip in enumerate(flips):
        if flip:
            image, label = np.flip(image, axis), np.flip(label, axis)
            affine[:, 3] = affine @ np.eye(4)[axis] * (shape[axis] - 1) + affine[:, 3]
            affine[:, axis] *= -1
    affine[:3, 3] += offset
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case `index` in an archive generated with `seed`."""
    sequence = np.random.SeedSequence([_check_seed(seed), _check_seed(index)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def write_archive(
    out_uri: str, cases: int, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE
) -> list[dict]:
    """Write `cases` phantoms under `out_uri` in MSD layout; the case dicts written.

    `imagesTr/case_XXXX.nii.gz` (int16 HU), `labelsTr/case_XXXX.nii.gz` (uint8) and
    `dataset.json`. Case i is `make_case(case_seed(seed, i), shape)`, so an archive's first
    cases do not depend on how many are written.
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    shape = _check_shape(shape)
    written = []
    for index in range(cases):
        case_id = f"case_{index:04d}"
        image, label, affine = make_case(case_seed(seed, index), shape)
        image_uri = storage.join(out_uri, "imagesTr", f"{case_id}.nii.gz")
        label_uri = storage.join(out_uri, "labelsTr", f"{case_id}.nii.gz")
        io.write_nifti(image_uri, image, affine)
        io.write_nifti(label_uri, label, affine)
        written.append({"case_id": case_id, "image_uri": image_uri, "label_uri": label_uri})
    dataset = {
        "name": "SyntheticPancreas",
        "description": "CT-like abdominal phantoms with one pancreas-like organ (resdsn_ray.synthetic)",
        "reference": "resdsn_ray.synthetic",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas"},
        "numTraining": cases,
        "numTest": 0,
        "training": [
            {
                "image": f"./imagesTr/{case['case_id']}.nii.gz",
                "label": f"./labelsTr/{case['case_id']}.nii.gz",
            }
            for case in written
        ],
        "test": [],
        "seed": seed,
        "shape": list(shape),
    }
    storage.write_text(storage.join(out_uri, "dataset.json"), json.dumps(dataset, indent=2) + "\n")
    return written


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(int(s) for s in shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _parse_orientation(code: str) -> tuple[bool, bool, bool]:
    code = code.upper()
    if len(code) != 3 or any(c not in pair for c, pair in zip(code, ("RL", "AP", "SI"))):
        raise ValueError(f"orientation must be an axis code like RAS, LPS or RAI, got {code!r}")
    return tuple(_FLIPS[c] for c in code)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class _Grid:
    """Voxel grid in the patient frame: `affine` maps (i, j, k, 1) to patient millimetres."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """The voxel index box covering the patient-frame box [lo, hi], or None if off-grid."""
        corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=np.float64)
        ijk = np.linalg.solve(self.affine[:3, :3], (corners - self.affine[:3, 3]).T).T
        start = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
        stop = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Patient x, y, z (float32) of the voxels in `box`, broadcastable to its shape.

        On an axis-aligned grid x depends on i alone etc., so these stay thin (n, 1, 1) arrays.
        """
        index = [
            np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            for axis, s in enumerate(box)
        ]
        out = []
        for row in range(3):
            value: np.ndarray | np.float32 = np.float32(self.affine[row, 3])
            for axis in range(3):
                if self.affine[row, axis] != 0:
                    value = value + np.float32(self.affine[row, axis]) * index[axis]
            out.append(np.asarray(value, dtype=np.float32).reshape(np.shape(value) or (1, 1, 1)))
        return out


def _axis_aligned(grid: _Grid) -> np.ndarray:
    """The same field of view and spacing as `grid`, without its rotation."""
    spacing = grid.spacing
    centre = grid.affine @ np.append((np.array(grid.shape) - 1) / 2, 1)
    return _grid_affine(np.eye(3), spacing, centre[:3], grid.shape)


def _grid_affine(rotation: np.ndarray, spacing: np.ndarray, centre: np.ndarray, shape: tuple) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def _draw_grid(
    rng: np.random.Generator, body: _Body, shape: tuple[int, int, int], spacing
) -> tuple[_Grid, tuple[bool, bool, bool], np.ndarray]:
    """Field of view, orientation and table offset of one scan."""
    fov_xy = (2 * max(body.a, body.b + abs(body.cy)) + 30) * rng.uniform(1.0, 1.2)
    fov_z = rng.uniform(130.0, 180.0)
    centre = np.array([rng.uniform(-8, 8), body.cy + rng.uniform(-8, 8), rng.uniform(-10, 20)])
    if spacing is None:
        in_plane = fov_xy / min(shape[0], shape[1])
        spacing = (in_plane, in_plane, fov_z / shape[2])
    draw = rng.uniform()
    rotation = np.eye(3)
    flips = (False, False, False)
    if draw < 0.70:
        pass
    elif draw < 0.85:
        flips = (True, True, False)
    elif draw < 0.95:
        flips = tuple(axis == rng.integers(3) for axis in range(3))  # type: ignore[assignment]
    else:
        axis = rng.normal(size=3)
        rotation = _rotation(axis / np.linalg.norm(axis), np.radians(rng.uniform(3, 10)))
    offset = np.array([rng.uniform(-40, 40), rng.uniform(-60, 60), rng.uniform(-800, -100)])
    grid = _Grid(shape, _grid_affine(rotation, np.asarray(spacing, dtype=np.float64), centre, shape))
    return grid, flips, offset  # type: ignore[return-value]


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# ---------------------------------------------------------------------------------- scene


class _Scene:
    """The image being painted (float32 HU) and the organ label, on one grid.

    Structures are signed distance fields in mm (negative inside) painted in order with a
    linear partial-volume ramp one voxel wide; the label is where the organ's field is < 0,
    i.e. where it covers more than half of a voxel.
    """

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.edge = float(np.mean(grid.spacing))
        self.image = np.empty(grid.shape, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def field(self, lo, hi, margin: float = 0.0):
        """(box, x, y, z) of the grid part within `margin` + one voxel of the box [lo, hi]."""
        pad = margin + self.edge
        box = self.grid.block(np.asarray(lo) - pad, np.asarray(hi) + pad)
        return None if box is None else (box, *self.grid.coords(box))

    def paint(self, box, dist: np.ndarray, hu: float) -> None:
        _blend(self.image[box], dist, hu, self.edge)


def _blend(view: np.ndarray, dist: np.ndarray, hu: float, edge: float) -> None:
    alpha = np.clip(0.5 - dist * np.float32(1.0 / edge), 0.0, 1.0)
    view += alpha * (np.float32(hu) - view)


def _ellipse(x, y, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse in the axial plane (an infinite cylinder)."""
    return _ellipsoid_terms([(x - np.float32(centre[0])), (y - np.float32(centre[1]))], axes)


def _ellipsoid(x, y, z, centre, axes, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid turned by `angle` about z."""
    dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = c * dx + s * dy, c * dy - s * dx
    return _ellipsoid_terms([dx, dy, dz], axes)


def _ellipsoid_terms(offsets, axes) -> np.ndarray:
    """(q - 1) / |grad q| with q the normalised radius: exact on the surface, smooth near it."""
    q2 = sum((d * np.float32(1 / a)) ** 2 for d, a in zip(offsets, axes))
    g2 = sum((d * np.float32(1 / a**2)) ** 2 for d, a in zip(offsets, axes))
    q = np.sqrt(q2)
    grad = np.sqrt(g2) / np.maximum(q, np.float32(1e-6))
    grad = np.clip(grad, np.float32(1 / max(axes)), np.float32(1 / min(axes)))
    return (q - 1) / grad


def _tube(scene: _Scene, points: np.ndarray, radii: np.ndarray, margin: float = 0.0):
    """(box, dist) of a tube of varying radius along a polyline, or None if off-grid."""
    reach = float(radii.max()) + margin
    field = scene.field(points.min(axis=0) - reach, points.max(axis=0) + reach)
    if field is None:
        return None
    box = field[0]
    dist = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        pad = max(ra, rb) + margin + scene.edge
        sub = scene.grid.block(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if sub is None:
            continue
        sub = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(sub, box))
        if any(s.stop <= s.start for s in sub):
            continue
        x, y, z = scene.grid.coords(sub)
        ab = (b - a).astype(np.float32)
        length2 = max(float(ab @ ab), 1e-12)
        ax, ay, az = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
        t = np.clip((ax * ab[0] + ay * ab[1] + az * ab[2]) * np.float32(1 / length2), 0, 1)
        d = np.sqrt((ax - t * ab[0]) ** 2 + (ay - t * ab[1]) ** 2 + (az - t * ab[2]) ** 2)
        d -= np.float32(ra) + t * np.float32(rb - ra)
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, box))
        np.minimum(dist[local], d, out=dist[local])
    return box, dist


def _bezier(control: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and unit tangents of a cubic Bezier curve at evenly spaced parameters."""
    t = np.linspace(0, 1, samples)[:, None]
    p0, p1, p2, p3 = control
    points = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    tangent = 3 * (1 - t) ** 2 * (p1 - p0) + 6 * (1 - t) * t * (p2 - p1) + 3 * t**2 * (p3 - p2)
    return points, tangent / np.linalg.norm(tangent, axis=1, keepdims=True)


def _add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> None:
    """Add CT-like in-plane correlated noise of standard deviation `sigma` HU.

    Uniform int8 draws smoothed by a 5x5 gaussian: several times cheaper than normal draws at
    512x512x300 and gaussian enough after smoothing. Done in slabs along k to bound memory.
    """
    gain = np.float32(sigma / (_UNIFORM_INT8_STD * float(np.sum(_NOISE_KERNEL**2))))
    nx, ny, nz = image.shape
    slab = max(1, (1 << 22) // (nx * ny))
    for k in range(0, nz, slab):
        draw = rng.integers(-128, 128, size=(nx, ny, min(slab, nz - k)), dtype=np.int16)
        noise = ndimage.correlate1d(draw.astype(np.float32) + np.float32(0.5), _NOISE_KERNEL, axis=0)
        ndimage.correlate1d(noise, _NOISE_KERNEL, axis=1, output=noise)
        noise *= gain
        image[:, :, k : k + noise.shape[2]] += noise


