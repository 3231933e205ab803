"""What an archive run leaves under its output, and what earlier runs already did.

Layout under OUTPUT (DESIGN "Outputs of an archive run"):
- a case's files, by `OUTPUT_FILES`: `masks/<case_id>.nii.gz` always; `segs/<case_id>.dcm`
  (DICOM SEG), `probabilities/<case_id>.nii.gz` and `previews/<case_id>.png` when asked
  (`config.OutputConfig`); each written whole or not at all. The ablation modes (coarse-only,
  fine-only) write below `<folder>/coarse/` and `<folder>/fine/`, so one output can hold all three;
- `metrics/run_id=<id>/part-<seq>.parquet`, rows with `ROW_SCHEMA`, one per case and attempt;
- `runs/<id>.json`, the run record (config, bundle ids, versions, start/end, counts).

A case is *done* in a mode when its mask of that mode exists AND the latest row of an
earlier attempt in that mode says it finished (`ok` or `no_organ`) under the same `config_id`
(bundles + engine settings): a rerun with the same output skips it, a rerun with other models
or settings recomputes it. A done case that lacks a file this run asks for (a rerun adding
`--preview`) gets only the missing files, from its image and its mask, in a row of the same
attempt (`done_in_run` names the run that made the mask); a missing probability map needs the
models, so that case is segmented again. Each mask carries the stamp of the attempt that wrote it in its
header (`mask_stamp`: config, run, attempt), and the done row must be that attempt's: a mask
without its row (the driver died between the two writes, perhaps after a crashed run with
other settings overwrote it) is not trusted: the case is recomputed and the mask replaced whole. Rows are never rewritten; every attempt appends its own, numbered by
`attempt`, so the history of a case stays queryable.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resdsn_ray import storage, volumes
from resdsn_ray.config import FINISHED, STATUS_SKIPPED, OutputConfig
from resdsn_ray.mask_stats import STAT_KEYS
from resdsn_ray.metrics import METRIC_KEYS
from resdsn_ray.provenance import utc_now

TIMING_KEYS = ("t_read_s", "t_preprocess_s", "t_coarse_s", "t_fine_s", "t_post_s", "t_write_s", "t_metrics_s")



@dataclass(frozen=True)
class OutputFile:
    """One kind of per-case file: the row column holding its URI, its folder and its suffix."""

    column: str
    folder: str
    suffix: str


OUTPUT_FILES = {
    "mask": OutputFile("mask_uri", "masks", ".nii.gz"),
    "seg": OutputFile("seg_uri", "segs", ".dcm"),
    "probabilities": OutputFile("probabilities_uri", "probabilities", ".nii.gz"),
    "preview": OutputFile("preview_uri", "previews", ".png"),
}
"""Every file the archive job writes per case, by kind (the one layout table)."""

STAMP_READERS = 32
_TIME = pa.timestamp("us", tz="UTC")
ROW_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("case_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),  # error rows: a transient failure (storage 5xx, throttling, a timeout, a lost worker)
        ("attempt", pa.int32()),
        ("done_in_run", pa.string()),  # skipped rows: the run whose row and mask are kept
        ("image_uri", pa.string()),
        ("series_uid", pa.string()),  # the DICOM series of image_uri's folder that is this case (null: NIfTI / the only one)
        ("label_uri", pa.string()),
        *[(f.column, pa.string()) for f in OUTPUT_FILES.values()],
        ("note", pa.string()),  # what was asked but not written, and why (a DICOM SEG of a NIfTI input)
        ("shape", pa.list_(pa.int32())),
        ("spacing_mm", pa.list_(pa.float64())),
        ("coarse_bbox", pa.list_(pa.int32())),
        ("coarse_windows", pa.int32()),
        ("fine_windows", pa.int32()),
        ("fine_fallback", pa.bool_()),  # C2F: the coarse stage found nothing, the fine model ran on the whole volume
        *[(key, pa.float64()) for key in METRIC_KEYS],
        *[(key, pa.list_(pa.float64()) if key == "bbox_ras_mm" else pa.float64())
          for key in STAT_KEYS if key not in METRIC_KEYS],  # pred_volume_ml is both: on every row with a mask
        *[(key, pa.float64()) for key in TIMING_KEYS],
        ("t_total_s", pa.float64()),
        ("t_wall_s", pa.float64()),
        ("coarse_model", pa.string()),
        ("fine_model", pa.string()),
        ("demo_models", pa.bool_()),  # the shipped phantom-trained bundles made this mask: not for clinical CT
        ("config_id", pa.string()),
        ("node", pa.string()),
        ("node_id", pa.string()),
        ("device", pa.string()),  # what ran the models: "cuda:0 NVIDIA H100 80GB HBM3", "cpu"
        ("compute_dtype", pa.string()),  # arithmetic of the forward passes as run (fp32, bf16, fp16)
        ("mode", pa.string()),  # c2f | coarse | fine (engine mode of the run)
        ("fold", pa.int32()),
        ("started_at", _TIME),
        ("finished_at", _TIME),
    ]
)
COLUMNS = tuple(ROW_SCHEMA.names)


def new_run_id() -> str:
    """Sortable and unique: UTC time of the start plus a random suffix."""
    return f"{utc_now():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def config_id(settings: dict[str, Any]) -> str:
    """A short stable hash of what determines a mask (bundle ids and engine settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_uri(output: str, kind: str, mode: str = "c2f") -> str:
    """The folder of a mode's files of `kind`: `masks/` for C2F, `masks/<mode>/` for the ablations."""
    folder = OUTPUT_FILES[kind].folder
    return storage.join(output, folder) if mode == "c2f" else storage.join(output, folder, mode)


def file_uri(output: str, kind: str, case_id: str, mode: str = "c2f") -> str:
    return storage.join(files_uri(output, kind, mode), case_id + OUTPUT_FILES[kind].suffix)


def masks_uri(output: str, mode: str = "c2f") -> str:
    return files_uri(output, "mask", mode)


def mask_uri(output: str, case_id: str, mode: str = "c2f") -> str:
    return file_uri(output, "mask", case_id, mode)


def asked_files(outputs: OutputConfig, image_is_dicom: bool) -> tuple[str, ...]:
    """The kinds of file a case needs under `outputs` (a NIfTI image gets no DICOM SEG)."""
    asked = {"mask": True, "seg": outputs.seg and image_is_dicom, "probabilities": outputs.probabilities != "none",
             "preview": outputs.preview}
    return tuple(kind for kind, wanted in asked.items() if wanted)


def metrics_uri(output: str, run_id: str | None = None) -> str:
    return storage.join(output, "metrics", f"run_id={run_id}") if run_id else storage.join(output, "metrics")


def run_record_uri(output: str, run_id: str) -> str:
    return storage.join(output, "runs", f"{run_id}.json")


def row_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table with exactly `ROW_SCHEMA` (missing keys are null)."""
    return pa.Table.from_pylist([{name: row.get(name) for name in COLUMNS} for row in rows], schema=ROW_SCHEMA)


def write_rows(output: str, run_id: str, seq: int, rows: list[dict[str, Any]]) -> str:
    """Write one part file of a run's rows, whole or not at all; its URI."""
    buffer = io.BytesIO()
    pq.write_table(row_table(rows), buffer)
    uri = storage.join(metrics_uri(output, run_id), f"part-{seq:05d}.parquet")
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def read_rows(output: str, run_id: str | None = None) -> pa.Table:
    """Every row of every run under `output`, or of run `run_id` in the order written (an empty
    table when there are none).

    Files are read one by one with the row schema, not as a hive dataset, because `run_id`
    is both a column and the folder name.
    """
    fs, path = storage.filesystem(metrics_uri(output, run_id))
    fs.invalidate_cache()
    try:
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet") and not posixpath.basename(f).startswith("."))
    except FileNotFoundError:
        files = []
    tables = []
    for file in files:
        with fs.open(file, "rb") as handle:
            table = pq.read_table(handle)
        tables.append(table)
    if not tables:
        return ROW_SCHEMA.empty_table()
    return pa.concat_tables([_conform(t) for t in tables])


def _conform(table: pa.Table) -> pa.Table:
    """A part file as `ROW_SCHEMA`: columns in schema order, missing ones (older files) null."""
    columns = [
        table[name].cast(field.type) if name in table.schema.names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(COLUMNS, ROW_SCHEMA)
    ]
    return pa.table(columns, schema=ROW_SCHEMA)


def existing_files(output: str, kind: str = "mask", mode: str = "c2f") -> set[str]:
    """Case ids that have a file of `kind` and `mode` under `output` (one listing of its folder)."""
    fs, path = storage.filesystem(files_uri(output, kind, mode))
    fs.invalidate_cache()
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    suffix = OUTPUT_FILES[kind].suffix
    return {posixpath.basename(n)[: -len(suffix)] for n in names if n.endswith(suffix) and not posixpath.basename(n).startswith(".")}


class History:
    """What earlier attempts in one mode under one output did: done cases, their files, attempt counts.

    Built on Arrow columns, never a Python dict per row: a 100,000-case output with several runs
    costs the driver one Arrow table of the latest done rows, one attempt count and one index
    entry per case (bench/driver.py measures it). A done case's row becomes a dict when asked.
    """

    def __init__(self, rows: pa.Table, files: dict[str, set[str]], mode: str = "c2f") -> None:
        self.files = files  # kind -> case ids that have such a file
        rows = rows.filter(pc.and_(pc.equal(rows["mode"], mode), pc.not_equal(rows["status"], STATUS_SKIPPED)))
        # The latest row of each case: sorted by case, then finish time (stable: the later-written
        # of two rows finished at the same instant wins); the last row of each case's run of rows.
        rows = rows.take(pc.sort_indices(rows, [("case_id", "ascending"), ("finished_at", "ascending")]))
        cases = rows["case_id"].combine_chunks()
        changes = pc.not_equal(cases[1:], cases[:-1]).to_numpy(zero_copy_only=False)
        last = np.flatnonzero(np.append(changes, True)) if len(rows) else np.zeros(0, np.int64)
        attempts = rows.group_by("case_id", use_threads=False).aggregate([("attempt", "max")])
        self.attempts: dict[str, int] = dict(zip(attempts["case_id"].to_pylist(),
                                                 pc.fill_null(attempts["attempt_max"], 0).to_pylist()))
        latest = rows.take(pa.array(last, pa.int64()))
        finished = pc.is_in(latest["status"], value_set=pa.array(FINISHED, pa.string()))
        has_mask = pc.is_in(latest["case_id"], value_set=pa.array(sorted(files.get("mask", set())), pa.string()))
        self._keep(latest.filter(pc.and_(finished, has_mask)))  # a later failed attempt makes an old result stale

    def _keep(self, done: pa.Table) -> None:
        self._done = done
        self._index = {case: i for i, case in enumerate(done["case_id"].to_pylist())}

    @classmethod
    def load(cls, output: str, mode: str = "c2f") -> History:
        files = {kind: existing_files(output, kind, mode) for kind in OUTPUT_FILES}
        history = cls(read_rows(output), files, mode)
        history.keep_stamped(lambda case_id: mask_uri(output, case_id, mode))
        return history

    def keep_stamped(self, mask_of: Callable[[str], str]) -> None:
        """Forget done cases whose mask was not written by their done row's attempt."""
        done = self._done
        cases = done["case_id"].to_pylist()
        with ThreadPoolExecutor(max_workers=STAMP_READERS) as pool:  # one small read per mask, many in flight
            stamps = list(pool.map(lambda case: volumes.read_description(mask_of(case)), cases))
        owners = pc.coalesce(done["done_in_run"], done["run_id"]).to_pylist()
        expected = (mask_stamp(c, r, a) for c, r, a in zip(done["config_id"].to_pylist(), owners, done["attempt"].to_pylist()))
        self._keep(done.filter(pa.array([stamp == want for stamp, want in zip(stamps, expected)], pa.bool_())))

    def done_row(self, case_id: str, config: str) -> dict[str, Any] | None:
        """The row whose mask stands for `case_id` under `config` (None: the case is to segment)."""
        i = self._index.get(case_id)
        if i is None or self._done["config_id"][i].as_py() != config:
            return None
        return self._done.slice(i, 1).to_pylist()[0]

    def is_done(self, case_id: str, config: str, needed: tuple[str, ...] = ("mask",)) -> bool:
        return self.done_row(case_id, config) is not None and not self.missing(case_id, needed)

    def missing(self, case_id: str, needed: tuple[str, ...]) -> list[str]:
        """The kinds of `needed` file that `case_id` lacks."""
        return [kind for kind in needed if case_id not in self.files.get(kind, set())]

    def next_attempt(self, case_id: str) -> int:
        return self.attempts.get(case_id, 0) + 1


def mask_run(row: dict[str, Any]) -> str | None:
    """The run whose attempt wrote a finished row's mask: its own, or (a row that only added
    missing files) `done_in_run`."""
    return row.get("done_in_run") or row["run_id"]


def mask_stamp(config_id: str | None, run_id: str | None, attempt: int | None) -> str:
    """What a mask's header says made it: the attempt whose row owns it (NIfTI `descrip`, 80 bytes)."""
    return f"resdsn_ray config={config_id} attempt={attempt} run={run_id}"[:80]


def write_run_record(output: str, run_id: str, record: dict[str, Any]) -> None:
    storage.write_json(run_record_uri(output, run_id), record)


def read_run_record(output: str, run_id: str) -> dict[str, Any]:
    return storage.read_json(run_record_uri(output, run_id))


def check_resume(uri: str, recorded: dict[str, Any], asked: dict[str, Any], what: str) -> None:
    """Refuse to resume the `what` recorded at `uri` with other settings than it was started with.

    The one resume check (training runs, cross-validations): `recorded` and `asked` are the
    settings that decide the result (nested dicts are compared key by key); InputError names
    every setting that differs, dotted (`model.width`, `train.coarse.lr`).
    """
    from resdsn_ray.errors import InputError

    def differ(old: Any, new: Any, prefix: str) -> list[str]:
        if isinstance(old, dict) and isinstance(new, dict):
            return [name for key in sorted(set(old) | set(new)) for name in differ(old.get(key), new.get(key), f"{prefix}{key}.")]
        same = json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)
        return [] if same else [prefix.rstrip(".")]

    changed = differ(recorded, asked, "")
    if changed:
        raise InputError(uri, f"holds a {what} with other settings ({', '.join(changed)}); "
                              "resume with the same ones or use a new --output")
