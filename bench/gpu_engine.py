"""GPU engine benchmark: C2F on a 512 x 512 x 300 volume, full-width ResDSN, P = 64, n = 6 / 12.

For a bare GPU box: needs this repository, torch, numpy and the engine's small dependencies
(safetensors, fsspec, connected-components-3d); no Ray, nibabel, pydicom or s3fs. Prints the
device and what the engine's "auto" settings resolved to, then coarse (whole volume), fine (the
organ box + margin), C2F and fine-only seconds, windows/s, achieved conv TFLOP/s against the
device's dense bf16 peak, peak GPU memory, and the bare-forward ceiling. The batch size is
chosen from free GPU memory unless given. The engine copies the volume to the GPU in pinned
slabs on a side stream while the first windows compute. Goal for the record: C2F <= 2 s per case
on one H100/H200 (the paper's TITAN X took 245 s) and >= 50 % of the bf16 conv peak.

    python bench/gpu_engine.py [--shape 512 512 300] [--batch-size B] [--compile reduce-overhead]
    python bench/gpu_engine.py --device cpu --shape 64 64 64     # smoke check without a GPU

The volume is noise (random weights make the content irrelevant to speed) with an organ box of
the synthetic phantoms' pancreas at this size (`resdsn_ray.synthetic`, seed 7 at 512 x 512 x 300:
188 x 68 x 89 voxels, i.e. 150 x 54 x 72 mm at 0.8 mm), so the fine stage gets a realistic crop.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, uninstalled
from common import bare_forward_windows_per_s, describe, engine, sync, timed_c2f

from resdsn_ray.config import EngineConfig, choices
from resdsn_ray.model import build_model

ORGAN = (188 / 512, 68 / 512, 89 / 300)  # organ box per axis, as a share of the volume
# Dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets (A10G: as AWS sells it,
# GA102 at the GeForce tensor rate), matched on the device name in this order.
BF16_PEAK_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0), (r"\bH100\b.*\bNVL\b", 835.0), (r"\bH100\b", 989.0),
    (r"\bH200\b.*\bNVL\b", 835.0), (r"\bH200\b", 989.0), (r"\bA100\b", 312.0),
    (r"\bA10G\b", 70.0), (r"\bL4\b", 121.0),
)


def peak_tflops(name: str) -> float | None:
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, name)), None)


def conv_flops_per_window(width: int, patch: int) -> int:
    """Convolution FLOPs of one window's forward, counted by torch on shapes only (meta device)."""
    with torch.device("meta"):
        model = build_model("resdsn", width=width).eval()
        window = torch.empty(1, 1, patch, patch, patch)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(window)
    return counter.get_total_flops()


def batch_from_free_memory(width: int, patch: int, device: torch.device, precision: str, channels_last: str,
                           cap: int = 256) -> int:
    """The largest power of two up to `cap` windows whose forward fits in half the free memory
    (the other half: the volume, the stitching accumulator, cuDNN workspaces)."""
    probe = engine(width, patch, str(device), batch_size=2, precision=precision, channels_last=channels_last)
    x = torch.randn(2, 1, patch, patch, patch, device=device).contiguous(memory_format=probe.memory_format)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), probe.precision_context():
        probe.coarse.model(x)
    per_window = (torch.cuda.max_memory_allocated(device) - base) / 2
    free = torch.cuda.mem_get_info(device)[0]
    fits = max(1, min(cap, int(0.5 * free / per_window)))
    print(f"forward memory {per_window / 2**20:.0f} MiB per window, {free / 2**30:.1f} GiB free")
    return 1 << (fits.bit_length() - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, help="windows per forward (default: from free GPU memory; CPU: 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=choices(EngineConfig, "precision"), default=EngineConfig().precision)
    parser.add_argument("--channels-last", choices=choices(EngineConfig, "channels_last"), default=EngineConfig().channels_last)
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile the models in this mode (reduce-overhead: CUDA graphs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name)
    print(f"device {name}{f' (compute capability {torch.cuda.get_device_capability(device)})' if cuda else ''}, "
          f"torch {torch.__version__}, bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'n/a'}")
    torch.backends.cudnn.benchmark = True

    rng = np.random.default_rng(7)
    image = rng.standard_normal(tuple(args.shape), dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[tuple(slice(round(s * (1 - f) / 2), round(s * (1 + f) / 2)) for s, f in zip(image.shape, ORGAN))] = 1
    batch = args.batch_size or (
        batch_from_free_memory(args.width, args.patch, device, args.precision, args.channels_last) if cuda else 4)
    eng = engine(args.width, args.patch, args.device, batch, args.precision, args.channels_last)
    if args.compile:
        for bundle in (eng.coarse, eng.fine):
            bundle.model = torch.compile(bundle.model, mode=args.compile)
    flops = conv_flops_per_window(args.width, args.patch)
    print(f"volume {image.shape}, patch {args.patch}, width {args.width}, batch {batch}, engine {describe(eng)}, "
          f"compile {args.compile or 'off'}, {flops / 1e9:.1f} conv GFLOP per window")

    start = time.perf_counter()
    warm = tuple(slice(0, 2 * args.patch) for _ in range(3))
    timed_c2f(eng, image[warm], np.ones_like(label[warm]))  # cuDNN autotuning (and compilation) of the one batch shape
    print(f"warm-up {time.perf_counter() - start:.1f} s")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = timed_c2f(eng, image, label)
    _, fine_only_windows, fine_only_s = eng.run_stage("fine", image)
    sync(device)

    def rate(windows: int, seconds: float) -> str:
        tflops = windows * flops / seconds / 1e12
        share = f", {100 * tflops / peak:.0f} % of peak" if peak else ""
        return f"{windows / seconds:.4g} windows/s, {tflops:.3g} TFLOP/s{share}"

    c2f_windows = result["coarse_windows"] + result["fine_windows"]
    print(f"coarse {result['coarse_s']:.2f} s ({result['coarse_windows']} windows; {rate(result['coarse_windows'], result['coarse_s'])})")
    print(f"fine   {result['fine_s']:.2f} s ({result['fine_windows']} windows, box {result['box']}; "
          f"{rate(result['fine_windows'], result['fine_s'])})")
    print(f"C2F    {result['c2f_s']:.2f} s ({c2f_windows} windows; {rate(c2f_windows, result['c2f_s'])}) (goal <= 2 s on H100/H200)")
    print(f"fine-only {fine_only_s:.2f} s ({fine_only_windows} windows; {rate(fine_only_windows, fine_only_s)}) "
          f"-> C2F / fine-only {result['c2f_s'] / fine_only_s:.3f}")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    bare = bare_forward_windows_per_s(eng, min(c2f_windows, 8 * batch), batch)
    print(f"bare forward {bare:.4g} windows/s ({bare * flops / 1e12:.3g} TFLOP/s) -> C2F engine / bare "
          f"{c2f_windows / result['c2f_s'] / bare:.2f}")


if __name__ == "__main__":
    main()
