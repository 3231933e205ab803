"""What the archive job writes per case besides the NIfTI mask, on the real DICOM series
(`../shared/data`) and a NIfTI case: a DICOM SEG on the source slices, the probability map on
the input grid, the preview PNG, the statistics columns; and what a rerun does: the same
settings skip every case, an added --preview writes only the previews."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from ray_cluster import ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)
from test_dicom_seg import check_seg

from resdsn_ray import runs
from resdsn_ray.bundle import load_bundle, save_bundle
from resdsn_ray.case_files import NO_SEG, algorithm_version
from resdsn_ray.cli import main
from resdsn_ray.config import ModelConfig
from resdsn_ray.model import build_model
from resdsn_ray.synthetic import make_case
from resdsn_ray.volumes import read_volume, write_nifti

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DICOM_CASE, NIFTI_CASE = "sts_001", "phantom"


@pytest.fixture(scope="module")
def setup(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An archive of the real series and one phantom, and small random bundles (fast on 2 cores)."""
    root = tmp_path_factory.mktemp("outputs")
    archive = root / "archive"
    shutil.copytree(shared_data / "ct" / "sts_001" / "CT" / "dicom" / "image", archive / DICOM_CASE)
    image, _, affine = make_case(4, (40, 40, 24), orientation="LPS")
    write_nifti(str(archive / f"{NIFTI_CASE}.nii.gz"), image, affine)
    coarse, fine = small_bundles(root / "bundles")
    return {"archive": str(archive), "output": str(root / "out"), "coarse": coarse, "fine": fine}


def archive_run(setup: dict[str, str], *flags: str) -> list[dict]:
    argv = ["archive", "--input", setup["archive"], "--output", setup["output"], "--coarse", setup["coarse"],
            "--fine", setup["fine"], "--n-coarse", "0", "--n-fine", "0", "--device", "cpu",
            "--output-format", "both", "--save-probabilities", "uint8", *flags]
    before = set(runs.read_rows(setup["output"])["run_id"].to_pylist())
    assert main(argv) == 0
    rows = [r for r in runs.read_rows(setup["output"]).to_pylist() if r["run_id"] not in before]
    assert len({r["run_id"] for r in rows}) == 1  # this run's rows (ids of runs in one second need not sort by time)
    return sorted(rows, key=lambda r: r["case_id"])


