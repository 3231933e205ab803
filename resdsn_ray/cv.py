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

A fold whose training marks a bundle unfit (a collapsed model: `training.unfit_reason`) fails
with that reason instead of being evaluated, unless `allow_unfit`; cv.json keeps each fold's
fitness per stage (`fit`) whatever happened, and the report shows it.

Resume: splits.json is reused as written; a fold with done.json is not touched; a training whose
bundle exists is not redone (an unfinished one resumes from its last checkpoint); an archive
run skips the cases already segmented with the same models and settings (`resdsn_ray.runs`).
For the same reason a fold task whose process dies is retried once by Ray; a fold that fails
(bad input, a training that failed past its retries) is reported and the other folds go on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from resdsn_ray import lease, runs, storage
from resdsn_ray.archive import Case
from resdsn_ray.bundle import CONFIG_FILE, read_unfit, refuse_unfit
from resdsn_ray.config import STAGES, ArchiveJob, CVJob, Resources, mask_settings, recipe, to_dict
from resdsn_ray.errors import InputError
from resdsn_ray.provenance import provenance, utc_iso
from resdsn_ray.training import BUNDLE_DIR, RUN_RECORD, train, training_cases

SPLITS_FILE = "splits.json"
CV_RECORD = "cv.json"
DONE_FILE = "done.json"
EVAL_MODES = ("coarse", "fine", "c2f")  # coarse-only, fine-only on the whole volume, C2F


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
        splits = storage.read_json(uri)
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
    storage.write_json(uri, splits)
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
    from resdsn_ray.cluster import fit_cpus

    share = job.workers_per_trial * job.cpus_per_worker
    actors = job.workers_per_trial if job.gpu else max(1, int(share))
    actor_cpus, task_cpus = fit_cpus(actors, [share])
    return Resources(shape="whole", coarse_actors=actors, gpus_per_actor=1.0 if job.gpu else 0.0,
                     cpus_per_actor=actor_cpus, task_cpus=task_cpus, read_tasks=1)


def cv_recipe(job: CVJob) -> dict[str, Any]:
    """What decides the CV's models and masks: each stage's training recipe and what decides a
    mask (`config.mask_settings`; the mode varies by evaluation). A resume must keep them."""
    engine = mask_settings(job.engine)
    engine.pop("mode")
    return {"train": {stage: recipe(config) for stage, config in job.train.items()}, "engine": engine}


def trained_bundle(run_output: str) -> str | None:
    """The bundle of a finished training run under `run_output`, else None."""
    record_uri = storage.join(run_output, RUN_RECORD)
    bundle = storage.join(run_output, BUNDLE_DIR)
    if storage.exists(record_uri) and storage.exists(storage.join(bundle, CONFIG_FILE)):
        if storage.read_json(record_uri).get("status") == "done":
            return bundle
    return None


def run_fold(job: CVJob, fold: int, run_prefix: str) -> dict[str, Any]:
    """Train fold `fold`'s two models (unless done) and evaluate its held-out cases in 3 modes."""
    from resdsn_ray.pipeline import run_archive

    def say(line: str) -> None:
        print(f"[fold {fold}] {line}", flush=True)

    folder = fold_dir(job.output, fold)
    bundles: dict[str, str] = {}
    for stage in STAGES:
        out = storage.join(folder, stage)
        bundle = trained_bundle(out)
        if bundle is None:
            say(f"training {stage} -> {out}")
            result = train(job.train[stage], out, data=job.data, cases_uri=storage.join(folder, "train.csv"),
                           val_cases=job.val_cases,
                           workers=job.workers_per_trial, gpu=job.gpu, cpus_per_worker=job.cpus_per_worker,
                           max_failures=job.max_failures)
            bundle = result.bundle_uri
        else:
            say(f"{stage} already trained: {bundle}")
        bundles[stage] = bundle
    if not job.allow_unfit:
        for stage, bundle in bundles.items():
            refuse_unfit(bundle, read_unfit(bundle))
    resources = eval_resources(job)
    evaluated: dict[str, Any] = {}
    for mode in EVAL_MODES:
        archive_job = ArchiveJob(
            input=storage.join(folder, "test.csv"), output=job.output, coarse=bundles["coarse"], fine=bundles["fine"],
            engine=replace(job.engine, mode=mode), resources=resources,
            run_id=_fresh_run_id(job.output, f"{run_prefix}-fold{fold}-{mode}"), fold=fold, progress_s=60.0,
            allow_prefixes=(job.data,), hold_output=False, allow_unfit=job.allow_unfit,
        )
        result = run_archive(archive_job, say=say)
        evaluated[mode] = {"run_id": result.run_id, "counts": result.counts}
    done = {"fold": fold, "bundles": bundles, "runs": evaluated, "finished_at": utc_iso()}
    storage.write_json(storage.join(folder, DONE_FILE), done)
    return done


