"""Accuracy of a coarse/fine bundle pair on held-out synthetic phantoms, in the paper's layout.

For each mode (coarse-only, fine-only on the whole volume, C2F) prints mean +- std, min and max
DSC and the mean seconds per case (paper Tables 2 and 5), from one run.

    python bench/accuracy.py [--coarse B --fine B] [--cases 8] [--seed 777]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from resdsn_ray.bundle import demo_bundle_uri, load_bundle
from resdsn_ray.config import EngineConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.volumes import Volume
from resdsn_ray.metrics import case_metrics
from resdsn_ray.synthetic import case_seed, make_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coarse", default=demo_bundle_uri("coarse"))
    parser.add_argument("--fine", default=demo_bundle_uri("fine"))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=777, help="archive seed: keep it apart from the training seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    coarse, fine = load_bundle(args.coarse), load_bundle(args.fine)
    engines = {mode: CoarseToFine(coarse, fine, EngineConfig(mode=mode, device="cpu")) for mode in ("coarse", "fine", "c2f")}
    scores: dict[str, list[float]] = {mode: [] for mode in engines}
    seconds: dict[str, list[float]] = {mode: [] for mode in engines}
    for index in range(args.cases):
        image, label, affine = make_case(case_seed(args.seed, index))
        volume = Volume(array=image.astype(np.float32), affine=affine, source=f"synthetic:{args.seed}/{index}")
        for mode, engine in engines.items():
            start = time.perf_counter()
            result = engine.segment(volume)
            seconds[mode].append(time.perf_counter() - start)
            scores[mode].append(case_metrics(result.mask > 0, label > 0, volume.spacing)["dsc"])
        print(f"case {index}: " + "  ".join(f"{mode} {scores[mode][-1]:.4f}" for mode in engines), flush=True)
    print(f"{'mode':>7} {'mean DSC':>17} {'min':>7} {'max':>7} {'s/case':>7}")
    for mode in ("c2f", "coarse", "fine"):
        dsc = np.array(scores[mode])
        print(f"{mode:>7} {dsc.mean():.4f} +- {dsc.std():.4f} {dsc.min():7.4f} {dsc.max():7.4f} {np.mean(seconds[mode]):7.2f}")


if __name__ == "__main__":
    main()
