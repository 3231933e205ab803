"""The archive driver without Ray: its refusals before any work starts (one writer per output, a
run id is never reused), the plan of a run as Arrow tables, and a row writer that keeps no rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from resdsn_ray import lease, runs, storage
from resdsn_ray.archive import Case, list_cases
from resdsn_ray.config import ArchiveJob, OutputConfig
from resdsn_ray.errors import InputError
from resdsn_ray.config import Resources
from resdsn_ray.pipeline import (
    BLOCK_BYTES,
    BLOCKS_PER_ACTOR,
    MAX_BLOCKS,
    PLAN_CHUNK,
    RunResult,
    _RowWriter,
    block_size,
    plan_run,
    run_archive,
    typical_bytes,
)
from resdsn_ray.provenance import utc_now
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


def test_the_writer_keeps_counts_only_and_the_result_reads_the_run_back_in_order(tmp_path: Path):
    output = str(tmp_path / "out")
    runs.write_rows(output, "other", 0, [{"run_id": "other", "case_id": "x", "status": "ok"}])  # another run's row
    job = ArchiveJob(input="unused", output=output, coarse=None, fine=None, flush_rows=3)
    writer = _RowWriter(job, "r1", None)
    written = [{"run_id": "r1", "case_id": f"c{i}", "status": "error" if i % 3 else "ok", "attempt": 1,
                "shape": [4, 4, 2], "finished_at": utc_now()} for i in range(7)]
    for row in written:
        writer.add(row)
    assert len(writer.parts) == 2 and len(writer.pending) == 1  # nothing beyond the unflushed part
    assert not [name for name, value in vars(writer).items() if isinstance(value, list) and len(value) > job.flush_rows]
    writer.flush()
    assert writer.counts == {"ok": 3, "error": 4}
    rows = RunResult(run_id="r1", output=output, counts=dict(writer.counts), seconds=0.0, record={}).rows
    assert [(r["case_id"], r["status"], r["shape"], r["finished_at"]) for r in rows] == \
        [(r["case_id"], r["status"], r["shape"], r["finished_at"]) for r in written]


def test_the_plan_sorts_cases_into_arrow_tables_by_what_they_need(tmp_path: Path):
    """More cases than one conversion chunk: rejected at listing, done (skipped), done but lacking
    an asked preview (complete), and to segment with the next attempt number."""
    output = str(tmp_path / "out")
    n = PLAN_CHUNK + 10
    cases = [Case(f"c{i:05d}", f"/data/c{i:05d}.nii.gz", error="listing says no" if i % 5 == 0 else None) for i in range(n)]
    done = {c.case_id for i, c in enumerate(cases) if i % 5 in (1, 2)}
    history_rows = [{"run_id": "r0", "case_id": case, "status": "ok", "attempt": 2, "mode": "c2f", "config_id": "C",
                     "finished_at": utc_now()} for case in sorted(done)]
    history_rows += [{"run_id": "r0", "case_id": cases[3].case_id, "status": "error", "attempt": 4, "mode": "c2f",
                      "config_id": "C", "finished_at": utc_now()}]
    previews = {c.case_id for i, c in enumerate(cases) if i % 5 == 1}
    history = runs.History(runs.row_table(history_rows), {"mask": done, "preview": previews})
    job = ArchiveJob(input="unused", output=output, coarse=None, fine=None, outputs=OutputConfig(preview=True))
    base = {"run_id": "r1", "coarse_model": "k", "fine_model": "f", "config_id": "C", "mode": "c2f", "fold": None,
            "demo_models": False}
    plan = plan_run(cases, job, base, history)
    by_status = plan.immediate.group_by("status").aggregate([("case_id", "count")]).to_pylist()
    assert sorted((r["status"], r["case_id_count"]) for r in by_status) == \
        [("error", sum(i % 5 == 0 for i in range(n))), ("skipped", len(previews))]
    assert plan.immediate.schema == runs.ROW_SCHEMA
    assert plan.complete["case_id"].to_pylist() == sorted(done - previews)
    assert plan.complete["to_write"].to_pylist() == [["preview"]] * len(done - previews)
    assert set(plan.complete["done_in_run"].to_pylist()) == {"r0"} and set(plan.complete["run_id"].to_pylist()) == {"r1"}
    todo = plan.todo.to_pylist()
    assert [r["case_id"] for r in todo] == [c.case_id for i, c in enumerate(cases) if i % 5 in (3, 4)]
    assert todo[0] == {**base, "case_id": "c00003", "image_uri": "/data/c00003.nii.gz", "series_uid": "", "label_uri": "",
                       "mask_uri": runs.mask_uri(output, "c00003"), "seg_uri": None, "probabilities_uri": None,
                       "preview_uri": runs.file_uri(output, "preview", "c00003"), "to_write": ["mask", "preview"],
                       "attempt": 5}
    assert {r["attempt"] for r in todo[1:]} == {1}


def _rows(uris: list[str], n: int) -> pa.Table:
    return pa.table({"case_id": [str(i) for i in range(n)], "image_uri": [uris[i % len(uris)] for i in range(n)]})


def _job(**resources) -> ArchiveJob:
    return ArchiveJob(input="unused", output="unused", coarse=None, fine=None, resources=Resources(**resources))


def test_cases_of_real_size_hold_a_block_each_until_there_are_too_many_blocks(tmp_path: Path):
    big = tmp_path / "big.nii.gz"
    big.write_bytes(bytes(BLOCK_BYTES + 1))
    sizes = {n: block_size(_job(coarse_actors=2), _rows([str(big)], n))
             for n in (1, MAX_BLOCKS, MAX_BLOCKS + 1, 50 * MAX_BLOCKS)}
    assert sizes == {1: 1, MAX_BLOCKS: 1, MAX_BLOCKS + 1: 2, 50 * MAX_BLOCKS: 50}
    assert block_size(_job(cases_per_block=8), _rows([str(big)], 1)) == 8  # as asked


def test_small_cases_share_blocks_while_every_actor_keeps_several(tmp_path: Path):
    write_archive(str(tmp_path / "tiny"), cases=4, seed=0, shape=(32, 32, 32))
    uris = [c.image_uri for c in list_cases(str(tmp_path / "tiny"))]
    typical = typical_bytes(pa.chunked_array([uris]))
    assert typical == int(np.median([Path(u).stat().st_size for u in uris])) and BLOCK_BYTES // typical > 8
    assert block_size(_job(coarse_actors=2), _rows(uris, 10)) == 1  # too few cases to share blocks
    assert block_size(_job(coarse_actors=2), _rows(uris, 600)) == 600 // (BLOCKS_PER_ACTOR * 2)  # balance first
    assert block_size(_job(coarse_actors=1), _rows(uris, 10_000)) == BLOCK_BYTES // typical  # then size
    missing = [str(tmp_path / "gone.nii.gz")]  # unsizeable: its read will say why; the blocks stay plain
    assert typical_bytes(pa.chunked_array([missing])) is None and block_size(_job(), _rows(missing, 600)) == 1


def test_a_series_folder_is_sized_by_its_files_on_s3(s3_bucket: str, ct5n_dir: Path):
    folder = f"{s3_bucket}/series"
    files = sorted(p for p in ct5n_dir.iterdir() if p.is_file())
    for path in files:
        storage.write_bytes(f"{folder}/{path.name}", path.read_bytes())
    assert storage.stored_bytes(folder) == sum(p.stat().st_size for p in files)
    assert storage.stored_bytes(f"{folder}/{files[0].name}") == files[0].stat().st_size
