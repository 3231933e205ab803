"""The `resdsn` command: one sub-command per user task (see README). The top floor: nothing in
the package imports it; it imports the Ray layers only inside the commands that need them, so
`resdsn segment` runs on a box with torch but no Ray.

Every flag takes its default and choices from the settings classes in `config` (`flags`);
a bad value is refused by name with exit code 2, as is any bad input (`InputError`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from resdsn_ray import storage
from resdsn_ray.config import (
    DEFAULT_FAMILY,
    DEMO_ENGINE,
    FAMILY_NAMES,
    FAST_ENGINE,
    STAGES,
    STATUS_ERROR,
    ArchiveJob,
    CVJob,
    EngineConfig,
    OutputConfig,
    Resources,
    TrainConfig,
    choices,
)
from resdsn_ray.errors import InputError
from resdsn_ray.flags import option, settings
from resdsn_ray.mask_stats import STAT_KEYS
from resdsn_ray.query import FORMATS, SUMMARY_BY

DEMO_DIR = "demo-output"
DEMO_CASES = 6


# ------------------------------------------------------------------------------ engine flags


def add_engine_flags(parser: argparse.ArgumentParser, windows_default: str | None = None) -> None:
    """Engine settings of `segment`, `archive` and `cv`.

    `windows_default` names who decides the window counts when `--n-coarse` / `--n-fine` are not
    given (the demo or a preset); None: the paper's, as flag defaults.
    """
    deferred = {"default": None} if windows_default else {}
    paper = EngineConfig()
    option(parser, "--n-coarse", EngineConfig, "coarse.n", **deferred,
           help=f"coarse windows per axis: floor(L/P) + n (paper: {paper.coarse.n}{windows_default or ''})")
    option(parser, "--n-fine", EngineConfig, "fine.n", **deferred,
           help=f"fine windows per axis: floor(L/P) + n (paper: {paper.fine.n}{windows_default or ''})")
    option(parser, "--margin", EngineConfig, "margin", help="crop margin around the coarse mask (voxels)")
    option(parser, "--on-no-organ", EngineConfig, "on_no_organ",
           help="C2F when the coarse stage finds nothing: empty (the paper: status no_organ) or fine (the fine model "
                "on the whole volume; the row's fine_fallback says so)")
    option(parser, "--fusion", EngineConfig, "coarse.fusion", "fine.fusion", help="how overlapping windows are fused")
    option(parser, "--post-ratio", EngineConfig, "post_ratio", help="drop components below this share of the foreground")
    option(parser, "--batch-size", EngineConfig, "coarse.batch_size", "fine.batch_size", help="windows per forward pass")
    option(parser, "--precision", EngineConfig, "precision",
           help="arithmetic of the forward passes; auto: bf16 where the device has bf16 units (CUDA >= 8.0, "
                "CPUs with AVX-512 BF16 / AMX), else fp32")
    option(parser, "--channels-last", EngineConfig, "channels_last",
           help="NDHWC memory layout for the convolutions; auto: where it is faster")
    option(parser, "--device", EngineConfig, "device", help="auto, cpu, cuda, cuda:1, ...")
    option(parser, "--accumulate-on", EngineConfig, "accumulate_on", help="where stitched scores live")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """What is written per case besides the NIfTI mask (`segment` and `archive`): `OutputConfig`."""
    option(parser, "--output-format", OutputConfig, "format",
           help="nifti: the NIfTI mask; dicom-seg / both: a DICOM SEG too, for DICOM inputs (the NIfTI mask is always "
                "written: the job's record)")
    option(parser, "--save-probabilities", OutputConfig, "probabilities",
           help="the foreground probability map on the input grid: uint8 (scale 1/255) or float32 NIfTI")
    option(parser, "--preview", OutputConfig, "preview",
           help="a PNG of three orthogonal slices through the mask's centre, the mask over the CT")


def add_fast_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true",
                        help=f"a first look: windows n = {FAST_ENGINE.coarse.n} (coarse) / {FAST_ENGINE.fine.n} (fine) "
                             "unless --n-coarse / --n-fine are given; its DSC cost: README")


def engine_settings(args: argparse.Namespace, base: EngineConfig) -> EngineConfig:
    """The engine the flags ask for: `base` (or `--fast`'s) with every given engine flag put in."""
    return settings(args, FAST_ENGINE if args.fast else base)


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines; results and errors only")


def add_bundle_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coarse", help="coarse model bundle URI (required but for the demo)")
    parser.add_argument("--fine", help="fine model bundle URI (required but for the demo)")
    option(parser, "--demo-models", ArchiveJob, "demo_models",
           help="use the shipped phantom-trained demo bundles where --coarse / --fine are not given (demos and tests "
                "only: they are not trained on CT); every row says so")
    option(parser, "--mode", EngineConfig, "mode", help="c2f, or one stage alone (the paper's ablations)")
    option(parser, "--allow-unfit", ArchiveJob, "allow_unfit",
           help="use bundles their training marked unfit (validation DSC 0 or no foreground predicted) anyway")


def bundle_uri(given: str | None, stage: str, demo_models: bool) -> str:
    """The bundle to use for a stage: the given URI, else (when allowed) the shipped demo bundle.

    A real archive needs real models: the demo bundles are trained on phantoms, and would
    segment real CT into confident nonsense with every row saying `ok`.
    """
    from resdsn_ray.bundle import CONFIG_FILE, demo_bundle_uri

    if given:
        return given
    if not demo_models:
        raise InputError(f"--{stage}", "required: the shipped demo bundles are phantom-trained, for the demo and "
                                       "tests only (--demo-models uses them anyway and marks every row)")
    demo = demo_bundle_uri(stage)
    if not (Path(demo) / CONFIG_FILE).exists():
        raise InputError(f"--{stage}", "no bundle given and no demo bundle is shipped in this install")
    return demo


# ---------------------------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from resdsn_ray.synthetic import write_archive

    shape = tuple(args.shape) if args.shape else None
    family = args.family or DEFAULT_FAMILY
    cases = write_archive(args.out, cases=args.cases, seed=args.seed, shape=shape, family=family)
    print(f"wrote {len(cases)} synthetic {family} cases (MSD layout) to {args.out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from resdsn_ray.bundle import load_bundle
    from resdsn_ray.case_files import algorithm_version, sibling_uris, write_case_files
    from resdsn_ray.engine import CoarseToFine
    from resdsn_ray.metrics import case_metrics
    from resdsn_ray.progress import WindowProgress
    from resdsn_ray.runs import asked_files
    from resdsn_ray.volumes import check_same_grid, read_volume

    config = engine_settings(args, EngineConfig())
    outputs = settings(args, OutputConfig())
    coarse = load_bundle(bundle_uri(args.coarse, "coarse", args.demo_models), allow_unfit=args.allow_unfit) \
        if config.mode != "fine" else None
    fine = load_bundle(bundle_uri(args.fine, "fine", args.demo_models), allow_unfit=args.allow_unfit) \
        if config.mode != "coarse" else None
    start = time.perf_counter()
    volume = read_volume(args.image)
    t_read = time.perf_counter() - start
    reference = read_volume(args.label) if args.label else None
    if reference is not None:
        check_same_grid(reference, volume.shape, volume.affine)  # before any work: a bad label is refused up front
    result = CoarseToFine(coarse, fine, config).segment(volume, probabilities=outputs.probabilities != "none",
                                                        progress=None if args.quiet else WindowProgress())
    start = time.perf_counter()
    uris = sibling_uris(args.out, asked_files(outputs, volume.meta.get("format") == "dicom"))
    files = write_case_files(uris, result.mask, volume, outputs, result.probabilities,
                             version=algorithm_version(coarse.id if coarse else None, fine.id if fine else None),
                             title=args.image)
    t_write = time.perf_counter() - start
    report = {
        "image": args.image,
        "mask": args.out,
        **{column: uri for column, uri in files.items() if column.endswith("_uri") and column != "mask_uri"},
        "note": files["note"],
        "status": result.status,
        "demo_models": bool(args.demo_models and not (args.coarse and args.fine)),
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "coarse_bbox": result.box.to_list() if result.box else None,
        "coarse_windows": result.coarse_windows,
        "fine_windows": result.fine_windows,
        "fine_fallback": result.fine_fallback,
        "t_read_s": t_read,
        **{f"t_{stage}_s": seconds for stage, seconds in result.timings.items()},
        "t_write_s": t_write,
        **{key: files[key] for key in STAT_KEYS},
    }
    if reference is not None:
        report.update(case_metrics(result.mask > 0, reference.array > 0, volume.spacing))
    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else value
        print(f"{key:>16}: {shown}")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from resdsn_ray import runs
    from resdsn_ray.pipeline import run_archive, this_runs_cases
    from resdsn_ray.query import latest, summarise

    demo = args.input is None
    engine = engine_settings(args, DEMO_ENGINE if demo else EngineConfig())
    demo_models = demo or args.demo_models
    coarse = bundle_uri(args.coarse, "coarse", demo_models) if engine.mode != "fine" else None
    fine = bundle_uri(args.fine, "fine", demo_models) if engine.mode != "coarse" else None
    used_demo = (engine.mode != "fine" and not args.coarse) or (engine.mode != "coarse" and not args.fine)
    source, output = args.input, args.output
    say = (lambda line: None) if args.quiet else lambda line: print(line, flush=True)
    if demo:
        source, output = _demo_archive(args.demo_dir, args.demo_cases, say), output or storage.join(args.demo_dir, "run")
        say(f"demo: windows n = {engine.coarse.n} (coarse) / {engine.fine.n} (fine); the paper's are "
            f"{EngineConfig().coarse.n} / {EngineConfig().fine.n}")
    if output is None:
        raise InputError("--output", "required with --input")
    job = settings(args, ArchiveJob(input=source, output=output, coarse=coarse, fine=fine, engine=engine,
                                    resources=settings(args, Resources())))
    job = replace(job, demo_models=used_demo, allow_prefixes=tuple(args.allow_uri_prefix or ()) or None,
                  outputs=settings(args, OutputConfig()))
    result = run_archive(job, say=say)
    current = latest(this_runs_cases(runs.read_rows(output), result.run_id, engine.mode))
    print(f"\nmasks: {runs.masks_uri(output, engine.mode)}\nrows:  {runs.metrics_uri(output, result.run_id)}\n"
          f"run:   {runs.run_record_uri(output, result.run_id)}\n")
    print(summarise(runs.row_table(current), output).text(), flush=True)
    for row in current:
        if row["status"] == STATUS_ERROR:
            print(f"error {row['case_id']!r}: {row['error']}", flush=True)
    return 0


def _demo_archive(folder: str, cases: int, say: Callable[[str], None]) -> str:
    """The demo's synthetic archive (written once, reused by later demo runs)."""
    from resdsn_ray.synthetic import write_archive

    archive = storage.join(folder, "archive")
    if not storage.exists(storage.join(archive, "dataset.json")):
        say(f"writing a synthetic archive of {cases} cases to {archive}")
        write_archive(archive, cases=cases, seed=0)
    return archive


def _recipe(args: argparse.Namespace, stage: str) -> TrainConfig:
    from resdsn_ray.recipes import JHMI_ITERATIONS, preset_config

    given = {dest: getattr(args, dest) for dest in _RECIPE_FLAGS if getattr(args, dest, None) is not None}
    if getattr(args, "jhmi", False):
        given.setdefault("iterations", JHMI_ITERATIONS)
    try:
        return preset_config(args.preset, stage, **{_RECIPE_FLAGS[d]: v for d, v in given.items()})
    except InputError as err:  # name the flag that set the refused field
        flags = [_flag(args, d) for d in given if _RECIPE_FLAGS[d] == err.source]
        raise InputError(flags[0] if flags else err.source, err.reason) from None


def _flag(args: argparse.Namespace, dest: str) -> str:
    """The flag of a recipe dest (`train` spells the training batch `--batch-size`, `cv` leaves that to the engine)."""
    return "--batch-size" if dest == "train_batch_size" and args.command == "train" else f"--{dest.replace('_', '-')}"


# Flag dest -> the recipe field it overrides (None: the preset's value).
_RECIPE_FLAGS = {name: name for name in ("iterations", "optimizer", "lr", "seed", "width", "patch", "checkpoint_every",
                                         "keep_checkpoints", "validate_every", "min_cases", "foreground_share", "loss")} | {
    "train_batch_size": "batch_size", "model": "name"}


def cmd_train(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from resdsn_ray.training import train

    config = _recipe(args, args.stage)
    val_cases = args.val_cases if args.val_cases is not None else (2 if config.preset == "demo" else 0)
    try:
        result = train(config, args.output, data=args.data, cases_uri=args.cases, val_data=args.val_data,
                       val_cases=val_cases, workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                       max_failures=args.max_failures, quiet=args.quiet)
    except TrainingFailedError as err:
        print(f"error: training failed: {err}\nrun the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 1
    if result.unfit:
        print(f"error: the model is unfit ({result.unfit}); its bundle {result.bundle_uri} is marked so and refused "
              "by segment, archive and cv unless --allow-unfit", file=sys.stderr)
        return 1
    return 0


def cv_job(args: argparse.Namespace) -> CVJob:
    """The cross-validation the `cv` flags ask for (the demo preset evaluates with the demo's windows)."""
    recipes = {stage: _recipe(args, stage) for stage in STAGES}
    engine = settings(args, DEMO_ENGINE if args.preset == "demo" else EngineConfig())
    return settings(args, CVJob(data=args.data, output=args.output, train=recipes, engine=engine))


def cmd_cv(args: argparse.Namespace) -> int:
    from resdsn_ray import runs
    from resdsn_ray.cv import CV_RECORD, SPLITS_FILE, run_cv
    from resdsn_ray.query import summary

    result = run_cv(cv_job(args), say=lambda line: print(line, flush=True))
    output = storage.absolute(args.output)
    print(f"\nsplits: {storage.join(output, SPLITS_FILE)}\nrecord: {storage.join(output, CV_RECORD)}\n"
          f"rows:   {runs.metrics_uri(output)} (run ids {result.cv_id}-*)\n"
          f"more:   resdsn metrics summary {output} --run {result.cv_id} --by fold; resdsn report {output}\n", flush=True)
    if storage.exists(runs.metrics_uri(output)):
        print(summary(output, run=result.cv_id).text(), flush=True)
    for fold, stages in sorted(result.record.get("fit", {}).items(), key=lambda item: int(item[0])):
        shown = ", ".join(f"{stage} {'fit' if state['fit'] else 'UNFIT: ' + state['unfit']}" for stage, state in stages.items())
        print(f"fold {fold} models: {shown or 'not trained'}", flush=True)
    for fold, reason in sorted(result.failed.items()):
        print(f"error: fold {fold} failed: {reason}", file=sys.stderr)
    if result.failed:
        print("run the same command again to resume the failed folds", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_metrics_summary(args: argparse.Namespace) -> int:
    from resdsn_ray.query import summary

    print(summary(args.output, run=args.run_id, by=args.by).text(), end="")
    return 0


def cmd_metrics_query(args: argparse.Namespace) -> int:
    from resdsn_ray.query import query

    text = query(args.output, args.sql, fmt=args.format, out=args.out)
    print(text if text is not None else f"wrote {args.out}\n", end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from resdsn_ray.report import build_report

    print(f"wrote {build_report(args.output, html_uri=args.html, run=args.run_id)}")
    return 0


# ----------------------------------------------------------------------------------- parsers


def add_archive_flags(parser: argparse.ArgumentParser) -> None:
    """The archive job's flags besides the engine's: input, output, the cluster share, the run."""
    parser.add_argument("--input", help="archive prefix or manifest (CSV/Parquet/JSONL); none: build the demo archive")
    parser.add_argument("--output", help=f"output prefix (default with no --input: {DEMO_DIR}/run)")
    option(parser, "--overwrite", ArchiveJob, "overwrite", help="recompute cases already done under --output")
    option(parser, "--shape", Resources, "shape",
           help="whole: one actor pool runs both stages of a case; split: coarse and fine actor pools")
    option(parser, "--coarse-actors", Resources, "coarse_actors", type=int,
           help="largest coarse pool (the whole pool with --shape whole); default: GPUs / --gpus-per-actor per pool, "
                "or without GPUs one per CPU (up to 8)")
    option(parser, "--fine-actors", Resources, "fine_actors", type=int,
           help="largest fine pool (--shape split); default as --coarse-actors")
    option(parser, "--fixed-pools", Resources, "fixed_pools",
           help="wait for every actor up front (default: pools start with the actors the nodes up now hold, at least one, and grow as nodes join)")
    option(parser, "--gpus-per-actor", Resources, "gpus_per_actor", type=float,
           help="GPUs per actor; fractions share a GPU (default: 1 where the cluster has GPUs, else 0)")
    option(parser, "--cpus-per-actor", Resources, "cpus_per_actor", type=float,
           help="CPUs reserved per actor (default: 1, less where the nodes have few CPUs)")
    option(parser, "--task-cpus", Resources, "task_cpus", type=float,
           help="CPUs reserved per read or finish task (default: 1, less where the nodes have few CPUs)")
    option(parser, "--read-tasks", Resources, "read_tasks", help="concurrent read/preprocess and write/metrics tasks")
    option(parser, "--cases-per-block", Resources, "cases_per_block", type=int,
           help="cases per Ray Data block (one task per stage; a block whose process dies is streamed again one case "
                "per block); more cuts the work per case; default: small cases share blocks of ~2 MB stored, a real CT "
                "stays alone, at most 2000 blocks")
    option(parser, "--actor-timeout", Resources, "actor_start_timeout_s",
           help="seconds to wait for the first model actor before failing (e.g. no GPU node)")
    option(parser, "--max-case-gb", Resources, "max_case_gb", type=float,
           help="memory one case may need to segment, estimated from its header (larger cases become error rows); "
                "reserved per task and actor (default: an eighth of the smallest node's memory)")
    option(parser, "--case-timeout-s", Resources, "case_timeout_s", type=float,
           help="seconds a case may take from the start of its read to its written mask; a case still running "
                "(a stalled S3 stream, a decode that never ends) becomes an error row")
    option(parser, "--address", ArchiveJob, "address", type=str,
           help="Ray cluster address (default: RAY_ADDRESS / the submitting job, else a local Ray)")
    parser.add_argument("--allow-uri-prefix", action="append", metavar="PREFIX",
                        help="where a manifest's URIs may point (repeatable; default: the manifest's own folder or bucket)")
    option(parser, "--run-id", ArchiveJob, "run_id", type=str, help="run id (default: UTC time + random suffix)")
    option(parser, "--fold", ArchiveJob, "fold", type=int, help="cross-validation fold recorded in every row")
    option(parser, "--flush-rows", ArchiveJob, "flush_rows", help="write a Parquet part every N rows ...")
    option(parser, "--flush-seconds", ArchiveJob, "flush_s", help="... or every S seconds, whichever first")
    option(parser, "--progress-seconds", ArchiveJob, "progress_s", help="progress line interval")
    option(parser, "--lease-heartbeat-seconds", ArchiveJob, "lease_heartbeat_s",
           help="the run renews its hold on --output this often; a crashed run's hold lapses after 4 of them")
    parser.add_argument("--demo-dir", default=DEMO_DIR, help="folder of the demo archive and outputs (no --input)")
    parser.add_argument("--demo-cases", type=int, default=DEMO_CASES, help="cases in the demo archive")
    add_fast_flag(parser)
    add_quiet_flag(parser)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """Training recipe flags; each overrides the preset's value (paper: Sec. 4.2)."""
    paper = TrainConfig()
    parser.add_argument("--preset", choices=choices(TrainConfig, "preset"), default=paper.preset,
                        help="paper: P=64, width 32, 80,000 iterations; demo: minutes on a CPU")
    parser.add_argument("--iterations", type=int, help=f"global mini-batches (paper: {paper.iterations:,})")
    parser.add_argument("--width", type=int, help=f"channels of the first layer (paper: {paper.model.width})")
    parser.add_argument("--patch", type=int, help=f"patch size P, a multiple of 8 (paper: {paper.model.patch})")
    parser.add_argument("--foreground-share", type=float,
                        help=f"coarse: share of patches centred on an organ voxel, the rest uniform (paper: "
                             f"{paper.foreground_share:g}; demo: 0.5)")
    parser.add_argument("--loss", choices=choices(TrainConfig, "loss"),
                        help=f"{paper.loss}: Eq. 3's cross-entropy (paper); dice_ce: soft Dice + CE (small organs)")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `resdsn train` and `jobs/train.py`; the cluster share defaults are `training.train`'s."""
    from resdsn_ray.recipes import JHMI_ITERATIONS
    from resdsn_ray.training import train

    paper = TrainConfig()
    share = inspect.signature(train).parameters
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--data", help="training archive URI (MSD layout, folder or manifest)")
    parser.add_argument("--cases", help="manifest (CSV/Parquet/JSONL: case_id,image_uri,label_uri) of the training "
                                        "cases; overrides --data's listing")
    parser.add_argument("--output", required=True, help="run folder or s3:// URI: checkpoints, run.json, bundle/")
    add_recipe_flags(parser)
    parser.add_argument("--jhmi", action="store_true", help=f"JHMI protocol: {JHMI_ITERATIONS:,} iterations")
    parser.add_argument("--workers", type=int, default=share["workers"].default, help="DDP replicas (Ray Train workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=share["cpus_per_worker"].default,
                        help="CPUs reserved per worker (fractions allowed)")
    parser.add_argument("--seed", type=int, help=f"seed of the sampling and initialisation (default {paper.seed})")
    parser.add_argument("--batch-size", dest="train_batch_size", type=int,
                        help=f"global mini-batch, split over workers (paper: {paper.batch_size})")
    parser.add_argument("--optimizer", choices=choices(TrainConfig, "optimizer"), help=f"paper: {paper.optimizer}; demo: adam")
    parser.add_argument("--lr", type=float, help=f"base learning rate (paper: {paper.lr})")
    parser.add_argument("--model", choices=choices(type(paper.model), "name"), help="network (Table 1)")
    parser.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    parser.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    parser.add_argument("--validate-every", type=int, help="iterations between validations")
    parser.add_argument("--val-cases", type=int, help="cases held out of the training set for validation (demo: 2, paper: 0)")
    parser.add_argument("--val-data", help="validation archive or manifest instead of held-out cases")
    parser.add_argument("--min-cases", type=int, help="refuse to train with fewer readable cases")
    parser.add_argument("--max-failures", type=int, default=share["max_failures"].default,
                        help="worker failures survived by restarting from the last checkpoint")
    add_quiet_flag(parser)


def add_cv_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `resdsn cv` and `jobs/cross_validate.py` (plus the engine's window settings)."""
    parser.add_argument("--data", required=True, help="labelled archive URI (MSD layout, folder or manifest)")
    parser.add_argument("--output", required=True, help="CV output prefix (local folder or s3://)")
    option(parser, "--folds", CVJob, "folds", help="k (paper: 4)")
    option(parser, "--seed", CVJob, "seed", help="seed of the split and of the trainings")
    add_recipe_flags(parser)
    parser.add_argument("--train-batch-size", type=int,
                        help="global training mini-batch (overrides the preset)")
    option(parser, "--val-cases", CVJob, "val_cases", help="training cases of each fold held out for validation")
    option(parser, "--workers-per-trial", CVJob, "workers_per_trial", help="Ray Train workers of each fold's trainings")
    option(parser, "--gpu", CVJob, "gpu", help="one GPU per training worker and per evaluation actor")
    option(parser, "--cpus-per-worker", CVJob, "cpus_per_worker", help="CPUs reserved per training worker")
    option(parser, "--max-concurrent-folds", CVJob, "max_concurrent_folds", type=int,
           help="default: as many as the cluster has room for")
    option(parser, "--max-failures", CVJob, "max_failures", help="worker failures each training survives")
    option(parser, "--allow-unfit", CVJob, "allow_unfit",
           help="evaluate folds whose training marked a bundle unfit (validation DSC 0) instead of failing them")
    option(parser, "--lease-heartbeat-seconds", CVJob, "lease_heartbeat_s",
           help="the CV renews its hold on --output this often; a crashed CV's hold lapses after 4 of them")
    option(parser, "--address", CVJob, "address", type=str,
           help="Ray cluster address (default: RAY_ADDRESS / the submitting job, else a local Ray)")
    add_engine_flags(parser, windows_default="; --preset demo: the demo's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resdsn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"resdsn_ray {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic CT archive (MSD layout)")
    synth.add_argument("out", help="output folder or URI")
    synth.add_argument("--cases", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--family", choices=FAMILY_NAMES,
                       help=f"demo: quick 96x96x64 phantoms; hard: 192x192x80 at 0.8x0.8x2 mm, organ <= 0.5 %% of "
                            f"the voxels, LPS affines (closer to a real archive); default {DEFAULT_FAMILY}")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="grid (default: the family's)")
    synth.set_defaults(run=cmd_synth)

    segment = commands.add_parser("segment", help="segment one case without Ray")
    segment.add_argument("image", help="NIfTI file or DICOM series folder (path or URI)")
    segment.add_argument("--out", required=True, help="output mask URI (.nii.gz)")
    segment.add_argument("--label", help="reference mask: print metrics")
    segment.add_argument("--json", action="store_true", help="print the case's row as one JSON object")
    add_bundle_flags(segment)
    add_engine_flags(segment, windows_default="; fewer with --fast")
    add_fast_flag(segment)
    add_quiet_flag(segment)
    add_output_flags(segment)
    segment.set_defaults(run=cmd_segment)

    archive = commands.add_parser("archive", help="the archive job: segment a whole archive with Ray Data; "
                                                  "no --input: the demo", description=ARCHIVE_HELP)
    add_bundle_flags(archive)
    add_engine_flags(archive, windows_default="; the demo's with no --input; fewer with --fast")
    add_archive_flags(archive)
    add_output_flags(archive)
    archive.set_defaults(run=cmd_archive)

    train = commands.add_parser("train", help="train a coarse or fine ResDSN with Ray Train (DDP)")
    add_train_flags(train)
    train.set_defaults(run=cmd_train)

    cv = commands.add_parser("cv", help="k-fold cross-validation: train and evaluate every fold on the cluster")
    add_cv_flags(cv)
    cv.set_defaults(run=cmd_cv)

    metrics = commands.add_parser("metrics", help="summaries and SQL over an output's metrics rows")
    metrics_commands = metrics.add_subparsers(dest="metrics_command", required=True)
    summary = metrics_commands.add_parser("summary", help="per-method DSC, HD95, NSD and time per case (paper Tables 2, 5)")
    summary.add_argument("output", metavar="OUTPUT_URI")
    summary.add_argument("--run", dest="run_id", help="only runs whose id is or starts with this (a CV id: all its folds)")
    summary.add_argument("--by", choices=SUMMARY_BY, default=SUMMARY_BY[0], help="one line per mode, or per fold and mode")
    summary.set_defaults(run=cmd_metrics_summary)
    sql = metrics_commands.add_parser("query", help="DuckDB SQL over the rows: tables `metrics` (every attempt), `latest`")
    sql.add_argument("output", metavar="OUTPUT_URI")
    sql.add_argument("sql", metavar="SQL")
    sql.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    sql.add_argument("--out", help="write the result to this file or URI instead of stdout (parquet needs it)")
    sql.set_defaults(run=cmd_metrics_query)

    report = commands.add_parser("report", help="static HTML report: summaries, DSC plots, QA overlays, cases, errors")
    report.add_argument("output", metavar="OUTPUT_URI")
    report.add_argument("--html", help="report file (default: OUTPUT_URI/report/index.html); its images go beside it")
    report.add_argument("--run", dest="run_id", help="only runs whose id is or starts with this")
    report.set_defaults(run=cmd_report)
    return parser


def _version() -> str:
    from resdsn_ray.provenance import provenance

    record = provenance()
    return f"{record['resdsn_ray']}" + (f" ({record['git_commit']})" if record["git_commit"] else "")


ARCHIVE_HELP = """Coarse-to-fine segmentation of a whole archive as one Ray Data stream (resdsn_ray.pipeline).
With no --input: writes a small synthetic archive under ./demo-output, starts a local Ray, segments it with
the shipped demo bundles and prints the summary."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; any failure is one line on stderr (exit 2: bad input, 1: failed, 130: stopped)."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # what `ray job stop` sends: end as Ctrl-C does, records written
    try:
        return args.run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: stopped; what finished is written, the same command resumes the rest", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one clear line; the run record keeps the reason too)
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
