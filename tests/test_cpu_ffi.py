"""The CPU kernel package (cpu_ffi) and its adapter (hinm_jax._cpu), against the reference.

The kernel is checked schedule by schedule ("rows": packed rows in vector lanes, "tokens":
tokens in vector lanes) on every block-structured pattern, odd shapes and token counts,
permuted layouts, bias and float32 / bfloat16 mixes; the build for other instruction sets
(AVX2, portable) and the failed-build fallback run in subprocesses. The shared backend suite
(tests/test_ops.py) runs the "cpu" implementation through the public dispatch as well.
"""

import dataclasses
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cpu_ffi
import hinm_jax
from cpu_ffi import packing
from hinm_jax import NM, HiNM, VectorWise, _cpu
from hinm_jax.format import pack_metadata
from hinm_jax.ops import reference_matmul
from oracle import oracle_activation

pytestmark = pytest.mark.skipif(not _cpu.is_available(), reason="the CPU kernel does not build here")

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def _weight(rng, k, o, pattern, dtype, permuted=True):
    """A compressed (K, O) weight in ``pattern`` with a random π and σ (when permuted)."""
    w = jnp.asarray(rng.normal(size=(k, o)), dtype)
    v, kv, n, m = pattern.structure(k, o)
    perm = rng.permutation(o) if permuted else np.arange(o)
    if v == o and kv == k:
        vi = (rng.permutation(k) if permuted else np.arange(k))[None]
    else:
        vi = np.stack([rng.permutation(k)[:kv] for _ in range(o // v)])
    perm, vi = jnp.asarray(perm, jnp.int32), jnp.asarray(vi, jnp.int32)
    mask = hinm_jax.masks.mask_from_layout(jnp.abs(w.astype(jnp.float32)), perm, vi, n, m)
    layout = hinm_jax.Layout(perm, vi)
    return hinm_jax.compress({"w": w}, {"w": hinm_jax.Mask(mask, layout, pattern)})["w"]


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30)) if ref.size else 0.0


def _oracle(x, sw, bias=None, activation=None):
    """float64 ``activation(x @ densify(w) (+ bias))`` in numpy."""
    y = np.asarray(x, np.float64) @ np.asarray(sw.densify().astype(jnp.float32), np.float64)
    return oracle_activation(activation, y if bias is None else y + np.asarray(bias, np.float64))


def _tol(*dtypes):
    return 1e-5 if all(jnp.dtype(d) == F32 for d in dtypes) else 1e-2


def _patterns():
    hinm = st.builds(
        lambda v, nm, s: HiNM(v, s, *nm),
        st.sampled_from([8, 16, 24, 32, 48]),
        st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2), (1, 3), (2, 8), (5, 8), (4, 16)]),
        st.sampled_from([0.25, 0.5]),
    )
    nm = st.builds(lambda nm: NM(*nm), st.sampled_from([(2, 4), (1, 3), (3, 8), (7, 16), (1, 20), (2, 5)]))
    vw = st.builds(VectorWise, st.sampled_from([8, 16, 32]), st.sampled_from([0.25, 0.5]))
    return st.one_of(hinm, nm, vw)


# --- packing ----------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 100, 255]), rows=st.integers(1, 5), nnz=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_positions_agree_with_the_format_codec(m, rows, nnz, seed):
    """cpu_ffi keeps its own metadata unpacking (it must not import hinm_jax): same answer."""
    pos = np.random.default_rng(seed).integers(0, m, size=(rows, nnz)).astype(np.int32)
    words = pack_metadata(jnp.asarray(pos), m)
    np.testing.assert_array_equal(packing.positions(np.asarray(words), m, nnz), pos)
    np.testing.assert_array_equal(np.asarray(packing.positions(words, m, nnz)), pos)


