"""Training runs: validation through the engine, and Ray Train runs on one local cluster (DDP over
two workers, a worker process killed with SIGKILL and the run resumed from its last checkpoint,
checkpoints on S3, refusals of unusable input). No fault hooks: the faults are real kills."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resdsn_ray import cli, storage
from resdsn_ray.bundle import demo_bundle_uri, load_bundle
from resdsn_ray.config import TrainConfig
from resdsn_ray.errors import InputError
from resdsn_ray.recipes import poly_lr, preset_config
from resdsn_ray.sampling import ValidationCase
from resdsn_ray.synthetic import make_case, write_archive
from resdsn_ray.training import storage_target, train, validate
from resdsn_ray.volumes import Volume

torch.set_num_threads(1)
SHAPE = (40, 40, 32)  # small phantoms: the organ still spans several 16^3 patches
RUN_TIMEOUT_S = 600  # one tiny training on a shared 2-core machine; a hang fails instead of blocking
# Ray Train's checkpoint manager snapshot (under OUTPUT/train): the checkpoints it has registered,
# i.e. the ones a restarted worker group resumes from.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def _archive(root: str, cases: int = 6, seed: int = 0) -> str:
    write_archive(root, cases=cases, seed=seed, shape=SHAPE)
    return root


# ------------------------------------------------------------------------------ validation


def test_validation_segments_held_out_cases_with_the_engine():
    """The demo bundles reach their known held-out DSC through `validate` (coarse: the engine's
    coarse mode; fine: its fine stage on the ground-truth box + margin), and the model being
    trained is left as it was (the engine sets mode and memory layout in place: it gets a copy)."""
    image, label, affine = make_case(101)  # the demo shape, which the demo bundles were trained on
    case = ValidationCase("case101", Volume(image.astype(np.float32), affine, "case101"), (label > 0).astype(np.uint8))
    dsc = {}
    for stage in ("coarse", "fine"):
        bundle = load_bundle(demo_bundle_uri(stage))
        bundle.model.train()
        strides = [p.stride() for p in bundle.model.parameters()]
        config = preset_config("demo", stage, val_n=1, width=bundle.model_config.width, patch=bundle.model_config.patch)
        (dsc[stage],), predicted = validate(bundle.model, config, [case], torch.device("cpu"))
        assert predicted > 0
        assert bundle.model.training and [p.stride() for p in bundle.model.parameters()] == strides
    # Measured with the former copy of the fine stage too (identical to 1e-6): 0.797 / 0.940.
    assert dsc["coarse"] == pytest.approx(0.7969, abs=1e-3) and dsc["fine"] == pytest.approx(0.9398, abs=1e-3)


def test_s3_storage_target_carries_endpoint_and_region_but_no_keys(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNEVERTRAVELS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-travels")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    path, filesystem = storage_target("s3://bucket/runs/fine/")
    pickled = pickle.dumps(filesystem)  # how it reaches Ray's controller and workers
    assert path == "bucket/runs/fine" and filesystem.region == "eu-west-3" and b"127.0.0.1:9" in pickled
    assert b"NEVERTRAVELS" not in pickled and b"never-travels" not in pickled
    with pytest.raises(InputError, match="local folder"):
        storage_target("gs://bucket/run")


# -------------------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str):
    """One local single-node Ray cluster (2 CPUs, with the dashboard: the State API finds the
    workers to kill) for the Ray Train runs of this module.

    It starts inside the S3 test environment: like a real node, each Ray process finds S3
    credentials in its own environment; the job never ships them. Ray Train's DDP runs want one
    node with 2 CPUs, not the archive tests' two 1-CPU nodes, so a driver those modules left
    connected is disconnected first (their session cluster keeps running, stopped by its own
    fixture)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture
def quick_failure_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train polls its workers (results, deaths) every 2 s; 0.2 s here, so that checkpoints
    are registered and a killed worker is noticed soon after it happens (the driver passes this
    Ray setting to the controller)."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _tiny(stage: str = "coarse", **kw: Any) -> TrainConfig:
    settings = {"iterations": 40, "patch": 16, "width": 4, "batch_size": 4, "checkpoint_every": 10,
                "keep_checkpoints": 2, "validate_every": 40, "val_n": 1, "log_every": 5}
    settings.update(kw)
    return preset_config("demo", stage, **settings)


def _checkpoints(output: str) -> list[str]:
    fs, path = storage.filesystem(storage.join(output, "train"))
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path) if fs.isdir(p) and p.rsplit("/", 1)[-1].startswith("checkpoint_"))


