"""The archive job as users run it: `ray job submit` to a two-node cluster started with
`ray start`, everything in S3; the driver is killed mid-run and the resubmitted job resumes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pytest
import torch
from ray_cluster import REPO, Cluster, ray_cluster_fixture  # noqa: F401  (session fixture)

from resdsn_ray import config, runs, storage
from resdsn_ray.bundle import save_bundle
from resdsn_ray.cluster import worker_env
from resdsn_ray.config import ModelConfig
from resdsn_ray.model import build_model
from resdsn_ray.synthetic import write_archive
from resdsn_ray.volumes import read_volume

pytestmark = [pytest.mark.ray, pytest.mark.s3]

RAY = Path(sys.executable).parent / "ray"  # the CLI of the environment running the tests
CASES = 8
EXCLUDES = [".venv", ".git", "demo-output", "*.whl", "__pycache__", ".pytest_cache"]


def ray_job(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", *args], env=cluster.env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def submit(cluster: Cluster, job_args: list[str], *, wait: bool, submission_id: str) -> subprocess.CompletedProcess:
    # As the README advises: only non-secret settings travel; the nodes hold the credentials.
    runtime_env = {"excludes": EXCLUDES, "env_vars": worker_env()}
    return ray_job(
        cluster, "submit", "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
        "--submission-id", submission_id, *([] if wait else ["--no-wait"]),
        "--", "python", "jobs/segment_archive.py", *job_args,
        timeout=900 if wait else 300,  # a whole run on a loaded 2-core machine (seen: 5 min)
    )


def driver_pids(marker: str) -> list[int]:
    """PIDs of the job driver process(es) whose command line holds `marker`."""
    listing = subprocess.run(["ps", "-wweo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if "jobs/segment_archive.py" in line and marker in line and "ray job" not in line]


def mask_times(output: str, case_ids: set[str]) -> dict[str, object]:
    fs, _ = storage.filesystem(output)
    fs.invalidate_cache()
    return {c: fs.info(runs.mask_uri(output, c))["LastModified"] for c in case_ids}


def test_cluster_has_two_raylets_with_distinct_resources(ray_cluster):
    for _ in range(30):  # the autoscaler's view lags a node's start by a few seconds
        status = subprocess.run([str(RAY), "status", "--address", ray_cluster.gcs], env=ray_cluster.env,
                                capture_output=True, text=True, timeout=60, check=False).stdout
        active = status.split("Active:")[1].split("Pending:")[0] if "Active:" in status else ""
        if active.count("node_") == 2:
            break
        time.sleep(1)
    assert active.count("node_") == 2, status
    assert "0.0/2.0 CPU" in status and "head_node" in status and "node_b" in status


def test_killed_job_resubmitted_finishes_without_recomputing_done_cases(ray_cluster, s3_server):
    bucket = f"resdsn-job-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    archive, output = f"s3://{bucket}/archive", f"s3://{bucket}/out"
    write_archive(archive, cases=CASES, seed=11, shape=(48, 48, 32))
    torch.manual_seed(0)
    for stage in ("coarse", "fine"):
        save_bundle(f"s3://{bucket}/{stage}", build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    tag = uuid.uuid4().hex[:8]
    # A short lease heartbeat: the killed driver's hold on the output lapses in 8 s, not 2 minutes.
    args = ["--input", archive, "--output", output, "--coarse", f"s3://{bucket}/coarse", "--fine", f"s3://{bucket}/fine",
            "--lease-heartbeat-seconds", "2",
            "--n-coarse", "1", "--n-fine", "3", "--flush-rows", "1", "--progress-seconds", "1"]

    # 1. Submit, and kill the driver (SIGKILL: a crash, no clean-up) once some rows are written.
    first = submit(ray_cluster, [*args, "--run-id", f"first-{tag}"], wait=False, submission_id=f"first-{tag}")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if runs.read_rows(output).num_rows >= 2:
            break
        time.sleep(0.2)
    pids = driver_pids(f"first-{tag}")
    assert pids, "the job finished or died before it could be interrupted"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        done_status = ray_job(ray_cluster, "status", f"first-{tag}", timeout=60)
        status = (done_status.stdout + done_status.stderr).lower()
        if any(word in status for word in ("failed", "stopped", "succeeded")):
            break
        time.sleep(0.5)
    assert "exit code -9" in status, status  # the driver died by our SIGKILL
    done = {r["case_id"]: r for r in runs.read_rows(output).to_pylist() if r["status"] in config.FINISHED}
    assert 1 <= len(done) < CASES, f"{len(done)} of {CASES} cases done when the driver was killed"
    assert runs.read_run_record(output, f"first-{tag}")["status"] == "running"  # never finished
    before = mask_times(output, set(done))

    # 2. Resubmit the same job (same output): it finishes the rest and leaves the done cases alone.
    second = submit(ray_cluster, [*args, "--run-id", f"second-{tag}"], wait=True, submission_id=f"second-{tag}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "progress:" in second.stdout or "finished:" in second.stdout
    assert "Time/case s" in second.stdout and f"{len(done)} already done" in second.stdout

    rows = runs.read_rows(output).to_pylist()
    record = runs.read_run_record(output, f"second-{tag}")
    assert record["status"] == "finished" and record["counts"].get("skipped") == len(done)
    for case_id in (f"case_{i:04d}" for i in range(CASES)):
        mine = [r for r in rows if r["case_id"] == case_id]
        finished = [r for r in mine if r["status"] in config.FINISHED]
        assert len(finished) == 1, f"{case_id} was segmented {len(finished)} times"  # never recomputed
        if case_id in done:
            skipped = [r for r in mine if r["run_id"] == f"second-{tag}"]
            assert [(r["status"], r["attempt"]) for r in skipped] == [("skipped", 1)]
            assert finished[0]["run_id"] == f"first-{tag}"
        else:
            assert finished[0]["run_id"] == f"second-{tag}"
    assert mask_times(output, set(done)) == before

    row = next(r for r in rows if r["run_id"] == f"second-{tag}" and r["status"] in config.FINISHED)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(storage.read_bytes(row["mask_uri"])))
    image = read_volume(row["image_uri"])
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
