"""The archive driver's refusals before any work starts (no Ray needed): one writer per output,
and a run id is never reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from resdsn_ray import lease, runs
from resdsn_ray.config import ArchiveJob
from resdsn_ray.errors import InputError
from resdsn_ray.pipeline import run_archive
from resdsn_ray.synthetic import write_archive


@pytest.fixture
def archive(tmp_path: Path) -> str:
    write_archive(str(tmp_path / "archive"), cases=1, seed=1, shape=(32, 32, 16))
    return str(tmp_path / "archive")


def test_a_second_run_on_an_output_being_written_is_refused(tmp_path: Path, archive: str):
    output = str(tmp_path / "out")
    job = ArchiveJob(input=archive, output=output, coarse=None, fine=None, lease_heartbeat_s=0.5)
    with lease.acquire(output, "the-first-run", heartbeat_s=0.5):
        lines: list[str] = []
        with pytest.raises(InputError, match="run the-first-run on host .* is writing here"):
            run_archive(job, say=lines.append)  # waits at most 5 heartbeats for a stale hold, then refuses
        assert any("waiting for the lease of run the-first-run" in line for line in lines)
    assert lease.holder(output) is None  # released by its holder


def test_a_run_id_is_never_reused(tmp_path: Path, archive: str):
    output = str(tmp_path / "out")
    runs.write_run_record(output, "r1", {"run_id": "r1", "status": "finished"})
    with pytest.raises(InputError, match="--run-id: 'r1' is a run of"):
        run_archive(ArchiveJob(input=archive, output=output, coarse=None, fine=None, run_id="r1"))
