"""Model bundles: a folder or URI holding `config.json` and `weights.safetensors`.

safetensors stores raw tensors only, so loading a bundle from an untrusted archive never
unpickles arbitrary objects (unlike `torch.load` of a pickled state dict).

A training whose model collapsed (validation DSC 0, or no foreground predicted on the validation
cases) still writes its bundle, for inspection, but marks it unfit (`"fit": false` and the
reason in config.json); loading refuses it unless asked to allow it. A bundle without the mark
(older bundles, the shipped demo bundles) is fit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from resdsn_ray import storage
from resdsn_ray.config import ModelConfig, PreprocessConfig, from_dict, to_dict
from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
STAGES = ("coarse", "fine")
DEMO_BUNDLES = Path(__file__).parent / "bundles"


@dataclass
class Bundle:
    """A trained network with the settings it was trained under."""

    model: torch.nn.Module
    model_config: ModelConfig
    stage: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    provenance: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    id: str = ""
    unfit: str | None = None  # why its training judged it unfit; None: fit


def demo_bundle_uri(stage: str) -> str:
    """The shipped demo bundle of a stage (see README for the command that trained it)."""
    return str(DEMO_BUNDLES / f"demo-{stage}")


def save_bundle(
    uri: str,
    model: torch.nn.Module,
    model_config: ModelConfig,
    stage: str,
    preprocess: PreprocessConfig = PreprocessConfig(),
    provenance: dict[str, Any] | None = None,
    unfit: str | None = None,
) -> str:
    """Write weights, then config.json last (its presence marks a complete bundle); return the id.

    `unfit`: why the training judged the model unfit (written as `"fit": false, "unfit": why`).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    module = getattr(model, "module", model)  # unwrap DDP
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = save_safetensors(tensors)
    bundle_id = hashlib.sha256(weights).hexdigest()[:12]
    config = {
        "format": "resdsn-bundle/1",
        "id": bundle_id,
        "stage": stage,
        "model": to_dict(model_config),
        "preprocess": to_dict(preprocess),
        "provenance": provenance or {},
        "fit": unfit is None,
        **({"unfit": unfit} if unfit else {}),
    }
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_json(storage.join(uri, CONFIG_FILE), config)
    return bundle_id


def unfit_reason(config: dict[str, Any]) -> str | None:
    """Why a bundle's config.json marks it unfit; None for a fit bundle (or one without the mark)."""
    if config.get("fit", True):
        return None
    return str(config.get("unfit") or "marked unfit by its training")


def read_unfit(uri: str) -> str | None:
    """`unfit_reason` of the bundle at `uri`, from its config.json alone (no weights read)."""
    try:
        return unfit_reason(storage.read_json(storage.join(uri, CONFIG_FILE)))
    except FileNotFoundError as err:
        raise InputError(uri, f"not a model bundle ({CONFIG_FILE} missing)") from err


def refuse_unfit(uri: str, reason: str | None) -> None:
    """Raise InputError naming the bundle when its training marked it unfit."""
    if reason:
        raise InputError(uri, f"model bundle marked unfit by its training: {reason} (--allow-unfit uses it anyway)")


def load_bundle(uri: str, device: str | torch.device = "cpu", allow_unfit: bool = False) -> Bundle:
    """Load a bundle's network in eval mode on `device`; a bad bundle, or one marked unfit
    (unless `allow_unfit`), raises InputError."""
    try:
        config = storage.read_json(storage.join(uri, CONFIG_FILE))
        weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise InputError(uri, f"not a model bundle ({CONFIG_FILE} or {WEIGHTS_FILE} missing)") from err
    except (OSError, ValueError) as err:
        raise InputError(uri, f"unreadable model bundle: {err}") from err
    unfit = unfit_reason(config)
    if not allow_unfit:
        refuse_unfit(uri, unfit)
    try:
        model_config = from_dict(ModelConfig, config["model"])
        preprocess = from_dict(PreprocessConfig, config.get("preprocess", {}))
        model = build_model(
            model_config.name,
            width=model_config.width,
            in_channels=model_config.in_channels,
            classes=model_config.classes,
        )
        model.load_state_dict(load_safetensors(weights))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(uri, f"model bundle does not match its config: {err}") from err
    model.to(device).eval()
    return Bundle(
        model=model,
        model_config=model_config,
        stage=config["stage"],
        preprocess=preprocess,
        provenance=config.get("provenance", {}),
        uri=str(uri),
        id=config.get("id") or hashlib.sha256(weights).hexdigest()[:12],
        unfit=unfit,
    )
