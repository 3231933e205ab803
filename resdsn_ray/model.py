"""ResDSN (paper Sec. 3.4, Fig. 3) and the ablation variants of Tables 1, 4 and 6, with the
deep-supervision loss of Eq. 3.

One class builds all five networks from three switches, so the ablations differ only in what
the paper varies (long sums, short sums, auxiliary heads) and nothing else.

Layout (``w`` = width, 32 in the paper; sizes for a P^3 input, P a multiple of 8)::

    Conv1a w @P -> pool -> Conv2a/2b 2w @P/2 -> pool -> Conv3a/3b 4w @P/4 -> pool
    -> Conv4a/4b 8w @P/8
    -> DeConv3a 4w @P/4 (+ Conv3b) -> two convs 4w
    -> DeConv2a 2w @P/2 (+ Conv2b) -> two convs 2w
    -> DeConv1a  w @P   (+ Conv1a) -> Res/Conv1b w -> 1x1x1 conv -> classes   (main logits)
    aux from Conv2b: one deconv 2w->w, 1x1x1 conv -> classes          (xi_1 = 0.2)
    aux from Conv3b: two deconvs 4w->2w->w, 1x1x1 conv -> classes     (xi_2 = 0.4)

Convs are 3x3x3 / padding 1, pools max 2/2, deconvs kernel 4 / stride 2 / padding 1 (exact 2x).

Choices the paper leaves open (Figure 3 is not in our copy of the text):
- Every conv and deconv is conv -> BatchNorm3d -> ReLU (Fig. 3 caption), including the
  auxiliary deconvs; only the three 1x1x1 classifiers are plain convs with a bias. Convs and
  deconvs followed by BatchNorm carry no bias (BN's shift makes it redundant).
- Auxiliary deconvs halve the channels at each step (Conv2b 2w -> w; Conv3b 4w -> 2w -> w),
  as in the 3D-DSN code (yulequan/HeartSeg) that ResDSN descends from; there they have no BN or
  ReLU, here they follow the caption's rule above.
- Long residual sums add the decoder deconv's output to the encoder feature after both ReLUs
  ("low-level cues are directly added to the high-level cues"); the sum then feeds the convs.
- Short residual (``fresdsn``, ``sresdsn``): a residual unit [He et al.] around each two-conv
  block (Conv2a/2b, Conv3a/3b, Conv4a/4b and the two decoder pairs):
  relu(BN(conv_b(relu(BN(conv_a(x))))) + shortcut(x)), i.e. the sum comes before the second
  ReLU. The shortcut is the identity where channels match (decoder) and a 1x1x1 conv + BN
  projection where they do not (encoder). Single-conv steps (Conv1a, Res/Conv1b) have none.
- ``sresdsn`` and ``dsn`` keep the decoder (deconvs and convs) but add no encoder features.
- Weight init: Kaiming normal (fan-in, ReLU gain, torch's fan convention) for every conv and
  deconv; BN weight 1, bias 0; classifier biases 0. (The paper's Caffe code used
  gaussian(0.01); every deconv here is followed by BN, so its scale does not reach the
  activations.)
- Loss: cross-entropy averaged over voxels and batch, where Eq. 1 sums; the mean only rescales
  the learning rate and keeps it independent of patch and batch size. The L2 term of Eq. 3 is
  the optimiser's weight decay.

Forward: eval mode returns the main logits [B, classes, D, H, W]; training mode returns
``(main, aux_conv2b, aux_conv3b)`` (``(main,)`` for ``res``), so the aux heads cost nothing at
inference. Only out-of-place sums, no concatenation: works under autocast and with
``torch.channels_last_3d``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resdsn_ray.config import ModelName

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Variant:
    """Which of the paper's three ingredients a network has (Table 1)."""

    long_residual: bool
    short_residual: bool
    deep_supervision: bool


VARIANTS: dict[str, Variant] = {
    "resdsn": Variant(long_residual=True, short_residual=False, deep_supervision=True),
    "fresdsn": Variant(long_residual=True, short_residual=True, deep_supervision=True),
    "sresdsn": Variant(long_residual=False, short_residual=True, deep_supervision=True),
    "dsn": Variant(long_residual=False, short_residual=False, deep_supervision=True),
    "res": Variant(long_residual=True, short_residual=False, deep_supervision=False),
}
MODEL_NAMES: tuple[str, ...] = typing.get_args(ModelName)  # the vocabulary is config's
assert set(VARIANTS) == set(MODEL_NAMES), "every model name has exactly one variant"


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(cin, cout), nn.ReLU(inplace=True))


