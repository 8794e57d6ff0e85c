"""Sparse inference of unmodified Flax models (linen interception, nnx module swap):
outputs equal the masked-dense model's."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import hinm_jax
from hinm_jax import layers, select
from hinm_jax.layers import ConvSpec, DenseFallbackWarning
from hinm_jax.layers import nnx as hnnx

PATTERN = hinm_jax.HiNM(32, 0.5, 2, 4)

# prune / compress / apply_masks compiled whole: eager op-by-op dispatch is slow on CPU.
compress = jax.jit(hinm_jax.compress)
apply_masks = jax.jit(hinm_jax.apply_masks)


_prune = jax.jit(hinm_jax.prune, static_argnums=1, static_argnames=("where",))


def prune(params, pattern, where=None):
    if isinstance(pattern, dict):
        return jax.jit(lambda p: hinm_jax.prune(p, pattern, where=where))(params)
    return _prune(params, hinm_jax.parse_pattern(pattern) if isinstance(pattern, str) else pattern, where=where)


def assert_close(y, ref, rtol=1e-5):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    scale = max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------
# linen models (unmodified: plain nn.Dense / nn.DenseGeneral / nn.Conv)
# ---------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(96)(x))
        return nn.Dense(64)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(64, (3, 3), kernel_dilation=2, padding="VALID")(x))
        x = nn.Conv(64, (3, 3), feature_group_count=64)(x)  # depthwise: stays dense
        x = nn.relu(nn.Conv(32, (1, 1), use_bias=False)(x))
        return nn.Dense(32)(x.mean(axis=(1, 2)))


class LinenBlock(nn.Module):
    """A pre-LayerNorm transformer block: multi-head attention (DenseGeneral q/k/v with
    features=(heads, head_dim) and an output DenseGeneral) and a Dense MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(64)(nn.gelu(nn.Dense(128)(h)))


def random_like(tree, seed=0):
    """Random values for every leaf, made by numpy: flax's initializers cost seconds of
    XLA compilation each, which would dominate these tests."""
    rng = np.random.default_rng(seed)

    def one(s):
        if len(s.shape) >= 2:
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree.map(one, tree)


def normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def init(model, x):
    return random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"])


def nnx_model(cls):
    graph_def, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
    return nnx.merge(graph_def, random_like(state))


def _linen_case(model, x, *, fold=False):
    params = init(model, x)
    view = layers.fold_features(params, model, x) if fold else params
    where = select.prunable(model, x) if fold else None  # default: every fitting kernel
    masks = prune(view, PATTERN, where=where)
    sparse = layers.unfold_features(compress(view, masks), params)
    masked = layers.unfold_features(apply_masks(view, masks), params)
    return params, masks, sparse, masked


@pytest.mark.parametrize(
    "name, model, shape",
    [
        ("mlp", LinenMLP(), (4, 64)),
        ("cnn", LinenCNN(), (2, 12, 12, 4)),
        ("block", LinenBlock(), (2, 8, 64)),
    ],
)
def test_linen_matches_masked_dense(name, model, shape):
    x = normal(seed=1, shape=shape)
    params, masks, sparse, masked = _linen_case(model, x, fold=(name == "block"))
    n_sparse = sum(isinstance(l, hinm_jax.SparseWeight) for l in jax.tree.leaves(
        sparse, is_leaf=lambda v: isinstance(v, hinm_jax.SparseWeight)))
    assert n_sparse == {"mlp": 3, "cnn": 5, "block": 6}[name]
    dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    ref = dense_fn(masked, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with layers.sparse_inference():
            y = jax.jit(lambda p, x: model.apply({"params": p}, x))(sparse, x)
    assert_close(y, ref)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]
    if name == "cnn":
        assert len(fallbacks) == 1 and fallbacks[0].startswith("Conv_2/kernel")
    else:
        assert not fallbacks
    # The masks do change the model: a sparse run is not the dense model.
    dense = dense_fn(params, x)
    assert not np.allclose(np.asarray(y), np.asarray(dense), rtol=1e-3)


