import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hinm_jax
from hinm_jax import NM, HiNM, VectorWise
from hinm_jax.format import metadata_bits, pack_metadata, unpack_metadata


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([2, 3, 4, 8, 16]), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_metadata_round_trip(m, nnz, seed):
    pos = np.random.default_rng(seed).integers(0, m, size=(3, nnz)).astype(np.int32)
    words = pack_metadata(jnp.asarray(pos), m)
    bits = metadata_bits(m)
    assert words.dtype == jnp.uint32 and words.shape == (3, -(-nnz // (32 // bits)))
    np.testing.assert_array_equal(unpack_metadata(words, m, nnz), pos)


def test_metadata_bit_order_is_lsb_first():
    words = pack_metadata(jnp.array([[1, 3, 0, 2]]), 4)
    assert int(words[0, 0]) == 1 | (3 << 2) | (0 << 4) | (2 << 6)
    assert metadata_bits(4) == 2 and metadata_bits(8) == 3 and metadata_bits(1) == 0


CASES = [
    ((64, 32), HiNM(8, 0.5, 2, 4), 0),
    ((3, 3, 8, 16), HiNM(16, 0.25, 2, 4), 0),
    ((2, 40, 24), HiNM(8, 0.5, 1, 4), 1),
    ((48, 16), NM(2, 4), 0),
    ((32, 16), NM(3, 8), 0),
    ((30, 16), VectorWise(4, 0.5), 0),
]


@pytest.mark.parametrize("shape, pattern, stack", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compress_then_densify_is_exact(shape, pattern, stack, dtype):
    w = jax.random.normal(jax.random.key(0), shape, dtype)
    masks = hinm_jax.prune({"w": w}, pattern, stack_axes=stack)
    sw = hinm_jax.compress({"w": w}, masks)["w"]
    assert isinstance(sw, hinm_jax.SparseWeight)
    np.testing.assert_array_equal(np.asarray(sw.densify(), np.float32), np.asarray(w * masks["w"].mask, np.float32))
    assert sw.densify().dtype == dtype
    # values hold exactly the kept weights
    assert sw.values.size == int(masks["w"].mask.sum())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_compress_in_a_permuted_layout(seed):
    rng = np.random.default_rng(seed)
    k, o, v = 24, 16, 4
    w = jnp.asarray(rng.normal(size=(k, o)), jnp.float32)
    perm = jnp.asarray(rng.permutation(o), jnp.int32)
    vi = jnp.asarray(np.stack([rng.permutation(k)[:12] for _ in range(o // v)]), jnp.int32)
    mask = hinm_jax.masks.mask_from_layout(jnp.abs(w), perm, vi, 2, 4)
    m = hinm_jax.Mask(mask, hinm_jax.Layout(perm, vi), HiNM(v, 0.5, 2, 4))
    sw = hinm_jax.compress({"w": w}, {"w": m})["w"]
    np.testing.assert_array_equal(sw.densify(), w * mask)
    np.testing.assert_array_equal(sw.row_perm, perm)
    np.testing.assert_array_equal(sw.vector_index, vi)
    # SPEC semantics of the format: values[r, i] multiplies vector_index[r//V, (i//n)*m + p]
    pos = np.asarray(sw.positions())
    vals = np.asarray(sw.values)
    dense = np.zeros((k, o), np.float32)
    for r in range(o):
        for i in range(vals.shape[1]):
            kk = int(vi[r // v, (i // 2) * 4 + pos[r, i]])
            dense[kk, int(perm[r])] = vals[r, i]
    np.testing.assert_array_equal(dense, np.asarray(w * mask))
    # positions inside each stripe are strictly ascending
    assert np.all(np.diff(pos.reshape(o, -1, 2), axis=-1) > 0)


def test_storage_size_and_ratio():
    w = jax.random.normal(jax.random.key(0), (4096, 512), jnp.float16)
    sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, HiNM(64, 0.5, 2, 4)))["w"]
    values = 512 * 1024 * 2
    meta = 512 * (1024 // 16) * 4
    index = (512 // 64) * 2048 * 4 + 512 * 4
    assert sw.storage_bytes() == values + meta + index
    assert sw.compression_ratio() == pytest.approx((values + meta + index) / (4096 * 512 * 2))
    assert 0.28 < sw.compression_ratio("float16") < 0.30
    assert sw.compression_ratio("float32") < sw.compression_ratio("float16")


def test_sparse_weight_is_a_pytree_through_jit_and_device_put():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:8:0.5:2:4"))["w"]
    moved = jax.device_put(sw)
    assert isinstance(moved, hinm_jax.SparseWeight) and moved.pattern == sw.pattern
    dense = jax.jit(lambda s: s.densify())(moved)
    np.testing.assert_array_equal(dense, sw.densify())
    # compress itself runs under jit
    jitted = jax.jit(lambda p: hinm_jax.compress(p, hinm_jax.prune(p, "hinm:8:0.5:2:4")))({"w": w})["w"]
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(sw)):
        np.testing.assert_array_equal(a, b)


def test_orbax_round_trip_is_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (64, 32), jnp.bfloat16), "bias": jnp.ones(32)}}
    masks = hinm_jax.prune(params, "hinm:16:0.5:2:4")
    sparse = hinm_jax.compress(params, masks)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "sparse", sparse)
        ckpt.save(tmp_path / "masks", masks)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "sparse", jax.tree.map(ocp.utils.to_shape_dtype_struct, sparse))
        restored_masks = ckpt.restore(tmp_path / "masks", jax.tree.map(ocp.utils.to_shape_dtype_struct, masks))
    assert jax.tree.structure(restored) == jax.tree.structure(sparse)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sparse)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(restored_masks), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flax_serialization_round_trip():
    from flax import serialization

    w = jax.random.normal(jax.random.key(0), (64, 32))
    sparse = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "2:4"))
    blob = serialization.to_bytes(sparse)
    restored = serialization.from_bytes(sparse, blob)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sparse)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compress_rejects_masks_that_break_their_layout():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    masks = hinm_jax.prune({"w": w}, "hinm:8:0.5:2:4")
    m = masks["w"]
    broken = dataclasses.replace(m, mask=m.mask.at[0, 0].set(~m.mask[0, 0]))
    with pytest.raises(ValueError, match=r"w: shape=\(64, 32\) pattern hinm:8:0.5:2:4: the mask does not follow"):
        hinm_jax.compress({"w": w}, {"w": broken})
    um = hinm_jax.prune({"w": w}, "unstructured:0.5")
    with pytest.raises(ValueError, match=r"w: shape=\(64, 32\) pattern unstructured:0.5: this pattern has no compressed format"):
        hinm_jax.compress({"w": w}, um)


