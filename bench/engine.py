"""CPU engine benchmark: stitching overhead and coarse-to-fine against fine-only time.

Prints, from one run on one synthetic volume:
1. engine windows/s against the bare model forward on the same number of windows
   (goal >= 0.9: cutting, batching and stitching cost <= 10 %), full-width ResDSN;
2. C2F time against fine-only (n = 12 on the whole volume) on the same volume (paper:
   245 / 382 = 0.64; goal <= 0.65). Window counts decide this ratio, and they depend on the
   volume and the crop measured in patches: the paper's 512 x 512 x ~300 volumes at P = 64 are
   8 x 8 x 4.7 patches with a 20-voxel margin. This part keeps those proportions at a scale a
   2-core CPU finishes in minutes: P = 16, a 128 x 128 x 75 volume, margin 5, width 8.

    python bench/engine.py [--shape 96 96 64] [--patch 32] [--c2f-patch 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_forward_windows_per_s, case, engine, timed_c2f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--c2f-patch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image, label = case(tuple(args.shape))
    print(f"volume {tuple(args.shape)}, organ voxels {int(label.sum())}, patch {args.patch}, threads {args.threads}")

    full = engine(width=32, patch=args.patch, device="cpu", batch_size=4, n_coarse=1)
    _, windows, seconds = full.run_stage("coarse", image)
    engine_rate = windows / seconds
    bare_rate = bare_forward_windows_per_s(full, windows, batch_size=4)
    print(f"[1] full width: engine {engine_rate:.2f} windows/s ({windows} windows), "
          f"bare forward {bare_rate:.2f} windows/s -> ratio {engine_rate / bare_rate:.3f} (goal >= 0.9)")

    patch = args.c2f_patch
    image, label = case((8 * patch, 8 * patch, round(300 / 64 * patch)))
    narrow = engine(width=8, patch=patch, device="cpu", batch_size=8, margin=round(20 / 64 * patch))
    c2f = timed_c2f(narrow, image, label)
    _, fine_only_windows, fine_only_s = narrow.run_stage("fine", image)
    print(f"[2] width 8, P {patch}, volume {image.shape}: coarse {c2f['coarse_s']:.1f} s ({c2f['coarse_windows']} windows) + fine {c2f['fine_s']:.1f} s "
          f"({c2f['fine_windows']} windows, box {c2f['box']}) = C2F {c2f['c2f_s']:.1f} s; "
          f"fine-only {fine_only_s:.1f} s ({fine_only_windows} windows) -> C2F / fine-only "
          f"{c2f['c2f_s'] / fine_only_s:.3f} (paper 0.64, goal <= 0.65)")


if __name__ == "__main__":
    main()
