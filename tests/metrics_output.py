"""Real archive outputs for the metrics and report tests, written without Ray: synthetic
phantoms as NIfTI images and labels, predicted masks on their grids, and Parquet rows of several
runs (modes, folds, statuses, null metrics) through `runs.write_rows`.

Predictions are the label moved by (di, dj) voxels and dilated `grow` times, so every case has
its own real DSC, computed by `resdsn_ray.metrics.case_metrics`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from resdsn_ray import config, runs
from resdsn_ray.metrics import case_metrics
from resdsn_ray.synthetic import make_case
from resdsn_ray.volumes import Volume, write_mask, write_nifti

SHAPE = (64, 64, 32)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
RUN_A = "20260101T000000Z-aaaaaa"  # c2f, cases 0-6 (6 has no label)
RUN_B = "20260102T000000Z-bbbbbb"  # c2f rerun: 0-3 skipped, 4 fails now, 5 recovers
RUN_C = "20260103T000000Z-cccccc"  # coarse-only, cases 0-6
CV_RUNS = ("cv7-fold0-c2f", "cv7-fold0-coarse", "cv7-fold1-c2f", "cv7-fold1-coarse")
RUN_OTHER_CV = "cv8-fold0-c2f"  # a later CV over case 10 again, so "cv7" and "cv" select differently
BAD_READ = "cannot read: <gzip> truncated & \"corrupt\""  # case 5, which recovers in run B
OUT_OF_MEMORY = "CUDA out of memory <fine stage> & 'more'"  # case 4's current error


@dataclass(frozen=True)
class Spec:
    """One row to write: case index, status, and the prediction's move/growth (None: empty mask)."""

    case: int
    status: str = config.STATUS_OK
    move: tuple[int, int, int] | None = (0, 0, 0)
    labelled: bool = True
    error: str | None = None


def case_files(output: Path, case: int) -> tuple[Volume, str, str | None]:
    """The case's image (written once) and URIs of its image and label under `output/archive`."""
    image, label, affine = make_case(1000 + case, SHAPE)
    image_uri = str(output / "archive" / "imagesTr" / f"case_{case:04d}.nii.gz")
    label_uri = str(output / "archive" / "labelsTr" / f"case_{case:04d}.nii.gz")
    if not Path(image_uri).exists():
        write_nifti(image_uri, image, affine)
        write_nifti(label_uri, label, affine)
    return Volume(array=label, affine=affine, source=label_uri), image_uri, label_uri


def prediction(label: np.ndarray, move: tuple[int, int, int] | None) -> np.ndarray:
    if move is None:
        return np.zeros_like(label)
    di, dj, grow = move
    pred = np.roll(label > 0, (di, dj), axis=(0, 1))
    return ndimage.binary_dilation(pred, iterations=grow).astype(np.uint8) if grow else pred.astype(np.uint8)


def write_run(output: Path, run_id: str, mode: str, specs: list[Spec], day: int, fold: int | None = None,
              attempt: int = 1) -> list[dict[str, Any]]:
    """Write one run's rows (and masks of finished cases); the rows written."""
    rows = []
    for n, spec in enumerate(specs):
        label, image_uri, label_uri = case_files(output, spec.case)
        case_id = f"case_{spec.case:04d}"
        mask_uri = runs.mask_uri(str(output), case_id) if mode == "c2f" else str(output / "masks" / mode / f"{case_id}.nii.gz")
        finished_at = T0 + timedelta(days=day, seconds=n)
        row: dict[str, Any] = {
            "run_id": run_id, "case_id": case_id, "status": spec.status, "error": spec.error, "attempt": attempt,
            "image_uri": image_uri, "label_uri": label_uri if spec.labelled else None, "mode": mode, "fold": fold,
            "shape": list(SHAPE), "spacing_mm": [round(s, 4) for s in label.spacing],
            "node": f"node-{'ab'[spec.case % 2]}", "config_id": f"cfg-{mode}",
            "started_at": finished_at - timedelta(seconds=30), "finished_at": finished_at,
        }
        if spec.status == config.STATUS_SKIPPED:
            row["done_in_run"] = RUN_A
        elif spec.status in config.FINISHED:
            pred = prediction(label.array, spec.move)
            write_mask(mask_uri, pred, like=label)
            row.update(mask_uri=mask_uri, t_total_s=10.0 + 1.5 * spec.case + 0.25 * day, t_read_s=0.5)
            if spec.labelled:
                row.update(case_metrics(pred > 0, label.array > 0, label.spacing))
        rows.append(row)
    runs.write_rows(str(output), run_id, 0, rows)
    return rows


def build_output(output: Path) -> Path:
    """Several runs under one output: archive runs A, B (c2f), C (coarse) and a 2-fold CV (cv7)
    plus a later CV run (cv8) over one of its cases."""
    moves = {0: (1, 0, 0), 1: (0, 1, 1), 2: (2, 1, 0), 3: (0, 0, 0), 5: (1, 2, 0)}
    write_run(output, RUN_A, "c2f", [
        *(Spec(c, move=moves[c]) for c in (0, 1, 2, 3)),
        Spec(4, status=config.STATUS_NO_ORGAN, move=None),
        Spec(5, status=config.STATUS_ERROR, move=None, error=BAD_READ),
        Spec(6, labelled=False),
    ], day=0)
    write_run(output, RUN_B, "c2f", [
        *(Spec(c, status=config.STATUS_SKIPPED) for c in (0, 1, 2, 3)),
        Spec(4, status=config.STATUS_ERROR, move=None, error=OUT_OF_MEMORY),
        Spec(5, move=moves[5]),
    ], day=1, attempt=2)
    write_run(output, RUN_C, "coarse", [
        *(Spec(c, move=(c % 3, 1, 1)) for c in range(6)),
        Spec(6, labelled=False),
    ], day=2)
    for k, cases in enumerate(((10, 11, 12), (13, 14, 15))):
        write_run(output, f"cv7-fold{k}-c2f", "c2f", [Spec(c, move=(c % 2, 0, int(c % 3 == 0))) for c in cases], day=3, fold=k)
        write_run(output, f"cv7-fold{k}-coarse", "coarse", [Spec(c, move=(1, c % 2 + 1, 1)) for c in cases], day=3, fold=k)
    write_run(output, RUN_OTHER_CV, "c2f", [Spec(10, move=(3, 3, 0))], day=4, fold=0)
    for day, run_id in enumerate((RUN_A, RUN_B, RUN_C)):
        runs.write_run_record(str(output), run_id, {
            "run_id": run_id, "status": "finished", "engine": {"mode": "coarse" if run_id == RUN_C else "c2f"},
            "input": f"{output}/archive <all>", "started_at": (T0 + timedelta(days=day)).isoformat(),
        })
    (output / "cv.json").write_text(json.dumps({
        "cv_id": "cv7", "folds": 2, "note": "</pre><script>x()</script>",
        "fold_state": {"0": "done", "1": "failed: model bundle marked unfit"},
        "fit": {"0": {"coarse": {"fit": True}, "fine": {"fit": True}},
                "1": {"coarse": {"fit": False, "unfit": "validation DSC 0.0 <b>"}}},
    }))
    (output / "splits.json").write_text(json.dumps({"folds": [[10, 11, 12], [13, 14, 15]]}))
    return output
