"""Credentials never leave the node. The session's S3 secret key is a unique marker
(`aws_secret_marker`) that the test cluster's nodes hold in their environment, as a node holds
its instance profile or pod credentials. An archive job submitted as the README advises and the
archive driver run in-process must leave that marker nowhere: not in any file under the Ray
session folders, not in the State API's task/actor/job listings (Python API and the dashboard's
HTTP API), and not in any output object (rows, run records, masks' headers).

The scanner is shown to work first: a probe string put on purpose into the runtime env of a
trivial task, an actor and a job is found in every one of those places.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import torch
from ray_cluster import REPO, Cluster, ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)

from resdsn_ray import cluster, storage
from resdsn_ray.bundle import save_bundle
from resdsn_ray.config import ArchiveJob, EngineConfig, ModelConfig, WindowConfig
from resdsn_ray.model import build_model
from resdsn_ray.synthetic import write_archive

pytestmark = [pytest.mark.ray, pytest.mark.s3]

RAY = Path(sys.executable).parent / "ray"
EXCLUDES = [".venv", ".git", "demo-output", "*.whl", "__pycache__", ".pytest_cache"]
CASES = 2
SHAPE = (32, 32, 24)
JOB_TIMEOUT_S = 600
WAIT_S = 120.0  # bound of the wait for the State API and Ray's logs to show the probe
LISTING_LIMIT = 10_000
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# The scanner: every place a value given to Ray could end up


def session_roots(ray_cluster: Cluster) -> list[Path]:
    """The test cluster's folder (its nodes' --temp-dir: every session's logs, runtime envs,
    uploaded working dirs) and the session folder this driver process writes to."""
    import ray

    roots = [ray_cluster.state]
    if ray.is_initialized():
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path()).resolve()
        if not session.is_relative_to(ray_cluster.state.resolve()):
            roots.append(session)
    return roots


def files_holding(roots: list[Path], needle: bytes) -> list[str]:
    """Every regular file under `roots` whose bytes (or, for gzip files, decompressed bytes) hold `needle`."""
    found = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if _holds(path, needle):
                found.append(str(path))
    return found


def _holds(path: Path, needle: bytes, chunk: int = 1 << 22) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
            handle.seek(0)
            stream = gzip.GzipFile(fileobj=handle) if head == b"\x1f\x8b" else handle
            tail = b""
            while block := stream.read(chunk):
                if needle in tail + block:
                    return True
                tail = block[-len(needle):]
    except (OSError, EOFError):  # a log rotated away, a socket, a truncated archive
        return False
    return False


def _text(items: list) -> str:
    return json.dumps([dataclasses.asdict(i) if dataclasses.is_dataclass(i) else i for i in items], default=str)


def _http(ray_cluster: Cluster, path: str) -> str:
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    request = urllib.request.Request(ray_cluster.dashboard + path, headers=get_auth_headers_if_auth_enabled({}))
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.read().decode("utf-8", errors="replace")


def api_listings(ray_cluster: Cluster) -> dict[str, Callable[[], str]]:
    """Each State API listing (Python and HTTP) as a function returning its text."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    address = ray_cluster.gcs
    options = {"address": address, "limit": LISTING_LIMIT, "raise_on_missing_output": False}
    return {
        "list_tasks(detail=True)": lambda: _text(list_tasks(detail=True, **options)),
        "list_actors(detail=True)": lambda: _text(list_actors(detail=True, **options)),
        "list_jobs(detail=True)": lambda: _text(list_jobs(detail=True, **options)),
        "GET /api/v0/tasks?detail=1": lambda: _http(ray_cluster, f"/api/v0/tasks?detail=1&limit={LISTING_LIMIT}"),
        "GET /api/v0/actors": lambda: _http(ray_cluster, f"/api/v0/actors?detail=1&limit={LISTING_LIMIT}"),
        "GET /api/jobs/": lambda: _http(ray_cluster, "/api/jobs/"),
    }


def places_holding(ray_cluster: Cluster, needle: str) -> list[str]:
    """The State API listings and the files under the Ray session folders that hold `needle`."""
    found = [name for name, listing in api_listings(ray_cluster).items() if needle in listing()]
    return found + files_holding(session_roots(ray_cluster), needle.encode())


def objects_holding(prefix: str, needle: bytes) -> list[str]:
    fs, path = storage.filesystem(prefix)
    fs.invalidate_cache()
    found = []
    for key in fs.find(path):
        data = fs.cat_file(key)
        if needle in data or (data[:2] == b"\x1f\x8b" and needle in gzip.decompress(data)):
            found.append(f"s3://{key}")
    return found


