"""One writer per output, with real processes racing on a local folder and on S3 (moto's server):
exactly one of them gets the lease; a lease whose holder was SIGKILLed goes stale and exactly one
racer takes it over; a holder frozen (SIGSTOP) past the stale age learns at its next renewal that
its lease was taken, and its release leaves the successor's lease alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from resdsn_ray import lease
from resdsn_ray.errors import InputError

WAIT_S = 120.0  # bound of every wait on a process or on the lease's age (a loaded 2-core machine)
RACERS = 3
# Short heartbeats for the tests that wait for a lease to go stale. S3 ages have a resolution of
# one second (LastModified, Date), so the stale age there is a few seconds.
HEARTBEAT = {"local": 0.5, "s3": 1.0}
STALE_BEATS = {"local": 3, "s3": 3}

WORKER = r"""
import json, sys
from resdsn_ray import lease
from resdsn_ray.errors import InputError

output, run_id, heartbeat, beats = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
lease.holder(output)  # warm: imports and the S3 client ready, so the racers' requests really meet
print("ready", flush=True)
sys.stdin.readline()  # "go": all racers start together
try:
    held = lease.acquire(output, run_id, heartbeat_s=heartbeat, stale_heartbeats=beats)
except InputError as err:
    print(json.dumps({"won": False, "error": str(err)}), flush=True)
    sys.exit(0)
print(json.dumps({"won": True}), flush=True)
for line in sys.stdin:  # the test's commands; end of input ends the process without a release
    if line.strip() == "check":
        print(json.dumps({"lost": held.lost, "reason": held.reason}), flush=True)
    elif line.strip() == "release":
        held.release()
        print(json.dumps({"released": True}), flush=True)
        break
