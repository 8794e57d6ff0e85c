"""Kernel-level tests of the Pallas HiNM SpMM (``pallas_kernels``), on plain arrays.

Correctness runs the kernel in Pallas interpret mode on CPU against a float64 numpy
product with the dense weight; one test lowers the compiled kernel for the CUDA platform
(no GPU needed) and checks that it became a Triton custom call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels import testing

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _weight(seed, *, k, o, v, kv, n, m, dtype="float32", shuffle=True):
    rng = np.random.default_rng(seed)
    return testing.random_canonical(
        rng, k=k, o=o, vector_size=v, kept_inputs=kv, n=n, m=m, dtype=jnp.dtype(dtype), shuffle=shuffle
    )


def _pack(w, n, m, **kw):
    plain = w.vector_index.shape[0] == 1 and w.vector_index.shape[1] == w.dense.shape[0]
    return pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=n, m=m, identity_index=plain, **kw)


def _x(seed, t, k, dtype):
    x = np.random.default_rng(seed + 1000).standard_normal((t, k)).astype(np.float32)
    return x.astype(jnp.dtype(dtype))


def _check(y, x, w, dtype):
    ref = np.asarray(x, np.float64) @ w.dense.astype(np.float64)
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    tol = TOL[str(jnp.dtype(dtype))]
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * np.abs(ref).max())


# (k, o, V, K_v, n, m, T, dtype): HiNM at V = 32 and 64, plain N:M (V = O, K_v = K),
# VectorWise (n = m = 1), 2:8 (3-bit metadata), a K_v that needs padding (48 stripes),
# and token tails (T = 1, 7, 33).
CASES = [
    pytest.param(128, 64, 32, 64, 2, 4, 7, "float32", id="hinm-v32-f32-t7"),
    pytest.param(128, 128, 64, 64, 2, 4, 1, "bfloat16", id="hinm-v64-bf16-t1"),
    pytest.param(256, 64, 64, 192, 2, 4, 7, "float16", id="hinm-v64-f16-t7-padded-kv"),
    pytest.param(128, 64, 32, 64, 2, 4, 33, "bfloat16", id="hinm-v32-bf16-t33"),
    pytest.param(128, 64, 64, 128, 2, 4, 7, "float32", id="nm24-f32-t7"),
    pytest.param(96, 32, 32, 96, 2, 4, 1, "bfloat16", id="nm24-bf16-t1-padded-k"),
    pytest.param(128, 64, 32, 64, 1, 1, 7, "float32", id="vectorwise-f32"),
    pytest.param(256, 32, 32, 128, 2, 8, 7, "float32", id="hinm-2of8-f32"),
]


@pytest.mark.parametrize("k,o,v,kv,n,m,t,dtype", CASES)
def test_matches_dense_product(k, o, v, kv, n, m, t, dtype):
    w = _weight(0, k=k, o=o, v=v, kv=kv, n=n, m=m, dtype=dtype)
    x = _x(0, t, k, dtype)
    y = pk.hinm_spmm(jnp.asarray(x), *_pack(w, n, m), m=m, interpret=True)
    assert y.dtype == jnp.dtype(dtype)
    _check(y, x, w, dtype)


def test_shuffled_layout_is_not_the_identity():
    """The fixtures really exercise OCP / IVP: a kernel that ignored row_perm or read the
    vector index in sorted order would fail the tests above."""
    w = _weight(0, k=128, o=64, v=32, kv=64, n=2, m=4)
    assert not np.array_equal(w.row_perm, np.arange(64))
    assert not np.array_equal(w.vector_index, np.sort(w.vector_index, axis=1))


def test_many_programs_and_steps():
    """Several row tiles per vector block, several token tiles with a masked tail and
    several inner steps: every grid axis and the loop are exercised."""
    w = _weight(1, k=256, o=64, v=32, kv=128, n=2, m=4, dtype="bfloat16")
    bs = pk.BlockSizes(block_rows=16, block_tokens=16, block_k=64, num_warps=4, num_stages=2)
    x = _x(1, 37, 256, "bfloat16")
    y = pk.hinm_spmm(jnp.asarray(x), *_pack(w, 2, 4, block_k=64), m=4, block_sizes=bs, interpret=True)
    _check(y, x, w, "bfloat16")


@pytest.mark.parametrize("activations_kt,output_ot", [(True, False), (False, True)])
def test_transposed_layouts(activations_kt, output_ot):
    w = _weight(2, k=128, o=64, v=32, kv=64, n=2, m=4)
    x = _x(2, 7, 128, "float32")
    xin = jnp.asarray(x.T if activations_kt else x)
    y = pk.hinm_spmm(
        xin, *_pack(w, 2, 4), m=4, activations_kt=activations_kt, output_ot=output_ot, interpret=True
    )
    _check(y.T if output_ot else y, x, w, "float32")


def test_pack_layout_reconstructs_the_dense_weight():
    """The packed arrays, read the way the kernel reads them, give back W (no kernel)."""
    n, m, v = 2, 4, 32
    w = _weight(3, k=128, o=64, v=v, kv=96, n=n, m=m)
    p = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=n, m=m, block_k=64)
    vals, pos, vi, perm = (np.asarray(a) for a in p)
    o, _, j_pad = vals.shape
    assert j_pad == 32 and vi.shape == (2, m, j_pad) and pos.dtype == np.uint8
    dense = np.zeros_like(w.dense)
    for r in range(o):
        for t in range(n):
            for j in range(j_pad):
                dense[vi[r // v, pos[r, t, j], j], perm[r]] += vals[r, t, j]
    np.testing.assert_array_equal(dense, w.dense)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_unpack_positions_inverts_the_canonical_bits(m):
    rng = np.random.default_rng(m)
    pos = rng.integers(0, m, size=(5, 37))
    words = testing.pack_positions(pos, m)
    assert words.shape == (5, -(-37 // (32 // pk.packing.metadata_bits(m))))
    np.testing.assert_array_equal(np.asarray(pk.unpack_positions(jnp.asarray(words), m, 37)), pos)


def test_lowers_to_a_triton_call_for_cuda():
    """Compiled (not interpreted) kernels lower for CUDA on a machine without a GPU: the
    Triton lowering accepts every op (no gather primitive, power-of-two tiles)."""
    cases = [
        ("bfloat16", 4, 2, True, 100),  # HiNM, masked token tail
        ("float16", 4, 2, False, 128),  # plain 2:4, computed rows
        ("float32", 1, 1, True, 64),  # VectorWise, 3xTF32 product
    ]
    for dtype, m, n, gather, t in cases:
        dtype = jnp.dtype(dtype)
        o, k, jp = 128, 256, (256 // m if not gather else 128 // m)
        vi = jax.ShapeDtypeStruct((o // 64, m, jp), jnp.int32) if gather else None
        args = (
            jax.ShapeDtypeStruct((t, k), dtype),
            jax.ShapeDtypeStruct((o, n, jp), dtype),
            jax.ShapeDtypeStruct((o, n, jp), jnp.uint8) if m > 1 else None,
            vi,
            jax.ShapeDtypeStruct((o,), jnp.int32),
        )
        f = lambda *a: pk.hinm_spmm(*a, m=m)
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text, (dtype, m)
        assert "num_warps = " in text


def test_rejects_inconsistent_inputs():
    w = _weight(4, k=128, o=64, v=32, kv=64, n=2, m=4)
    p = _pack(w, 2, 4)
    x = jnp.ones((3, 128), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        pk.hinm_spmm(x.astype(jnp.bfloat16), *p, m=4, interpret=True)
    with pytest.raises(ValueError, match="stripes per block"):
        bs = pk.BlockSizes(block_rows=32, block_tokens=16, block_k=4 * 64)
        pk.hinm_spmm(x, *p, m=4, block_sizes=bs, interpret=True)
    with pytest.raises(ValueError, match="block_rows"):
        bs = pk.BlockSizes(block_rows=64, block_tokens=16, block_k=64)
        pk.hinm_spmm(x, *p, m=4, block_sizes=bs, interpret=True)
    with pytest.raises(ValueError, match="positions"):
        pk.hinm_spmm(x, p.values, None, p.vector_index, p.row_perm, m=4, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        pk.BlockSizes(block_rows=48, block_tokens=16, block_k=64)


def test_vector_size_not_a_multiple_of_16_is_not_implemented():
    w = _weight(5, k=64, o=32, v=8, kv=32, n=2, m=4)
    with pytest.raises(NotImplementedError, match="vector_size=8"):
        pk.hinm_spmm(jnp.ones((2, 64)), *_pack(w, 2, 4), m=4, interpret=True)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 10_000),
    v_mult=st.integers(1, 256),
    m=st.sampled_from([1, 2, 4, 8]),
    stripes=st.integers(1, 4096),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_default_block_sizes_fit_the_shape(t, v_mult, m, stripes, dtype):
    v = 16 * v_mult
    bs = pk.BlockSizes.default(t, v, stripes * m, m, dtype)
    assert v % bs.block_rows == 0 and bs.block_rows >= 16
    assert 16 <= bs.block_tokens <= max(16, 2 * t)
    bs.stripes_per_step(m)  # raises if block_k does not fit m
    # The default packing pads to whole steps of the default 16-bit and float32 tiles.
    s_pack = pk.default_block_k(m, stripes * m) // m
    j_pad = -(-stripes // s_pack) * s_pack
    assert j_pad % pk.BlockSizes.default(t, v, j_pad * m, m, dtype).stripes_per_step(m) == 0


@pytest.mark.parametrize(
    "v,m,dtype", [(64, 4, "bfloat16"), (32, 8, "float16"), (4096, 4, "bfloat16"), (64, 1, "float32")]
)
def test_tuning_candidates_fit_the_packing(v, m, dtype):
    cands = pk.tuning_candidates(v, m, dtype)
    assert cands and len(set(cands)) == len(cands)
    stripes = pk.default_block_k(m, 1 << 20) // m
    for bs in cands:
        assert v % bs.block_rows == 0
        assert stripes % bs.stripes_per_step(m) == 0


def test_block_sizes_are_hashable_static_config():
    a = pk.BlockSizes(64, 128, 128)
    assert hash(a) == hash(pk.BlockSizes(64, 128, 128, 4, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.block_rows = 32


def test_adapter_value_and_gradients_match_the_reference():
    """``hinm_jax._pallas`` on a ``SparseWeight``: packed once or in-graph, and the
    custom VJP (cotangents of x and of the kept values) equals the reference's."""
    import hinm_jax
    from hinm_jax import _pallas

    def reference_matmul(x, w):
        return hinm_jax.sparse_matmul(x, w, implementation="xla")

    w = _weight(6, k=128, o=64, v=32, kv=64, n=2, m=4)
    sw = hinm_jax.SparseWeight(
        values=jnp.asarray(w.values),
        metadata=jnp.asarray(w.metadata),
        vector_index=jnp.asarray(w.vector_index),
        row_perm=jnp.asarray(w.row_perm),
        shape=(128, 64),
        pattern=hinm_jax.HiNM(32, 0.5, 2, 4),
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(hinm_jax.SparseWeight.densify)(sw)), w.dense)
    packed = hinm_jax.pack_for(sw, "pallas")
    assert packed.packed_for == "pallas"
    assert set(packed.packed) == {"values", "positions", "vector_index", "row_perm"}
    x = jnp.asarray(_x(6, 7, 128, "float32"))

    def value_and_grads(fn, weight):
        def loss(x, values):
            return jnp.sum(jnp.sin(fn(x, dataclasses.replace(weight, values=values))))

        return fn(x, weight), jax.grad(loss, argnums=(0, 1))(x, weight.values)

    run = jax.jit(value_and_grads, static_argnums=0)
    want = run(reference_matmul, sw)
    for got in (run(_pallas.matmul, packed), run(_pallas.matmul, sw)):
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# What the compiled (Triton) kernel accepts: every shape the adapter takes lowers for CUDA,
# everything else raises NotImplementedError (so the default dispatch falls through to xla).
# ---------------------------------------------------------------------------------------------------------------
def _sparse_weight(pattern, k, o, dtype, seed=0, stack=None):
    import hinm_jax

    shape = (k, o) if stack is None else (stack, k, o)
    params = {"w": jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)}
    masks = hinm_jax.prune(params, pattern, stack_axes=0 if stack is None else 1)
    return hinm_jax.compress(params, masks)["w"]