def test_linen_partly_sparse_tree_and_eager():
    model, x = LinenMLP(), normal(seed=1, shape=(3, 64))
    params = init(model, x)
    masks = prune(params, {"Dense_1": PATTERN})  # only the middle layer
    sparse = compress(params, masks)
    assert not isinstance(sparse["Dense_0"]["kernel"], hinm_jax.SparseWeight)
    with layers.sparse_inference(implementation="xla"):
        y = model.apply({"params": sparse}, x)
    assert_close(y, model.apply({"params": apply_masks(params, masks)}, x))


class LinenGeluMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = layers.Dense(96, activation="gelu", name="up")(x)
        return layers.Dense(64, activation="relu", name="down")(h)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_linen_dense_activation_is_passed_to_the_sparse_product(implementation):
    """layers.Dense(activation=...) has nn.Dense's parameters; under sparse_inference its activation goes to
    sparse_matmul (fused by the "cpu" kernel), and the output equals the masked dense model's."""
    model, x = LinenGeluMLP(), normal(seed=2, shape=(3, 5, 64))
    params = init(model, x)
    assert jax.tree.map(jnp.shape, params) == {"up": {"kernel": (64, 96), "bias": (96,)}, "down": {"kernel": (96, 64), "bias": (64,)}}
    masks = prune(params, PATTERN)
    masked = apply_masks(params, masks)
    ref = model.apply({"params": masked}, x)
    up = jax.nn.gelu(nn.Dense(96).apply({"params": masked["up"]}, x), approximate=False)
    assert_close(ref, jax.nn.relu(nn.Dense(64).apply({"params": masked["down"]}, up)))  # dense: the activations run
    calls = []
    real = hinm_jax.ops.sparse_matmul

    def spy(*a, **kw):
        calls.append(kw.get("activation"))
        return real(*a, **kw)

    import hinm_jax.layers.functional as functional

    functional.sparse_matmul, saved = spy, functional.sparse_matmul
    try:
        with layers.sparse_inference(implementation=implementation):
            y = jax.jit(lambda p, x: model.apply({"params": p}, x))(compress(params, masks), x)
    finally:
        functional.sparse_matmul = saved
    assert calls == ["gelu", "relu"]
    assert_close(y, ref)


class LinenBlock(nn.Module):
    """A FeedForward block between two other layers; its layers' parameters stay the block's."""

    second_activation: str | None = None
    dtypes: tuple = (None, None)

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64, name="before")(x)
        up = layers.Dense(128, activation="gelu", dtype=self.dtypes[0], name="up")
        down = layers.Dense(64, activation=self.second_activation, dtype=self.dtypes[1], name="down")
        return layers.FeedForward(up, down)(x)


def _spy_products(monkeypatch):
    """Records each sparse_ffn / sparse_matmuls / sparse_matmul call of the layers, as ("ffn",
    activation) / ("many", activations) / ("matmul", activation)."""
    import hinm_jax.layers.functional as functional

    calls = []
    for fn, tag, key in (("sparse_ffn", "ffn", "activation"), ("sparse_matmuls", "many", "activations"),
                         ("sparse_matmul", "matmul", "activation")):
        real = getattr(functional, fn)
        spy = lambda *a, real=real, tag=tag, key=key, **kw: calls.append((tag, kw.get(key))) or real(*a, **kw)
        monkeypatch.setattr(functional, fn, spy)
    return calls


@pytest.mark.parametrize("t", [3, 40])
def test_linen_feed_forward_runs_as_one_block(monkeypatch, t):
    """Both kernels compressed: one sparse_ffn with the first layer's activation (one kernel call on
    the cpu from its tokens schedule on, T = 40); the parameters are the two Dense layers', in place."""
    model, x = LinenBlock(), normal(seed=4, shape=(2, t, 32))
    params = init(model, x)
    assert sorted(params) == ["before", "down", "up"]
    masks = prune(params, PATTERN, where=r"^(up|down)/kernel$")
    calls = _spy_products(monkeypatch)
    with layers.sparse_inference():
        y = jax.jit(lambda p, x: model.apply({"params": p}, x))(compress(params, masks), x)
    assert calls == [("ffn", "gelu")]
    assert_close(y, model.apply({"params": apply_masks(params, masks)}, x))