@pytest.mark.parametrize("pattern", [HiNM(24, 0.5, 2, 4), NM(2, 4), VectorWise(16, 0.5), HiNM(8, 0.25, 1, 3)])
def test_pack_interleaves_16_rows_and_pads_with_zeros(pattern):
    rng = np.random.default_rng(0)
    sw = _weight(rng, 96, 48, pattern, F32)
    p = _cpu.pack(sw)
    nb, kv = sw.vector_index.shape
    v, nnz = 48 // nb, sw.values.shape[1]
    g = -(-v // 16)
    assert p["values"].shape == (nb, g, nnz, 16) and p["positions"].dtype == jnp.uint8
    vals = np.asarray(p["values"]).transpose(0, 1, 3, 2).reshape(nb, g * 16, nnz)
    np.testing.assert_array_equal(vals[:, :v].reshape(-1, nnz), np.asarray(sw.values))
    assert not vals[:, v:].any()
    np.testing.assert_array_equal(np.asarray(p["positions"]).transpose(0, 1, 3, 2).reshape(nb, g * 16, nnz)[:, :v].reshape(-1, nnz), np.asarray(sw.positions()))
    traced = jax.jit(_cpu.pack)(sw)
    for key in p:
        np.testing.assert_array_equal(np.asarray(traced[key]), np.asarray(p[key]))


@pytest.mark.parametrize("pattern", [HiNM(24, 0.5, 2, 4), NM(2, 4)])
def test_bf16_2_4_packs_value_pairs_with_ascending_positions(pattern):
    rng = np.random.default_rng(5)
    sw = _weight(rng, 96, 48, pattern, BF16)
    # Reverse every stored pair: the packer must restore ascending positions and swap the values with them.
    stripes = sw.values.shape[1] // 2
    values = sw.values.reshape(48, stripes, 2)[..., ::-1].reshape(48, -1)
    positions = np.asarray(sw.positions()).reshape(48, stripes, 2)[..., ::-1].reshape(48, -1)
    sw_rev = dataclasses.replace(sw, values=values, metadata=pack_metadata(jnp.asarray(positions), sw.m))
    np.testing.assert_array_equal(np.asarray(sw_rev.densify(), np.float32), np.asarray(sw.densify(), np.float32))
    assert packing.use_pairs(sw.dtype, sw.n, sw.m) and not packing.use_pairs(F32, 2, 4)
    nb = sw.vector_index.shape[0]
    v = 48 // nb
    g = -(-v // 16)
    for w in (sw, sw_rev):
        p = _cpu.pack(w)
        assert p["values"].shape == (nb, g, stripes, 32) and p["positions"].shape == (nb, g, stripes, 32)
        pos = np.asarray(p["positions"]).reshape(nb, g, stripes, 16, 2).transpose(0, 1, 3, 2, 4).reshape(nb, g * 16, stripes, 2)
        vals = np.asarray(p["values"], np.float32).reshape(nb, g, stripes, 16, 2).transpose(0, 1, 3, 2, 4).reshape(nb, g * 16, stripes, 2)
        assert (pos[..., 0] < pos[..., 1]).all()
        assert not vals[:, v:].any()
        np.testing.assert_array_equal(pos[:, :v].reshape(48, -1), np.sort(np.asarray(sw.positions()).reshape(48, stripes, 2), -1).reshape(48, -1))
        np.testing.assert_array_equal(vals[:, :v].reshape(48, -1), np.asarray(sw.values, np.float32))
        traced = jax.jit(_cpu.pack)(w)
        for key in p:
            np.testing.assert_array_equal(np.asarray(traced[key]), np.asarray(p[key]))


@pytest.mark.parametrize("pattern, dtype", [(HiNM(24, 0.5, 2, 4), F32), (HiNM(8, 0.25, 1, 3), F32), (NM(3, 8), BF16),
                                            (HiNM(48, 0.5, 2, 4), BF16), (NM(2, 4), BF16)])
def test_inputs_name_the_column_of_every_value(pattern, dtype):
    """``inputs`` (the tokens schedule's index of x's column per value, pairs layout included) read
    against the dense matrix: W[inputs, row_perm[row]] is the packed value."""
    rng = np.random.default_rng(6)
    sw = _weight(rng, 96, 48, pattern, dtype)
    p = _cpu.pack(sw)
    assert p["inputs"].dtype == jnp.uint16 and p["inputs"].shape == p["positions"].shape
    nb = sw.vector_index.shape[0]
    v = 48 // nb
    lanes = p["values"].shape[-1]
    rows = np.arange(p["values"].shape[1] * 16).reshape(-1, 16)  # packed row of each lane, per group
    if lanes == 32:
        rows = rows.repeat(2, axis=1)  # pairs: lane 2 r + q is row r
    row = np.broadcast_to(rows[None, :, None, :], p["values"].shape)
    block = np.broadcast_to(np.arange(nb)[:, None, None, None], p["values"].shape)
    real = row < v
    channel = np.asarray(sw.row_perm)[block[real] * v + row[real]]
    dense = np.asarray(sw.densify().astype(jnp.float32))
    np.testing.assert_array_equal(dense[np.asarray(p["inputs"])[real].astype(np.int64), channel],
                                  np.asarray(p["values"], np.float32)[real])


@pytest.mark.parametrize("mode", cpu_ffi.MODES)
def test_layers_of_more_than_65536_inputs_run_without_input_indices(mode):
    """K > 65536: ``inputs`` would not fit uint16, so the packer leaves it empty and the kernel runs
    the rows schedule, also when asked for the tokens schedule."""
    rng = np.random.default_rng(7)
    k = packing.MAX_INPUTS + 8
    sw = _weight(rng, k, 16, NM(2, 4), F32)
    p = _cpu.pack(sw)
    assert p["inputs"].shape == (0,)
    x = jnp.asarray(rng.normal(size=(40, k)), jnp.float32)
    y = cpu_ffi.spmm(x, p, n=2, m=4, vector_size=16, out_dtype=F32, mode=mode)
    assert _rel_err(y, _oracle(x, sw)) <= 1e-5


def test_weights_packed_in_the_older_layout_are_packed_again():
    """A checkpoint's weight packed before ``inputs`` existed still multiplies correctly."""
    rng = np.random.default_rng(9)
    sw = hinm_jax.pack_for(_weight(rng, 128, 64, HiNM(32, 0.5), F32), "cpu")
    old = dataclasses.replace(sw, packed={key: a for key, a in sw.packed.items() if key != "inputs"})
    x = jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)
    assert _rel_err(hinm_jax.sparse_matmul(x, old, implementation="cpu"), _oracle(x, sw)) <= 1e-5


@pytest.mark.parametrize("t", [1, 3, 5, 8, 9, 33, 70])
@pytest.mark.parametrize("mode", cpu_ffi.MODES)
@pytest.mark.parametrize("xdt", [BF16, F32])
@pytest.mark.parametrize("pattern", [HiNM(32, 0.5, 2, 4), HiNM(24, 0.5, 2, 4), NM(2, 4)])
def test_bf16_pair_layout_matches_the_reference(pattern, xdt, mode, t):
    """bfloat16 2:4 weights: the BF16 dot path (bfloat16 x, where the CPU has it) and the widened path."""
    rng = np.random.default_rng(t)
    k, o = 256, 96
    sw = _weight(rng, k, o, pattern, BF16)
    x = jnp.asarray(rng.normal(size=(t, k)), xdt)
    b = jnp.asarray(rng.normal(size=(o,)), jnp.float32)
    for out in (F32, BF16):
        y = cpu_ffi.spmm(x, _cpu.pack(sw), n=2, m=4, vector_size=sw.vector_size, out_dtype=out, bias=b, mode=mode)
        assert y.dtype == out
        assert _rel_err(y, _oracle(x.astype(jnp.float32), sw, b)) <= (1e-5 if xdt == F32 and out == F32 else 1e-2)


@pytest.mark.parametrize("k", [20, 52, 104, 1000])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("pattern", [HiNM(32, 0.5, 2, 4), NM(2, 4)])
def test_tokens_schedule_transposes_every_input_and_token(pattern, dtypes, k):
    """x is transposed into token tiles 16 x 16 (AVX-512; 32 for bfloat16 pairs) or 8 x 8 (AVX2) at a
    time: inputs past the last whole block, tokens past T in the last tile."""
    rng = np.random.default_rng(k)
    xdt, wdt = dtypes
    sw = _weight(rng, k, 96, pattern, wdt)
    for t in (1, 17, 33, 64):
        x = jnp.asarray(rng.normal(size=(t, k)), xdt)
        out = jnp.result_type(xdt, wdt)
        y = cpu_ffi.spmm(x, _cpu.pack(sw), n=2, m=4, vector_size=sw.vector_size, out_dtype=out, mode="tokens")
        assert _rel_err(y, _oracle(x.astype(jnp.float32), sw)) <= _tol(xdt, wdt)


def test_packed_bf16_pairs_survive_a_checkpoint(tmp_path):
    """The pair layout is told apart by its shape alone, so a restored packed weight runs as saved."""
    rng = np.random.default_rng(7)
    sw = hinm_jax.pack_for(_weight(rng, 128, 64, HiNM(32, 0.5, 2, 4), BF16), "cpu")
    assert sw.packed["values"].shape[-1] == 32
    hinm_jax.checkpoint.save(tmp_path / "ckpt", {"w": sw})
    back = hinm_jax.checkpoint.restore(tmp_path / "ckpt")["w"]
    assert back.packed_for == "cpu" and back.packed["values"].shape == sw.packed["values"].shape
    x = jnp.asarray(rng.normal(size=(40, 128)), BF16)
    np.testing.assert_array_equal(
        np.asarray(hinm_jax.sparse_matmul(x, back, implementation="cpu"), np.float32),
        np.asarray(hinm_jax.sparse_matmul(x, sw, implementation="cpu"), np.float32),
    )


def test_pack_for_cpu_stores_device_arrays_once():
    rng = np.random.default_rng(1)
    sw = _weight(rng, 64, 32, HiNM(16, 0.5), F32)
    packed = hinm_jax.pack_for({"layer": {"kernel": sw}}, "cpu")["layer"]["kernel"]
    assert packed.packed_for == "cpu"
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(packed.packed))
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    np.testing.assert_allclose(hinm_jax.sparse_matmul(x, packed, implementation="cpu"), _oracle(x, sw), rtol=1e-5, atol=1e-5)