"""


class Worker:
    """One process that tries to take the lease when told, and answers the test's commands."""

    def __init__(self, output: str, run_id: str, heartbeat_s: float = lease.HEARTBEAT_S,
                 beats: int = lease.STALE_HEARTBEATS) -> None:
        self.run_id = run_id
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, output, run_id, str(heartbeat_s), str(beats)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )

    def line(self) -> str:
        """The next line the worker prints (bounded: the process is killed after WAIT_S)."""
        timer = _killer(self.proc)
        try:
            text = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not text:
            self.proc.wait(timeout=WAIT_S)
            raise AssertionError(f"{self.run_id} ended (exit {self.proc.returncode}): {self.proc.stderr.read()[-3000:]}")
        return text.strip()

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.line())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # this test's own process, by its handle
        self.proc.wait(timeout=WAIT_S)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def _killer(proc: subprocess.Popen):
    import threading

    timer = threading.Timer(WAIT_S, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()
    return timer


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def output(backend: str, request: pytest.FixtureRequest, tmp_path) -> str:
    if backend == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def start(racers: list[Worker]) -> None:
    """Wait until every worker is ready, then tell all of them to go before reading any answer."""
    for worker in racers:
        assert worker.line() == "ready"
    for worker in racers:
        worker.proc.stdin.write("go\n")
        worker.proc.stdin.flush()


def holding(workers: list[Worker], output: str, run_id: str, **kw) -> Worker:
    """A worker process that holds the lease."""
    worker = Worker(output, run_id, **kw)
    workers.append(worker)
    start([worker])
    assert json.loads(worker.line()) == {"won": True}
    return worker


def race(workers: list[Worker], output: str, prefix: str, **kw) -> list[dict]:
    """Start RACERS workers, let them all acquire at once, and return what each got."""
    racers = [Worker(output, f"{prefix}-{i}", **kw) for i in range(RACERS)]
    workers.extend(racers)
    start(racers)
    return [json.loads(worker.line()) for worker in racers]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {WAIT_S:g} s")
        time.sleep(0.1)


def test_racing_processes_exactly_one_wins(output, workers):
    results = race(workers, output, "fresh")
    winners = [i for i, r in enumerate(results) if r["won"]]
    assert len(winners) == 1, results
    winner = workers[winners[0]].run_id
    assert lease.holder(output).run_id == winner
    for result in results:
        if not result["won"]:
            assert f"run {winner} on host {socket.gethostname()} is writing here (lease renewed" in result["error"]
            assert result["error"].endswith("wait for it or use another --output")
    assert workers[winners[0]].send("release") == {"released": True}
    assert lease.holder(output) is None


def test_a_killed_holders_lease_goes_stale_and_exactly_one_racer_takes_it_over(output, backend, workers):
    kw = {"heartbeat_s": HEARTBEAT[backend], "beats": STALE_BEATS[backend]}
    dead = holding(workers, output, "dead", **kw)
    dead.proc.send_signal(signal.SIGKILL)  # dies holding it: no release
    dead.proc.wait(timeout=WAIT_S)
    stale_after = kw["heartbeat_s"] * kw["beats"]
    assert lease.holder(output).run_id == "dead"
    wait_until(lambda: lease.holder(output).age_s >= stale_after, "stale")

    results = race(workers, output, "taker", **kw)
    winners = [i for i, r in enumerate(results) if r["won"]]
    assert len(winners) == 1, results
    winner = workers[1 + winners[0]]
    assert lease.holder(output).run_id == winner.run_id
    assert all(f"run {winner.run_id} on host" in r["error"] for r in results if not r["won"])
    assert winner.send("check") == {"lost": False, "reason": None}
    if backend == "local":  # the takeover's claim files are gone: nothing piles up in runs/
        assert sorted(os.listdir(os.path.join(output, "runs"))) == [".lease.json"]


def test_a_frozen_holder_finds_its_lease_lost_and_its_release_keeps_the_successors(output, backend, workers):
    kw = {"heartbeat_s": HEARTBEAT[backend], "beats": STALE_BEATS[backend]}
    frozen = holding(workers, output, "frozen", **kw)
    os.kill(frozen.proc.pid, signal.SIGSTOP)  # a VM pause: the process lives but renews nothing
    try:
        wait_until(lambda: lease.holder(output).age_s >= kw["heartbeat_s"] * kw["beats"], "stale")
        successor = lease.acquire(output, "successor", heartbeat_s=kw["heartbeat_s"], stale_heartbeats=kw["beats"])
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    try:
        def lost() -> bool:
            return frozen.send("check")["lost"]

        wait_until(lost, "lost by the frozen holder")
        reason = frozen.send("check")["reason"]
        assert reason.startswith("taken over by run successor on host"), reason
        assert frozen.send("release") == {"released": True}
        assert lease.holder(output).run_id == "successor"  # the loser's release left it alone
        successor.check()  # still ours
        assert not successor.lost
    finally:
        successor.release()
    assert lease.holder(output) is None


def test_live_lease_refused_in_process_then_released_and_reacquired(output):
    with lease.acquire(output, "first") as first:
        with pytest.raises(InputError) as refused:
            lease.acquire(output, "second")
        message = str(refused.value)
        assert message.startswith(f"{output}: run first on host {socket.gethostname()} is writing here (lease renewed ")
        assert message.endswith(" s ago); wait for it or use another --output")
        assert first.renew() and not first.lost
        first.check()
    assert lease.holder(output) is None
    second = lease.acquire(output, "second")
    assert lease.holder(output).run_id == "second"
    second.release()
    second.release()  # idempotent
    assert lease.holder(output) is None


def test_check_raises_once_the_lease_is_lost(tmp_path):
    output = str(tmp_path / "out")
    held = lease.acquire(output, "mine", heartbeat_s=lease.HEARTBEAT_S)
    os.unlink(lease.lease_uri(output))  # someone removed it by hand
    assert not held.renew()
    with pytest.raises(InputError, match="this run \\(mine\\) lost its lease .*the lease file was deleted"):
        held.check()
    held.release()
    assert not os.path.exists(lease.lease_uri(output))


def test_bad_settings_and_stores_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="at least 2 heartbeats"):
        lease.acquire(str(tmp_path), "r", heartbeat_s=1.0, stale_heartbeats=1)
    with pytest.raises(InputError, match="needs a local folder, file:// or s3://"):
        lease.acquire("memory://somewhere/out", "r")