def _registered_iteration(output: str) -> int:
    """The iteration of the newest checkpoint Ray Train has registered (0: none yet)."""
    uri = storage.join(output, "train", SNAPSHOT)
    storage.filesystem(uri)[0].invalidate_cache()
    try:
        latest = storage.read_json(uri).get("latest_checkpoint_result")
    except (FileNotFoundError, ValueError):  # not written yet, or being rewritten
        return 0
    return int(latest["metrics"]["iteration"]) if latest else 0


def json_record(output: str) -> dict[str, Any]:
    return storage.read_json(storage.join(output, "run.json"))


def _worker_pids(count: int) -> list[int]:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address,  # this module's cluster, not the session's
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(int(a.pid) for a in alive) if len(alive) == count else []


def _start(target, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """`target(*args, **kwargs)` in a thread; its result or exception lands in the dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target(*args, **kwargs)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _kill_a_worker_once_a_checkpoint_is_registered(output: str, run: threading.Thread, workers: int) -> int:
    """SIGKILL one Ray Train worker process of the running `run` as soon as Ray Train has
    registered a checkpoint; returns the iteration of the newest registered one just before."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    pids: list[int] = []
    while not pids:
        assert run.is_alive() and time.monotonic() < deadline, "the workers never started"
        pids = _worker_pids(workers)
        time.sleep(0.2)
    while (registered := _registered_iteration(output)) == 0:
        assert run.is_alive() and time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.05)
    assert run.is_alive(), "the run ended before the kill"
    os.kill(pids[-1], signal.SIGKILL)
    return registered


def _finish(run: threading.Thread, outcome: dict[str, Any]) -> dict[str, Any]:
    run.join(timeout=RUN_TIMEOUT_S)
    assert not run.is_alive(), f"training did not end within {RUN_TIMEOUT_S} s"
    return outcome


