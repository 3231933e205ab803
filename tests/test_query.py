"""`resdsn metrics`: summaries equal the numbers pandas computes from the Parquet files
themselves; SQL over a local output and over s3:// (moto's server); output formats; bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from metrics_output import CV_RUNS, RUN_A, RUN_B, RUN_OTHER_CV, build_output
from resdsn_ray import query
from resdsn_ray.cli import main
from resdsn_ray.errors import InputError

FINISHED = ["ok", "no_organ"]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_output(tmp_path_factory.mktemp("metrics") / "out")


@pytest.fixture
def s3_output(output: Path, s3_bucket: str) -> str:
    """The same output copied to a bucket on the moto server."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(output) + "/", f"{s3_bucket}/out/", recursive=True)
    return f"{s3_bucket}/out"


def file_rows(output: Path) -> pd.DataFrame:
    """Every row, read by pandas file by file (not through resdsn_ray)."""
    files = sorted(output.glob("metrics/run_id=*/*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def current(frame: pd.DataFrame) -> pd.DataFrame:
    """Each case's latest non-skipped row per mode."""
    kept = frame[frame.status != "skipped"].sort_values(["finished_at", "attempt", "run_id"])
    return kept.groupby(["case_id", "mode"]).tail(1)


def expected_summary(frame: pd.DataFrame, by: str = "mode", run: str | None = None) -> dict[tuple, dict]:
    if run:
        frame = frame[frame.run_id.str.startswith(run)]
    skipped = frame[frame.status == "skipped"].drop_duplicates(["case_id", "mode"])
    rows = pd.concat([current(frame), skipped])
    rows["fold"] = rows.fold.map(lambda f: None if pd.isna(f) else int(f)) if by == "fold" else None
    result = {}
    for (fold, mode), group in rows.groupby(["fold", "mode"], dropna=False):
        fin = group[group.status.isin(FINISHED)]
        result[(None if pd.isna(fold) else int(fold), mode)] = {
            "finished": len(fin), "with_dsc": int(fin.dsc.notna().sum()),
            "dsc_mean": fin.dsc.mean(), "dsc_std": fin.dsc.std(), "dsc_max": fin.dsc.max(), "dsc_min": fin.dsc.min(),
            "hd95_mean": fin.hd95_mm.mean(), "nsd_mean": fin.nsd_2mm.mean(), "time_mean": fin.t_total_s.mean(),
            **{status: int((group.status == status).sum()) for status in ("ok", "no_organ", "error", "skipped")},
        }
    return result


def actual_summary(summary: query.Summary) -> dict[tuple, dict]:
    nan = lambda v: math.nan if v is None else v  # noqa: E731 -- pandas' "no value"
    return {(g["fold"], g["mode"]): {k: nan(v) for k, v in g.items() if k not in ("fold", "mode")} for g in summary.as_dicts()}


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], nan_ok=True, rel=1e-12), key


def test_summary_per_mode_equals_pandas(output: Path) -> None:
    summary = query.summary(str(output))
    assert_same(actual_summary(summary), expected_summary(file_rows(output)))
    c2f, coarse = summary.groups
    assert (c2f.mode, coarse.mode) == ("c2f", "coarse")
    # case 4: no_organ in run A, then an error in run B (its latest); cases 0-3 reused by run B
    assert (c2f.ok, c2f.no_organ, c2f.error, c2f.skipped) == (12, 0, 1, 4)
    assert c2f.with_dsc == 11  # case 6 has no label: ok, metrics null
    assert (coarse.ok, coarse.with_dsc) == (13, 12)


def test_summary_per_fold_equals_pandas(output: Path) -> None:
    summary = query.summary(str(output), by="fold")
    assert_same(actual_summary(summary), expected_summary(file_rows(output), by="fold"))
    assert [(g.fold, g.mode) for g in summary.groups] == [
        (0, "c2f"), (0, "coarse"), (1, "c2f"), (1, "coarse"), (None, "c2f"), (None, "coarse")]


@pytest.mark.parametrize("run", ["cv7", "cv", "cv7-fold1", RUN_B, RUN_A])
def test_summary_of_runs_by_prefix(output: Path, run: str) -> None:
    frame = file_rows(output)
    for by in ("mode", "fold"):
        assert_same(actual_summary(query.summary(str(output), run=run, by=by)), expected_summary(frame, by=by, run=run))


def test_run_prefix_selects_a_cross_validation(output: Path) -> None:
    """cv8 re-ran case 10 later: it is the case's result over all runs, not within cv7."""
    frame = file_rows(output)
    cv7 = query.summary(str(output), run="cv7", by="fold").groups[0]
    later = frame[frame.run_id == RUN_OTHER_CV].dsc.iloc[0]
    cv7_rows = frame[frame.run_id == CV_RUNS[0]]
    assert cv7.dsc_min == pytest.approx(cv7_rows.dsc.min())
    assert cv7.dsc_min != pytest.approx(later)
    assert query.summary(str(output), by="fold").groups[0].dsc_min == pytest.approx(later)
    rerun = query.summary(str(output), run=RUN_B).groups[0]
    assert (rerun.ok, rerun.error, rerun.skipped, rerun.with_dsc) == (1, 1, 4, 1)


