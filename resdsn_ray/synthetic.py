"""Deterministic CT-like abdominal phantoms with one small pancreas-like organ.

They stand in for a labelled pancreas archive in demos, tests, benchmarks and demo-model
training, so they keep what makes the real task hard: a small, curved, elongated organ whose HU
overlaps its neighbours (a duodenum-like tube hugging its head, veins along its back, liver,
bowel walls), so a model must use shape and context, not a threshold.

Anatomy is drawn from the seed in a patient frame in millimetres (x to the patient's right,
y anterior, z superior; the organ sits near z = 0) and is independent of the voxel grid: the
same seed gives the same patient at any `shape`. The grid is drawn from the seed too: a field
of view divided by `shape` (the whole body width, 0.7-0.85 mm in-plane at 512x512; 120-170 mm
along z, but no slice thinner than 0.7-1.0 mm, so a 300-slice scan covers 210-300 mm), an
orientation (70 % RAS, the rest LPS, one flipped axis, or a grid turned 3-10 degrees in the
axial plane) and a table offset. The voxel array always matches the affine: whatever the
orientation, the anatomy stays put in world space.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from resdsn_ray import storage, volumes
from resdsn_ray.config import DEFAULT_FAMILY, Family

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
    organ_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (image int16 HU [i, j, k], label uint8 {0, 1}, affine voxel -> RAS+ mm).

    `spacing` (mm along i, j, k) overrides the seed's field of view. `orientation` forces an
    axis code such as "RAS" (canonical), "LPS" or "RAI" on an axis-aligned grid; by default the
    seed picks one. All forced orientations of a seed sample the same world points.
    `organ_scale` multiplies the organ's radii (its neighbours follow it), draws unchanged.
    """
    shape = _check_shape(shape)
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing}")
    anatomy_seq, grid_seq, noise_seq = np.random.SeedSequence(_check_seed(seed)).spawn(3)
    rng = np.random.default_rng(anatomy_seq)
    body = _Body.draw(rng)
    scan = _Scan.draw(np.random.default_rng(grid_seq), body, shape, spacing)
    rotation, flips = scan.rotation, scan.flips
    if orientation is not None:
        rotation, flips = np.eye(3), _parse_orientation(orientation)
    grid = _Grid(shape, _grid_affine(rotation, scan.spacing, scan.centre, shape))
    scene = _Scene(grid, body.cavity)
    _paint_anatomy(scene, body, rng, organ_scale)
    _add_noise(scene.image, np.random.default_rng(noise_seq), sigma=rng.uniform(10.0, 20.0))
    image = np.clip(np.rint(scene.image, out=scene.image), -1024, 3071).astype(np.int16)
    label = scene.label
    affine = grid.affine.copy()
    for axis, flip in enumerate(flips):
        if flip:
            image, label = np.flip(image, axis), np.flip(label, axis)
            affine[:3, 3] += affine[:3, axis] * (shape[axis] - 1)
            affine[:3, axis] *= -1
    affine[:3, 3] += scan.offset
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