def test_stacked_weights_pack_per_matrix():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(3, 64, 32)), jnp.float32)
    masks = hinm_jax.prune({"w": w}, HiNM(16, 0.5), stack_axes=1)
    sw = hinm_jax.compress({"w": w}, masks)["w"]
    p = _cpu.pack(sw)
    assert p["values"].shape[0] == 3
    one = dataclasses.replace(sw, values=sw.values[1], metadata=sw.metadata[1], vector_index=sw.vector_index[1], row_perm=sw.row_perm[1], shape=sw.shape[1:], stack_axes=0)
    np.testing.assert_array_equal(np.asarray(p["values"][1]), np.asarray(_cpu.pack(one)["values"]))


# --- the kernel ---------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    pattern=_patterns(),
    kb=st.integers(1, 4),
    ob=st.integers(1, 3),
    t=st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 33, 70]),
    mode=st.sampled_from(cpu_ffi.MODES),
    dtypes=st.sampled_from([(F32, F32), (BF16, BF16), (BF16, F32), (F32, BF16)]),
    bias=st.booleans(),
    activation=st.sampled_from(cpu_ffi.ACTIVATIONS),
    seed=st.integers(0, 2**31),
)
def test_both_schedules_match_the_reference(pattern, kb, ob, t, mode, dtypes, bias, activation, seed):
    rng = np.random.default_rng(seed)
    xdt, wdt = dtypes
    m = pattern.structure(4096, 4096).m
    k = kb * 16 * m
    o = ob * (pattern.vector_size if hasattr(pattern, "vector_size") else 8) * (2 if isinstance(pattern, NM) else 1)
    sw = _weight(rng, k, o, pattern, wdt)
    x = jnp.asarray(rng.normal(size=(t, k)), xdt)
    b = jnp.asarray(rng.normal(size=(o,)), jnp.float32) if bias else None
    out = jnp.result_type(xdt, wdt)
    y = cpu_ffi.spmm(x, _cpu.pack(sw), n=sw.n, m=sw.m, vector_size=sw.vector_size, out_dtype=out, bias=b, mode=mode,
                     activation=activation)
    assert y.shape == (t, o) and y.dtype == out
    assert _rel_err(y, _oracle(x.astype(jnp.float32), sw, b, activation)) <= _tol(xdt, wdt)


