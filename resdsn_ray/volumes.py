"""Read CT volumes (NIfTI, DICOM series) from any fsspec URL; write masks on the input's grid.

A wrong grid is the worst silent bug a segmentation system can have (flipped or shifted masks),
so this module refuses what it cannot place exactly, with an `InputError` naming the input.

Axis order: `Volume.array[i, j, k]` is nibabel's voxel order, and `Volume.affine` maps
(i, j, k, 1) to world millimetres in RAS+ (nibabel's convention). For DICOM, i runs along a
row (column index), j down the columns (row index), k along the slice normal in increasing
position: `array[i, j, k] = slice_k.pixel_array[j, i]` in HU. Arrays are float32 in Fortran
memory order (as nibabel returns them) for both formats.

NIfTI (`.nii`, `.nii.gz`, NIfTI-1 or -2; compression is detected from the gzip magic, never
the suffix): the affine is nibabel's (sform if its code is set, else qform, else pixdim
only); scl_slope/scl_inter are applied. Trailing singleton axes past the third (a 4-D image
holding one volume) are squeezed; anything else that is not 3-D is refused, as is a volume
with a single voxel along any axis.

DICOM series (a folder URI; not recursive): hidden files, files that are not DICOM, localizer
images (ImageType LOCALIZER) and DICOM instances without pixels of other kinds (RTSTRUCT, SR,
DICOMDIR) are ignored and listed in `meta["ignored_files"]`; a CT image file without its pixels (truncated) is an error. The images
must form exactly ONE series (SeriesInstanceUID; a folder mixing several is refused, listing
them, unless `read_volume(uri, series_uid=...)` names the one to read: then only the header
of each other file is read, and the other series' files are counted in `meta
["other_series_files"]`) of at least two single-frame CT slices (Modality 'CT') with identical orientation, pixel
spacing and size, and rescale tags (or a Modality LUT). Slices are ordered by
ImagePositionPatient projected on the slice normal (row x column cosines), never by file name
or InstanceNumber. Every slice must lie within `SLICE_TOLERANCE` of a slice step of where the
affine puts it, so a missing slice, uneven spacing or duplicate positions are refused. Gantry
tilt (slices stacked along a direction oblique to their normal) is represented exactly by a
sheared affine whose third column is the real slice-to-slice displacement; `meta
["gantry_tilt_deg"]` reports it. On a sheared grid the third `Volume.spacing` is the length of
that displacement; the distance between slice planes is `meta["slice_gap_mm"]` and the voxel
volume is |det(affine)|. HU = RescaleSlope * stored + RescaleIntercept (or the Modality LUT);
voxels whose STORED value is the PixelPaddingValue (or within the padding range) become air,
`AIR_HU` = -1000 HU, rather than an out-of-range value such as -3024 HU. Compressed transfer
syntaxes (JPEG 2000, JPEG-LS, JPEG, RLE, deflate) are decoded by pydicom's pixel-data plugins
(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle). `meta["slice_uris"]` and
`meta["sop_instance_uids"]` name the source instance of each k (what a DICOM SEG references).

Error messages never quote file content (a reader pointed at a secret must not copy it into
a row): foreign exception texts go through `safe_reason`, header values are shown only when
they are well-formed codes or UIDs.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.pixels import apply_modality_lut

from resdsn_ray import storage
from resdsn_ray.errors import InputError

AIR_HU = -1000.0
"""HU written where DICOM pixel padding marks voxels outside the scanned field of view."""
MAX_AXIS = 4096
MAX_VOXELS = 2_000_000_000
PEAK_BYTES_PER_VOXEL = 14
"""Working bytes per voxel while a case is segmented, besides its stored voxels (`peak_bytes`)."""
SLICE_TOLERANCE = 0.05
"""Largest allowed distance of a slice from its place on the grid, as a fraction of the step."""
DUPLICATE_MM = 0.01
"""Slices closer than this along the normal are duplicates."""
_GZIP_SLACK = 1 << 20  # decompressed bytes tolerated past what the header describes
_NIFTI_PEEK = 544  # enough for a NIfTI-1 (348) or NIfTI-2 (540) header
HEADER_PREFIX = 16 << 10
"""Bytes first read of a DICOM file for its header; grown eightfold until the header fits."""
_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")
_REASON_CHARS = 300


def safe_reason(exc: BaseException) -> str:
    """`Type: message` of a foreign exception with every quoted value replaced by `<...>`.

    Parsers quote what they could not parse (`could not convert string to float: 'root:x:0'`,
    gzip's `Not a gzipped file (b'ro')`): that would copy file content into an error row.
    """
    text = _QUOTED.sub("<...>", str(exc)).replace("\n", " ")
    text = " ".join(text.split())[:_REASON_CHARS]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Volume:
    """One CT volume in HU on its voxel grid."""

    array: np.ndarray
    affine: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


GRID_ATOL_MM = 1e-3
"""Largest affine difference (mm) between two grids that count as the same (float32 headers)."""


def check_same_grid(label: Volume, image_shape: tuple[int, ...], image_affine: np.ndarray) -> None:
    """The one grid check: `label` lies on the image's voxel grid (shape AND affine), else InputError.

    A label of the right shape on another affine (flipped, LPS vs RAS, resampled) would score a
    correct mask as wrong, or train on misplaced organs.
    """
    if label.shape != tuple(image_shape):
        raise InputError(label.source, f"label shape {label.shape} differs from the image's {tuple(image_shape)}")
    if not np.allclose(label.affine, image_affine, atol=GRID_ATOL_MM):
        raise InputError(label.source, "label grid (affine) differs from the image's")


# ---------------------------------------------------------------------------------------------
# Reading


def peak_bytes(voxels: int, stored: np.dtype) -> int:
    """About the most memory segmenting a volume holds: the stored voxels and the working copies
    (float32 HU, the preprocessed input, the float32 score map, the uint8 mask)."""
    return voxels * (np.dtype(stored).itemsize + PEAK_BYTES_PER_VOXEL)


def _check_budget(uri: str, voxels: int, stored: np.dtype, max_bytes: int | None) -> None:
    if max_bytes and peak_bytes(voxels, stored) > max_bytes:
        raise InputError(uri, f"needs about {peak_bytes(voxels, stored) / 1e9:.1f} GB to segment ({voxels:,} voxels "
                              f"stored as {np.dtype(stored)}), over the case budget of {max_bytes / 1e9:g} GB (--max-case-gb)")


def read_volume(uri: str, series_uid: str | None = None, max_bytes: int | None = None) -> Volume:
    """Read a NIfTI file or a DICOM series folder at `uri` (path, file://, s3://, any fsspec URL).

    `series_uid` picks one series of a folder that holds several (what `archive` lists as a
    case); with it, a NIfTI file or a folder without that series is refused. A volume whose
    header says it would need more than `max_bytes` to segment (`peak_bytes`) is refused before
    its voxels are decoded: a 1 MB file may honestly describe gigabytes.
    """
    uri = str(uri)
    try:
        fs, path = storage.filesystem(uri)
        fs.invalidate_cache()
        is_dir = fs.isdir(path)
        is_file = not is_dir and storage.is_file(fs, path)  # a 5xx is "cannot access", never "does not exist"
    except (MemoryError, InputError):
        raise
    except Exception as exc:
        raise InputError(uri, f"cannot access: {safe_reason(exc)}") from exc
    if is_dir:
        return _read_dicom_series(uri, fs, path, series_uid, max_bytes)
    if not is_file:
        raise InputError(uri, "does not exist")
    if series_uid:
        raise InputError(uri, f"a file, not a DICOM series folder holding series {shown_uid(series_uid)}")
    try:
        data = storage.read_bytes(uri)
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(uri, f"cannot read: {safe_reason(exc)}") from exc
    return _read_nifti(uri, data, max_bytes)


def _read_nifti(uri: str, data: bytes, max_bytes: int | None = None) -> Volume:
    if not data:
        raise InputError(uri, "empty file")
    compressed = data[:2] == b"\x1f\x8b"
    stream = gzip.GzipFile(fileobj=BytesIO(data)) if compressed else BytesIO(data)
    try:
        head = stream.read(_NIFTI_PEEK)
        klass = _nifti_class(uri, head)
        header = klass.header_class.from_fileobj(BytesIO(head), check=False)  # unfixed, to judge it
        shape, dtype = _checked_header(uri, header)
        _check_budget(uri, int(np.prod(shape, dtype=np.int64)), dtype, max_bytes)
        offset = int(header.get_data_offset())
        needed = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
        if compressed:
            body = stream.read(max(needed - len(head), 0) + _GZIP_SLACK)
            if stream.read(1):
                raise InputError(uri, f"decompresses to far more than the {needed} bytes its header describes")
            payload = head + body
        else:
            payload = data
        if len(payload) < needed:
            raise InputError(uri, f"truncated: the header describes {needed} bytes, the file holds {len(payload)}")
        image = klass.from_bytes(payload)
        array = image.get_fdata(dtype=np.float32).reshape(shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except (MemoryError, InputError):
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(uri, f"corrupt or truncated gzip stream: {safe_reason(exc)}") from exc
    except Exception as exc:
        raise InputError(uri, f"unreadable NIfTI: {safe_reason(exc)}") from exc
    _check_affine(uri, affine)
    _check_finite(uri, array)
    hdr = image.header
    sform, qform = int(hdr["sform_code"]), int(hdr["qform_code"])
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)  # header's are reset on load
    return Volume(
        array=array,
        affine=affine,
        source=uri,
        meta=_common_meta("nifti", array, affine, dtype)
        | {
            "modality": None,
            "series_uid": None,
            "rescale_slope": slope,
            "rescale_intercept": inter,
            "nifti_version": 2 if klass is nib.Nifti2Image else 1,
            "compressed": compressed,
            "affine_source": "sform" if sform else "qform" if qform else "pixdim",
            "qform_matches_sform": bool(np.allclose(hdr.get_qform(), hdr.get_sform(), atol=1e-3))
            if sform and qform
            else None,
        },
    )


def _nifti_class(uri: str, head: bytes) -> type[nib.Nifti1Image]:
    """The image class for a header, from its magic (never from the file name)."""
    if head[344:348] == b"n+1\x00":
        return nib.Nifti1Image
    if head[4:12] == b"n+2\x00\r\n\x1a\n":
        return nib.Nifti2Image
    if head[344:348] == b"ni1\x00" or head[4:8] == b"ni2\x00":
        raise InputError(uri, "a NIfTI .hdr/.img pair header; only single-file NIfTI is supported")
    if head[128:132] == b"DICM":
        raise InputError(uri, "a single DICOM file; give the folder holding the whole series")
    raise InputError(uri, "not a NIfTI file (wrong magic)")


def _checked_header(uri: str, header: nib.Nifti1Header) -> tuple[tuple[int, int, int], np.dtype]:
    """The 3-D shape (trailing singleton axes squeezed) and on-disk dtype, or InputError."""
    full = tuple(int(s) for s in header.get_data_shape())
    shape = full
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if any(s < 1 for s in full):
        raise InputError(uri, f"invalid header dimensions {full}")
    if len(shape) != 3:
        raise InputError(uri, f"image is {len(shape)}-D with shape {full}; need a 3-D volume")
    if min(shape) < 2:
        raise InputError(uri, f"shape {shape} has a single voxel along an axis; need a 3-D volume")
    if max(shape) > MAX_AXIS or int(np.prod(full, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(
            uri, f"absurd header dimensions {full} (limits: {MAX_AXIS} per axis, {MAX_VOXELS} voxels)"
        )
    dtype = np.dtype(header.get_data_dtype())
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise InputError(uri, f"voxel type {dtype} is not a scalar intensity")
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise InputError(uri, f"voxel sizes (pixdim) {pixdim.tolist()} must be positive")
    return shape, dtype  # type: ignore[return-value]


def _check_affine(uri: str, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError(uri, "affine holds NaN or infinite values")
    columns = affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if np.any(norms < 1e-6) or abs(np.linalg.det(columns)) < 1e-6 * float(np.prod(norms)):
        raise InputError(uri, f"degenerate affine (zero voxel size or determinant):\n{affine}")


def _check_finite(uri: str, array: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(uri, f"{bad} voxels are NaN or infinite")


def _common_meta(fmt: str, array: np.ndarray, affine: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    return {
        "format": fmt,
        "shape": [int(s) for s in array.shape],
        "n_slices": int(array.shape[2]),
        "spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(dtype),
    }


# ---------------------------------------------------------------------------------------------
# DICOM series


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
CT_IMAGE_CLASSES = {
    str(uid.CTImageStorage),
    str(uid.EnhancedCTImageStorage),
    str(uid.LegacyConvertedEnhancedCTImageStorage),
}


@dataclass
class _Slice:
    uri: str
    ds: Dataset


def read_files(fs: Any, paths: list[str], start: int | None = None, end: int | None = None) -> list[bytes]:
    """The bytes `start:end` of each file, fetched concurrently where the filesystem can.

    Never `fs.cat(list)`: fsspec glob-expands each name, so a folder such as `d09_glob[ab]`
    would match nothing (or other files).
    """
    if not paths:
        return []
    blobs = fs.cat_ranges(list(paths), start, end, on_error="return")
    for blob in blobs:
        if isinstance(blob, BaseException):
            raise blob
    return blobs


def _folder_files(uri: str, fs: Any, path: str) -> tuple[list[dict[str, Any]], int]:
    """The visible files of a folder (fsspec entries, by name) and its count of subfolders."""
    try:
        entries = fs.ls(path, detail=True)
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(uri, f"cannot list folder: {safe_reason(exc)}") from exc
    files = sorted(
        (e for e in entries if e.get("type") == "file" and not posixpath.basename(e["name"]).startswith(".")),
        key=lambda e: e["name"],
    )
    return files, sum(e.get("type") == "directory" for e in entries)


def _read_dicom_series(uri: str, fs: Any, path: str, series_uid: str | None, max_bytes: int | None = None) -> Volume:
    files, folders = _folder_files(uri, fs, path)
    names = [e["name"] for e in files]
    ignored: list[str] = []
    others = 0
    if series_uid:  # read whole only the files whose header is of this series (or unreadable)
        wanted = []
        for name, head in zip(names, read_dicom_headers(fs, names, [e.get("size") for e in files])):
            if head is None:
                ignored.append(posixpath.basename(name))
            elif isinstance(head, InputError) or str(head.get("SeriesInstanceUID", "")) == series_uid:
                wanted.append(name)
            else:
                others += 1
        names = wanted
    try:
        blobs = read_files(fs, names)
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(uri, f"cannot read folder: {safe_reason(exc)}") from exc
    slices = []
    for name, blob in zip(names, blobs):
        file_uri = storage.join(uri, posixpath.basename(name))
        ds = _parse_dicom(file_uri, blob)
        if ds is None:
            ignored.append(posixpath.basename(name))
        else:
            slices.append(_Slice(file_uri, ds))
    del blobs
    ignored.sort()
    if series_uid:
        slices = [s for s in slices if str(s.ds.get("SeriesInstanceUID", "")) == series_uid]
        if not slices:
            raise InputError(uri, f"no DICOM image of series {shown_uid(series_uid)} in the folder "
                                  f"({len(files)} files, {others} of other series)")
    if not slices:
        raise InputError(uri, f"no DICOM image files in the folder ({len(files)} files, {folders} subfolders)")
    series = Counter(str(s.ds.get("SeriesInstanceUID", "")) for s in slices)
    if len(series) > 1:
        listing = ", ".join(f"{shown_uid(key)} ({n} files)" for key, n in series.most_common())
        raise InputError(uri, f"holds {len(series)} DICOM series: {listing}; a folder must hold exactly one "
                              "(or name the series to read)")
    for s in slices:
        _check_slice(s)
    if len(slices) < 2:
        raise InputError(uri, "a single slice; need a series of at least 2 slices for a 3-D volume")
    first = slices[0]
    row, col = _orientation(first)
    spacing = _floats(first, "PixelSpacing", 2)
    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    _check_budget(uri, rows * cols * len(slices), _stored_dtype(first), max_bytes)
    for s in slices[1:]:
        if not np.allclose(_floats(s, "ImageOrientationPatient", 6), np.r_[row, col], atol=1e-4):
            raise InputError(s.uri, f"ImageOrientationPatient differs from {_name(first)}'s within the series")
        if not np.allclose(_floats(s, "PixelSpacing", 2), spacing, rtol=1e-4, atol=1e-5):
            raise InputError(s.uri, f"PixelSpacing differs from {_name(first)}'s within the series")
        if (int(s.ds.Rows), int(s.ds.Columns)) != (rows, cols):
            raise InputError(s.uri, f"slice size differs from {_name(first)}'s within the series")

    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.array([_floats(s, "ImagePositionPatient", 3) for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[k] for k in order]
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps < DUPLICATE_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise InputError(
            uri, f"duplicate slice positions: {_name(slices[k])} and {_name(slices[k + 1])} lie at {along[k]:.3f} mm"
        )
    n = len(slices)
    if max(rows, cols, n) > MAX_AXIS or rows * cols * n > MAX_VOXELS:
        raise InputError(uri, f"absurd dimensions {cols}x{rows}x{n} (limits: {MAX_AXIS} per axis, {MAX_VOXELS} voxels)")
    step = (positions[-1] - positions[0]) / (n - 1)
    slice_gap = float(step @ normal)
    deviation = np.linalg.norm(positions - (positions[0] + np.arange(n)[:, None] * step), axis=1)
    if deviation.max() > SLICE_TOLERANCE * slice_gap:
        worst = slices[int(np.argmax(deviation))]
        raise InputError(
            uri,
            f"slices are not evenly spaced (a missing slice or variable spacing): gaps along the normal "
            f"range {gaps.min():.3f}-{gaps.max():.3f} mm for a mean of {slice_gap:.3f} mm; "
            f"{_name(worst)} is {deviation.max():.3f} mm off the regular grid",
        )
    tilt = float(np.degrees(np.arccos(np.clip(slice_gap / np.linalg.norm(step), -1.0, 1.0))))

    volume = np.empty((cols, rows, n), dtype=np.float32, order="F")  # hu.T fills it contiguously
    padded = 0
    for k, s in enumerate(slices):
        hu, pad = _slice_hu(s, rows, cols)
        padded += int(np.count_nonzero(pad))
        volume[:, :, k] = hu.T
    _check_finite(uri, volume)

    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    ds = first.ds
    slope, inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return Volume(
        array=volume,
        affine=affine,
        source=uri,
        meta=_common_meta("dicom", volume, affine, _stored_dtype(first))
        | {
            "modality": str(ds.Modality),
            "series_uid": str(ds.SeriesInstanceUID),
            "slice_uris": [s.uri for s in slices],
            "sop_instance_uids": [str(s.ds.get("SOPInstanceUID", "")) for s in slices],
            "study_uid": str(ds.get("StudyInstanceUID", "")) or None,
            "rescale_slope": float(slope) if slope is not None else None,
            "rescale_intercept": float(inter) if inter is not None else None,
            "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
            "manufacturer": str(ds.get("Manufacturer", "")) or None,
            "padding_value": _padding_range(ds)[0] if "PixelPaddingValue" in ds else None,
            "padded_voxels": padded,
            "slice_gap_mm": slice_gap,
            "gantry_tilt_deg": tilt,
            "n_files": len(files),
            "ignored_files": ignored,
            "other_series_files": others,
        },
    )


def _header_complete(tag: Any, vr: Any, length: Any, last_group: int) -> bool:
    return tag.group > last_group or tag.group == 0x0004  # 0004: a DICOMDIR's directory records


def read_dicom_headers(
    fs: Any, paths: list[str], sizes: list[int | None], last_group: int = 0x0020
) -> list[Dataset | InputError | None]:
    """The header of each file up to `last_group` (default: identity, series and position), from
    a bounded prefix: `HEADER_PREFIX` bytes, grown eightfold while the header runs past it.

    Per file: a Dataset (no pixel data, `file_meta` set), None when it is not DICOM, or an
    InputError when it cannot be read or has the DICM preamble but an unparseable header.
    """
    out: list[Dataset | InputError | None] = [None] * len(paths)
    todo = list(range(len(paths)))
    length = HEADER_PREFIX
    while todo:
        blobs = fs.cat_ranges([paths[i] for i in todo], 0, length, on_error="return")
        more = []
        for i, blob in zip(todo, blobs):
            if isinstance(blob, MemoryError):
                raise blob
            if isinstance(blob, BaseException):
                out[i] = InputError(paths[i], f"cannot read: {safe_reason(blob)}")
                continue
            whole = len(blob) < length or (sizes[i] is not None and len(blob) >= sizes[i])
            head = _parse_header(paths[i], blob, whole, last_group)
            if head is _MORE:
                more.append(i)
            else:
                out[i] = head  # type: ignore[assignment]
        todo, length = more, length * 8
    return out


_MORE = object()


def _parse_header(path: str, blob: bytes, whole: bool, last_group: int) -> Dataset | InputError | None | object:
    """One header from the first bytes of a file; `_MORE` when they end before the header does.

    Only a file with the DICM preamble is read further: a large file without it (an archive, a
    video) is judged on its first bytes rather than downloaded whole.
    """
    marked = blob[128:132] == b"DICM"
    whole = whole or not marked
    stream = BytesIO(blob)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(
                stream, stop_when=lambda *a: _header_complete(*a, last_group), force=not marked
            )
            stopped = stream.tell() < len(blob)
            for element in ds:  # deferred values: a cut inside one raises here, not at read
                _ = element.value
    except MemoryError:
        raise
    except Exception as exc:
        if not whole:
            return _MORE
        return InputError(path, f"unreadable DICOM header: {safe_reason(exc)}") if marked else None
    if not (stopped or whole):
        return _MORE
    meta = getattr(ds, "file_meta", None) or Dataset()
    if meta.get("MediaStorageSOPClassUID") or "SOPClassUID" in ds or ("Modality" in ds and "SeriesInstanceUID" in ds):
        return ds
    return InputError(path, "DICOM preamble without a readable header") if marked else None


def _parse_dicom(file_uri: str, blob: bytes) -> Dataset | None:
    """The dataset of an image instance; None for a file to ignore.

    A file with the DICM preamble must parse, and must hold pixel data if it claims to be a CT
    image (a truncated slice parses silently without its pixels: dropping it could shorten the
    volume unnoticed). It is ignored only if it is another kind of instance (RTSTRUCT, SR,
    DICOMDIR). A file without the preamble is read leniently and ignored unless it parses into
    an image instance.
    """
    marked = blob[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(BytesIO(blob), force=not marked)
            has_pixels = any(keyword in ds for keyword in _PIXEL_KEYWORDS)
            meta = getattr(ds, "file_meta", None) or Dataset()
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
            claims_image = sop_class in CT_IMAGE_CLASSES or "Rows" in ds
    except MemoryError:
        raise
    except Exception as exc:
        if marked:
            raise InputError(file_uri, f"unreadable DICOM: {safe_reason(exc)}") from exc
        return None
    if has_pixels:
        return None if is_localizer(ds) else ds
    if marked and (claims_image or not sop_class):
        raise InputError(file_uri, "DICOM image without pixel data (a truncated file?)")
    return None


def is_localizer(ds: Dataset) -> bool:
    """A scout image (ImageType LOCALIZER): never a slice of a volume, even in the volume's series."""
    value = ds.get("ImageType") or []
    return "LOCALIZER" in [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def _check_slice(s: _Slice) -> None:
    ds = s.ds
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise InputError(s.uri, f"modality is {shown_code(modality)}; only CT is supported")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(s.uri, "multi-frame (enhanced) DICOM is not supported; give a series of single-frame slices")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(s.uri, f"{ds.SamplesPerPixel} samples per pixel; CT must be greyscale")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if ds.get(tag) in (None, ""):
            raise InputError(s.uri, f"missing {tag}: cannot place the slice in space")
    if "ModalityLUTSequence" not in ds and ("RescaleSlope" not in ds or "RescaleIntercept" not in ds):
        raise InputError(s.uri, "missing RescaleSlope/RescaleIntercept: cannot convert to HU")
    spacing = _floats(s, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise InputError(s.uri, f"PixelSpacing {spacing.tolist()} must be positive")
    _orientation(s)


def _orientation(s: _Slice) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (LPS), checked to be unit and orthogonal."""
    iop = _floats(s, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(s.uri, f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    return row, col


def _floats(s: _Slice, tag: str, count: int) -> np.ndarray:
    try:
        values = np.array([float(v) for v in s.ds[tag].value], dtype=np.float64)
    except Exception as exc:
        raise InputError(s.uri, f"unreadable {tag}: {safe_reason(exc)}") from exc
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputError(s.uri, f"{tag} must hold {count} finite numbers (holds {values.size})")
    return values


def _slice_hu(s: _Slice, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """One slice in HU (padding set to air) and its padding mask, indexed [row, column]."""
    ds = s.ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
            hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except MemoryError:
        raise
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        raise InputError(s.uri, f"cannot decode pixel data ({name}): {safe_reason(exc)}") from exc
    if stored.shape != (rows, cols):
        raise InputError(s.uri, f"pixel data has shape {stored.shape}, the header says {(rows, cols)}")
    pad = np.zeros(stored.shape, dtype=bool)
    if "PixelPaddingValue" in ds:
        low, high = _padding_range(ds)
        pad = (stored >= low) & (stored <= high)
        hu[pad] = AIR_HU
    return hu, pad


def _padding_range(ds: Dataset) -> tuple[int, int]:
    """Stored values marking padding: PixelPaddingValue up to PixelPaddingRangeLimit if given.

    A value written with the wrong signedness (US for signed pixels) is reinterpreted.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1

    def stored(value: Any) -> int:
        value = int(value)
        return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value

    first = stored(ds.PixelPaddingValue)
    last = stored(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else first
    return min(first, last), max(first, last)


def _stored_dtype(s: _Slice) -> np.dtype:
    bits = int(s.ds.get("BitsAllocated", 16))
    signed = int(s.ds.get("PixelRepresentation", 0)) == 1
    return np.dtype(f"{'i' if signed else 'u'}{max(bits, 8) // 8}")


def _name(s: _Slice) -> str:
    return posixpath.basename(s.uri.replace("\\", "/"))


_CODE = re.compile(r"[A-Z0-9 _]{1,16}")
_UID = re.compile(r"[0-9.]{1,64}")


def shown_code(value: str) -> str:
    """A header code string (CS) as shown in a message: quoted when well-formed, never raw bytes."""
    return repr(value) if _CODE.fullmatch(value) else "missing" if not value else "not a valid code"


def shown_uid(value: str) -> str:
    """A UID as shown in a message: itself when well-formed, never raw bytes."""
    return value if _UID.fullmatch(value) else "<none>" if not value else "<malformed UID>"


# ---------------------------------------------------------------------------------------------
# Writing


def nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str = "", scale: float | None = None) -> bytes:
    """Gzipped NIfTI-1 of `array` with sform = `affine` (code 'scanner') and units mm;
    `description` (at most 80 bytes) goes into the header's `descrip` field; `scale`: the
    stored values times `scale` are the data (`scl_slope`: uint8-quantised probabilities).

    The qform equals the sform (code 'scanner') whenever a qform can hold the affine. A
    quaternion cannot hold a shear (a gantry-tilted DICOM series): then the qform holds
    nibabel's nearest rigid approximation with code 0 ('unknown'), so that NIfTI readers use
    the exact sform and readers that need an orthonormal grid (ITK) refuse it rather than
    misplace it.
    """
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if not np.allclose(image.get_qform(), affine, rtol=1e-5, atol=1e-4):
        image.set_qform(affine, code=0)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:80]
    if scale is not None:
        image.header.set_data_dtype(array.dtype)
        image.header.set_slope_inter(scale, 0.0)
    return gzip.compress(image.to_bytes(), compresslevel=1)


def write_nifti(uri: str, array: np.ndarray, affine: np.ndarray, description: str = "", scale: float | None = None) -> None:
    """Write a gzipped NIfTI at `uri`, whole or not at all (`nifti_bytes`)."""
    storage.write_bytes(uri, nifti_bytes(array, affine, description, scale))


def read_description(uri: str) -> str | None:
    """The `descrip` field of a gzipped NIfTI's header, from its first bytes (None: unreadable)."""
    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb", block_size=1 << 14) as handle:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(handle.read(1 << 14), 348)
        return bytes(nib.Nifti1Header.from_fileobj(BytesIO(head))["descrip"].item()).decode(errors="replace")
    except Exception:  # noqa: BLE001  (a missing or broken mask is one to recompute)
        return None


def write_mask(uri: str, mask: np.ndarray, like: Volume, description: str = "") -> None:
    """Write `mask` as uint8 NIfTI on exactly `like`'s shape and affine, whole or not at all;
    `description` names what made it (the archive job stamps the row that owns it)."""
    mask = np.asarray(mask)
    if tuple(mask.shape) != like.shape:
        raise ValueError(f"{uri}: mask shape {mask.shape} differs from the input's {like.shape}")
    if mask.dtype != np.bool_ and (
        mask.dtype.kind not in "iuf" or (mask.size and (mask.min() < 0 or mask.max() > 255 or np.any(mask % 1)))
    ):
        raise ValueError(f"{uri}: mask values must be integer labels in 0..255 (dtype {mask.dtype})")
    write_nifti(uri, mask.astype(np.uint8), like.affine, description)
