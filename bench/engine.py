"""CPU engine benchmark: stitching overhead, the fast defaults against MONAI, coarse-to-fine
against fine-only time.

Prints, from one run on one synthetic volume (every timing the best of `--rounds` rounds that
alternate the variants, after a warm-up, so that a load change on a shared machine hits all
variants alike and the first stage does not pay the process's one-off start-up):
1. engine windows/s with the default settings (precision and channels-last "auto", resolved
   as printed) against the bare model forward on the same number of windows (goal >= 0.9:
   cutting, batching and stitching cost <= 10 %), full-width ResDSN; the same engine forced to
   fp32 / contiguous (the former defaults); and MONAI's `sliding_window_inference` with its
   defaults (fp32, contiguous model, constant blending) on the same weights, batch size and
   window count (its overlap is set per axis so that its window count per axis equals ours;
   goal: ours / MONAI >= 2.0 on a CPU with native bf16, >= 1.0 elsewhere). MONAI is a bench-only
   dependency (`pip install monai`, or the `bench` extra); without it that line says so.
2. C2F time against fine-only (n = 12 on the whole volume) on the same volume (paper:
   245 / 382 = 0.64; goal <= 0.65), and that time ratio against the window ratio (goal <= 1.1:
   a window costs the same on the crop as on the whole volume). Window counts decide the first
   ratio, and they depend on the volume and the crop measured in patches: the paper's
   512 x 512 x ~300 volumes at P = 64 are 8 x 8 x 4.7 patches with a 20-voxel margin. This part
   keeps those proportions at a scale a 2-core CPU finishes in minutes: P = 16, a 128 x 128 x 75
   volume, margin 5, width 8.

    python bench/engine.py [--shape 96 96 64] [--patch 32] [--c2f-patch 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_forward_windows_per_s, case, describe, engine, random_bundle, timed_c2f

from resdsn_ray.boxes import bounding_box
from resdsn_ray.windows import window_starts


def best(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The least seconds of each run over `rounds` rounds, the runs alternating within a round."""
    seconds = {name: math.inf for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], run())
    return seconds


def monai_overlap(shape: tuple[int, ...], patch: int, n: int) -> tuple[list[float], int]:
    """MONAI overlaps per axis giving our window count per axis (or the nearest MONAI can
    give), and MONAI's total. MONAI steps by int(P * (1 - overlap)) and takes
    ceil((L - P) / step) + 1 windows per axis."""
    overlaps, total = [], 1
    for length in shape:
        k = len(window_starts(length, patch, n))
        if length <= patch:
            overlaps.append(0.0)
            continue
        count = {step: math.ceil((length - patch) / step) + 1 for step in range(1, patch + 1)}
        step = min(count, key=lambda s: (abs(count[s] - k), -s))
        overlaps.append(1.0 - (step + 0.5) / patch)  # int(P * (1 - overlap)) == step, safe from rounding
        total *= count[step]
    return overlaps, total


