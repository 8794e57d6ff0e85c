"""The shared backend suite: every implementation against the xla reference.

"xla" always runs; "cpu" (the C++ kernel) runs wherever it builds; "pallas" runs in
interpret mode on CPU (small shapes); "cuda" needs an NVIDIA GPU and is skipped elsewhere.
The cpu kernel's own suite (both schedules, every pattern, builds) is tests/test_cpu_ffi.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hinm_jax
from hinm_jax import NM, HiNM, VectorWise
from hinm_jax.ops import reference_matmul
from oracle import oracle_activation


def _runnable(impl: str) -> bool:
    if impl == "xla":
        return True
    try:
        mod = hinm_jax.ops.backend_module(impl)
    except ImportError:
        return False
    if impl == "pallas":
        return True  # interpret mode on CPU
    return mod.is_available()


@pytest.fixture(params=["xla", "cpu", "pallas", pytest.param("cuda", marks=pytest.mark.gpu)])
def impl(request):
    if not _runnable(request.param):
        pytest.skip(f"{request.param} cannot run here")
    return request.param


def _matmul(x, sw, impl, **kw):
    """sparse_matmul with an explicit implementation; the cuda kernel runs fp16/bf16
    only and the cpu kernel fp32/bf16, and they say so with NotImplementedError (then the
    case does not apply)."""
    declined = {"cuda": (jnp.float32,), "cpu": (jnp.float16,)}.get(impl, ())
    try:
        return hinm_jax.sparse_matmul(x, sw, implementation=impl, **kw)
    except NotImplementedError as e:
        if any(jnp.dtype(d) in (jnp.dtype(sw.dtype), jnp.dtype(x.dtype)) for d in declined):
            pytest.skip(f"{impl}: {e}")
        raise


def _sparse(k, o, pattern, dtype, seed=0, permuted=True, shuffle_nm=False):
    """A compressed (K, O) weight with a non-trivial π and σ."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, o)), dtype)
    v, kv, n, m = pattern.structure(k, o)
    perm = rng.permutation(o) if permuted else np.arange(o)
    if kv == k and v == o:  # plain N:M: the vector index is all of K (σ may still reorder)
        vi = (rng.permutation(k) if shuffle_nm else np.arange(k))[None]
    else:
        vi = np.stack([rng.permutation(k)[:kv] for _ in range(o // v)])
    perm, vi = jnp.asarray(perm, jnp.int32), jnp.asarray(vi, jnp.int32)
    mask = hinm_jax.masks.mask_from_layout(jnp.abs(w.astype(jnp.float32)), perm, vi, n, m)
    masks = {"w": hinm_jax.Mask(mask, hinm_jax.Layout(perm, vi), pattern)}
    return hinm_jax.compress({"w": w}, masks)["w"]


SHAPES = [
    (64, 64, HiNM(32, 0.5, 2, 4)),
    (128, 64, HiNM(64, 0.5, 2, 4)),
    (96, 32, HiNM(32, 0.25, 2, 4)),
    (64, 32, NM(2, 4)),
]


@pytest.mark.parametrize("k, o, pattern", SHAPES)
@pytest.mark.parametrize("t", [1, 7, 32])
def test_matches_the_dense_product_fp32(impl, k, o, pattern, t):
    sw = _sparse(k, o, pattern, jnp.float32)
    x = jax.random.normal(jax.random.key(t), (t, k))
    y = _matmul(x, sw, impl)
    want = np.asarray(x, np.float64) @ np.asarray(sw.densify(), np.float64)
    assert y.shape == (t, o) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k, o, pattern", SHAPES[:2] + SHAPES[3:])
def test_half_precision_accumulates_in_fp32(impl, dtype, k, o, pattern):
    sw = _sparse(k, o, pattern, dtype, seed=1)
    x = jax.random.normal(jax.random.key(0), (16, k), dtype)
    y = _matmul(x, sw, impl)
    assert y.dtype == dtype
    want = np.asarray(x, np.float32) @ np.asarray(sw.densify(), np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def test_leading_batch_dims_bias_and_jit(impl):
    sw = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 3, 64))
    bias = jnp.arange(64.0)
    f = jax.jit(lambda x, w: _matmul(x, w, impl, bias=bias))
    y = f(x, sw)
    assert y.shape == (2, 3, 64)
    np.testing.assert_allclose(y, x @ sw.densify() + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("t", [0, 1, 7, 40])
def test_activation_after_the_bias(impl, activation, t):
    """``activation(x @ W + b)``, the exact GELU included: the cpu kernel applies it in its epilogue
    (both schedules: T = 1, 7 rows, T = 40 tokens), the other implementations after the product."""
    sw = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    x = 3 * jax.random.normal(jax.random.key(t), (t, 64))
    bias = jnp.linspace(-2.0, 2.0, 64)
    y = jax.jit(lambda x, w: _matmul(x, w, impl, bias=bias, activation=activation))(x, sw)
    pre = np.asarray(x, np.float64) @ np.asarray(sw.densify(), np.float64) + np.asarray(bias, np.float64)
    want = oracle_activation(activation, pre)
    assert y.shape == (t, 64)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_gradient_through_the_activation(impl):
    sw = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (5, 64))
    b = jnp.linspace(-1.0, 1.0, 64)
    g = jax.grad(lambda x, b: jnp.sum(jnp.sin(_matmul(x, sw, impl, bias=b, activation="gelu"))), argnums=(0, 1))(x, b)
    want = jax.grad(lambda x, b: jnp.sum(jnp.sin(jax.nn.gelu(x @ sw.densify() + b, approximate=False))), argnums=(0, 1))(x, b)
    for got, w in zip(g, want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


def test_gradient_in_x(impl):
    sw = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (5, 64))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(_matmul(x, sw, impl))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ sw.densify())))(x)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


