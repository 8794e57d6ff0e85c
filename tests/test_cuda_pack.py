"""CPU tests of the CUDA kernel's packer, tile table and data movement (no GPU, no nvcc).

The packed layout is checked with a numpy model of ``mma.sp.m16n8k32`` written from the
PTX ISA (``cuda_ffi.mma_model``): computing ``x @ W`` from the packed arrays one fragment at
a time must give the canonical product, and so must a replay of the kernel's swizzled
shared memory, ``ldmatrix`` addressing and epilogue for every tile configuration.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_ffi import build, mma_model, packing, tiles


# ---------------------------------------------------------------------------------------------------------------
# Canonical test data (numpy, independent of hinm_jax).
# ---------------------------------------------------------------------------------------------------------------
def canonical(seed, k, o, v, kv, *, identity=False, shuffle_perm=None, dtype=np.float16):
    """A random matrix in the canonical format and its dense ``(K, O)`` equivalent.

    ``identity``: plain 2:4 (one block, ``vector_index = arange(K)``). ``shuffle_perm``:
    a random ``row_perm`` (default: yes for HiNM, whose vector index order is random too).
    """
    rng = np.random.default_rng(seed)
    if identity:
        v, kv = o, k
        vi = np.arange(k, dtype=np.int32)[None]
    else:
        vi = np.stack([rng.permutation(k)[:kv] for _ in range(o // v)]).astype(np.int32)
    shuffle = (not identity) if shuffle_perm is None else shuffle_perm
    perm = (rng.permutation(o) if shuffle else np.arange(o)).astype(np.int32)
    stripes = kv // 4
    pos = np.sort(np.argsort(rng.random((o, stripes, 4)), axis=-1)[..., :2], axis=-1)  # 2 of 4, ascending
    vals = rng.standard_normal((o, stripes, 2)).astype(dtype)
    dense = np.zeros((k, o))
    rows = np.repeat(np.arange(o), stripes * 2)
    blocks = rows // v
    inputs = vi[blocks, (4 * np.arange(stripes)[None, :, None] + pos).reshape(o, -1).reshape(-1)]
    dense[inputs, perm[rows]] = vals.astype(np.float64).reshape(-1)
    flat = pos.reshape(o, -1).astype(np.uint32)
    words = -(-flat.shape[1] // 16)
    flat = np.pad(flat, ((0, 0), (0, words * 16 - flat.shape[1])))
    meta = np.bitwise_or.reduce(flat.reshape(o, words, 16) << (2 * np.arange(16, dtype=np.uint32)), axis=-1)
    return vals.reshape(o, -1), meta.astype(np.uint32), vi, perm, dense


def activations(seed, t, k, dtype=np.float16):
    return np.random.default_rng(seed + 1).standard_normal((t, k)).astype(dtype).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# The mma.sp / ldmatrix model itself.
# ---------------------------------------------------------------------------------------------------------------
def _isa_registers(a_dense, b, sel=0):
    """Per-lane operands of mma.sp.m16n8k32 built with plain loops over the ISA's tables
    (a second, independent transcription of the fragment layouts)."""
    a_regs = np.zeros((32, 8))
    b_regs = np.zeros((32, 8))
    e = np.zeros(32, np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):
            row = g if i in (0, 1, 4, 5) else g + 8
            first = t * 4 if i < 4 else t * 4 + 16
            nz = np.flatnonzero(a_dense[row, first : first + 4])
            a_regs[lane, i] = a_dense[row, first + nz[i % 2]]
            b_regs[lane, i] = b[t * 2 + (i % 2) + 8 * (i // 2), g]
        if t // 2 == sel:
            h = t % 2
            word = 0
            for half, row in ((0, g), (1, g + 8)):
                for j in range(4):
                    group = 4 * h + j
                    nz = np.flatnonzero(a_dense[row, 4 * group : 4 * group + 4])
                    word |= (int(nz[0]) | int(nz[1]) << 2) << (16 * half + 4 * j)
            e[lane] = word
    return a_regs, b_regs, e


@pytest.mark.parametrize("selector", [0, 1])
def test_mma_model_multiplies_a_2_4_matrix(selector):
    rng = np.random.default_rng(0)
    a = np.zeros((16, 32))
    for r in range(16):
        for grp in range(8):
            keep = np.sort(rng.choice(4, 2, replace=False))
            a[r, 4 * grp + keep] = rng.integers(1, 9, 2)
    b = rng.integers(-4, 5, (32, 8)).astype(np.float64)
    a_regs, b_regs, e = _isa_registers(a, b, selector)
    c = rng.integers(-3, 4, (32, 4)).astype(np.float64)
    d = mma_model.mma_sp_m16n8k32(a_regs, b_regs, c, e, selector)
    want = a @ b
    got = np.zeros((16, 8))
    got[mma_model.C_ROW, mma_model.C_COL] = d - c
    np.testing.assert_array_equal(got, want)


def test_mma_model_rejects_unordered_metadata():
    a_regs, b_regs = np.ones((32, 8)), np.ones((32, 8))
    e = np.full(32, 0x11111111, np.uint32)  # every group: indices (1, 0)
    with pytest.raises(ValueError, match="ascending"):
        mma_model.mma_sp_m16n8k32(a_regs, b_regs, np.zeros((32, 4)), e)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_model(trans):
    mem = np.arange(4 * 64, dtype=np.float64)  # four 8x8 row-major matrices, back to back
    addr = (np.arange(32) // 8) * 64 + (np.arange(32) % 8) * 8
    regs = mma_model.ldmatrix_x4(mem, addr, trans)
    mats = mem.reshape(4, 8, 8)
    for lane in (0, 5, 13, 31):
        for j in range(4):
            r, c = lane // 4, 2 * (lane % 4)
            want = mats[j, c : c + 2, r] if trans else mats[j, r, c : c + 2]
            np.testing.assert_array_equal(regs[lane, j], want)


# ---------------------------------------------------------------------------------------------------------------
# Packer.
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    v=st.sampled_from([32, 64, 128]),
    blocks=st.integers(1, 3),
    kv4=st.integers(1, 40),
    extra=st.integers(0, 24),
    t=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_fragment_product_of_packed_hinm_equals_dense(v, blocks, kv4, extra, t, seed):
    o, kv = v * blocks, 4 * kv4
    k = kv + extra
    vals, meta, vi, perm, dense = canonical(seed, k, o, v, kv)
    x = activations(seed, t, k)
    packed = packing.pack(vals, meta, vi, perm, in_features=k)
    # Gather kernel, unless the random index happens to be the identity of plain 2:4.
    assert packed["vector_index"].shape[0] == (0 if packing.is_direct(vi) else blocks)
    y = mma_model.fragment_product(x, packed, o)
    np.testing.assert_allclose(y, x @ dense, rtol=1e-12, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(o16=st.integers(1, 12), k4=st.integers(1, 40), t=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_fragment_product_of_packed_2_4_equals_dense(o16, k4, t, seed):
    o, k = 16 * o16, 4 * k4
    vals, meta, vi, perm, dense = canonical(seed, k, o, o, k, identity=True)
    packed = packing.pack(vals, meta, vi, perm)
    assert packed["vector_index"].shape[0] == 0  # direct kernel
    assert packed["values"].shape[0] % packing.DIRECT_ROW_ALIGN == 0
    x = activations(seed, t, k)
    np.testing.assert_allclose(mma_model.fragment_product(x, packed, o), x @ dense, rtol=1e-12, atol=1e-9)


def test_packed_layout_details():
    vals, meta, vi, perm, _ = canonical(3, 100, 64, 32, 40)
    p = packing.pack(vals, meta, vi, perm)
    assert p["values"].shape == (64, 32) and p["metadata"].shape == (4, 2, 16)
    # K_v = 40 -> 64: padding inputs are -1, padding values zero, padding metadata (0, 1).
    assert np.all(p["vector_index"][:, 40:] == -1)
    assert np.all(p["values"][:, 20:] == 0)
    # Second k-step: compressed entries 16..19 are real (groups 0-1 of half 0), the rest pad.
    step = p["metadata"][:, 1, :]
    assert np.all(step[:, 1::2] == packing.PAD_META_WORD)  # half 1 of rows g and g + 8
    assert np.all(step[:, 0::2] & 0xFF00FF00 == 0x44004400)  # groups 2-3 of half 0
    # Rows sorted by output channel inside each block; each block keeps its channels.
    for b in range(2):
        got = p["row_perm"][32 * b : 32 * b + 32]
        assert np.all(np.diff(got) > 0)
        assert set(got) == set(perm[32 * b : 32 * b + 32])


def test_channels_in_order_drop_the_permutation():
    vals, meta, vi, perm, dense = canonical(4, 96, 64, 32, 48, shuffle_perm=False)
    p = packing.pack(vals, meta, vi, perm)
    assert p["row_perm"].shape == (0,) and packing.layout_of(p, 64).identity_rows
    # Channels permuted only inside each block still sort back to the identity.
    inner = np.concatenate([np.random.default_rng(0).permutation(32) + 32 * b for b in range(2)]).astype(np.int32)
    assert packing.pack(vals, meta, vi, inner)["row_perm"].shape == (0,)
    x = activations(4, 5, 96)
    np.testing.assert_allclose(mma_model.fragment_product(x, p, 64), x @ dense, rtol=1e-12, atol=1e-9)


def test_interleave_is_rows_g_and_g_plus_8():
    """Swapping the rows paired in a metadata word (g, g+1 instead of g, g+8) must break the
    product: the model is sensitive to the interleave the packer implements."""
    vals, meta, vi, perm, dense = canonical(5, 64, 32, 32, 64)
    p = packing.pack(vals, meta, vi, perm)
    x = activations(5, 8, 64)
    wrong = dict(p)
    m = p["metadata"].copy()
    lo = m & 0xFFFF
    hi_wrong = np.roll(lo.reshape(2, -1, 8, 2), -1, axis=2).reshape(m.shape)  # row g+1's half
    wrong["metadata"] = (lo | (hi_wrong << 16)).astype(np.uint32)
    good = mma_model.fragment_product(x, p, 32)
    np.testing.assert_allclose(good, x @ dense, rtol=1e-12, atol=1e-9)
    try:
        bad = mma_model.fragment_product(x, wrong, 32)
    except ValueError:  # unordered groups are also a failure
        return
    assert not np.allclose(bad, x @ dense)


def test_jax_numpy_packer_matches_numpy_under_jit():
    vals, meta, vi, perm, _ = canonical(7, 96, 64, 32, 52)
    ref = packing.pack(vals, meta, vi, perm)
    fn = jax.jit(lambda a, b, c, d: packing.pack(a, b, c, d, direct=False, xp=jnp))
    got = fn(jnp.asarray(vals), jnp.asarray(meta), jnp.asarray(vi), jnp.asarray(perm))
    for key in ref:
        assert got[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(np.asarray(got[key]), ref[key], err_msg=key)
    vals, meta, vi, perm, _ = canonical(8, 64, 48, 48, 64, identity=True)
    ref = packing.pack(vals, meta, vi, perm)
    got = packing.pack(jnp.asarray(vals), jnp.asarray(meta), jnp.asarray(vi), jnp.asarray(perm), direct=True, xp=jnp)
    for key in ref:
        np.testing.assert_array_equal(np.asarray(got[key]), ref[key], err_msg=key)


def test_packer_rejects_broken_inputs():
    vals, meta, vi, perm, _ = canonical(9, 64, 64, 32, 32)
    with pytest.raises(ValueError, match="ascending"):
        packing.pack(vals, np.full_like(meta, 0x11111111), vi, perm)
    with pytest.raises(ValueError, match="permutation"):
        packing.pack(vals, meta, vi, np.zeros_like(perm))
    with pytest.raises(ValueError, match="outside"):
        packing.pack(vals, meta, vi, perm, in_features=16)
    with pytest.raises(ValueError, match="K_v/2"):
        packing.pack(vals[:, :8], meta, vi, perm)
    with pytest.raises(ValueError, match="identity"):
        packing.pack(vals, meta, vi, perm, direct=True)
    with pytest.raises(ValueError, match="numpy"):
        packing.pack(vals, meta, vi, perm, direct=None, xp=jnp)


def _expand_dense(vals, meta, vi, perm, k, v):
    """Dense (K, O) of a canonical 2:4 matrix by the format's expansion rule (values at the
    same position add up), for any positions, ordered or not."""
    o, kc = vals.shape
    pos = packing.unpack_positions(meta, kc).astype(np.int64)
    stripe = np.arange(kc) // 2
    dense = np.zeros((k, o))
    rows = np.repeat(np.arange(o), kc)
    inputs = vi[rows // v, (4 * stripe[None, :] + pos).reshape(-1)]
    np.add.at(dense, (inputs, perm[rows]), np.asarray(vals, np.float64).reshape(-1))
    return dense


def _unordered(seed, k, o, v, kv):
    """A canonical matrix whose groups are ascending, swapped or repeated at random."""
    vals, meta, vi, perm, _ = canonical(seed, k, o, v, kv)
    vals = (np.round(vals.astype(np.float32) * 8) / 8).astype(vals.dtype)  # sums of two are exact in float16
    rng = np.random.default_rng(seed + 7)
    kc = vals.shape[1]
    pos = packing.unpack_positions(meta, kc).reshape(o, kc // 2, 2)
    kind = rng.integers(0, 3, size=(o, kc // 2))  # 0: as is, 1: swapped, 2: repeated position
    pos = np.where((kind == 1)[..., None], pos[..., ::-1], pos)
    pos = np.where((kind == 2)[..., None], pos[..., :1], pos)
    bad_meta = packing._pack_positions(pos.reshape(o, kc), meta.shape[1])
    assert (kind == 1).any() and (kind == 2).any()
    return vals, bad_meta, vi, perm


@settings(max_examples=12, deadline=None)
@given(v=st.sampled_from([32, 64]), kv4=st.integers(1, 24), t=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_traced_pack_always_gives_ascending_pairs(v, kv4, t, seed):
    """Under jit the packer cannot raise: a stripe compressed with descending or repeated
    positions (fewer than n kept values) is rewritten to ascending pairs with the same
    product. The mma.sp model raises on any unordered group, so the product check covers
    both."""
    o, kv = 2 * v, 4 * kv4 + 4
    k = kv + 8
    vals, meta, vi, perm = _unordered(seed, k, o, v, kv)
    with pytest.raises(ValueError, match="ascending"):
        packing.pack(vals, meta, vi, perm)  # concrete: refused
    fn = jax.jit(lambda *a: packing.pack(*a, direct=False, in_features=k, xp=jnp))
    packed = {key: np.asarray(a) for key, a in fn(*(jnp.asarray(a) for a in (vals, meta, vi, perm))).items()}
    pos = packing.unpack_positions(packed["metadata"].reshape(-1, 1), 16)  # every lane word, 8 groups each
    pairs = pos.reshape(-1, 2)
    assert np.all(pairs[:, 0] < pairs[:, 1])
    x = activations(seed, t, k)
    want = x @ _expand_dense(vals, meta, vi, perm, k, v)
    np.testing.assert_allclose(mma_model.fragment_product(x, packed, o), want, rtol=1e-12, atol=1e-9)


def test_ordered_pairs_is_the_identity_on_ordered_input():
    vals, meta, vi, perm, _ = canonical(21, 128, 64, 32, 96)
    v2, m2 = packing.ordered_pairs(vals, meta)
    np.testing.assert_array_equal(v2, vals)
    np.testing.assert_array_equal(m2, meta)


def test_invalid_vector_index_is_never_read_and_poisons_its_outputs():
    """The kernel's rule, as the emulator replays it: -1 is padding (zeros), any other entry
    outside 0..K-1 fills its activation row with NaN; only outputs whose kept positions use
    that row become NaN (mma.sp multiplies only the selected rows of B)."""
    k, o, v, kv, t = 160, 64, 32, 76, 37
    vals, meta, vi, perm, dense = canonical(13, k, o, v, kv)
    packed = packing.pack(vals, meta, vi, perm)
    packed["vector_index"][0, 9], packed["vector_index"][1, 40] = k, packing.INVALID_INDEX
    x = activations(13, t, k)
    config = next(c for c in tiles.CONFIGS if c.bm == 32 and c.bn == 32)
    y = mma_model.emulate_kernel(x, packed, o, config, out_dtype=np.float64)
    # Expected: channel r is NaN iff one of its kept positions reads a broken entry.
    pos = packing.unpack_positions(meta, vals.shape[1]).astype(np.int64)
    entry = 4 * (np.arange(vals.shape[1]) // 2)[None, :] + pos  # vector index entry of each kept value
    rows = np.arange(o)
    uses = np.zeros(o, bool)
    uses |= (rows // v == 0) & np.any(entry == 9, axis=1)
    uses |= (rows // v == 1) & np.any(entry == 40, axis=1)
    nan_channels = np.zeros(o, bool)
    nan_channels[perm[uses]] = True
    assert nan_channels.any() and not nan_channels.all()
    np.testing.assert_array_equal(np.isnan(y), np.broadcast_to(nan_channels, y.shape))
    np.testing.assert_array_equal(np.isnan(mma_model.fragment_product(x, packed, o)), np.isnan(y))
    # Every other channel is exact (the broken entries' values were never multiplied).
    ok = ~nan_channels
    np.testing.assert_allclose(y[:, ok], (x @ dense)[:, ok], rtol=1e-12, atol=1e-9)


def test_mma_model_multiplies_only_selected_rows_of_b():
    rng = np.random.default_rng(1)
    a = np.zeros((16, 32))
    for r in range(16):
        for grp in range(8):
            a[r, 4 * grp + np.sort(rng.choice(4, 2, replace=False))] = rng.integers(1, 9, 2)
    b = rng.integers(-4, 5, (32, 8)).astype(np.float64)
    unused = np.all(a == 0, axis=0)
    b_nan = b.copy()
    b_nan[unused] = np.nan  # rows of B that no row of A selects
    a_regs, b_regs, e = _isa_registers(a, b_nan)
    d = mma_model.mma_sp_m16n8k32(a_regs, b_regs, np.zeros((32, 4)), e)
    got = np.zeros((16, 8))
    got[mma_model.C_ROW, mma_model.C_COL] = d
    np.testing.assert_array_equal(got, a @ b)


def test_identity_index_is_detected():
    assert packing.is_direct(np.arange(8)[None])
    assert not packing.is_direct(np.arange(8)[None][:, ::-1])
    assert not packing.is_direct(np.tile(np.arange(8), (2, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Kernel replay: swizzles, ldmatrix addresses, metadata words, epilogue, per configuration.
# ---------------------------------------------------------------------------------------------------------------
def _replay_cases():
    cases = []
    for c in tiles.CONFIGS:
        v = c.bm if c.bm < 128 else 128
        cases.append(pytest.param(c, v, "gather", id=f"gather-{c.bm}x{c.bn}"))
        if c.bn <= 64:
            cases.append(pytest.param(c, v, "gather-identity", id=f"gather-identity-{c.bm}x{c.bn}"))
        if c.direct:
            cases.append(pytest.param(c, None, "direct", id=f"direct-{c.bm}x{c.bn}"))
    return cases


@pytest.mark.parametrize("config,v,mode", _replay_cases())
def test_kernel_replay_matches_dense(config, v, mode):
    """Shuffled channels: y^T epilogue; channels in order (2:4, HiNM without OCP): y epilogue."""
    t = config.bn + 7  # a full tile and a tail
    if mode == "direct":
        k, o = 136, 140  # K not a multiple of 64, O padded to 256 and not a multiple of 8
        vals, meta, vi, perm, dense = canonical(11, k, o, o, k, identity=True, shuffle_perm=True)
    else:
        k, o = 160, 2 * v
        vals, meta, vi, perm, dense = canonical(11, k, o, v, 76, shuffle_perm=(mode == "gather"))
    x = activations(11, t, k)
    packed = packing.pack(vals, meta, vi, perm)
    assert (packed["row_perm"].shape[0] == 0) == (mode != "gather")
    bias = np.linspace(-1, 1, o)
    y = mma_model.emulate_kernel(x, packed, o, config, bias=bias, out_dtype=np.float64)
    np.testing.assert_allclose(y, x @ dense + bias, rtol=1e-12, atol=1e-9)


def test_swizzles_are_conflict_free_and_bijective():
    """Every ldmatrix phase (8 row addresses of 16 B) hits 8 distinct 16-byte bank groups,
    and the swizzles permute chunks within their tile."""
    lanes = np.arange(32)
    for bm in (32, 64, 128):
        offs = mma_model.a_chunk_offset(np.arange(bm)[:, None], np.arange(4)[None, :])
        assert sorted(offs.ravel()) == list(range(4 * bm))
        for ks in (0, 1):
            for rb in range(0, bm, 16):
                a = mma_model.a_chunk_offset(rb + mma_model.a_ldsm_row(lanes), mma_model.a_ldsm_chunk(lanes, ks))
                for q in range(4):
                    assert len(set(a[8 * q : 8 * q + 8] % 8)) == 8
    for bn in (32, 64, 128, 256):
        cpr = bn // 8
        offs = mma_model.bt_chunk_offset(np.arange(64)[:, None], np.arange(cpr)[None, :], cpr)
        assert sorted(offs.ravel()) == list(range(64 * cpr))
        for ks in (0, 1):
            for nb in range(0, bn, 8):
                a = mma_model.bt_chunk_offset(mma_model.bt_ldsm_krow(lanes, ks), nb // 8, cpr)
                for q in range(4):
                    assert len(set(a[8 * q : 8 * q + 8] % 8)) == 8
        offs = mma_model.bn_chunk_offset(np.arange(bn)[:, None], np.arange(8)[None, :])
        assert sorted(offs.ravel()) == list(range(8 * bn))
        for ks in (0, 1):
            for nb in range(0, bn, 8):
                a = mma_model.bn_chunk_offset(nb + mma_model.bn_ldsm_row(lanes), mma_model.bn_ldsm_chunk(lanes, ks))
                for q in range(4):
                    assert len(set(a[8 * q : 8 * q + 8] % 8)) == 8


# ---------------------------------------------------------------------------------------------------------------
# Tile table and heuristic.
# ---------------------------------------------------------------------------------------------------------------
def test_config_table_matches_the_cuda_source():
    text = build.SOURCE.read_text()
    body = text[text.index("#define HINM_SPMM_CONFIGS(X)") :].split("\n\n")[0]
    rows = [tuple(int(v) for v in m) for m in re.findall(r"X\((\d+), (\d+), (\d+), (\d+), (\d+), (\d+), \d+\)", body)]
    assert rows == [(c.id, c.bm, c.bn, c.warps_m, c.warps_n, c.stages) for c in tiles.CONFIGS]


def test_configs_fit_shared_memory_of_sm80():
    for c in tiles.CONFIGS:
        assert c.smem_bytes <= 163 * 1024, c
        assert (c.bm // c.warps_m) % 16 == 0 and (c.bn // c.warps_n) % 8 == 0, c


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 10000),
    v=st.sampled_from([32, 64, 96, 128, 256, 512]),
    blocks=st.integers(1, 64),
    gather=st.booleans(),
    sms=st.sampled_from([108, 132]),
)
def test_heuristic_picks_a_valid_config(t, v, blocks, gather, sms):
    rows = v * blocks if gather else 128 * blocks
    c = tiles.select_config(t, rows, v if gather else rows, gather, sms)
    assert c in tiles.valid_configs(rows, v if gather else rows, gather)
    assert c.bm == tiles.tile_height(v if gather else rows, gather)
    if t <= 32:
        assert c.bn == 32


def test_heuristic_refuses_vector_sizes_without_a_tile():
    with pytest.raises(NotImplementedError, match="vector_size=48"):
        tiles.select_config(64, 96, 48, True)


def test_build_command_and_cache_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HINM_JAX_CUDA_CACHE", str(tmp_path))
    monkeypatch.setenv("HINM_JAX_CUDA_ARCHS", "90;80")
    assert build.default_archs() == ("80", "90")
    cmd = build.compile_command("nvcc", ("80", "90"), "out.so")
    joined = " ".join(cmd)
    for piece in ("-O3", "-std=c++17", "--shared", "-fPIC", "arch=compute_80,code=sm_80",
                  "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90", jax.ffi.include_dir()):
        assert piece in joined
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    a = build.library_path(("80",))
    assert a.parent.parent == tmp_path
    assert a != build.library_path(("80", "90"))
    assert a != build.library_path(("80",), defines={"HINM_SPMM_ONLY_CONFIG": 0})
    monkeypatch.setenv("HINM_JAX_CUDA_ARCHS", "75")
    with pytest.raises(build.BuildError, match="sm_80"):
        build.default_archs()
