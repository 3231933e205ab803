"""GPU engine benchmark: C2F on a synthetic 512 x 512 x 300 volume at full width (P = 64).

Runs with torch alone (no Ray): a bare GPU box needs only this repository, numpy, scipy,
nibabel, cc3d and safetensors. Prints seconds per stage and windows/s for fp32 and bf16
(channels-last), and the bare-forward ceiling. Goal: C2F <= 2 s on one H100 (the paper took
245 s on a TITAN X).

    python bench/gpu_engine.py [--shape 512 512 300] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bare_forward_windows_per_s, case, engine, timed_c2f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True
    image, label = case(tuple(args.shape))
    print(f"volume {tuple(args.shape)}, organ voxels {int(label.sum())}, patch {args.patch}, batch {args.batch_size}")
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        eng = engine(32, args.patch, args.device, args.batch_size, precision, channels_last)
        timed_c2f(eng, image[:128, :128, :96], label[:128, :128, :96] | 1)  # warm-up: cudnn autotuning
        result = timed_c2f(eng, image, label)
        windows = result["coarse_windows"] + result["fine_windows"]
        bare = bare_forward_windows_per_s(eng, min(windows, 512), args.batch_size)
        print(f"{precision}{' channels-last' if channels_last else ''}: coarse {result['coarse_s']:.2f} s "
              f"({result['coarse_windows']} windows), fine {result['fine_s']:.2f} s ({result['fine_windows']} windows, "
              f"box {result['box']}), C2F {result['c2f_s']:.2f} s, {windows / result['c2f_s']:.0f} windows/s "
              f"(bare forward {bare:.0f} windows/s, ratio {windows / result['c2f_s'] / bare:.2f})")


if __name__ == "__main__":
    main()