def test_summary_text_is_the_papers_layout(output: Path) -> None:
    summary = query.summary(str(output))
    c2f = summary.groups[0]
    lines = summary.text().splitlines()
    assert lines[1].split()[:5] == ["Method", "n", "Mean", "DSC", "Max"]
    row = next(line for line in lines if line.startswith("ResDSN C2F"))
    assert f"{100 * c2f.dsc_mean:.2f} ± {100 * c2f.dsc_std:.2f} %" in row
    assert f"{100 * c2f.dsc_max:.2f} %" in row and f"{c2f.time_mean:.1f}" in row
    assert next(line for line in lines if line.startswith("ResDSN Coarse"))


def test_bad_summary_input(output: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no run 'nope'.*cv7-fold0-c2f"):
        query.summary(str(output), run="nope")
    with pytest.raises(InputError, match="no metrics rows"):
        query.summary(str(tmp_path))
    with pytest.raises(InputError, match="--by"):
        query.summary(str(output), by="node")


def test_cli_summary(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "summary", str(output), "--by", "fold", "--run", "cv7"]) == 0
    assert capsys.readouterr().out == query.summary(str(output), run="cv7", by="fold").text()
    assert main(["metrics", "summary", str(output), "--run", "nope"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {output}: no run 'nope'")


@pytest.mark.s3
def test_sql_over_s3_equals_pandas(output: Path, s3_output: str, tmp_path: Path) -> None:
    frame = file_rows(output)
    latest = current(frame)

    counts = pd.read_csv(io.StringIO(query.query(
        s3_output, "SELECT run_id, count(*) AS n FROM metrics GROUP BY run_id ORDER BY run_id", fmt="csv")))
    folders = sorted(p.name.removeprefix("run_id=") for p in (output / "metrics").iterdir())
    assert counts.run_id.tolist() == folders  # the files' run_id column is the hive partition
    assert counts.n.tolist() == frame.groupby("run_id").size().sort_index().tolist()

    worst = json.loads(query.query(
        s3_output, "SELECT case_id, mode, dsc FROM latest WHERE dsc IS NOT NULL ORDER BY dsc LIMIT 3", fmt="json"))
    expected = latest.dropna(subset=["dsc"]).nsmallest(3, "dsc")
    assert [(r["case_id"], r["mode"]) for r in worst] == list(zip(expected.case_id, expected["mode"]))
    assert [r["dsc"] for r in worst] == expected.dsc.tolist()

    sql = ("SELECT f.case_id, f.dsc AS c2f, c.dsc AS coarse FROM latest f JOIN latest c USING (case_id) "
           "WHERE f.mode = 'c2f' AND c.mode = 'coarse' AND f.dsc < c.dsc ORDER BY f.case_id")
    out = f"{s3_output}/answers/worse.parquet"
    assert query.query(s3_output, sql, fmt="parquet", out=out) is None
    worse = pd.read_parquet(out)
    both = latest[latest["mode"] == "c2f"].merge(latest[latest["mode"] == "coarse"], on="case_id", suffixes=("_f", "_c"))
    expected = both[both.dsc_f < both.dsc_c].sort_values("case_id")
    assert worse.case_id.tolist() == expected.case_id.tolist() and len(worse) > 0
    assert worse.c2f.tolist() == expected.dsc_f.tolist()

    table = query.query(s3_output, "SELECT node, sum(t_total_s) AS seconds, count(*) AS n FROM metrics "
                                   "WHERE t_total_s IS NOT NULL GROUP BY node ORDER BY node")
    lines = table.splitlines()
    assert lines[0].split() == ["node", "seconds", "n"] and set(lines[1]) == {"-", " "}
    timed = frame.dropna(subset=["t_total_s"]).groupby("node").t_total_s.agg(["sum", "size"])
    assert [line.split() for line in lines[2:]] == [[node, f"{s:.6g}", str(n)] for node, s, n in timed.itertuples()]


def test_query_formats_and_types(output: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT case_id, shape, finished_at, dsc FROM metrics WHERE run_id = 'cv7-fold0-c2f' ORDER BY case_id"
    expected = file_rows(output).query("run_id == 'cv7-fold0-c2f'").sort_values("case_id")
    records = json.loads(query.query(str(output), sql, fmt="json"))
    assert [r["shape"] for r in records] == [list(s) for s in expected["shape"]]
    assert [pd.Timestamp(r["finished_at"]) for r in records] == expected.finished_at.tolist()
    assert records[0]["finished_at"].endswith("+00:00")
    assert main(["metrics", "query", str(output), sql, "--format", "csv", "--out", str(tmp_path / "a.csv")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'a.csv'}\n"
    back = pd.read_csv(tmp_path / "a.csv")
    assert back.dsc.tolist() == expected.dsc.tolist()  # full precision in csv
    assert main(["metrics", "query", str(output), sql]) == 0
    assert capsys.readouterr().out == query.query(str(output), sql)


@pytest.mark.parametrize(
    ("sql", "extra", "message"),
    [
        ("SELEC case_id FROM metrics", [], "syntax error"),
        ("SELECT no_such_column FROM metrics", [], "no_such_column"),
        ("SELECT 1", ["--format", "parquet"], "needs an output file"),
    ],
)
def test_cli_bad_query_exits_2(output: Path, sql: str, extra: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "query", str(output), sql, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err


def test_query_of_an_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "query", str(tmp_path), "SELECT 1"]) == 2
    assert "no metrics rows" in capsys.readouterr().err
