"""Listing archives into case rows: every layout (MSD, nnU-Net, flat, PACS exports, DICOMDIR),
odd-but-valid names, unsafe and duplicate ids, hidden files, symlinks, manifests and what they
may point at."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from resdsn_ray import storage
from resdsn_ray.archive import Case, check_case_id, list_cases, scan, unsafe_reason
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import read_volume

pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning")


def touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def nifti(path: Path) -> Path:
    """A small real NIfTI file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes()))
    return path


def by_id(cases: list[Case]) -> dict[str, Case]:
    return {c.case_id: c for c in cases}


def dicom_series(ct5n: Path, folder: Path, suffix: str = ".dcm", edit=None) -> str:
    """A copy of pydicom's 5-slice CT5N series as a NEW series in `folder`; its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for path in sorted(ct5n.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        if edit:
            edit(ds)
        ds.save_as(folder / f"{path.name}{suffix}")
    return series


def _localizer(ds: pydicom.Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def _dose_screen(ds: pydicom.Dataset) -> None:  # a dose report saved as a screen capture, Modality CT
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage


def _series_number(number: int):
    def edit(ds: pydicom.Dataset) -> None:
        ds.SeriesNumber = number
    return edit


# --------------------------------------------------------------------------------------------
# MSD and nnU-Net layouts


def test_msd_layout_pairs_labels_and_lists_test_images(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "._a.nii.gz"):  # ._a: macOS AppleDouble junk in MSD tarballs
        touch(tmp_path / "imagesTr" / name)
    touch(tmp_path / "labelsTr" / "a.nii.gz")
    touch(tmp_path / "labelsTr" / "orphan.nii.gz")
    touch(tmp_path / "imagesTs" / "c.nii")
    touch(tmp_path / "dataset.json", json.dumps({"name": "x"}).encode())
    listing = scan(str(tmp_path))
    cases = by_id(listing.cases)
    assert sorted(cases) == ["a", "b", "c"]
    assert cases["a"].image_uri == str(tmp_path / "imagesTr" / "a.nii.gz")
    assert cases["a"].label_uri == str(tmp_path / "labelsTr" / "a.nii.gz")
    assert cases["b"].label_uri is None and cases["c"].label_uri is None
    assert all(c.error is None and c.series_uid is None for c in cases.values())
    skipped = {Path(s.uri).name: s.reason for s in listing.skipped}
    assert "AppleDouble" in skipped["._a.nii.gz"]
    assert "orphan.nii.gz" in skipped and "dataset.json" in skipped


def test_nnunet_channel_names_pair_with_their_labels(tmp_path):
    for case in ("case_001", "case_002"):
        touch(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    touch(tmp_path / "imagesTs" / "case_003_0000.nii.gz")
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["case_001", "case_002", "case_003"]
    assert cases["case_001"].image_uri == str(tmp_path / "imagesTr" / "case_001_0000.nii.gz")
    assert cases["case_001"].label_uri == str(tmp_path / "labelsTr" / "case_001.nii.gz")
    assert cases["case_003"].label_uri is None
    assert all(c.error is None for c in cases.values())


def test_nnunet_multichannel_case_is_one_error_case(tmp_path):
    for name in ("ct_0000.nii.gz", "ct_0001.nii.gz", "other_0000.nii.gz"):
        touch(tmp_path / "imagesTr" / name)
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["ct", "other"]
    assert "2 channels" in cases["ct"].error and cases["other"].error is None


def test_msd_ids_ending_in_four_digits_stay_literal_when_labels_carry_them(tmp_path):
    for case in ("liver_0000", "liver_0001"):
        touch(tmp_path / "imagesTr" / f"{case}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["liver_0000", "liver_0001"]
    assert cases["liver_0001"].label_uri == str(tmp_path / "labelsTr" / "liver_0001.nii.gz")


# --------------------------------------------------------------------------------------------
# Flat folders and PACS exports


def test_flat_folder_lists_nifti_files_and_dicom_series_folders(tmp_path, ct5n_dir):
    touch(tmp_path / "one.nii.gz")
    touch(tmp_path / "two.NII")
    series = dicom_series(ct5n_dir, tmp_path / "series_3")
    touch(tmp_path / "notes.txt")
    listing = scan(str(tmp_path))
    cases = by_id(listing.cases)
    assert sorted(cases) == ["one", "series_3", "two"]
    assert cases["series_3"].image_uri == str(tmp_path / "series_3")
    assert cases["series_3"].series_uid == series
    assert [(Path(s.uri).name, s.reason) for s in listing.skipped] == [
        ("notes.txt", "neither NIfTI nor DICOM (by its extension)")]


def test_pacs_export_one_case_per_ct_series_with_skipped_objects_and_reasons(tmp_path, ct5n_dir):
    root = tmp_path / "export"
    ct = dicom_series(ct5n_dir, root / "Patient1" / "Study1" / "Series2")
    dicom_series(ct5n_dir, root / "Patient1" / "Study1" / "Series1", edit=_localizer)
    dicom_series(ct5n_dir, root / "Patient1" / "Study1" / "Dose", edit=_dose_screen)
    shutil.copy(pydicom.data.get_testdata_file("rtstruct.dcm"), root / "Patient1" / "Study1" / "Series2" / "RS.dcm")
    plain = dicom_series(ct5n_dir, root / "Patient2" / "Study9" / "CT", suffix="")  # no extension
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), root / "Patient2" / "Study9" / "MR.dcm")
    listing = scan(str(root))
    cases = by_id(listing.cases)
    assert sorted(cases) == ["Patient1_Study1_Series2", "Patient2_Study9_CT"]
    assert cases["Patient1_Study1_Series2"].series_uid == ct
    assert cases["Patient2_Study9_CT"].series_uid == plain
    assert all(c.error is None for c in cases.values())
    reasons = {(Path(s.uri).name, s.reason.split(" (")[0]) for s in listing.skipped}
    assert reasons == {("Series1", "CT localizer"), ("Dose", "not a CT image"), ("Series2", "not a CT image"),
                       ("Study9", "not a CT image")}
    assert any("Secondary Capture" in s.reason for s in listing.skipped)
    assert any("RT Structure Set" in s.reason for s in listing.skipped)
    for case in cases.values():  # every case reads with exactly its series
        volume = read_volume(case.image_uri, series_uid=case.series_uid)
        assert volume.shape == (16, 16, 5) and volume.meta["series_uid"] == case.series_uid


def test_folder_with_several_series_gives_one_case_each_readable_by_uid(tmp_path, ct5n_dir):
    folder = tmp_path / "archive" / "dump"
    first = dicom_series(ct5n_dir, folder, suffix=".a", edit=_series_number(3))
    second = dicom_series(ct5n_dir, folder, suffix=".b", edit=_series_number(4))
    cases = by_id(list_cases(str(tmp_path / "archive")))
    assert {cid: c.series_uid for cid, c in cases.items()} == {"dump_3": first, "dump_4": second}
    with pytest.raises(InputError, match="2 DICOM series"):
        read_volume(str(folder))
    volume = read_volume(str(folder), series_uid=second)
    assert volume.meta["series_uid"] == second and volume.meta["other_series_files"] == 5
    assert all(uri.endswith(".b") for uri in volume.meta["slice_uris"])


def test_series_at_the_top_are_named_by_patient_study_and_series_number(tmp_path, ct5n_dir):
    first = dicom_series(ct5n_dir, tmp_path, suffix=".a", edit=_series_number(3))
    second = dicom_series(ct5n_dir, tmp_path, suffix=".b", edit=_series_number(3))  # same number
    ds = pydicom.dcmread(next(tmp_path.glob("*.a")))
    stem = f"{ds.PatientID}_{ds.StudyDate}_3"
    cases = list_cases(str(tmp_path))
    assert len(cases) == 2 and all(c.case_id.startswith(stem + "_") and c.error is None for c in cases)
    assert {c.series_uid for c in cases} == {first, second}
    assert [c.case_id for c in list_cases(str(tmp_path))] == [c.case_id for c in cases]  # stable


def test_dicomdir_export_lists_its_ct_series(tmp_path):
    export = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    shutil.copytree(export, tmp_path / "cd")
    listing = scan(str(tmp_path / "cd"))
    assert "98892001_CT5N" in by_id(listing.cases)
    assert any(s.reason.startswith("DICOMDIR") for s in listing.skipped)
    assert any(s.reason.startswith("CT localizer") and s.uri.endswith("CT2N") for s in listing.skipped)
    assert any("MR Image Storage" in s.reason for s in listing.skipped)


def test_unreadable_dicom_folder_without_a_series_is_one_error_case(tmp_path):
    touch(tmp_path / "broken" / "IM1.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 40)
    touch(tmp_path / "ok.nii.gz")
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["broken", "ok"]
    assert "no readable CT series" in cases["broken"].error and "IM1.dcm" in cases["broken"].error


# --------------------------------------------------------------------------------------------
# Ids, hidden names, odd-but-valid names


def test_unsafe_ids_become_error_cases_not_keys(tmp_path):
    touch(tmp_path / "fine.nii.gz")
    touch(tmp_path / "up..one.nii.gz")
    touch(tmp_path / "bell\x07.nii.gz")
    touch(tmp_path / "back\\slash.nii.gz")
    cases = list_cases(str(tmp_path))
    errors = {c.case_id: c.error for c in cases if c.error}
    assert [c.case_id for c in cases if not c.error] == ["fine"]
    assert "'..'" in errors["up..one"]
    assert "control" in errors["bell\x07"]
    assert "path separator" in errors["back\\slash"]


def test_duplicate_ids_are_one_error_case_naming_every_source_the_same_each_run(tmp_path, ct5n_dir):
    touch(tmp_path / "a.nii")
    touch(tmp_path / "a.nii.gz")
    dicom_series(ct5n_dir, tmp_path / "b")
    touch(tmp_path / "b.nii.gz")
    touch(tmp_path / "c.nii.gz")
    first = list_cases(str(tmp_path))
    assert [c.case_id for c in first] == ["a", "b", "c"]  # one row per id, never a second "a"
    errors = {c.case_id: c.error for c in first}
    assert errors["c"] is None
    assert "duplicate case id 'a': 2 sources" in errors["a"]
    assert str(tmp_path / "a.nii") in errors["a"] and str(tmp_path / "a.nii.gz") in errors["a"]
    assert str(tmp_path / "b.nii.gz") in errors["b"] and f"{tmp_path / 'b'} (series " in errors["b"]
    for _ in range(3):
        assert list_cases(str(tmp_path)) == first


def test_hidden_nifti_gets_an_error_case_and_hidden_folders_are_skipped(tmp_path):
    touch(tmp_path / "case.nii.gz")
    touch(tmp_path / ".hidden_case.nii.gz")
    touch(tmp_path / ".git" / "objects" / "x")
    touch(tmp_path / ".DS_Store")
    listing = scan(str(tmp_path))
    cases = by_id(listing.cases)
    assert sorted(cases) == [".hidden_case", "case"]
    assert "hidden file" in cases[".hidden_case"].error
    assert cases[".hidden_case"].image_uri == str(tmp_path / ".hidden_case.nii.gz")
    assert {Path(s.uri).name: s.reason for s in listing.skipped} == {
        ".git": "hidden folder (1 files not read)", ".DS_Store": "hidden file"}


def test_odd_but_valid_names_list_and_read(tmp_path, ct5n_dir):
    dicom_series(ct5n_dir, tmp_path / "d09_glob[ab]")
    nifti(tmp_path / "colon::chain.nii.gz")
    nifti(tmp_path / "space and (paren).nii.gz")
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["colon::chain", "d09_glob[ab]", "space and (paren)"]
    for case in cases.values():
        assert case.error is None
        volume = read_volume(case.image_uri, series_uid=case.series_uid)
        assert volume.shape in ((16, 16, 5), (4, 3, 2))
    assert read_volume(str(tmp_path / "d09_glob[ab]")).shape == (16, 16, 5)  # without the uid too
    assert read_volume(f"file://{tmp_path}/colon::chain.nii.gz").shape == (4, 3, 2)


def test_odd_names_on_s3(s3_bucket, ct5n_dir):
    root = f"{s3_bucket}/odd"
    for path in sorted(ct5n_dir.iterdir()):
        storage.write_bytes(f"{root}/d09_glob[ab]/{path.name}", path.read_bytes())
    storage.write_bytes(f"{root}/colon::chain.nii.gz",
                        gzip.compress(nib.Nifti1Image(np.zeros((3, 3, 2), np.int16), np.eye(4)).to_bytes()))
    storage.write_bytes(f"{root}/.hidden_case.nii.gz", b"x")
    storage.write_bytes(f"{s3_bucket}/odd2/not_mine.nii.gz", b"x")  # a sibling prefix, not below odd/
    cases = by_id(list_cases(root))
    assert sorted(cases) == [".hidden_case", "colon::chain", "d09_glob[ab]"]
    assert read_volume(cases["d09_glob[ab]"].image_uri, series_uid=cases["d09_glob[ab]"].series_uid).shape == (16, 16, 5)
    assert read_volume(cases["colon::chain"].image_uri).shape == (3, 3, 2)


@pytest.mark.parametrize(
    "case_id, fragment",
    [("", "empty"), ("a/b", "separator"), ("..", "'..'"), ("x\ny", "control"), ("zero\u200bwidth", "invisible"),
     (" pad", "whitespace"), (".dot", "'.'"), ("x" * 300, "longer")],
)
def test_unsafe_reason_names_what_is_wrong(case_id, fragment):
    assert fragment in unsafe_reason(case_id)
    with pytest.raises(InputError):
        check_case_id(case_id)


def test_safe_ids_pass():
    for case_id in ("case_0001", "pancreas_001", "Patient 7 (arterial)", "a.b-c", "d09_glob[ab]", "colon::chain"):
        assert unsafe_reason(case_id) is None and check_case_id(case_id) == case_id


# --------------------------------------------------------------------------------------------
# Symlinks


def test_symlinks_leaving_the_archive_are_refused(tmp_path, ct5n_dir):
    archive, outside = tmp_path / "archive", tmp_path / "outside"
    nifti(outside / "secret.nii.gz")
    dicom_series(ct5n_dir, outside / "series")
    nifti(archive / "real.nii.gz")
    os.symlink(outside / "secret.nii.gz", archive / "escape.nii.gz")
    os.symlink(archive / "real.nii.gz", archive / "alias.nii.gz")  # inside: fine
    os.symlink(outside / "series", archive / "linked_series")
    dicom_series(ct5n_dir, archive / "mixed")
    os.symlink(outside / "series" / "2062.dcm", archive / "mixed" / "extra.dcm")
    cases = by_id(list_cases(str(archive)))
    assert sorted(cases) == ["alias", "escape", "linked_series", "mixed", "real"]
    assert cases["real"].error is None and cases["alias"].error is None
    assert "outside the archive" in cases["escape"].error
    assert "outside the archive" in cases["linked_series"].error
    assert "outside the archive" in cases["mixed"].error and "extra.dcm" in cases["mixed"].error


# --------------------------------------------------------------------------------------------
# Manifests


def _write_manifest(table: pd.DataFrame, manifest: Path, fmt: str) -> None:
    manifest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        table.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        table.to_json(manifest, orient="records", lines=True)
    else:
        table.to_parquet(manifest)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_resolves_relative_uris_and_flags_bad_rows(tmp_path, fmt):
    table = pd.DataFrame(
        {
            "case_id": ["p1", "../escape", "p3", "p1", "..", "p5"],
            "image_uri": ["imgs/p1.nii.gz", "imgs/e.nii.gz", "s3://bucket/p3.nii.gz", "imgs/again.nii.gz",
                          "imgs/d.nii", "dicom/p5"],
            "label_uri": ["labels/p1.nii.gz", "", None, "", "", ""],
            "series_uid": ["", "", "", "", "", "1.2.3"],
        }
    )
    manifest = tmp_path / "sub" / f"cases.{fmt}"
    _write_manifest(table, manifest, fmt)
    cases = by_id(list_cases(str(manifest), allow_prefixes=[str(tmp_path / "sub"), "s3://bucket"]))
    assert sorted(c for c in cases if not cases[c].error) == ["p3", "p5"]
    assert cases["p3"].image_uri == "s3://bucket/p3.nii.gz" and cases["p3"].label_uri is None
    assert cases["p5"].series_uid == "1.2.3" and cases["p5"].image_uri == str(tmp_path / "sub" / "dicom" / "p5")
    assert "'../escape' contains a path separator" in cases["../escape"].error
    assert "'..' contains '..'" in cases[".."].error
    assert "duplicate case id 'p1': 2 sources" in cases["p1"].error
    assert str(tmp_path / "sub" / "imgs" / "p1.nii.gz") in cases["p1"].error
    assert str(tmp_path / "sub" / "imgs" / "again.nii.gz") in cases["p1"].error


def test_manifest_refuses_uris_outside_its_folder_by_default(tmp_path):
    outside = nifti(tmp_path / "elsewhere" / "x.nii.gz")
    os.symlink(outside, nifti(tmp_path / "m" / "decoy.nii.gz").parent / "link.nii.gz")
    rows = {
        "ok": ("imgs/ok.nii.gz", ""),
        "passwd": ("file:///etc/passwd", ""),
        "environ": ("/proc/self/environ", ""),
        "web": ("http://169.254.169.254/latest/meta-data", ""),
        "tls": ("https://example.org/ct.nii.gz", ""),
        "bucket": ("s3://other-bucket/ct.nii.gz", ""),
        "up": ("../elsewhere/x.nii.gz", ""),
        "link": ("link.nii.gz", ""),
        "label": ("imgs/ok2.nii.gz", "/etc/shadow"),
    }
    table = pd.DataFrame({"case_id": list(rows), "image_uri": [r[0] for r in rows.values()],
                          "label_uri": [r[1] for r in rows.values()]})
    _write_manifest(table, tmp_path / "m" / "cases.csv", "csv")
    cases = by_id(list_cases(str(tmp_path / "m" / "cases.csv")))
    assert cases["ok"].error is None
    errors = {cid: c.error for cid, c in cases.items() if cid != "ok"}
    assert all(e and e.startswith(("image_uri refused", "label_uri refused")) for e in errors.values()), errors
    assert "outside the allowed prefixes" in errors["passwd"]
    assert "system path" in errors["environ"]
    assert "scheme 'http' is not allowed" in errors["web"] and "scheme 'https' is not allowed" in errors["tls"]
    assert "scheme 's3' is not allowed" in errors["bucket"]
    assert "outside the allowed prefixes" in errors["up"]
    assert "through a symlink" in errors["link"]
    assert errors["label"].startswith("label_uri refused")
    # an explicit allowance opens exactly what it names
    wider = by_id(list_cases(str(tmp_path / "m" / "cases.csv"), allow_prefixes=[str(tmp_path), "s3://other-bucket/"]))
    assert {cid for cid, c in wider.items() if not c.error} == {"ok", "bucket", "up", "link"}


def test_manifest_on_s3_defaults_to_its_bucket(s3_bucket):
    manifest = f"{s3_bucket}/lists/cases.csv"
    storage.write_text(manifest, "case_id,image_uri\nrel,../imgs/a.nii.gz\nsame,"
                                 f"{s3_bucket}/imgs/b.nii.gz\nother,s3://another/c.nii.gz\nlocal,/etc/passwd\n")
    cases = by_id(list_cases(manifest))
    assert cases["rel"].image_uri == f"{s3_bucket}/imgs/a.nii.gz" and cases["rel"].error is None
    assert cases["same"].error is None
    assert "outside the allowed prefixes" in cases["other"].error
    assert "refused" in cases["local"].error


def test_manifest_without_required_columns_is_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\na,b.nii.gz\n")
    with pytest.raises(InputError, match="case_id"):
        list_cases(str(manifest))


def test_unreadable_manifest_error_does_not_quote_its_content(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"case_id": "a", "image_uri": "SECRET-MARKER-42"\n')
    with pytest.raises(InputError, match="unreadable manifest") as raised:
        list_cases(str(manifest))
    assert "SECRET-MARKER-42" not in str(raised.value)


def test_missing_or_empty_archive_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist or is empty"):
        list_cases(str(tmp_path / "nowhere"))
    touch(tmp_path / "only.txt")
    with pytest.raises(InputError, match="no cases found"):
        list_cases(str(tmp_path))


# --------------------------------------------------------------------------------------------
# S3


def test_msd_archive_on_s3(s3_bucket):
    root = f"{s3_bucket}/msd"
    for path in ("imagesTr/a_0000.nii.gz", "imagesTr/b_0000.nii.gz", "labelsTr/a.nii.gz", "labelsTr/b.nii.gz"):
        storage.write_bytes(storage.join(root, path), b"x")
    cases = list_cases(root)
    assert [(c.case_id, c.image_uri, c.label_uri, c.error) for c in cases] == [
        ("a", f"{root}/imagesTr/a_0000.nii.gz", f"{root}/labelsTr/a.nii.gz", None),
        ("b", f"{root}/imagesTr/b_0000.nii.gz", f"{root}/labelsTr/b.nii.gz", None),
    ]
    storage.write_bytes(storage.join(root, "imagesTr", "bad\x07_0000.nii.gz"), b"x")
    assert [c.case_id for c in list_cases(root) if c.error] == ["bad\x07"]


def test_pacs_export_on_s3_lists_with_one_paginated_listing(s3_bucket, ct5n_dir, tmp_path):
    local = tmp_path / "export"
    uids = {dicom_series(ct5n_dir, local / f"P{p}" / "ST" / "CT", suffix="") for p in range(3)}
    dicom_series(ct5n_dir, local / "P0" / "ST" / "LOC", edit=_localizer)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/export/{path.relative_to(local).as_posix()}", path.read_bytes())
    fs, _ = storage.filesystem(s3_bucket)
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    cases = list_cases(f"{s3_bucket}/export")
    assert {c.series_uid for c in cases} == uids and [c.case_id for c in cases] == ["P0_ST_CT", "P1_ST_CT", "P2_ST_CT"]
    assert calls.count("ListObjectsV2") == 1
    assert calls.count("GetObject") == 20  # one bounded header read per DICOM file, no other request
    assert len(calls) == 21
    case = cases[1]
    assert read_volume(case.image_uri, series_uid=case.series_uid).shape == (16, 16, 5)


# --------------------------------------------------------------------------------------------
# A PACS export of real CT, locally and on S3


def real_ct_export(shared: Path, root: Path) -> dict[str, str]:
    """The real series of `shared` in a PACS export's nesting, Patient/Study/Series, as a user
    would find it (STS_001's files with no extension, its RTSTRUCT in a folder of its own), plus
    an unsorted folder holding a few files of both series. Returns SeriesInstanceUID by series."""
    sts = sorted((shared / "ct" / "sts_001" / "CT" / "dicom" / "image").iterdir())
    crlm = sorted((shared / "ct" / "crlm_1004" / "dicom").iterdir())
    for path in sts:
        touch(root / "STS_001" / "20000907" / "CT_2" / path.stem, path.read_bytes())
    touch(root / "STS_001" / "20000907" / "RTSTRUCT" / "RS.dcm",
          (shared / "ct" / "sts_001" / "CT" / "dicom" / "mask" / "RS.dcm").read_bytes())
    for path in crlm:
        touch(root / "CRLM-CT-1004" / "19941122" / "CT_2" / path.name, path.read_bytes())
    for path in [*sts[:3], *crlm[:3]]:
        touch(root / "Unsorted" / f"{path.parent.parent.name}-{path.name}", path.read_bytes())
    return {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in (("sts", sts), ("crlm", crlm))}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_real_ct_pacs_export_lists_one_case_per_series(where, shared_data, tmp_path, request):
    local = tmp_path / "export"
    uids = real_ct_export(shared_data, local)
    root = str(local)
    if where == "s3":
        root = f"{request.getfixturevalue('s3_bucket')}/export"
        fs, _ = storage.filesystem(root)
        fs.put(f"{local}/", root.removeprefix("s3://"), recursive=True)
    listing = scan(root)
    cases = by_id(listing.cases)
    # The unsorted folder's two series share SeriesNumber 2: each gets a hash of its UID.
    unsorted = {f"Unsorted_2_{hashlib.sha1(uid.encode()).hexdigest()[:8]}": uid for uid in uids.values()}
    assert {cid: c.series_uid for cid, c in cases.items()} == {
        "CRLM-CT-1004_19941122_CT_2": uids["crlm"], "STS_001_20000907_CT_2": uids["sts"], **unsorted}
    assert all(c.error is None and c.label_uri is None for c in cases.values())
    assert cases["STS_001_20000907_CT_2"].image_uri == storage.join(root, "STS_001/20000907/CT_2")
    assert [(s.uri, s.reason.split(" (")[0]) for s in listing.skipped] == [
        (storage.join(root, "STS_001/20000907/RTSTRUCT"), "not a CT image")]
    if where == "local":  # reading a series from S3 is tested on CT5N (test_odd_names_on_s3): 9 MB less here
        case = cases["STS_001_20000907_CT_2"]
        volume = read_volume(case.image_uri, series_uid=case.series_uid)
        assert volume.shape == (198, 202, 59) and volume.meta["series_uid"] == uids["sts"]