@pytest.mark.parametrize(
    "case, want",
    [
        ("one kernel compressed", [("matmul", None)]),
        ("an activation after the second layer", [("matmul", "gelu"), ("matmul", "relu")]),
        ("two dtypes", [("matmul", "gelu"), ("matmul", None)]),
    ],
)
def test_linen_feed_forward_falls_back_to_its_layers(monkeypatch, case, want):
    """What one block cannot be runs layer by layer, each layer as sparse_inference runs it alone."""
    model = LinenBlock(
        second_activation="relu" if case == "an activation after the second layer" else None,
        dtypes=(jnp.float32, jnp.bfloat16) if case == "two dtypes" else (None, None),
    )
    x = normal(seed=5, shape=(40, 32))
    params = init(model, x)
    where = r"^down/kernel$" if case == "one kernel compressed" else r"^(up|down)/kernel$"
    masks = prune(params, PATTERN, where=where)
    calls = _spy_products(monkeypatch)
    with layers.sparse_inference():
        y = model.apply({"params": compress(params, masks)}, x)
    assert calls == want
    assert_close(y, model.apply({"params": apply_masks(params, masks)}, x), rtol=2e-2 if case == "two dtypes" else 1e-5)


def test_linen_feed_forward_names_the_path_of_a_kernel_that_does_not_fit():
    model, x = LinenBlock(), normal(seed=6, shape=(40, 32))
    params = init(model, x)
    sparse = compress(params, prune(params, PATTERN, where=r"^(up|down)/kernel$"))
    swapped = {**sparse, "down": {**sparse["down"], "kernel": sparse["up"]["kernel"]}}
    with layers.sparse_inference(), pytest.raises(ValueError, match=r"^down/kernel: shape=\(64, 128\)"):
        model.apply({"params": swapped}, x)


class LinenAttentionInputs(nn.Module):
    """Query, key and value of one input as a Parallel block."""

    dtypes: tuple = (None, None, None)

    @nn.compact
    def __call__(self, x):
        qkv = tuple(layers.Dense(64, activation=a, dtype=d, name=n)
                    for n, a, d in zip(("query", "key", "value"), (None, "relu", None), self.dtypes))
        return layers.Parallel(qkv)(x)


@pytest.mark.parametrize(
    "case, want",
    [
        ("all compressed", [("many", (None, "relu", None))]),
        ("one dense", [("matmul", "relu"), ("matmul", None)]),
        ("two dtypes", [("matmul", None), ("matmul", "relu"), ("matmul", None)]),
    ],
)
def test_linen_parallel_runs_as_one_call_or_layer_by_layer(monkeypatch, case, want):
    """Compressed kernels of one dtype: one sparse_matmuls with each layer's activation; otherwise each
    layer as sparse_inference runs it alone. The parameters are the three Dense layers', in place."""
    model = LinenAttentionInputs(dtypes=(None, jnp.bfloat16, None) if case == "two dtypes" else (None, None, None))
    x = normal(seed=10, shape=(2, 20, 32))
    params = init(model, x)
    assert sorted(params) == ["key", "query", "value"]
    masks = prune(params, PATTERN, where=r"^(key|value)/kernel$" if case == "one dense" else None)
    calls = _spy_products(monkeypatch)
    with layers.sparse_inference():
        ys = jax.jit(lambda p, x: model.apply({"params": p}, x))(compress(params, masks), x)
    assert calls == want
    for y, ref in zip(ys, model.apply({"params": apply_masks(params, masks)}, x), strict=True):
        assert_close(y, ref, rtol=2e-2 if case == "two dtypes" else 1e-5)


def test_feed_forward_function_matches_two_dense_layers():
    w1, w2 = normal(seed=7, shape=(64, 128)), normal(seed=8, shape=(128, 32))
    sw = compress({"a": w1, "b": w2}, prune({"a": w1, "b": w2}, PATTERN))
    x, b1, b2 = normal(seed=9, shape=(2, 20, 64)), jnp.linspace(-1, 1, 128), jnp.linspace(-1, 1, 32)
    y = layers.feed_forward(x, sw["a"], b1, sw["b"], b2, activation="relu")
    h = layers.dense_general(x, sw["a"], b1, activation="relu")
    assert_close(y, layers.dense_general(h, sw["b"], b2))
    with pytest.raises(ValueError, match=r"^b: bias shape=\(128,\) does not match features \(32,\)"):
        layers.feed_forward(x, sw["a"], b1, sw["b"], b1, paths=("a", "b"))
    ya, yb = layers.dense_many(x, [sw["a"], sw["a"]], [b1, None], activations=["relu", None])
    assert_close(ya, h)
    assert_close(yb, layers.dense_general(x, sw["a"]))
    with pytest.raises(ValueError, match=r"^1/kernel: shape=\(128, 32\) \(K=128, O=32\) does not fit this layer"):
        layers.dense_many(x, [sw["a"], sw["b"]], [None, None])


