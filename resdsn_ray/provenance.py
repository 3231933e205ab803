"""Where and when a result was made: UTC timestamps and the one provenance record.

Every record the project leaves (archive runs, trainings, bundles, cross-validations) carries
the same provenance, so a mask or a model can always be traced to the code, libraries, host
and device that made it.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("torch", "numpy", "ray", "pyarrow", "nibabel", "pydicom", "s3fs")


def utc_now(epoch: float | None = None) -> datetime:
    """The time in UTC of `epoch` seconds, or now: every timestamp the project writes is UTC."""
    return datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


def utc_iso(epoch: float | None = None) -> str:
    """ISO 8601 in UTC (`...+00:00`) of `epoch` seconds, or of now."""
    return utc_now(epoch).isoformat()


@lru_cache(maxsize=None)
def _installed(name: str) -> str | None:
    """An installed package's version; cached: it reads and parses the package's metadata file
    (~2 ms), and every finished case names the package's version."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (`-dirty` when modified) when running from a git checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def provenance(device: str | None = None) -> dict[str, Any]:
    """Package version, git commit when available, library versions, Python, host and device."""
    return {
        "resdsn_ray": _installed("resdsn_ray") or "unknown",
        "git_commit": git_commit(),
        "libraries": {name: _installed(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "device": device,
    }