def _damaged(**change):
    w = jax.random.normal(jax.random.key(0), (64, 32))
    sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:16:0.5:2:4"))["w"]
    return dataclasses.replace(sw, **{k: f(sw) for k, f in change.items()})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"row_perm": lambda sw: sw.row_perm.at[0].set(sw.row_perm[1])}, "row_perm is not a permutation"),
        ({"vector_index": lambda sw: sw.vector_index.at[0, 0].set(64)}, "vector_index has entries outside"),
        ({"vector_index": lambda sw: sw.vector_index.at[0, 1].set(sw.vector_index[0, 0])}, "repeats an input"),
        ({"vector_index": lambda sw: sw.vector_index[:1]}, r"vector_index has shape \(1, 32\), expected \(2, 32\)"),
        ({"metadata": lambda sw: sw.metadata ^ jnp.uint32(3)}, "metadata positions"),
        ({"values": lambda sw: sw.values[:, :-1]}, "values has shape"),
        ({"row_perm": lambda sw: sw.row_perm.astype(jnp.float32)}, "row_perm has dtype float32"),
    ],
)
def test_validate_names_path_shape_and_pattern(change, message):
    sw = _damaged(**change)
    with pytest.raises(ValueError, match=message) as info:
        sw.validate("enc/q/kernel")
    assert "enc/q/kernel: shape=(64, 32) pattern hinm:16:0.5:2:4" in str(info.value)


def test_compress_rejects_a_row_perm_that_is_not_a_permutation():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    masks = hinm_jax.prune({"w": w}, "hinm:16:0.5:2:4")
    layout = masks["w"].layout
    bad = dataclasses.replace(masks["w"], layout=dataclasses.replace(layout, row_perm=jnp.zeros(32, jnp.int32)))
    with pytest.raises(ValueError, match="w: shape=\\(64, 32\\) pattern hinm:16:0.5:2:4"):
        hinm_jax.compress({"w": w}, {"w": bad})
    with pytest.raises(TypeError, match="w: shape=\\(64, 32\\): expected a hinm_jax.Mask"):
        hinm_jax.compress({"w": w}, {"w": masks["w"].mask})