@pytest.mark.parametrize("mode", cpu_ffi.MODES)
@pytest.mark.parametrize("permuted", [False, True])
def test_epilogue_gelu_is_the_exact_gelu_everywhere(mode, permuted):
    """The epilogue's GELU (Abramowitz-Stegun 7.1.28 erf) against float64 erf of the kernel's own
    float32 pre-activation, output by output: within 6e-7 * max(1, |v|) over about -25..25 (the
    approximation's 3e-7 bound on erf, and float32 rounding of its polynomial raised to the 16th power:
    3.5e-7 at |v| = 0.8 seen), and right at 0, +-inf and NaN (from the bias). Every
    write path runs: 16-channel writes, the tail of 8 channels of O = 40, staged permuted outputs."""
    k, o = 64, 40
    sw = _weight(np.random.default_rng(1), k, o, HiNM(40, 0.5, 2, 4), F32, permuted=permuted)
    packed = _cpu.pack(sw)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(300, k)) * rng.uniform(0.01, 4.0, size=(300, 1)), F32)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 5.0]
    bias = jnp.asarray(np.resize(specials, o), F32)
    for b in (None, bias):
        run = lambda act: np.asarray(cpu_ffi.spmm(x, packed, n=2, m=4, vector_size=40, out_dtype=F32, bias=b, mode=mode,
                                                  activation=act), np.float64)
        pre, y = run(None), run("gelu")
        with np.errstate(invalid="ignore", over="ignore"):
            want = oracle_activation("gelu", pre)
        fin = np.isfinite(pre)
        assert np.abs(pre[fin]).max() > 20
        assert np.all(np.abs(y[fin] - want[fin]) <= 6e-7 * np.maximum(1.0, np.abs(pre[fin])))
        assert np.all(y[pre == np.inf] == np.inf) and np.all(np.isnan(y[np.isnan(pre)]))
        assert np.all(np.isnan(y[pre == -np.inf]))  # -inf * 0, as x * Phi(x) gives
        assert b is None or (np.isinf(pre).sum() and np.isnan(pre).sum())


@pytest.mark.parametrize("mode", cpu_ffi.MODES)
def test_epilogue_relu_keeps_nan(mode):
    sw = _weight(np.random.default_rng(3), 64, 32, HiNM(32, 0.5, 2, 4), F32)
    bias = jnp.asarray(np.resize([np.nan, -1.0, 0.0, 2.0], 32), F32)
    y = np.asarray(cpu_ffi.spmm(jnp.zeros((40, 64), F32), _cpu.pack(sw), n=2, m=4, vector_size=32, out_dtype=F32,
                                bias=bias, mode=mode, activation="relu"))
    assert np.all(np.isnan(y[:, 0::4])) and np.all(y[:, 1::4] == 0) and np.all(y[:, 3::4] == 2)


def test_unknown_activation_is_rejected():
    sw = _weight(np.random.default_rng(0), 64, 32, HiNM(32, 0.5, 2, 4), F32)
    with pytest.raises(ValueError, match="activation='tanh'"):
        cpu_ffi.spmm(jnp.ones((2, 64)), _cpu.pack(sw), n=2, m=4, vector_size=32, out_dtype=F32, activation="tanh")


@pytest.mark.parametrize("o, v", [(512, 32), (520, 40)])
@pytest.mark.parametrize("permuted", [False, True])
def test_outputs_of_a_megabyte_or_more_are_streamed_correctly(o, v, permuted):
    """float32 outputs from 1 MB on are written 16 channels at a time with streaming stores (rows
    64-byte aligned with O = 512; O = 520 mixes aligned and unaligned rows, and its blocks of 40 rows
    end in a group of 8), fenced before the call returns; identity and permuted layouts alike."""
    rng = np.random.default_rng(o)
    sw = _weight(rng, 64, o, HiNM(v, 0.5, 2, 4), F32, permuted=permuted)
    x = jnp.asarray(rng.normal(size=(600, 64)), F32)
    assert 600 * o * 4 >= 2**20
    y = cpu_ffi.spmm(x, _cpu.pack(sw), n=2, m=4, vector_size=v, out_dtype=F32, mode="tokens")
    assert _rel_err(y, _oracle(x, sw)) <= 1e-5


@pytest.mark.parametrize("mode", ["rows", "tokens"])
@pytest.mark.parametrize("permuted", [False, True])
def test_calls_of_1m_multiply_adds_or_more_split_across_the_pool(mode, permuted):
    """Smaller calls run on the calling thread alone; from 2**20 multiply-adds (here 1024 rows x
    128 kept inputs x 130 tokens) the units are shared with the pool's threads, the staged outputs
    of permuted layouts written by whichever thread finishes a tile last."""
    rng = np.random.default_rng(5)
    sw = _weight(rng, 512, 1024, HiNM(32, 0.5, 2, 4), F32, permuted=permuted)
    x = jnp.asarray(rng.normal(size=(130, 512)), F32)
    b = jnp.asarray(rng.normal(size=(1024,)), jnp.float32)
    assert 1024 * 128 * 130 >= 2**20
    y = cpu_ffi.spmm(x, _cpu.pack(sw), n=2, m=4, vector_size=32, out_dtype=F32, bias=b, mode=mode)
    assert _rel_err(y, _oracle(x, sw, b)) <= 1e-5


@pytest.mark.parametrize(
    "pattern, dtype", [(HiNM(32, 0.5, 2, 4), F32), (NM(2, 4), BF16)], ids=["hinm-float32", "2:4-bfloat16"]
)
@pytest.mark.parametrize("permuted", [False, True])
def test_tokens_schedule_reuses_the_transposed_inputs_ring(pattern, dtype, permuted):
    """With K = 4096, 900 tokens make 8 (float32, and bfloat16 widened) or 4 (bfloat16 dot products)
    groups of token tiles of about 2 MB of x^T each: more than the ring's three slots, so later groups
    are transposed into the slots of earlier ones once their units have finished, on both of the
    pool's threads, each group's while the units of the group before it run."""
    rng = np.random.default_rng(9)
    sw = _weight(rng, 4096, 64, pattern, dtype, permuted=permuted)
    x = jnp.asarray(rng.normal(size=(900, 4096)), dtype)
    y = cpu_ffi.spmm(x, _cpu.pack(sw), n=sw.n, m=sw.m, vector_size=sw.vector_size, out_dtype=dtype, mode="tokens")
    assert _rel_err(y, _oracle(x.astype(jnp.float32), sw)) <= _tol(dtype, dtype)