def test_linen_dense_unknown_activation_names_path():
    model = layers.Dense(8, activation="tanh", name="proj")
    with pytest.raises(ValueError, match=r"^proj: activation='tanh': expected None or one of"):
        model.init(jax.random.key(0), jnp.ones((2, 16)))
    with pytest.raises(ValueError, match=r"^kernel: shape=\(64, 32\) pattern hinm:32:0.5:2:4: activation='tanh'"):
        w = normal(seed=0, shape=(64, 32))
        sw = compress({"w": w}, prune({"w": w}, PATTERN))["w"]
        layers.dense_general(jnp.ones((2, 64)), sw, activation="tanh")


def test_nnx_sparse_linear_activation():
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    mask = prune({"kernel": lin.kernel[...]}, PATTERN)["kernel"]
    sparse = layers.SparseLinear.from_linear(lin, mask)
    gelu = layers.SparseLinear(sparse.kernel.get_value(), sparse.bias[...], activation="gelu")
    x = normal(seed=3, shape=(7, 64))
    assert_close(gelu(x), jax.nn.gelu(sparse(x), approximate=False))
    with pytest.raises(ValueError, match="activation='tanh'"):
        layers.SparseLinear(sparse.kernel.get_value(), activation="tanh")


def test_linen_dtype_follows_flax_promotion():
    model = nn.Dense(64, dtype=jnp.bfloat16)
    x = normal(seed=1, shape=(4, 64))
    params = init(model, x)
    masks = prune(params, "2:4")
    with layers.sparse_inference():
        y = model.apply({"params": compress(params, masks)}, x)
    ref = model.apply({"params": apply_masks(params, masks)}, x)
    assert y.dtype == ref.dtype == jnp.bfloat16
    assert_close(y, ref, rtol=2e-2)


def test_linen_wrong_sparse_leaf_names_path():
    model, x = LinenMLP(), jnp.ones((2, 64))
    params = init(model, x)
    sparse = compress(params, prune(params, PATTERN))
    swapped = {**sparse, "Dense_1": {**sparse["Dense_1"], "kernel": sparse["Dense_2"]["kernel"]}}
    with layers.sparse_inference(), pytest.raises(ValueError, match=r"Dense_1/kernel: shape=\(96, 64\)"):
        model.apply({"params": swapped}, x)


def test_linen_unsupported_module_with_sparse_leaf_names_path():
    model = nn.ConvTranspose(32, (3, 3))
    x = jnp.ones((1, 8, 8, 16))
    params = init(model, x)
    sparse = compress(params, prune(params, "2:4"))
    with layers.sparse_inference(), pytest.raises(ValueError, match=r"^kernel: .*ConvTranspose has no sparse"):
        model.apply({"params": sparse}, x)


def test_linen_dense_general_pruned_unfolded_says_fold():
    model, x = nn.DenseGeneral((4, 16)), jnp.ones((2, 32))
    params = init(model, x)
    sparse = compress(params, prune(params, "2:4", where="kernel"))
    with layers.sparse_inference(), pytest.raises(ValueError, match="kernel: .*fold_features"):
        model.apply({"params": sparse}, x)
    with pytest.raises(ValueError, match=r"^kernel: shape=\(32, 4, 16\) .*fold_features"):
        prune(params, "2:4", where=select.prunable(model, x))


def test_linen_dense_general_contracting_two_axes():
    model = nn.DenseGeneral(64, axis=(-3, -1))
    x = normal(seed=1, shape=(2, 4, 5, 16))
    params = init(model, x)
    assert params["kernel"].shape == (4, 16, 64)
    masks = prune(params, PATTERN)
    with layers.sparse_inference():
        y = model.apply({"params": compress(params, masks)}, x)
    assert_close(y, model.apply({"params": apply_masks(params, masks)}, x))


# ---------------------------------------------------------------------------------------
# Convolution geometry
# ---------------------------------------------------------------------------------------


