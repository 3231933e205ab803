"""Listing archives into case rows: every layout, unsafe and duplicate ids, bad manifests."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from resdsn_ray import storage
from resdsn_ray.archive import Case, check_case_id, list_cases, unsafe_reason
from resdsn_ray.errors import InputError


def touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def by_id(cases: list[Case]) -> dict[str, Case]:
    return {c.case_id: c for c in cases}


def test_msd_layout_pairs_labels_and_lists_test_images(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "._a.nii.gz"):  # ._a: macOS AppleDouble junk in MSD tarballs
        touch(tmp_path / "imagesTr" / name)
    touch(tmp_path / "labelsTr" / "a.nii.gz")
    touch(tmp_path / "labelsTr" / "orphan.nii.gz")
    touch(tmp_path / "imagesTs" / "c.nii")
    touch(tmp_path / "dataset.json", json.dumps({"name": "x"}).encode())
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["a", "b", "c"]
    assert cases["a"].image_uri == str(tmp_path / "imagesTr" / "a.nii.gz")
    assert cases["a"].label_uri == str(tmp_path / "labelsTr" / "a.nii.gz")
    assert cases["b"].label_uri is None and cases["c"].label_uri is None
    assert all(c.error is None for c in cases.values())


def test_flat_folder_lists_nifti_files_and_dicom_series_folders(tmp_path):
    touch(tmp_path / "one.nii.gz")
    touch(tmp_path / "two.NII")
    touch(tmp_path / "series_3" / "IM0001.dcm")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.nii.gz")
    cases = by_id(list_cases(str(tmp_path)))
    assert sorted(cases) == ["one", "series_3", "two"]
    assert cases["series_3"].image_uri == str(tmp_path / "series_3")


def test_unsafe_and_duplicate_ids_become_error_cases_not_keys(tmp_path):
    touch(tmp_path / "fine.nii.gz")
    touch(tmp_path / "fine.nii")  # same id twice: only the first may own masks/fine.nii.gz
    touch(tmp_path / "up..one.nii.gz")
    touch(tmp_path / "bell\x07.nii.gz")
    touch(tmp_path / "back\\slash.nii.gz")
    cases = list_cases(str(tmp_path))
    errors = {c.case_id: c.error for c in cases if c.error}
    good = [c for c in cases if not c.error]
    assert [c.case_id for c in good] == ["fine"] and good[0].image_uri.endswith("fine.nii")
    assert "duplicate case id 'fine'" in errors["fine"]
    assert "'..'" in errors["up..one"]
    assert "control" in errors["bell\x07"]
    assert "path separator" in errors["back\\slash"]


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
    for case_id in ("case_0001", "pancreas_001", "Patient 7 (arterial)", "a.b-c"):
        assert unsafe_reason(case_id) is None and check_case_id(case_id) == case_id


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_resolves_relative_uris_and_flags_bad_rows(tmp_path, fmt):
    table = pd.DataFrame(
        {
            "case_id": ["p1", "../escape", "p3", "p1", ".."],
            "image_uri": ["imgs/p1.nii.gz", "imgs/e.nii.gz", "s3://bucket/p3.nii.gz", "imgs/again.nii.gz", "imgs/d.nii"],
            "label_uri": ["labels/p1.nii.gz", "", None, "", ""],
        }
    )
    manifest = tmp_path / "sub" / f"cases.{fmt}"
    manifest.parent.mkdir()
    if fmt == "csv":
        table.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        table.to_json(manifest, orient="records", lines=True)
    else:
        table.to_parquet(manifest)
    cases = list_cases(str(manifest))
    good = by_id([c for c in cases if not c.error])
    assert sorted(good) == ["p1", "p3"]
    assert good["p1"].image_uri == str(tmp_path / "sub" / "imgs" / "p1.nii.gz")
    assert good["p1"].label_uri == str(tmp_path / "sub" / "labels" / "p1.nii.gz")
    assert good["p3"].image_uri == "s3://bucket/p3.nii.gz" and good["p3"].label_uri is None
    errors = [c.error for c in cases if c.error]
    assert len(errors) == 3
    assert any("'../escape' contains a path separator" in e for e in errors)
    assert any("'..' contains '..'" in e for e in errors)
    assert any("duplicate case id 'p1'" in e for e in errors)


def test_manifest_without_required_columns_is_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\na,b.nii.gz\n")
    with pytest.raises(InputError, match="case_id"):
        list_cases(str(manifest))


def test_missing_or_empty_archive_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist or is empty"):
        list_cases(str(tmp_path / "nowhere"))
    touch(tmp_path / "only.txt")
    with pytest.raises(InputError, match="no cases found"):
        list_cases(str(tmp_path))


def test_msd_archive_on_s3(s3_bucket):
    root = f"{s3_bucket}/msd"
    for path in ("imagesTr/a.nii.gz", "imagesTr/b.nii.gz", "labelsTr/a.nii.gz", "labelsTr/b.nii.gz"):
        storage.write_bytes(storage.join(root, path), b"x")
    storage.write_bytes(storage.join(root, "imagesTr", "bad\x07.nii.gz"), b"x")
    cases = list_cases(root)
    assert [(c.case_id, c.image_uri, c.label_uri) for c in cases if not c.error] == [
        ("a", f"{root}/imagesTr/a.nii.gz", f"{root}/labelsTr/a.nii.gz"),
        ("b", f"{root}/imagesTr/b.nii.gz", f"{root}/labelsTr/b.nii.gz"),
    ]
    assert [c.case_id for c in cases if c.error] == ["bad\x07"]
