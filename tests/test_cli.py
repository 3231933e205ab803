"""The `resdsn` command end to end, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch

from resdsn_ray.bundle import save_bundle
from resdsn_ray.config import ModelConfig
from resdsn_ray.model import build_model


def resdsn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resdsn_ray.cli", *args], capture_output=True, text=True, timeout=600)


def test_synth_then_segment_writes_a_mask_on_the_input_grid(tmp_path):
    archive = tmp_path / "archive"
    done = resdsn("synth", str(archive), "--cases", "2", "--seed", "3", "--shape", "48", "40", "24")
    assert done.returncode == 0, done.stderr
    dataset = json.loads((archive / "dataset.json").read_text())
    assert dataset["numTraining"] == 2
    image = archive / dataset["training"][1]["image"].removeprefix("./")
    label = archive / dataset["training"][1]["label"].removeprefix("./")

    torch.manual_seed(0)
    for stage in ("coarse", "fine"):
        save_bundle(str(tmp_path / stage), build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    out = tmp_path / "pred" / "mask.nii.gz"
    done = resdsn("segment", str(image), "--out", str(out), "--coarse", str(tmp_path / "coarse"),
                  "--fine", str(tmp_path / "fine"), "--label", str(label), "--n-coarse", "0", "--n-fine", "1")
    assert done.returncode == 0, done.stderr
    assert "t_coarse_s" in done.stdout and "dsc" in done.stdout

    source, mask = nib.load(image), nib.load(out)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
    assert mask.get_data_dtype() == np.uint8
    assert int(mask.header["sform_code"]) > 0 and int(mask.header["qform_code"]) > 0


def test_segment_names_the_bad_input_and_exits_nonzero(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    torch.manual_seed(0)
    for stage in ("coarse", "fine"):
        save_bundle(str(tmp_path / stage), build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    done = resdsn("segment", str(bad), "--out", str(tmp_path / "m.nii.gz"),
                  "--coarse", str(tmp_path / "coarse"), "--fine", str(tmp_path / "fine"))
    assert done.returncode == 2
    assert "broken.nii.gz" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "m.nii.gz").exists()


def test_version_and_a_json_row(tmp_path):
    done = resdsn("--version")
    assert done.returncode == 0 and done.stdout.startswith("resdsn_ray ")
    archive = tmp_path / "archive"
    assert resdsn("synth", str(archive), "--cases", "1", "--seed", "2", "--shape", "40", "40", "24").returncode == 0
    done = resdsn("segment", str(archive / "imagesTr" / "case_0000.nii.gz"), "--out", str(tmp_path / "m.nii.gz"),
                  "--label", str(archive / "labelsTr" / "case_0000.nii.gz"), "--demo-models", "--n-coarse", "0",
                  "--n-fine", "0", "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["demo_models"] is True and row["shape"] == [40, 40, 24] and 0.0 <= row["dsc"] <= 1.0
