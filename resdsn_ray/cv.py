"""Scaled k-fold cross-validation (paper Sec. 4.1): folds trained side by side on the cluster,
then each held-out fold segmented in the three modes of Tables 2, 4 and 5.

Layout under OUTPUT (besides the archive run's `masks/`, `metrics/`, `runs/`, shared by all folds):
  splits.json                 the seeded split, written before anything trains, reused verbatim
  cv.json                     the CV record: settings, invocations, each fold's state
  folds/fold<k>/train.csv     manifests of the fold's training and held-out cases
  folds/fold<k>/test.csv
  folds/fold<k>/coarse/       the fold's training runs (`resdsn_ray.training` layout, bundle/)
  folds/fold<k>/fine/
  folds/fold<k>/done.json     written when the fold's three evaluations have finished

Each fold is one Ray task (no CPU of its own) that trains its coarse and fine models (each a
`TorchTrainer` with its own workers) and then runs the archive pipeline over its held-out
cases in the modes coarse-only, fine-only on the whole volume, and C2F. Rows go to the one
Parquet table under OUTPUT/metrics with `fold` and `mode` set; archive runs are named
`<cv_id>-r<invocation>-fold<k>-<mode>`, so `--run <cv_id>` selects the whole CV.

Plain concurrent fold tasks rather than Ray Tune: a fold is a fixed pipeline (two trainings,
then three archive runs), not a trial of a search space; Tune would own only the training part,
and its trial restore and Ray Train V2's own resume would overlap. Concurrency is bounded by
`max_concurrent_folds` (default: as many folds as the cluster has room for: GPUs, or CPUs, over
one fold's workers), and each fold's evaluation uses only the fold's own share of the cluster,
so a fold that evaluates never waits on another fold's training.

Resume: splits.json is reused as written; a fold with done.json is not touched; a training whose
bundle exists is not redone (an unfinished one resumes from its last checkpoint); an archive
run skips the cases already segmented with the same models and settings (`resdsn_ray.runs`).
For the same reason a fold task whose process dies is retried once by Ray; a fold that fails
(bad input, a training that failed past its retries) is reported and the other folds go on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from resdsn_ray import runs, storage
from resdsn_ray.archive import Case
from resdsn_ray.bundle import CONFIG_FILE
from resdsn_ray.config import EngineConfig, to_dict
from resdsn_ray.errors import InputError
from resdsn_ray.training import BUNDLE_DIR, RECIPE, RUN_RECORD, TrainConfig, train, training_cases

if TYPE_CHECKING:
    from resdsn_ray.pipeline import Resources

SPLITS_FILE = "splits.json"
CV_RECORD = "cv.json"
DONE_FILE = "done.json"
EVAL_MODES = ("coarse", "fine", "c2f")  # coarse-only, fine-only on the whole volume, C2F


@dataclass(frozen=True)
class CVJob:
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


def make_splits(case_ids: list[str], folds: int, seed: int) -> list[list[str]]:
    """A seeded random partition into `folds` folds whose sizes differ by at most one.

    The ids are sorted first, so the split depends on the set of cases and the seed only, not
    on the order a listing returns them in. 82 cases in 4 folds give 21/21/20/20 (the paper's).
    """
    ids = sorted(set(case_ids))
    if folds < 2:
        raise InputError("--folds", f"needs at least 2 folds, not {folds}")
    if len(ids) < folds:
        raise InputError("--data", f"{len(ids)} labelled case(s) cannot make {folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]


def fold_dir(output: str, fold: int) -> str:
    return storage.join(output, "folds", f"fold{fold}")


def load_or_make_splits(job: CVJob, cases: list[Case]) -> dict[str, Any]:
    """The split of this CV: read from splits.json when present (verbatim), else made and written."""
    uri = storage.join(job.output, SPLITS_FILE)
    if storage.exists(uri):
        splits = json.loads(storage.read_bytes(uri))
        if splits["folds"] != job.folds or splits["seed"] != job.seed:
            raise InputError(uri, f"holds a split with {splits['folds']} folds and seed {splits['seed']}; "
                                  f"resume with those or use a new --output (asked: {job.folds} folds, seed {job.seed})")
        return splits
    by_id = {c.case_id: c for c in cases}
    parts = make_splits(list(by_id), job.folds, job.seed)
    splits = {
        "data": job.data,
        "folds": job.folds,
        "seed": job.seed,
        "splits": parts,
        "cases": {cid: {"image_uri": storage.absolute(by_id[cid].image_uri), "label_uri": storage.absolute(by_id[cid].label_uri or "")}
                  for cid in sorted(by_id)},
    }
    storage.write_text(uri, json.dumps(splits, indent=2) + "\n")
    return splits


def write_manifests(output: str, splits: dict[str, Any]) -> None:
    """Each fold's train.csv (the other folds) and test.csv (the fold itself)."""
    for fold, test in enumerate(splits["splits"]):
        held = set(test)
        train_ids = [cid for part in splits["splits"] for cid in part if cid not in held]
        for name, ids in (("train.csv", train_ids), ("test.csv", test)):
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["case_id", "image_uri", "label_uri"])
            for cid in ids:
                writer.writerow([cid, splits["cases"][cid]["image_uri"], splits["cases"][cid]["label_uri"]])
            storage.write_text(storage.join(fold_dir(output, fold), name), text.getvalue())


