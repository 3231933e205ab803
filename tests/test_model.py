"""ResDSN variants: shapes, the Eq. 3 loss, input checks, and that the ablations really differ."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from resdsn_ray.model import MODEL_NAMES, build_model, deep_supervision_loss

torch.set_num_threads(1)

AUX_COUNT = {"resdsn": 2, "fresdsn": 2, "sresdsn": 2, "dsn": 2, "res": 0}


def _input(patch: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, patch, patch, patch, generator=torch.Generator().manual_seed(seed))


def test_model_names() -> None:
    assert MODEL_NAMES == ("resdsn", "fresdsn", "sresdsn", "dsn", "res")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("patch", "width"), [(32, 8), (64, 4)])
def test_output_shapes(name: str, patch: int, width: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, width=width, classes=2)
    x = _input(patch)
    with torch.no_grad():
        model.train()
        outs = model(x)
        model.eval()
        main = model(x)
    assert isinstance(outs, tuple) and len(outs) == 1 + AUX_COUNT[name]
    assert all(o.shape == (2, 2, patch, patch, patch) for o in outs)
    assert isinstance(main, torch.Tensor) and main.shape == (2, 2, patch, patch, patch)


def test_full_width_resdsn_shapes() -> None:
    torch.manual_seed(0)
    model = build_model("resdsn")
    assert model.conv1a[0].out_channels == 32 and model.conv4.conv_b[0].out_channels == 256
    x = _input(32, batch=1)
    with torch.no_grad():
        main, aux2, aux3 = model.train()(x)
        assert model.eval()(x).shape == (1, 2, 32, 32, 32)
    assert main.shape == aux2.shape == aux3.shape == (1, 2, 32, 32, 32)


def test_non_cubic_input_and_more_classes() -> None:
    model = build_model("fresdsn", width=4, in_channels=2, classes=3).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 16, 24, 8))
    assert out.shape == (1, 3, 16, 24, 8)


@pytest.mark.parametrize("shape", [(1, 1, 36, 32, 32), (1, 1, 32, 32, 4), (1, 1, 32, 32)])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    model = build_model("resdsn", width=4).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(shape))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_model("unet")
    assert all(name in str(err.value) for name in MODEL_NAMES)


def test_loss_is_eq3_without_l2() -> None:
    assert inspect.signature(deep_supervision_loss).parameters["aux_weights"].default == (0.2, 0.4)
    gen = torch.Generator().manual_seed(1)
    main, aux2, aux3 = (torch.randn(2, 2, 8, 8, 8, generator=gen) for _ in range(3))
    target = torch.randint(0, 2, (2, 8, 8, 8), generator=gen)

    def ce(logits: torch.Tensor) -> torch.Tensor:  # mean voxel NLL of the labelled class
        return -F.log_softmax(logits, dim=1).gather(1, target[:, None]).mean()

    assert torch.allclose(ce(main), F.cross_entropy(main, target))
    expected = ce(main) + 0.2 * ce(aux2) + 0.4 * ce(aux3)
    assert torch.allclose(deep_supervision_loss((main, aux2, aux3), target), expected)
    custom = deep_supervision_loss((main, aux2, aux3), target, aux_weights=(1.0, 0.0))
    assert torch.allclose(custom, ce(main) + ce(aux2))
    assert torch.allclose(deep_supervision_loss(main, target), ce(main))
    assert torch.allclose(deep_supervision_loss((main,), target), ce(main))
    with pytest.raises(ValueError):
        deep_supervision_loss((main, aux2), target)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_step_reaches_every_parameter(name: str) -> None:
    """DDP without find_unused_parameters needs every parameter in the training graph."""
    torch.manual_seed(0)
    model = build_model(name, width=4).train()
    x = _input(16)
    target = (x[:, 0] > 0).long()
    deep_supervision_loss(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def _eval_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_long_sums_only_where_the_paper_has_them(name: str) -> None:
    """Zeroing the encoder features handed to each decoder step changes the output only for
    variants with long residual sums (Table 1: resdsn, fresdsn, res)."""
    torch.manual_seed(0)
    model = build_model(name, width=4)
    x = _input(16)
    before = _eval_output(model, x)
    steps = [model.up1, model.up2, model.up3]
    handles = [
        s.register_forward_pre_hook(lambda _m, a: (a[0], torch.zeros_like(a[1]))) for s in steps
    ]
    after = _eval_output(model, x)
    for h in handles:
        h.remove()
    assert (not torch.equal(before, after)) == (name in ("resdsn", "fresdsn", "res"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_short_sums_only_where_the_paper_has_them(name: str) -> None:
    """fresdsn and sresdsn have a shortcut around each of the five two-conv blocks, and the
    shortcut reaches the output; the other variants have none."""
    torch.manual_seed(0)
    model = build_model(name, width=4)
    shortcuts = [m.shortcut for m in model.modules() if getattr(m, "shortcut", None) is not None]
    has_short = name in ("fresdsn", "sresdsn")
    assert len(shortcuts) == (5 if has_short else 0)
    if has_short:
        x = _input(16)
        before = _eval_output(model, x)
        handles = [
            s.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)) for s in shortcuts
        ]
        after = _eval_output(model, x)
        for h in handles:
            h.remove()
        assert not torch.equal(before, after)


def test_parameter_counts_separate_the_variants() -> None:
    counts, aux = {}, {}
    for name in MODEL_NAMES:
        params = dict(build_model(name, width=4).named_parameters())
        counts[name] = sum(p.numel() for p in params.values())
        aux[name] = sum(p.numel() for k, p in params.items() if k.startswith("aux"))
    assert aux["res"] == 0 and all(aux[n] > 0 for n in MODEL_NAMES if n != "res")
    assert counts["res"] == counts["resdsn"] - aux["resdsn"]
    # sums are parameter-free; only the encoder's 1x1x1 shortcut projections add weights
    assert counts["dsn"] == counts["resdsn"]
    assert counts["sresdsn"] == counts["fresdsn"] > counts["resdsn"]


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    weight = build_model("resdsn", width=32).conv4.conv_a[0].weight  # 256 x 128 x 3^3
    expected = math.sqrt(2.0 / (128 * 27))  # fan-in, ReLU gain
    assert abs(weight.std().item() / expected - 1) < 0.02
    assert abs(weight.mean().item()) < 0.02 * expected


def test_channels_last_and_autocast() -> None:
    # Patch 32, not 16: torch 2.13 CPU bf16 conv3d backward on a 2^3 map (patch 16's
    # bottleneck) intermittently returns NaN weight gradients (a torch kernel bug).
    torch.manual_seed(0)
    model = build_model("fresdsn", width=4)
    x = _input(32, batch=1)
    reference = _eval_output(model, x)
    model = model.to(memory_format=torch.channels_last_3d)
    x_cl = x.to(memory_format=torch.channels_last_3d)
    assert torch.allclose(_eval_output(model, x_cl), reference, atol=1e-4, rtol=1e-4)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(x_cl)
        loss = deep_supervision_loss(outs, (x[:, 0] > 0).long())
    assert outs[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and bad == []
