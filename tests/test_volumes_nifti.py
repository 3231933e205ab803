"""NIfTI reading and mask writing: the mask must mark the same world points as the voxels it
came from, whatever the affine (RAS, LPS, flipped, permuted, oblique, anisotropic)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from resdsn_ray import volumes
from resdsn_ray.volumes import Volume, read_volume, write_mask


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras": _affine(np.diag([0.8, 0.8, 2.5]), (-100.0, -120.0, -300.0)),
    "lps": _affine(np.diag([-0.7, -0.7, 3.0]), (180.0, 200.0, -50.0)),
    "flipped": _affine(np.diag([-1.2, 0.9, -5.0]), (10.0, -20.0, 400.0)),
    "permuted": _affine(np.array([[0, 0, -0.9], [2.0, 0, 0], [0, -0.6, 0]]), (50.0, -80.0, 30.0)),
    "oblique": _affine(_rotation(0.3, -0.2, 0.5) @ np.diag([0.6, 0.75, 2.0]), (-33.3, 12.5, -210.0)),
}


def _phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An asymmetric int16 CT-like volume: any flip or transpose changes it."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-1024, 1500, size=shape) + np.arange(shape[0])[:, None, None] * 7).astype(np.int16)


def _marked_world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask > 0)
    world = nib.affines.apply_affine(affine, ijk)
    return world[np.lexsort(world.T[::-1])]


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_mask_marks_same_world_points(tmp_path, name):
    affine = AFFINES[name]
    data = _phantom((13, 11, 7), seed=len(name))
    image_path = tmp_path / f"{name}.nii.gz"
    volumes.write_nifti(str(image_path), data, affine)

    volume = read_volume(str(image_path))
    assert volume.shape == data.shape
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(volume.spacing, np.linalg.norm(affine[:3, :3], axis=0), atol=1e-5)
    assert volume.meta["format"] == "nifti" and volume.meta["dtype"] == "int16"

    marked = np.zeros(data.shape, dtype=bool)
    for ijk in [(0, 0, 0), (12, 0, 0), (0, 10, 0), (0, 0, 6), (3, 7, 5), (12, 10, 6)]:
        marked[ijk] = True
    mask_path = tmp_path / f"{name}_mask.nii.gz"
    write_mask(str(mask_path), marked, like=volume)

    written = nib.load(mask_path)
    assert written.shape == data.shape
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    np.testing.assert_allclose(written.header.get_sform(), affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(written.header.get_qform(), affine, rtol=0, atol=1e-4)
    mask = np.asanyarray(written.dataobj)
    np.testing.assert_array_equal(mask, marked.astype(np.uint8))
    np.testing.assert_allclose(
        _marked_world(written.affine, mask), _marked_world(affine, marked), rtol=0, atol=1e-4
    )


def test_scale_slope_and_intercept_applied(tmp_path):
    raw = _phantom((6, 5, 4), seed=1)
    image = nib.Nifti1Image(raw, AFFINES["ras"])
    image.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii"
    nib.save(image, path)
    volume = read_volume(str(path))
    np.testing.assert_array_equal(volume.array, raw.astype(np.float32) * 2 - 1024)
    assert volume.meta["rescale_slope"] == 2.0 and volume.meta["rescale_intercept"] == -1024.0
    assert volume.meta["compressed"] is False


@pytest.mark.parametrize("compress, suffix", [(True, ".nii"), (False, ".nii.gz"), (True, ".img.bin")])
def test_compression_from_magic_not_suffix(tmp_path, compress, suffix):
    data = _phantom((5, 6, 7), seed=2)
    raw = nib.Nifti1Image(data, AFFINES["lps"]).to_bytes()
    path = tmp_path / f"image{suffix}"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    volume = read_volume(str(path))
    np.testing.assert_array_equal(volume.array, data)
    assert volume.meta["compressed"] is compress


def test_file_url_and_nifti2(tmp_path):
    data = _phantom((4, 5, 6), seed=3)
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(data, AFFINES["flipped"]), path)
    volume = read_volume(path.as_uri())
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, AFFINES["flipped"], atol=1e-6)
    assert volume.meta["nifti_version"] == 2


def test_trailing_singleton_fourth_axis_is_squeezed(tmp_path):
    data = _phantom((4, 5, 6), seed=4)
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], AFFINES["ras"]), path)
    volume = read_volume(str(path))
    assert volume.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.array, data)


def test_sform_preferred_over_qform_like_nibabel(tmp_path):
    data = _phantom((4, 5, 6), seed=5)
    image = nib.Nifti1Image(data, None)
    image.set_qform(AFFINES["ras"], code=1)
    image.set_sform(AFFINES["lps"], code=2)
    path = tmp_path / "both.nii.gz"
    nib.save(image, path)
    volume = read_volume(str(path))
    np.testing.assert_allclose(volume.affine, AFFINES["lps"], atol=1e-6)
    assert volume.meta["affine_source"] == "sform" and volume.meta["qform_matches_sform"] is False

    image.set_sform(None, code=0)
    nib.save(image, path)
    volume = read_volume(str(path))
    np.testing.assert_allclose(volume.affine, AFFINES["ras"], atol=1e-5)
    assert volume.meta["affine_source"] == "qform"


def test_sheared_affine_keeps_exact_sform_and_drops_qform_code(tmp_path):
    sheared = AFFINES["ras"].copy()
    sheared[1, 2] = 0.9  # gantry tilt: slices step along y as well as z
    volume = Volume(np.zeros((4, 5, 6), np.float32), sheared, "tilted")
    path = tmp_path / "tilted_mask.nii.gz"
    mask = np.zeros(volume.shape, np.uint8)
    mask[1, 2, 3] = 1
    write_mask(str(path), mask, like=volume)
    written = nib.load(path)
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 0
    np.testing.assert_allclose(written.affine, sheared, atol=1e-6)
    np.testing.assert_allclose(_marked_world(written.affine, np.asanyarray(written.dataobj)), _marked_world(sheared, mask))


def test_write_mask_refuses_wrong_shape_and_non_label_values(tmp_path):
    volume = Volume(np.zeros((4, 5, 6), np.float32), AFFINES["ras"], "x")
    with pytest.raises(ValueError, match="shape"):
        write_mask(str(tmp_path / "m.nii.gz"), np.zeros((6, 5, 4), np.uint8), like=volume)
    with pytest.raises(ValueError, match="0..255"):
        write_mask(str(tmp_path / "m.nii.gz"), np.full((4, 5, 6), 0.5), like=volume)
    with pytest.raises(ValueError, match="0..255"):
        write_mask(str(tmp_path / "m.nii.gz"), np.full((4, 5, 6), 300), like=volume)
    assert not os.listdir(tmp_path)


def test_write_mask_replaces_whole_file_without_leftovers(tmp_path):
    volume = Volume(np.zeros((4, 5, 6), np.float32), AFFINES["oblique"], "x")
    path = tmp_path / "out" / "mask.nii.gz"
    write_mask(str(path), np.zeros(volume.shape, bool), like=volume)
    write_mask(str(path), np.ones(volume.shape, bool), like=volume)
    assert os.listdir(path.parent) == ["mask.nii.gz"]
    assert np.asanyarray(nib.load(path).dataobj).min() == 1
