"""List a CT archive as case rows: one row per case, each with its image (and label) URI.

An archive is a folder (local, `file://`, `s3://`), listed recursively with ONE paginated
listing of its prefix, or a manifest file (CSV, Parquet or JSONL with `case_id, image_uri
[, label_uri, series_uid]`):
- MSD / nnU-Net layout: `imagesTr/`, `imagesTs/` with labels in `labelsTr/`, `labelsTs/`. nnU-Net
  channel names (`imagesTr/case_0000.nii.gz` with `labelsTr/case.nii.gz`) are the case `case`.
- Otherwise every `*.nii[.gz]` file below the folder is a case, and every CT image series of
  the DICOM files below it (PACS exports `Patient/Study/Series/*.dcm`, files without an
  extension, DICOMDIR exports) is a case: the files are grouped by SeriesInstanceUID per
  folder from their headers alone (a bounded prefix of each file, never the pixels).
  Localizers, dose reports, SEG/RTSTRUCT and every other non-CT-image object are skipped with
  their reason in `Listing.skipped`, as are files that are neither NIfTI nor DICOM.

Listing never decodes an image, so a corrupt case cannot stop it: a case that cannot be
processed is kept with `error` set, and the job reports it as an error row and writes nothing
for it. Case ids become output keys (`masks/<case_id>.nii.gz`): ids come from the path below
the archive (`Patient1/Study2/Series3` -> `Patient1_Study2_Series3`, a file's name without
`.nii[.gz]`), or from `PatientID_StudyDate_SeriesNumber` for series at the archive's top, with
the SeriesNumber (or a hash of the SeriesInstanceUID) appended where one folder holds several
series. An id that could escape the output folder or is unreadable (path separators, `..`,
control characters, empty) is an error case. An id that two sources claim (`a.nii` and
`a.nii.gz`, a DICOM folder and a file of the same stem) becomes ONE error case naming all of
them, the same on every run, so no listing error can stand in for the real case.

Hidden names (starting with '.') are not read: a hidden NIfTI file is an error case (so it is
seen, not silently dropped), macOS AppleDouble files (`._*`) and other hidden files or folders
are skipped. A symlink whose target lies outside the archive is refused. A manifest may only
point inside `allow_prefixes` (default: the manifest's own folder, or its bucket on object
storage): other schemes (`http(s)://`), other buckets, `/etc/passwd`, `/proc/...` are refused
at listing as error cases naming the reason.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import posixpath
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, MediaStorageDirectoryStorage

from resdsn_ray import storage, volumes
from resdsn_ray.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".jsonl", ".ndjson")
MSD_IMAGES = ("imagesTr", "imagesTs")
MSD_LABELS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NOT_IMAGE_SUFFIXES = (
    ".json", ".txt", ".csv", ".tsv", ".md", ".xml", ".html", ".htm", ".pdf", ".png", ".jpg", ".jpeg", ".gif",
    ".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".py", ".log", ".parquet", ".pq", ".jsonl", ".ndjson",
    ".yaml", ".yml", ".mha", ".mhd", ".nrrd", ".npy", ".npz", ".h5",
)
"""Names whose header is not read: never DICOM (saves a request per file on object storage)."""
NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")
SYSTEM_PATHS = ("/proc", "/sys", "/dev")
HEADER_BATCH = 1000
"""Files whose headers are fetched (concurrently) per batch while listing: bounds memory."""
MAX_ID_LENGTH = 200
# Unicode categories that are invisible or break lines: control, format, surrogate, separators.
UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@dataclass(frozen=True)
class Case:
    """One case of an archive; `error` says why it cannot be processed (None when it can).

    `series_uid` is set for a DICOM series: `image_uri` is its folder, and
    `volumes.read_volume(image_uri, series_uid=series_uid)` reads exactly that series.
    """

    case_id: str
    image_uri: str
    label_uri: str | None = None
    error: str | None = None
    series_uid: str | None = None


@dataclass(frozen=True)
class Skipped:
    """Something under the archive that is not a case, and why (a localizer, a SEG, notes.txt)."""

    uri: str
    reason: str


@dataclass(frozen=True)
class Listing:
    cases: list[Case]
    skipped: list[Skipped] = field(default_factory=list)


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


def list_cases(uri: str, allow_prefixes: Iterable[str] | None = None) -> list[Case]:
    """All cases of the archive or manifest at `uri`, sorted by case id (see `scan`)."""
    return scan(uri, allow_prefixes).cases


def scan(uri: str, allow_prefixes: Iterable[str] | None = None) -> Listing:
    """The cases of the archive or manifest at `uri` (sorted by id) and what was skipped.

    `allow_prefixes`: where a manifest's URIs may point (None: the manifest's own folder, or
    its bucket). Raises InputError when `uri` is not a readable archive or holds no case at
    all; a single bad case never raises, it is returned with `error` set.
    """
    uri = str(uri)
    listing = _scan_manifest(uri, allow_prefixes) if is_manifest(uri) else _scan_folder(uri)
    if not listing.cases:
        raise InputError(uri, "no cases found (expected MSD imagesTr/imagesTs, *.nii[.gz] files, "
                              "DICOM CT series, or a CSV/Parquet/JSONL manifest)")
    cases = [replace(c, error=c.error or unsafe_reason(c.case_id)) for c in listing.cases]
    return Listing(_merge_duplicates(cases), sorted(listing.skipped, key=lambda s: (s.uri, s.reason)))


def _merge_duplicates(cases: list[Case]) -> list[Case]:
    """One case per id: an id claimed by several sources becomes one error case naming them all."""
    by_id: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_id[case.case_id].append(case)
    out = []
    for case_id in sorted(by_id):
        group = sorted(by_id[case_id], key=_source)
        if len(group) == 1:
            out.append(group[0])
            continue
        sources = "; ".join(_source(c) for c in group)
        out.append(Case(case_id, group[0].image_uri,
                        error=f"duplicate case id {case_id!r}: {len(group)} sources: {sources} (rename all but one)"))
    return out


def _source(case: Case) -> str:
    return f"{case.image_uri} (series {case.series_uid})" if case.series_uid else case.image_uri


def is_nifti(name: str) -> bool:
    """Whether `name` is a NIfTI file by its suffix (else: a DICOM series or file)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Folders