def monai_run(image: np.ndarray, patch: int, n: int, batch_size: int, width: int) -> tuple[Callable[[], float], int] | None:
    """A timed MONAI sliding-window run of the coarse model's weights (fp32, contiguous)."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    model = random_bundle("coarse", width, patch, 0).model.eval()  # same seed: same weights as ours
    overlap, windows = monai_overlap(image.shape, patch, n)
    volume = torch.as_tensor(image)[None, None]

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            scores = sliding_window_inference(volume, (patch,) * 3, batch_size,
                                              lambda x: torch.softmax(model(x), dim=1)[:, 1:], overlap=overlap)
            (scores[0, 0] > 0.5).numpy()
        return time.perf_counter() - start

    return run, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--c2f-patch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image, label = case(tuple(args.shape))
    print(f"volume {tuple(args.shape)}, organ voxels {int(label.sum())}, patch {args.patch}, threads {args.threads}, "
          f"best of {args.rounds} rounds")

    batch, n = 4, 1
    fast = engine(width=32, patch=args.patch, device="cpu", batch_size=batch, n_coarse=n)
    plain = engine(width=32, patch=args.patch, device="cpu", batch_size=batch, n_coarse=n,
                   precision="fp32", channels_last="off")
    windows = fast.run_stage("coarse", image)[1]  # warm-up, and the window count
    plain.run_stage("coarse", image)
    runs = {"fast": lambda: fast.run_stage("coarse", image)[2], "plain": lambda: plain.run_stage("coarse", image)[2],
            "bare": lambda: windows / bare_forward_windows_per_s(fast, windows, batch_size=batch)}
    monai = monai_run(image, args.patch, n, batch, width=32)
    if monai is not None:
        monai[0]()  # warm-up
        runs["monai"] = monai[0]
    seconds = best(args.rounds, runs)
    rate = {name: (monai[1] if name == "monai" else windows) / s for name, s in seconds.items()}
    print(f"[1] full width, {windows} windows, batch {batch}: engine ({describe(fast)}) {rate['fast']:.2f} windows/s, "
          f"bare forward {rate['bare']:.2f} windows/s -> ratio {rate['fast'] / rate['bare']:.3f} (goal >= 0.9)")
    print(f"    the same engine in fp32, contiguous (former defaults): {rate['plain']:.2f} windows/s -> "
          f"defaults / fp32 {rate['fast'] / rate['plain']:.2f}x")
    if monai is None:
        print("    MONAI: skipped (monai is not installed: pip install monai)")
    else:
        print(f"    MONAI sliding_window_inference (fp32, its defaults, {monai[1]} windows): {rate['monai']:.2f} windows/s "
              f"-> ours / MONAI {rate['fast'] / rate['monai']:.2f}x (goal >= 2.0 with native bf16, >= 1.0 elsewhere)")

    patch = args.c2f_patch
    image, label = case((8 * patch, 8 * patch, round(300 / 64 * patch)))
    narrow = engine(width=8, patch=patch, device="cpu", batch_size=8, margin=round(20 / 64 * patch))
    crop = image[bounding_box(label > 0, narrow.config.margin).slices]
    c2f = timed_c2f(narrow, image, label)  # warm-up, and the window counts
    fine_only_windows = narrow.run_stage("fine", image)[1]
    seconds = best(args.rounds, {
        "coarse": lambda: narrow.run_stage("coarse", image)[2],
        "fine": lambda: narrow.run_stage("fine", crop)[2],
        "fine_only": lambda: narrow.run_stage("fine", image)[2],
    })
    c2f_s = seconds["coarse"] + seconds["fine"]
    c2f_windows = c2f["coarse_windows"] + c2f["fine_windows"]
    time_ratio, window_ratio = c2f_s / seconds["fine_only"], c2f_windows / fine_only_windows
    per_window = {name: 1000 * seconds[name] / count for name, count in
                  (("coarse", c2f["coarse_windows"]), ("fine", c2f["fine_windows"]), ("fine_only", fine_only_windows))}
    print(f"[2] width 8, P {patch}, volume {image.shape}, {describe(narrow)}: coarse {seconds['coarse']:.2f} s "
          f"({c2f['coarse_windows']} windows) + fine {seconds['fine']:.2f} s ({c2f['fine_windows']} windows, "
          f"box {c2f['box']}) = C2F {c2f_s:.2f} s; fine-only {seconds['fine_only']:.2f} s ({fine_only_windows} windows) "
          f"-> C2F / fine-only {time_ratio:.3f} (paper 0.64, goal <= 0.65)")
    print(f"    ms per window: coarse {per_window['coarse']:.2f}, fine on the crop {per_window['fine']:.2f}, fine-only "
          f"{per_window['fine_only']:.2f}; time ratio / window ratio {time_ratio:.3f} / {window_ratio:.3f} = "
          f"{time_ratio / window_ratio:.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