@pytest.mark.ray
def test_two_worker_ddp_run_killed_and_resumed(ray_cluster, quick_failure_detection, tmp_path: Path):
    from ray.train import TrainingFailedError

    data = _archive(str(tmp_path / "data"))
    (tmp_path / "data" / "imagesTr" / "case_0004.nii.gz").write_bytes(b"\x1f\x8b broken")
    output = str(tmp_path / "run")
    config = _tiny()
    run, outcome = _start(train, config, output, data=data, val_cases=1, workers=2, max_failures=0)
    killed_after = _kill_a_worker_once_a_checkpoint_is_registered(output, run, workers=2)
    assert isinstance(_finish(run, outcome).get("error"), TrainingFailedError)  # no retries allowed
    newest = _registered_iteration(output)
    assert 10 <= killed_after <= newest < 40 and newest % 10 == 0
    print(f"killed a worker after checkpoint {killed_after}; the rerun resumes at {newest}")
    assert json_record(output)["status"] == "running"

    result = train(config, output, data=data, val_cases=1, workers=2, max_failures=0)  # the same command again
    assert result.metrics["start_iteration"] == newest and result.iterations == 40
    checksums = result.metrics["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # gradients averaged: replicas identical
    assert [s["case_id"] for s in result.skipped] == ["case_0004"]
    losses = [h["loss"] for h in result.history]
    assert [h["iteration"] for h in result.history] == list(range(5, 41, 5))  # history restored, then continued
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    for h in result.history:  # the lr of the history's last step in each window
        assert h["lr"] == pytest.approx(poly_lr(config.lr, h["iteration"] - 1, 40))
    assert result.val_dsc is not None and 0.0 <= result.val_dsc <= 1.0
    assert _checkpoints(output) == ["checkpoint_0000030", "checkpoint_0000040"]  # keep 2
    bundle = load_bundle(result.bundle_uri)
    assert bundle.stage == "coarse" and bundle.id == result.bundle_id
    assert bundle.provenance["iterations"] == 40 and bundle.provenance["preset"] == "demo"
    assert bundle.provenance["final_loss"] == pytest.approx(losses[-1]) and bundle.provenance["libraries"]["torch"]
    record = json_record(output)
    assert record["status"] == "done" and len(record["val_cases"]) == 1
    assert record["started_at"].endswith("+00:00") and record["finished_at"] > record["started_at"]
    assert record["provenance"]["device"] == "cpu" and record["recipe"]["lr"] == config.lr

    with pytest.raises(InputError, match=r"other settings \(lr\)"):  # same output, another recipe
        train(dataclasses.replace(config, lr=0.1), output, data=data, workers=2)


@pytest.mark.ray
@pytest.mark.s3
def test_checkpoints_and_bundle_on_s3_survive_a_killed_worker(ray_cluster, quick_failure_detection, s3_bucket: str):
    data = _archive(f"{s3_bucket}/data", cases=3)
    output = f"{s3_bucket}/runs/fine"
    config = _tiny("fine", iterations=30, validate_every=30)
    run, outcome = _start(train, config, output, data=data, workers=1, max_failures=1)
    killed_after = _kill_a_worker_once_a_checkpoint_is_registered(output, run, workers=1)
    result = _finish(run, outcome)["result"]  # restarted within the run, from S3
    assert killed_after <= result.metrics["start_iteration"] < 30 and result.iterations == 30
    print(f"killed the worker after checkpoint {killed_after}; restarted at {result.metrics['start_iteration']}")
    assert _checkpoints(output) == ["checkpoint_0000020", "checkpoint_0000030"]
    fs, path = storage.filesystem(f"{output}/train/checkpoint_0000030/state.pt")
    state = torch.load(fs.open(path, "rb"), weights_only=True)
    assert state["iteration"] == 30 and state["config"]["stage"] == "fine"
    bundle = load_bundle(f"{output}/bundle")
    assert bundle.stage == "fine" and bundle.model_config.patch == 16
    assert bundle.provenance["data"] == data
    assert json_record(output)["status"] == "done"


@pytest.mark.ray
def test_a_collapsed_training_is_reported_and_its_bundle_refused(ray_cluster, tmp_path: Path, capsys,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """A tiny coarse model trained at a learning rate far too high, on uniform patches of small
    phantoms, collapses to background: the run says UNFIT, exits 1, and writes its bundle marked
    unfit, which segment and the archive job refuse unless --allow-unfit. Paths given relative
    work: the Ray workers, which run elsewhere, get them absolute."""
    monkeypatch.chdir(tmp_path)
    data = _archive("data", cases=3)
    output = "run"
    code = cli.main(["train", "--stage", "coarse", "--data", data, "--output", output, "--preset", "demo",
                     "--iterations", "10", "--patch", "16", "--width", "4", "--batch-size", "4", "--lr", "0.5",
                     "--foreground-share", "0", "--val-cases", "1", "--validate-every", "10", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "[train] UNFIT: " in captured.out and "unfit" in captured.err
    bundle = f"{output}/bundle"
    config = storage.read_json(f"{bundle}/config.json")
    assert config["fit"] is False and config["unfit"]
    assert json_record(output)["fit"] is False and json_record(output)["unfit"] == config["unfit"]
    assert json_record(output)["data"] == str(tmp_path / "data") and config["provenance"]["data"] == str(tmp_path / "data")
    with pytest.raises(InputError, match="unfit") as refused:
        load_bundle(bundle)
    assert refused.value.source == bundle
    image = f"{data}/imagesTr/case_0000.nii.gz"
    mask = str(tmp_path / "mask.nii.gz")
    segment = ["segment", image, "--out", mask, "--coarse", bundle, "--mode", "coarse", "--n-coarse", "0"]
    assert cli.main(segment) == 2 and "unfit" in capsys.readouterr().err and not os.path.exists(mask)
    archive = ["archive", "--input", data, "--output", str(tmp_path / "out"), "--coarse", bundle, "--mode", "coarse"]
    assert cli.main(archive) == 2 and "run/bundle: model bundle marked unfit" in capsys.readouterr().err
    assert cli.main([*segment, "--allow-unfit"]) == 0 and os.path.exists(mask)


@pytest.mark.ray
def test_too_few_readable_cases_refuse_to_train(ray_cluster, tmp_path: Path, capsys):
    data = _archive(str(tmp_path / "data"), cases=2)
    (tmp_path / "data" / "labelsTr" / "case_0000.nii.gz").write_bytes(b"garbage")
    code = cli.main(["train", "--stage", "coarse", "--data", data, "--output", str(tmp_path / "run"), "--preset", "demo",
                     "--iterations", "5", "--patch", "16", "--width", "4", "--min-cases", "2", "--val-cases", "0"])
    error = capsys.readouterr().err
    assert code == 2 and "only 1 usable" in error and "case_0000" in error


@pytest.mark.ray
def test_gpu_asked_on_a_cluster_without_gpus_is_refused_at_once(ray_cluster, tmp_path: Path):
    data = _archive(str(tmp_path / "data"), cases=2)
    with pytest.raises(InputError, match="GPU"):  # instead of waiting forever for one
        train(_tiny(), str(tmp_path / "run"), data=data, workers=1, gpu=True)
    with pytest.raises(InputError, match="global batch"):
        train(_tiny(batch_size=2), str(tmp_path / "run"), data=data, workers=3)
    assert not (tmp_path / "run").exists()
