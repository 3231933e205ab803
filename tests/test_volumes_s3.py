"""Reading and writing volumes through s3:// against a real S3 endpoint (moto's server process),
reached through AWS_ENDPOINT_URL like any S3-compatible store."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pytest

from resdsn_ray import storage
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import read_volume, write_mask, write_nifti

pytestmark = pytest.mark.s3

_C, _S = np.cos(0.3), np.sin(0.3)
OBLIQUE = np.eye(4)  # axes permuted, rotated 0.3 rad about x, anisotropic
OBLIQUE[:3, :3] = np.array([[0.0, -1.0, 0.0], [_C, 0.0, -_S], [_S, 0.0, _C]]) @ np.diag([0.7, 0.9, 2.5])
OBLIQUE[:3, 3] = (120.0, -80.0, -400.0)


def _objects(bucket_uri: str) -> dict[str, bytes]:
    """The bucket's objects read with boto3 directly (not through the code under test)."""
    client = boto3.client("s3")
    bucket = bucket_uri.removeprefix("s3://")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def test_nifti_and_mask_through_s3(s3_bucket, tmp_path):
    data = np.random.default_rng(3).integers(-1000, 1000, size=(9, 7, 5)).astype(np.int16)
    image_uri = f"{s3_bucket}/cases/image.nii.gz"
    write_nifti(image_uri, data, OBLIQUE)

    volume = read_volume(image_uri)
    assert volume.source == image_uri
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-5)

    mask = (volume.array > 500).astype(np.uint8)
    assert 0 < mask.sum() < mask.size
    mask_uri = f"{s3_bucket}/out/masks/image.nii.gz"
    write_mask(mask_uri, mask, like=volume)

    stored = _objects(s3_bucket)
    assert sorted(stored) == ["cases/image.nii.gz", "out/masks/image.nii.gz"]
    written = nib.Nifti1Image.from_bytes(gzip.decompress(stored["out/masks/image.nii.gz"]))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)
    np.testing.assert_allclose(written.affine, OBLIQUE, atol=1e-5)
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 1


@pytest.mark.parametrize("suffix", ["", "/"])
def test_dicom_series_folder_through_s3(s3_bucket, ct5n_dir, suffix):
    for path in sorted(Path(ct5n_dir).iterdir()):
        storage.write_bytes(f"{s3_bucket}/study/ct5n/{path.name}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/study/ct5n/notes.txt", b"not a slice")
    volume = read_volume(f"{s3_bucket}/study/ct5n{suffix}")
    local = read_volume(str(ct5n_dir))
    np.testing.assert_array_equal(volume.array, local.array)
    np.testing.assert_array_equal(volume.affine, local.affine)
    assert volume.meta["series_uid"] == local.meta["series_uid"]
    assert volume.meta["ignored_files"] == ["notes.txt"]


def test_real_series_and_twin_through_s3(s3_bucket, shared_data):
    sts = shared_data / "ct" / "sts_001" / "CT"
    for path in sorted((sts / "dicom" / "image").iterdir()):
        storage.write_bytes(f"{s3_bucket}/sts/dicom/{path.name}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/sts/image.nii.gz", (sts / "nifti" / "image" / "image.nii.gz").read_bytes())
    dicom = read_volume(f"{s3_bucket}/sts/dicom")
    twin = read_volume(f"{s3_bucket}/sts/image.nii.gz")
    np.testing.assert_array_equal(dicom.array, twin.array)
    np.testing.assert_allclose(dicom.affine, twin.affine, atol=1e-4)


def test_missing_s3_object_is_an_input_error(s3_bucket):
    with pytest.raises(InputError, match="does not exist") as raised:
        read_volume(f"{s3_bucket}/nothing/here.nii.gz")
    assert "here.nii.gz" in str(raised.value)


def test_bad_object_on_s3_names_the_uri(s3_bucket):
    uri = f"{s3_bucket}/broken/cut.nii.gz"
    storage.write_bytes(uri, gzip.compress(bytes(2000))[:30])
    with pytest.raises(InputError) as raised:
        read_volume(uri)
    assert raised.value.source == uri


def test_series_of_a_shared_s3_folder_reads_other_files_by_header_only(s3_bucket, ct5n_dir):
    import pydicom
    from pydicom.uid import generate_uid

    from resdsn_ray.volumes import HEADER_PREFIX

    other = generate_uid()
    for path in sorted(Path(ct5n_dir).iterdir()):
        storage.write_bytes(f"{s3_bucket}/mixed/{path.name}", path.read_bytes())
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = other, generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        storage.write_bytes(f"{s3_bucket}/mixed/other_{path.name}", buffer.getvalue())
    fs, _ = storage.filesystem(s3_bucket)
    ranges: list[str | None] = []
    fs.s3.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: ranges.append(params["headers"].get("Range")))
    local = read_volume(str(ct5n_dir))
    volume = read_volume(f"{s3_bucket}/mixed", series_uid=local.meta["series_uid"])
    np.testing.assert_array_equal(volume.array, local.array)
    assert volume.meta["other_series_files"] == 5
    assert sorted(ranges, key=str) == [None] * 5 + [f"bytes=0-{HEADER_PREFIX - 1}"] * 10  # headers, then 5 whole
