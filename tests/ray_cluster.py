"""One local two-node Ray cluster per test session, started with `ray start` (infra/ray-local.sh).

The head and a second worker node are separate raylets with their own CPU and custom resources
(`head_node`, `node_b`), temp dir and ports. Both test modules that need Ray import the
fixtures from here (`from ray_cluster import ray_cluster_fixture, ray_driver_fixture`: pytest
finds them by their names `ray_cluster`, `ray_driver`); the cluster starts once, on first use, and stops at the end of
the session. Stopping ends only the sessions this module started (infra/ray-local.sh stop) and
checks that none of their processes is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "ray-local.sh"


@dataclass
class Cluster:
    state: Path
    dashboard: str  # http://127.0.0.1:PORT, for `ray job` (RAY_ADDRESS)
    gcs: str  # 127.0.0.1:PORT, for ray.init(address=...)

    @property
    def env(self) -> dict[str, str]:
        """Environment for `ray job ...` clients of this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.dashboard, "RAY_AUTH_MODE": "token"}

    def add_node(self, name: str, cpus: int = 1) -> int:
        """Join one more worker node (with the resource `name`); the session its processes share."""
        done = subprocess.run([str(SCRIPT), "add-node", str(self.state), name], env=_script_env() | {"RAY_LOCAL_CPUS": str(cpus)},
                              capture_output=True, text=True, timeout=420, check=False)
        if done.returncode != 0:
            pytest.fail(f"infra/ray-local.sh add-node {name} failed:\n{done.stdout}\n{done.stderr}")
        return int((self.state / f"{name}.pid").read_text())

    def sessions(self) -> list[int]:
        """The sessions (setsid) of every node's `ray start` (head, worker, added): all their processes."""
        return [int(path.read_text()) for path in sorted(self.state.glob("*.pid"))]


_cluster: Cluster | None = None


START_ATTEMPTS = 3  # a raylet aborts when its dashboard agent starts late, or registers after Ray's fixed 30 s (load 10-18 on 2 cores)


def _script_env() -> dict[str, str]:
    """infra/ray-local.sh's settings for every node of the test cluster."""
    return {**os.environ, "PYTHON": sys.executable, "RAY_LOCAL_CPUS": "1", "RAY_LOCAL_OBJECT_STORE_MB": "200",
            "RAY_LOCAL_MEMORY_MB": "3072"}


def _start() -> Cluster:
    env = _script_env()
    for attempt in range(1, START_ATTEMPTS + 1):
        state = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths are limited
        done = subprocess.run([str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True, timeout=420,
                              check=False)  # the script stops what it started when a node fails
        if done.returncode == 0:
            break
        if attempt == START_ATTEMPTS:
            pytest.fail(f"infra/ray-local.sh start failed {attempt} times; the last:\n{done.stdout}\n{done.stderr}")
    values = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if line.startswith("export "))
    return Cluster(state=state, dashboard=values["RAY_ADDRESS"], gcs=values["RAY_GCS_ADDRESS"])


def _stop(cluster: Cluster) -> None:
    sessions = cluster.sessions()
    subprocess.run([str(SCRIPT), "stop", str(cluster.state)], capture_output=True, timeout=120, check=True)
    deadline = time.monotonic() + 10
    left = sessions
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        listing = subprocess.run(["ps", "-eo", "sid=,stat="], capture_output=True, text=True, check=True).stdout.split("\n")
        alive = {int(sid) for sid, stat in (line.split() for line in listing if line.strip()) if not stat.startswith("Z")}
        left = [s for s in sessions if s in alive]
    assert not left, f"processes of the test cluster's sessions {left} are still running"
    shutil.rmtree(cluster.state, ignore_errors=True)  # Ray's session logs; kept when a check failed


@pytest.fixture(scope="session", name="ray_cluster")
def ray_cluster_fixture(request: pytest.FixtureRequest, s3_server: str) -> Cluster:
    """The session's local two-node cluster (started on first use).

    Its nodes start inside the S3 server's environment: workers read S3 with the credentials of
    the node they run on, as on a real cluster (the jobs never ship credentials to them).
    """
    global _cluster
    if _cluster is None:
        _cluster = _start()
        cluster = _cluster

        def stop() -> None:
            global _cluster
            _cluster = None
            _stop(cluster)

        request.addfinalizer(stop)
    return _cluster


@pytest.fixture(scope="session", name="ray_driver")
def ray_driver_fixture(ray_cluster: Cluster):
    """This test process as a Ray driver connected to the session cluster."""
    import ray
    from ray._raylet import Config

    # The cluster uses token auth (Ray's default); a client must say so in RAY_AUTH_MODE, which
    # Ray reads once at import: re-read it, as ray.init does itself when it enables token auth.
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs, logging_level="WARNING")
    yield ray_cluster
    ray.shutdown()