def test_patches_are_input_channel_slowest():
    """lax.conv_general_dilated_patches orders features (I, kh, kw): not the kernel's
    (kh, kw, I) flattening; patch_order renumbers the weight to match."""
    x = normal(seed=0, shape=(1, 5, 4, 3))
    spec = ConvSpec((3, 2), (1, 1), "VALID", (1, 1), (1, 1))
    p = layers.conv_patches(x, spec)
    window = x[0, 0:3, 0:2, :]  # the first output position's window (kh, kw, I)
    np.testing.assert_array_equal(p[0, 0, 0], jnp.transpose(window, (2, 0, 1)).reshape(-1))
    assert not np.array_equal(np.asarray(p[0, 0, 0]), np.asarray(window.reshape(-1)))


def _conv_case(kernel_size, in_ch, out_ch, key=0, pattern=PATTERN):
    k = normal(seed=key, shape=tuple(kernel_size) + (in_ch, out_ch))
    masks = prune({"k": k}, pattern)
    return k * masks["k"].mask, compress({"k": k}, masks)["k"]


CONV_CASES = [  # (nn.Conv arguments, batch shape)
    (dict(kernel_size=(3, 3), strides=1, padding="SAME"), ()),  # no batch axis
    (dict(kernel_size=(3, 3), strides=2, padding="VALID"), (2,)),
    (dict(kernel_size=(3, 2), strides=(2, 1), padding=((1, 2), (0, 1))), (2,)),
    (dict(kernel_size=(3, 3), kernel_dilation=2, padding="SAME"), (2,)),
    (dict(kernel_size=(3, 3), input_dilation=2, padding=((1, 0), (2, 1))), (1,)),
    (dict(kernel_size=(3, 3), padding="CIRCULAR", strides=2), (2, 3)),  # two batch axes
    (dict(kernel_size=(3, 3), padding="REFLECT"), (1,)),
    (dict(kernel_size=(5,), padding="CAUSAL", kernel_dilation=2), (2,)),
    (dict(kernel_size=(3,), strides=3, padding=1), (2,)),
    (dict(kernel_size=(2, 2, 2), padding="SAME", strides=(1, 2, 1)), (1,)),
]


@pytest.mark.parametrize("cfg, batch", CONV_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else str(c))
def test_conv_geometry_matches_nn_conv(cfg, batch):
    ks = cfg["kernel_size"]
    module = nn.Conv(32, **cfg)
    spatial = {1: (11,), 2: (9, 8), 3: (5, 6, 4)}[len(ks)]
    x = normal(seed=1, shape=batch + spatial + (8,))
    kernel, sw = _conv_case(ks, 8, 32)
    bias = normal(seed=2, shape=(32,))
    ref = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    with layers.sparse_inference():
        y = jax.jit(lambda p, x: module.apply({"params": p}, x))({"kernel": sw, "bias": bias}, x)
    assert_close(y, ref)


@settings(max_examples=5, deadline=None)
@given(
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    dil=st.integers(1, 2),
    pad=st.sampled_from(["SAME", "VALID", 1]),
    size=st.integers(5, 9),
)
def test_conv_property(k, stride, dil, pad, size):
    """The patch-order weight times the patches is the convolution."""
    module = nn.Conv(32, (k, k), strides=stride, kernel_dilation=dil, padding=pad, use_bias=False)
    kernel, sw = _conv_case((k, k), 4, 32, pattern="2:4")
    x = normal(seed=k * 7 + size, shape=(1, size, size, 4))
    ref = module.apply({"params": {"kernel": kernel}}, x)
    y = jax.jit(lambda x, w: layers.conv(x, w, spec=ConvSpec.of(module)))(x, layers.patch_order(sw))
    assert_close(y, ref)


def test_conv_with_backend_packed_kernel_reorders_patches():
    """A kernel already packed for a backend keeps kernel order; the patches are
    transposed to (kh, kw, I) instead of renumbering the weight."""
    import dataclasses

    kernel, sw = _conv_case((3, 3), 8, 32)
    packed = dataclasses.replace(sw, packed={}, packed_for="pallas")  # the xla path ignores it
    spec = ConvSpec((3, 3), (2, 2), "SAME", (1, 1), (1, 1))
    x = normal(seed=4, shape=(2, 9, 9, 8))
    ref = nn.Conv(32, (3, 3), strides=2, use_bias=False).apply({"params": {"kernel": kernel}}, x)
    y = jax.jit(lambda x, w: layers.conv(x, w, spec=spec, implementation="xla"))(x, packed)
    assert_close(y, ref)
    with pytest.raises(ValueError, match=r"^c/kernel: .*packed for 'pallas'"):
        layers.patch_order(packed, "c/kernel")