def mtimes(folder: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.ray
def test_outputs_and_reruns(ray_driver, setup):
    first = {r["case_id"]: r for r in archive_run(setup)}
    assert {r["status"] for r in first.values()} <= {"ok", "no_organ"}, [r["error"] for r in first.values()]
    dicom, nifti = first[DICOM_CASE], first[NIFTI_CASE]
    volume = read_volume(dicom["image_uri"], series_uid=dicom["series_uid"] or None)
    mask = read_volume(dicom["mask_uri"]).array.astype(np.uint8)
    assert mask.any(), "the small random bundles must find something in the real series"

    # DICOM SEG: loads back, references the source series and instances, one frame per source slice
    assert dicom["seg_uri"] == runs.file_uri(setup["output"], "seg", DICOM_CASE) and dicom["note"] is None
    version = dicom_version(setup["coarse"], setup["fine"])
    assert version.endswith(f"coarse={load_bundle(setup['coarse']).id} fine={load_bundle(setup['fine']).id}")
    check_seg(dicom["seg_uri"], volume, mask, version=version)

    # probabilities on the input grid; the mask's voxels are the confident ones (uint8: 1/255 steps)
    probabilities = read_volume(dicom["probabilities_uri"])
    assert probabilities.shape == volume.shape and np.allclose(probabilities.affine, volume.affine, atol=1e-4)
    assert 0.0 <= probabilities.array.min() and probabilities.array.max() <= 1.0
    assert probabilities.array[mask > 0].min() >= 0.5 - 1 / 255

    # statistics, worked out here from the mask and the image
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000
    assert dicom["pred_volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
    assert dicom["mask_hu_mean"] == pytest.approx(volume.array[mask > 0].mean(), rel=1e-6)
    assert dicom["mask_hu_std"] == pytest.approx(volume.array[mask > 0].std(), rel=1e-5)
    ijk = np.argwhere(mask)  # the series' affine is diagonal (LPS flips x and y): two corners span the box
    low, high = (volume.affine[:3, :3] @ ijk.min(axis=0) + volume.affine[:3, 3],
                 volume.affine[:3, :3] @ ijk.max(axis=0) + volume.affine[:3, 3])
    assert np.allclose(volume.affine[:3, :3], np.diag(np.diag(volume.affine[:3, :3])))
    assert dicom["bbox_ras_mm"] == pytest.approx([*np.minimum(low, high), *np.maximum(low, high)])

    # the NIfTI case: a NIfTI mask, no SEG, and the row says why
    assert nifti["seg_uri"] is None and nifti["note"] == NO_SEG
    assert not list(Path(setup["output"], "segs").glob(f"{NIFTI_CASE}*"))
    assert read_volume(nifti["probabilities_uri"]).shape == read_volume(nifti["image_uri"]).shape
    assert all(r["preview_uri"] is None for r in first.values())

    # the same settings again: every case skipped, nothing rewritten
    before = mtimes(setup["output"] + "/masks") | mtimes(setup["output"] + "/segs") | mtimes(setup["output"] + "/probabilities")
    again = archive_run(setup)
    assert [r["status"] for r in again] == ["skipped", "skipped"]

    # --preview added: only the previews are written, by rows of the same attempts
    added = {r["case_id"]: r for r in archive_run(setup, "--preview")}
    assert {r["status"] for r in added.values()} == {first[c]["status"] for c in added}
    for case, row in added.items():
        assert row["done_in_run"] == first[case]["run_id"] and row["attempt"] == first[case]["attempt"]
        assert row["dsc"] == first[case]["dsc"] and row["mask_hu_mean"] == pytest.approx(first[case]["mask_hu_mean"])
        assert row["t_total_s"] == first[case]["t_total_s"]  # the same attempt: the segmentation's time, not the preview's
        picture = matplotlib.image.imread(row["preview_uri"])
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300
    after = mtimes(setup["output"] + "/masks") | mtimes(setup["output"] + "/segs") | mtimes(setup["output"] + "/probabilities")
    assert after == before
    assert sorted(os.listdir(Path(setup["output"]) / "previews")) == sorted([f"{DICOM_CASE}.png", f"{NIFTI_CASE}.png"])
    # and the rows that added them are trusted by the next run
    assert [r["status"] for r in archive_run(setup, "--preview")] == ["skipped", "skipped"]


def small_bundles(folder: Path) -> tuple[str, str]:
    uris = []
    for seed, stage in enumerate(("coarse", "fine")):
        torch.manual_seed(seed)
        uris.append(str(folder / stage))
        save_bundle(uris[-1], build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    return uris[0], uris[1]


def test_segment_writes_its_files_beside_the_mask(ct5n_dir, tmp_path, capsys):
    coarse, fine = small_bundles(tmp_path / "bundles")
    nifti = tmp_path / "phantom.nii.gz"
    image, _, affine = make_case(4, (40, 40, 24), orientation="LPS")
    write_nifti(str(nifti), image, affine)
    rows = {}
    for name, source in (("ct5n", ct5n_dir), ("phantom", nifti)):
        out = tmp_path / "out" / f"{name}.nii.gz"
        assert main(["segment", str(source), "--out", str(out), "--coarse", coarse, "--fine", fine, "--n-coarse", "0",
                     "--n-fine", "0", "--device", "cpu", "--output-format", "dicom-seg", "--save-probabilities", "float32",
                     "--preview", "--json"]) == 0
        rows[name] = json.loads(capsys.readouterr().out)
    dicom, phantom = rows["ct5n"], rows["phantom"]
    volume, mask = read_volume(str(ct5n_dir)), read_volume(dicom["mask"]).array
    assert dicom["seg_uri"] == str(tmp_path / "out" / "ct5n.dcm") and dicom["note"] is None
    check_seg(dicom["seg_uri"], volume, mask, version=dicom_version(coarse, fine))
    probabilities = read_volume(dicom["probabilities_uri"])
    assert probabilities.shape == volume.shape and probabilities.meta["dtype"] == "float32"
    assert np.allclose(probabilities.affine, volume.affine, atol=1e-4)
    assert dicom["probabilities_uri"] == str(tmp_path / "out" / "ct5n_probabilities.nii.gz")
    assert matplotlib.image.imread(dicom["preview_uri"]).ndim == 3
    assert dicom["pred_volume_ml"] == pytest.approx(mask.sum() * np.prod(volume.spacing) / 1000)
    # a NIfTI input: its mask, probabilities and preview, no SEG, and the row says why
    assert "seg_uri" not in phantom and phantom["note"] == NO_SEG
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["ct5n.nii.gz", "ct5n.dcm", "ct5n_probabilities.nii.gz", "ct5n.png",
         "phantom.nii.gz", "phantom_probabilities.nii.gz", "phantom.png"])


def dicom_version(coarse: str, fine: str) -> str:
    return algorithm_version(load_bundle(coarse).id, load_bundle(fine).id)
