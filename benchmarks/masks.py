"""Mask throughput: HiNM(64, 0.5, 2, 4) masks for every linear layer of an 8-layer,
4096-wide MLP stack (up 4096x8192 and down 8192x4096 per layer, 537 M parameters), under jit.

Run: python benchmarks/masks.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import hinm_jax

from _timing import block, machine


def main(layers: int = 8, width: int = 4096, hidden: int = 8192):
    key = jax.random.key(0)
    params = {}
    for i in range(layers):
        k1, k2, key = jax.random.split(key, 3)
        params[f"layer_{i}"] = {
            "up": {"kernel": jax.random.normal(k1, (width, hidden))},
            "down": {"kernel": jax.random.normal(k2, (hidden, width))},
        }
    n = sum(x.size for x in jax.tree.leaves(params))
    pattern = hinm_jax.HiNM(64, 0.5, 2, 4)
    fn = jax.jit(lambda p: hinm_jax.prune(p, pattern))
    t0 = time.perf_counter()
    block(fn(params))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        block(fn(params))
        runs.append(time.perf_counter() - t0)
    best = min(runs)
    print(f"# prune {pattern} under jit -- {machine()}")
    print(f"parameters {n / 1e6:.0f} M, first call (with compile) {first:.2f} s, steady {best:.2f} s")
    print(f"throughput {n / best / 1e6:.0f} M parameters/s (target >= 100)")


if __name__ == "__main__":
    main()