@dataclass(frozen=True)
class FamilySpec:
    """How the cases of one family are drawn: grid, voxel size, organ size, orientations.

    None leaves the choice to each case's seed (`make_case`'s defaults).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    organ_scale: float = 1.0
    lps_every: int = 0  # every n-th case (index n-1, 2n-1, ...) forced LPS; 0: never


FAMILIES: dict[Family, FamilySpec] = {
    # The project's quick phantoms: the whole body at 96x96x64, the organ 0.5-2 % of the body.
    "demo": FamilySpec(shape=DEFAULT_SHAPE),
    # Closer to a real archive (issue 13): a 154 x 154 x 160 mm field at 0.8 x 0.8 x 2.0 mm, the
    # organ's radii x 0.45 so it is 0.3-0.45 % of the voxels, duodenum, vessels and gassy bowel
    # against it, every third case LPS (the others as the seed draws: RAS, flipped or turned).
    "hard": FamilySpec(shape=(192, 192, 80), spacing=(0.8, 0.8, 2.0), organ_scale=0.45, lps_every=3),
}


def family_case(family: Family, seed: int, index: int,
                shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Case `index` of a `family` archive written with `seed` (`shape` overrides the family's grid)."""
    spec = FAMILIES[family]
    lps = spec.lps_every and (index + 1) % spec.lps_every == 0
    return make_case(case_seed(seed, index), shape or spec.shape, spec.spacing, "LPS" if lps else None,
                     spec.organ_scale)


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case `index` in an archive generated with `seed`."""
    sequence = np.random.SeedSequence([_check_seed(seed), _check_seed(index)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def write_archive(
    out_uri: str, cases: int, seed: int = 0, shape: tuple[int, int, int] | None = None, family: Family = DEFAULT_FAMILY
) -> list[dict]:
    """Write `cases` phantoms of a family under `out_uri` in MSD layout; the case dicts written.

    `imagesTr/case_XXXX.nii.gz` (int16 HU), `labelsTr/case_XXXX.nii.gz` (uint8) and
    `dataset.json`. Case i is `family_case(family, seed, i, shape)`, so an archive's first
    cases do not depend on how many are written.
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    shape = _check_shape(shape or FAMILIES[family].shape)
    written = []
    for index in range(cases):
        case_id = f"case_{index:04d}"
        image, label, affine = family_case(family, seed, index, shape)
        image_uri = storage.join(out_uri, "imagesTr", f"{case_id}.nii.gz")
        label_uri = storage.join(out_uri, "labelsTr", f"{case_id}.nii.gz")
        volumes.write_nifti(image_uri, image, affine)
        volumes.write_nifti(label_uri, label, affine)
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
        "family": family,
        "shape": list(shape),
    }
    storage.write_json(storage.join(out_uri, "dataset.json"), dataset)
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

    @functools.cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame box around the grid, so that long structures cost only what shows."""
        corners = np.array(list(itertools.product(*[(-1, n) for n in self.shape])), dtype=np.float64)
        world = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return world.min(axis=0), world.max(axis=0)

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """The voxel index box covering the patient-frame box [lo, hi], or None if off-grid."""
        lo, hi = np.maximum(lo, self.bounds[0]), np.minimum(hi, self.bounds[1])
        if np.any(hi < lo):
            return None
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
            weights = [np.float32(w) for w in self.affine[row, :3]]
            terms = [w * i for w, i in zip(weights, index) if w != 0]
            out.append(sum(terms[1:], terms[0]) + np.float32(self.affine[row, 3]))
        return out


def _grid_affine(rotation: np.ndarray, spacing: np.ndarray, centre: np.ndarray, shape: tuple) -> np.ndarray:
    """Voxel -> patient affine of a grid with these axes and voxel size, centred on `centre`."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


@dataclass(frozen=True)
class _Scan:
    """How one scan frames the patient: voxel size, field-of-view centre, orientation, and
    the table offset from the patient frame to the scanner's world frame."""

    spacing: np.ndarray
    centre: np.ndarray
    rotation: np.ndarray
    flips: tuple[bool, bool, bool]
    offset: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, body: _Body, shape: tuple[int, int, int],
             spacing: tuple[float, float, float] | None) -> _Scan:
        fov_xy = (2 * max(body.a, body.b + abs(body.cy)) + 30) * rng.uniform(1.0, 1.2)
        fov_z = rng.uniform(120.0, 170.0)
        centre = np.array([rng.uniform(-8, 8), body.cy + rng.uniform(-8, 8), rng.uniform(-10, 20)])
        thinnest = rng.uniform(0.7, 1.0)  # slices are rarely thinner, so long stacks see more
        if spacing is None:
            in_plane = fov_xy / min(shape[0], shape[1])
            spacing = (in_plane, in_plane, max(fov_z / shape[2], thinnest))
        draw = rng.uniform()
        rotation = np.eye(3)
        flips = (False, False, False)
        if 0.70 <= draw < 0.85:
            flips = (True, True, False)  # LPS
        elif 0.85 <= draw < 0.95:
            flipped = int(rng.integers(3))
            flips = (flipped == 0, flipped == 1, flipped == 2)
        elif draw >= 0.95:  # turned in the axial plane: a non-diagonal affine
            angle = np.radians(rng.uniform(3, 10)) * rng.choice([-1, 1])
            c, s = np.cos(angle), np.sin(angle)
            rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        offset = np.array([rng.uniform(-40, 40), rng.uniform(-60, 60), rng.uniform(-800, -100)])
        return cls(np.asarray(spacing, dtype=np.float64), centre, rotation, flips, offset)


