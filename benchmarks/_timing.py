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


def interleaved(fns: dict, *, repeats: int = 7, warmup: int = 2, burst_seconds: float = 0.0) -> dict:
    """Median seconds of each zero-argument function, runs interleaved round-robin.

    With ``burst_seconds``, each turn of a function is a burst of back-to-back calls lasting
    about that long (the count fixed from the warm-up), timed as a whole and divided: the
    steady-state time of a call, not the time of a call whose caches the other functions
    just evicted.
    """
    calls = {}
    for k, f in fns.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            block(f())
            dt = time.perf_counter() - t0
        calls[k] = max(1, int(burst_seconds / max(dt, 1e-9))) if burst_seconds else 1
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                out = f()
            block(out)
            times[k].append((time.perf_counter() - t0) / calls[k])
    return {k: float(np.median(v)) for k, v in times.items()}


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.default_backend()}, load average {load:.1f}"
    )
