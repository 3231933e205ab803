"""A case's time limit (`--case-timeout-s`): a stage still running at the case's deadline is
interrupted and the case becomes an error row, so a stalled S3 stream or a decode that never ends
cannot hold a task, an actor or the run forever.

The limit is a POSIX interval timer (SIGALRM) around each stage, set to what is left of the case's
time: it interrupts a blocking read where a watchdog thread could not (fsspec's synchronous calls
wait for their event loop in one-second slices, which a signal breaks). `CaseTimeout` derives from
BaseException so that no library's `except Exception` retry loop swallows it. Off the main thread
(where signals cannot be delivered) or on a platform without SIGALRM, stages run unlimited and the
storage timeouts alone bound a stalled read.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class CaseTimeout(BaseException):
    """The case ran past its deadline."""


def deadline(timeout_s: float | None, start: float | None = None) -> float | None:
    """The wall-clock time (`time.time()`) by which a case started at `start` must be finished."""
    return None if timeout_s is None else (time.time() if start is None else start) + timeout_s


def _can_interrupt() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(until: float | None, timeout_s: float | None) -> Iterator[None]:
    """Raise `CaseTimeout` in the body if it is still running at `until` (None: no limit).

    `timeout_s`, the case's whole limit, only words the message ("timed out after 600 s").
    """
    if until is None or not _can_interrupt():
        yield
        return
    message = f"timed out after {timeout_s:g} s (--case-timeout-s)"
    left = until - time.time()
    if left <= 0:
        raise CaseTimeout(message)

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