@dataclass
class _Tree:
    """The files below an archive folder, by path relative to it, and what the scan set aside."""

    uri: str
    fs: Any
    root: str
    files: dict[str, dict[str, Any]]
    cases: list[Case] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    escaping: set[str] = field(default_factory=set)  # symlinks whose targets leave the archive

    def uri_of(self, rel: str) -> str:
        return storage.join(self.uri, rel) if rel else self.uri


def _scan_folder(uri: str) -> Listing:
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/") or root
    try:
        fs.invalidate_cache(root)  # s3fs caches listings per process; an archive may have changed
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    except OSError as err:
        raise InputError(uri, f"cannot list: {volumes.safe_reason(err)}") from err
    base = root.rstrip("/") + "/"
    files = {name[len(base):]: info for name, info in found.items() if name.startswith(base)}
    if not files:
        raise InputError(uri, "archive folder does not exist or is empty")
    tree = _Tree(uri, fs, root, {})
    _drop_hidden(tree, files)
    if storage.is_local(uri):
        _check_symlinks(tree)
    tops = {rel.split("/", 1)[0] for rel in tree.files if "/" in rel}
    if tops & set(MSD_IMAGES):
        _scan_msd(tree)
    else:
        _scan_images(tree, "", tree.files, labels={})
    return Listing(tree.cases, tree.skipped)


def _drop_hidden(tree: _Tree, files: dict[str, dict[str, Any]]) -> None:
    """Keep visible files in `tree.files`; a hidden NIfTI file is an error case, the rest skipped."""
    hidden_folders: Counter[str] = Counter()
    for rel, info in sorted(files.items()):
        parts = rel.split("/")
        if not any(part.startswith(".") for part in parts):
            tree.files[rel] = info
            continue
        folder = next((i for i, part in enumerate(parts[:-1]) if part.startswith(".")), None)
        name = parts[-1]
        if folder is not None:
            hidden_folders["/".join(parts[: folder + 1])] += 1
        elif name.startswith("._"):
            tree.skipped.append(Skipped(tree.uri_of(rel), "macOS AppleDouble metadata file"))
        elif is_nifti(name):
            tree.cases.append(Case(case_id_from_name(name), tree.uri_of(rel),
                                   error="hidden file (its name starts with '.'): rename it to process it"))
        else:
            tree.skipped.append(Skipped(tree.uri_of(rel), "hidden file"))
    for folder, count in hidden_folders.items():
        tree.skipped.append(Skipped(tree.uri_of(folder), f"hidden folder ({count} files not read)"))


