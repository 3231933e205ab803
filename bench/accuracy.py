"""Accuracy of a coarse/fine bundle pair on held-out synthetic phantoms of either family (`demo`,
the quick one the demo bundles are trained on, or `hard`: anisotropic, organ <= 0.5 %), in the
paper's layout, and the parity of the engine's fast defaults with fp32.

For each mode (coarse-only, fine-only on the whole volume, C2F) with the engine's default
settings (precision and channels-last "auto", resolved as printed), and for C2F in plain fp32
(contiguous), prints mean +- std, min and max DSC, the cases without a mask (no_organ) and the
mean seconds per case (paper Tables 2 and 5); then, per case, the DSC of the default C2F mask against the fp32 one. Parity goals:
>= 0.99 on every case, mean DSC against the ground truth lower by <= 0.002. From one run.

With `--fast`: C2F with the paper's windows (or --n-coarse / --n-fine) against C2F with
`config.FAST_ENGINE`'s (`--fast` of `resdsn segment` / `archive`): the DSC each gets and the
speed-up, the figures the README prints.

    python bench/accuracy.py [--coarse B --fine B] [--family demo|hard] [--cases 8] [--seed 777] [--precision bf16]
                             [--modes c2f coarse] [--no-parity] [--fast]

On the hard family fine-only means 4,500 windows a case at n = 12 (192 x 192 x 80 voxels, P = 32):
`--modes c2f coarse --no-parity` scores what the paper's C2F claim needs at a third of the cost.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from resdsn_ray.bundle import demo_bundle_uri, load_bundle
from resdsn_ray.config import (DEFAULT_FAMILY, FAMILY_NAMES, FAST_ENGINE, MODES, STATUS_NO_ORGAN, EngineConfig,
                               WindowConfig, choices)
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.metrics import case_metrics
from resdsn_ray.synthetic import family_case
from resdsn_ray.volumes import Volume

REFERENCE = "c2f fp32"
FAST = "c2f fast"


def main() -> None:
    paper = EngineConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coarse", default=demo_bundle_uri("coarse"))
    parser.add_argument("--fine", default=demo_bundle_uri("fine"))
    parser.add_argument("--family", choices=FAMILY_NAMES, default=DEFAULT_FAMILY, help="phantom family (resdsn synth)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=777, help="archive seed: keep it apart from the training seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=choices(EngineConfig, "precision"), default=paper.precision,
                        help="of the engine compared with fp32 (default: the engine's default)")
    parser.add_argument("--channels-last", choices=choices(EngineConfig, "channels_last"), default=paper.channels_last)
    parser.add_argument("--n-coarse", type=int, default=paper.coarse.n)
    parser.add_argument("--n-fine", type=int, default=paper.fine.n)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to score")
    parser.add_argument("--no-parity", action="store_true", help="skip the fp32 C2F reference and the parity line")
    parser.add_argument("--fast", action="store_true", help="compare C2F with --fast's windows instead of the modes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def build(mode: str, windows: EngineConfig | None = None, **settings: str) -> CoarseToFine:
        # Bundles loaded per engine: an engine sets its models' memory layout in place.
        coarse, fine = (windows.coarse, windows.fine) if windows else (WindowConfig(n=args.n_coarse), WindowConfig(n=args.n_fine))
        config = EngineConfig(coarse=coarse, fine=fine, mode=mode, device="cpu", **settings)
        return CoarseToFine(load_bundle(args.coarse), load_bundle(args.fine), config)

    defaults = {"precision": args.precision, "channels_last": args.channels_last}
    if args.fast:
        engines = {"c2f": build("c2f", **defaults), FAST: build("c2f", FAST_ENGINE, **defaults)}
    else:
        engines = {mode: build(mode, **defaults) for mode in args.modes}
    parity_check = not args.fast and not args.no_parity and "c2f" in engines
    if parity_check:
        engines[REFERENCE] = build("c2f", precision="fp32", channels_last="off")
    first = next(iter(engines.values()))
    print(f"windows n = {args.n_coarse} / {args.n_fine}"
          + (f" (--fast: {FAST_ENGINE.coarse.n} / {FAST_ENGINE.fine.n})" if args.fast else "")
          + f"; engine settings {defaults} -> {first.precision}, {'channels-last' if first.channels_last else 'contiguous'}")
    scores: dict[str, list[float]] = {name: [] for name in engines}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    no_organ: dict[str, int] = {name: 0 for name in engines}
    parity: list[float] = []
    windows: dict[str, list[int]] = {name: [] for name in engines}
    for index in range(args.cases):
        image, label, affine = family_case(args.family, args.seed, index)
        volume = Volume(array=image.astype(np.float32), affine=affine, source=f"synthetic:{args.family}/{args.seed}/{index}")
        masks = {}
        for name, engine in engines.items():
            start = time.perf_counter()
            result = engine.segment(volume)
            seconds[name].append(time.perf_counter() - start)
            masks[name] = result.mask > 0
            no_organ[name] += result.status == STATUS_NO_ORGAN
            windows[name].append(result.coarse_windows + result.fine_windows)
            scores[name].append(case_metrics(masks[name], label > 0, volume.spacing)["dsc"])
        line = f"case {index}: " + "  ".join(f"{name} {scores[name][-1]:.4f} ({seconds[name][-1]:.1f} s)" for name in engines)
        if parity_check:
            parity.append(case_metrics(masks["c2f"], masks[REFERENCE], volume.spacing)["dsc"])
            line += f"  | c2f vs fp32 mask DSC {parity[-1]:.5f}"
        print(line, flush=True)
    print(f"{args.family} family, {args.cases} cases of seed {args.seed}")
    print(f"{'mode':>9} {'mean DSC':>17} {'min':>7} {'max':>7} {'no_organ':>8} {'s/case':>7} {'windows':>8}")
    for name in engines:
        dsc = np.array(scores[name])
        print(f"{name:>9} {dsc.mean():.4f} +- {dsc.std():.4f} {dsc.min():7.4f} {dsc.max():7.4f} {no_organ[name]:8d} "
              f"{np.mean(seconds[name]):7.2f} {np.mean(windows[name]):8.0f}")
    if args.fast:
        print(f"--fast: mean DSC lower by {np.mean(scores['c2f']) - np.mean(scores[FAST]):+.4f}, time per case "
              f"{np.mean(seconds['c2f']) / np.mean(seconds[FAST]):.0f}x faster")
    if not parity_check:
        return
    drop = np.mean(scores[REFERENCE]) - np.mean(scores["c2f"])
    print(f"parity of the defaults with fp32 (C2F): mask DSC min {min(parity):.5f}, mean {np.mean(parity):.5f} "
          f"(goal >= 0.99 per case); mean DSC against the ground truth lower by {drop:+.5f} (goal <= 0.002); "
          f"time per case {np.mean(seconds[REFERENCE]) / np.mean(seconds['c2f']):.2f}x faster")


if __name__ == "__main__":
    main()
