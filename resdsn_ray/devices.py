"""What a device computes natively, so that the engine's "auto" settings pick fast arithmetic by
detection, never by guessing.

bf16 pays only where the hardware has bf16 units: CUDA compute capability >= 8.0 (Ampere and
later tensor cores) and CPUs with AVX-512 BF16 or AMX. Elsewhere torch still computes bf16
correctly but through reference kernels: on an AVX2 CPU (AMD EPYC, Zen 3) a full-width window
took ~100x longer in bf16 than in fp32 (torch 2.13), so "auto" must fall back to fp32 there.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags the kernel reports (Linux); None where /proc/cpuinfo is absent."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic units (else bf16 is emulated, slowly)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & CPU_BF16_FLAGS)
    # No /proc/cpuinfo (macOS, Windows): torch's own CPUID probe.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the device runs it natively, fp32 elsewhere; others as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def resolve_channels_last(setting: str, device: torch.device, precision: str) -> bool:
    """`auto`: channels-last 3-D (NDHWC) where it is the faster layout; `on` / `off` as given.

    CPU: oneDNN's convolutions are faster on NDHWC (AVX2 EPYC, fp32, full-width ResDSN, P = 32:
    1.27-1.41x the engine's windows/s in bench/engine.py), and its bf16/AMX kernels are
    NDHWC-native. CUDA: cuDNN's tensor-core kernels in bf16/fp16 are NDHWC-native (NCDHW costs
    transposes around each conv); in fp32 we keep NCDHW, the layout its classic kernels are
    tuned for.
    """
    if setting != "auto":
        return setting == "on"
    if device.type == "cpu":
        return True
    return device.type == "cuda" and precision != "fp32"
