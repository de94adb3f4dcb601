"""Measure what this device can do: sustained GFLOP/s (a matmul benchmark) and available memory."""
from __future__ import annotations

import platform
import statistics
import time

import torch

from .types import DeviceProfile

__all__ = ["measure_device", "measure_gflops", "available_memory_bytes"]


def measure_gflops(device: str | torch.device = "cpu", *, size: int = 1024, repeats: int = 5,
                   dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of a ``size``×``size`` matmul (2·n³ FLOPs) after a warm-up."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):
            a @ b
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            ts.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(ts) / 1e9


def available_memory_bytes(device: str | torch.device = "cpu") -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def measure_device(name: str | None = None, *, device: str | torch.device = "cpu",
                   size: int = 1024, repeats: int = 5) -> DeviceProfile:
    """A ``DeviceProfile`` with measured GFLOP/s and available memory (power fields left 0:
    they come from a device file or an energy meter)."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if name is None:
        name = torch.cuda.get_device_name(device) if kind == "cuda" else (platform.processor() or "cpu")
    return DeviceProfile(
        name=name, kind=kind, gflops=measure_gflops(device, size=size, repeats=repeats),
        memory_bytes=available_memory_bytes(device),
        measured={"gflops": True, "memory_bytes": True})
