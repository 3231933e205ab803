"""The `resdsn` command: one sub-command per user task (see README)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from resdsn_ray.config import MODES
from resdsn_ray.cv import add_cv_flags, run_cv_command
from resdsn_ray.errors import InputError
from resdsn_ray.training import add_train_flags


def add_engine_flags(parser: argparse.ArgumentParser, bundles: bool = True) -> None:
    """Engine settings shared by `segment`, the archive job and (without bundles and mode) `cv`."""
    if bundles:
        parser.add_argument("--coarse", help="coarse model bundle URI (default: shipped demo bundle)")
        parser.add_argument("--fine", help="fine model bundle URI (default: shipped demo bundle)")
        parser.add_argument("--mode", choices=MODES, default="c2f")
    parser.add_argument("--n-coarse", type=int, default=6, help="coarse windows per axis: floor(L/P) + n")
    parser.add_argument("--n-fine", type=int, default=12, help="fine windows per axis: floor(L/P) + n")
    parser.add_argument("--margin", type=int, default=20, help="crop margin around the coarse mask (voxels)")
    parser.add_argument("--fusion", choices=["average", "vote", "gaussian"], default="average")
    parser.add_argument("--post-ratio", type=float, default=0.2, help="drop components below this share of the foreground")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--accumulate-on", choices=["device", "cpu"], default="device", help="where stitched scores live")


def engine_config(args: argparse.Namespace):
    from resdsn_ray.config import EngineConfig, WindowConfig

    return EngineConfig(
        coarse=WindowConfig(n=args.n_coarse, fusion=args.fusion, batch_size=args.batch_size),
        fine=WindowConfig(n=args.n_fine, fusion=args.fusion, batch_size=args.batch_size),
        margin=args.margin,
        post_ratio=args.post_ratio,
        mode=getattr(args, "mode", "c2f"),
        device=args.device,
        precision=args.precision,
        accumulate_on=args.accumulate_on,
    )


def bundle_uri(given: str | None, stage: str) -> str:
    """The bundle to use for a stage: the given URI, else the shipped demo bundle."""
    from resdsn_ray.bundle import CONFIG_FILE, demo_bundle_uri

    if given:
        return given
    demo = demo_bundle_uri(stage)
    if not (Path(demo) / CONFIG_FILE).exists():
        raise InputError(f"--{stage}", "no bundle given and no demo bundle is shipped in this install")
    return demo


def cmd_synth(args: argparse.Namespace) -> int:
    from resdsn_ray.synthetic import write_archive

    cases = write_archive(args.out, cases=args.cases, seed=args.seed, shape=tuple(args.shape))
    print(f"wrote {len(cases)} synthetic cases (MSD layout) to {args.out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from resdsn_ray.bundle import load_bundle
    from resdsn_ray.engine import CoarseToFine
    from resdsn_ray.volumes import read_volume, write_mask
    from resdsn_ray.metrics import case_metrics

    config = engine_config(args)
    coarse = load_bundle(bundle_uri(args.coarse, "coarse")) if config.mode != "fine" else None
    fine = load_bundle(bundle_uri(args.fine, "fine")) if config.mode != "coarse" else None
    start = time.perf_counter()
    volume = read_volume(args.image)
    t_read = time.perf_counter() - start
    result = CoarseToFine(coarse, fine, config).segment(volume)
    start = time.perf_counter()
    write_mask(args.out, result.mask, like=volume)
    t_write = time.perf_counter() - start
    report = {
        "image": args.image,
        "mask": args.out,
        "status": result.status,
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "coarse_bbox": result.box.to_list() if result.box else None,
        "coarse_windows": result.coarse_windows,
        "fine_windows": result.fine_windows,
        "t_read_s": t_read,
        **{f"t_{stage}_s": seconds for stage, seconds in result.timings.items()},
        "t_write_s": t_write,
    }
    if args.label:
        reference = read_volume(args.label)
        if reference.shape != volume.shape:
            raise InputError(args.label, f"label shape {reference.shape} differs from the image's {volume.shape}")
        report.update(case_metrics(result.mask > 0, reference.array > 0, volume.spacing))
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else value
        print(f"{key:>16}: {shown}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from resdsn_ray.training import run_train

    return run_train(args)


def cmd_metrics_summary(args: argparse.Namespace) -> int:
    from resdsn_ray.query import summary

    print(summary(args.output, run=args.run_id, by=args.by).text(), end="")
    return 0


def cmd_metrics_query(args: argparse.Namespace) -> int:
    from resdsn_ray.query import query

    text = query(args.output, args.sql, fmt=args.format, out=args.out)
    print(text if text is not None else f"wrote {args.out}\n", end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from resdsn_ray.report import build_report

    print(f"wrote {build_report(args.output, html_uri=args.html, run=args.run_id)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resdsn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic CT archive (MSD layout)")
    synth.add_argument("out", help="output folder or URI")
    synth.add_argument("--cases", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    synth.set_defaults(run=cmd_synth)

    segment = commands.add_parser("segment", help="segment one case without Ray")
    segment.add_argument("image", help="NIfTI file or DICOM series folder (path or URI)")
    segment.add_argument("--out", required=True, help="output mask URI (.nii.gz)")
    segment.add_argument("--label", help="reference mask: print metrics")
    add_engine_flags(segment)
    segment.set_defaults(run=cmd_segment)

    train = commands.add_parser("train", help="train a coarse or fine ResDSN with Ray Train (DDP)")
    train.set_defaults(run=cmd_train)
    add_train_flags(train)

    cv = commands.add_parser("cv", help="k-fold cross-validation: train and evaluate every fold on the cluster")
    cv.set_defaults(run=run_cv_command)
    add_cv_flags(cv)

    metrics = commands.add_parser("metrics", help="summaries and SQL over an output's metrics rows")
    metrics_commands = metrics.add_subparsers(dest="metrics_command", required=True)
    summary = metrics_commands.add_parser("summary", help="per-method DSC, HD95, NSD and time per case (paper Tables 2, 5)")
    summary.add_argument("output", metavar="OUTPUT_URI")
    summary.add_argument("--run", dest="run_id", help="only runs whose id is or starts with this (a CV id: all its folds)")
    summary.add_argument("--by", choices=["mode", "fold"], default="mode", help="one line per mode, or per fold and mode")
    summary.set_defaults(run=cmd_metrics_summary)
    sql = metrics_commands.add_parser("query", help="DuckDB SQL over the rows: tables `metrics` (every attempt), `latest`")
    sql.add_argument("output", metavar="OUTPUT_URI")
    sql.add_argument("sql", metavar="SQL")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sql.add_argument("--out", help="write the result to this file or URI instead of stdout (parquet needs it)")
    sql.set_defaults(run=cmd_metrics_query)

    report = commands.add_parser("report", help="static HTML report: summaries, DSC plots, QA overlays, cases, errors")
    report.add_argument("output", metavar="OUTPUT_URI")
    report.add_argument("--html", help="report file (default: OUTPUT_URI/report/index.html); its images go beside it")
    report.add_argument("--run", dest="run_id", help="only runs whose id is or starts with this")
    report.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