def test_default_schedule_by_token_count_and_dtype():
    """With AVX-512 (and the portable build), float32 activations take the rows schedule below 32
    tokens, bfloat16 ones below 16; AVX2 builds take it below 16 tokens for both."""
    if cpu_ffi.ffi.lanes() == 8:
        assert [cpu_ffi.default_mode(t, dt) for dt in (F32, BF16) for t in (1, 15, 16, 32)] == ["rows", "rows", "tokens", "tokens"] * 2
    else:
        assert [cpu_ffi.default_mode(t) for t in (1, 16, 31, 32)] == ["rows", "rows", "rows", "tokens"]
        assert [cpu_ffi.default_mode(t, BF16) for t in (15, 16)] == ["rows", "tokens"]


@pytest.mark.parametrize("t", [0, 1, 7, 1000])
@pytest.mark.parametrize("pattern", [HiNM(32, 0.5, 2, 4), HiNM(64, 0.5, 2, 4), NM(2, 4), VectorWise(32, 0.5), HiNM(16, 0.5, 1, 8)])
def test_sparse_matmul_cpu_against_the_xla_reference(pattern, t):
    rng = np.random.default_rng(t)
    sw = hinm_jax.pack_for(_weight(rng, 256, 128, pattern, F32), "cpu")
    x = jnp.asarray(rng.normal(size=(t, 256)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(128,)), jnp.float32)
    y = hinm_jax.sparse_matmul(x, sw, bias=b, implementation="cpu")
    ref = reference_matmul(x, dataclasses.replace(sw, packed=None, packed_for=None)) + b
    assert y.shape == (t, 128)
    assert _rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("layout", ["identity", "blocks", "rows"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16)])
@pytest.mark.parametrize("v, o", [(8, 40), (6, 42)])
def test_tokens_schedule_writes_every_channel_of_any_row_permutation(layout, dtypes, v, o):
    """Rows of a block going to non-consecutive channels (as after 2CP) are staged and written per
    finished token tile, 16 channels x 16 tokens at a time; O = 40 / 42 leaves a tail of 8 / 10
    channels; V = 6 rows do not fill whole register tiles (staged through the scratch buffer)."""
    rng = np.random.default_rng(11)
    xdt, wdt = dtypes
    k = 64
    sw = _weight(rng, k, o, HiNM(v, 0.5, 2, 4), wdt, permuted=False)
    perm = {"identity": np.arange(o),
            "blocks": rng.permutation(o // v).repeat(v) * v + np.tile(np.arange(v), o // v),  # consecutive per block
            "rows": rng.permutation(o)}[layout]
    sw = dataclasses.replace(sw, row_perm=jnp.asarray(perm, jnp.int32))
    b = jnp.asarray(rng.normal(size=(o,)), jnp.float32)
    for t in (16, 33, 70, 200):
        x = jnp.asarray(rng.normal(size=(t, k)), xdt)
        for out in (F32, BF16):
            y = cpu_ffi.spmm(x, _cpu.pack(sw), n=2, m=4, vector_size=v, out_dtype=out, bias=b, mode="tokens")
            tol = 1e-5 if (xdt, wdt, out) == (F32, F32, F32) else 1e-2
            assert _rel_err(y, _oracle(x.astype(jnp.float32), sw, b)) <= tol, (t, out)


@pytest.mark.parametrize("mode", cpu_ffi.MODES)
@pytest.mark.parametrize(
    "key, at, value, message",
    [
        ("vector_index", (1, 5), 64, "vector index out of range"),
        ("vector_index", (0, 0), -1, "vector index out of range"),
        ("row_perm", (7,), 32, "row permutation out of range"),
        ("row_perm", (31,), -3, "row permutation out of range"),
        ("row_perm", (1,), "row_perm[0]", "repeats a channel"),
        ("inputs", (1, 0, 3, 5), 64, "input index out of range"),
    ],
)
def test_damaged_indices_are_rejected(mode, key, at, value, message):
    """Indices outside x or y, and a permutation that repeats a channel, in both schedules (the
    per-value input indices are read by the tokens schedule only)."""
    sw = _weight(np.random.default_rng(12), 64, 32, HiNM(16, 0.5, 2, 4), F32)
    packed = dict(_cpu.pack(sw))
    value = packed["row_perm"][0] if value == "row_perm[0]" else value
    packed[key] = packed[key].at[at].set(value)
    x = jnp.ones((40, 64))
    call = lambda: jax.block_until_ready(cpu_ffi.spmm(x, packed, n=2, m=4, vector_size=16, out_dtype=F32, mode=mode))
    if key == "inputs" and mode == "rows":  # not read: the product is still right
        assert _rel_err(call(), _oracle(x, sw)) <= 1e-5
        return
    with pytest.raises(Exception, match=message):
        call()


def test_jit_leading_dims_and_gradient_in_x():
    rng = np.random.default_rng(3)
    sw = hinm_jax.pack_for(_weight(rng, 128, 64, HiNM(32, 0.5), F32), "cpu")
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)
    f = jax.jit(lambda x, s: hinm_jax.sparse_matmul(x, s, implementation="cpu"))
    np.testing.assert_allclose(f(x, sw), _oracle(x.reshape(6, 128), sw).reshape(2, 3, 64), rtol=1e-5, atol=1e-5)
    c = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(c * hinm_jax.sparse_matmul(x, sw, implementation="cpu")))(x)
    dense = np.asarray(sw.densify(), np.float64)
    np.testing.assert_allclose(g, np.asarray(c, np.float64) @ dense.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda rng: (_weight(rng, 64, 32, HiNM(16, 0.5), jnp.float16), jnp.float16), "dtype float16"),
        (lambda rng: (_weight(rng, 64, 32, HiNM(16, 0.5), F32), jnp.float16), "float32 or bfloat16"),
        (lambda rng: (_weight(rng, 256, 8, NM(1, 256), F32), F32), "m=256"),
    ],
)
def test_what_the_kernel_cannot_run_raises_not_implemented(make, what):
    sw, xdt = make(np.random.default_rng(4))
    x = jnp.ones((2, sw.matrix_shape[0]), xdt)
    with pytest.raises(NotImplementedError, match=what):
        _cpu.matmul(x, sw)
    # ... and the default dispatch falls through to the reference
    np.testing.assert_allclose(
        np.asarray(hinm_jax.sparse_matmul(x, sw), np.float32), np.asarray(reference_matmul(x, sw), np.float32), rtol=1e-3
    )


