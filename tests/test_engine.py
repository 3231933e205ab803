"""The coarse-to-fine engine on real volumes: geometry of Crop/DeCrop, statuses, modes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from resdsn_ray import engine as engine_module
from resdsn_ray.bundle import Bundle
from resdsn_ray.config import EngineConfig, ModelConfig, PreprocessConfig, WindowConfig
from resdsn_ray.engine import STATUS_NO_ORGAN, STATUS_OK, CoarseToFine
from resdsn_ray.model import build_model
from resdsn_ray.volumes import Volume


class Bright(torch.nn.Module):
    """A deterministic 'network': foreground where the normalised intensity exceeds a level."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x - self.level) * 50.0
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def bundle(model: torch.nn.Module, stage: str, patch: int = 16) -> Bundle:
    raw = PreprocessConfig(hu_min=-1000.0, hu_max=1000.0, zscore=False)
    return Bundle(model=model, model_config=ModelConfig(patch=patch), stage=stage, preprocess=raw)


def volume_with_blob(shape=(40, 36, 30), blob=(slice(20, 27), slice(5, 11), slice(12, 20))) -> Volume:
    array = np.full(shape, -500.0, dtype=np.float32)
    array[blob] = 200.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return Volume(array=array, affine=affine, source="mem://blob")


def config(mode: str = "c2f", **kw) -> EngineConfig:
    windows = dict(n=1, batch_size=3)
    return EngineConfig(coarse=WindowConfig(**windows), fine=WindowConfig(**windows), mode=mode, device="cpu", **kw)


@pytest.mark.parametrize("mode", ["c2f", "coarse", "fine"])
def test_every_mode_marks_exactly_the_bright_blob(mode):
    volume = volume_with_blob()
    engine = CoarseToFine(bundle(Bright(0.0), "coarse"), bundle(Bright(0.0), "fine"), config(mode, margin=3))
    result = engine.segment(volume)
    assert result.status == STATUS_OK
    assert result.mask.dtype == np.uint8 and result.mask.shape == volume.shape
    np.testing.assert_array_equal(result.mask, volume.array > 0)
    assert (result.coarse_windows > 0) == (mode != "fine")
    assert (result.fine_windows > 0) == (mode != "coarse")


def test_fine_stage_runs_only_inside_the_box_and_decrops_to_the_right_place():
    # Coarse finds the blob; fine says "everything is organ": the result is exactly the box.
    volume = volume_with_blob()
    engine = CoarseToFine(bundle(Bright(0.0), "coarse"), bundle(Bright(-1e6), "fine"), config(margin=2))
    result = engine.segment(volume)
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[18:29, 3:13, 10:22] = 1
    np.testing.assert_array_equal(result.mask, expected)
    assert result.box.start == (18, 3, 10) and result.box.stop == (29, 13, 22)


def test_nothing_found_is_a_status_not_a_crash():
    volume = volume_with_blob()
    engine = CoarseToFine(bundle(Bright(1e6), "coarse"), bundle(Bright(0.0), "fine"), config())
    result = engine.segment(volume)
    assert result.status == STATUS_NO_ORGAN
    assert result.mask.shape == volume.shape and not result.mask.any()
    assert result.fine_windows == 0 and result.box is None


def test_on_no_organ_fine_runs_the_fine_model_on_the_whole_volume():
    volume = volume_with_blob()
    engine = CoarseToFine(bundle(Bright(1e6), "coarse"), bundle(Bright(0.0), "fine"), config(on_no_organ="fine"))
    result = engine.segment(volume)
    assert result.fine_fallback and result.box is None and result.status == STATUS_OK
    np.testing.assert_array_equal(result.mask, volume.array > 0)  # on the volume's own grid
    whole = CoarseToFine(bundle(Bright(0.0), "coarse"), bundle(Bright(0.0), "fine"), config(mode="fine"))
    assert result.fine_windows == whole.segment(volume).fine_windows  # the whole volume, not a crop
    found = CoarseToFine(bundle(Bright(0.0), "coarse"), bundle(Bright(0.0), "fine"), config(on_no_organ="fine"))
    assert not found.segment(volume).fine_fallback  # the coarse stage found the organ: the paper's C2F


def test_small_false_positives_are_dropped_before_the_box():
    volume = volume_with_blob()
    volume.array[2, 30, 2] = 200.0  # a 1-voxel speck far away would stretch the box
    engine = CoarseToFine(bundle(Bright(0.0), "coarse"), bundle(Bright(0.0), "fine"), config(margin=0))
    result = engine.segment(volume)
    assert result.box.start == (20, 5, 12) and result.box.stop == (27, 11, 20)
    assert result.mask[2, 30, 2] == 0


def test_random_resdsn_runs_on_an_anisotropic_volume_smaller_than_a_patch():
    torch.manual_seed(0)
    model = build_model("resdsn", width=4)
    volume = Volume(array=np.random.default_rng(0).normal(0, 100, (20, 50, 9)).astype(np.float32),
                    affine=np.diag([0.7, 0.7, 3.0, 1.0]), source="mem://noise")
    result = CoarseToFine(bundle(model, "coarse"), bundle(model, "fine"), config(mode="coarse")).segment(volume)
    assert result.mask.shape == volume.shape
    assert {"preprocess", "coarse", "post"} <= set(result.timings)


def test_mode_without_its_bundle_is_refused():
    with pytest.raises(ValueError, match="fine"):
        CoarseToFine(bundle(Bright(0.0), "coarse"), None, config("c2f"))


def test_engine_imports_without_ray_or_the_readers():
    # A bare GPU box (bench/gpu_engine.py) has torch but not Ray, nibabel, pydicom or s3fs.
    blocked = ("ray", "nibabel", "pydicom", "s3fs")
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import resdsn_ray.engine"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the pinned slab upload runs only there)")
def test_cuda_stage_streams_the_volume_in_slabs_and_matches_the_cpu(monkeypatch):
    torch.manual_seed(0)
    model = build_model("resdsn", width=4)
    image = np.random.default_rng(1).normal(0, 1, (70, 40, 33)).astype(np.float32)
    crop = image[5:60, 3:, :]  # a strided view, as the fine stage gets it
    monkeypatch.setattr(engine_module, "SLAB_BYTES", 3 * crop[:1].nbytes)  # 19 slabs through the 2 buffers
    masks = {}
    for device in ("cpu", "cuda"):
        window = WindowConfig(n=1, batch_size=5)
        settings = EngineConfig(coarse=window, mode="coarse", device=device, precision="fp32", channels_last="off")
        masks[device], windows, _ = CoarseToFine(bundle(model, "coarse"), None, settings).run_stage("coarse", crop)
    assert windows % 5  # the last batch is filled up on CUDA
    assert (masks["cpu"] != masks["cuda"]).mean() < 1e-3
