"""Where and how the computation runs: the device, bf16 autocast, the memory format, and seeding."""

import os
import platform
import random
import resource
import sys

import numpy as np
import torch
import torch.nn as nn

from masktune.console import UserError, check


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must exist here. On the CPU, denormal floats
    are flushed to zero: a loss near 0 gives denormal gradients, each many times slower to multiply on x86
    (a fine-tune epoch on a learned marker: 5 s instead of 0.2 s), and too small to change a weight."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    check(available.get(device.type, False), f"device {name!r} is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        check(device.index < torch.cuda.device_count(), f"device {name!r} does not exist here")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX instructions
    (elsewhere bf16 would be emulated, slower than fp32)."""
    if device.type == "cuda":
        return True
    cpu_checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in cpu_checks)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast when ``amp`` and bf16 is native on ``device`` (no loss scaling needed); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and native_bf16(device))


def prepare_model(
    model: nn.Module, device: torch.device, *, channels_last: bool = False, compile_model: bool = False
) -> nn.Module:
    """Move ``model`` to ``device``; ``channels_last``: NHWC convolutions (faster on CUDA and on CPUs with
    oneDNN); on CUDA, cuDNN autotuning; ``compile_model``: torch.compile in place (the module keeps its class
    and state-dict names)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last and device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()
    return model


def fits_on_device(nbytes: int, device: torch.device, budget_gb: float) -> bool:
    """Whether data of ``nbytes`` goes to ``device`` whole: within ``budget_gb``, or with a negative budget
    within half the free memory of a CUDA device (the rest is for the model and its activations); on a CPU
    or MPS device (host memory) it always does."""
    if budget_gb >= 0:
        return nbytes <= budget_gb * 1e9
    if device.type == "cuda":
        return nbytes <= torch.cuda.mem_get_info(device)[0] / 2
    return True


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for the data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def describe_machine(device: torch.device) -> str:
    """The machine a run measured on, for its results: the GPU's name, or the CPU's model and core count,
    and whether bf16 is native (it changes rounding, and speed)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name}, {os.cpu_count()} cores"
    return f"{name}{', native bf16' if native_bf16(device) else ''}"


class PeakMemory:
    """Peak memory per stage, in GB: ``record(stage)`` notes the process's peak resident host memory so far
    (the operating system keeps no per-stage peak; pages of a memory-mapped cache count) and, on CUDA, the
    peak device allocation since the previous record. ``stages`` holds what was recorded."""

    def __init__(self, device: torch.device):
        self.device, self.stages = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def record(self, stage: str) -> dict:
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = {"host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e9, 3)}
        if self.device.type == "cuda":
            peak["device_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.stages[stage] = peak
        return peak

    def __str__(self) -> str:
        stages = ", ".join(
            f"{s} {' / '.join(f'{v:.2f}' for v in p.values())}" for s, p in self.stages.items()
        )
        return (
            f"peak memory per stage, GB (host{' / device' if self.device.type == 'cuda' else ''}): {stages}"
        )