def fold_fitness(output: str, fold: int) -> dict[str, Any]:
    """Each trained stage of a fold: {"fit": bool} plus "unfit": why; stages not trained are left out."""
    fitness: dict[str, Any] = {}
    for stage in STAGES:
        bundle = trained_bundle(storage.join(fold_dir(output, fold), stage))
        if bundle is not None:
            reason = read_unfit(bundle)
            fitness[stage] = {"fit": reason is None, **({"unfit": reason} if reason else {})}
    return fitness


def _fresh_run_id(output: str, name: str) -> str:
    """`name`, or `name-t<k>` when a fold task retried by Ray already ran under it (run ids are never reused)."""
    for run_id in (name, *(f"{name}-t{k}" for k in range(2, 100))):
        if not storage.exists(runs.run_record_uri(output, run_id)):
            return run_id
    raise InputError(name, "ran 100 times already")


@dataclass
class CVResult:
    cv_id: str
    record: dict[str, Any]
    failed: dict[int, str]  # fold -> reason


def run_cv(job: CVJob, say: Callable[[str], None] = print) -> CVResult:
    """Run (or resume) the cross-validation as its output's only writer (its folds' archive runs
    share the output and its lease); folds that fail are reported, the others finish."""
    job = replace(job, data=storage.absolute(job.data), output=storage.absolute(job.output))
    with lease.hold(job.output, "cross-validation", job.lease_heartbeat_s, say):
        return _run_cv(job, say)


def _run_cv(job: CVJob, say: Callable[[str], None]) -> CVResult:
    import ray

    from resdsn_ray.cluster import connect, runtime_env

    cases, rejected = training_cases(job.data, None)
    for item in rejected:
        say(f"not in the CV: case {item['case_id']}: {item['reason']}")
    splits = load_or_make_splits(job, cases)
    write_manifests(job.output, splits)
    record_uri = storage.join(job.output, CV_RECORD)
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        runs.check_resume(record_uri, record.get("recipe", {}), cv_recipe(job), "cross-validation")
    else:
        record = {"cv_id": runs.new_run_id(), "data": job.data, "output": job.output, "folds": job.folds, "seed": job.seed,
                  "created_at": utc_iso(), "invocations": 0, "recipe": cv_recipe(job)}
    record["invocations"] += 1
    record.update(
        train={stage: to_dict(config) for stage, config in job.train.items()}, engine=to_dict(job.engine),
        workers_per_trial=job.workers_per_trial, gpu=job.gpu, cpus_per_worker=job.cpus_per_worker,
        rejected=rejected, status="running", sizes=[len(part) for part in splits["splits"]], provenance=provenance(),
    )
    run_prefix = f"{record['cv_id']}-r{record['invocations']}"
    storage.write_json(record_uri, record)

    todo = [k for k in range(job.folds) if not storage.exists(storage.join(fold_dir(job.output, k), DONE_FILE))]
    record["fold_state"] = {str(k): "pending" if k in todo else "done" for k in range(job.folds)}
    say(f"cv {record['cv_id']}: {job.folds} folds of {record['sizes']} cases under {job.output}; "
        f"{job.folds - len(todo)} already done")
    failed: dict[int, str] = {}
    if todo:
        connect(job.address, dashboard=True)  # Ray Train's placement-group cleaner asks the State API
        limit = default_concurrency(job, ray.cluster_resources())
        say(f"running folds {todo}, at most {limit} at a time")
        task = ray.remote(run_fold).options(num_cpus=0, max_retries=1, runtime_env=runtime_env())
        pending = list(todo)
        running: dict[Any, int] = {}
        while pending or running:
            while pending and len(running) < limit:
                fold = pending.pop(0)
                running[task.remote(job, fold, run_prefix)] = fold
                record["fold_state"][str(fold)] = "running"
            storage.write_json(record_uri, record)
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
    record.update(status="failed" if failed else "finished", ended_at=utc_iso(),
                  fit={str(k): fold_fitness(job.output, k) for k in range(job.folds)})
    storage.write_json(record_uri, record)
    return CVResult(record["cv_id"], record, failed)
