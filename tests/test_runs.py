"""Resume bookkeeping: what earlier rows and masks under one output say is done, per mode; and
each case's current row."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from resdsn_ray import query, runs, volumes
from resdsn_ray.pipeline import this_runs_cases

T0 = datetime(2026, 11, 27, tzinfo=timezone.utc)


def _row(case: str, mode: str, status: str, config: str, minute: int, run: str = "r1") -> dict:
    return {"run_id": run, "case_id": case, "mode": mode, "status": status, "config_id": config, "attempt": 1,
            "finished_at": T0 + timedelta(minutes=minute)}


def _mask(output: Path, case: str, mode: str, config: str, run: str = "r1", attempt: int = 1) -> None:
    """A real mask stamped as the attempt (config, run, attempt) writes it."""
    like = volumes.Volume(array=np.zeros((4, 4, 2), np.float32), affine=np.eye(4), source=case)
    volumes.write_mask(runs.mask_uri(str(output), case, mode), np.zeros((4, 4, 2), np.uint8), like,
                       description=runs.mask_stamp(config, run, attempt))


def test_each_mode_keeps_its_own_masks_and_done_cases(tmp_path: Path):
    out = tmp_path / "out"
    assert runs.mask_uri(str(out), "a", "c2f") == str(out / "masks" / "a.nii.gz")
    assert runs.mask_uri(str(out), "a", "coarse") == str(out / "masks" / "coarse" / "a.nii.gz")
    runs.write_rows(str(out), "r1", 0, [_row("a", "c2f", "ok", "C", 0), _row("a", "coarse", "ok", "K", 1),
                                        _row("b", "coarse", "ok", "K", 2)])
    for case, mode, config in (("a", "c2f", "C"), ("a", "coarse", "K"), ("b", "coarse", "K")):
        _mask(out, case, mode, config)
    c2f, coarse = runs.History.load(str(out), "c2f"), runs.History.load(str(out), "coarse")
    # The coarse-only row written after the C2F one does not make the C2F result stale.
    assert c2f.is_done("a", "C") and not c2f.is_done("b", "C")
    assert coarse.is_done("a", "K") and coarse.is_done("b", "K")
    assert not coarse.is_done("a", "C")  # other settings: recompute
    assert runs.existing_files(str(out), "mask", "c2f") == {"a"}  # the mode folders are not cases


def test_a_later_failure_or_a_missing_mask_means_not_done(tmp_path: Path):
    out = tmp_path / "out"
    runs.write_rows(str(out), "r1", 0, [_row("a", "c2f", "ok", "C", 0), _row("b", "c2f", "ok", "C", 1)])
    runs.write_rows(str(out), "r2", 0, [_row("a", "c2f", "error", "C", 5, run="r2")])
    _mask(out, "a", "c2f", "C")  # b's mask is missing (never written, or removed)
    history = runs.History.load(str(out), "c2f")
    assert not history.is_done("a", "C") and not history.is_done("b", "C")
    assert history.next_attempt("a") == 2


def test_a_mask_written_by_another_attempt_is_not_trusted(tmp_path: Path):
    """A crashed run with other settings overwrote the mask but left no row: recompute, never skip."""
    out = tmp_path / "out"
    runs.write_rows(str(out), "r1", 0, [_row("a", "c2f", "ok", "C", 0), _row("b", "c2f", "ok", "C", 1)])
    _mask(out, "a", "c2f", "C")
    _mask(out, "b", "c2f", "OTHER", run="r2", attempt=2)  # the crashed attempt's mask
    history = runs.History.load(str(out), "c2f")
    assert history.is_done("a", "C") and not history.is_done("b", "C")


def test_latest_rows_are_per_case_and_mode(tmp_path: Path):
    out = tmp_path / "out"
    runs.write_rows(str(out), "r1", 0, [_row("a", "c2f", "error", "C", 0), _row("a", "coarse", "ok", "K", 1),
                                        _row("a", "c2f", "ok", "C", 2, run="r2"),
                                        _row("a", "c2f", "skipped", "C", 3, run="r3")])
    rows = runs.read_rows(str(out))
    latest = query.latest(rows)
    assert [(r["mode"], r["status"], r["run_id"]) for r in latest] == [("c2f", "ok", "r2"), ("coarse", "ok", "r1")]
    assert [r["mode"] for r in query.latest(this_runs_cases(rows, [{"case_id": "a"}], "coarse"))] == ["coarse"]
