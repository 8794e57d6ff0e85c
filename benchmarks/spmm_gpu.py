"""GPU benchmark and correctness check of the CUDA ``mma.sp`` kernel (``implementation="cuda"``).

One call builds the kernel library, checks it against the reference on every pattern, dtype
and tile configuration, then times it against dense ``x @ W`` (``jnp.dot``: cuBLAS, or
whatever XLA picks; ``--cublas`` forces cuBLAS) and the Pallas kernel, printing speedups
(``dense time / sparse time``, > 1 is faster than dense).

Shapes follow the paper (W of 1024 x K outputs-by-inputs, K in {1024, 2048, 4096}) plus
4096 x 4096; tokens T in {1, 16, 128, 1024, 4096}; float16 and bfloat16; HiNM(V, 0.5, 2, 4)
(75% sparse) for V in {32, 64, 128} with shuffled channels and vector index order (as after
2CP), and plain 2:4.

Columns: ``cuda`` is the whole ``sparse_matmul`` path (activation transpose for HiNM, kernel,
output transpose for permuted channels); ``kernel`` the FFI call alone on prepared operands;
``pallas`` the Pallas path. Each time is per matmul, from back-to-back calls of a jitted
function that runs ``--replicas`` independent products (amortises dispatch).

Usage:
    python benchmarks/spmm_gpu.py                  # build, check, time everything
    python benchmarks/spmm_gpu.py --check-only
    python benchmarks/spmm_gpu.py --quick          # 4096x4096 and 1024x1024 at T in {16, 4096}
    python benchmarks/spmm_gpu.py --sweep          # also every tile config at T >= 1024
    python benchmarks/spmm_gpu.py --json out.json --no-pallas

Exit status: 1 if a check fails or the library cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time every tile configuration at T >= 1024")
    p.add_argument("--no-pallas", action="store_true")
    p.add_argument("--cublas", action="store_true", help="XLA flag: dense GEMMs on cuBLAS, not Triton")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--tokens", default="1,16,128,1024,4096")
    p.add_argument("--perm", choices=["shuffled", "identity"], default="shuffled", help="HiNM channel order")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    p.add_argument("--json", default=None)
    return p.parse_args()


ARGS = _parse()
if ARGS.cublas:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cuda_ffi  # noqa: E402
import hinm_jax  # noqa: E402
from cuda_ffi import ffi as cffi  # noqa: E402
from cuda_ffi import packing, tiles  # noqa: E402
from hinm_jax import _cuda  # noqa: E402
from hinm_jax.format import SparseWeight  # noqa: E402
from hinm_jax.ops import reference_matmul  # noqa: E402

SHAPES = [(1024, 1024), (1024, 2048), (1024, 4096), (4096, 4096)]  # (O, K)
PATTERNS = ["hinm32", "hinm64", "hinm128", "2:4"]
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------------------------
def make_weight(seed, k, o, pattern, dtype, shuffled=True) -> SparseWeight:
    """A random weight in the canonical format (vectorised numpy)."""
    rng = np.random.default_rng(seed)
    if pattern == "2:4":
        pat = hinm_jax.NM(2, 4)
        v, kv = o, k
        vi = np.arange(k, dtype=np.int32)[None]
        perm = np.arange(o, dtype=np.int32)
    else:
        v = int(pattern[4:])
        pat = hinm_jax.HiNM(v, 0.5, 2, 4)
        kv = pat.kept_inputs(k)
        if shuffled:
            vi = np.argsort(rng.random((o // v, k)), axis=1)[:, :kv].astype(np.int32)
            perm = rng.permutation(o).astype(np.int32)
        else:
            vi = np.sort(np.argsort(rng.random((o // v, k)), axis=1)[:, :kv], axis=1).astype(np.int32)
            perm = np.arange(o, dtype=np.int32)
    j = kv // 4
    pos = np.sort(np.argsort(rng.random((o, j, 4)), axis=-1)[..., :2], axis=-1).astype(np.uint32)
    vals = (rng.standard_normal((o, 2 * j)) / np.sqrt(k / 4)).astype(np.float32)
    flat = pos.reshape(o, -1)
    words = -(-flat.shape[1] // 16)
    flat = np.pad(flat, ((0, 0), (0, words * 16 - flat.shape[1])))
    meta = np.bitwise_or.reduce(flat.reshape(o, words, 16) << (2 * np.arange(16, dtype=np.uint32)), axis=-1)
    return SparseWeight(
        values=jnp.asarray(vals, dtype),
        metadata=jnp.asarray(meta.astype(np.uint32)),
        vector_index=jnp.asarray(vi),
        row_perm=jnp.asarray(perm),
        shape=(k, o),
        pattern=pat,
    )


def close(y, ref, dtype) -> tuple[bool, float]:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1.0)
    err = float(np.abs(y - ref).max() / scale)
    finite = bool(np.isfinite(y).all())
    return finite and err <= 2 * TOL[dtype], err


# ---------------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------------
def run_checks(dtypes) -> bool:
    ok = True
    log("\n== correctness vs reference (max |err| / max |ref|) ==")
    log(f"{'O':>5} {'K':>5} {'pattern':>8} {'dtype':>9} {'T':>5} {'bias':>5} {'config':>8} {'err':>9}  status")
    cases = []
    for (o, k) in [(1024, 1024), (4096, 4096), (384, 320)]:
        for pattern in PATTERNS:
            for dtype in dtypes:
                for t in (1, 7, 128, 1000):
                    cases.append((o, k, pattern, dtype, t, (t + len(pattern)) % 2 == 0, None))
    for c in tiles.CONFIGS:  # every tile configuration once
        v = min(c.bm, 128)
        cases.append((2 * max(v, 64), 512, f"hinm{v}", "float16", c.bn + 3, True, c))
        if c.direct:  # O = 200: rows padded to 256, O not a multiple of 8 (scalar epilogue)
            cases.append((200, 512, "2:4", "bfloat16", c.bn + 3, True, c))
    for i, (o, k, pattern, dtype, t, bias, config) in enumerate(cases):
        w = hinm_jax.pack_for(make_weight(i, k, o, pattern, jnp.dtype(dtype)), "cuda")
        x = jax.random.normal(jax.random.key(i), (t, k), jnp.float32).astype(dtype)
        b = jnp.linspace(-1, 1, o).astype(dtype) if bias else None
        if config is None:
            y = jax.jit(_cuda.matmul)(x, w, b)
        else:
            y = cuda_ffi.spmm(x, w.packed, o, b, config=config)
        ref = reference_matmul(x, w).astype(jnp.float32)
        if bias:
            ref = ref + b.astype(jnp.float32)
        good, err = close(y, ref, dtype)
        ok &= good
        cfg = "auto" if config is None else f"{config.bm}x{config.bn}"
        log(f"{o:>5} {k:>5} {pattern:>8} {dtype:>9} {t:>5} {str(bias):>5} {cfg:>8} {err:>9.2e}  {'ok' if good else 'FAIL'}")
    # Gradient and default dispatch.
    w = make_weight(0, 512, 256, "hinm64", jnp.float16)
    x = jax.random.normal(jax.random.key(0), (33, 512), jnp.float16)
    gk = jax.grad(lambda x: jnp.sum(_cuda.matmul(x, w).astype(jnp.float32) ** 2))(x)
    gr = jax.grad(lambda x: jnp.sum(reference_matmul(x, w).astype(jnp.float32) ** 2))(x)
    good, err = close(gk, gr, "float16")
    ok &= good
    log(f"gradient in x: err {err:.2e} {'ok' if good else 'FAIL'}")
    impls = hinm_jax.available_implementations()
    good = impls[0] == "cuda"
    ok &= good
    log(f"available_implementations() = {impls} {'ok' if good else 'FAIL (cuda should come first)'}")
    return ok


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------
def timeit(fn, args) -> float:
    """Seconds per call of ``fn(*args)`` (jitted), min over 3 measurements."""
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(3, int(ARGS.min_time / once))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def replicated(op):
    """A jitted function running ``op`` on each of R independent inputs."""
    return jax.jit(lambda xs, *rest: [op(x, *rest) for x in xs])


def bench_case(o, k, t, dtype, pattern, pallas_ok, sweep) -> dict:
    r = ARGS.replicas if t * k <= 4096 * 4096 else max(2, ARGS.replicas // 2)
    w = make_weight(o + k + t, k, o, pattern, jnp.dtype(dtype), ARGS.perm == "shuffled")
    wc = hinm_jax.pack_for(w, "cuda")
    dense = w.densify().astype(dtype)
    keys = jax.random.split(jax.random.key(t), r)
    xs = [jax.random.normal(kk, (t, k), jnp.float32).astype(dtype) for kk in keys]
    row = dict(O=o, K=k, T=t, dtype=dtype, pattern=pattern)

    row["dense_us"] = timeit(replicated(lambda x, wd: jnp.dot(x, wd)), (xs, dense)) / r * 1e6
    row["cuda_us"] = timeit(replicated(_cuda.matmul), (xs, wc)) / r * 1e6
    lay = packing.layout_of(wc.packed, o)
    cfg = tiles.select_config(t, lay.rows, lay.vector_size, lay.gather, cffi._sm_count())
    row["config"] = f"{cfg.bm}x{cfg.bn}"
    row["transposed_out"] = not lay.identity_rows

    # Kernel alone: operands already in the kernel's layout, output left as the kernel writes it.
    def raw(config):
        transposed = not lay.identity_rows
        shape = (o, -(-t // 8) * 8) if transposed else (t, o)
        call = jax.ffi.ffi_call(cffi.TARGET_NAME, jax.ShapeDtypeStruct(shape, dtype))
        p = wc.packed
        return lambda xin: call(
            xin, p["values"], p["metadata"], p["vector_index"], p["row_perm"], jnp.zeros((0,), jnp.float32),
            gather=np.int64(lay.gather), config=np.int64(config.id), vector_size=np.int64(lay.vector_size),
            transposed_out=np.int64(transposed),
        )

    xins = [cffi.prepare_activations(x, lay) for x in xs]
    jax.block_until_ready(xins)
    row["kernel_us"] = timeit(replicated(raw(cfg)), (xins,)) / r * 1e6
    if sweep and t >= 1024:
        best = None
        for c in tiles.valid_configs(lay.rows, lay.vector_size, lay.gather):
            us = timeit(replicated(raw(c)), (xins,)) / r * 1e6
            row[f"kernel_us[{c.bm}x{c.bn}]"] = us
            if best is None or us < best[1]:
                best = (c, us)
        row["best_config"] = f"{best[0].bm}x{best[0].bn}"
        row["best_kernel_us"] = best[1]
    if pallas_ok:
        try:
            wp = hinm_jax.pack_for(w, "pallas")
            fn = replicated(lambda x, wp: hinm_jax.sparse_matmul(x, wp, implementation="pallas"))
            row["pallas_us"] = timeit(fn, (xs, wp)) / r * 1e6
        except Exception as e:  # noqa: BLE001 - report and go on
            row["pallas_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    for key in ("cuda_us", "kernel_us", "pallas_us", "best_kernel_us"):
        if key in row:
            row[key.replace("_us", "_speedup")] = row["dense_us"] / row[key]
    return row


def print_row(row, header=False):
    cols = [("O", 5), ("K", 5), ("T", 5), ("dtype", 9), ("pattern", 8), ("dense_us", 9), ("cuda_us", 9),
            ("cuda_speedup", 7), ("kernel_us", 9), ("kernel_speedup", 7), ("pallas_us", 9), ("pallas_speedup", 7),
            ("config", 8), ("best_config", 8), ("best_kernel_speedup", 7)]
    names = {"cuda_speedup": "x", "kernel_speedup": "x", "pallas_speedup": "x", "best_kernel_speedup": "best x"}
    if header:
        log(" ".join(f"{names.get(c, c.replace('_us', ' us')):>{w}}" for c, w in cols))
    out = []
    for c, w in cols:
        v = row.get(c, "")
        if isinstance(v, float):
            v = f"{v:.2f}" if "speedup" in c else f"{v:.1f}"
        out.append(f"{v!s:>{w}}")
    log(" ".join(out) + (f"  pallas: {row['pallas_error']}" if "pallas_error" in row else ""))


def main() -> int:
    log(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    for d in jax.devices():
        log(f"  {d}: compute capability {getattr(d, 'compute_capability', '?')}, SMs {getattr(d, 'core_count', '?')}")
    log(f"nvcc: {cuda_ffi.find_nvcc()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    t0 = time.perf_counter()
    try:
        path = cuda_ffi.build.build(verbose=True)
        cffi.register()
    except cuda_ffi.BuildError as e:
        log(f"BUILD FAILED: {e}")
        return 1
    log(f"library ready in {time.perf_counter() - t0:.1f} s: {path}")
    if not _cuda.is_available():
        log("hinm_jax._cuda.is_available() is False: needs a CUDA GPU with compute capability >= 8.0")
        return 1
    dtypes = ARGS.dtypes.split(",")
    ok = True
    if not ARGS.no_check:
        ok = run_checks(dtypes)
        log(f"checks: {'ALL OK' if ok else 'FAILURES'}")
        if ARGS.check_only:
            return 0 if ok else 1

    pallas_ok = False
    if not ARGS.no_pallas:
        try:
            from hinm_jax import _pallas

            pallas_ok = _pallas.is_available()
        except ImportError as e:
            log(f"pallas unavailable: {e}")
    shapes = [(4096, 4096), (1024, 1024)] if ARGS.quick else SHAPES
    tokens = [16, 4096] if ARGS.quick else [int(v) for v in ARGS.tokens.split(",")]
    log(f"\n== timing: per-matmul microseconds, speedup = dense / sparse; HiNM channels {ARGS.perm} ==")
    rows = []
    print_row({}, header=True)
    for dtype in dtypes:
        for (o, k) in shapes:
            for t in tokens:
                for pattern in PATTERNS:
                    try:
                        row = bench_case(o, k, t, dtype, pattern, pallas_ok, ARGS.sweep)
                    except Exception as e:  # noqa: BLE001 - keep the table going
                        row = dict(O=o, K=k, T=t, dtype=dtype, pattern=pattern, error=f"{type(e).__name__}: {e}")
                        log(f"ERROR {row}")
                        ok = False
                        continue
                    rows.append(row)
                    print_row(row)
                    if ARGS.json:
                        Path(ARGS.json).write_text(json.dumps(rows, indent=1))

    log("\n== targets (H200): 4096x4096, T=4096 ==")
    for row in rows:
        if (row["O"], row["K"], row["T"]) == (4096, 4096, 4096):
            target = 1.1 if row["pattern"] == "2:4" else 1.5
            got = row["cuda_speedup"]
            log(f"{row['dtype']:>9} {row['pattern']:>8}: {got:.2f}x (kernel alone {row['kernel_speedup']:.2f}x), "
                f"target {target}x: {'MET' if got >= target else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