def default_concurrency(job: CVJob, cluster: dict[str, float]) -> int:
    """Folds that fit side by side: the cluster's GPUs (or CPUs) over one fold's workers."""
    if job.max_concurrent_folds:
        return max(1, min(job.folds, job.max_concurrent_folds))
    if job.gpu:
        room = int(cluster.get("GPU", 0.0) // job.workers_per_trial)
    else:
        room = int(cluster.get("CPU", 1.0) // (job.workers_per_trial * job.cpus_per_worker))
    return max(1, min(job.folds, room))


def eval_resources(job: CVJob) -> Resources:
    """The archive pipeline's resources within one fold's share (its training workers' own)."""
    from resdsn_ray.pipeline import Resources, fit_cpus

    share = job.workers_per_trial * job.cpus_per_worker
    actors = job.workers_per_trial if job.gpu else max(1, int(share))
    actor_cpus, task_cpus = fit_cpus(actors, [share])
    return Resources(shape="whole", coarse_actors=actors, gpus_per_actor=1.0 if job.gpu else 0.0,
                     cpus_per_actor=actor_cpus, task_cpus=task_cpus, read_tasks=1)


def recipe(job: CVJob) -> dict[str, Any]:
    """What decides the CV's models and masks: the training recipes and the engine's settings
    (not its device, batch sizes or cadences). A resume must keep them."""
    engine = to_dict(job.engine)
    for name in ("device", "accumulate_on", "channels_last", "mode"):
        engine.pop(name)
    for stage in ("coarse", "fine"):
        engine[stage].pop("batch_size")
    trainings = {stage: {key: to_dict(config)[key] for key in RECIPE} for stage, config in job.train.items()}
    return {"train": trainings, "engine": engine}


def check_resume(record: dict[str, Any], job: CVJob, uri: str) -> None:
    """InputError when the CV under OUTPUT was started with another recipe."""
    old, new = record.get("recipe", {}), recipe(job)
    changed = [f"{part}.{stage}" for part in new for stage in new[part]
               if json.dumps(old.get(part, {}).get(stage), sort_keys=True) != json.dumps(new[part][stage], sort_keys=True)]
    if changed:
        raise InputError(uri, f"holds a cross-validation with other settings ({', '.join(changed)}); "
                              "resume with the same ones or use a new --output")


def trained_bundle(run_output: str) -> str | None:
    """The bundle of a finished training run under `run_output`, else None."""
    record_uri = storage.join(run_output, RUN_RECORD)
    bundle = storage.join(run_output, BUNDLE_DIR)
    if storage.exists(record_uri) and storage.exists(storage.join(bundle, CONFIG_FILE)):
        if json.loads(storage.read_bytes(record_uri)).get("status") == "done":
            return bundle
    return None


def run_fold(job: CVJob, fold: int, run_prefix: str) -> dict[str, Any]:
    """Train fold `fold`'s two models (unless done) and evaluate its held-out cases in 3 modes."""
    from resdsn_ray.pipeline import ArchiveJob, run_archive

    def say(line: str) -> None:
        print(f"[fold {fold}] {line}", flush=True)

    folder = fold_dir(job.output, fold)
    bundles: dict[str, str] = {}
    for stage in ("coarse", "fine"):
        out = storage.join(folder, stage)
        bundle = trained_bundle(out)
        if bundle is None:
            say(f"training {stage} -> {out}")
            result = train(job.train[stage], out, cases_uri=storage.join(folder, "train.csv"), val_cases=job.val_cases,
                           workers=job.workers_per_trial, gpu=job.gpu, cpus_per_worker=job.cpus_per_worker,
                           max_failures=job.max_failures)
            bundle = result.bundle_uri
        else:
            say(f"{stage} already trained: {bundle}")
        bundles[stage] = bundle
    resources = eval_resources(job)
    evaluated: dict[str, Any] = {}
    for mode in EVAL_MODES:
        archive_job = ArchiveJob(
            input=storage.join(folder, "test.csv"), output=job.output, coarse=bundles["coarse"], fine=bundles["fine"],
            engine=replace(job.engine, mode=mode), resources=resources, run_id=f"{run_prefix}-fold{fold}-{mode}",
            fold=fold, progress_s=60.0,
        )
        result = run_archive(archive_job, say=say)
        evaluated[mode] = {"run_id": result.run_id, "counts": result.counts}
    done = {"fold": fold, "bundles": bundles, "runs": evaluated, "finished_at": runs.utc_now().isoformat()}
    storage.write_text(storage.join(folder, DONE_FILE), json.dumps(done, indent=2) + "\n")
    return done


@dataclass
class CVResult:
    cv_id: str
    record: dict[str, Any]
    failed: dict[int, str]  # fold -> reason


def run_cv(job: CVJob, say: Callable[[str], None] = print) -> CVResult:
    """Run (or resume) the cross-validation; folds that fail are reported, the others finish."""
    import ray

    from resdsn_ray.pipeline import aws_env, connect

    job = replace(job, data=storage.absolute(job.data), output=storage.absolute(job.output))
    cases, rejected = training_cases(job.data, None)
    for item in rejected:
        say(f"not in the CV: case {item['case_id']}: {item['reason']}")
    splits = load_or_make_splits(job, cases)
    write_manifests(job.output, splits)
    record_uri = storage.join(job.output, CV_RECORD)
    if storage.exists(record_uri):
        record = json.loads(storage.read_bytes(record_uri))
        check_resume(record, job, record_uri)
    else:
        record = {"cv_id": runs.new_run_id(), "data": job.data, "output": job.output, "folds": job.folds, "seed": job.seed,
                  "created_at": runs.utc_now().isoformat(), "invocations": 0, "recipe": recipe(job)}
    record["invocations"] += 1
    record.update(
        train={stage: to_dict(config) for stage, config in job.train.items()}, engine=to_dict(job.engine),
        workers_per_trial=job.workers_per_trial, gpu=job.gpu, cpus_per_worker=job.cpus_per_worker,
        rejected=rejected, status="running", sizes=[len(part) for part in splits["splits"]],
    )
    run_prefix = f"{record['cv_id']}-r{record['invocations']}"
    storage.write_text(record_uri, json.dumps(record, indent=2) + "\n")

    todo = [k for k in range(job.folds) if not storage.exists(storage.join(fold_dir(job.output, k), DONE_FILE))]
    record["fold_state"] = {str(k): "pending" if k in todo else "done" for k in range(job.folds)}
    say(f"cv {record['cv_id']}: {job.folds} folds of {record['sizes']} cases under {job.output}; "
        f"{job.folds - len(todo)} already done")
    failed: dict[int, str] = {}
    if todo:
        connect(job.address, dashboard=True)  # Ray Train's placement-group cleaner asks the State API
        limit = default_concurrency(job, ray.cluster_resources())
        say(f"running folds {todo}, at most {limit} at a time")
        env = {"env_vars": aws_env()} if aws_env() else None
        task = ray.remote(run_fold).options(num_cpus=0, max_retries=1, runtime_env=env)
        pending = list(todo)
        running: dict[Any, int] = {}
        while pending or running:
            while pending and len(running) < limit:
                fold = pending.pop(0)
                running[task.remote(job, fold, run_prefix)] = fold
                record["fold_state"][str(fold)] = "running"
            storage.write_text(record_uri, json.dumps(record, indent=2) + "\n")
            ready, _ = ray.wait(list(running), num_returns=1)
            fold = running.pop(ready[0])
            try:
                ray.get(ready[0])
                record["fold_state"][str(fold)] = "done"
                say(f"fold {fold} done")
            except Exception as err:  # noqa: BLE001  (one fold's failure must not stop the others)
                cause = getattr(err, "cause", None) or err  # a RayTaskError carries the fold's own error
                failed[fold] = str(cause) if isinstance(cause, InputError) else f"{type(cause).__name__}: {cause}"
                record["fold_state"][str(fold)] = f"failed: {failed[fold]}"
                say(f"fold {fold} FAILED: {failed[fold]}")
    record.update(status="failed" if failed else "finished", ended_at=runs.utc_now().isoformat())
    storage.write_text(record_uri, json.dumps(record, indent=2) + "\n")
    return CVResult(record["cv_id"], record, failed)



# ------------------------------------------------------------------------- command line


def add_cv_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `resdsn cv` and `jobs/cross_validate.py` (plus the engine's window settings)."""
    from resdsn_ray.cli import add_engine_flags
    from resdsn_ray.training import PRESETS

    parser.add_argument("--data", required=True, help="labelled archive URI (MSD layout, folder or manifest)")
    parser.add_argument("--output", required=True, help="CV output prefix (local folder or s3://)")
    parser.add_argument("--folds", type=int, default=4, help="k (paper: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the trainings")
    parser.add_argument("--preset", choices=PRESETS, default="paper", help="training recipe of both stages")
    parser.add_argument("--iterations", type=int, help="training iterations (overrides the preset)")
    parser.add_argument("--width", type=int, help="network width (overrides the preset)")
    parser.add_argument("--patch", type=int, help="patch size P (overrides the preset)")
    parser.add_argument("--train-batch-size", type=int, help="global training mini-batch (overrides the preset)")
    parser.add_argument("--val-cases", type=int, default=0, help="training cases of each fold held out for validation")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers of each fold's trainings")
    parser.add_argument("--gpu", action="store_true", help="one GPU per training worker and per evaluation actor")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per training worker")
    parser.add_argument("--max-concurrent-folds", type=int, help="default: as many as the cluster has room for")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures each training survives")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS / the submitting job, else a local Ray)")
    add_engine_flags(parser, bundles=False)
    parser.set_defaults(n_coarse=None, n_fine=None)  # None: the preset's (demo: the demo job's lighter n)


def job_from_args(args: argparse.Namespace) -> CVJob:
    from resdsn_ray.cli import engine_config
    from resdsn_ray.pipeline import DEMO_N_COARSE, DEMO_N_FINE
    from resdsn_ray.training import preset_config

    if args.n_coarse is None:  # the demo recipe evaluates with the demo job's lighter windows
        args.n_coarse = DEMO_N_COARSE if args.preset == "demo" else EngineConfig().coarse.n
    if args.n_fine is None:
        args.n_fine = DEMO_N_FINE if args.preset == "demo" else EngineConfig().fine.n
    recipes = {
        stage: preset_config(args.preset, stage, iterations=args.iterations, width=args.width, patch=args.patch,
                             batch_size=args.train_batch_size, seed=args.seed)
        for stage in ("coarse", "fine")
    }
    return CVJob(
        data=args.data, output=args.output, train=recipes, engine=engine_config(args), folds=args.folds, seed=args.seed,
        workers_per_trial=args.workers_per_trial, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
        max_concurrent_folds=args.max_concurrent_folds, val_cases=args.val_cases, max_failures=args.max_failures,
        address=args.address,
    )


def run_cv_command(args: argparse.Namespace) -> int:
    """`resdsn cv`: 0 when every fold finished, 1 when some failed (rerun resumes them)."""
    from resdsn_ray.query import summary

    result = run_cv(job_from_args(args), say=lambda line: print(line, flush=True))
    output = storage.absolute(args.output)
    print(f"\nsplits: {storage.join(output, SPLITS_FILE)}\nrecord: {storage.join(output, CV_RECORD)}\n"
          f"rows:   {runs.metrics_uri(output)} (run ids {result.cv_id}-*)\n"
          f"more:   resdsn metrics summary {output} --run {result.cv_id} --by fold; resdsn report {output}\n", flush=True)
    if storage.exists(runs.metrics_uri(output)):
        print(summary(output, run=result.cv_id).text(), flush=True)
    for fold, reason in sorted(result.failed.items()):
        print(f"error: fold {fold} failed: {reason}", file=sys.stderr)
    if result.failed:
        print("run the same command again to resume the failed folds", file=sys.stderr)
    return 1 if result.failed else 0