def _check_symlinks(tree: _Tree) -> None:
    """Mark symlinked files that leave the archive; a symlinked folder is never followed: an
    error case when it leaves the archive, skipped when it points inside (listed there)."""
    real_root = os.path.realpath(tree.root)
    for rel, info in list(tree.files.items()):
        if not info.get("islink"):
            continue
        target = os.path.realpath(os.path.join(tree.root, rel))
        outside = os.path.commonpath([real_root, target]) != real_root
        if outside and os.path.isdir(target):
            del tree.files[rel]
            tree.cases.append(Case(_path_id(rel), tree.uri_of(rel), error="symlink to a folder outside the archive"))
        elif outside:
            tree.escaping.add(rel)
        elif not os.path.isfile(target):
            del tree.files[rel]
            tree.skipped.append(Skipped(tree.uri_of(rel), "symlink to a folder (not followed)"))


def _scan_msd(tree: _Tree) -> None:
    used: set[str] = set()
    for images in MSD_IMAGES:
        labels_dir = MSD_LABELS[images]
        labels = {case_id_from_name(rel[len(labels_dir) + 1:]): rel for rel in tree.files
                  if rel.startswith(labels_dir + "/") and rel.count("/") == 1 and is_nifti(rel)}
        below = {rel[len(images) + 1:]: info for rel, info in tree.files.items() if rel.startswith(images + "/")}
        used |= {f"{images}/{rel}" for rel in below}
        used |= set(_scan_images(tree, images, below, labels))
    for rel in sorted(set(tree.files) - used):
        tree.skipped.append(Skipped(tree.uri_of(rel), "not an image of imagesTr/ or imagesTs/"))


