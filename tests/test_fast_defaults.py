"""The engine's fast defaults (precision and channels-last "auto"): resolved by detection, and
the masks they give match fp32's (parity is the condition for making them the defaults).

Real engine, shipped demo bundles, a held-out synthetic phantom. On a machine without native
bf16, "auto" is fp32 (channels-last on the CPU), and bf16 is forced separately: torch still
computes it correctly there, only slowly, so that test keeps its windows few.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resdsn_ray import devices
from resdsn_ray.bundle import demo_bundle_uri, load_bundle
from resdsn_ray.config import EngineConfig, WindowConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.errors import InputError
from resdsn_ray.metrics import case_metrics
from resdsn_ray.synthetic import case_seed, make_case
from resdsn_ray.volumes import Volume

CPU = torch.device("cpu")
MASK_DSC = 0.99  # fast mask against the fp32 mask, per case
GT_DROP = 0.002  # DSC against the ground truth may fall by at most this


def cpuinfo(tmp_path, monkeypatch, flags: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(devices, "CPUINFO", path)


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma", False),
    ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without its BF16 extension
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_tile amx_bf16 amx_int8", True),
])
def test_cpu_bf16_is_detected_from_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo(tmp_path, monkeypatch, flags)
    assert devices.native_bf16(CPU) is native
    assert devices.resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert devices.resolve_precision("fp16", CPU) == "fp16"  # explicit settings are kept


def test_auto_is_resolved_once_and_exposed(tmp_path, monkeypatch):
    cpuinfo(tmp_path, monkeypatch, "fpu avx2 avx512_bf16")
    model = load_bundle(demo_bundle_uri("coarse"))
    engine = CoarseToFine(model, None, EngineConfig(mode="coarse", device="cpu"))
    assert (engine.config.precision, engine.precision, engine.channels_last) == ("auto", "bf16", True)
    weight = model.model.conv2.conv_a[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    # The layout is set both ways: a plain engine on the same bundle puts it back.
    plain = CoarseToFine(model, None, EngineConfig(mode="coarse", device="cpu", precision="fp32", channels_last="off"))
    assert (plain.precision, plain.channels_last) == ("fp32", False)
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_channels_last_rule():
    assert devices.resolve_channels_last("auto", CPU, "fp32")
    assert devices.resolve_channels_last("auto", torch.device("cuda"), "bf16")
    assert not devices.resolve_channels_last("auto", torch.device("cuda"), "fp32")
    assert not devices.resolve_channels_last("off", CPU, "bf16")
    assert devices.resolve_channels_last("on", torch.device("cuda"), "fp32")


def test_unknown_settings_are_refused_by_name():
    with pytest.raises(InputError, match="channels_last"):
        EngineConfig(channels_last=True)
    with pytest.raises(InputError, match="precision"):
        EngineConfig(precision="int8")


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, np.ndarray]:
    image, label, affine = make_case(case_seed(777, 0))  # the held-out archive seed of bench/accuracy.py
    return Volume(array=image.astype(np.float32), affine=affine, source="synthetic:777/0"), label > 0


def segment(volume: Volume, **settings: str) -> tuple[CoarseToFine, np.ndarray]:
    # n = 0: the fewest windows that cover the volume (bf16 is slow where it is not native).
    config = EngineConfig(coarse=WindowConfig(n=0), fine=WindowConfig(n=0), device="cpu", **settings)
    engine = CoarseToFine(load_bundle(demo_bundle_uri("coarse")), load_bundle(demo_bundle_uri("fine")), config)
    result = engine.segment(volume)
    assert result.fine_windows > 0, "the coarse stage found no organ: nothing to compare"
    return engine, result.mask > 0


@pytest.fixture(scope="module")
def fp32_mask(phantom) -> np.ndarray:
    return segment(phantom[0], precision="fp32", channels_last="off")[1]


def assert_parity(volume: Volume, label: np.ndarray, fast: np.ndarray, reference: np.ndarray) -> None:
    assert case_metrics(fast, reference, volume.spacing)["dsc"] >= MASK_DSC
    truth = {name: case_metrics(mask, label, volume.spacing)["dsc"] for name, mask in (("fast", fast), ("fp32", reference))}
    assert truth["fp32"] > 0.8, f"the demo models should find the organ: {truth}"
    assert truth["fast"] >= truth["fp32"] - GT_DROP, truth


def test_default_settings_match_fp32(phantom, fp32_mask):
    volume, label = phantom
    engine, mask = segment(volume)
    assert engine.precision == ("bf16" if devices.native_bf16(CPU) else "fp32")
    assert engine.channels_last
    assert_parity(volume, label, mask, fp32_mask)


def test_bf16_matches_fp32(phantom, fp32_mask):
    volume, label = phantom
    engine, mask = segment(volume, precision="bf16")
    assert engine.precision == "bf16"
    assert_parity(volume, label, mask, fp32_mask)
