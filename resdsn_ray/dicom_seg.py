"""DICOM SEG output: a mask as a Segmentation IOD that PACS and viewers overlay on its source series.

The SEG (written with highdicom) references the source series and every source instance; each
frame is one source slice, so the mask lies exactly on the series' slices: `read_volume` stacks
slice k of the series at `meta["slice_uris"][k]`, and `array[i, j, k] = pixel[j, i]`, so frame k
is `mask[:, :, k].T`, derived from the instance `meta["sop_instance_uids"][k]` and placed at its
ImagePositionPatient. Before writing, every source header is read again and checked to be the
instance and position the volume was built from (a series that changed since is refused).

The segment is described in SNOMED CT (category "Anatomical Structure" 91723000, type
"Pancreas" 15776009), algorithm type AUTOMATIC with the caller's algorithm name and version
(the project and the bundle ids). UIDs are derived from the source series, the algorithm and
the mask, so the same inputs give the same SEG (a rerun does not add a second object to PACS).
"""

from __future__ import annotations

import hashlib
import warnings
from io import BytesIO

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from resdsn_ray import storage
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import Volume, read_dicom_headers

ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
PANCREAS = hd.sr.CodedConcept("15776009", "SCT", "Pancreas")
SEG_SERIES_NUMBER = 9901
"""Series number of the SEG series (high, so viewers list it after the acquisitions)."""
MANUFACTURER = "resdsn_ray"
POSITION_ATOL_VOXELS = 1e-3
"""How far (in voxels) a re-read source slice may lie from where the volume put it."""
_PIXEL_GROUP = 0x7FDF  # read headers up to (not including) the pixel data
_LPS = np.diag([-1.0, -1.0, 1.0])


def write_dicom_seg(
    uri: str,
    mask: np.ndarray,
    source_series: Volume,
    algorithm_name: str,
    algorithm_version: str,
    segment_label: str = "pancreas",
) -> None:
    """Write `mask` (on `source_series`' grid, as `read_volume` returned it) as a binary DICOM
    SEG at `uri`, whole or not at all. InputError when the source is not a DICOM series."""
    data = dicom_seg_bytes(mask, source_series, algorithm_name, algorithm_version, segment_label)
    storage.write_bytes(uri, data)


def dicom_seg_bytes(
    mask: np.ndarray,
    source_series: Volume,
    algorithm_name: str,
    algorithm_version: str,
    segment_label: str = "pancreas",
) -> bytes:
    """The DICOM SEG file of `mask` over `source_series` (see `write_dicom_seg`)."""
    source = source_series.source
    if source_series.meta.get("format") != "dicom" or not source_series.meta.get("slice_uris"):
        raise InputError(source, f"DICOM SEG needs a DICOM series as input, not {source_series.meta.get('format')!r} "
                                 "(write a NIfTI mask for it)")
    mask = np.asarray(mask)
    if mask.shape != source_series.shape:
        raise ValueError(f"{source}: mask shape {mask.shape} differs from the series' {source_series.shape}")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"{source}: mask dtype {mask.dtype} is not numeric")
    headers = _source_headers(source_series)
    binary = np.ascontiguousarray((mask != 0).transpose(2, 1, 0), dtype=np.uint8)  # frame k = mask[:, :, k].T
    series_uid = source_series.meta["series_uid"]
    digest = hashlib.sha256(binary.tobytes()).hexdigest()
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=PANCREAS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom and pydicom warn about the source's own odd values
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=binary,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=generate_uid(entropy_srcs=[series_uid, algorithm_name, algorithm_version]),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[series_uid, algorithm_name, algorithm_version, digest]),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm_name[:64],
            software_versions=algorithm_version[:64],
            device_serial_number=MANUFACTURER,
            content_label="SEGMENTATION",
            content_description=f"{segment_label} ({algorithm_name})"[:64],
        )
        buffer = BytesIO()
        seg.save_as(buffer)
    return buffer.getvalue()


def _source_headers(volume: Volume) -> list[Dataset]:
    """The pixel-free header of each source slice in k order, checked against the volume: the
    same instance, at the position the volume's affine gives slice k."""
    uris = volume.meta["slice_uris"]
    fs, _ = storage.filesystem(uris[0])
    heads = read_dicom_headers(fs, [storage.filesystem(u)[1] for u in uris], [None] * len(uris), _PIXEL_GROUP)
    inverse = np.linalg.inv(volume.affine)
    for k, (uri, head) in enumerate(zip(uris, heads)):
        if not isinstance(head, Dataset):
            raise InputError(uri, head.reason if isinstance(head, InputError) else "no longer a DICOM file")
        if str(head.get("SOPInstanceUID", "")) != volume.meta["sop_instance_uids"][k]:
            raise InputError(uri, "changed since the series was read (another SOPInstanceUID)")
        ras = _LPS @ np.asarray([float(v) for v in head.ImagePositionPatient])
        ijk = inverse[:3, :3] @ ras + inverse[:3, 3]
        if not np.allclose(ijk, [0, 0, k], atol=POSITION_ATOL_VOXELS):
            raise InputError(uri, f"does not lie on slice {k} of the volume (changed since the series was read)")
    return heads  # type: ignore[return-value]