def test_bias_of_the_wrong_shape_is_a_clear_error():
    sw = _weight(np.random.default_rng(5), 64, 32, HiNM(16, 0.5), F32)
    with pytest.raises(ValueError, match=r"bias: shape=\(31,\).*O=32"):
        _cpu.matmul(jnp.ones((2, 64)), sw, bias=jnp.ones(31))


# --- the feed-forward block: two layers in one call -------------------------------------------


def _ffn_patterns():
    """Patterns whose structure fits K, H multiples of 64 and H, O multiples of 32."""
    hinm = st.builds(
        lambda v, nm, s: HiNM(v, s, *nm),
        st.sampled_from([8, 16, 32]),
        st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 8), (4, 16)]),
        st.sampled_from([0.25, 0.5]),
    )
    return st.one_of(hinm, st.sampled_from([NM(2, 4), NM(1, 4), NM(4, 8), VectorWise(16, 0.5)]))


def _ffn_oracle(x, w1, b1, w2, b2, activation):
    h = _oracle(x, w1, b1, activation)
    y = h @ np.asarray(w2.densify().astype(jnp.float32), np.float64)
    return y if b2 is None else y + np.asarray(b2, np.float64)


def _ffn(x, w1, w2, **kw):
    shapes = ((w1.n, w1.m, w1.vector_size), (w2.n, w2.m, w2.vector_size))
    return cpu_ffi.ffn(x, _cpu.pack(w1), _cpu.pack(w2), shapes=shapes, **kw)


