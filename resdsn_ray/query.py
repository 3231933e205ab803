"""Questions over an output's metrics rows: the paper's summary tables and free SQL.

Rows are read with `runs.read_rows` (pyarrow through the project's fsspec filesystems, so
`s3://` honours AWS_ENDPOINT_URL; DuckDB's own S3 extension would need a download) and handed
to an in-process DuckDB as two relations:
- `metrics`: every row of every attempt, with exactly `runs.ROW_SCHEMA`; `run_id` is the
  files' own column, equal to the `run_id=` folder it lies in;
- `latest`: each case's latest non-skipped row per (case_id, mode): what a case's result is
  now, the rows the summary is made of.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resdsn_ray import config, runs, storage
from resdsn_ray.config import MODES
from resdsn_ray.errors import InputError

FORMATS = ("table", "csv", "json", "parquet")
SUMMARY_BY = ("mode", "fold")
METHODS = {"c2f": "ResDSN C2F", "coarse": "ResDSN Coarse", "fine": "ResDSN Fine"}

# Ties on finished_at (or none recorded) fall to the later attempt, then the later run id.
LATEST_SQL = f"""
SELECT * EXCLUDE (_rank) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY case_id, mode
        ORDER BY finished_at DESC NULLS LAST, attempt DESC NULLS LAST, run_id DESC
    ) AS _rank
    FROM metrics WHERE status <> '{config.STATUS_SKIPPED}'
) WHERE _rank = 1
"""

_FINISHED = "status IN ({})".format(", ".join(f"'{s}'" for s in config.FINISHED))
# Skipped rows count once per (case, mode): a case a run reused instead of recomputing.
_SUMMARY_SQL = f"""
WITH skipped AS (
    SELECT DISTINCT ON (case_id, mode) * FROM metrics WHERE status = '{config.STATUS_SKIPPED}'
), considered AS (
    SELECT * FROM latest UNION ALL BY NAME SELECT * FROM skipped
)
SELECT mode, {{fold}} AS fold,
    count(*) FILTER ({_FINISHED}) AS finished,
    count(dsc) FILTER ({_FINISHED}) AS with_dsc,
    avg(dsc) FILTER ({_FINISHED}) AS dsc_mean,
    stddev_samp(dsc) FILTER ({_FINISHED}) AS dsc_std,
    max(dsc) FILTER ({_FINISHED}) AS dsc_max,
    min(dsc) FILTER ({_FINISHED}) AS dsc_min,
    avg(hd95_mm) FILTER ({_FINISHED}) AS hd95_mean,
    avg(nsd_2mm) FILTER ({_FINISHED}) AS nsd_mean,
    avg(t_total_s) FILTER ({_FINISHED}) AS time_mean,
    count(*) FILTER (status = '{config.STATUS_OK}') AS ok,
    count(*) FILTER (status = '{config.STATUS_NO_ORGAN}') AS no_organ,
    count(*) FILTER (status = '{config.STATUS_ERROR}') AS error,
    count(*) FILTER (status = '{config.STATUS_SKIPPED}') AS skipped
FROM considered GROUP BY ALL
"""


@dataclass(frozen=True)
class Group:
    """One line of a summary: a method (mode), and a fold when grouped by fold.

    DSC figures are fractions over finished cases (ok or no_organ) with a DSC; `dsc_std` is the
    sample standard deviation (None below two cases). `time_mean` is `t_total_s` per finished
    case (paper Table 5). Counts are cases; `skipped` counts cases a run reused.
    """

    mode: str | None
    fold: int | None
    finished: int
    with_dsc: int
    dsc_mean: float | None
    dsc_std: float | None
    dsc_max: float | None
    dsc_min: float | None
    hd95_mean: float | None
    nsd_mean: float | None
    time_mean: float | None
    ok: int
    no_organ: int
    error: int
    skipped: int


@dataclass(frozen=True)
class Summary:
    """Per-method results of an output in the layout of the paper's Tables 2 and 5."""

    output: str
    run: str | None
    by: str
    groups: list[Group]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(g) for g in self.groups]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and formatted lines: DSC in percent as the paper prints it."""
        fold = self.by == "fold"
        headers = ["Method", *(["Fold"] if fold else []), "n", "Mean DSC", "Max DSC", "Min DSC",
                   "HD95 mm", "NSD 2mm", "Time/case s", "ok", "no_organ", "error", "skipped"]
        lines = [
            [method_name(g.mode), *([cell(g.fold)] if fold else []), str(g.with_dsc), _dsc_mean(g), _percent(g.dsc_max),
             _percent(g.dsc_min), _fixed(g.hd95_mean, 2), _fixed(g.nsd_mean, 3), _fixed(g.time_mean, 1),
             *(str(n) for n in (g.ok, g.no_organ, g.error, g.skipped))]
            for g in self.groups
        ]
        return headers, lines

    def text(self) -> str:
        headers, lines = self.table()
        scope = f"run {self.run}*" if self.run else "all runs"
        table = render_table(headers, lines, right=range(1, len(headers)))
        return f"{self.output} ({scope}; n: finished cases with a DSC; mean ± sample std)\n{table}"


def method_name(mode: str | None) -> str:
    return METHODS.get(mode or "", f"mode {mode}")


def mode_key(mode: str | None) -> tuple[int, str]:
    """Sort key of modes: the paper's order (c2f, coarse, fine), then any other by name."""
    return (MODES.index(mode), "") if mode in MODES else (len(MODES), mode or "")