# --- the feed-forward block: sparse_ffn ------------------------------------------------


def _ffn_oracle(x, w1, b1, w2, b2, activation):
    h = oracle_activation(activation, np.asarray(x, np.float64) @ np.asarray(w1.densify(), np.float64) + np.asarray(b1, np.float64))
    return h @ np.asarray(w2.densify(), np.float64) + np.asarray(b2, np.float64)


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("t", [0, 1, 7, 70])
def test_feed_forward_block(impl, activation, t):
    """``activation(x @ W1 + b1) @ W2 + b2`` (the cpu kernel runs it as one call from its tokens
    schedule on: T = 70; two calls below), permuted layouts in both layers."""
    w1 = _sparse(64, 128, HiNM(32, 0.5, 2, 4), jnp.float32, seed=1)
    w2 = _sparse(128, 64, HiNM(32, 0.5, 2, 4), jnp.float32, seed=2)
    b1, b2 = jnp.linspace(-2.0, 2.0, 128), jnp.linspace(-1.0, 1.0, 64)
    x = 2 * jax.random.normal(jax.random.key(t), (t, 64))
    f = jax.jit(lambda x: hinm_jax.sparse_ffn(x, w1, w2, bias1=b1, bias2=b2, activation=activation, implementation=impl))
    y = f(x)
    assert y.shape == (t, 64) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _ffn_oracle(x, w1, b1, w2, b2, activation), rtol=1e-5, atol=1e-4)


def test_feed_forward_block_leading_dims_and_gradient(impl):
    w1 = _sparse(64, 128, HiNM(32, 0.5, 2, 4), jnp.float32, seed=1)
    w2 = _sparse(128, 32, NM(2, 4), jnp.float32, seed=2)
    b1, b2 = jnp.linspace(-1.0, 1.0, 128), jnp.linspace(-1.0, 1.0, 32)
    x = jax.random.normal(jax.random.key(0), (2, 20, 64))

    def ffn(x, b1, b2):
        return hinm_jax.sparse_ffn(x, w1, w2, bias1=b1, bias2=b2, activation="gelu", implementation=impl)

    def dense(x, b1, b2):
        return jax.nn.gelu(x @ w1.densify() + b1, approximate=False) @ w2.densify() + b2

    assert ffn(x, b1, b2).shape == (2, 20, 32)
    np.testing.assert_allclose(ffn(x, b1, b2), dense(x, b1, b2), rtol=1e-5, atol=1e-4)
    c = jax.random.normal(jax.random.key(1), (2, 20, 32))
    g = jax.grad(lambda *a: jnp.sum(c * ffn(*a)), argnums=(0, 1, 2))(x, b1, b2)
    want = jax.grad(lambda *a: jnp.sum(c * dense(*a)), argnums=(0, 1, 2))(x, b1, b2)
    for got, w in zip(g, want):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_feed_forward_block_bad_inputs():
    w1 = _sparse(64, 128, HiNM(32, 0.5, 2, 4), jnp.float32, seed=1)
    w2 = _sparse(128, 64, HiNM(32, 0.5, 2, 4), jnp.float32, seed=2)
    x = jnp.ones((3, 64))
    with pytest.raises(ValueError, match=r"x: shape=\(3, 32\) does not match w1: shape=\(64, 128\)"):
        hinm_jax.sparse_ffn(jnp.ones((3, 32)), w1, w2)
    with pytest.raises(ValueError, match=r"w1: shape=\(64, 128\)'s outputs: shape=\(3, 128\) does not match w2: shape=\(64, 128\)"):
        hinm_jax.sparse_ffn(x, w1, w1)
    with pytest.raises(ValueError, match=r"bias2: shape=\(128,\) does not match w2: shape=\(128, 64\) \(O=64\)"):
        hinm_jax.sparse_ffn(x, w1, w2, bias2=jnp.ones(128))
    with pytest.raises(TypeError, match="w2: expected a SparseWeight"):
        hinm_jax.sparse_ffn(x, w1, jnp.ones((128, 64)))
    with pytest.raises(ValueError, match=r"w1: shape=\(64, 128\) pattern hinm:32:0.5:2:4: activation='tanh'"):
        hinm_jax.sparse_ffn(x, w1, w2, activation="tanh")
    with pytest.raises(ValueError, match="implementation='tpu'"):
        hinm_jax.sparse_ffn(x, w1, w2, implementation="tpu")


