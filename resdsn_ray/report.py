"""A static HTML report of an archive or cross-validation output, for reading a run's results
without a notebook: one self-contained page (no script, no CDN, relative links only) with the
PNG images it shows written beside it.

It holds the summary tables of `query.summary` (paper Tables 2 and 5), DSC distributions per
mode and per fold, QA overlays of the worst, median and best cases (paper Figure 4), the
per-case table, the errors with their reasons and the provenance (run records, `cv.json`,
`splits.json`).

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


def make_overlay(role: str, row: dict[str, Any]) -> tuple[Overlay, bytes | None]:
    """Read the case's image, label and mask and draw its overlay; a missing file becomes a problem."""
    try:
        image = read_volume(row["image_uri"])
        label = read_volume(row["label_uri"]).array
        mask = read_volume(row["mask_uri"]).array
    except InputError as err:
        return Overlay(role, row, problem=str(err)), None
    if not label.shape == mask.shape == image.shape:
        return Overlay(role, row, problem=f"shapes differ: image {image.shape}, label {label.shape}, mask {mask.shape}"), None
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
    for role, row in picks:
        made, picture = make_overlay(role, row)
        overlays.append(made)
        if picture is not None:
            images[made.file] = picture
    for name, data in images.items():
        storage.write_bytes(_beside(html_uri, name), data)
    page = render(
        output_uri, run,
        [query.summarise(rows, output_uri, run, by) for by in query.SUMMARY_BY],
        cases, mode, overlays, sorted(images), provenance(output_uri, sorted(set(rows["run_id"].to_pylist()) - {None})),
    )
    storage.write_text(html_uri, page)
    return html_uri


def _beside(html_uri: str, name: str) -> str:
    return storage.join((posixpath if "://" in html_uri else os.path).dirname(html_uri), name)


# ---------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
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
           records: list[tuple[str, str, dict[str, Any] | None]]) -> str:
    """The report page; every text from the data goes through html.escape."""
    title = f"resdsn report: {output_uri}" + (f" (runs {run}*)" if run else "")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_esc(title)}</title>\n"
             f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>"]
    parts.append(_runs_section(records))
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
    parts.append(_overlay_section(mode, overlays))
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
                          record.get("started_at"), record.get("ended_at"), record.get("cases"),
                          json.dumps(record.get("counts"), sort_keys=True) if record.get("counts") else None,
                          record.get("input"),
                          " / ".join(str((bundles.get(s) or {}).get("id")) for s in ("coarse", "fine") if bundles.get(s))])
    headers = ["run", "status", "mode", "fold", "started", "ended", "cases", "counts", "input", "bundles (coarse / fine)"]
    body = _table(headers, [[_esc(query.cell(v)) for v in line] for line in lines], text_columns=set(range(len(headers))))
    return "<h2>Runs</h2>\n" + (body if lines else '<p class="note">no run records</p>')


def _overlay_section(mode: str | None, overlays: list[Overlay]) -> str:
    if not overlays:
        return '<h2>QA overlays</h2>\n<p class="note">no overlays: no finished case has a DSC</p>'
    parts = [f"<h2>QA overlays ({_esc(query.method_name(mode))})</h2>",
             '<p class="note">axial slice (k) with the largest ground-truth area; patient right on the left, anterior '
             f"up; CT window {WINDOW_HU[0]:g} to {WINDOW_HU[1]:g} HU; ground truth red, prediction green, overlap yellow</p>"]
    for item in overlays:
        row = item.row
        caption = f"{item.role}: {row['case_id']}, DSC {row['dsc']:.4f}" + (f", slice k = {item.k}" if item.k is not None else "")
        if item.file is None:
            parts.append(f'<figure><figcaption>{_esc(caption)}</figcaption><p class="error">{_esc(item.problem)}</p></figure>')
        else:
            parts.append(f'<figure class="overlay" id="overlay-{_esc(item.role)}"><a href="{_href(item.file)}"><img src="{_href(item.file)}" '
                         f'alt="{_esc(caption)}"></a><figcaption>{_esc(caption)}</figcaption></figure>')
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


def _table(headers: Sequence[str], lines: list[list[str]], text_columns: set[int]) -> str:
    """An HTML table of cells that are already HTML (escaped by the caller)."""
    def cls(i: int) -> str:
        return ' class="text"' if i in text_columns else ""

    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(f"<td{cls(i)}>{v}</td>" for i, v in enumerate(line)) + "</tr>" for line in lines)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(name: str) -> str:
    """A relative link to a file beside the report (case ids may hold any safe character)."""
    return _esc(quote(name))