@settings(max_examples=3, deadline=None)
@given(
    p1=_ffn_patterns(),
    p2=_ffn_patterns(),
    kb=st.integers(1, 3),
    hb=st.integers(1, 3),
    ob=st.integers(1, 3),
    t=st.sampled_from([0, 1, 5, 16, 31, 32, 33, 64, 65, 70, 129, 300]),
    wdt=st.sampled_from([F32, BF16]),
    bias=st.booleans(),
    activation=st.sampled_from(cpu_ffi.ACTIVATIONS),
    permuted=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_feed_forward_block_matches_the_reference_and_two_calls(p1, p2, kb, hb, ob, t, wdt, bias, activation, permuted, seed):
    """One call of two layers: against float64, and bit for bit against two calls of the tokens
    schedule (the same sums in the same order; only where the intermediate activations go differs)."""
    rng = np.random.default_rng(seed)
    k, h, o = 64 * kb, 64 * hb, 32 * ob
    w1, w2 = _weight(rng, k, h, p1, wdt, permuted), _weight(rng, h, o, p2, wdt, permuted)
    assume(packing.use_pairs(wdt, w1.n, w1.m) == packing.use_pairs(wdt, w2.n, w2.m))  # one layout (bfloat16)
    x = jnp.asarray(rng.normal(size=(t, k)), F32)
    b1 = jnp.asarray(rng.normal(size=(h,)), F32) if bias else None
    b2 = jnp.asarray(rng.normal(size=(o,)), F32) if bias else None
    y = _ffn(x, w1, w2, bias1=b1, bias2=b2, activation=activation)
    assert y.shape == (t, o) and y.dtype == F32
    assert _rel_err(y, _ffn_oracle(x, w1, b1, w2, b2, activation)) <= 1e-5
    one = lambda x, w, b, act: cpu_ffi.spmm(x, _cpu.pack(w), n=w.n, m=w.m, vector_size=w.vector_size, out_dtype=F32,
                                            bias=b, mode="tokens", activation=act)
    np.testing.assert_array_equal(y, one(one(x, w1, b1, activation), w2, b2, None))


@settings(max_examples=3, deadline=None)
@given(
    patterns=st.lists(_ffn_patterns(), min_size=1, max_size=4),
    kb=st.integers(1, 3),
    obs=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    t=st.sampled_from([0, 1, 16, 33, 64, 70, 300]),
    wdt=st.sampled_from([F32, BF16]),
    activations=st.lists(st.sampled_from(cpu_ffi.ACTIVATIONS), min_size=4, max_size=4),
    bias=st.booleans(),
    permuted=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_products_of_one_input_match_the_reference_and_one_call_each(patterns, kb, obs, t, wdt, activations, bias, permuted,
                                                                     seed):
    """Up to 4 weights of one x in one call: against float64, and bit for bit against one call of the
    tokens schedule per weight (x is transposed once instead of once per weight)."""
    rng = np.random.default_rng(seed)
    k = 64 * kb
    ws = [_weight(rng, k, 32 * o, p, wdt, permuted) for p, o in zip(patterns, obs)]
    assume(len({packing.use_pairs(wdt, w.n, w.m) for w in ws}) == 1)  # one layout (bfloat16)
    acts = activations[: len(ws)]
    bs = [jnp.asarray(rng.normal(size=(w.shape[1],)), F32) if bias else None for w in ws]
    x = jnp.asarray(rng.normal(size=(t, k)), F32)
    shapes = tuple((w.n, w.m, w.vector_size) for w in ws)
    ys = cpu_ffi.spmm_many(x, tuple(_cpu.pack(w) for w in ws), shapes=shapes, biases=bs, activations=acts)
    assert len(ys) == len(ws)
    for y, w, b, a in zip(ys, ws, bs, acts):
        assert y.shape == (t, w.shape[1]) and y.dtype == F32
        assert _rel_err(y, _oracle(x, w, b, a)) <= 1e-5
        one = cpu_ffi.spmm(x, _cpu.pack(w), n=w.n, m=w.m, vector_size=w.vector_size, out_dtype=F32, bias=b, mode="tokens",
                           activation=a)
        np.testing.assert_array_equal(y, one)


def test_sparse_matmuls_runs_one_call_of_up_to_4_weights():
    rng = np.random.default_rng(17)
    ws = [hinm_jax.pack_for(_weight(rng, 64, 32, HiNM(32, 0.5, 2, 4), F32), "cpu") for _ in range(5)]
    x = jnp.asarray(rng.normal(size=(40, 64)), F32)
    for count, calls in ((3, {"hinm_layers_cpu": 1}), (5, {"hinm_spmm_cpu": 5})):  # 5: one each
        hlo = jax.jit(lambda x: hinm_jax.sparse_matmuls(x, ws[:count])).lower(x).as_text()
        assert {name: hlo.count(f"custom_call @{name}(") for name in calls} == calls, count
    with pytest.raises(NotImplementedError, match="5 weights: one call takes 1 to 4"):
        _cpu.matmuls(x, ws)
    for y, w in zip(hinm_jax.sparse_matmuls(x, ws), ws):
        assert _rel_err(y, _oracle(x, w)) <= 1e-5


def test_feed_forward_block_reuses_both_rings():
    """K = 256, H = 512: a group of token tiles holds about 2 MB of x^T and h^T together (20 tiles),
    so 2600 tokens make 5 groups, more than the rings' three slots: the first layer's units of a
    group wait for the second layer's units of the group three before (whose h^T slots they reuse)."""
    rng = np.random.default_rng(13)
    w1 = _weight(rng, 256, 512, HiNM(32, 0.5, 2, 4), F32)
    w2 = _weight(rng, 512, 96, HiNM(32, 0.5, 2, 4), F32)
    x = jnp.asarray(rng.normal(size=(2600, 256)), F32)
    b1 = jnp.asarray(rng.normal(size=(512,)), F32)
    y = _ffn(x, w1, w2, bias1=b1, activation="gelu")
    assert _rel_err(y, _ffn_oracle(x, w1, b1, w2, None, "gelu")) <= 1e-5


def test_sparse_ffn_runs_one_call_from_the_tokens_schedule_on():
    rng = np.random.default_rng(14)
    w1 = hinm_jax.pack_for(_weight(rng, 64, 128, HiNM(32, 0.5, 2, 4), F32), "cpu")
    w2 = hinm_jax.pack_for(_weight(rng, 128, 64, HiNM(32, 0.5, 2, 4), F32), "cpu")
    start = 16 if cpu_ffi.ffi.lanes() == 8 else 32
    for t, calls in ((start - 1, {"hinm_spmm_cpu": 2}), (start, {"hinm_layers_cpu": 1})):
        x = jnp.ones((t, 64))
        hlo = jax.jit(lambda x: hinm_jax.sparse_ffn(x, w1, w2, activation="gelu")).lower(x).as_text()
        assert {name: hlo.count(f"custom_call @{name}(") for name in calls} == calls, t


@pytest.mark.parametrize(
    "case, what",
    [
        ("bf16 x", "float32 x and weights of one dtype"),
        ("mixed dtypes", "float32 x and weights of one dtype"),
        ("few tokens", "too few tokens"),
        ("layouts", "packed in different layouts"),
        ("activation", "activation='tanh'"),
    ],
)
def test_what_one_call_cannot_run_raises_not_implemented_and_sparse_ffn_runs_two(case, what):
    rng = np.random.default_rng(15)
    dt2 = {"mixed dtypes": BF16, "layouts": BF16}.get(case, F32)
    w1 = _weight(rng, 64, 128, HiNM(32, 0.5, 2, 4), BF16 if case == "layouts" else F32)
    w2 = _weight(rng, 128, 64, HiNM(32, 0.5, 1, 4) if case == "layouts" else HiNM(32, 0.5, 2, 4), dt2)
    x = jnp.asarray(rng.normal(size=(3 if case == "few tokens" else 40, 64)), BF16 if case == "bf16 x" else F32)
    act = "tanh" if case == "activation" else "relu"
    with pytest.raises(NotImplementedError, match=what):
        _cpu.ffn(x, w1, w2, activation=act)
    if case == "activation":
        return
    y = hinm_jax.sparse_ffn(x, w1, w2, activation=act, implementation="cpu")
    want = _ffn_oracle(x.astype(F32), w1, None, w2, None, act)
    assert _rel_err(y, want) <= _tol(x.dtype, w1.dtype, w2.dtype)


@pytest.mark.parametrize(
    "layer, key, at, value, message",
    [
        (2, "inputs", (1, 0, 3, 5), 128, "input index out of range"),
        (1, "row_perm", (1,), "row_perm[0]", "repeats a channel"),
        (2, "vector_index", (0, 0), -1, "vector index out of range"),
    ],
)
def test_several_layers_reject_damaged_indices(layer, key, at, value, message):
    """A chain (the second layer's inputs are the first's outputs) and products of one input alike."""
    rng = np.random.default_rng(16)
    w1 = _weight(rng, 64, 128, HiNM(16, 0.5, 2, 4), F32)
    w2 = _weight(rng, 128, 64, HiNM(16, 0.5, 2, 4), F32)
    w3 = _weight(rng, 64, 128, HiNM(16, 0.5, 2, 4), F32)
    shapes = ((2, 4, 16), (2, 4, 16))
    for call, ws in ((lambda x, p: cpu_ffi.ffn(x, *p, shapes=shapes), (w1, w2)),
                     (lambda x, p: cpu_ffi.spmm_many(x, p, shapes=shapes), (w1, w3))):
        packed = [dict(_cpu.pack(w)) for w in ws]
        d = packed[layer - 1]
        d[key] = d[key].at[at].set(d["row_perm"][0] if value == "row_perm[0]" else value)
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call(jnp.ones((40, 64)), packed))


# --- builds -------------------------------------------------------------------------------

_CHECK = textwrap.dedent(
    """
    import warnings, numpy as np, jax, jax.numpy as jnp, hinm_jax
    from hinm_jax import _cpu
    w = jax.random.normal(jax.random.key(0), (192, 96))
    sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:32:0.5:2:4"))["w"]
    x = jax.random.normal(jax.random.key(1), (40, 192))
    sw16 = hinm_jax.compress({"w": w.astype(jnp.bfloat16)}, hinm_jax.prune({"w": w}, "hinm:32:0.5:2:4"))["w"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [hinm_jax.sparse_matmul(x[:t], sw) for t in (1, 40, 40)]
        ys16 = [hinm_jax.sparse_matmul(x[:t].astype(jnp.bfloat16), sw16) for t in (1, 40)]  # the pair layout
    ref = np.asarray(x, np.float64) @ np.asarray(sw.densify(), np.float64)
    assert all(np.max(np.abs(y - ref[: y.shape[0]])) < 1e-4 for y in ys)
    ref16 = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(sw16.densify(), np.float64)
    assert all(np.max(np.abs(np.asarray(y, np.float64) - ref16[: y.shape[0]])) < 2e-2 * np.max(np.abs(ref16)) for y in ys16)
    import dataclasses  # output rows permuted: the tokens schedule stages its outputs
    swp = dataclasses.replace(sw, row_perm=jnp.asarray(np.random.default_rng(0).permutation(96), jnp.int32))
    refp = np.asarray(x, np.float64) @ np.asarray(swp.densify(), np.float64)
    assert np.max(np.abs(hinm_jax.sparse_matmul(x, swp) - refp)) < 1e-4
    w2 = jax.random.normal(jax.random.key(2), (96, 64))  # a feed-forward block: one call of both layers
    sw2 = hinm_jax.compress({"w": w2}, hinm_jax.prune({"w": w2}, "hinm:32:0.5:2:4"))["w"]
    sw2 = dataclasses.replace(sw2, row_perm=jnp.asarray(np.random.default_rng(1).permutation(64), jnp.int32))
    reff = np.maximum(refp, 0) @ np.asarray(sw2.densify(), np.float64)
    assert np.max(np.abs(hinm_jax.sparse_ffn(x, swp, sw2, activation="relu") - reff)) < 1e-4 * np.max(np.abs(reff))
    print("available", hinm_jax.ops.available_implementations())
    for w in caught:
        print("WARNING", w.category.__name__, str(w.message).replace(chr(10), " "))
    if _cpu.is_available():
        import cpu_ffi.ffi
        print("isa", cpu_ffi.ffi.isa())
    """
)


def _run(env_extra: dict, tmp_path) -> str:
    env = {**os.environ, "HINM_JAX_CPU_CACHE": str(tmp_path / "cache"), **env_extra}
    proc = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set levels")
@pytest.mark.parametrize("march, isa", [("x86-64-v3", "avx2"), ("x86-64", "generic")])
def test_other_instruction_sets_build_and_match(march, isa, tmp_path):
    out = _run({"HINM_JAX_CPU_MARCH": march}, tmp_path)
    assert f"isa {isa}" in out and "WARNING" not in out


@pytest.mark.slow
def test_failed_build_falls_back_to_xla_with_one_warning_naming_the_compiler(tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: the compiler is broken today' >&2\nexit 3\n")
    fake.chmod(0o755)
    out = _run({"HINM_JAX_CXX": str(fake)}, tmp_path)
    available = next(line for line in out.splitlines() if line.startswith("available"))
    assert "'cpu'" not in available and "'xla'" in available
    warnings_ = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings_) == 1, out
    assert "RuntimeWarning" in warnings_[0] and "the compiler is broken today" in warnings_[0] and "xla" in warnings_[0]


@pytest.mark.slow
def test_no_compiler_falls_back_to_xla_with_one_warning(tmp_path):
    out = _run({"HINM_JAX_CXX": str(tmp_path / "no-such-compiler")}, tmp_path)
    warnings_ = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings_) == 1 and "no C++ compiler found" in warnings_[0], out