def ray_job(ray_cluster: Cluster, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", *args], env=ray_cluster.env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_scanner_finds_a_value_placed_in_a_runtime_env(ray_driver, ray_cluster):
    """A probe in the runtime env of a task, an actor and a job shows in every place scanned."""
    import ray

    probe = f"resdsn-probe-{uuid.uuid4().hex}"
    env = {"env_vars": {"RESDSN_PROBE": probe}}

    @ray.remote(num_cpus=0)
    def echo(x: int) -> int:
        return x

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self) -> str:
            return "pong"

    assert ray.get(echo.options(runtime_env=env).remote(1), timeout=WAIT_S) == 1
    actor = Echo.options(runtime_env=env).remote()
    try:
        assert ray.get(actor.ping.remote(), timeout=WAIT_S) == "pong"
        job = ray_job(ray_cluster, "submit", "--runtime-env-json", json.dumps(env), "--", "python", "-c", "print(1)")
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]

        expected = {*api_listings(ray_cluster)}
        deadline = time.monotonic() + WAIT_S  # task events and logs reach the GCS and disk within seconds
        while True:
            found = places_holding(ray_cluster, probe)
            listed = expected & set(found)
            files = [f for f in found if f not in expected]
            if (listed == expected and any(f.endswith("runtime_env_agent.log") for f in files)) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert listed == expected, f"the probe was not found in {sorted(expected - listed)}"
        assert any(f.endswith("runtime_env_agent.log") for f in files), files
        print(f"\nprobe found in {sorted(listed)} and {len(files)} files: {sorted({Path(f).name for f in files})}")
    finally:
        ray.kill(actor)


def test_no_secret_leaves_the_node(ray_driver, ray_cluster, s3_server, aws_secret_marker):
    """A job submitted as the README says and the archive driver in this process: the node
    credentials' secret shows nowhere in Ray or in the outputs."""
    from resdsn_ray.pipeline import run_archive

    name = f"resdsn-secrets-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    bucket = f"s3://{name}"
    archive = f"{bucket}/archive"
    write_archive(archive, cases=CASES, seed=7, shape=SHAPE)
    torch.manual_seed(3)
    for stage in ("coarse", "fine"):
        save_bundle(f"{bucket}/{stage}", build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    bundles = ["--coarse", f"{bucket}/coarse", "--fine", f"{bucket}/fine"]

    # 1. The README's way: the runtime env holds only the non-secret settings (cluster.worker_env).
    runtime_env = {"excludes": EXCLUDES, "env_vars": cluster.worker_env()}
    assert aws_secret_marker not in json.dumps(runtime_env)
    job = ray_job(ray_cluster, "submit", "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
                  "--submission-id", f"secrets-{uuid.uuid4().hex[:8]}", "--", "python", "jobs/segment_archive.py",
                  "--input", archive, "--output", f"{bucket}/submitted", *bundles, "--n-coarse", "1", "--n-fine", "1")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    # 2. The driver in this process (its own environment holds the secret too).
    engine = EngineConfig(coarse=WindowConfig(n=1), fine=WindowConfig(n=1), device="cpu")
    result = run_archive(ArchiveJob(input=archive, output=f"{bucket}/in-process", coarse=f"{bucket}/coarse",
                                    fine=f"{bucket}/fine", engine=engine, flush_rows=1), say=lambda _: None)
    assert len(result.rows) == CASES and {r["status"] for r in result.rows} <= {"ok", "no_organ"}, result.rows

    leaks = {
        "the in-process run's rows and record": [aws_secret_marker] if aws_secret_marker in json.dumps(
            [result.rows, result.record], default=str) else [],
        "output objects": objects_holding(bucket, aws_secret_marker.encode()),
        "Ray": places_holding(ray_cluster, aws_secret_marker),
    }
    fs, masks = storage.filesystem(f"{bucket}/submitted/masks")
    assert len(fs.find(masks)) == CASES  # the submitted job did its work
    scanned = [p for root in session_roots(ray_cluster) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    print(f"\nscanned {len(scanned)} files ({sum(p.stat().st_size for p in scanned) / 1e6:.0f} MB) under "
          f"{[str(r) for r in session_roots(ray_cluster)]}, {len(fs.find(bucket.removeprefix('s3://')))} objects")
    assert not any(leaks.values()), f"the secret left the node: {leaks}"
