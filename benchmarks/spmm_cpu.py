"""sparse_matmul "xla" (the CPU path) against a dense ``x @ W`` of the same shape.

Run: python benchmarks/spmm_cpu.py [--repeats 7]

Prints, per (K, O, T) and pattern, the median time of each and ratio = dense / sparse
(> 1: sparse is faster), plus which reference path the dispatch chose.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import hinm_jax
from hinm_jax import ops

from _timing import interleaved, machine

SHAPES = [(4096, 4096), (4096, 11008)]
TOKENS = [1, 16, 256]
PATTERNS = ["hinm:64:0.5:2:4", "hinm:32:0.5:2:4", "2:4"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"# sparse_matmul 'xla' vs dense x @ W, float32 -- {machine()}")
    print(f"{'K':>6} {'O':>6} {'T':>5} {'pattern':<16} {'path':<7} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6}")
    worst = float("inf")
    for k, o in SHAPES:
        w = jax.random.normal(jax.random.key(0), (k, o))
        dense_mm = jax.jit(lambda x, w: x @ w)
        for spec in PATTERNS:
            sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, spec))["w"]
            wd = sw.densify()
            sparse_mm = jax.jit(lambda x, s: hinm_jax.sparse_matmul(x, s, implementation="xla"))
            for t in TOKENS:
                x = jax.random.normal(jax.random.key(t), (t, k))
                res = interleaved(
                    {"dense": lambda: dense_mm(x, wd), "sparse": lambda: sparse_mm(x, sw)}, repeats=args.repeats
                )
                ratio = res["dense"] / res["sparse"]
                worst = min(worst, ratio)
                path = "gather" if ops._use_gather(t, k, sw) else "dense"
                print(
                    f"{k:>6} {o:>6} {t:>5} {spec:<16} {path:<7} {res['dense'] * 1e3:9.2f} "
                    f"{res['sparse'] * 1e3:10.2f} {ratio:6.2f}"
                )
    print(f"worst ratio {worst:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
