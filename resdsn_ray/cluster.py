"""What every Ray entry point shares: joining the cluster, fitting CPU reservations to its nodes,
and what the workers are given.

Workers get credentials from their own node (instance profile, IRSA, the pod's environment, or
the environment `ray start` ran in), never from the job: a Ray runtime env is not private (its
values show in the State API, the dashboard, `runtime_env_agent.log` and the job info). Only
the non-secret S3 settings in `WORKER_ENV` travel with tasks and actors.
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
import time
from typing import Any

import ray

from resdsn_ray.errors import InputError

# Non-secret settings a worker started elsewhere may lack: the S3 endpoint, region and retry
# policy, the CA bundle, and which hosts bypass a proxy. Nothing else of the driver's env leaves.
WORKER_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS", "AWS_CA_BUNDLE", "NO_PROXY", "no_proxy",
)


def worker_env() -> dict[str, str]:
    """The `WORKER_ENV` variables this process has."""
    return {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}


def runtime_env() -> dict[str, Any] | None:
    """The runtime env every task, actor and Train worker of ours gets (None: nothing to add)."""
    env = worker_env()
    return {"env_vars": env} if env else None


def connect(address: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or the submitting job's), else start a local Ray.

    A local Ray starts without its dashboard unless asked: Ray Train's placement-group cleaner
    needs the State API (training, cross-validation), the archive job does not.
    """
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=dashboard, logging_level=logging.WARNING)


def node_cpus() -> list[float]:
    """Logical CPUs of each alive node of the connected cluster ([0.0] when none has any)."""
    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0] or [0.0]


def node_memory() -> list[float]:
    """Memory (bytes) Ray may hand out on each alive node of the connected cluster ([] when none)."""
    return [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("memory")]


def fit_cpus(actors: int, node_cpus: list[float], actor: float | None = None, task: float | None = None) -> tuple[float, float]:
    """CPUs to reserve per actor and per task so that the job cannot stall on this cluster.

    Ray Data starts every actor of a fixed pool up front. If those reservations leave no node
    with room for a read or finish task, nothing ever moves and no error is raised (measured:
    two 0.5-CPU actors on two 1-CPU nodes starved 1-CPU read tasks forever). Defaults are 1
    CPU each, lowered where nodes are small or actors many (fractions are fine: reservations
    are bookkeeping) so that all `actors` and one task fit, and any node hosting an actor keeps
    room for a task. Room for two (a read and a finish at once) gave the first row sooner where
    one task fits (Ray Data reserves upstream first: reads hold the slot while they have input)
    but cost 12-15 % of the throughput on 2 CPUs, the actors losing CPU to the extra task
    (bench/pipeline.py 40 cases, A/B twice: 38-40 s vs 43-47 s). Given values must at least
    fit: actors x actor + task on the cluster, actor + task on one node. A cluster without CPU
    nodes yet (autoscaling from zero) is not checked.
    """
    total, smallest = sum(node_cpus), min(node_cpus)
    if total <= 0:  # no worker node yet: an autoscaling cluster will bring them
        return actor if actor is not None else 1.0, task if task is not None else 1.0
    task = task if task is not None else min(1.0, smallest / 2)
    if actor is None:
        actor = min(1.0, smallest - task, (total - task) / actors)
    if actor <= 0 or actors * actor + task > total + 1e-9 or actor + task > max(node_cpus) + 1e-9:
        raise InputError(
            "--cpus-per-actor",
            f"{actors} actor(s) x {actor:g} CPU plus a {task:g}-CPU task do not fit on nodes with "
            f"{node_cpus} CPUs; the job would stall. Lower --cpus-per-actor / --task-cpus or the actor counts.",
        )
    return actor, task


def can_host(cpus: float, gpus: float) -> bool:
    """Whether some alive node of the connected cluster has room for an actor of this size."""
    return any(n.get("Alive") and n["Resources"].get("CPU", 0.0) >= cpus and n["Resources"].get("GPU", 0.0) >= gpus
               for n in ray.nodes())


class HostWatch:
    """Ends a run whose model actors lost every node able to host them.

    Ray restarts a lost actor once some node can take it, so a pool whose only eligible nodes died
    waits forever, silently (`wait_for_min_actors_s` bounds only the pool's start). The watch
    gives the cluster `wait_s` to bring a replacement (an autoscaler launching a node), then
    interrupts the driver's main thread; `failure` says why.
    """

    def __init__(self, cpus: float, gpus: float, wait_s: float, check_s: float = 2.0) -> None:
        self.cpus, self.gpus, self.wait_s, self.check_s = cpus, gpus, wait_s, check_s
        self.failure: InputError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="host-watch", daemon=True)

    def start(self) -> HostWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        since = None
        while not self._stop.wait(self.check_s):
            if can_host(self.cpus, self.gpus):
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= self.wait_s:
                self.failure = InputError(
                    "--actor-timeout", f"no node of the cluster can host a model actor ({self.cpus:g} CPU, {self.gpus:g} GPU) "
                    f"any more and none joined within {self.wait_s:g} s (nodes lost?); a rerun finishes the cases left")
                _thread.interrupt_main()
                return


def end_leftover_actors() -> int:
    """Kill the Ray Data map actors this process owns that a finished stream left alive; how many.

    Ray Data ends a stream's pool by dropping its references, and an actor Ray restarted on
    another node after its node died is kept alive by them (measured: ALIVE for minutes after its
    stream ended), holding the CPUs/GPUs the next stream's pool needs. Ray 2.60 has no public call
    for this: the GCS actor table and the core worker's kill (the project pins Ray 2.60.x).
    """
    from ray._private.state import state
    from ray._raylet import ActorID, JobID
    from ray.core.generated.common_pb2 import Address

    worker = ray._private.worker.global_worker.core_worker
    me = Address.FromString(worker.get_owner_address(ray.put(None)))
    table = state.actor_table(None, job_id=JobID.from_hex(ray.get_runtime_context().get_job_id()))
    ended = 0
    for actor_id, info in table.items():
        owner = info.get("OwnerAddress") or {}
        if (info["State"] != "DEAD" and info["ActorClassName"].startswith("MapWorker(")
                and (owner.get("IPAddress"), owner.get("Port")) == (me.ip_address, me.port)):
            worker.kill_actor(ActorID.from_hex(actor_id), True)
            ended += 1
    return ended
