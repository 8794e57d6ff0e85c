"""Flax models end to end: prune, compress, checkpoint, run sparse on CPU.

For an MLP and a pre-LayerNorm transformer block, in linen (``sparse_inference``) and
nnx (``to_inference``): parameters, pruned fraction of all parameters, orbax checkpoint
bytes dense vs compressed (fp16), and CPU inference time dense vs sparse through the
"xla" reference implementation.

Usage:
    python benchmarks/flax_models.py            # d=1024, hidden 4096, 256 tokens
    python benchmarks/flax_models.py --quick    # d=256, hidden 1024 (a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hinm_jax
from hinm_jax import checkpoint, layers, select

PATTERN = hinm_jax.HiNM(64, 0.5, 2, 4)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    d: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.d)(x)


class LinenBlock(nn.Module):
    d: int
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(self.hidden)(h)))


class NnxMLP(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


class NnxBlock(nnx.Module):
    def __init__(self, d, hidden, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _kept(params, masks) -> int:
    s = hinm_jax.summary(params, masks)
    return sum(r.kept for r in s.rows)


def _fp16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _ckpt(dense, sparse, workdir) -> checkpoint.SizeReport:
    return checkpoint.size_report(_fp16(dense), _fp16(sparse), workdir)


def linen_row(name, model, x, repeats, workdir):
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    view = layers.fold_features(params, model, x)
    prune = jax.jit(lambda p: hinm_jax.prune(p, PATTERN, where=select.prunable(model, x)))
    masks = prune(view)
    sparse = layers.unfold_features(jax.jit(hinm_jax.compress)(view, masks), params)
    masked = layers.unfold_features(jax.jit(hinm_jax.apply_masks)(view, masks), params)
    # the masks live on the folded view; count on it
    total, kept = _count(params), _kept(view, masks)
    dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    with layers.sparse_inference(implementation="xla"):
        sparse_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
        y_sparse = sparse_fn(sparse, x)
        t_sparse = _time(sparse_fn, sparse, x, repeats=repeats)
    y_ref = dense_fn(masked, x)
    err = float(jnp.max(jnp.abs(y_sparse - y_ref)) / jnp.max(jnp.abs(y_ref)))
    t_dense = _time(dense_fn, params, x, repeats=repeats)
    size = _ckpt(params, sparse, f"{workdir}/{name}-linen")
    return dict(model=name, api="linen", params=total, pruned=1 - kept / total, size=size,
                dense_ms=t_dense, sparse_ms=t_sparse, err=err)


def nnx_row(name, model, x, repeats, workdir):
    state = nnx.state(model, nnx.Param)
    view = layers.fold_features(state, model)
    masks = jax.jit(lambda s: hinm_jax.prune(s, PATTERN, where=select.prunable(model)))(view)
    total, kept = _count(state), _kept(view, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", layers.DenseFallbackWarning)  # everything must go sparse
        sparse_model = layers.to_inference(model, masks, implementation="xla")
    ref = nnx.clone(model)
    nnx.update(ref, layers.unfold_features(jax.jit(hinm_jax.apply_masks)(view, masks), state))
    run = nnx.jit(lambda m, x: m(x))
    y_sparse, y_ref = run(sparse_model, x), run(ref, x)
    err = float(jnp.max(jnp.abs(y_sparse - y_ref)) / jnp.max(jnp.abs(y_ref)))
    # time the pure functions (no graph traversal per call)
    g_dense, s_dense = nnx.split(model)
    g_sparse, s_sparse = nnx.split(sparse_model)
    f_dense = jax.jit(lambda s, x: nnx.merge(g_dense, s)(x))
    f_sparse = jax.jit(lambda s, x: nnx.merge(g_sparse, s)(x))
    t_dense = _time(f_dense, s_dense, x, repeats=repeats)
    t_sparse = _time(f_sparse, s_sparse, x, repeats=repeats)
    size = _ckpt(nnx.state(model), nnx.state(sparse_model), f"{workdir}/{name}-nnx")
    return dict(model=name, api="nnx", params=total, pruned=1 - kept / total, size=size,
                dense_ms=t_dense, sparse_ms=t_sparse, err=err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    d, hidden, heads, tokens, seq = (256, 1024, 4, 64, 16) if args.quick else (1024, 4096, 16, 256, 64)
    rng = np.random.default_rng(0)
    x_mlp = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    x_blk = jnp.asarray(rng.standard_normal((tokens // seq, seq, d)), jnp.float32)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        rows.append(linen_row("mlp", LinenMLP(d, hidden), x_mlp, args.repeats, workdir))
        rows.append(linen_row("block", LinenBlock(d, hidden, heads), x_blk, args.repeats, workdir))
        rows.append(nnx_row("mlp", NnxMLP(d, hidden, nnx.Rngs(0)), x_mlp, args.repeats, workdir))
        rows.append(nnx_row("block", NnxBlock(d, hidden, heads, nnx.Rngs(0)), x_blk, args.repeats, workdir))

    print(f"\nHiNM(64, 0.5, 2, 4) on every Dense/DenseGeneral/Linear kernel; d={d}, hidden={hidden}, "
          f"heads={heads}, {tokens} tokens; CPU ({jax.devices()[0].device_kind}), fp32 compute, "
          f"fp16 checkpoints (orbax), median of {args.repeats}")
    head = (f"| {'model':<6} | {'API':<5} | {'params':>11} | {'pruned':>6} | {'ckpt dense':>12} | "
            f"{'ckpt sparse':>12} | {'disk ratio':>10} | {'array ratio':>11} | {'dense ms':>8} | "
            f"{'sparse ms':>9} | {'sparse/dense':>12} | {'max rel err':>11} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        s = r["size"]
        print(f"| {r['model']:<6} | {r['api']:<5} | {r['params']:>11,} | {r['pruned']:>6.1%} | "
              f"{s.dense_bytes:>12,} | {s.sparse_bytes:>12,} | {s.ratio:>9.3f}x | {s.array_ratio:>10.3f}x | "
              f"{r['dense_ms']:>8.2f} | {r['sparse_ms']:>9.2f} | {r['sparse_ms'] / r['dense_ms']:>11.2f}x | "
              f"{r['err']:>11.1e} |")


if __name__ == "__main__":
    main()
