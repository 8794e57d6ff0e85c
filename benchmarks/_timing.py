"""Timing helpers shared by the CPU benchmarks: medians of interleaved runs, so that
a busy machine slows both sides of a ratio alike."""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np


def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: dict, *, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds of each zero-argument function, runs interleaved round-robin."""
    for f in fns.values():
        for _ in range(warmup):
            block(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            block(f())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.default_backend()}, load average {load:.1f}"
    )