# --- products of one input: sparse_matmuls ------------------------------------------------


@pytest.mark.parametrize("t", [0, 1, 40])
def test_products_of_one_input(impl, t):
    """Three weights of one x (the cpu kernel runs them as one call from its tokens schedule on:
    T = 40), each with its own bias and activation, and their gradients."""
    ws = [_sparse(64, o, p, jnp.float32, seed=i) for i, (o, p) in enumerate([(64, HiNM(32, 0.5, 2, 4)), (32, NM(2, 4)), (96, HiNM(32, 0.5, 2, 4))])]
    bs = [jnp.linspace(-1.0, 1.0, w.shape[1]) for w in ws]
    acts = [None, "gelu", "relu"]
    x = 2 * jax.random.normal(jax.random.key(t), (t, 64))
    ys = jax.jit(lambda x: hinm_jax.sparse_matmuls(x, ws, biases=bs, activations=acts, implementation=impl))(x)
    for y, w, b, a in zip(ys, ws, bs, acts):
        want = oracle_activation(a, np.asarray(x, np.float64) @ np.asarray(w.densify(), np.float64) + np.asarray(b, np.float64))
        assert y.shape == (t, w.shape[1])
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
    if t == 0:
        return
    cs = [jax.random.normal(jax.random.key(i), (t, w.shape[1])) for i, w in enumerate(ws)]

    def loss(x, bs, impl):
        ys = hinm_jax.sparse_matmuls(x, ws, biases=bs, activations=acts, implementation=impl)
        return sum(jnp.sum(c * y) for c, y in zip(cs, ys))

    g, want = jax.grad(loss, argnums=(0, 1))(x, bs, impl), jax.grad(loss, argnums=(0, 1))(x, bs, "xla")
    for got, w in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_products_of_one_input_bad_inputs():
    w = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    w2 = _sparse(32, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    x = jnp.ones((3, 64))
    with pytest.raises(ValueError, match=r"x: shape=\(3, 64\) does not match ws\[1\]: shape=\(32, 64\)"):
        hinm_jax.sparse_matmuls(x, [w, w2])
    with pytest.raises(ValueError, match=r"biases\[0\]: shape=\(3,\) does not match ws\[0\]"):
        hinm_jax.sparse_matmuls(x, [w, w], biases=[jnp.ones(3), None])
    with pytest.raises(ValueError, match="activations: 1 entries for 2 weights"):
        hinm_jax.sparse_matmuls(x, [w, w], activations=["relu"])
    with pytest.raises(ValueError, match=r"ws\[1\]: shape=\(64, 64\) pattern hinm:32:0.5:2:4: activation='tanh'"):
        hinm_jax.sparse_matmuls(x, [w, w], activations=[None, "tanh"])
    with pytest.raises(TypeError, match=r"ws\[0\]: expected a SparseWeight"):
        hinm_jax.sparse_matmuls(x, [jnp.ones((64, 64))])
    with pytest.raises(ValueError, match="ws: expected at least one weight"):
        hinm_jax.sparse_matmuls(x, [])


# --- the reference itself -------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 64])
@pytest.mark.parametrize("k, o, pattern", SHAPES + [(40, 16, VectorWise(8, 0.5)), (32, 16, NM(3, 8))])
def test_reference_matches_float64(k, o, pattern, t):
    """The reference equals the float64 product of the densified weight."""
    from hinm_jax import _xla

    assert reference_matmul is _xla.matmul  # one function, re-exported
    sw = _sparse(k, o, pattern, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (t, k))
    want = np.asarray(x, np.float64) @ np.asarray(sw.densify(), np.float64)
    np.testing.assert_allclose(np.asarray(reference_matmul(x, sw)), want, rtol=1e-5, atol=1e-5)


def test_conv_kernel_multiplies_flattened_patches():
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 32))
    sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:16:0.5:2:4"))["w"]
    x = jax.random.normal(jax.random.key(1), (4, 72))
    np.testing.assert_allclose(
        hinm_jax.sparse_matmul(x, sw), x @ sw.densify().reshape(72, 32), rtol=1e-5, atol=1e-5
    )


def test_available_implementations():
    impls = hinm_jax.available_implementations()
    assert impls[-1] == "xla"
    if jax.default_backend() == "cpu":
        assert "cuda" not in impls


