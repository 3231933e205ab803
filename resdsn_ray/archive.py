"""List a CT archive as case rows: one row per case, each with its image (and label) URI.

An archive is an MSD-style prefix (`imagesTr/`, `imagesTs/`, `labelsTr/`, optional
`dataset.json`), a flat folder of `*.nii[.gz]` files and DICOM series folders, or a manifest
file (CSV, Parquet or JSONL with `case_id, image_uri[, label_uri]`). Listing only names files;
it never opens an image, so a corrupt case cannot stop it. A case id becomes an output key
(`masks/<case_id>.nii.gz`), so an id that could escape that folder or is unreadable (path
separators, `..`, control characters, empty) or that repeats an earlier id is kept as a case
with `error` set: the job reports it as an error row and writes nothing for it.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import unicodedata
from dataclasses import dataclass

import pandas as pd

from resdsn_ray import storage
from resdsn_ray.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".jsonl", ".ndjson")
MSD_IMAGES = ("imagesTr", "imagesTs")
MSD_LABELS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}
MAX_ID_LENGTH = 200
# Unicode categories that are invisible or break lines: control, format, surrogate, separators.
UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@dataclass(frozen=True)
class Case:
    """One case of an archive; `error` says why it cannot be processed (None when it can)."""

    case_id: str
    image_uri: str
    label_uri: str | None = None
    error: str | None = None


def unsafe_reason(case_id: str) -> str | None:
    """Why `case_id` is not safe as an output key, or None when it is."""
    if not case_id:
        return "empty case id"
    if "/" in case_id or "\\" in case_id:
        return f"case id {case_id!r} contains a path separator"
    if ".." in case_id:
        return f"case id {case_id!r} contains '..'"
    if any(unicodedata.category(ch) in UNSAFE_CATEGORIES for ch in case_id):
        return f"case id {case_id!r} contains control or invisible characters"
    if case_id != case_id.strip() or case_id.startswith("."):
        return f"case id {case_id!r} starts with '.' or has leading/trailing whitespace"
    if len(case_id) > MAX_ID_LENGTH:
        return f"case id is longer than {MAX_ID_LENGTH} characters"
    return None


def check_case_id(case_id: str) -> str:
    """`case_id` itself when safe as an output key; InputError otherwise."""
    reason = unsafe_reason(case_id)
    if reason:
        raise InputError(case_id, reason)
    return case_id


def case_id_from_name(name: str) -> str:
    """The case id of a file or folder name: the name without `.nii.gz` / `.nii`."""
    name = posixpath.basename(name.rstrip("/"))
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_manifest(uri: str) -> bool:
    return str(uri).lower().endswith(MANIFEST_SUFFIXES)


def list_cases(uri: str) -> list[Case]:
    """All cases of the archive or manifest at `uri`, sorted by case id.

    Raises InputError when `uri` is not a readable archive or holds no case at all; a single
    bad case never raises, it is returned with `error` set.
    """
    uri = str(uri)
    cases = _list_manifest(uri) if is_manifest(uri) else _list_folder(uri)
    if not cases:
        raise InputError(uri, "no cases found (expected MSD imagesTr/imagesTs, *.nii[.gz] files, "
                              "DICOM series folders, or a CSV/Parquet/JSONL manifest)")
    return _mark_bad_ids(cases)


def _mark_bad_ids(cases: list[Case]) -> list[Case]:
    """Set `error` on unsafe ids and on every repeat of an id (the first listed keeps it)."""
    seen: dict[str, str] = {}
    out: list[Case] = []
    for case in cases:
        error = case.error or unsafe_reason(case.case_id)
        if error is None and case.case_id in seen:
            error = f"duplicate case id {case.case_id!r} (also {seen[case.case_id]})"
        if error is None:
            seen[case.case_id] = case.image_uri
        out.append(Case(case.case_id, case.image_uri, case.label_uri, error))
    return sorted(out, key=lambda c: c.case_id)


def _entries(uri: str) -> dict[str, str]:
    """Visible children of a folder URI: basename -> 'file' | 'directory' (empty if missing)."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)  # s3fs caches listings per process; an archive may have changed
    try:
        listing = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise InputError(uri, f"cannot list: {err}") from err
    entries: dict[str, str] = {}
    for entry in listing:
        full = str(entry["name"]).rstrip("/")
        name = posixpath.basename(full)
        if full != path.rstrip("/") and name and not name.startswith("."):  # skip self, hidden
            entries[name] = "directory" if entry.get("type") == "directory" else "file"
    return entries


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _list_folder(uri: str) -> list[Case]:
    entries = _entries(uri)
    if not entries:
        raise InputError(uri, "archive folder does not exist or is empty")
    if any(entries.get(name) == "directory" for name in MSD_IMAGES):
        return _list_msd(uri, entries)
    cases = []
    for name, kind in sorted(entries.items()):
        if kind == "directory" or _is_nifti(name):  # a folder is a DICOM series candidate
            cases.append(Case(case_id_from_name(name), storage.join(uri, name)))
    return cases


def _list_msd(uri: str, entries: dict[str, str]) -> list[Case]:
    cases = []
    for images in MSD_IMAGES:
        if entries.get(images) != "directory":
            continue
        labels_dir = MSD_LABELS[images]
        labels: dict[str, str] = {}
        if entries.get(labels_dir) == "directory":
            for name in sorted(_entries(storage.join(uri, labels_dir))):
                if _is_nifti(name):
                    labels.setdefault(case_id_from_name(name), storage.join(uri, labels_dir, name))
        for name, kind in sorted(_entries(storage.join(uri, images)).items()):
            if kind == "directory" or _is_nifti(name):
                case_id = case_id_from_name(name)
                cases.append(Case(case_id, storage.join(uri, images, name), labels.get(case_id)))
    return cases


def _list_manifest(uri: str) -> list[Case]:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise InputError(uri, "manifest not found") from err
    except OSError as err:
        raise InputError(uri, f"cannot read manifest: {err}") from err
    lower = uri.lower()
    try:
        if lower.endswith(".csv"):
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        elif lower.endswith((".parquet", ".pq")):
            table = pd.read_parquet(io.BytesIO(data))
        else:
            table = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
    except Exception as err:  # pandas raises many parser-specific types
        raise InputError(uri, f"unreadable manifest: {err}") from err
    missing = {"case_id", "image_uri"} - set(table.columns)
    if missing:
        raise InputError(uri, f"manifest lacks column(s) {sorted(missing)}; needs case_id, image_uri[, label_uri]")
    cases = []
    for record in table.to_dict("records"):
        image = _text(record.get("image_uri"))
        label = _text(record.get("label_uri")) or None
        cases.append(Case(
            case_id=_text(record.get("case_id")),
            image_uri=_resolve(uri, image),
            label_uri=_resolve(uri, label) if label else None,
            error=None if image else "manifest row has no image_uri",
        ))
    return cases


def _text(value: object) -> str:
    """A manifest cell as text: missing values (None, NaN) become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _resolve(manifest: str, target: str) -> str:
    """A manifest entry as a URI; relative entries are relative to the manifest's folder."""
    if not target or "://" in target or target.startswith("/"):
        return target
    if "://" in manifest and not manifest.startswith("file://"):
        scheme, path = manifest.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(path), target))}"
    local = manifest.removeprefix("file://")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(local)), target))
