"""Model bundles: round trip, identity, and refusal of broken bundles."""

from __future__ import annotations

import json

import pytest
import torch

from resdsn_ray.bundle import CONFIG_FILE, WEIGHTS_FILE, load_bundle, save_bundle
from resdsn_ray.config import ModelConfig, PreprocessConfig
from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model


def small_bundle(path, name="resdsn", seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(name=name, width=4, patch=16)
    model = build_model(name, width=4)
    bundle_id = save_bundle(str(path), model, config, "coarse", PreprocessConfig(hu_min=-50.0),
                            {"note": "test"})
    return model.eval(), config, bundle_id


@pytest.mark.parametrize("name", ["resdsn", "fresdsn", "res"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model, config, bundle_id = small_bundle(tmp_path / "b", name)
    loaded = load_bundle(str(tmp_path / "b"))
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.model_config == config
    assert loaded.preprocess.hu_min == -50.0 and loaded.stage == "coarse"
    assert loaded.id == bundle_id and loaded.provenance == {"note": "test"}


def test_weights_are_safetensors_not_pickles(tmp_path):
    small_bundle(tmp_path / "b")
    raw = (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensors


def test_different_weights_have_different_ids(tmp_path):
    *_, first = small_bundle(tmp_path / "a", seed=0)
    *_, second = small_bundle(tmp_path / "b", seed=1)
    assert first != second


def test_missing_and_mismatched_bundles_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a model bundle"):
        load_bundle(str(tmp_path / "nothing"))
    small_bundle(tmp_path / "b")
    config = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    config["model"]["width"] = 8
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(InputError, match="does not match"):
        load_bundle(str(tmp_path / "b"))


def test_a_bundle_marked_unfit_is_refused_unless_allowed(tmp_path):
    model = build_model("resdsn", width=4)
    save_bundle(str(tmp_path / "unfit"), model, ModelConfig(width=4, patch=16), "coarse", unfit="validation DSC 0.0")
    config = json.loads((tmp_path / "unfit" / CONFIG_FILE).read_text())
    assert config["fit"] is False and config["unfit"] == "validation DSC 0.0"
    with pytest.raises(InputError, match="marked unfit by its training: validation DSC 0.0") as refused:
        load_bundle(str(tmp_path / "unfit"))
    assert refused.value.source == str(tmp_path / "unfit")
    assert load_bundle(str(tmp_path / "unfit"), allow_unfit=True).unfit == "validation DSC 0.0"
    # Fit, and bundles from before the mark (no "fit" key), load as before.
    small_bundle(tmp_path / "fit")
    assert json.loads((tmp_path / "fit" / CONFIG_FILE).read_text())["fit"] is True
    del config["fit"], config["unfit"]
    (tmp_path / "unfit" / CONFIG_FILE).write_text(json.dumps(config))
    assert load_bundle(str(tmp_path / "fit")).unfit is None and load_bundle(str(tmp_path / "unfit")).unfit is None
