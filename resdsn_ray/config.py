"""Typed, JSON-serialisable settings with the paper's defaults (Sec. 4.1-4.3).

Every output (bundle, run record) stores the settings that made it, so a result can always be
traced back and reproduced.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Fusion = Literal["average", "vote", "gaussian"]
Mode = Literal["c2f", "coarse", "fine"]
MODES: tuple[Mode, ...] = typing.get_args(Mode)  # the paper's order: C2F, coarse-only, fine-only
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PreprocessConfig:
    """HU window and per-case normalisation (paper Sec. 4.1)."""

    hu_min: float = -100.0
    hu_max: float = 240.0
    zscore: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture; `patch` is the cubic input size P (a multiple of 8)."""

    name: str = "resdsn"
    width: int = 32
    patch: int = 64
    in_channels: int = 1
    classes: int = 2
    aux_weights: tuple[float, float] = (0.2, 0.4)


@dataclass(frozen=True)
class WindowConfig:
    """Sliding-window inference of one stage: k = floor(L/P) + n windows per axis."""

    n: int = 6
    fusion: Fusion = "average"
    batch_size: int = 4


@dataclass(frozen=True)
class EngineConfig:
    """Coarse-to-fine inference of one case (paper Sec. 3.3, 4.1, Table 5)."""

    coarse: WindowConfig = field(default_factory=lambda: WindowConfig(n=6))
    fine: WindowConfig = field(default_factory=lambda: WindowConfig(n=12))
    margin: int = 20
    post_ratio: float = 0.2
    mode: Mode = "c2f"
    device: str = "auto"
    precision: Precision = "fp32"
    accumulate_on: Literal["device", "cpu"] = "device"
    channels_last: bool = False


def to_dict(obj: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON-ready data."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a settings dataclass (nested ones too) from `to_dict` output.

    Unknown keys are refused: a misspelt setting must not be silently ignored.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
