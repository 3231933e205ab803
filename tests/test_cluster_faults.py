"""Process faults of a real cluster, injected for real on the session's two-node Ray cluster:
a read task killed (SIGKILL, as the OOM killer does) on every attempt, and a model actor killed
in the middle of a case. Each run must end with exactly one row per case, masks for the good
cases, and the lost case as one retryable error row: bounded, never hanging."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import s3fs
from fault_proxy import FaultProxy
from process_faults import Killer, kill_session, pid_of_client
from ray_cluster import ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)

from resdsn_ray import storage
from resdsn_ray.bundle import demo_bundle_uri
from resdsn_ray.config import FINISHED, ArchiveJob, EngineConfig, Resources, WindowConfig
from resdsn_ray.errors import InputError
from resdsn_ray.pipeline import ATTEMPTS_PER_CASE, run_archive
from resdsn_ray.synthetic import write_archive

pytestmark = [pytest.mark.ray, pytest.mark.s3]

CASES = 3
# The demo bundles on their phantoms (96x96x64): ~3 s of windows per case on one quiet core, so a
# model actor is caught mid-case
ENGINE = EngineConfig(coarse=WindowConfig(n=3), fine=WindowConfig(n=3), device="cpu")


@pytest.fixture(scope="module")
def bundles() -> dict[str, str]:
    """The shipped demo bundles: they find the organ of the phantoms, so each case runs both stages
    for seconds (random weights find nothing and end a case in well under a second)."""
    return {stage: demo_bundle_uri(stage) for stage in ("coarse", "fine")}


def job(archive: str, output: str, bundles: dict[str, str]) -> ArchiveJob:
    return ArchiveJob(input=archive, output=output, coarse=bundles["coarse"], fine=bundles["fine"], engine=ENGINE,
                      flush_rows=1)


def one_final_row_per_case(rows: list[dict]) -> dict[str, dict]:
    counts = Counter(r["case_id"] for r in rows)
    assert set(counts.values()) == {1}, counts  # no case lost, none twice
    return {r["case_id"]: r for r in rows}


def table_row(fault: str, injected: int, result) -> None:
    """One line of the fault table (`pytest -s` shows it): what was injected and what the run made of it."""
    finished = sum(r["status"] in FINISHED for r in result.rows)
    print(f"\nfault table | {fault} | injected {injected} | cases finished {finished} of {len(result.rows)} "
          f"| rows lost 0 | duplicates 0 | run {result.seconds:.1f} s")


def test_a_case_whose_reader_is_killed_every_time_is_one_retryable_error_row(ray_driver, s3_server, s3_bucket, bundles,
                                                                             monkeypatch):
    archive = f"{s3_bucket}/poison"
    write_archive(archive, cases=1, seed=5)
    for folder in ("imagesTr", "labelsTr"):  # a second case whose read the killer catches every time
        storage.write_bytes(f"{archive}/{folder}/poison.nii.gz", storage.read_bytes(f"{archive}/{folder}/case_0000.nii.gz"))
    with FaultProxy(s3_server) as proxy, monkeypatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", proxy.url)  # workers get the endpoint with the job
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.stall("imagesTr/poison")  # its image read hangs until the killer finds the reader

        server_port = int(proxy.url.rsplit(":", 1)[1])

        def reader() -> int | None:
            return next((pid for _, port in reversed(proxy.stalled_clients) if (pid := pid_of_client(port, server_port))), None)

        killer = Killer(reader)
        killer.start()
        try:
            result = run_archive(job(archive, f"{s3_bucket}/out-poison", bundles))
        finally:
            kills = killer.stop()
    s3fs.S3FileSystem.clear_instance_cache()  # the checks below go to the S3 server itself
    rows = one_final_row_per_case(result.rows)
    table_row("read task SIGKILLed on every attempt (poison case)", len(kills), result)
    assert len(kills) == ATTEMPTS_PER_CASE, kills  # every attempt of the bounded retries, and no more
    poison = rows.pop("poison")
    assert poison["status"] == "error" and poison["retryable"] is True and poison["mask_uri"] is None
    assert f"died on each of its {ATTEMPTS_PER_CASE} attempts" in poison["error"], poison["error"]
    for row in rows.values():
        assert row["status"] in FINISHED, row["error"]
        assert storage.exists(row["mask_uri"])


def _actor_processes(dashboard: str, node_id: str | None = None) -> list[int]:
    """PIDs of the live model actors (Ray Data map workers), on `node_id` only if given."""
    from ray.util.state import list_actors

    return [a["pid"] for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
            if "MapWorker" in (a.get("class_name") or "") and node_id in (None, a.get("node_id"))]


def _busy(pid: int, probe_s: float = 0.3) -> bool:
    """Whether process `pid` is computing: it used over half a CPU during `probe_s`."""
    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s

    try:
        before = cpu()
        time.sleep(probe_s)
        return cpu() - before > probe_s / 2
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_model_actor_killed_mid_case_is_restarted_and_every_case_finishes_once(ray_driver, s3_bucket, bundles):
    archive = f"{s3_bucket}/actor-kill"
    write_archive(archive, cases=CASES, seed=6)

    def busy_actor() -> int | None:
        return next((pid for pid in _actor_processes(ray_driver.dashboard) if _busy(pid)), None)

    killer = Killer(busy_actor, limit=1)
    killer.start()
    try:
        result = run_archive(job(archive, f"{s3_bucket}/out-actor-kill", bundles))
    finally:
        kills = killer.stop()
    assert len(kills) == 1, "no model actor was caught computing a case"
    rows = one_final_row_per_case(result.rows)
    table_row("model actor SIGKILLed mid-case", len(kills), result)
    assert sorted(rows) == [f"case_{i:04d}" for i in range(CASES)]
    for row in rows.values():
        assert row["status"] in FINISHED, row["error"]
        assert storage.exists(row["mask_uri"])


def _wait_dead(node_ids: set[str], wait_s: float = 120.0) -> None:
    import ray

    end = time.monotonic() + wait_s
    while any(n["Alive"] for n in ray.nodes() if n["NodeID"] in node_ids):
        assert time.monotonic() < end, "Ray still counts a killed node alive"
        time.sleep(1)


def test_a_worker_node_lost_mid_run_loses_no_case(ray_driver, s3_bucket, bundles):
    """Two 2-CPU nodes join; the model actor asks 1.5 CPUs, so only they can host it. The one whose
    actor is computing a case is killed whole (raylet, agents, workers), as a lost spot node: the
    run finishes every case exactly once on the nodes left."""
    import ray

    leaders = {name: ray_driver.add_node(name, cpus=2) for name in ("node_c", "node_d")}
    ids = {name: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"]) for name in leaders}
    archive = f"{s3_bucket}/node-loss"
    write_archive(archive, cases=CASES + 1, seed=7)
    killed: list[str] = []

    def node_computing() -> int | None:
        for name, node_id in ids.items():
            if name in killed:
                continue
            if any(_busy(pid) for pid in _actor_processes(ray_driver.dashboard, node_id)):
                killed.append(name)
                return leaders[name]
        return None

    # Generous on a loaded 2-core machine: the second pass starts a new actor on the node left.
    one_actor = Resources(coarse_actors=1, cpus_per_actor=1.5, actor_start_timeout_s=90)
    try:
        killer = Killer(node_computing, limit=1, act=kill_session)
        killer.start()
        try:
            result = run_archive(replace(job(archive, f"{s3_bucket}/out-node-loss", bundles), resources=one_actor))
        finally:
            kills = killer.stop()
        assert len(kills) == 1, "no node's model actor was caught computing a case"
        rows = one_final_row_per_case(result.rows)
        table_row("worker node killed whole mid-case (raylet, agents, workers)", len(kills), result)
        assert sorted(rows) == [f"case_{i:04d}" for i in range(CASES + 1)]
        for row in rows.values():
            assert row["status"] in FINISHED, row["error"]
            assert storage.exists(row["mask_uri"])

        # The last node able to host the actor is lost too: the run fails within --actor-timeout, saying so.
        killer = Killer(node_computing, limit=1, act=kill_session)
        killer.start()
        try:
            with pytest.raises(InputError, match=r"--actor-timeout: no node of the cluster can host"):
                run_archive(replace(job(archive, f"{s3_bucket}/out-all-lost", bundles),
                                    resources=replace(one_actor, actor_start_timeout_s=30)))
        finally:
            killer.stop()
        assert sorted(killed) == sorted(leaders)
    finally:
        for leader in leaders.values():  # the session cluster goes back to its two nodes
            kill_session(leader)
        _wait_dead(set(ids.values()))
