"""Sparse inference on the CPU against dense: per layer and MiniLM-L6 end to end.

Run (from the repository root):
    python benchmarks/spmm_cpu.py                 # the whole grid, fp32 and bf16, and MiniLM
    python benchmarks/spmm_cpu.py --quick         # 4096x4096 and 384x1536, T in {1, 32, 256}
    python benchmarks/spmm_cpu.py --no-grid       # MiniLM end to end only
    python benchmarks/spmm_cpu.py --modes         # the kernel's two schedules side by side

Per (K, O, T), pattern and dtype it prints the median time of a dense ``x @ W`` under jit
(XLA:CPU), of ``sparse_matmul(implementation="cpu")`` (the C++ kernel, weight packed once
with ``pack_for``) and of ``implementation="xla"`` (the pure-jnp reference; skipped where
its gathered activations would exceed ``--xla-max-mb``), and the ratios dense / sparse
(> 1: sparse is faster). All of a cell's functions run interleaved, round-robin, so a
machine busy with other work slows them alike; each turn is one call, which finds the caches
as the other functions left them, as a layer of a model finds them (``--burst S`` times bursts
of back-to-back calls instead: warm caches). Each cell takes the median of 15 turns: on the
2-core development machine single calls of either side are bimodal (in 60 alternating calls
of 1536x384 at T = 256, the 90th percentile took 1.6-1.9x the median, dense and sparse alike),
and 7 turns let a few cells of each grid land on the slow mode. The instruction set of the
built kernel and the load average are printed before and after.

For each HiNM cell it also prints the two limits of a kernel that skips the pruned
weights: ``fma`` = dense multiply-adds / sparse multiply-adds (1 / density) and ``bytes``
= dense weight bytes / compressed weight bytes as the kernel reads them (values plus one
position byte each), which bounds a product that only streams the weight (few tokens).

MiniLM-L6 end to end: the demo's sentences (``examples/data/sentences.txt``), batches of
64, encoded by the dense model and by the same model with every encoder ``Dense`` kernel
pruned to HiNM and compressed (``hinm_jax.sparse_inference()``, packed once), interleaved; once
with the identity layout and once with a 2CP layout (permuted output rows and inputs, as the
demo's model has). The model's intermediate layers carry their GELU as a
``hinm_jax.layers.Dense(activation="gelu")``: the dense model applies it after XLA's dot, the
compressed one in the kernel's epilogue.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hinm_jax  # noqa: E402
from _timing import interleaved, machine  # noqa: E402

SHAPES = [(384, 1536), (1536, 384), (4096, 4096), (4096, 11008)]
TOKENS = [1, 8, 32, 256, 1024]
PATTERNS = ["hinm:32:0.5:2:4", "hinm:64:0.5:2:4", "2:4"]
DTYPES = ["float32", "bfloat16"]
QUICK = dict(shapes=[(384, 1536), (4096, 4096)], tokens=[1, 32, 256])
SENTENCES = Path(__file__).resolve().parents[1] / "examples" / "data" / "sentences.txt"


def _shapes(text):
    return [tuple(int(d) for d in s.split("x")) for s in text.split(",")]


def _isa() -> str:
    import cpu_ffi.ffi

    if not hinm_jax.ops.available_implementations().count("cpu"):
        return "cpu kernel unavailable"
    dot = "; bfloat16 2:4 by AVX-512 BF16 dot products" if cpu_ffi.ffi.bf16_dot() else "; bfloat16 widened to float32"
    return f"cpu kernel {cpu_ffi.ffi.isa()} ({cpu_ffi.ffi.lanes()} fp32 lanes{dot})"


def _limits(sw, k: int, o: int, itemsize: int) -> tuple[float, float]:
    """(multiply-add limit, weight-bytes limit) of a kernel that skips the pruned weights."""
    nnz = sw.values.size
    fma = k * o / nnz
    byt = k * o * itemsize / (nnz * (itemsize + 1) + sw.vector_index.size * 4 + sw.row_perm.size * 4)
    return fma, byt


def _cells(args):
    """``(dtype, spec, K, O, compressed weight, its dense copy)`` for every cell of the grid."""
    for dtype in args.dtypes:
        dt = jnp.dtype(dtype)
        for spec in args.patterns:
            for k, o in args.shapes:
                w = jax.random.normal(jax.random.key(0), (k, o), dt)
                sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, spec))["w"]
                yield dtype, spec, k, o, sw, sw.densify()


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def grid(args) -> dict:
    dense_mm = jax.jit(lambda x, w: x @ w)
    cpu_mm = jax.jit(lambda x, s: hinm_jax.sparse_matmul(x, s, implementation="cpu"))
    xla_mm = jax.jit(lambda x, s: hinm_jax.sparse_matmul(x, s, implementation="xla"))
    print(
        f"{'dtype':<8} {'pattern':<16} {'K':>5} {'O':>6} {'T':>5} {'dense ms':>9} {'cpu ms':>8} {'xla ms':>8} "
        f"{'cpu x':>6} {'xla x':>6} {'fma lim':>7} {'byte lim':>8}"
    )
    ratios: dict = {}
    for dtype, spec, k, o, sw, wd in _cells(args):
        packed = hinm_jax.pack_for(sw, "cpu")
        fma, byt = _limits(sw, k, o, jnp.dtype(dtype).itemsize)
        for t in args.tokens:
            x = jax.random.normal(jax.random.key(t), (t, k), dtype)
            fns = {"dense": lambda: dense_mm(x, wd), "cpu": lambda: cpu_mm(x, packed)}
            nb, kv = sw.vector_index.shape
            if not args.no_xla and t * nb * kv * 4 <= args.xla_max_mb * 2**20:
                fns["xla"] = lambda: xla_mm(x, sw)
            res = interleaved(fns, repeats=args.repeats, burst_seconds=args.burst)
            r_cpu = res["dense"] / res["cpu"]
            ratios.setdefault((dtype, spec), []).append(r_cpu)
            if "xla" in res:
                xla_ms, xla_x = f"{res['xla'] * 1e3:8.2f}", f"{res['dense'] / res['xla']:6.2f}"
            else:
                xla_ms, xla_x = f"{'-':>8}", f"{'-':>6}"
            lim = f"{fma:7.2f} {byt:8.2f}" if spec.startswith("hinm") else f"{'':>7} {'':>8}"
            print(
                f"{dtype:<8} {spec:<16} {k:>5} {o:>6} {t:>5} {res['dense'] * 1e3:9.3f} {res['cpu'] * 1e3:8.3f} "
                f"{xla_ms} {r_cpu:6.2f} {xla_x} {lim}",
                flush=True,
            )
    print("\n# dense / cpu: geometric mean and worst cell per pattern and dtype")
    for (dtype, spec), rs in ratios.items():
        print(f"{dtype:<8} {spec:<16} geomean {_geomean(rs):5.2f}  min {min(rs):5.2f}  ({len(rs)} cells)")
    return ratios


def modes(args) -> None:
    """The kernel's two schedules at each T (to place ``cpu_ffi.ffi.TOKENS_MODE_FROM``)."""
    import cpu_ffi

    dense_mm = jax.jit(lambda x, w: x @ w)
    print(f"{'dtype':<8} {'pattern':<16} {'K':>5} {'O':>6} {'T':>5} {'dense ms':>9} {'rows ms':>8} {'tokens ms':>9}")
    for dtype, spec, k, o, sw, wd in _cells(args):
        packed = hinm_jax.pack_for(sw, "cpu").packed
        run = jax.jit(
            lambda x, mode: cpu_ffi.spmm(x, packed, n=sw.n, m=sw.m, vector_size=sw.vector_size, out_dtype=dtype, mode=mode),
            static_argnames="mode",
        )
        for t in args.tokens:
            x = jax.random.normal(jax.random.key(t), (t, k), dtype)
            fns = {"dense": lambda: dense_mm(x, wd), **{m: (lambda m=m: run(x, m)) for m in cpu_ffi.MODES}}
            res = interleaved(fns, repeats=args.repeats, burst_seconds=args.burst)
            print(
                f"{dtype:<8} {spec:<16} {k:>5} {o:>6} {t:>5} {res['dense'] * 1e3:9.3f} {res['rows'] * 1e3:8.3f} "
                f"{res['tokens'] * 1e3:9.3f}",
                flush=True,
            )


