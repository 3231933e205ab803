"""Progress where work is long: whole lines with rate and ETA in a log, one line rewritten in place
on a terminal; `resdsn segment` shows each stage's windows on stderr (its stdout stays the
result), `--quiet` silences it, `--fast` runs `config.FAST_ENGINE`'s windows; the archive job's
progress lines carry an ETA."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from resdsn_ray import cli
from resdsn_ray.bundle import save_bundle
from resdsn_ray.config import FAST_ENGINE, ModelConfig
from resdsn_ray.model import build_model
from resdsn_ray.pipeline import _Progress
from resdsn_ray.progress import Progress, WindowProgress, duration, eta
from resdsn_ray.windows import plan_windows

SHAPE = (32, 32, 16)
PATCH = 16


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as sys.stderr does in a shell."""

    def isatty(self) -> bool:
        return True


def test_durations_and_eta_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
    assert eta(0, 10, 5.0) == "?" and eta(5, 10, 10.0) == "10s" and eta(10, 10, 3.0) == "0s"


def test_log_lines_carry_rate_and_eta_then_one_closing_line():
    out = io.StringIO()
    progress = Progress("coarse stage", 4, "windows", every_s=0, stream=out)
    for done in range(1, 5):
        progress.update(done)
    progress.update(4)  # a second completion adds nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert re.fullmatch(r"coarse stage: 1/4 windows \(25%\), [\d.]+ windows/s, ETA \S+", lines[0]), lines[0]
    assert re.fullmatch(r"coarse stage: 4 windows in \d+s \([\d.]+ windows/s\)", lines[-1]), lines[-1]


def test_log_lines_wait_for_their_interval():
    out = io.StringIO()
    progress = Progress("fine stage", 100, "windows", every_s=3600, stream=out)
    for done in range(1, 101):
        progress.update(done)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("fine stage: 100 windows in ")


def test_a_terminal_gets_one_line_rewritten_in_place():
    out = Terminal()
    progress = Progress("coarse stage", 3, "windows", stream=out)
    progress.last -= 1  # the redraw interval has passed
    progress.update(1)
    progress.update(3)
    text = out.getvalue()
    assert text.startswith("\rcoarse stage: 1/3 windows") and text.count("\r") == 2 and "\x1b[K" in text
    assert text.endswith("\n") and text.count("\n") == 1  # later output starts below the finished line


def test_each_stage_gets_its_own_progress():
    out = io.StringIO()
    told = WindowProgress(stream=out, every_s=3600)
    for done in (2, 4):
        told("coarse", done, 4)
    for done in (1, 2, 3):
        told("fine", done, 3)
    assert [line.split(" in ")[0] for line in out.getvalue().splitlines()] == ["coarse stage: 4 windows",
                                                                               "fine stage: 3 windows"]


def test_archive_progress_lines_carry_an_eta():
    lines: list[str] = []
    progress = _Progress(3, every=0, say=lines.append)
    progress.update({"status": "ok"})
    progress.report(final=True)
    assert re.search(r"^progress: 1/3 segmented \(ok 1\), 0 failed, 2 left, [\d.]+ cases/min, ETA \S+$", lines[0])
    assert lines[-1].startswith("finished: 1/3") and "ETA" not in lines[-1]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A small phantom and tiny seeded bundles: the `segment` arguments that name them."""
    root = tmp_path_factory.mktemp("progress")
    assert cli.main(["synth", str(root / "archive"), "--cases", "1", "--seed", "5", "--shape", *map(str, SHAPE)]) == 0
    torch.manual_seed(0)
    for stage in ("coarse", "fine"):
        save_bundle(str(root / stage), build_model("resdsn", width=4), ModelConfig(width=4, patch=PATCH), stage)
    return [str(root / "archive" / "imagesTr" / "case_0000.nii.gz"), "--coarse", str(root / "coarse"),
            "--fine", str(root / "fine")]


def test_segment_shows_each_stages_windows_on_stderr_and_fast_uses_fewer(case, tmp_path, capsys):
    capsys.readouterr()
    # --fast's coarse windows; a given --n-fine still counts
    assert cli.main(["segment", *case, "--out", str(tmp_path / "m.nii.gz"), "--fast", "--n-fine", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)  # stdout is the row alone
    assert row["coarse_windows"] == len(plan_windows(SHAPE, PATCH, FAST_ENGINE.coarse.n)) == 4
    assert row["status"] == "ok" and row["fine_windows"] == len(plan_windows(SHAPE, PATCH, 0))  # the whole volume
    assert "coarse stage: 4 windows in " in err and f"fine stage: {row['fine_windows']} windows in " in err


def test_segment_quiet_prints_the_result_only(case, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["segment", *case, "--out", str(tmp_path / "m.nii.gz"), "--fast", "--n-fine", "0", "--quiet",
                     "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["status"] == "ok"


def test_quiet_is_one_flag_of_segment_archive_and_train():
    parser = cli.build_parser()
    for argv in (["segment", "x.nii.gz", "--out", "m.nii.gz"], ["archive"], ["train", "--stage", "fine", "--output", "o"]):
        assert parser.parse_args([*argv, "--quiet"]).quiet and not parser.parse_args(argv).quiet
