"""Preview pictures: three orthogonal slices through the mask's centre, the same picture whatever
order the voxels are stored in (the planes are found from the affine, not the array axes)."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest

from resdsn_ray import pictures
from resdsn_ray.synthetic import make_case

SHAPE = (40, 36, 24)


def test_centre_is_the_mask_centre_of_mass():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:5, 6:9, 1:4] = 1
    assert pictures.centre(mask) == (3, 7, 2)
    assert pictures.centre(np.zeros((10, 8, 6))) == (5, 4, 3)


def test_planes_cross_the_right_voxel_axes():
    _, label, affine = make_case(3, SHAPE, orientation="RAS")
    axial = pictures.plane(label, affine, 2, 5)
    sagittal = pictures.plane(label, affine, 0, 5)
    # axial: columns along x (i), rows along y (j); sagittal: rows along z (k), columns along y (j)
    assert axial.shape[0] % SHAPE[1] == 0 and axial.shape[1] % SHAPE[0] == 0
    assert sagittal.shape[0] % SHAPE[2] == 0 and sagittal.shape[1] % SHAPE[1] == 0


@pytest.mark.parametrize("orientation", ["LPS", "RPI"])
def test_preview_is_the_same_in_any_orientation(orientation):
    """The same patient stored in RAS and in flipped voxel orders gives the same three pictures."""
    drawn = []
    centre = np.argwhere(make_case(5, SHAPE, orientation="RAS")[1]).mean(axis=0)
    assert np.all(np.abs(centre % 1 - 0.5) > 0.005)  # no tie: rounding picks the same voxel in any order
    for code in ("RAS", orientation):
        image, label, affine = make_case(5, SHAPE, orientation=code)
        drawn.append({name: picture for name, (picture, _) in pictures.planes(image, label, affine).items()})
    for name in pictures.PLANES:
        assert np.array_equal(drawn[0][name], drawn[1][name]), name
    png = matplotlib.image.imread(io.BytesIO(pictures.preview(image, label, affine, title="case 5")))[..., :3]
    assert png.shape[0] > 100 and png.shape[1] > 300
    assert (png[..., 1] - png[..., 0] > 0.25).mean() > 0.001  # the prediction is drawn in green