def _adapter_cases():
    import hinm_jax as h

    runs = [  # (pattern, K, O): every one fits the kernel
        (h.NM(2, 4), 128, 64),
        (h.NM(1, 4), 128, 48),
        (h.NM(1, 2), 64, 32),
        (h.NM(2, 8), 256, 32),
        (h.NM(4, 16), 256, 32),
        (h.HiNM(32, 0.5, 2, 4), 128, 64),
        (h.HiNM(16, 0.5, 2, 4), 96, 32),
        (h.HiNM(48, 0.5, 1, 4), 128, 96),
        (h.HiNM(64, 0.75, 2, 8), 256, 128),
        (h.VectorWise(32, 0.5), 128, 64),
    ]
    refused = [  # (pattern, K, O, stack, what the error names)
        (h.NM(2, 3), 96, 32, None, "m=3"),
        (h.HiNM(32, 0.5, 2, 3), 96, 64, None, "m=3"),
        (h.NM(2, 6), 96, 32, None, "m=6"),
        (h.HiNM(8, 0.5, 2, 4), 64, 32, None, "vector_size=8"),
        (h.NM(2, 4), 128, 40, None, "vector_size=40"),
        (h.NM(2, 4), 128, 64, 2, "stack_axes=1"),
    ]
    dtypes = ["float16", "bfloat16", "float32"]
    cases = []
    for i, (pat, k, o) in enumerate(runs):
        cases.append(pytest.param(pat, k, o, dtypes[i % 3], (1, 37)[i % 2], i % 2 == 0, None, None,
                                  id=f"runs-{pat.spec}-{dtypes[i % 3]}"))
    for i, (pat, k, o, stack, match) in enumerate(refused):
        cases.append(pytest.param(pat, k, o, dtypes[i % 3], 5, False, stack, match, id=f"refused-{pat.spec}-{match}"))
    return cases