def _scan_images(tree: _Tree, prefix: str, files: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Cases of the files below `prefix` (relative paths); returns the label paths used."""
    def full(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    niftis = sorted(rel for rel in files if is_nifti(rel))
    nnunet = _nnunet_names([rel for rel in niftis if "/" not in rel], labels) if prefix else {}
    channels: dict[str, list[str]] = defaultdict(list)  # nnU-Net case -> its channel files
    for rel in niftis:
        if rel in nnunet:
            channels[nnunet[rel]].append(rel)
    used = []
    for case_id, rels in [*channels.items(), *((_path_id(rel), [rel]) for rel in niftis if rel not in nnunet)]:
        label = labels.get(case_id)
        if label:
            used.append(label)
        error = None
        if any(full(rel) in tree.escaping for rel in rels):
            error = "symlink to a target outside the archive"
        elif len(rels) > 1:  # only nnU-Net naming groups files: case_0000, case_0001, ...
            error = f"{len(rels)} channels ({', '.join(posixpath.basename(r) for r in rels)}); a CT case has one"
        tree.cases.append(Case(case_id, tree.uri_of(full(rels[0])), tree.uri_of(label) if label else None, error))
    dicom = {rel: info for rel, info in files.items() if not is_nifti(rel)}
    for case in _dicom_cases(tree, prefix, dicom):
        label = labels.get(case.case_id)
        if label:
            used.append(label)
            case = replace(case, label_uri=tree.uri_of(label))
        tree.cases.append(case)
    return used


def _nnunet_names(names: list[str], labels: dict[str, str]) -> dict[str, str]:
    """Image name -> case id under nnU-Net's naming (`<case>_<4-digit channel>`), if the folder uses it.

    It does when every image ends with a channel number, every case has channel 0000, and no
    label has an image's own name (MSD ids such as `liver_0001` have labels of that name).
    """
    matches = {name: NNUNET_CHANNEL.fullmatch(case_id_from_name(name)) for name in names}
    if not matches or not all(matches.values()):
        return {}
    bases = {m.group(1) for m in matches.values() if m}
    stems = {case_id_from_name(name) for name in names}
    if any(f"{b}_0000" not in stems for b in bases) or stems & set(labels):
        return {}
    return {name: m.group(1) for name, m in matches.items() if m}


def _path_id(rel: str) -> str:
    """A case id from a path below the archive: its parts joined by '_', `.nii[.gz]` dropped."""
    parts = rel.split("/")
    return "_".join([*parts[:-1], case_id_from_name(parts[-1])])


@dataclass(frozen=True)
class _Header:
    """What listing needs of one DICOM file: the series it belongs to, or why it is not a case."""

    series_uid: str
    skip: str | None
    series_number: str
    patient_id: str
    study_date: str


def _dicom_cases(tree: _Tree, prefix: str, files: dict[str, dict[str, Any]]) -> list[Case]:
    """One case per CT image series per folder of the non-NIfTI files below `prefix`."""
    def full(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    candidates = []
    for rel in sorted(files):
        lower = rel.lower()
        if full(rel) in tree.escaping or not lower.endswith(NOT_IMAGE_SUFFIXES):
            candidates.append(rel)
        else:
            tree.skipped.append(Skipped(tree.uri_of(full(rel)), "neither NIfTI nor DICOM (by its extension)"))
    series: dict[str, dict[str, list[_Header]]] = defaultdict(lambda: defaultdict(list))
    unreadable: dict[str, list[str]] = defaultdict(list)  # folder -> reasons
    escaping: dict[str, list[str]] = defaultdict(list)
    for start in range(0, len(candidates), HEADER_BATCH):
        batch = candidates[start:start + HEADER_BATCH]
        readable = [rel for rel in batch if full(rel) not in tree.escaping]
        for rel in batch:
            if full(rel) in tree.escaping:
                escaping[posixpath.dirname(rel)].append(posixpath.basename(rel))
        paths = [posixpath.join(tree.root, full(rel)) if tree.root else full(rel) for rel in readable]
        try:
            heads = volumes.read_dicom_headers(tree.fs, paths, [files[rel].get("size") for rel in readable])
        except OSError as err:
            raise InputError(tree.uri, f"cannot read DICOM headers: {volumes.safe_reason(err)}") from err
        for rel, head in zip(readable, heads):
            folder, name = posixpath.split(rel)
            if isinstance(head, InputError):
                unreadable[folder].append(f"{name}: {head.reason}")
            elif head is None:
                if rel.lower().endswith(DICOM_SUFFIXES):
                    unreadable[folder].append(f"{name}: named like DICOM but not a DICOM file")
                else:
                    tree.skipped.append(Skipped(tree.uri_of(full(rel)), "neither NIfTI nor DICOM"))
            else:
                header = _header(head)
                series[folder][header.series_uid].append(header)
    cases = []
    for folder in sorted(set(series) | set(unreadable) | set(escaping)):
        folder_uri = tree.uri_of(full(folder))
        images = {}
        for uid, heads in sorted(series[folder].items()):
            if any(not h.skip for h in heads):
                images[uid] = [h for h in heads if not h.skip]
            for reason, count in sorted(Counter(h.skip for h in heads if h.skip).items()):
                series_text = f"series {volumes.shown_uid(uid)}, " if uid else ""
                tree.skipped.append(Skipped(folder_uri, f"{reason} ({series_text}{count} files)"))
        error = None
        if escaping[folder]:
            error = f"symlink(s) to a target outside the archive: {', '.join(sorted(escaping[folder])[:3])}"
        if not images and (error or unreadable[folder]):
            error = error or (f"no readable CT series: {len(unreadable[folder])} DICOM file(s) cannot be read "
                              f"(first: {unreadable[folder][0]})")
            cases.append(Case(_path_id(folder) if folder else _root_id(tree), folder_uri, error=error))
            continue
        for case_id, uid in _series_ids(folder, images).items():
            cases.append(Case(case_id, folder_uri, error=error, series_uid=uid))
    return cases


def _header(ds: Dataset) -> _Header:
    meta = getattr(ds, "file_meta", None) or Dataset()
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    skip = None
    if sop_class == MediaStorageDirectoryStorage:
        skip = "DICOMDIR (the files it indexes are listed themselves)"
    elif sop_class not in volumes.CT_IMAGE_CLASSES and (sop_class or modality != "CT"):
        kind = UID(sop_class).name if UID(sop_class).is_valid else volumes.shown_uid(sop_class)
        skip = f"not a CT image ({kind}, modality {volumes.shown_code(modality)})"
    elif volumes.is_localizer(ds):
        skip = "CT localizer (scout)"
    return _Header(
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        skip=skip,
        series_number=str(ds.get("SeriesNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
    )


def _series_ids(folder: str, images: dict[str, list[_Header]]) -> dict[str, str]:
    """Case id -> SeriesInstanceUID of the CT series of one folder, unique within the folder."""
    if not images:
        return {}
    if folder:
        base = _path_id(folder)
        if len(images) == 1:
            return {base: next(iter(images))}
        ids = {uid: f"{base}_{heads[0].series_number}" for uid, heads in images.items()}
    else:
        ids = {uid: _tag_id(heads[0]) for uid, heads in images.items()}
    counts = Counter(ids.values())
    return {(f"{ids[uid]}_{_short(uid)}" if counts[ids[uid]] > 1 or ids[uid].endswith("_") else ids[uid]): uid
            for uid in images}


def _tag_id(head: _Header) -> str:
    """`PatientID_StudyDate_SeriesNumber`, each part reduced to safe characters."""
    parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", value).strip("-.") or "unknown"
             for value in (head.patient_id, head.study_date, head.series_number)]
    return "_".join(parts)


def _root_id(tree: _Tree) -> str:
    return posixpath.basename(tree.root.rstrip("/")) or "archive"


def _short(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# Manifests


def _scan_manifest(uri: str, allow_prefixes: Iterable[str] | None) -> Listing:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise InputError(uri, "manifest not found") from err
    except OSError as err:
        raise InputError(uri, f"cannot read manifest: {volumes.safe_reason(err)}") from err
    import pandas as pd  # here alone: the worker processes that import this module never read a manifest (1.7 s)

    lower = uri.lower()
    try:
        if lower.endswith(".csv"):
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        elif lower.endswith((".parquet", ".pq")):
            table = pd.read_parquet(io.BytesIO(data))
        else:
            table = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
    except Exception as err:  # pandas raises many parser-specific types
        raise InputError(uri, f"unreadable manifest: {volumes.safe_reason(err)}") from err
    missing = {"case_id", "image_uri"} - set(table.columns)
    if missing:
        raise InputError(uri, f"manifest lacks column(s) {sorted(missing)}; needs case_id, image_uri[, label_uri]")
    prefixes = allowed_prefixes(uri, allow_prefixes)
    cases = []
    for record in table.to_dict("records"):
        image = _resolve(uri, _text(record.get("image_uri")))
        label = _resolve(uri, _text(record.get("label_uri"))) or None
        error = None if image else "manifest row has no image_uri"
        for column, target in (("image_uri", image), ("label_uri", label)):
            refusal = target and not error and refused(target, prefixes)
            if refusal:
                error = f"{column} refused: {refusal}"
        cases.append(Case(_text(record.get("case_id")), image, label, error,
                          _text(record.get("series_uid")) or None))
    return Listing(cases)


def allowed_prefixes(manifest: str, allow_prefixes: Iterable[str] | None = None) -> list[str]:
    """The prefixes a manifest's URIs may lie under, normalised: given, or the manifest's own
    folder (local) or bucket (object storage)."""
    if allow_prefixes is None:
        if storage.is_local(manifest):
            allow_prefixes = [os.path.dirname(storage.absolute(manifest))]
        else:
            scheme = storage.scheme(manifest)
            bucket = manifest[len(scheme) + 3:].split("/", 1)[0]
            allow_prefixes = [f"{scheme}://{bucket}/"]
    return [_normalised(prefix) + ("" if _normalised(prefix).endswith("/") else "/") for prefix in allow_prefixes]


def refused(target: str, prefixes: list[str]) -> str | None:
    """Why a manifest may not point at `target` (None when it may)."""
    place = _normalised(target)
    if storage.is_local(target) and any(place == p or place.startswith(p + "/") for p in SYSTEM_PATHS):
        return f"{target} is a system path"
    if any(place.startswith(prefix) for prefix in prefixes):
        return None
    scheme = storage.scheme(target)
    if not storage.is_local(target) and not any(prefix.startswith(f"{scheme}://") for prefix in prefixes):
        return f"scheme {scheme!r} is not allowed (allowed prefixes: {', '.join(prefixes)})"
    link = " (through a symlink)" if storage.is_local(target) and place != _lexical(target) else ""
    return f"{target} lies outside the allowed prefixes{link} ({', '.join(prefixes)})"


def _lexical(uri: str) -> str:
    return os.path.normpath(storage.absolute(uri))


def _normalised(uri: str) -> str:
    """One spelling per place: a local path resolved (symlinks and `..`), a URL's `..` removed."""
    if storage.is_local(uri):
        return os.path.realpath(storage.absolute(uri))
    scheme = storage.scheme(uri)
    rest = uri[len(scheme) + 3:]
    trailing = "/" if rest.endswith("/") else ""
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}{trailing}"


def _text(value: object) -> str:
    """A manifest cell as text: missing values (None, NaN) become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _resolve(manifest: str, target: str) -> str:
    """A manifest entry as a URI; relative entries are relative to the manifest's folder."""
    if not target or storage.scheme(target) or target.startswith("/"):
        return target
    if not storage.is_local(manifest):
        scheme = storage.scheme(manifest)
        path = manifest[len(scheme) + 3:]
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(path), target))}"
    local = storage.absolute(manifest)
    return os.path.normpath(os.path.join(os.path.dirname(local), target))