# ---------------------------------------------------------------------------------- scene


class _Scene:
    """The image being painted (float32 HU) and the organ label, on one grid.

    Structures are signed distance fields in mm (negative inside) painted in order with a
    linear partial-volume ramp one voxel wide; the label is where the organ's field is < 0,
    i.e. where it covers more than half of a voxel.
    """

    def __init__(self, grid: _Grid, cavity) -> None:
        self.grid = grid
        self.cavity = cavity  # ((x, y), (half width, half depth)) of the abdominal cavity
        self.edge = float(np.mean(grid.spacing))
        self.image = np.empty(grid.shape, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def field(self, lo, hi):
        """(box, x, y, z) of the grid part within one voxel of the patient-frame box [lo, hi]."""
        box = self.grid.block(np.asarray(lo) - self.edge, np.asarray(hi) + self.edge)
        return None if box is None else (box, *self.grid.coords(box))

    def paint(self, box, dist: np.ndarray, hu: float) -> None:
        _blend(self.image[box], dist, hu, self.edge)

    def ellipsoid(self, centre: np.ndarray, axes, angle: float = 0.0):
        """(box, dist) of an ellipsoid turned by `angle` about z, or None if off-grid."""
        reach = max(axes)
        field = self.field(np.asarray(centre) - reach, np.asarray(centre) + reach)
        return None if field is None else (field[0], _ellipsoid(*field[1:], centre, axes, angle))

    def inside(self, box, dist: np.ndarray, inset: float = 2.0) -> np.ndarray:
        """`dist` cut to `inset` mm inside the abdominal cavity (organs hug its wall)."""
        x, y, _ = self.grid.coords(box)
        return np.maximum(dist, _ellipse(x, y, *self.cavity) + np.float32(inset))

    def tube(self, points: np.ndarray, radii: np.ndarray, margin: float = 0.0):
        """(box, dist) of a tube of varying radius along a polyline, or None if off-grid.

        The distance is exact for each segment's cone and computed only in its own box, so a
        long thin tube costs about its own volume; `margin` mm more of the field is kept.
        """
        reach = float(radii.max()) + margin
        field = self.field(points.min(axis=0) - reach, points.max(axis=0) + reach)
        if field is None:
            return None
        box = field[0]
        dist = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
        for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            pad = max(ra, rb) + margin + self.edge
            sub = self.grid.block(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
            if sub is None:
                continue
            sub = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(sub, box))
            x, y, z = self.grid.coords(sub)
            ab = (b - a).astype(np.float32)
            ax, ay, az = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
            scale = np.float32(1 / max(float(ab @ ab), 1e-12))
            t = np.clip((ax * ab[0] + ay * ab[1] + az * ab[2]) * scale, 0, 1)
            d = np.sqrt((ax - t * ab[0]) ** 2 + (ay - t * ab[1]) ** 2 + (az - t * ab[2]) ** 2)
            d -= np.float32(ra) + t * np.float32(rb - ra)
            local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, box))
            np.minimum(dist[local], d, out=dist[local])
        return box, dist


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
        draw = rng.integers(-128, 127, size=(nx, ny, min(slab, nz - k)), dtype=np.int8, endpoint=True)
        noise = draw.astype(np.float32)
        noise += np.float32(0.5)  # the draws' mean is -0.5
        ndimage.correlate1d(noise, _NOISE_KERNEL, axis=0, output=noise)
        ndimage.correlate1d(noise, _NOISE_KERNEL, axis=1, output=noise)
        noise *= gain
        image[:, :, k : k + noise.shape[2]] += noise


