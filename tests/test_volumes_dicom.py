"""DICOM series on real data: every slice must land at the voxel plane the affine gives its
ImagePositionPatient, with its pixels in HU, whatever the file names, codecs or tilt."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from resdsn_ray.volumes import AIR_HU, read_volume, write_mask

pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _expected_hu(ds: Dataset) -> np.ndarray:
    """A slice in HU, [row, column], padding as air: the reference the reader must reproduce."""
    raw = ds.pixel_array
    hu = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    if "PixelPaddingValue" in ds:
        hu[raw == int(ds.PixelPaddingValue)] = AIR_HU
    return hu


def _slice_files(folder: Path) -> list[tuple[Path, Dataset]]:
    found = []
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds:
            found.append((path, ds))
    return found


def assert_slices_placed(volume, folder: Path) -> dict[str, int]:
    """Each file's slice sits at k where the affine maps (0, 0, k) to its IPP, and the affine
    maps (i, j, k) to the DICOM equation IPP + i*dc*row + j*dr*col. Returns file -> k."""
    inverse = np.linalg.inv(volume.affine)
    placed = {}
    for path, ds in _slice_files(folder):
        ipp = LPS_TO_RAS @ np.array(ds.ImagePositionPatient, dtype=float)
        ijk = nib.affines.apply_affine(inverse, ipp)
        k = round(ijk[2])
        np.testing.assert_allclose(ijk, [0, 0, k], atol=1e-3, err_msg=path.name)
        row, col = (LPS_TO_RAS @ np.array(v, float) for v in np.reshape(ds.ImageOrientationPatient, (2, 3)))
        dr, dc = (float(v) for v in ds.PixelSpacing)
        corner = (ds.Columns - 1, ds.Rows - 1)
        world = ipp + corner[0] * dc * row + corner[1] * dr * col
        np.testing.assert_allclose(nib.affines.apply_affine(volume.affine, [*corner, k]), world, atol=1e-3)
        np.testing.assert_array_equal(volume.array[:, :, k], _expected_hu(ds).T, err_msg=path.name)
        placed[path.name] = k
    assert sorted(placed.values()) == list(range(volume.shape[2]))
    return placed


def _copy_series(src: Path, dst: Path, edit: Callable[[int, Dataset], None] | None = None,
                 names: list[str] | None = None) -> Path:
    """Copy a series slice by slice through pydicom, optionally editing each dataset."""
    dst.mkdir(parents=True, exist_ok=True)
    for index, (path, ds) in enumerate(_slice_files(src)):
        if edit:
            edit(index, ds)
        ds.save_as(dst / (names[index] if names else path.name), enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def sts_dicom(shared_data: Path) -> Path:
    return shared_data / "ct" / "sts_001" / "CT" / "dicom" / "image"


def test_sts001_dicom_matches_its_nifti_twin(shared_data, sts_dicom):
    dicom = read_volume(str(sts_dicom))
    (twin_path,) = (shared_data / "ct" / "sts_001" / "CT" / "nifti" / "image").glob("*.nii.gz")
    twin = read_volume(str(twin_path))
    assert_slices_placed(dicom, sts_dicom)
    assert dicom.meta["n_slices"] == 59 and dicom.meta["modality"] == "CT"

    # Bring the DICOM voxels into the twin's axis order through world coordinates.
    transform = ornt_transform(io_orientation(dicom.affine), io_orientation(twin.affine))
    aligned = apply_orientation(dicom.array, transform)
    aligned_affine = dicom.affine @ inv_ornt_aff(transform, dicom.shape)
    affine_diff = float(np.abs(aligned_affine - twin.affine).max())
    voxel_diff = float(np.abs(aligned - twin.array).max())
    print(f"sts_001: orientations DICOM {dicom.meta['orientation']} NIfTI {twin.meta['orientation']}, "
          f"max |affine diff| {affine_diff:.2e} mm, max |voxel diff| {voxel_diff} HU")
    assert aligned.shape == twin.shape
    assert affine_diff < 1e-4
    assert voxel_diff == 0.0

    # Independently: random voxels of the DICOM volume, found in the twin by world position.
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, s, 500) for s in dicom.shape], axis=1)
    world = nib.affines.apply_affine(dicom.affine, ijk)
    twin_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(twin.affine), world)).astype(int)
    np.testing.assert_array_equal(twin.array[tuple(twin_ijk.T)], dicom.array[tuple(ijk.T)])


def test_crlm1004_padding_intercept_and_descending_names(shared_data):
    folder = shared_data / "ct" / "crlm_1004" / "dicom"
    volume = read_volume(str(folder))
    placed = assert_slices_placed(volume, folder)  # HU = stored - 1024, padding -> air
    assert volume.meta["rescale_intercept"] == -1024.0
    assert volume.meta["padding_value"] == -2000 and volume.meta["padded_voxels"] > 0
    assert volume.array.min() >= -1024.0  # no -3024 HU (padding) left
    assert not np.any(volume.array == -3024.0)
    # names run in descending z; k must run in increasing z
    assert placed["1-01.dcm"] == 40 and placed["1-41.dcm"] == 0
    assert volume.affine[2, 2] == pytest.approx(5.0)
    assert volume.affine[2, 3] == pytest.approx(-375.0)


def test_pydicom_ct5n_series_ordered_by_position(ct5n_dir):
    volume = read_volume(str(ct5n_dir))
    placed = assert_slices_placed(volume, ct5n_dir)
    assert volume.shape == (16, 16, 5)
    # file names ascend while z descends: 2062 is the highest slice
    assert [name for name, _ in sorted(placed.items(), key=lambda item: item[1])] == [
        "3353", "3023", "2693", "2392", "2062"]
    np.testing.assert_allclose(volume.spacing, (0.488281, 0.488281, 2.5))


def _assert_same(a, b) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.array, b.array)


def test_shuffled_file_names_read_identically(sts_dicom, tmp_path):
    original = read_volume(str(sts_dicom))
    rng = np.random.default_rng(7)
    count = len(_slice_files(sts_dicom))
    names = [f"{value:012x}.dcm" for value in rng.choice(16**10, size=count, replace=False)]
    assert names != sorted(names)
    copy = _copy_series(sts_dicom, tmp_path / "shuffled", names=names)
    _assert_same(read_volume(str(copy)), original)
    assert_slices_placed(read_volume(str(copy)), copy)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_copy_reads_identically(sts_dicom, tmp_path, syntax):
    original = read_volume(str(sts_dicom))
    copy = _copy_series(sts_dicom, tmp_path / "compressed", edit=lambda _, ds: ds.compress(syntax))
    volume = read_volume(str(copy))
    assert volume.meta["transfer_syntax"] == syntax
    _assert_same(volume, original)


def test_deflated_copy_reads_identically(ct5n_dir, tmp_path):
    def deflate(_: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    copy = _copy_series(ct5n_dir, tmp_path / "deflated", edit=deflate)
    volume = read_volume(str(copy))
    assert volume.meta["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    _assert_same(volume, read_volume(str(ct5n_dir)))


def _series_from_one_slice(source: str, folder: Path, count: int = 3) -> Path:
    """A CT series of `count` copies of a pydicom test slice, stacked along its normal."""
    folder.mkdir()
    series = generate_uid()
    for k in range(count):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(source))
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [round(v, 4) for v in np.array(ds.ImagePositionPatient, float) + 3.0 * k * normal]
        ds.save_as(folder / f"slice{k}.dcm", enforce_file_format=True)
    return folder


def test_jpeg_ls_decoded(tmp_path):
    compressed = read_volume(str(_series_from_one_slice("MR_small_jpeg_ls_lossless.dcm", tmp_path / "jls")))
    plain = read_volume(str(_series_from_one_slice("MR_small.dcm", tmp_path / "plain")))
    assert compressed.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.80"
    _assert_same(compressed, plain)
    assert compressed.array.std() > 0


def test_padding_value_and_range_become_air(ct5n_dir, tmp_path):
    def pad(index: int, ds: Dataset) -> None:
        raw = ds.pixel_array.copy()
        raw[:3, :5] = -2000 + index  # stored values inside [-2000, -1990]
        ds.PixelData = raw.tobytes()
        ds.add_new(0x00280121, "SS", -1990)  # PixelPaddingRangeLimit

    copy = _copy_series(ct5n_dir, tmp_path / "padded", edit=pad)
    volume = read_volume(str(copy))
    assert volume.meta["padded_voxels"] == 5 * 15
    assert np.all(volume.array[:5, :3, :] == AIR_HU)
    original = read_volume(str(ct5n_dir))
    np.testing.assert_array_equal(volume.array[5:], original.array[5:])


def test_per_slice_rescale_applied(ct5n_dir, tmp_path):
    def shift(index: int, ds: Dataset) -> None:
        if index % 2:
            ds.PixelData = (ds.pixel_array + 100).astype(np.int16).tobytes()
            ds.RescaleIntercept = -1124
            ds.PixelPaddingValue = -1900

    copy = _copy_series(ct5n_dir, tmp_path / "rescaled", edit=shift)
    _assert_same(read_volume(str(copy)), read_volume(str(ct5n_dir)))


def test_gantry_tilt_gives_exact_sheared_affine(ct5n_dir, tmp_path):
    tilt = np.radians(15.0)

    def tilt_slice(_: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))]

    copy = _copy_series(ct5n_dir, tmp_path / "tilted", edit=tilt_slice)
    volume = read_volume(str(copy))
    assert volume.meta["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-6)
    assert volume.meta["slice_gap_mm"] == pytest.approx(2.5 * np.cos(tilt))
    assert_slices_placed(volume, copy)  # every voxel where the DICOM equation puts it

    mask = np.zeros(volume.shape, np.uint8)
    mask[3, 4, 2] = mask[15, 0, 4] = 1
    write_mask(str(tmp_path / "mask.nii.gz"), mask, like=volume)
    written = nib.load(tmp_path / "mask.nii.gz")
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 0
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-5)


def test_non_image_and_non_dicom_files_are_ignored(ct5n_dir, tmp_path):
    copy = tmp_path / "mixed"
    shutil.copytree(ct5n_dir, copy)
    (copy / "README.txt").write_text("not a slice\n")
    (copy / ".DS_Store").write_bytes(b"\0" * 64)
    shutil.copy(pydicom.data.get_testdata_file("rtstruct.dcm"), copy / "RS.dcm")
    volume = read_volume(str(copy))
    assert volume.meta["ignored_files"] == ["README.txt", "RS.dcm"]
    _assert_same(volume, read_volume(str(ct5n_dir)))


def test_dicom_mask_round_trip_world_points(ct5n_dir, tmp_path):
    volume = read_volume(str(ct5n_dir))
    mask = (volume.array > -200).astype(np.uint8)
    assert 0 < mask.sum() < mask.size
    write_mask(str(tmp_path / "m.nii.gz"), mask, like=volume)
    written = nib.load(tmp_path / "m.nii.gz")
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    np.testing.assert_allclose(written.header.get_qform(), volume.affine, atol=1e-4)
    np.testing.assert_allclose(written.header.get_sform(), volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)


def test_slice_uris_and_instance_uids_follow_k(ct5n_dir):
    volume = read_volume(str(ct5n_dir))
    placed = assert_slices_placed(volume, ct5n_dir)
    assert [Path(uri).name for uri in volume.meta["slice_uris"]] == sorted(placed, key=placed.get)
    for k, uri in enumerate(volume.meta["slice_uris"]):
        assert pydicom.dcmread(uri).SOPInstanceUID == volume.meta["sop_instance_uids"][k]


def test_localizer_in_the_series_is_ignored(ct5n_dir, tmp_path):
    copy = tmp_path / "with_scout"
    shutil.copytree(ct5n_dir, copy)
    ds = pydicom.dcmread(copy / "2062")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a lateral scout in the same series
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(copy / "scout")
    volume = read_volume(str(copy))
    assert volume.meta["ignored_files"] == ["scout"]
    _assert_same(volume, read_volume(str(ct5n_dir)))


def test_series_uid_reads_one_series_of_a_shared_folder_even_with_a_large_header(ct5n_dir, tmp_path):
    from resdsn_ray.volumes import HEADER_PREFIX

    folder = tmp_path / "shared"
    uids = []
    for tag in ("a", "b"):
        uid = generate_uid()
        uids.append(uid)

        def edit(_: int, ds: Dataset, uid: str = uid) -> None:
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = generate_uid()
            ds.add_new(0x00090010, "LO", "BIG PRIVATE")  # private block before SeriesInstanceUID
            ds.add_new(0x00091001, "OB", bytes(3 * HEADER_PREFIX))

        _copy_series(ct5n_dir, folder, edit=edit, names=[f"{tag}{k}" for k in range(5)])
    for uid, tag in zip(uids, "ab"):
        volume = read_volume(str(folder), series_uid=uid)
        assert volume.meta["series_uid"] == uid and volume.meta["other_series_files"] == 5
        assert [Path(u).name[0] for u in volume.meta["slice_uris"]] == [tag] * 5
        _assert_same(volume, read_volume(str(ct5n_dir)))