def test_grouped_conv_falls_back_dense_with_warning():
    module = nn.Conv(32, (3, 3), feature_group_count=4)
    x = normal(seed=1, shape=(1, 6, 6, 16))
    kernel, sw = _conv_case((3, 3), 4, 32, pattern="2:4")
    ref = module.apply({"params": {"kernel": kernel, "bias": jnp.zeros(32)}}, x)
    with layers.sparse_inference(), pytest.warns(DenseFallbackWarning, match=r"^kernel: .*feature_group_count=4"):
        y = module.apply({"params": {"kernel": sw, "bias": jnp.zeros(32)}}, x)
    assert_close(y, ref)


def test_conv_wrong_input_channels_names_path():
    _, sw = _conv_case((3, 3), 8, 32)
    spec = ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"net/conv/kernel: shape=\(3, 3, 8, 32\) does not fit"):
        layers.conv(jnp.ones((1, 5, 5, 4)), sw, spec=spec, path="net/conv/kernel")


# ---------------------------------------------------------------------------------------
# nnx
# ---------------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 96, rngs=rngs)])
        self.head = nnx.Linear(96, 64, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(4, 32, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), kernel_dilation=2, padding="VALID", rngs=rngs)
        self.dw = nnx.Conv(64, 64, (3, 3), feature_group_count=64, rngs=rngs)
        self.head = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c1(x))
        x = nnx.relu(self.c2(x))
        return self.head(self.dw(x).mean(axis=(1, 2)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(64, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(64, rngs=rngs)
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.down = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


def _nnx_case(model, fold):
    state = nnx.state(model, nnx.Param)
    view = layers.fold_features(state, model) if fold else state
    masks = prune(view, PATTERN, where=select.prunable(model) if fold else None)
    ref_model = nnx.clone(model)
    nnx.update(ref_model, layers.unfold_features(apply_masks(view, masks), state))
    return masks, ref_model


@pytest.mark.parametrize(
    "name, cls, shape",
    [("mlp", NnxMLP, (4, 64)), ("cnn", NnxCNN, (2, 12, 12, 4)), ("block", NnxBlock, (2, 8, 64))],
)
def test_nnx_matches_masked_dense(name, cls, shape):
    model = nnx_model(cls)
    x = normal(seed=1, shape=shape)
    masks, ref_model = _nnx_case(model, fold=(name == "block"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = layers.to_inference(model, masks)
    report = layers.conversion_report(model, masks)
    n_sparse = sum(isinstance(m, (layers.SparseLinear, layers.SparseConv)) for _, m in nnx.iter_modules(sparse))
    assert n_sparse == sum(c.action == "sparse" for c in report) == {"mlp": 3, "cnn": 3, "block": 6}[name]
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]
    if name == "cnn":
        assert [c.path for c in report if c.action == "dense"] == ["dw/kernel"]
        assert len(fallbacks) == 1 and fallbacks[0].startswith("dw/kernel")
    else:
        assert not fallbacks
    run = nnx.jit(lambda m, x: m(x))
    y = run(sparse, x)
    assert_close(y, run(ref_model, x))
    # the original model is untouched
    assert isinstance(model.head if name != "block" else model.up, nnx.Linear)
    assert not np.allclose(np.asarray(run(model, x)), np.asarray(y), rtol=1e-3)


class NnxFusedBlock(nnx.Module):
    """Query, key and value of one input as a Parallel block, and a FeedForward block."""

    def __init__(self, rngs):
        self.qkv = hnnx.Parallel([nnx.Linear(32, 64, rngs=rngs) for _ in range(3)])
        self.mlp = hnnx.FeedForward(nnx.Linear(32, 128, rngs=rngs), nnx.Linear(128, 32, rngs=rngs), activation="gelu")

    def __call__(self, x):
        return self.qkv(x), self.mlp(x)


@pytest.mark.parametrize(
    "case, where, want",
    [
        ("all compressed", None, [("many", (None, None, None)), ("ffn", "gelu")]),
        ("some dense", r"^(qkv/layers/0|mlp/second)/kernel$", [("matmul", None), ("matmul", None)]),
    ],
)
def test_nnx_feed_forward_and_parallel_run_as_one_call(monkeypatch, case, where, want):
    """After to_inference, each block of SparseLinear layers is one sparse_matmuls / sparse_ffn; a block
    with a dense layer runs layer by layer. Outputs equal the masked dense model's; errors name the path."""
    model, x = nnx_model(NnxFusedBlock), normal(seed=11, shape=(2, 20, 32))
    state = nnx.state(model, nnx.Param)
    masks = prune(state, PATTERN, where=where)
    ref_model = nnx.clone(model)
    nnx.update(ref_model, apply_masks(state, masks))
    sparse = layers.to_inference(model, masks)
    calls = _spy_products(monkeypatch)
    ys = nnx.jit(lambda m, x: m(x))(sparse, x)
    assert calls == want
    for y, ref in zip(jax.tree.leaves(ys), jax.tree.leaves(ref_model(x)), strict=True):
        assert_close(y, ref)
    if case == "all compressed":
        with pytest.raises(ValueError, match=r"^qkv/layers/0/kernel: "):
            sparse(x[..., :16])
        with pytest.raises(ValueError, match=r"^FeedForward: activation='tanh'"):
            hnnx.FeedForward(sparse.mlp.first, sparse.mlp.second, activation="tanh")


def test_nnx_sparse_state_is_compressed():
    model = nnx_model(NnxMLP)
    masks = prune(nnx.state(model, nnx.Param), PATTERN)
    sparse = layers.to_inference(model, masks)
    kernels = jax.tree.leaves(nnx.state(sparse, layers.SparseParam), is_leaf=lambda v: isinstance(v, hinm_jax.SparseWeight))
    assert len(kernels) == 3 and all(isinstance(k, hinm_jax.SparseWeight) for k in kernels)
    params = jax.tree_util.tree_flatten_with_path(nnx.state(sparse, nnx.Param))[0]
    assert not [p for p, _ in params if "kernel" in hinm_jax._tree.path_str(p)]


def test_nnx_mask_tree_mismatch_names_path():
    model = nnx_model(NnxMLP)
    other = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    masks = {"extra": prune({"kernel": other.kernel[...]}, "2:4")}
    with pytest.raises(ValueError, match=r"^extra/kernel: masks and model"):
        layers.to_inference(model, masks)
    wrong = {"head": prune({"kernel": other.kernel[...]}, "2:4")}
    with pytest.raises(ValueError, match=r"^head/kernel: shape=\(96, 64\) but its mask has shape \(64, 64\)"):
        layers.to_inference(model, wrong)


def test_nnx_sparse_linear_wrong_input_names_path():
    model = nnx_model(NnxMLP)
    sparse = layers.to_inference(model, prune(nnx.state(model, nnx.Param), PATTERN))
    with pytest.raises(ValueError, match=r"^head/kernel: shape=\(96, 64\)"):
        sparse.head(jnp.ones((2, 64)))
    with pytest.raises(ValueError, match=r"^c1/kernel: .*expects 4 input channels"):
        cnn = nnx_model(NnxCNN)
        layers.to_inference(cnn, prune(nnx.state(cnn, nnx.Param), PATTERN, where=select.prunable(cnn))).c1(
            jnp.ones((1, 8, 8, 3))
        )


def test_nnx_unfolded_multihead_kernel_stays_dense_and_is_reported():
    model = nnx_model(NnxBlock)
    state = nnx.state(model, nnx.Param)
    masks = prune(state, "2:4", where=r"attn/query/kernel$")  # (64, 4, 16): O taken as 16
    report = layers.conversion_report(model, masks)
    assert [(c.path, c.action) for c in report] == [("attn/query/kernel", "dense")]
    assert "fold_features" in report[0].reason
    with pytest.warns(DenseFallbackWarning, match="attn/query/kernel"):
        sparse = layers.to_inference(model, masks)
    ref = nnx.clone(model)
    nnx.update(ref, apply_masks(state, masks))
    x = normal(seed=1, shape=(1, 4, 64))
    assert_close(sparse(x), ref(x))
