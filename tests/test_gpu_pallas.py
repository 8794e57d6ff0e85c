"""The compiled Pallas (Triton) kernel on an NVIDIA GPU, float16 and bfloat16, against a
float64 product with the dense weight; and the default dispatch falling through to the
reference for what the kernel cannot compile. Every test here skips without a GPU.

Tolerances (max-normalised, as in ``test_pallas_kernels``): float16 2e-3, bfloat16 1.6e-2
(one rounding of the output and of each operand product, f32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hinm_jax
import pallas_kernels as pk
from pallas_kernels import testing

pytestmark = pytest.mark.gpu

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
DTYPES = ["float16", "bfloat16"]


def _assert_close(y, ref, dtype):
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all()
    tol = TOL[dtype]
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * max(np.abs(ref).max(), 1.0))


def _canonical(seed, *, k, o, v, kv, n, m, dtype):
    return testing.random_canonical(
        np.random.default_rng(seed), k=k, o=o, vector_size=v, kept_inputs=kv, n=n, m=m, dtype=jnp.dtype(dtype)
    )


def _x(seed, t, k, dtype):
    x = np.random.default_rng(seed + 500).standard_normal((t, k)).astype(jnp.dtype(dtype))
    return x, x.astype(np.float64)


# (k, o, V, K_v, n, m): HiNM 2:4 at V = 32, 64, 128, plain 2:4, 2:8, VectorWise, a K_v
# that the packer pads (48 stripes), several token tiles with a masked tail.
KERNEL_CASES = [
    (512, 256, 64, 256, 2, 4),
    (512, 128, 32, 256, 2, 4),
    (1024, 256, 128, 512, 2, 4),
    (256, 128, 128, 256, 2, 4),  # plain 2:4: V = O, K_v = K
    (512, 128, 64, 256, 2, 8),
    (256, 128, 64, 128, 1, 1),  # VectorWise
    (384, 64, 64, 192, 2, 4),  # padded stripes
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 300])
@pytest.mark.parametrize("k,o,v,kv,n,m", KERNEL_CASES, ids=lambda c: str(c))
def test_compiled_kernel_matches_dense(k, o, v, kv, n, m, t, dtype):
    w = _canonical(t + k + v, k=k, o=o, v=v, kv=kv, n=n, m=m, dtype=dtype)
    plain = v == o and kv == k
    packed = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=n, m=m, identity_index=plain)
    x, x64 = _x(t, t, k, dtype)
    y = pk.hinm_spmm(jnp.asarray(x), *packed, m=m, interpret=False)
    assert y.dtype == jnp.dtype(dtype) and y.shape == (t, o)
    _assert_close(y, x64 @ w.dense.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activations_kt,output_ot", [(True, False), (False, True)])
def test_compiled_kernel_transposed_layouts(dtype, activations_kt, output_ot):
    w = _canonical(3, k=256, o=128, v=64, kv=128, n=2, m=4, dtype=dtype)
    packed = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    x, x64 = _x(3, 45, 256, dtype)
    xin = jnp.asarray(x.T if activations_kt else x)
    y = pk.hinm_spmm(xin, *packed, m=4, activations_kt=activations_kt, output_ot=output_ot, interpret=False)
    _assert_close(y.T if output_ot else y, x64 @ w.dense.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tuning_candidates_compile_and_match(dtype):
    """Block sizes other than the default: a quarter of the tuning candidates per dtype
    (a different quarter for each; 40 Triton compilations would not fit a short GPU
    window), each compiled and checked."""
    w = _canonical(4, k=1024, o=128, v=64, kv=512, n=2, m=4, dtype=dtype)
    packed = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    x, x64 = _x(4, 200, 1024, dtype)
    ref = x64 @ w.dense.astype(np.float64)
    cands = pk.tuning_candidates(64, 4, dtype)
    for bs in cands[DTYPES.index(dtype) :: 4]:
        _assert_close(pk.hinm_spmm(jnp.asarray(x), *packed, m=4, block_sizes=bs, interpret=False), ref, dtype)


def _sparse_weight(pattern, k, o, dtype, seed):
    params = {"w": jax.random.normal(jax.random.key(seed), (k, o), jnp.float32).astype(dtype)}
    return hinm_jax.compress(params, hinm_jax.prune(params, pattern))["w"]


ADAPTER_CASES = [
    (hinm_jax.HiNM(64, 0.5, 2, 4), 512, 256),
    (hinm_jax.HiNM(32, 0.5, 2, 4), 256, 128),
    (hinm_jax.NM(2, 4), 256, 128),
    (hinm_jax.NM(2, 8), 256, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,k,o", ADAPTER_CASES, ids=lambda p: str(p))
def test_adapter_compiled_matches_dense(pattern, k, o, dtype):
    """Through the public API: packed once (pack_for) and in-graph, jitted, with a bias."""
    w = _sparse_weight(pattern, k, o, jnp.dtype(dtype), k + o)
    dense = np.asarray(w.densify(), np.float64)
    x, x64 = _x(k, 33, k, dtype)
    bias = jnp.linspace(-1, 1, o).astype(dtype)
    ref = x64 @ dense + np.asarray(bias, np.float64)
    run = jax.jit(lambda x, w, b: hinm_jax.sparse_matmul(x, w, bias=b, implementation="pallas"))
    for weight in (hinm_jax.pack_for(w, "pallas"), w):
        _assert_close(run(jnp.asarray(x), weight, bias), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_gradient_matches_reference(dtype):
    w = _sparse_weight(hinm_jax.HiNM(32, 0.5, 2, 4), 256, 64, jnp.dtype(dtype), 9)
    x = jnp.asarray(_x(9, 20, 256, dtype)[0])

    def grad(impl):
        loss = lambda x: jnp.sum(hinm_jax.sparse_matmul(x, w, implementation=impl).astype(jnp.float32) ** 2)
        return np.asarray(jax.grad(loss)(x), np.float64)

    _assert_close(grad("pallas"), grad("xla"), dtype)


def test_default_dispatch_falls_through_for_what_triton_cannot_compile():
    """m = 3 (not a power of two): the pallas adapter raises NotImplementedError, so the
    default dispatch on the GPU runs the reference instead of failing."""
    w = _sparse_weight(hinm_jax.NM(2, 3), 96, 64, jnp.float16, 1)
    x = jnp.asarray(_x(1, 9, 96, "float16")[0])
    with pytest.raises(NotImplementedError, match="m=3"):
        hinm_jax.sparse_matmul(x, w, implementation="pallas")
    y = jax.jit(hinm_jax.sparse_matmul)(x, w)
    _assert_close(y, np.asarray(x, np.float64) @ np.asarray(w.densify(), np.float64), "float16")


def test_compiled_float32_matches_dense():
    """float32 runs as 3xTF32 on tensor cores: fp32-accurate."""
    w = _canonical(5, k=256, o=64, v=32, kv=128, n=2, m=4, dtype="float32")
    packed = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    x, x64 = _x(5, 19, 256, "float32")
    y = pk.hinm_spmm(jnp.asarray(x), *packed, m=4, interpret=False)
    _assert_close(y, x64 @ w.dense.astype(np.float64), "float32")
