"""Progress of long work: how much is done out of a total, at what rate, and the time left.

One set of numbers, two renderings: on a terminal, one line rewritten in place; anywhere else
(`ray job logs`, a CI log, a file) a whole line every `every_s` seconds and one at the end,
since a log cannot rewrite a line. Compute core: no Ray, so `resdsn segment` shows it on a
bare torch box.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from resdsn_ray.config import PROGRESS_EVERY_S

TTY_EVERY_S = 0.2  # a terminal line is redrawn at most this often: enough to look live, cheap


def duration(seconds: float) -> str:
    """A short human duration: `42s`, `3m05s`, `1h02m`."""
    whole = max(0, int(round(seconds)))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def eta(done: float, total: float, seconds: float) -> str:
    """The time left to reach `total` at the rate so far; '?' before anything is done."""
    if done <= 0 or seconds <= 0:
        return "?"
    return duration((total - done) * seconds / done)


class Progress:
    """`done` of `total` `unit`s of `what`, reported with rate and ETA; the last line on completion."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = PROGRESS_EVERY_S,
                 stream: TextIO | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = TTY_EVERY_S if self.tty else every_s
        self.start = self.last = time.monotonic()
        self.done = 0
        self.finished = False

    def update(self, done: int) -> None:
        """Record `done` units; report when due, and finish once `done` reaches the total."""
        self.done = done
        if done >= self.total:
            self.finish()
        elif time.monotonic() - self.last >= self.every_s:
            self._show(self.line())

    def line(self) -> str:
        seconds = time.monotonic() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        if self.finished:
            return f"{self.what}: {self.done} {self.unit} in {duration(seconds)} ({rate:.1f} {self.unit}/s)"
        share = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate:.1f} {self.unit}/s, "
                f"ETA {eta(self.done, self.total, seconds)}")

    def finish(self) -> None:
        """The closing line (once); on a terminal it stays, and later output starts below it."""
        if not self.finished:
            self.finished = True
            self._show(self.line())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _show(self, text: str) -> None:
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.last = time.monotonic()


class WindowProgress:
    """The engine's progress callback `(stage, windows done, windows of the stage)`: one `Progress`
    per stage, since the fine stage's total is known only once the coarse stage has found the box."""

    def __init__(self, stream: TextIO | None = None, every_s: float = PROGRESS_EVERY_S) -> None:
        self.stream, self.every_s = stream, every_s
        self.stages: dict[str, Progress] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.stages:
            self.stages[stage] = Progress(f"{stage} stage", total, "windows", self.every_s, self.stream)
        self.stages[stage].update(done)
