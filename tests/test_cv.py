"""Cross-validation: the split, the fold plumbing, and a 2-fold demo-size CV on the session's
two-node Ray cluster whose driver is killed once and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from ray_cluster import REPO, Cluster, ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)

from resdsn_ray import config, runs
from resdsn_ray.archive import Case, list_cases
from resdsn_ray.bundle import demo_bundle_uri
from resdsn_ray.cli import cv_job
from resdsn_ray.config import CVJob
from resdsn_ray.cv import (
    cv_recipe,
    default_concurrency,
    eval_resources,
    load_or_make_splits,
    make_splits,
    run_cv,
    write_manifests,
)
from resdsn_ray.errors import InputError
from resdsn_ray.recipes import preset_config
from resdsn_ray.synthetic import write_archive
from resdsn_ray.training import BUNDLE_DIR, RUN_RECORD

RECIPES = {stage: preset_config("demo", stage) for stage in ("coarse", "fine")}


def test_splits_are_seeded_disjoint_complete_and_as_even_as_the_papers():
    ids = [f"case_{i:03d}" for i in range(82)]
    folds = make_splits(ids, 4, seed=7)
    assert sorted(len(f) for f in folds) == [20, 20, 21, 21]  # NIH: 21/21/20/20
    assert sorted(c for f in folds for c in f) == ids  # every case once: disjoint and complete
    assert make_splits(list(reversed(ids)), 4, seed=7) == folds  # the listing order does not matter
    assert make_splits(ids, 4, seed=8) != folds
    assert [len(f) for f in make_splits(ids[:10], 3, seed=0)] == [4, 3, 3]
    with pytest.raises(InputError, match="cannot make 5 folds"):
        make_splits(ids[:4], 5, seed=0)
    with pytest.raises(InputError, match="at least 2 folds"):
        make_splits(ids, 1, seed=0)


def _job(tmp_path: Path, **kw) -> CVJob:
    return CVJob(data=str(tmp_path / "data"), output=str(tmp_path / "out"), **({"train": RECIPES} | kw))


def test_the_split_is_written_once_and_reused_verbatim(tmp_path: Path):
    cases = [Case(f"c{i}", f"/data/c{i}.nii.gz", f"/labels/c{i}.nii.gz") for i in range(7)]
    first = load_or_make_splits(_job(tmp_path, folds=3, seed=1), cases)
    written = (tmp_path / "out" / "splits.json").read_text()
    # A resume with the archive grown and listed in another order keeps the saved split.
    again = load_or_make_splits(_job(tmp_path, folds=3, seed=1), cases[::-1] + [Case("c9", "/data/c9.nii.gz", "/l/c9.nii.gz")])
    assert again == first and (tmp_path / "out" / "splits.json").read_text() == written
    with pytest.raises(InputError, match="holds a split with 3 folds and seed 1"):
        load_or_make_splits(_job(tmp_path, folds=4, seed=1), cases)


def test_a_resume_must_keep_the_recipe_but_may_change_the_cluster_share(tmp_path: Path):
    from dataclasses import replace

    from resdsn_ray.config import EngineConfig, WindowConfig

    recorded = cv_recipe(_job(tmp_path))

    def check(job: CVJob) -> None:
        runs.check_resume("cv.json", recorded, cv_recipe(job), "cross-validation")

    check(_job(tmp_path, workers_per_trial=4, gpu=True, max_concurrent_folds=2))
    check(_job(tmp_path, engine=EngineConfig(device="cuda", coarse=WindowConfig(batch_size=32))))
    longer = dict(RECIPES, fine=replace(RECIPES["fine"], iterations=5000))
    with pytest.raises(InputError, match=r"other settings \(train\.fine\.iterations\)"):
        check(_job(tmp_path, train=longer))
    with pytest.raises(InputError, match=r"engine\.margin"):
        check(_job(tmp_path, engine=EngineConfig(margin=5)))


def test_fold_manifests_train_on_the_other_folds_and_test_on_their_own(tmp_path: Path):
    cases = [Case(f"c{i}", f"/data/c{i}.nii.gz", f"/labels/c{i}.nii.gz") for i in range(6)]
    job = _job(tmp_path, folds=3)
    splits = load_or_make_splits(job, cases)
    write_manifests(job.output, splits)
    for fold, held in enumerate(splits["splits"]):
        test = list_cases(str(tmp_path / "out" / "folds" / f"fold{fold}" / "test.csv"))
        train = list_cases(str(tmp_path / "out" / "folds" / f"fold{fold}" / "train.csv"))
        assert [c.case_id for c in test] == held
        assert sorted(c.case_id for c in train + test) == [f"c{i}" for i in range(6)]
        assert all(c.label_uri == f"/labels/{c.case_id}.nii.gz" and c.image_uri == f"/data/{c.case_id}.nii.gz" for c in train)


def test_folds_side_by_side_fit_the_cluster_and_evaluate_within_their_share(tmp_path: Path):
    cpu = _job(tmp_path, folds=4, workers_per_trial=2, cpus_per_worker=1.0)
    assert default_concurrency(cpu, {"CPU": 16.0}) == 4
    assert default_concurrency(cpu, {"CPU": 5.0}) == 2
    assert default_concurrency(cpu, {"CPU": 1.0}) == 1
    assert default_concurrency(_job(tmp_path, folds=4, max_concurrent_folds=9), {"CPU": 1.0}) == 4
    gpu = _job(tmp_path, folds=4, workers_per_trial=2, gpu=True)
    assert default_concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    res = eval_resources(_job(tmp_path, workers_per_trial=1, cpus_per_worker=0.5))
    assert res.coarse_actors * res.cpus_per_actor + res.task_cpus <= 0.5
    res = eval_resources(gpu)
    assert (res.coarse_actors, res.gpus_per_actor) == (2, 1.0)
    assert res.coarse_actors * res.cpus_per_actor + res.task_cpus <= 2.0


# ------------------------------------------------------------------------------ end to end

TINY = ["--preset", "demo", "--iterations", "4", "--width", "4", "--patch", "16", "--train-batch-size", "2",
        "--n-coarse", "1", "--n-fine", "1", "--margin", "4", "--cpus-per-worker", "0.5", "--folds", "2", "--seed", "3",
        "--lease-heartbeat-seconds", "2"]  # a killed CV's hold on its output lapses in 8 s
START_TIMEOUT_S = 900.0


def _cv(cluster: Cluster, data: Path, output: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "jobs/cross_validate.py", "--data", str(data), "--output", str(output),
               "--address", cluster.gcs, *TINY]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the CV did not finish in {timeout:g} s:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()[-4000:]


@pytest.mark.ray
def test_two_fold_cv_killed_once_resumes_and_fills_every_fold_and_mode(ray_cluster: Cluster, tmp_path: Path):
    data, output = tmp_path / "data", tmp_path / "out"
    write_archive(str(data), cases=4, seed=11, shape=(48, 48, 32))

    first = _cv(ray_cluster, data, output, tmp_path / "first.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    # Kill the driver once the first evaluation rows are on disk: trainings done, cases in flight.
    while not list((output / "metrics").glob("run_id=*/part-*.parquet")):
        if first.poll() is not None:
            pytest.fail(f"the CV ended (exit {first.returncode}) before it was killed:\n{(tmp_path / 'first.log').read_text()[-4000:]}")
        if time.monotonic() > deadline:
            first.kill()
            pytest.fail("no evaluation rows within the time limit")
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    splits = (output / "splits.json").read_bytes()
    bundles = {run.parent / "bundle" / "weights.safetensors": None for run in output.glob("folds/fold*/*/run.json")
               if json.loads(run.read_text())["status"] == "done"}
    bundles = {p: p.stat().st_mtime_ns for p in bundles}
    assert bundles, "at least one fold had trained its models before the kill"

    second = _cv(ray_cluster, data, output, tmp_path / "second.log")
    _finish(second, tmp_path / "second.log", START_TIMEOUT_S)

    assert (output / "splits.json").read_bytes() == splits
    assert {p: p.stat().st_mtime_ns for p in bundles} == bundles, "a finished training was redone"
    record = json.loads((output / "cv.json").read_text())
    assert record["invocations"] == 2 and record["status"] == "finished"
    assert record["fold_state"] == {"0": "done", "1": "done"}
    # Trained without validation cases: fitness is unchecked, so fit (a collapse would say unfit).
    assert record["fit"] == {str(k): {stage: {"fit": True} for stage in config.STAGES} for k in (0, 1)}
    folds = json.loads(splits)["splits"]
    rows = runs.read_rows(str(output)).to_pylist()
    assert all(r["run_id"].startswith(record["cv_id"]) for r in rows)
    finished = Counter((r["case_id"], r["mode"], r["fold"]) for r in rows if r["status"] in config.FINISHED)
    expected = {(case, mode, fold) for fold, held in enumerate(folds) for case in held for mode in ("coarse", "fine", "c2f")}
    assert set(finished) == expected
    assert set(finished.values()) == {1}, "a case segmented before the kill was segmented again"
    assert all(r["status"] in (*config.FINISHED, config.STATUS_SKIPPED) for r in rows), [r["error"] for r in rows]
    assert any(r["status"] == config.STATUS_SKIPPED and "-r2-" in r["run_id"] for r in rows)
    for case, mode, _ in expected:
        assert Path(runs.mask_uri(str(output), case, mode)).is_file()
    assert all(r["dsc"] is not None for r in rows if r["status"] in config.FINISHED)


def test_cv_command_names_bad_input_before_starting_anything(tmp_path: Path, capsys):
    from resdsn_ray.cli import main

    write_archive(str(tmp_path / "data"), cases=3, seed=1, shape=(48, 48, 32))
    out = tmp_path / "out"
    assert main(["cv", "--data", str(tmp_path / "data"), "--output", str(out), "--folds", "4", "--preset", "demo"]) == 2
    assert "3 labelled case(s) cannot make 4 folds" in capsys.readouterr().err
    assert main(["cv", "--data", str(tmp_path / "missing"), "--output", str(out), "--preset", "demo"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (out / "splits.json").exists()


@pytest.mark.ray
def test_a_fold_that_cannot_train_fails_alone_and_bad_cases_become_error_rows(ray_driver, tmp_path: Path):
    import argparse

    from resdsn_ray.cli import build_parser

    data, output = tmp_path / "data", tmp_path / "out"
    write_archive(str(data), cases=4, seed=11, shape=(48, 48, 32))
    folds = make_splits([f"case_{i:04d}" for i in range(4)], 2, seed=3)
    for case in folds[1]:  # fold 0 trains only on these, fold 1 evaluates them
        (data / "imagesTr" / f"{case}.nii.gz").write_bytes(b"not a nifti file")
    for stage in ("coarse", "fine"):  # fold 1 resumes with its models trained (the killed-CV test trains them)
        trained = output / "folds" / "fold1" / stage
        shutil.copytree(demo_bundle_uri(stage), trained / BUNDLE_DIR)
        (trained / RUN_RECORD).write_text(json.dumps({"status": "done"}))
    args = build_parser().parse_args(["cv", "--data", str(data), "--output", str(output), *TINY])
    assert isinstance(args, argparse.Namespace)
    result = run_cv(cv_job(args), say=lambda line: None)

    assert set(result.failed) == {0}, result.failed
    assert result.failed[0].startswith(f"{output}/folds/fold0/train.csv: only 0 usable training case(s)"), result.failed
    assert all(f"{case} (unreadable" in result.failed[0] for case in folds[1])
    record = json.loads((output / "cv.json").read_text())
    assert record["status"] == "failed" and record["fold_state"]["1"] == "done"
    assert record["fold_state"]["0"].startswith("failed:")
    assert not (output / "folds" / "fold0" / "done.json").exists() and (output / "folds" / "fold1" / "done.json").exists()
    fold1 = json.loads((output / "folds" / "fold1" / "done.json").read_text())
    assert all(fold1["bundles"][stage].endswith(f"folds/fold1/{stage}/{BUNDLE_DIR}") for stage in ("coarse", "fine"))  # not retrained
    rows = runs.read_rows(str(output)).to_pylist()
    assert {(r["case_id"], r["mode"]) for r in rows} == {(c, m) for c in folds[1] for m in ("coarse", "fine", "c2f")}
    assert all(r["status"] == config.STATUS_ERROR and r["fold"] == 1 for r in rows)
    assert all(r["case_id"] in r["error"] or "nifti" in r["error"].lower() for r in rows), [r["error"] for r in rows]