@pytest.mark.parametrize("pattern,k,o,dtype,t,prepacked,stack,refusal", _adapter_cases())
def test_adapter_lowers_for_cuda_exactly_what_it_accepts(monkeypatch, pattern, k, o, dtype, t, prepacked, stack,
                                                         refusal):
    """Compiled mode (as on a GPU), lowered for the CUDA platform without one: a weight the
    adapter accepts becomes a Triton call; one it cannot compile raises NotImplementedError
    (eagerly, when packed, and while tracing) instead of a ValueError or a Triton error."""
    import hinm_jax
    from hinm_jax import _pallas

    monkeypatch.setattr(_pallas, "_interpret", lambda: False)
    w = _sparse_weight(pattern, k, o, jnp.dtype(dtype), stack=stack)
    x = jax.ShapeDtypeStruct((t, k), jnp.dtype(dtype))
    lower = lambda w: jax.jit(lambda x: _pallas.matmul(x, w)).trace(x).lower(lowering_platforms=("cuda",))
    if refusal is None:
        assert _pallas.supports(w) is None
        if prepacked:
            w = hinm_jax.pack_for(w, "pallas")
            assert w.packed is not None
        text = lower(w).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, pattern
        return
    assert refusal in _pallas.supports(w)
    if stack is None:  # stacked weights are packed (a stack axis on every array), then refused by the matmul
        assert _pallas.pack(w) is None and hinm_jax.pack_for(w, "pallas").packed is None
    with pytest.raises(NotImplementedError, match=refusal):
        lower(w)
    with pytest.raises(NotImplementedError, match=refusal):
        lower(hinm_jax.pack_for(w, "pallas"))
    if stack is None:
        with pytest.raises(NotImplementedError, match=refusal):
            _pallas.matmul(jnp.ones((t, k), jnp.dtype(dtype)), w)