# --- Flax models: packed once, the kernel at every call ------------------------------------


def test_to_inference_packs_every_kernel_once_for_the_cpu():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(64, 32, rngs=nnx.Rngs(1)))
    masks = hinm_jax.prune(nnx.state(model, nnx.Param), "hinm:32:0.5:2:4")
    sparse = hinm_jax.to_inference(model, masks)
    kernels = [leaf for leaf in jax.tree.leaves(nnx.state(sparse), is_leaf=lambda x: isinstance(x, hinm_jax.SparseWeight)) if isinstance(leaf, hinm_jax.SparseWeight)]
    assert len(kernels) == 2 and all(k.packed_for == "cpu" for k in kernels)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 64)), jnp.float32)
    dense = nnx.merge(*nnx.split(model))
    nnx.update(dense, hinm_jax.apply_masks(nnx.state(dense, nnx.Param), masks))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sparse, x), dense(x), rtol=1e-5, atol=1e-5)


def test_sparse_inference_with_packed_params_never_packs_in_the_graph(monkeypatch):
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
    x = jnp.asarray(np.random.default_rng(7).normal(size=(9, 64)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    masks = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    packed = hinm_jax.pack_for(hinm_jax.compress(params, masks))
    calls = []
    monkeypatch.setattr(_cpu, "pack", lambda w: calls.append(w) or None)
    with hinm_jax.sparse_inference():
        y = jax.jit(lambda p, x: model.apply({"params": p}, x))(packed, x)
    assert not calls
    want = model.apply({"params": hinm_jax.apply_masks(params, masks)}, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