def _deconv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Exact 2x upsampling: (n - 1) * 2 - 2 * 1 + 4 = 2n."""
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class ConvPair(nn.Module):
    """Two conv-BN-ReLU layers (e.g. Conv2a/2b); with `short`, a residual unit around them."""

    def __init__(self, cin: int, cout: int, short: bool) -> None:
        super().__init__()
        self.conv_a = _conv_bn_relu(cin, cout)
        self.shortcut: nn.Module | None = None
        if short:
            self.conv_b = nn.Sequential(*_conv_bn(cout, cout))
            self.shortcut = (
                nn.Identity()
                if cin == cout
                else nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False), nn.BatchNorm3d(cout))
            )
        else:
            self.conv_b = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_b(self.conv_a(x))
        if self.shortcut is None:
            return y
        return F.relu(y + self.shortcut(x), inplace=True)


class UpStep(nn.Module):
    """One decoder step: deconv to the encoder step's size, optional long sum, then convs."""

    def __init__(self, cin: int, cout: int, convs: nn.Module, long: bool) -> None:
        super().__init__()
        self.deconv = _deconv_bn_relu(cin, cout)
        self.long = long
        self.convs = convs

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.deconv(x)
        if self.long:
            x = x + skip
        return self.convs(x)


def _aux_head(cin: int, steps: int, classes: int) -> nn.Sequential:
    """`steps` channel-halving 2x deconvs back to input size, then a 1x1x1 classifier."""
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers.append(_deconv_bn_relu(cin, cin // 2))
        cin //= 2
    layers.append(nn.Conv3d(cin, classes, 1))
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm3d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ResDSN(nn.Module):
    """The encoder-decoder of Fig. 3 with the ingredients chosen by `variant`."""

    def __init__(self, variant: Variant, width: int, in_channels: int, classes: int) -> None:
        super().__init__()
        self.variant = variant
        w, short, long = width, variant.short_residual, variant.long_residual
        self.conv1a = _conv_bn_relu(in_channels, w)
        self.pool = nn.MaxPool3d(2, stride=2)
        self.conv2 = ConvPair(w, 2 * w, short)
        self.conv3 = ConvPair(2 * w, 4 * w, short)
        self.conv4 = ConvPair(4 * w, 8 * w, short)
        self.up3 = UpStep(8 * w, 4 * w, ConvPair(4 * w, 4 * w, short), long)
        self.up2 = UpStep(4 * w, 2 * w, ConvPair(2 * w, 2 * w, short), long)
        self.up1 = UpStep(2 * w, w, _conv_bn_relu(w, w), long)  # Res/Conv1b
        self.classifier = nn.Conv3d(w, classes, 1)
        self.aux2: nn.Module | None = None
        self.aux3: nn.Module | None = None
        if variant.deep_supervision:
            self.aux2 = _aux_head(2 * w, 1, classes)
            self.aux3 = _aux_head(4 * w, 2, classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> Outputs:
        if x.dim() != 5 or any(s < 8 or s % 8 for s in x.shape[2:]):
            raise ValueError(
                "ResDSN input must be [B, C, D, H, W] with D, H, W positive multiples of 8 "
                f"(three 2x poolings); got shape {tuple(x.shape)}"
            )
        c1 = self.conv1a(x)
        c2 = self.conv2(self.pool(c1))
        c3 = self.conv3(self.pool(c2))
        c4 = self.conv4(self.pool(c3))
        up = self.up1(self.up2(self.up3(c4, c3), c2), c1)
        main = self.classifier(up)
        if not self.training:
            return main
        if self.aux2 is None or self.aux3 is None:
            return (main,)
        return main, self.aux2(c2), self.aux3(c3)


def build_model(
    name: str = "resdsn", width: int = 32, in_channels: int = 1, classes: int = 2
) -> nn.Module:
    """The named network (one of `MODEL_NAMES`), freshly initialised."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if width < 1 or in_channels < 1 or classes < 2:
        raise ValueError(
            f"need width >= 1, in_channels >= 1, classes >= 2; "
            f"got {width}, {in_channels}, {classes}"
        )
    return ResDSN(VARIANTS[name], width, in_channels, classes)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the batch's soft Dice of the foreground class (nnU-Net's batch Dice): it weighs the
    organ by its own size, not by its few voxels among the background's many as CE does."""
    probability = torch.softmax(logits.float(), dim=1)[:, 1]
    truth = (target == 1).float()
    overlap = (probability * truth).sum()
    return 1 - (2 * overlap + 1) / (probability.sum() + truth.sum() + 1)


def deep_supervision_loss(
    outputs: Outputs, target: torch.Tensor, aux_weights: tuple[float, float] = (0.2, 0.4), loss: str = "ce"
) -> torch.Tensor:
    """Eq. 3 without the L2 term: CE(main) + xi_1 CE(aux Conv2b) + xi_2 CE(aux Conv3b).

    `outputs` is a training-mode forward result (or a bare main-logits tensor); `target` is
    [B, D, H, W] class indices. CE is the voxel mean, computed in float32 under autocast too.
    `loss` "dice_ce" adds the soft Dice to each output's CE (same weights).
    """
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    if len(outputs) not in (1, 3):
        raise ValueError(f"expected 1 or 3 outputs (main[, aux2, aux3]); got {len(outputs)}")
    if len(aux_weights) != 2:
        raise ValueError(f"aux_weights needs two values (xi_1, xi_2); got {aux_weights!r}")

    def term(logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target)
        return ce + soft_dice_loss(logits, target) if loss == "dice_ce" else ce

    total = term(outputs[0])
    if len(outputs) == 3:
        for weight, aux in zip(aux_weights, outputs[1:], strict=True):
            total = total + weight * term(aux)
    return total