def test_kernel_refuses_non_power_of_two_stripes_in_both_modes():
    w = _weight(7, k=96, o=32, v=32, kv=96, n=2, m=3)
    with pytest.raises(NotImplementedError, match="m=3"):
        pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=3)
    for interpret in (True, False):
        args = (
            jax.ShapeDtypeStruct((5, 96), jnp.float16),
            jax.ShapeDtypeStruct((32, 2, 32), jnp.float16),
            jax.ShapeDtypeStruct((32, 2, 32), jnp.uint8),
            jax.ShapeDtypeStruct((1, 3, 32), jnp.int32),
            jax.ShapeDtypeStruct((32,), jnp.int32),
        )
        with pytest.raises(NotImplementedError, match="m=3"):
            jax.jit(lambda *a: pk.hinm_spmm(*a, m=3, interpret=interpret)).trace(*args)


@pytest.mark.parametrize("t,k,ok", [(2**24 - 16, 128, True), (2**24, 128, False), (2**22, 256, True)])
def test_int32_offsets_are_refused_past_the_limit(t, k, ok):
    """Element offsets in the kernel are int32: an operand of 2**31 elements or more raises
    NotImplementedError (checked on abstract shapes: nothing is allocated)."""
    o = 64
    args = (
        jax.ShapeDtypeStruct((t, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((o, 2, k // 8), jnp.bfloat16),
        jax.ShapeDtypeStruct((o, 2, k // 8), jnp.uint8),
        jax.ShapeDtypeStruct((2, 4, k // 8), jnp.int32),
        jax.ShapeDtypeStruct((o,), jnp.int32),
    )
    f = lambda *a: pk.hinm_spmm(*a, m=4)
    if ok:
        assert "__gpu$xla.gpu.triton" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    else:
        with pytest.raises(NotImplementedError, match="int32"):
            jax.jit(f).trace(*args)


def test_int32_offsets_refused_through_the_adapter(monkeypatch):
    import hinm_jax
    from hinm_jax import _pallas

    monkeypatch.setattr(_pallas, "_interpret", lambda: False)
    w = _sparse_weight(hinm_jax.NM(2, 4), 4096, 64, jnp.float16)
    x = jax.ShapeDtypeStruct((2**19, 4096), jnp.float16)  # K * T = 2**31
    with pytest.raises(NotImplementedError, match="int32"):
        jax.jit(lambda x: _pallas.matmul(x, w)).trace(x)


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 40), kept=st.integers(1, 5000), target=st.sampled_from([64, 128, 256]))
def test_default_block_k_gives_power_of_two_stripes(m, kept, target):
    bk = pk.default_block_k(m, kept * m, target)
    stripes = bk // m
    assert bk % m == 0 and stripes >= pk.MIN_TILE and stripes & (stripes - 1) == 0


@pytest.mark.parametrize("m", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("count", [1, 31, 100])
def test_metadata_codec_agrees_with_hinm_jax_format(m, count):
    """pallas_kernels keeps its own codec (it must not import hinm_jax): both directions
    agree with hinm_jax.format.pack_metadata / unpack_metadata on random positions."""
    from hinm_jax.format import pack_metadata, unpack_metadata

    rng = np.random.default_rng(10 * m + count)
    pos = rng.integers(0, m, size=(3, 7, count))
    theirs = np.asarray(pack_metadata(jnp.asarray(pos, jnp.int32), m))
    mine = np.stack([testing.pack_positions(p, m) for p in pos])
    np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(np.asarray(pk.unpack_positions(jnp.asarray(theirs), m, count)), pos)
    np.testing.assert_array_equal(np.asarray(unpack_metadata(jnp.asarray(mine), m, count)), pos)


def test_pallas_packed_leaves_are_device_arrays():
    import hinm_jax

    w = _sparse_weight(hinm_jax.HiNM(32, 0.5, 2, 4), 128, 64, jnp.bfloat16)
    leaves = jax.tree.leaves(hinm_jax.pack_for({"w": w}, "pallas")["w"].packed)
    assert len(leaves) == 4
    for leaf in leaves:
        assert isinstance(leaf, jax.Array) and not isinstance(leaf, np.ndarray), type(leaf)