def test_bad_inputs():
    sw = _sparse(64, 64, HiNM(32, 0.5, 2, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"x: shape=\(3, 32\) does not match w: shape=\(64, 64\) \(K=64, O=64\) pattern hinm:32:0.5:2:4"):
        hinm_jax.sparse_matmul(jnp.ones((3, 32)), sw)
    with pytest.raises(ValueError, match="implementation='tpu'"):
        hinm_jax.sparse_matmul(jnp.ones((3, 64)), sw, implementation="tpu")
    with pytest.raises(TypeError, match="expected a SparseWeight"):
        hinm_jax.sparse_matmul(jnp.ones((3, 64)), jnp.ones((64, 64)))
    with pytest.raises(ValueError, match=r"w: shape=\(64, 64\) pattern hinm:32:0.5:2:4: activation='tanh': expected None or one of"):
        hinm_jax.sparse_matmul(jnp.ones((3, 64)), sw, activation="tanh")
    with pytest.raises(TypeError, match=r"w: shape=\(64, 64\) pattern hinm:32:0.5:2:4: activation=<.*>: expected None"):
        hinm_jax.sparse_matmul(jnp.ones((3, 64)), sw, activation=jax.nn.relu)
    w = jax.random.normal(jax.random.key(0), (2, 64, 32))
    stacked = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "2:4", stack_axes=1))["w"]
    with pytest.raises(ValueError, match="stack_axes=1"):
        hinm_jax.sparse_matmul(jnp.ones((3, 64)), stacked)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="implementation='cuda' cannot run here"):
            hinm_jax.sparse_matmul(jnp.ones((3, 64)), sw, implementation="cuda")


# --- the reference on shapes of every kind ---------------------------------------------


REFERENCE_CASES = [  # (K, O, pattern, shuffle_nm)
    (256, 256, HiNM(64, 0.5, 2, 4), False),
    (192, 128, HiNM(32, 0.25, 2, 4), False),
    (128, 256, NM(2, 4), True),
    (96, 64, NM(3, 8), True),
    (80, 128, VectorWise(16, 0.5), False),
]


@functools.lru_cache(maxsize=None)
def _sparse_cached(k, o, pattern, dtype, seed, shuffle_nm):
    return _sparse(k, o, pattern, dtype, seed=seed, shuffle_nm=shuffle_nm)


def _want(x, sw):
    return np.asarray(x, np.float64) @ np.asarray(sw.densify(), np.float64)


@pytest.mark.parametrize("t", [1, 2, 7, 64])
@pytest.mark.parametrize("k, o, pattern, shuffle_nm", REFERENCE_CASES)
def test_reference_matches_float64_with_permutations(t, k, o, pattern, shuffle_nm):
    """With π permuted and σ shuffled, the reference equals the float64 product."""
    sw = _sparse_cached(k, o, pattern, jnp.float32, 0, shuffle_nm)
    x = jax.random.normal(jax.random.key(t), (t, k))
    y = jax.jit(reference_matmul)(x, sw)
    np.testing.assert_allclose(np.asarray(y), _want(x, sw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k, o, pattern, shuffle_nm", [REFERENCE_CASES[0], REFERENCE_CASES[2]])
@pytest.mark.parametrize("t", [1, 5])
def test_reference_dtypes_accumulate_in_fp32(dtype, k, o, pattern, shuffle_nm, t):
    """Half-precision inputs: the product of the (exactly representable) inputs, summed
    in fp32, rounded once to the output dtype."""
    sw = _sparse_cached(k, o, pattern, dtype, 3, shuffle_nm)
    x = jax.random.normal(jax.random.key(1), (t, k), dtype)
    y = reference_matmul(x, sw)
    assert y.dtype == dtype and y.shape == (t, o)
    want = _want(x, sw)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_mixed_dtypes_promote():
    sw = _sparse(256, 256, HiNM(64, 0.5, 2, 4), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (3, 256), jnp.float32)
    y = reference_matmul(x, sw)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _want(x, sw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 6])
def test_reference_gradient_and_jit(t):
    sw = _sparse_cached(256, 256, HiNM(64, 0.5, 2, 4), jnp.float32, 0, False)
    x = jax.random.normal(jax.random.key(0), (t, 256))
    c = jax.random.normal(jax.random.key(1), (t, 256))
    g = jax.jit(jax.grad(lambda x: jnp.sum(c * reference_matmul(x, sw))))(x)
    want = np.asarray(c, np.float64) @ np.asarray(sw.densify(), np.float64).T  # d/dx sum(c * (x @ W))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
    y = jax.jit(lambda x, w: hinm_jax.sparse_matmul(x, w, implementation="xla"))(x, sw)
    np.testing.assert_allclose(np.asarray(y), _want(x, sw), rtol=1e-5, atol=1e-5)
