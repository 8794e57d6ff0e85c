"""orbax round trips of masks and compressed params, bit for bit; checkpoint sizes."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hinm_jax
from hinm_jax import checkpoint, layers
from hinm_jax.masks import Mask, matrix_mask

prune = jax.jit(hinm_jax.prune, static_argnums=1)
compress = jax.jit(hinm_jax.compress)


def _normal(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def assert_bitwise_equal(a, b):
    is_leaf = lambda x: x is None
    assert jax.tree.structure(a, is_leaf=is_leaf) == jax.tree.structure(b, is_leaf=is_leaf)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_masks_of_every_pattern_round_trip(tmp_path):
    w = _normal((64, 64))
    perm = jnp.asarray(np.random.default_rng(1).permutation(64), jnp.int32)
    mask, layout = matrix_mask(jnp.abs(w), hinm_jax.HiNM(16, 0.5, 2, 4), row_perm=perm)
    masks = {
        "hinm_permuted": Mask(mask, layout, hinm_jax.HiNM(16, 0.5, 2, 4)),
        "nm": prune({"w": w}, hinm_jax.NM(2, 4))["w"],
        "vw": prune({"w": w}, hinm_jax.VectorWise(32, 0.25))["w"],
        "unstructured": prune({"w": w}, hinm_jax.Unstructured(0.9))["w"],
        "hss": prune({"w": w}, hinm_jax.HSS(((3, 4), (2, 4))))["w"],
        "dense": None,
    }
    checkpoint.save(tmp_path / "masks", masks)
    back = checkpoint.restore(tmp_path / "masks")
    assert_bitwise_equal(back, masks)
    assert back["hinm_permuted"].pattern == hinm_jax.HiNM(16, 0.5, 2, 4)
    assert back["unstructured"].layout is None and back["dense"] is None


def test_stacked_masks_round_trip(tmp_path):
    params = {"scan": {"kernel": _normal((3, 64, 32))}}
    masks = jax.jit(lambda p: hinm_jax.prune(p, hinm_jax.HiNM(32, 0.5, 2, 4), stack_axes=1))(params)
    checkpoint.save(tmp_path / "m", masks)
    back = checkpoint.restore(tmp_path / "m")
    assert_bitwise_equal(back, masks)
    assert back["scan"]["kernel"].stack_axes == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_compressed_linen_params_round_trip_and_run(tmp_path, dtype):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32)(nn.relu(nn.Dense(64)(x)))

    model, x = MLP(), _normal((4, 64), seed=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: _normal(s.shape, seed=s.size, dtype=dtype), shapes)
    sparse = compress(params, prune(params, hinm_jax.HiNM(32, 0.5, 2, 4)))
    sparse["Dense_0"]["counter"] = np.arange(3, dtype=np.int64)  # numpy leaves stay numpy
    checkpoint.save(tmp_path / "sparse", sparse)
    back = checkpoint.restore(tmp_path / "sparse")
    assert_bitwise_equal(back, sparse)
    assert isinstance(back["Dense_0"]["counter"], np.ndarray)
    for p in (sparse, back):
        p["Dense_0"].pop("counter")
    run = jax.jit(lambda p, x: model.apply({"params": p}, x))
    with layers.sparse_inference():
        y0, y1 = run(sparse, x), run(back, x)
    assert np.asarray(y0).tobytes() == np.asarray(y1).tobytes()


def test_nnx_sparse_model_state_round_trip(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 32, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](nnx.relu(self.layers[0](x)))

    model = Net(nnx.Rngs(0))
    masks = prune(nnx.state(model, nnx.Param), hinm_jax.HiNM(32, 0.5, 2, 4))
    sparse = layers.to_inference(model, masks)
    graph_def, state = nnx.split(sparse)
    checkpoint.save(tmp_path / "nnx", state)
    back = checkpoint.restore(tmp_path / "nnx")
    assert isinstance(back, nnx.State)
    assert_bitwise_equal(back, state)
    kernel = back["layers"][0]["kernel"]
    assert isinstance(kernel, layers.SparseParam) and isinstance(kernel.get_value(), hinm_jax.SparseWeight)
    x = _normal((2, 64), seed=5)
    y0 = nnx.jit(lambda m, x: m(x))(sparse, x)
    y1 = nnx.jit(lambda m, x: m(x))(nnx.merge(graph_def, back), x)
    assert np.asarray(y0).tobytes() == np.asarray(y1).tobytes()
    # masks saved from nnx state too
    checkpoint.save(tmp_path / "nnx_masks", masks)
    assert_bitwise_equal(checkpoint.restore(tmp_path / "nnx_masks"), masks)


def test_compressed_checkpoint_is_smaller_on_disk(tmp_path):
    """HiNM(64, 0.5, 2, 4) in fp16: values + 2-bit metadata are 0.28x of dense, the
    vector index adds 1/64 (0.297x for the arrays); orbax's files add a little."""
    params = {f"l{i}": {"kernel": _normal((1024, 1024), seed=i, dtype=jnp.float16)} for i in range(2)}
    sparse = compress(params, prune(params, hinm_jax.HiNM(64, 0.5, 2, 4)))
    report = checkpoint.size_report(params, sparse, tmp_path)
    print(f"\nHiNM(64, 0.5, 2, 4) fp16 checkpoint: {report}")
    assert report.dense_array_bytes == 2 * 1024 * 1024 * 2
    # per matrix: values 1024*256 fp16, metadata 1024*16 words, vector index 16*512, row_perm 1024
    per = 1024 * 256 * 2 + 1024 * 16 * 4 + 16 * 512 * 4 + 1024 * 4
    assert report.sparse_array_bytes == 2 * per  # 0.2988x
    assert report.sparse_bytes < report.dense_bytes
    assert report.ratio < 0.31
    assert os.path.isdir(tmp_path / "sparse") and os.path.isdir(tmp_path / "dense")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"^a/b: cannot save a object"):
        checkpoint.save(tmp_path / "x", {"a": {"b": object()}})
    checkpoint.save(tmp_path / "y", {"a": 1})
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        checkpoint.save(tmp_path / "y", {"a": 2})
    checkpoint.save(tmp_path / "y", {"a": 2}, overwrite=True)
    assert checkpoint.restore(tmp_path / "y") == {"a": 2}
    with pytest.raises(ValueError, match="no checkpoint there"):
        checkpoint.restore(tmp_path / "missing")
