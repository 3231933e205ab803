"""Real process faults for the tests: find the process behind a TCP connection and kill it, as
the kernel's OOM killer would (SIGKILL, no clean-up), from a background thread while a run goes on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


def _socket_inodes(port: int, server_port: int) -> set[str]:
    """Inodes of the TCP sockets from local `port` to remote `server_port` (IPv4 and IPv6 tables).
    Both ends count: a dead client's port is soon another connection's, which must not be killed."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (port, server_port):
                inodes.add(fields[9])
    return inodes


def pid_of_client(port: int, server_port: int) -> int | None:
    """The process holding the client end of a connection from local `port` to `server_port`, if any."""
    inodes = {f"socket:[{inode}]" for inode in _socket_inodes(port, server_port)}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return None


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_session(leader: int) -> None:
    """SIGKILL every process of the session `leader` leads: a whole local Ray node (its raylet,
    agents and workers), as when its machine is lost."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == leader:
                    os.kill(int(proc.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue


class Killer(threading.Thread):
    """Kills (`act`, default SIGKILL) whatever process `find` names, every time it names one, until
    stopped: `kills` lists the PIDs killed. Bounded: at most `limit` kills, stopped after `lifetime_s`."""

    def __init__(self, find: Callable[[], int | None], limit: int = 10, lifetime_s: float = 600.0,
                 act: Callable[[int], None] = kill) -> None:
        super().__init__(daemon=True, name="killer")
        self.find, self.limit, self.lifetime_s, self.act = find, limit, lifetime_s, act
        self.kills: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.lifetime_s
        while not self._stop_event.wait(0.2) and time.monotonic() < end and len(self.kills) < self.limit:
            pid = self.find()
            if pid is not None and pid not in self.kills:
                try:
                    self.act(pid)
                except ProcessLookupError:
                    continue
                self.kills.append(pid)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join(timeout=30)
        return self.kills
