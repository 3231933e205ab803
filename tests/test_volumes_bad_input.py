"""Every kind of bad input gives an InputError that names the offending file and the reason —
never a bare nibabel/pydicom/zlib traceback, never a silently wrong volume."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from resdsn_ray.errors import InputError
from resdsn_ray.volumes import read_volume

pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning")

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _nifti(data: np.ndarray) -> bytes:
    return nib.Nifti1Image(data, AFFINE).to_bytes()


def _valid() -> np.ndarray:
    return np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)


def _patched(raw: bytes, **fields) -> bytes:
    """NIfTI-1 bytes with header fields overwritten, as a broken writer would leave them."""
    header = np.frombuffer(raw[:348], dtype=nib.nifti1.header_dtype).copy()
    for name, value in fields.items():
        header[name] = value
    return header.tobytes() + raw[348:]


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name
    return build


def _pair(tmp: Path) -> Path:
    nib.save(nib.Nifti1Pair(_valid(), AFFINE), tmp / "pair.img")
    return tmp / "pair.hdr"


_gz = gzip.compress(_nifti(_valid()))
_nan = _valid().astype(np.float32)
_nan[1, 2, 3] = np.nan
_inf = _valid().astype(np.float32)
_inf[0, 0, 0] = -np.inf
_flat_sform = AFFINE.copy()
_flat_sform[:, 2] = [0, 0, 0, 0]
_sform_fields = {"sform_code": 1, "srow_x": _flat_sform[0], "srow_y": _flat_sform[1], "srow_z": _flat_sform[2]}

NIFTI_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (_file("empty.nii.gz", b""), "empty file"),
    "truncated_gzip": (_file("cut.nii.gz", _gz[: len(_gz) // 2]), "truncated gzip|corrupt"),
    "gzip_without_trailer": (_file("notrailer.nii.gz", _gz[:-4]), "truncated gzip|corrupt"),
    "corrupt_gzip": (_file("bitrot.nii.gz", _gz[:40] + bytes(b ^ 0x5A for b in _gz[40:80]) + _gz[80:]), "gzip"),
    "wrong_magic": (_file("noise.nii", np.random.default_rng(0).bytes(600)), "wrong magic"),
    "png_named_nifti": (_file("photo.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(600)), "wrong magic"),
    "two_d": (_file("flat2d.nii", _nifti(np.zeros((8, 8), np.int16))), "2-D"),
    "four_d": (_file("series4d.nii", _nifti(np.zeros((4, 4, 4, 3), np.int16))), "4-D"),
    "single_slice": (_file("oneslice.nii", _nifti(np.zeros((8, 8, 1), np.int16))), "single voxel"),
    "nan": (_file("nan.nii.gz", gzip.compress(_nifti(_nan))), "NaN or infinite"),
    "inf": (_file("inf.nii", _nifti(_inf)), "NaN or infinite"),
    "complex": (_file("complex.nii", _nifti(np.zeros((3, 3, 3), np.complex64))), "voxel type"),
    "huge_axis": (_file("hugeaxis.nii", _patched(_nifti(_valid()), dim=[3, 5000, 5, 4, 1, 1, 1, 1])), "absurd"),
    "huge_total": (_file("hugetotal.nii", _patched(_nifti(_valid()), dim=[3, 4000, 4000, 4000, 1, 1, 1, 1])), "absurd"),
    "zero_dim": (_file("zerodim.nii", _patched(_nifti(_valid()), dim=[3, 6, 0, 4, 1, 1, 1, 1])), "invalid header dim"),
    "zero_pixdim": (_file("zeropix.nii", _patched(_nifti(_valid()), pixdim=[1, 0.8, 0, 2.5, 1, 1, 1, 1])), "pixdim"),
    "negative_pixdim": (_file("negpix.nii", _patched(_nifti(_valid()), pixdim=[1, -0.8, 0.8, 2.5, 1, 1, 1, 1])), "pixdim"),
    "flat_sform": (_file("flataffine.nii", _patched(_nifti(_valid()), **_sform_fields)), "degenerate affine"),
    "truncated_data": (_file("short.nii", _nifti(_valid())[:-50]), "truncated"),
    "gzip_bomb": (_file("bomb.nii.gz", gzip.compress(_nifti(_valid()) + bytes(3 << 20))), "far more"),
    "analyze_pair": (_pair, "pair"),
    "missing": (lambda tmp: tmp / "nowhere.nii.gz", "does not exist"),
}


@pytest.mark.parametrize("case", sorted(NIFTI_CASES))
def test_bad_nifti_names_file_and_reason(tmp_path, case):
    build, reason = NIFTI_CASES[case]
    path = build(tmp_path)
    with pytest.raises(InputError, match=reason) as raised:
        read_volume(str(path))
    assert path.name in str(raised.value)
    assert raised.value.source == str(path)


# --------------------------------------------------------------------------------------------
# DICOM series: each case edits a copy of pydicom's 5-slice CT5N series (names 2062 .. 3353).


def _edit(name: str, change: Callable[[pydicom.Dataset], None]) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        ds = pydicom.dcmread(folder / name)
        change(ds)
        ds.save_as(folder / name)
        return name
    return apply


def _set(**values) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)
    return change


def _delete(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return change


def _shift_z(ds: pydicom.Dataset, mm: float) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + mm]


def _smaller(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.pixel_array[:8, :8].copy().tobytes()
    ds.Rows = ds.Columns = 8


def _garbage_jpeg2000(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 2])
    ds["PixelData"].VR = "OB"


def _duplicate(folder: Path) -> str:
    ds = pydicom.dcmread(folder / "2693")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "2693copy")
    return "2693copy"


def _other_series(folder: Path) -> str:
    ds = pydicom.dcmread(folder / "3353")
    ds.SeriesInstanceUID = generate_uid()
    _shift_z(ds, -2.5)
    ds.save_as(folder / "stranger")
    return "2 DICOM series"


def _remove(*names: str) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        for name in names:
            (folder / name).unlink()
        return folder.name
    return apply


def _truncate(name: str, keep: float) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
        return name
    return apply


def _only_text(folder: Path) -> str:
    _remove("2062", "2392", "2693", "3023", "3353")(folder)
    (folder / "notes.txt").write_text("no images here\n")
    return folder.name


DICOM_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "not_ct": (_edit("2693", _set(Modality="MR")), "modality is 'MR'"),
    "missing_slice": (_remove("2693"), "not evenly spaced"),
    "uneven_gap": (_edit("2693", lambda ds: _shift_z(ds, 0.8)), "not evenly spaced"),
    "duplicate_position": (_duplicate, "duplicate slice positions"),
    "two_series": (_other_series, "exactly one"),
    "orientation_differs": (_edit("3023", _set(ImageOrientationPatient=[1, 0, 0, 0, 0.9998, 0.02])), "Orientation"),
    "spacing_differs": (_edit("3023", _set(PixelSpacing=[0.5, 0.5])), "PixelSpacing differs"),
    "size_differs": (_edit("3023", _smaller), "size differs"),
    "single_slice": (_remove("2062", "2392", "2693", "3023"), "single slice"),
    "unreadable_codec": (_edit("2392", _garbage_jpeg2000), "cannot decode"),
    "truncated_early": (_truncate("2062", 0.1), "without pixel data"),
    "truncated_in_header": (_truncate("3353", 0.8), "without pixel data"),
    "truncated_in_pixels": (_truncate("2062", 0.95), "cannot decode"),
    "no_position": (_edit("2392", _delete("ImagePositionPatient")), "ImagePositionPatient"),
    "no_rescale": (_edit("2392", _delete("RescaleSlope", "RescaleIntercept")), "Rescale"),
    "multi_frame": (_edit("2392", _set(NumberOfFrames=2)), "multi-frame"),
    "no_images": (_only_text, "no DICOM image files"),
    "empty_folder": (_remove("2062", "2392", "2693", "3023", "3353"), "no DICOM image files"),
}


@pytest.mark.parametrize("case", sorted(DICOM_CASES))
def test_bad_dicom_series_names_file_and_reason(tmp_path, ct5n_dir, case):
    build, reason = DICOM_CASES[case]
    folder = tmp_path / f"series_{case}"
    shutil.copytree(ct5n_dir, folder)
    named = build(folder)
    with pytest.raises(InputError, match=reason) as raised:
        read_volume(str(folder))
    message = str(raised.value)
    assert folder.name in message
    assert named in message


def test_single_dicom_file_is_not_a_volume(ct5n_dir):
    with pytest.raises(InputError, match="single DICOM file") as raised:
        read_volume(str(ct5n_dir / "2062"))
    assert "2062" in str(raised.value)


def test_unknown_url_scheme_is_an_input_error():
    with pytest.raises(InputError, match="cannot access") as raised:
        read_volume("nosuchscheme://bucket/case.nii.gz")
    assert "case.nii.gz" in str(raised.value)


# --------------------------------------------------------------------------------------------
# Error messages never quote file content (a reader pointed at a secret must not copy it into a row)

MARKER = "secret-marker-7f3a"
_SECRET_TEXT = f"root:x:0:0:{MARKER}:/root:/bin/bash\n".encode() * 40


def _secret_in_header(keyword: str, value: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        import pydicom.data

        folder = tmp / "series"
        source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
        shutil.copytree(source, folder)
        ds = pydicom.dcmread(folder / "2392")
        with pytest.MonkeyPatch.context() as patch:  # write a value no valid header would hold
            patch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
            ds[keyword].VR = "LO"  # so that pydicom stores text where numbers belong
            ds[keyword].value = value
            ds.save_as(folder / "2392")
        return folder
    return build


SECRET_CASES: dict[str, Callable[[Path], Path]] = {
    "text_named_nii": _file("passwd.nii", _SECRET_TEXT),
    "text_named_nii_gz": _file("passwd.nii.gz", _SECRET_TEXT),
    "gzipped_text": _file("passwd2.nii.gz", gzip.compress(_SECRET_TEXT)),
    "nifti_then_text": _file("trailing.nii.gz", _gz + MARKER.encode() * 4),
    "dicom_preamble_then_text": _file("fake.nii", bytes(128) + b"DICM" + _SECRET_TEXT),
    "position_holds_text": _secret_in_header("ImagePositionPatient", f"{MARKER}\\1\\2"),
    "modality_holds_text": _secret_in_header("Modality", MARKER),
    "series_uid_holds_text": _secret_in_header("SeriesInstanceUID", MARKER),
}


@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_errors_never_echo_file_content(tmp_path, case):
    path = SECRET_CASES[case](tmp_path)
    with pytest.raises(InputError) as raised:
        read_volume(str(path))
    assert path.name in str(raised.value)
    assert MARKER not in str(raised.value) and "root:x" not in str(raised.value)


def test_series_uid_names_a_series_folder_only(tmp_path, ct5n_dir):
    nifti = _file("image.nii", _nifti(_valid()))(tmp_path)
    with pytest.raises(InputError, match="not a DICOM series folder"):
        read_volume(str(nifti), series_uid="1.2.3")
    with pytest.raises(InputError, match="no DICOM image of series 1.2.3") as raised:
        read_volume(str(ct5n_dir), series_uid="1.2.3")
    assert "5 of other series" in str(raised.value)
