"""A static HTML report of an archive or cross-validation output, for reading a run's results
without a notebook: one self-contained page (no script, no CDN, relative links only) with the
PNG images it shows written beside it.

It holds the summary tables of `query.summary` (paper Tables 2 and 5), DSC distributions per
mode and per fold, QA overlays of the worst, median and best cases (paper Figure 4) and, for
cases without a label, of the largest, median and smallest predictions (the prediction alone),
throughput over time and per node, time per stage, the slowest cases, the per-case table, the
errors with their reasons and the provenance (run records, `cv.json`, `splits.json`).

Overlays show the axial slice (fixed k) with the largest ground-truth area, drawn and turned for
the screen by `pictures` (radiological convention, pixels scaled to the voxel spacing).
"""

from __future__ import annotations

import html
import io
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure

from resdsn_ray import config, query, runs, storage
from resdsn_ray.errors import InputError
from resdsn_ray.pictures import WINDOW_HU, overlay, png
from resdsn_ray.volumes import read_volume

PROVENANCE_FILES = ("cv.json", "splits.json")  # written by resdsn_ray.cv at the output root


def default_html(output_uri: str) -> str:
    return storage.join(output_uri, "report", "index.html")


@dataclass(frozen=True)
class Overlay:
    """A QA overlay of one case: where its PNG is (relative to the report), or why it is missing."""

    role: str  # worst, median, best
    row: dict[str, Any]
    file: str | None = None
    k: int | None = None
    problem: str | None = None


