"""DICOM SEG output on real CT series: it loads back with highdicom and pydicom, references the
source series and instances, describes the segment in SNOMED CT, and every frame lies on its
source slice with the mask's pixels in the right orientation (an asymmetric mask: any flip or
transpose of i, j or k fails)."""

from __future__ import annotations

import os
import shutil
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, SegmentationStorage

from resdsn_ray import storage
from resdsn_ray.dicom_seg import write_dicom_seg
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import read_volume, write_nifti

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALGORITHM = "resdsn_ray"
VERSION = "coarse=demo-coarse@abc123;fine=demo-fine@def456"


def asymmetric_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """A mask whose every slice differs from its mirror images and from the other slices."""
    mask = np.zeros(shape, np.uint8)
    nx, ny, nz = shape
    for k in range(1, nz - 1):
        size = 1 + k % max(2, nx // 4)
        mask[1:1 + size, ny // 5:ny // 3, k] = 1         # grows with k, near i = 0
        mask[nx // 2, ny // 3:ny // 3 + size + 2, k] = 1  # a bar along j, longer with k
    mask[nx - 3, ny - 2, nz - 2] = 1                      # one voxel near the far corner
    return mask


def copy_compressed(folder: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:
            ds.compress(JPEG2000Lossless)
            ds.save_as(dst / path.name, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sts = shared_data / "ct" / "sts_001" / "CT" / "dicom" / "image"
    return {
        "sts_001": sts,
        "crlm_1004": shared_data / "ct" / "crlm_1004" / "dicom",
        "sts_001_jpeg2000": copy_compressed(sts, tmp_path_factory.mktemp("j2k") / "series"),
    }


def dataset(uri: str, **kwargs) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(storage.read_bytes(uri)), **kwargs)


def check_seg(seg_uri: Path | str, volume, mask: np.ndarray, version: str = VERSION) -> None:
    """The SEG at `seg_uri` is the mask over `volume`'s source series, frame by frame."""
    data = storage.read_bytes(str(seg_uri))
    ds = pydicom.dcmread(BytesIO(data))
    seg = hd.seg.segread(BytesIO(data))
    assert ds.SOPClassUID == SegmentationStorage and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == volume.meta["study_uid"]
    assert ds.FrameOfReferenceUID == dataset(volume.meta["slice_uris"][0], stop_before_pixels=True).FrameOfReferenceUID
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == volume.meta["series_uid"]
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(
        volume.meta["sop_instance_uids"])

    (segment,) = ds.SegmentSequence
    assert (segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == ("15776009", "SCT")
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Pancreas"
    assert (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning) == ("91723000", "Anatomical Structure")
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == ALGORITHM
    assert segment.SegmentLabel == "pancreas"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == version

    # Every frame: derived from one source instance, at that instance's own position (read from
    # the source file, not from the volume), holding the mask's slice at that instance's k.
    k_of = {uid: k for k, uid in enumerate(volume.meta["sop_instance_uids"])}
    frames = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
    rebuilt = np.zeros(volume.shape, np.uint8)
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of[uid]
        source = dataset(volume.meta["slice_uris"][k], stop_before_pixels=True)
        assert source.SOPInstanceUID == uid
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        np.testing.assert_array_equal(frames[f], mask[:, :, k].T, err_msg=f"frame {f} (k={k})")
        rebuilt[:, :, k] = frames[f].T
    np.testing.assert_array_equal(rebuilt, mask)  # omitted frames are exactly the empty slices
    filled = int(np.count_nonzero(mask.any(axis=(0, 1))))
    assert ds.NumberOfFrames == (filled or volume.shape[2])  # an empty mask keeps every (empty) frame


@pytest.mark.parametrize("name", ["sts_001", "sts_001_jpeg2000", "crlm_1004"])
def test_seg_frames_lie_on_their_source_slices(series, tmp_path, name):
    volume = read_volume(str(series[name]))
    mask = asymmetric_mask(volume.shape)
    for axis in range(3):  # a flip along any axis would change the mask
        assert not np.array_equal(mask, np.flip(mask, axis))
    out = tmp_path / "seg" / f"{name}.dcm"
    write_dicom_seg(str(out), mask, volume, ALGORITHM, VERSION)
    check_seg(out, volume, mask)
    assert os.listdir(out.parent) == [out.name]  # no temporary file left beside it


def test_jpeg2000_source_gives_the_same_seg_as_the_plain_series(series, tmp_path):
    plain, compressed = (read_volume(str(series[name])) for name in ("sts_001", "sts_001_jpeg2000"))
    assert compressed.meta["transfer_syntax"] == JPEG2000Lossless
    mask = asymmetric_mask(plain.shape)
    for name, volume in (("a", plain), ("b", compressed)):
        write_dicom_seg(str(tmp_path / f"{name}.dcm"), mask, volume, ALGORITHM, VERSION)
    a, b = (pydicom.dcmread(tmp_path / f"{name}.dcm") for name in "ab")
    assert a.PixelData == b.PixelData and a.SOPInstanceUID == b.SOPInstanceUID  # same inputs, same SEG


def test_seg_of_a_series_on_s3(s3_bucket, ct5n_dir):
    for path in sorted(ct5n_dir.iterdir()):
        storage.write_bytes(f"{s3_bucket}/ct5n/{path.name}", path.read_bytes())
    volume = read_volume(f"{s3_bucket}/ct5n")
    mask = asymmetric_mask(volume.shape)
    uri = f"{s3_bucket}/out/ct5n.dcm"
    write_dicom_seg(uri, mask, volume, ALGORITHM, VERSION)
    check_seg(uri, volume, mask)


def test_empty_mask_gives_a_seg_with_every_frame_empty(ct5n_dir, tmp_path):
    volume = read_volume(str(ct5n_dir))
    mask = np.zeros(volume.shape, np.uint8)
    write_dicom_seg(str(tmp_path / "empty.dcm"), mask, volume, ALGORITHM, VERSION)
    check_seg(tmp_path / "empty.dcm", volume, mask)


def test_nifti_input_cannot_get_a_seg(tmp_path):
    write_nifti(str(tmp_path / "case7.nii.gz"), np.zeros((4, 4, 3), np.int16), np.eye(4))
    volume = read_volume(str(tmp_path / "case7.nii.gz"))
    with pytest.raises(InputError, match="needs a DICOM series") as raised:
        write_dicom_seg(str(tmp_path / "case7.dcm"), np.zeros(volume.shape), volume, ALGORITHM, VERSION)
    assert "case7.nii.gz" in str(raised.value)
    assert not (tmp_path / "case7.dcm").exists()


def test_series_changed_since_it_was_read_is_refused(ct5n_dir, tmp_path):
    copy = tmp_path / "series"
    shutil.copytree(ct5n_dir, copy)
    volume = read_volume(str(copy))
    ds = pydicom.dcmread(copy / "2392")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(copy / "2392")
    with pytest.raises(InputError, match="changed since") as raised:
        write_dicom_seg(str(tmp_path / "seg.dcm"), np.ones(volume.shape), volume, ALGORITHM, VERSION)
    assert "2392" in str(raised.value) and not (tmp_path / "seg.dcm").exists()


def test_mask_off_the_grid_is_refused_before_writing(ct5n_dir, tmp_path):
    volume = read_volume(str(ct5n_dir))
    with pytest.raises(ValueError, match="mask shape"):
        write_dicom_seg(str(tmp_path / "seg.dcm"), np.ones((16, 16, 4)), volume, ALGORITHM, VERSION)
    assert not (tmp_path / "seg.dcm").exists()
