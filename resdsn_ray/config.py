"""Typed, JSON-serialisable, self-validating settings with the paper's defaults (Sec. 4.1-4.3).

Every default and every vocabulary (the `Literal` types) is written here once: the command line
takes its defaults and choices from these classes. Settings check themselves at construction
and raise `InputError(field, reason)`, so a bad value is refused up front, by name, instead of
failing on every case. Every output (bundle, run record) stores the settings that made it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal, TypeVar

from resdsn_ray.errors import InputError

T = TypeVar("T")

Fusion = Literal["average", "vote", "gaussian"]
Mode = Literal["c2f", "coarse", "fine"]
MODES: tuple[Mode, ...] = typing.get_args(Mode)  # the paper's order: C2F, coarse-only, fine-only
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 where the device has bf16 units (devices)
AccumulateOn = Literal["device", "cpu"]
# C2F when the coarse stage finds nothing: empty (the paper: status no_organ) or fine (the fine
# model on the whole volume; the row's `fine_fallback` says so).
OnNoOrgan = Literal["empty", "fine"]
Stage = Literal["coarse", "fine"]
STAGES: tuple[Stage, ...] = typing.get_args(Stage)
Preset = Literal["paper", "demo"]
Optimizer = Literal["sgd", "adam"]
Loss = Literal["ce", "dice_ce"]  # ce: the paper's Eq. 3; dice_ce: soft Dice + CE on each output (small organs)
Shape = Literal["whole", "split"]
ModelName = Literal["resdsn", "fresdsn", "sresdsn", "dsn", "res"]
# Synthetic phantom families (`synthetic.FAMILIES`): demo is the quick one, hard is closer to a
# real archive (anisotropic voxels, organ <= 0.5 % of the volume, LPS affines).
Family = Literal["demo", "hard"]
FAMILY_NAMES: tuple[Family, ...] = typing.get_args(Family)
DEFAULT_FAMILY: Family = "demo"
# A case's status: the engine decides ok / no_organ (the coarse stage found nothing, or the final
# mask is empty), the archive job adds error and skipped (done by an earlier run).
Status = Literal["ok", "no_organ", "error", "skipped"]
STATUS_OK, STATUS_NO_ORGAN, STATUS_ERROR, STATUS_SKIPPED = typing.get_args(Status)
FINISHED: tuple[Status, ...] = (STATUS_OK, STATUS_NO_ORGAN)

OutputFormat = Literal["nifti", "dicom-seg", "both"]
Probabilities = Literal["none", "uint8", "float32"]
PROGRESS_EVERY_S = 10.0  # a progress line this often where lines cannot be rewritten (logs, `ray job logs`)

MAX_WIDTH = 256  # a bundle asking for more is refused before anything is allocated
MAX_PATCH = 512


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a `Literal` field of a settings class (empty for other fields)."""
    hint = _hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