def qa_cases(cases: list[dict[str, Any]]) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """The mode shown (c2f if it has DSCs, else the first that has) and its worst, median and best cases."""
    scored = _scored(cases)
    if not scored:
        return None, []
    mode = min({c["mode"] for c in scored}, key=query.mode_key)
    ranked = sorted((c for c in scored if c["mode"] == mode), key=lambda c: (c["dsc"], c["case_id"]))
    picks = {"worst": 0, "median": (len(ranked) - 1) // 2, "best": len(ranked) - 1}
    chosen: list[tuple[str, dict[str, Any]]] = []
    for role, index in picks.items():
        if all(ranked[index] is not row for _, row in chosen):
            chosen.append((role, ranked[index]))
    return mode, chosen


def _scored(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cases if c["dsc"] is not None and c["status"] in config.FINISHED]


def unlabelled_cases(cases: list[dict[str, Any]], mode: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The largest, mid-size (median volume) and smallest predictions of the unlabelled cases with a non-empty mask
    (of `mode`, else the first mode that has some): what an unlabelled archive's run looks like."""
    found = [c for c in cases if not c["label_uri"] and c["status"] == config.STATUS_OK and c["mask_uri"]]
    if not found:
        return []
    shown = mode if any(c["mode"] == mode for c in found) else min({c["mode"] for c in found}, key=query.mode_key)
    ranked = sorted((c for c in found if c["mode"] == shown), key=lambda c: (-(c["pred_volume_ml"] or 0.0), c["case_id"]))
    chosen: list[tuple[str, dict[str, Any]]] = []
    for role, index in {"largest": 0, "mid-size": (len(ranked) - 1) // 2, "smallest": len(ranked) - 1}.items():
        if all(ranked[index] is not row for _, row in chosen):
            chosen.append((role, ranked[index]))
    return chosen


def make_overlay(role: str, row: dict[str, Any]) -> tuple[Overlay, bytes | None]:
    """Read the case's image, label (if any) and mask and draw its overlay; a missing file becomes a problem."""
    try:
        image = read_volume(row["image_uri"], series_uid=row.get("series_uid") or None)
        label = read_volume(row["label_uri"]).array if row["label_uri"] else None
        mask = read_volume(row["mask_uri"]).array
    except InputError as err:
        return Overlay(role, row, problem=str(err)), None
    if mask.shape != image.shape or (label is not None and label.shape != image.shape):
        shapes = f"image {image.shape}, mask {mask.shape}" + (f", label {label.shape}" if label is not None else "")
        return Overlay(role, row, problem=f"shapes differ: {shapes}"), None
    picture, k = overlay(image.array, label, mask, image.affine)
    name = f"overlay-{role}-{row['mode']}-{row['case_id']}.png"
    return Overlay(role, row, file=name, k=k), png(picture)


def dsc_plot(groups: dict[str, dict[str | None, list[float]]]) -> bytes:
    """Box plots with the cases as dots: one box per x group and mode, modes side by side."""
    xs = list(groups)
    modes = sorted({m for x in xs for m in groups[x]}, key=query.mode_key)
    figure = Figure(figsize=(max(4.0, 1.2 * len(xs) * len(modes) + 1.5), 3.6), dpi=100)
    axes = figure.add_subplot()
    width = 0.8 / len(modes)
    for n, mode in enumerate(modes):
        positions = [i + (n - (len(modes) - 1) / 2) * width for i, x in enumerate(xs) if groups[x].get(mode)]
        values = [groups[x][mode] for x in xs if groups[x].get(mode)]
        colour = f"C{n}"
        axes.boxplot(values, positions=positions, widths=width * 0.8, showfliers=False,
                     boxprops={"color": colour}, medianprops={"color": colour}, whiskerprops={"color": colour},
                     capprops={"color": colour})
        for position, dscs in zip(positions, values):
            spread = np.linspace(-width * 0.25, width * 0.25, len(dscs)) if len(dscs) > 1 else np.zeros(1)
            axes.scatter(position + spread, dscs, s=12, color=colour, alpha=0.7)
        axes.plot([], [], color=colour, label=query.method_name(mode))
    axes.set_xticks(range(len(xs)), [str(x) for x in xs])
    axes.set_xlim(-0.6, len(xs) - 0.4)
    axes.set_ylim(0.0, 1.02)
    axes.set_ylabel("DSC")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def dsc_plots(cases: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG files by name: DSC per mode, and per fold when the rows have folds."""
    scored = _scored(cases)
    if not scored:
        return {}
    by_mode: dict[str, dict[str | None, list[float]]] = {"all cases": {}}
    by_fold: dict[str, dict[str | None, list[float]]] = {}
    for case in sorted(scored, key=lambda c: c["fold"] if c["fold"] is not None else -1):
        by_mode["all cases"].setdefault(case["mode"], []).append(case["dsc"])
        if case["fold"] is not None:
            by_fold.setdefault(f"fold {case['fold']}", {}).setdefault(case["mode"], []).append(case["dsc"])
    plots = {"dsc-by-mode.png": dsc_plot(by_mode)}
    if by_fold:
        plots["dsc-by-fold.png"] = dsc_plot(by_fold)
    return plots


def provenance(output_uri: str, run_ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(title, text, parsed record) of each run record of `run_ids` and of the CV files present."""
    found = []
    for title, uri in [*((f"run {r}", runs.run_record_uri(output_uri, r)) for r in run_ids),
                       *((name, storage.join(output_uri, name)) for name in PROVENANCE_FILES)]:
        if not storage.exists(uri):
            if title.startswith("run "):
                found.append((title, f"no run record at {uri}", None))
            continue
        text = storage.read_bytes(uri).decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            found.append((title, text, None))
            continue
        found.append((title, json.dumps(record, indent=2, sort_keys=True), record if isinstance(record, dict) else None))
    return found


def build_report(output_uri: str, html_uri: str | None = None, run: str | None = None) -> str:
    """Write the report of `output_uri` (runs selected by id prefix `run`) and its images; its URI."""
    html_uri = html_uri or default_html(output_uri)
    rows = query.load(output_uri, run)
    cases = query.latest(rows)
    mode, picks = qa_cases(cases)
    overlays: list[Overlay] = []
    images: dict[str, bytes] = dsc_plots(cases)
    for role, row in [*picks, *unlabelled_cases(cases, mode)]:
        made, picture = make_overlay(role, row)
        overlays.append(made)
        if picture is not None:
            images[made.file] = picture
    worked = _worked(rows)
    if worked:
        images[THROUGHPUT_PNG] = throughput_plot(worked)
    for name, data in images.items():
        storage.write_bytes(_beside(html_uri, name), data)
    page = render(
        output_uri, run,
        [query.summarise(rows, output_uri, run, by) for by in query.SUMMARY_BY],
        cases, mode, overlays, sorted(images), provenance(output_uri, sorted(set(rows["run_id"].to_pylist()) - {None})),
        worked,
    )
    storage.write_text(html_uri, page)
    return html_uri


THROUGHPUT_PNG = "throughput.png"
SLOWEST = 10  # cases in the slowest-cases table


def _worked(rows: Any) -> list[dict[str, Any]]:
    """Every attempt that did work (not skipped, finished), oldest first: what throughput counts."""
    done = [r for r in rows.to_pylist() if r["status"] != config.STATUS_SKIPPED and r["finished_at"] is not None]
    return sorted(done, key=lambda r: r["finished_at"])


def throughput_plot(worked: list[dict[str, Any]]) -> bytes:
    """Cases finished over time, in all and per node (steps: one per case, as they ended)."""
    start = min(r["started_at"] or r["finished_at"] for r in worked)
    figure = Figure(figsize=(8.0, 3.4), dpi=100)
    axes = figure.add_subplot()
    lines = {"all nodes": worked} | {f"node {n}": [r for r in worked if r["node"] == n]
                                     for n in sorted({r["node"] for r in worked if r["node"]})}
    for n, (name, group) in enumerate(lines.items()):
        minutes = [(r["finished_at"] - start).total_seconds() / 60 for r in group]
        axes.step([0.0, *minutes], range(len(group) + 1), where="post", label=name, color=f"C{n}")
    axes.set_xlabel(f"minutes since {start:%Y-%m-%d %H:%M:%S} UTC")
    axes.set_ylabel("cases finished")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def node_table(worked: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per node: cases, errors, first start, last end and cases per minute between them."""
    lines = []
    for node in sorted({r["node"] or "-" for r in worked}):
        group = [r for r in worked if (r["node"] or "-") == node]
        first = min(r["started_at"] or r["finished_at"] for r in group)
        last = max(r["finished_at"] for r in group)
        minutes = (last - first).total_seconds() / 60
        lines.append([node, len(group), sum(r["status"] == config.STATUS_ERROR for r in group), first, last,
                      len(group) / minutes if minutes > 0 else None])
    return ["node", "cases", "errors", "first start", "last end", "cases/min"], lines


def stage_table(cases: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per stage (`runs.TIMING_KEYS`): cases that ran it and its mean, median and total seconds."""
    lines = []
    for key in (*runs.TIMING_KEYS, "t_total_s"):
        values = [c[key] for c in cases if c.get(key) is not None]
        if values:
            lines.append([key[2:-2], len(values), float(np.mean(values)), float(np.median(values)), float(np.sum(values))])
    return ["stage", "cases", "mean s", "median s", "total s"], lines


def slowest(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `SLOWEST` cases by wall time (read to write; the work's sum where no wall time)."""
    timed = [c for c in cases if (c["t_wall_s"] or c["t_total_s"]) is not None]
    return sorted(timed, key=lambda c: -(c["t_wall_s"] or c["t_total_s"]))[:SLOWEST]


def _beside(html_uri: str, name: str) -> str:
    return storage.join((posixpath if "://" in html_uri else os.path).dirname(html_uri), name)


# ---------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; max-width: 100%; }
td.wrap, th.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 6em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; vertical-align: top; white-space: nowrap; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { display: block; }
figure.overlay img { image-rendering: pixelated; }
pre { background: #f7f7f7; padding: .5em; overflow-x: auto; max-height: 30em; }
.error { color: #a00; white-space: pre-wrap; text-align: left; }
.note { color: #666; }
"""
_CASE_COLUMNS = ("case_id", "mode", "fold", "status", "dsc", "hd95_mm", "nsd_2mm", "t_total_s", "run_id", "node")
_TEXT_COLUMNS = {"case_id", "mode", "status", "run_id", "node"}


def render(output_uri: str, run: str | None, summaries: list[query.Summary], cases: list[dict[str, Any]],
           mode: str | None, overlays: list[Overlay], images: list[str],
           records: list[tuple[str, str, dict[str, Any] | None]], worked: list[dict[str, Any]]) -> str:
    """The report page; every text from the data goes through html.escape."""
    title = f"resdsn report: {output_uri}" + (f" (runs {run}*)" if run else "")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_esc(title)}</title>\n"
             f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>"]
    parts.append(_runs_section(records))
    parts.append(_folds_section(records))
    parts.append("<h2>Summary</h2>")
    for summary in summaries:
        if summary.by == "fold" and all(g.fold is None for g in summary.groups):
            continue
        headers, lines = summary.table()
        caption = "per method" if summary.by == "mode" else "per fold and method"
        parts.append(f"<p>{_esc(caption)} (n: finished cases with a DSC; mean ± sample std; means over cases that have the metric)</p>")
        parts.append(_table(headers, [[_esc(v) for v in line] for line in lines], text_columns={0}))
    parts.append("<h2>DSC distribution</h2>")
    plots = [name for name in ("dsc-by-mode.png", "dsc-by-fold.png") if name in images]
    parts.append("".join(f'<figure><img src="{_href(n)}" alt="{_esc(n)}"><figcaption><a href="{_href(n)}">'
                         f"{_esc(n)}</a></figcaption></figure>" for n in plots) or '<p class="note">no case has a DSC (no labels?)</p>')
    parts.append(_overlay_section(mode, [o for o in overlays if o.row["label_uri"]]))
    parts.append(_unlabelled_section([o for o in overlays if not o.row["label_uri"]]))
    parts.append(_timing_section(cases, worked, images))
    parts.append(_cases_section(cases, overlays))
    parts.append(_errors_section(cases))
    parts.append(_provenance_section(records))
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _runs_section(records: list[tuple[str, str, dict[str, Any] | None]]) -> str:
    lines = []
    for title, _, record in records:
        if title.startswith("run ") and record is not None:
            engine = record.get("engine") or {}
            bundles = record.get("bundles") or {}
            lines.append([record.get("run_id", title[4:]), record.get("status"), engine.get("mode"), record.get("fold"),
                          _minute(record.get("started_at")), _minute(record.get("ended_at")), record.get("cases"),
                          json.dumps(record.get("counts"), sort_keys=True) if record.get("counts") else None,
                          record.get("input"),
                          " / ".join(str((bundles.get(s) or {}).get("id")) for s in ("coarse", "fine") if bundles.get(s))])
    headers = ["run", "status", "mode", "fold", "started (UTC)", "ended (UTC)", "cases", "counts", "input",
               "bundles (coarse / fine)"]
    body = _table(headers, [[_esc(query.cell(v)) for v in line] for line in lines], text_columns=set(range(len(headers))),
                  wrap_columns={4, 5, 7, 8, 9})
    return "<h2>Runs</h2>\n" + (body if lines else '<p class="note">no run records</p>')


def _folds_section(records: list[tuple[str, str, dict[str, Any] | None]]) -> str:
    """A cross-validation's folds: state and each model's fitness (a collapsed training is unfit)."""
    cv = next((record for title, _, record in records if title == "cv.json" and record), None)
    if cv is None:
        return ""
    states, fitness = cv.get("fold_state") or {}, cv.get("fit") or {}

    def shown(stage: dict[str, Any] | None) -> str:
        return "not trained" if stage is None else "fit" if stage.get("fit") else f"UNFIT: {stage.get('unfit')}"

    lines = [[_esc(fold), _esc(query.cell(states.get(fold))),
              *(_esc(shown((fitness.get(fold) or {}).get(stage))) for stage in config.STAGES)]
             for fold in sorted(set(states) | set(fitness), key=int)]
    return "<h2>Cross-validation folds</h2>\n" + _table(["fold", "state", "coarse model", "fine model"], lines,
                                                        text_columns={1, 2, 3})


def _minute(iso: Any) -> Any:
    """An ISO 8601 UTC time of a run record to the minute (`2026-01-01 00:00`): short enough for the runs table."""
    return f"{iso[:10]} {iso[11:16]}" if isinstance(iso, str) and len(iso) >= 16 else iso


def _overlay_section(mode: str | None, overlays: list[Overlay]) -> str:
    if not overlays:
        return '<h2>QA overlays</h2>\n<p class="note">no overlays: no finished case has a DSC</p>'
    parts = [f"<h2>QA overlays ({_esc(query.method_name(mode))})</h2>",
             '<p class="note">axial slice (k) with the largest ground-truth area; patient right on the left, anterior '
             f"up; CT window {WINDOW_HU[0]:g} to {WINDOW_HU[1]:g} HU; ground truth red, prediction green, overlap yellow</p>"]
    for item in overlays:
        row = item.row
        caption = f"{item.role}: {row['case_id']}, DSC {row['dsc']:.4f}" + (f", slice k = {item.k}" if item.k is not None else "")
        parts.append(_figure(item, caption))
    return "\n".join(parts)


def _unlabelled_section(overlays: list[Overlay]) -> str:
    if not overlays:
        return ""
    parts = ["<h2>Predictions without a label</h2>",
             '<p class="note">the largest, mid-size (median volume) and smallest predictions of the cases with no label: the axial slice '
             "(k) with the largest predicted area, prediction green; orientation and CT window as above</p>"]
    for item in overlays:
        row = item.row
        volume = f", {row['pred_volume_ml']:.1f} ml" if row.get("pred_volume_ml") is not None else ""
        caption = f"{item.role}: {row['case_id']} ({query.method_name(row['mode'])}{volume})" + (
            f", slice k = {item.k}" if item.k is not None else "")
        parts.append(_figure(item, caption))
    return "\n".join(parts)


def _figure(item: Overlay, caption: str) -> str:
    if item.file is None:
        return f'<figure><figcaption>{_esc(caption)}</figcaption><p class="error">{_esc(item.problem)}</p></figure>'
    return (f'<figure class="overlay" id="overlay-{_esc(item.role)}"><a href="{_href(item.file)}"><img src="{_href(item.file)}" '
            f'alt="{_esc(caption)}"></a><figcaption>{_esc(caption)}</figcaption></figure>')


def _timing_section(cases: list[dict[str, Any]], worked: list[dict[str, Any]], images: list[str]) -> str:
    if not worked:
        return '<h2>Throughput</h2>\n<p class="note">no finished attempts</p>'
    parts = ["<h2>Throughput</h2>"]
    if THROUGHPUT_PNG in images:
        parts.append(f'<figure><img src="{_href(THROUGHPUT_PNG)}" alt="cases finished over time"><figcaption>'
                     f"every attempt that did work ({len(worked)}), over time, in all and per node</figcaption></figure>")
    headers, lines = node_table(worked)
    parts.append(_table(headers, [[_esc(query.cell(v)) for v in line] for line in lines], text_columns={0}))
    headers, lines = stage_table(cases)
    parts.append("<h3>Time per stage</h3>\n<p class=\"note\">seconds per case, current result of each case</p>")
    parts.append(_table(headers, [[_esc(query.cell(v)) for v in line] for line in lines], text_columns={0}))
    columns = ("case_id", "mode", "status", "t_wall_s", "t_total_s", "t_coarse_s", "t_fine_s", "node", "run_id")
    parts.append(f"<h3>Slowest cases (up to {SLOWEST})</h3>")
    parts.append(_table(columns, [[_esc(query.cell(c.get(k))) for k in columns] for c in slowest(cases)],
                        text_columns={0, 1, 2, 7, 8}))
    return "\n".join(parts)


def _cases_section(cases: list[dict[str, Any]], overlays: list[Overlay]) -> str:
    links = {(o.row["case_id"], o.row["mode"]): o.file for o in overlays if o.file}
    ordered = sorted(cases, key=lambda c: (c["dsc"] is None, c["dsc"] or 0.0, c["case_id"], c["mode"] or ""))
    lines = []
    for case in ordered:
        line = [_esc(query.cell(case[c])) for c in _CASE_COLUMNS]
        link = links.get((case["case_id"], case["mode"]))
        lines.append([*line, f'<a href="{_href(link)}">overlay</a>' if link else ""])
    headers = [*_CASE_COLUMNS, "overlay"]
    text = {i for i, c in enumerate(_CASE_COLUMNS) if c in _TEXT_COLUMNS}
    return f"<h2>Cases ({len(cases)}, by DSC, worst first)</h2>\n" + _table(headers, lines, text_columns=text)


def _errors_section(cases: list[dict[str, Any]]) -> str:
    errors = [c for c in cases if c["status"] == config.STATUS_ERROR]
    if not errors:
        return "<h2>Errors</h2>\n<p class=\"note\">none</p>"
    lines = [[_esc(c["case_id"]), _esc(query.cell(c["mode"])), _esc(query.cell(c["run_id"])),
              f'<span class="error">{_esc(query.cell(c["error"]))}</span>'] for c in errors]
    return f"<h2>Errors ({len(errors)})</h2>\n" + _table(["case_id", "mode", "run_id", "reason"], lines, text_columns={0, 1, 2, 3})


def _provenance_section(records: list[tuple[str, str, dict[str, Any] | None]]) -> str:
    if not records:
        return ""
    blocks = [f"<details><summary>{_esc(title)}</summary><pre>{_esc(text)}</pre></details>" for title, text, _ in records]
    return "<h2>Provenance</h2>\n" + "\n".join(blocks)


def _table(headers: Sequence[str], lines: list[list[str]], text_columns: set[int], wrap_columns: Sequence[int] = ()) -> str:
    """An HTML table of cells that are already HTML (escaped by the caller); the cells of
    `wrap_columns` (long URIs, counts) wrap anywhere, so the table fits the page."""
    def cls(i: int) -> str:
        names = [name for name, on in (("text", i in text_columns), ("wrap", i in wrap_columns)) if on]
        return f' class="{" ".join(names)}"' if names else ""

    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(f"<td{cls(i)}>{v}</td>" for i, v in enumerate(line)) + "</tr>" for line in lines)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(name: str) -> str:
    """A relative link to a file beside the report (case ids may hold any safe character)."""
    return _esc(quote(name))