def load(output_uri: str, run: str | None = None) -> pa.Table:
    """All rows under `output_uri`, only those of runs whose id is or starts with `run` if given.

    A cross-validation's archive runs are `<cv_id>-r<invocation>-fold<k>-<mode>`, so a CV id selects them all.
    """
    rows = runs.read_rows(output_uri)
    if rows.num_rows == 0:
        raise InputError(output_uri, f"no metrics rows under {runs.metrics_uri(output_uri)}")
    if run is None:
        return rows
    keep = pc.fill_null(pc.starts_with(rows["run_id"], pattern=run), False)
    if not pc.any(keep).as_py():
        known = ", ".join(sorted(set(rows["run_id"].drop_null().to_pylist())))
        raise InputError(output_uri, f"no run {run!r} (nor one starting with it); runs here: {known}")
    return rows.filter(keep)


def database(rows: pa.Table) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with `rows` as `metrics` and their current results as `latest`.

    Its time zone is UTC, as the rows' timestamps, whatever the machine's.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("metrics", rows)
    con.execute(f"CREATE VIEW latest AS {LATEST_SQL}")
    return con


def latest(rows: pa.Table) -> list[dict[str, Any]]:
    """Each case's latest non-skipped row per mode, by case id then mode."""
    return database(rows).sql("SELECT * FROM latest ORDER BY case_id, mode").to_arrow_table().to_pylist()


def summarise(rows: pa.Table, output: str, run: str | None = None, by: str = "mode") -> Summary:
    """The summary of already loaded rows (see `summary`)."""
    if by not in SUMMARY_BY:
        raise InputError("--by", f"must be one of {', '.join(SUMMARY_BY)}, not {by!r}")
    sql = _SUMMARY_SQL.format(fold="fold" if by == "fold" else "NULL::INTEGER")
    groups = [Group(**g) for g in database(rows).sql(sql).to_arrow_table().to_pylist()]
    groups.sort(key=lambda g: (g.fold is None, g.fold or 0, mode_key(g.mode)))
    return Summary(output=output, run=run, by=by, groups=groups)


def summary(output_uri: str, run: str | None = None, by: str = "mode") -> Summary:
    """Per mode (or per fold and mode) DSC mean ± std, max, min, HD95, NSD, time per case and counts,
    over each case's latest non-skipped row per mode; `run` selects runs by id prefix."""
    return summarise(load(output_uri, run), output_uri, run, by)


def query(output_uri: str, sql: str, fmt: str = "table", out: str | None = None) -> str | None:
    """Run DuckDB `sql` over the output's rows (tables `metrics` and `latest`).

    Returns the result as text in `fmt` (table, csv, json) or, with `out` (a path or URI),
    writes it there and returns None; parquet needs `out`.
    """
    if fmt not in FORMATS:
        raise InputError("--format", f"must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and out is None:
        raise InputError("--format parquet", "needs an output file (--out FILE)")
    con = database(load(output_uri))
    try:
        relation = con.sql(sql)
        result = relation.to_arrow_table() if relation is not None else None
    except duckdb.Error as err:
        raise InputError(f"SQL {sql!r}", str(err).strip()) from err
    if result is None:  # DuckDB 1.x gives no relation for a statement without a result
        raise InputError(f"SQL {sql!r}", "returns no rows to show: give a query (SELECT ...)")
    if fmt == "parquet":
        buffer = io.BytesIO()
        pq.write_table(result, buffer)
        storage.write_bytes(out, buffer.getvalue())
        return None
    text = {"table": _as_table, "csv": _as_csv, "json": _as_json}[fmt](result)
    if out is None:
        return text
    storage.write_text(out, text)
    return None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] | None = None) -> str:
    """A fixed-width text table. Columns in `right` are right-aligned; by default those whose
    values are all numbers (or null)."""
    if right is None:
        right = [i for i in range(len(headers)) if all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)]
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]) + "\n"


def cell(value: Any) -> str:
    """A value as text: null as '-', floats to 6 significant digits, lists as JSON, times ISO 8601."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_default)
    return _json_default(value)


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _lines(result: pa.Table) -> list[tuple[Any, ...]]:
    """The result's rows as tuples (column names may repeat, so not as dicts)."""
    return list(zip(*(column.to_pylist() for column in result.columns)))


def _as_table(result: pa.Table) -> str:
    return render_table(result.column_names, _lines(result))


def _as_csv(result: pa.Table) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(result.column_names)
    writer.writerows([[_csv_cell(v) for v in line] for line in _lines(result)])
    return text.getvalue()


def _csv_cell(value: Any) -> str:
    """Full float precision (csv is for machines); null as an empty field."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else cell(value)


def _as_json(result: pa.Table) -> str:
    """A JSON array, one object per line; NaN/inf (not JSON) become null, times ISO 8601."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    records = [json.dumps({k: clean(v) for k, v in r.items()}, default=_json_default) for r in result.to_pylist()]
    return "[\n" + ",\n".join(records) + "\n]\n" if records else "[]\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dsc_mean(group: Group) -> str:
    if group.dsc_mean is None:
        return "-"
    std = "-" if group.dsc_std is None else f"{100 * group.dsc_std:.2f}"
    return f"{100 * group.dsc_mean:.2f} ± {std} %"
