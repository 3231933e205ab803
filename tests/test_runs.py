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
    assert [r["mode"] for r in query.latest(this_runs_cases(rows, "r3", "coarse"))] == ["coarse"]


def _history_by_rows(rows: list[dict], masks: set[str], mode: str) -> tuple[dict[str, int], dict[str, dict]]:
    """The resume rules walked row by row in finish order (the reference the column code must match)."""
    attempts: dict[str, int] = {}
    done: dict[str, dict] = {}
    ordered = sorted(rows, key=lambda r: (r["finished_at"] is None, r["finished_at"] or T0))  # stable, nulls last
    for row in ordered:
        if row["status"] == "skipped" or row["mode"] != mode:
            continue
        case = row["case_id"]
        attempts[case] = max(attempts.get(case, 0), row["attempt"] or 0)
        if row["status"] in ("ok", "no_organ") and case in masks:
            done[case] = row
        else:
            done.pop(case, None)
    return attempts, done


def test_history_on_columns_answers_as_the_rows_say(tmp_path: Path):
    """A tricky history (ties in finish time, null attempts and times, skipped rows, other modes,
    missing masks, several parts and runs): the same done rows and next attempts as walking it."""
    rng = np.random.default_rng(3)
    cases, statuses, modes = [f"c{i}" for i in range(40)], ["ok", "no_organ", "error", "skipped"], ["c2f", "coarse"]
    written = []
    for part in range(6):
        rows = []
        for _ in range(60):
            minute = int(rng.integers(0, 8))  # few distinct times: many ties, settled by write order
            row = _row(str(rng.choice(cases)), str(rng.choice(modes)), str(rng.choice(statuses)), str(rng.choice(["C", "K"])),
                       minute, run=f"r{part}")
            row["attempt"] = None if rng.random() < 0.1 else int(rng.integers(1, 5))
            row["finished_at"] = None if rng.random() < 0.05 else row["finished_at"]
            row["done_in_run"] = "r0" if rng.random() < 0.2 else None
            rows.append(row)
        runs.write_rows(str(tmp_path), f"r{part}", 0, rows)
        written += rows
    masks = {c for c in cases if rng.random() < 0.8}
    table = runs.read_rows(str(tmp_path))
    for mode in modes:
        attempts, done = _history_by_rows(written, masks, mode)
        history = runs.History(table, {"mask": masks}, mode)
        for case in cases:
            assert history.next_attempt(case) == attempts.get(case, 0) + 1, case
            for config in ("C", "K"):
                want = done.get(case) if done.get(case, {}).get("config_id") == config else None
                got = history.done_row(case, config)
                assert (got and (got["run_id"], got["status"], got["attempt"], got["finished_at"])) == \
                    (want and (want["run_id"], want["status"], want["attempt"], want["finished_at"])), (mode, case)
        assert sum(history.done_row(c, k) is not None for c in cases for k in "CK") == len(done) > 5