# -------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Body:
    """Axial body outline and abdominal cavity (mm); the organs are placed relative to it."""

    a: float  # half width
    b: float  # half depth
    cy: float  # centre, anterior offset
    fat_front: float  # subcutaneous fat in front (and behind)
    fat_side: float
    muscle: float  # abdominal wall
    back: float  # thickness of the back wall, spine included

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Body:
        u = rng.uniform
        return cls(a=u(150, 175), b=u(110, 130), cy=u(-5, 5), fat_front=u(8, 25),
                   fat_side=u(8, 25), muscle=u(8, 13), back=u(75, 90))

    @property
    def cavity(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Centre (x, y) and half axes of the elliptical abdominal cavity."""
        half_width = self.a - self.fat_side - self.muscle
        half_depth = (2 * self.b - self.fat_front - self.muscle - self.back) / 2
        front = self.cy + self.b - self.fat_front - self.muscle
        return (0.0, front - half_depth), (half_width, half_depth)

    @property
    def spine_front(self) -> float:
        """Front of the vertebral bodies, which bulge 15 mm into the back of the cavity."""
        return self.cy - self.b + self.back + 15


@dataclass(frozen=True)
class _Tissue:
    """HU of each tissue in one scan; enhancing tissues follow one contrast phase."""

    skin: float
    fat: float
    visceral_fat: float
    muscle: float
    liver: float
    spleen: float
    cortex: float
    medulla: float
    bile: float
    artery: float
    vein: float
    bowel_wall: float
    organ: float
    cortical: float
    cancellous: float
    disc: float
    csf: float
    rib: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Tissue:
        u = rng.uniform
        enhance = u(0, 1)
        fat = u(-115, -90)
        return cls(
            skin=u(10, 50), fat=fat, visceral_fat=fat + u(-5, 10), muscle=u(40, 60),
            liver=55 + 20 * enhance + u(-5, 5), spleen=40 + 20 * enhance + u(-5, 5),
            cortex=140 + 60 * enhance + u(-10, 10), medulla=u(30, 40), bile=u(0, 20),
            artery=150 + 60 * enhance + u(-10, 10), vein=110 + 50 * enhance + u(-10, 10),
            bowel_wall=60 + 40 * enhance + u(-10, 10),
            organ=80 + 40 * float(np.clip(enhance + rng.normal(0, 0.1), 0, 1)),
            cortical=u(700, 1000), cancellous=u(250, 400), disc=u(70, 100), csf=u(5, 25),
            rib=u(450, 750),
        )


def _paint_anatomy(scene: _Scene, body: _Body, rng: np.random.Generator, organ_scale: float = 1.0) -> None:
    """Paint one patient. Every structure draws its numbers before it looks at the grid, so
    the draws, and hence the anatomy, are the same whatever part of it the grid shows."""
    u = rng.uniform
    hu = _Tissue.draw(rng)
    (_, cavity_y), (av, bv) = body.cavity

    def at(nx: float, ny: float, z: float) -> np.ndarray:
        """Patient mm of a point given in cavity-normalised x, y."""
        return np.array([nx * av, cavity_y + ny * bv, z])

    _paint_wall(scene, body, hu)
    _paint_spine(scene, body, rng, hu)
    _paint_ribs(scene, body, rng, hu)

    for side in (1, -1):  # kidneys: bright cortex, darker medulla, sinus fat at the hilum
        centre = at(side * u(0.48, 0.58), u(-0.63, -0.47), u(-40, -5))
        axes = (u(24, 30), u(20, 26), u(45, 60))
        angle, cortex = side * np.radians(u(15, 35)), u(5, 8)
        hilum = centre - np.array([side * axes[0] * 0.8, -axes[1] * 0.2, 0])
        kidney = scene.ellipsoid(centre, axes, angle)
        if kidney is not None:
            box, dist = kidney
            scene.paint(box, dist, hu.cortex)
            scene.paint(box, dist + np.float32(cortex), hu.medulla)
            sinus = _ellipsoid(*scene.grid.coords(box), hilum, (12, 10, 18))
            scene.paint(box, np.maximum(dist, sinus), hu.visceral_fat)

    liver_centre = at(u(0.5, 0.6), u(0.0, 0.2), u(65, 85))
    liver = scene.ellipsoid(liver_centre, (u(80, 95), u(75, 90), u(90, 105)))
    if liver is not None:
        scene.paint(liver[0], scene.inside(*liver), hu.liver)
    gallbladder = scene.ellipsoid(at(u(0.25, 0.4), u(0.45, 0.65), u(10, 30)),
                                  (u(12, 17), u(12, 17), u(25, 35)))
    if gallbladder is not None:
        scene.paint(*gallbladder, hu.bile)
    spleen_centre = at(-u(0.72, 0.82), u(-0.45, -0.25), u(25, 45))
    spleen_axes = (u(22, 30), u(45, 55), u(45, 60))
    spleen = scene.ellipsoid(spleen_centre, spleen_axes, np.radians(u(-50, -30)))
    if spleen is not None:
        scene.paint(spleen[0], scene.inside(*spleen), hu.spleen)

    stomach_centre = at(-u(0.3, 0.45), u(0.35, 0.55), u(50, 70))
    stomach_axes = (u(40, 55), u(28, 38), u(35, 50))
    stomach_gas = stomach_centre[1] + u(0.2, 0.6) * stomach_axes[1]
    stomach = scene.ellipsoid(stomach_centre, stomach_axes)
    _paint_hollow(scene, stomach, hu.bowel_wall, u(0, 30), stomach_gas, u(-1000, -900), 4.0)
    _paint_bowel(scene, rng, at, hu)

    # The organ: a tube along a cubic Bezier curve from the head (patient's right, in the
    # duodenal C) arching in front of the vessels to the tail at the splenic hilum.
    head = at(u(0.22, 0.32), u(-0.15, 0.05), u(-25, -12))
    tail = at(-u(0.55, 0.72), u(-0.45, -0.25), u(8, 25))
    control = np.array([
        head,
        at(head[0] / av - u(0.12, 0.22), u(0.35, 0.55), head[2] + u(0, 10)),
        at(tail[0] / av + u(0.25, 0.4), u(0.2, 0.45), tail[2] - u(0, 12)),
        tail,
    ])
    samples = 48
    centre_line, tangent = _bezier(control, samples)
    t = np.linspace(0, 1, samples)
    knots = organ_scale * u(0.9, 1.1) * np.array([u(16, 21), u(9, 12.5), u(11, 15), u(9, 12.5)])
    lobules = 1 + 0.08 * np.sin(2 * np.pi * (u(2, 4) * t + u(0, 1)))
    radius = np.interp(t, [0, 0.22, 0.5, 1], knots) * lobules  # head, neck, body, tail
    halo = u(2, 5)

    # Duodenum: a C around the head in the coronal plane, then across below it.
    duo_r = u(9, 12)
    reach = radius[0] + duo_r + u(0.5, 3)
    angles = np.radians(np.linspace(110, -100, 15))
    c_loop = head + reach * np.stack([np.cos(angles), np.zeros_like(angles), np.sin(angles)], axis=1)
    bulb = c_loop[0] + np.array([-u(15, 25), u(15, 25), u(5, 15)])
    across = c_loop[-1] + np.array([-u(50, 70), u(0, 10), u(-5, 5)])
    rising = across + np.array([-u(10, 20), u(-5, 5), u(10, 20)])
    duodenum = np.vstack([bulb, c_loop, across, rising])
    duo_fluid, duo_gas, duo_air = u(5, 30), head[1] + u(0, 15), u(-1000, -900)
    if u(0, 1) < 0.5:
        duo_gas = np.inf  # no gas in this one

    # Vessels: aorta and IVC in front of the spine, SMA from the aorta; splenic vein along the
    # back of the organ from its neck to the spleen, SMV and portal vein from the confluence.
    spine_front = body.spine_front
    aorta_r, ivc_r, sma_r, vein_r = u(9, 13), u(9, 12), u(3.5, 5), u(4, 6)
    heights = np.linspace(-250, 250, 11)
    level = np.ones_like(heights)
    aorta = np.stack([-0.07 * av + u(-3, 3, heights.size), level * (spine_front + aorta_r), heights], 1)
    ivc = np.stack([level * (0.15 * av + u(-5, 5)), level * (spine_front + ivc_r - 4), heights], 1)
    sma_top = np.array([aorta[5, 0], spine_front + 2 * aorta_r, u(15, 25)])
    sma = np.array([sma_top, sma_top + [0, u(10, 15), -20], sma_top + [0, u(15, 25), -300]])
    down = np.array([0.0, -1.0, 0.0])
    back = down - (tangent @ down)[:, None] * tangent
    back /= np.linalg.norm(back, axis=1, keepdims=True)
    neck = int(samples * u(0.25, 0.35))
    splenic = centre_line[neck:] + back[neck:] * (radius[neck:] + vein_r + u(0, 1.5))[:, None]
    splenic = np.vstack([splenic, spleen_centre + np.array([u(10, 20), 0, 0])])
    confluence = splenic[0]
    smv = np.array([confluence + [u(2, 8), -2, -300], confluence + [u(2, 8), -1, -40], confluence])
    portal = np.array([confluence, confluence + [0.15 * av, u(-5, 10), u(25, 35)]])

    organ = scene.tube(centre_line, radius, margin=halo)
    if organ is not None:  # peripancreatic fat, under the structures that touch the organ
        scene.paint(organ[0], organ[1] - np.float32(halo), hu.visceral_fat)
    vessels = ((aorta, aorta_r, hu.artery), (ivc, ivc_r, hu.vein), (sma, sma_r, hu.artery),
               (smv, vein_r + 1, hu.vein), (portal, vein_r + 3, hu.vein), (splenic, vein_r, hu.vein))
    for points, r, value in vessels:
        vessel = scene.tube(points, np.full(len(points), r))
        if vessel is not None:
            scene.paint(*vessel, value)
    duo = scene.tube(duodenum, np.full(len(duodenum), duo_r))
    _paint_hollow(scene, duo, hu.bowel_wall, duo_fluid, duo_gas, duo_air, 3.0)
    if organ is not None:
        scene.paint(*organ, hu.organ)
        scene.label[organ[0]] = organ[1] < 0


def _paint_wall(scene: _Scene, body: _Body, hu: _Tissue) -> None:
    """Air, skin, subcutaneous fat, muscle wall and visceral fat. Patient x and y never depend
    on k here (grids turn only in the axial plane), so this is built on one thin axial plane
    and broadcast along z in one pass."""
    x, y, _ = scene.grid.coords(tuple(slice(0, n) for n in scene.grid.shape))
    outline = _ellipse(x, y, (0, body.cy), (body.a, body.b))
    plane = np.full(np.broadcast_shapes(x.shape, y.shape), -1000.0, dtype=np.float32)
    _blend(plane, outline, hu.skin, scene.edge)
    _blend(plane, outline + np.float32(2.0), hu.fat, scene.edge)
    wall = (body.a - body.fat_side, body.b - body.fat_front)
    _blend(plane, _ellipse(x, y, (0, body.cy), wall), hu.muscle, scene.edge)
    _blend(plane, _ellipse(x, y, *body.cavity), hu.visceral_fat, scene.edge)
    scene.image[...] = plane


def _paint_hollow(scene: _Scene, shape, wall_hu: float, fluid_hu: float, gas_level: float,
                  gas_hu: float, wall: float) -> None:
    """A hollow organ inside the cavity: enhancing wall, fluid lumen, gas in front of
    `gas_level` (y: the patient lies supine)."""
    if shape is None:
        return
    box, dist = shape[0], scene.inside(*shape)
    scene.paint(box, dist, wall_hu)
    lumen = dist + np.float32(wall)
    scene.paint(box, lumen, fluid_hu)
    if np.isfinite(gas_level):
        y = scene.grid.coords(box)[1]
        scene.paint(box, np.maximum(lumen, np.float32(gas_level) - y), gas_hu)


def _paint_bowel(scene: _Scene, rng: np.random.Generator, at, hu: _Tissue) -> None:
    """Colon framing the abdomen and small-bowel loops below the organ, some holding gas."""
    u = rng.uniform
    colon_r = u(18, 24)
    colon = np.array([
        at(0.75, u(-0.2, 0.1), -300), at(0.75, 0.0, u(0, 15)), at(0.55, 0.55, u(15, 30)),
        at(0.0, 0.65, u(-10, 15)), at(-0.55, 0.55, u(20, 35)), at(-0.78, 0.0, u(25, 40)),
        at(-0.75, u(-0.2, 0.1), -300),
    ])
    colon_gas, colon_fluid, colon_air = colon[:, 1].mean() + u(-10, 20), u(0, 40), u(-1000, -850)
    shape = scene.tube(colon, np.full(len(colon), colon_r))
    _paint_hollow(scene, shape, hu.bowel_wall, colon_fluid, colon_gas, colon_air, 3.0)
    for _ in range(int(rng.integers(5, 10))):
        start = at(u(-0.55, 0.55), u(-0.1, 0.6), u(-110, -45))
        loop = start + np.cumsum(rng.normal(0, 1, size=(5, 3)) * [25, 20, 10], axis=0)
        radius, fluid, gas, air = u(9, 13), u(0, 30), loop[:, 1].mean() + u(-5, 30), u(-1000, -600)
        shape = scene.tube(loop, np.full(len(loop), radius))
        _paint_hollow(scene, shape, hu.bowel_wall, fluid, gas, air, 2.5)


def _paint_spine(scene: _Scene, body: _Body, rng: np.random.Generator, hu: _Tissue) -> None:
    """Vertebral bodies with discs, canal, posterior arch and psoas muscles along z."""
    u = rng.uniform
    rx, ry = u(17, 22), u(14, 18)
    period, disc, phase = u(30, 36), u(6, 9), u(0, 36)
    y0 = body.spine_front - ry
    field = scene.field((-rx - 40, y0 - ry - 60, -1e4), (rx + 40, y0 + ry, 1e4))
    if field is not None:
        box, x, y, z = field
        vertebra = _ellipse(x, y, (0, y0), (rx, ry))
        scene.paint(box, vertebra, hu.cortical)
        scene.paint(box, vertebra + np.float32(2.5), hu.cancellous)
        level = np.abs(np.mod(z - np.float32(phase), np.float32(period)) - np.float32(period / 2))
        scene.paint(box, np.maximum(vertebra, level - np.float32(disc / 2)), hu.disc)
        mid_vertebra = np.float32(period / 2 - 8) - level  # arches only between the discs
        canal = (0, y0 - ry - 12)
        spine_top, spine_end = canal[1] - 9, body.cy - body.b + 12
        spinous = ((0, (spine_top + spine_end) / 2), (5, (spine_top - spine_end) / 2))
        transverse = [((side * (rx + 12), y0 - ry + 2), (16, 5)) for side in (1, -1)]
        parts = [(canal, (14, 13)), spinous, *transverse]
        for centre, axes in parts:
            arch = np.maximum(_ellipse(x, y, centre, axes), mid_vertebra)
            scene.paint(box, arch, hu.cortical * 0.8)
        scene.paint(box, _ellipse(x, y, canal, (9, 8)), hu.csf)
    heights = np.linspace(-300, 60, 10)
    for side in (1, -1):  # psoas thickens towards the pelvis
        line = np.stack([np.full(10, side * (rx + 14)), np.full(10, y0 + 4), heights], axis=1)
        psoas = scene.tube(line, np.clip(12 - heights / 12, 6, 24))
        if psoas is not None:
            scene.paint(*psoas, hu.muscle)


def _paint_ribs(scene: _Scene, body: _Body, rng: np.random.Generator, hu: _Tissue) -> None:
    """Lower ribs: bony arcs in the body wall from beside the spine round to the front,
    sloping down as they go forward."""
    u = rng.uniform
    top, period = u(40, 70), u(30, 38)
    a, b = body.a - body.fat_side - 5, body.b - body.fat_front - 5
    angles = np.radians(np.linspace(-70, 30, 12))
    drop = np.linspace(0, 80, angles.size)
    for n in range(4):
        for side in (1, -1):
            x, y = side * a * np.cos(angles), body.cy + b * np.sin(angles)
            arc = np.stack([x, y, top - n * period - drop], axis=1)
            rib = scene.tube(arc, np.full(angles.size, 4.0))
            if rib is not None:
                scene.paint(*rib, hu.rib)