class Settings:
    """Base of the settings classes: Literal fields are checked, then the class's own rules."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = choices(type(self), f.name)
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise InputError(f.name, f"must be one of {', '.join(map(str, allowed))}, not {value!r}")
        self.check()

    def check(self) -> None:
        """Rules beyond the vocabularies; raise InputError(field, reason)."""

    def require(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise InputError(name, f"must be {rule}, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class PreprocessConfig(Settings):
    """HU window and per-case normalisation (paper Sec. 4.1)."""

    hu_min: float = -100.0
    hu_max: float = 240.0
    zscore: bool = True

    def check(self) -> None:
        self.require("hu_max", self.hu_max > self.hu_min, f"above hu_min ({self.hu_min:g})")


@dataclass(frozen=True)
class ModelConfig(Settings):
    """Network architecture; `patch` is the cubic input size P (a multiple of 8)."""

    name: ModelName = "resdsn"
    width: int = 32
    patch: int = 64
    in_channels: int = 1
    classes: int = 2
    aux_weights: tuple[float, float] = (0.2, 0.4)

    def check(self) -> None:
        self.require("width", 1 <= self.width <= MAX_WIDTH, f"between 1 and {MAX_WIDTH}")
        self.require("patch", 8 <= self.patch <= MAX_PATCH and self.patch % 8 == 0,
                     f"a multiple of 8 between 8 and {MAX_PATCH}")
        self.require("in_channels", self.in_channels >= 1, "at least 1")
        self.require("classes", self.classes >= 2, "at least 2")


@dataclass(frozen=True)
class WindowConfig(Settings):
    """Sliding-window inference of one stage: k = floor(L/P) + n windows per axis."""

    n: int = 6
    fusion: Fusion = "average"
    batch_size: int = 4

    def check(self) -> None:
        self.require("n", self.n >= 0, "0 or more")
        self.require("batch_size", self.batch_size >= 1, "at least 1")


@dataclass(frozen=True)
class EngineConfig(Settings):
    """Coarse-to-fine inference of one case (paper Sec. 3.3, 4.1, Table 5)."""

    # Fields that change how fast a mask is made, not the mask: left out of `mask_settings`.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "accumulate_on", "channels_last"})

    coarse: WindowConfig = field(default_factory=lambda: WindowConfig(n=6))
    fine: WindowConfig = field(default_factory=lambda: WindowConfig(n=12))
    margin: int = 20
    post_ratio: float = 0.2
    mode: Mode = "c2f"
    device: str = "auto"
    precision: Precision = "auto"
    accumulate_on: AccumulateOn = "device"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: NDHWC where faster (devices)
    on_no_organ: OnNoOrgan = "empty"

    def check(self) -> None:
        self.require("margin", self.margin >= 0, "0 or more")
        self.require("post_ratio", 0.0 <= self.post_ratio < 1.0, "in [0, 1)")
        self.require("device", bool(self.device), "a device name (auto, cpu, cuda, cuda:1, ...)")


# The demo archive job (and the CV's demo preset) must finish in minutes on a 2-core laptop:
# fewer overlapping windows than the paper's n = 6 / 12, unless --n-coarse / --n-fine are given.
DEMO_ENGINE = EngineConfig(coarse=WindowConfig(n=2), fine=WindowConfig(n=4))
# `--fast`: a first look at an archive, like TotalSegmentator's --fast: the fewest windows that
# still cover the volume coarsely and overlap the organ's box a little (its DSC cost: README).
FAST_ENGINE = EngineConfig(coarse=WindowConfig(n=0), fine=WindowConfig(n=2))


def mask_settings(engine: EngineConfig) -> dict[str, Any]:
    """What decides a mask besides the bundles: every engine setting but the speed-only ones.

    The one definition used by the archive job's `config_id` (resume) and the cross-validation's
    resume check. A new engine field counts unless it is added to `EngineConfig.SPEED_ONLY`.
    """

    def strip(data: dict[str, Any]) -> dict[str, Any]:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in data.items() if k not in EngineConfig.SPEED_ONLY}

    return strip(to_dict(engine))


@dataclass(frozen=True)
class TrainConfig(Settings):
    """One training run of one stage. `iterations` count global mini-batches."""

    # Settings that define the trained model; the others (cadences) may change on resume.
    RECIPE: ClassVar[tuple[str, ...]] = ("stage", "iterations", "batch_size", "optimizer", "lr", "momentum", "lr_power",
                                         "weight_decay", "seed", "model", "preprocess", "foreground_share", "loss")

    stage: Stage = "coarse"
    preset: Preset = "paper"
    iterations: int = 80_000
    batch_size: int = 16
    optimizer: Optimizer = "sgd"  # paper: SGD; the demo preset uses Adam (see recipes.preset_config)
    lr: float = 0.01
    momentum: float = 0.9
    lr_power: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    # Coarse stage: share of patches centred on an organ voxel, the rest uniform (paper: 0, all uniform).
    foreground_share: float = 0.0
    loss: Loss = "ce"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    validate_every: int = 5000
    val_n: int = 6  # sliding-window n for validation (paper: 6 coarse, 12 fine)
    val_margin: int = 20  # fine validation: ground-truth box + this margin, as the engine crops
    log_every: int = 20
    min_cases: int = 1

    def check(self) -> None:
        for name in ("iterations", "batch_size", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every",
                     "min_cases"):
            self.require(name, getattr(self, name) >= 1, "at least 1")
        self.require("lr", self.lr > 0, "positive")
        self.require("foreground_share", 0.0 <= self.foreground_share <= 1.0, "in [0, 1]")
        self.require("val_n", self.val_n >= 0, "0 or more")
        self.require("val_margin", self.val_margin >= 0, "0 or more")


def recipe(config: TrainConfig) -> dict[str, Any]:
    """The settings of `config` that define the trained model (`TrainConfig.RECIPE`)."""
    data = to_dict(config)
    return {key: data[key] for key in TrainConfig.RECIPE}


@dataclass(frozen=True)
class Resources(Settings):
    """How the archive job uses the cluster; None values are fitted to the connected cluster."""

    shape: Shape = "whole"
    coarse_actors: int | None = None  # the coarse (the `whole`) pool's largest size; None: the GPUs or CPUs shared out
    fine_actors: int | None = None
    fixed_pools: bool = False  # False: pools start with what the nodes up now hold (>= 1) and grow as nodes join
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: fitted to the cluster's nodes (`cluster.fit_cpus`)
    task_cpus: float | None = None  # each read/preprocess and finish/write task; None: fitted
    threads_per_actor: int | None = None  # torch CPU threads per actor; None: round(cpus_per_actor), at least 1
    read_tasks: int = 2
    cases_per_block: int | None = None  # cases per Ray Data block (one task per stage); None: by the cases' size (`pipeline.block_size`)
    actor_start_timeout_s: float = 600.0  # fail instead of hanging when no node can host an actor
    max_case_gb: float | None = None  # memory one case may need (reserved per task and actor); None: 1/8 of the smallest node's
    case_timeout_s: float | None = 3600.0  # a case still running this long after its read began becomes an error row

    def check(self) -> None:
        for name in ("coarse_actors", "fine_actors", "threads_per_actor"):
            self.require(name, getattr(self, name) is None or getattr(self, name) >= 1, "at least 1")
        for name in ("cpus_per_actor", "task_cpus"):
            self.require(name, getattr(self, name) is None or getattr(self, name) > 0, "positive")
        self.require("gpus_per_actor", self.gpus_per_actor is None or self.gpus_per_actor >= 0, "0 or more")
        self.require("read_tasks", self.read_tasks >= 1, "at least 1")
        self.require("cases_per_block", self.cases_per_block is None or self.cases_per_block >= 1, "at least 1")
        self.require("actor_start_timeout_s", self.actor_start_timeout_s > 0, "positive")
        self.require("max_case_gb", self.max_case_gb is None or self.max_case_gb > 0, "positive")
        self.require("case_timeout_s", self.case_timeout_s is None or self.case_timeout_s > 0, "positive")


@dataclass(frozen=True)
class OutputConfig(Settings):
    """What is written per case besides its NIfTI mask (`runs.OUTPUT_FILES`); statistics
    (`mask_stats`) are always computed, they are cheap.

    `format`: `dicom-seg` / `both` add a DICOM SEG for DICOM inputs (a NIfTI input has no source
    instances to reference: its row's `note` says so). The NIfTI mask is written in every format:
    it is the archive job's own record (resume stamp, statistics, report).
    `probabilities`: the fused foreground probabilities on the input grid, quantised to uint8
    (0..255 with scale 1/255, a quarter of float32's size) or float32 (NIfTI has no float16).
    """

    format: OutputFormat = "nifti"
    probabilities: Probabilities = "none"
    preview: bool = False

    @property
    def seg(self) -> bool:
        return self.format != "nifti"


@dataclass(frozen=True)
class ArchiveJob(Settings):
    """One archive run: what to segment, with which models and settings, and where to."""

    input: str
    output: str
    coarse: str | None
    fine: str | None
    engine: EngineConfig = field(default_factory=EngineConfig)
    resources: Resources = field(default_factory=Resources)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS / the submitting job, else a local Ray
    allow_prefixes: tuple[str, ...] | None = None  # where a manifest may point; None: the manifest's own folder
    demo_models: bool = False  # the shipped phantom-trained bundles on a real archive: allowed, and every row says so
    allow_unfit: bool = False  # use bundles their training marked unfit (a collapsed model) anyway
    overwrite: bool = False
    run_id: str | None = None
    fold: int | None = None
    flush_rows: int = 32
    flush_s: float = 15.0
    progress_s: float = PROGRESS_EVERY_S
    lease_heartbeat_s: float = 30.0  # one writer per output: the run renews its lease this often (stale after 4)
    hold_output: bool = True  # False: the caller holds the output's lease (a cross-validation, for its folds)

    def check(self) -> None:
        self.require("flush_rows", self.flush_rows >= 1, "at least 1")
        if self.outputs.probabilities != "none" and self.resources.shape == "split":
            raise InputError("outputs.probabilities", "needs the whole shape (--shape whole): the split shape's "
                                                      "pools pass masks, not probabilities")
        for name in ("flush_s", "progress_s", "lease_heartbeat_s"):
            self.require(name, getattr(self, name) > 0, "positive")


@dataclass(frozen=True)
class CVJob(Settings):
    """One cross-validation run: the archive, the split, the recipes and the cluster share."""

    data: str
    output: str
    train: dict[str, TrainConfig]  # the coarse and the fine recipe
    engine: EngineConfig = field(default_factory=EngineConfig)
    folds: int = 4
    seed: int = 0
    workers_per_trial: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    max_concurrent_folds: int | None = None
    val_cases: int = 0
    max_failures: int = 2
    address: str | None = None
    allow_unfit: bool = ArchiveJob.allow_unfit  # evaluate a fold whose training marked a bundle unfit
    lease_heartbeat_s: float = ArchiveJob.lease_heartbeat_s  # the CV holds its output for all its folds' runs

    def check(self) -> None:
        self.require("folds", self.folds >= 2, "at least 2")
        self.require("lease_heartbeat_s", self.lease_heartbeat_s > 0, "positive")
        self.require("workers_per_trial", self.workers_per_trial >= 1, "at least 1")
        self.require("cpus_per_worker", self.cpus_per_worker > 0, "positive")
        self.require("max_concurrent_folds", self.max_concurrent_folds is None or self.max_concurrent_folds >= 1, "at least 1")
        self.require("val_cases", self.val_cases >= 0, "0 or more")
        self.require("max_failures", self.max_failures >= 0, "0 or more")


def to_dict(obj: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON-ready data."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a settings dataclass (nested ones too) from `to_dict` output.

    Unknown keys are refused: a misspelt setting must not be silently ignored.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise InputError(cls.__name__, f"unknown settings {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
