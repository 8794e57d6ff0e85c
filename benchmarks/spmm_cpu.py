"""sparse_matmul "xla" (the CPU path) against a dense ``x @ W`` of the same shape.

Run: cd benchmarks && python spmm_cpu.py [--repeats 9] [--shapes 4096x4096] [--tokens 1,16]
     [--patterns 2:4]

Prints, per (K, O, T) and pattern, the median time of each and ratio = dense / sparse
(> 1: sparse is faster), plus the strategy the reference chose (see
``hinm_jax._xla.strategy``). Dense and sparse run interleaved, so a machine shared with
other jobs slows both alike; the load average is printed with the header and the footer.
"""

from __future__ import annotations

import argparse
import os

import jax

import hinm_jax
from hinm_jax import _xla

from _timing import interleaved, machine

SHAPES = [(4096, 4096), (4096, 11008)]
TOKENS = [1, 16, 256]
PATTERNS = ["hinm:64:0.5:2:4", "hinm:32:0.5:2:4", "2:4"]


def _shapes(text):
    return [tuple(int(d) for d in s.split("x")) for s in text.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--shapes", type=_shapes, default=SHAPES, help="KxO[,KxO...]")
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=TOKENS)
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=PATTERNS)
    args = ap.parse_args()
    print(f"# sparse_matmul 'xla' vs dense x @ W, float32 -- {machine()}")
    print(f"{'K':>6} {'O':>6} {'T':>5} {'pattern':<16} {'path':<7} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6}")
    worst = float("inf")
    dense_mm = jax.jit(lambda x, w: x @ w)
    sparse_mm = jax.jit(lambda x, s: hinm_jax.sparse_matmul(x, s, implementation="xla"))
    for k, o in args.shapes:
        w = jax.random.normal(jax.random.key(0), (k, o))
        for spec in args.patterns:
            sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, spec))["w"]
            wd = sw.densify()
            for t in args.tokens:
                x = jax.random.normal(jax.random.key(t), (t, k))
                res = interleaved(
                    {"dense": lambda: dense_mm(x, wd), "sparse": lambda: sparse_mm(x, sw)}, repeats=args.repeats
                )
                ratio = res["dense"] / res["sparse"]
                worst = min(worst, ratio)
                print(
                    f"{k:>6} {o:>6} {t:>5} {spec:<16} {_xla.strategy(t, sw):<7} {res['dense'] * 1e3:9.2f} "
                    f"{res['sparse'] * 1e3:10.2f} {ratio:6.2f}",
                    flush=True,
                )
    print(f"worst ratio {worst:.2f} (target >= 0.9); load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
