"""Training recipes without Ray: the presets, the paper's optimisation formulas, and refusals of
bad settings by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model
from resdsn_ray.recipes import JHMI_ITERATIONS, make_optimizer, poly_lr, preset_config, split_batch, train_step

torch.set_num_threads(1)


def test_poly_learning_rate_and_paper_preset():
    assert poly_lr(0.01, 0, 80_000) == 0.01
    assert poly_lr(0.01, 40_000, 80_000) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 79_999, 80_000) == pytest.approx(0.01 * (1 / 80_000) ** 0.9)
    paper = preset_config("paper", "coarse")
    assert (paper.iterations, paper.batch_size, paper.lr, paper.momentum, paper.lr_power, paper.weight_decay) == (
        80_000, 16, 0.01, 0.9, 0.9, 5e-4)
    assert (paper.model.patch, paper.model.width, paper.model.aux_weights) == (64, 32, (0.2, 0.4))
    assert (paper.val_n, preset_config("paper", "fine").val_n) == (6, 12)  # the engine's windows per stage
    assert (paper.foreground_share, paper.loss) == (0.0, "ce")  # the paper's uniform patches and Eq. 3
    jhmi = preset_config("paper", "fine", iterations=JHMI_ITERATIONS)
    assert jhmi.iterations == JHMI_ITERATIONS == 300_000 and jhmi.stage == "fine"
    optimizer = make_optimizer(build_model("resdsn", width=2), paper)
    assert paper.optimizer == "sgd" and isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["weight_decay"]) == (0.9, 5e-4)


def test_demo_preset_overrides_and_refusals_by_field():
    demo = preset_config("demo", "fine", width=4, patch=16, name="dsn", lr=None, iterations=None, seed=7)
    assert (demo.model.name, demo.model.width, demo.model.patch) == ("dsn", 4, 16)
    assert (demo.lr, demo.iterations, demo.optimizer, demo.seed) == (3e-3, 800, "adam", 7)  # None: the preset's
    assert isinstance(make_optimizer(build_model("resdsn", width=2), demo), torch.optim.Adam)
    assert (preset_config("demo", "coarse").foreground_share, demo.foreground_share) == (0.5, 0.0)
    refusals = [
        ({"foreground_share": 1.5}, "foreground_share: must be in \\[0, 1\\]"),
        ({"loss": "focal"}, "loss: must be one of ce, dice_ce"),
        ({"patch": 12}, "patch: must be a multiple of 8"),
        ({"iterations": 0}, "iterations: must be at least 1"),
        ({"optimizer": "rmsprop"}, "optimizer: must be one of sgd, adam"),
        ({"fail_at": 3}, "fail_at: is not a training setting"),
    ]
    for overrides, message in refusals:
        with pytest.raises(InputError, match=message):
            preset_config("demo", "coarse", **overrides)
    with pytest.raises(InputError, match="preset: must be one of paper, demo"):
        preset_config("fast", "coarse")
    with pytest.raises(InputError, match="stage: must be one of coarse, fine"):
        preset_config("demo", "both")


def test_train_step_minimises_eq3_with_sgd_weight_decay():
    torch.manual_seed(0)
    model = build_model("resdsn", width=2)
    reference = copy.deepcopy(model)
    config = preset_config("paper", "coarse")
    optimizer = make_optimizer(model, config)
    x = torch.randn(2, 1, 8, 8, 8)
    y = (torch.rand(2, 8, 8, 8) > 0.7).long()
    main, aux2, aux3 = reference(x)
    expected = F.cross_entropy(main, y) + 0.2 * F.cross_entropy(aux2, y) + 0.4 * F.cross_entropy(aux3, y)
    expected.backward()
    loss = train_step(model, optimizer, x, y, lr=0.005, aux_weights=config.model.aux_weights)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)
    # First SGD step (momentum buffer empty): p <- p - lr * (grad + weight_decay * p).
    for new, old in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(new, old - 0.005 * (old.grad + 5e-4 * old), rtol=1e-5, atol=1e-7)


def test_global_batch_split_over_workers():
    assert [split_batch(16, 3, r) for r in range(3)] == [6, 5, 5]
    assert [split_batch(16, 2, r) for r in range(2)] == [8, 8]
    with pytest.raises(ValueError):
        split_batch(2, 4, 0)


def test_dice_ce_adds_the_soft_dice_of_each_output():
    from resdsn_ray.model import deep_supervision_loss, soft_dice_loss

    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, 2:4, 2:4, 2:4] = 1
    perfect = torch.stack([1 - target, target], dim=1).float() * 40 - 20  # confident and right
    assert soft_dice_loss(perfect, target).item() < 1e-3
    assert soft_dice_loss(-perfect, target).item() > 0.99  # confident and wrong
    torch.manual_seed(0)
    outputs = tuple(torch.randn(2, 2, 8, 8, 8) for _ in range(3))
    ce = deep_supervision_loss(outputs, target, (0.2, 0.4))
    dice = sum(w * soft_dice_loss(o, target) for w, o in zip((1.0, 0.2, 0.4), outputs))
    assert deep_supervision_loss(outputs, target, (0.2, 0.4), "dice_ce").item() == pytest.approx(ce.item() + dice.item(), rel=1e-5)