def minilm(args) -> float:
    """Sentences per second of the dense and the compressed MiniLM-L6; returns the ratio."""
    from hinm_jax.models import minilm as mm

    config, params = mm.load_params()
    params32 = params
    if args.minilm_dtype != "float32":  # every parameter in the compute dtype, so that the whole model runs in it
        params = jax.tree.map(lambda a: a.astype(args.minilm_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    model32 = mm.MiniLM(config)
    model = mm.MiniLM(dataclasses.replace(config, dtype=jnp.dtype(args.minilm_dtype)))
    tokenizer = mm.load_tokenizer()
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()][: args.sentences]
    pattern = hinm_jax.parse_pattern(args.minilm_pattern)
    masks = hinm_jax.prune(params, pattern, where=r"^layer_\d+/.*/kernel$")
    sparse = hinm_jax.pack_for(hinm_jax.compress(params, masks), "cpu")
    # The demo's model is pruned with 2CP: its output rows and kept inputs are permuted per block. A
    # short search gives a layout of the same kind (how good it is does not change the kernel's work).
    masks_2cp = hinm_jax.prune(params, pattern, where=r"^layer_\d+/.*/kernel$", permute="2cp", key=jax.random.key(0),
                               permute_options={"time_limit": args.permute_seconds, "progress": False})
    sparse_2cp = hinm_jax.pack_for(hinm_jax.compress(params, masks_2cp), "cpu")

    def dense():
        return mm.encode(params, tokenizer, sentences, batch_size=args.batch, model=model)

    def dense_float32():
        return mm.encode(params32, tokenizer, sentences, batch_size=args.batch, model=model32)

    def compressed(weights=sparse):
        with hinm_jax.sparse_inference():
            return mm.encode(weights, tokenizer, sentences, batch_size=args.batch, model=model)

    err = 0.0
    for m, w in ((masks, sparse), (masks_2cp, sparse_2cp)):  # compiles both before timing
        pruned = mm.encode(hinm_jax.apply_masks(params, m), tokenizer, sentences, batch_size=args.batch, model=model)
        err = max(err, float(np.max(np.abs(compressed(w) - pruned))))
    fns = {"dense": dense, "compressed": compressed, "compressed_2cp": lambda: compressed(sparse_2cp)}
    if args.minilm_dtype != "float32":  # the fastest dense model on a CPU is often the float32 one
        fns["dense_float32"] = dense_float32
    res = interleaved(fns, repeats=args.minilm_repeats, warmup=1)
    n = len(sentences)
    print(
        f"\n# MiniLM-L6 in {args.minilm_dtype}, {n} sentences, batch {args.batch}, encoder Dense kernels {pattern} "
        f"({sum(1 for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None or hasattr(x, 'mask')) if m is not None)} "
        f"compressed), max |compressed - pruned dense| = {err:.1e}"
    )
    print(f"dense       {res['dense']:7.3f} s  {n / res['dense']:8.1f} sentences/s")
    print(f"compressed  {res['compressed']:7.3f} s  {n / res['compressed']:8.1f} sentences/s")
    print(f"compressed, 2CP layout  {res['compressed_2cp']:7.3f} s  {n / res['compressed_2cp']:8.1f} sentences/s")
    ratio = res["dense"] / res["compressed"]
    print(f"compressed vs dense: {ratio:.2f}x; with the 2CP layout {res['dense'] / res['compressed_2cp']:.2f}x")
    if "dense_float32" in res:
        print(f"dense float32 {res['dense_float32']:7.3f} s  {n / res['dense_float32']:8.1f} sentences/s")
        print(f"compressed {args.minilm_dtype} vs dense float32: {res['dense_float32'] / res['compressed']:.2f}x")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="turns per cell (medians)")
    ap.add_argument(
        "--burst", type=float, default=0.0, help="seconds of back-to-back calls per timed turn (default 0: one call, caches as the other functions left them)"
    )
    ap.add_argument("--shapes", type=_shapes, default=SHAPES, help="KxO[,KxO...]")
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=TOKENS)
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=PATTERNS)
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=DTYPES)
    ap.add_argument("--quick", action="store_true", help="a smaller grid: " + str(QUICK))
    ap.add_argument("--no-xla", action="store_true", help="skip the xla reference column")
    ap.add_argument("--xla-max-mb", type=float, default=256, help="skip xla cells whose gather exceeds this")
    ap.add_argument("--modes", action="store_true", help="time the kernel's two schedules instead of the grid")
    ap.add_argument("--no-grid", action="store_true", help="MiniLM end to end only")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--minilm-pattern", default="hinm:32:0.5:2:4")
    ap.add_argument("--permute-seconds", type=float, default=0.5, help="2CP search time per MiniLM matrix")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--minilm-repeats", type=int, default=9)
    ap.add_argument(
        "--minilm-dtype", default="float32", choices=["float32", "bfloat16"],
        help="MiniLM's parameters and compute dtype (bfloat16 also times the float32 dense model)",
    )
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.tokens = QUICK["shapes"], QUICK["tokens"]
    print(f"# {machine()}; {_isa()}")
    if args.modes:
        modes(args)
    elif not args.no_grid:
        grid(args)
    if not args.no_minilm and not args.modes:
        minilm(args)
    print(f"# load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
