"""Path-aware selection: module types, call order, per-layer patterns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hinm_jax
from hinm_jax import layers, select

_prune = jax.jit(hinm_jax.prune, static_argnums=1, static_argnames=("where",))


def prune(params, pattern, where=None):
    if isinstance(pattern, dict):
        return jax.jit(lambda p: hinm_jax.prune(p, pattern, where=where))(params)
    return _prune(params, hinm_jax.parse_pattern(pattern) if isinstance(pattern, str) else pattern, where=where)


class Block(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(100, 64)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(x, x)
        h = nn.Dense(128, name="up")(nn.LayerNorm()(x))
        x = x + nn.Dense(64, name="down")(nn.gelu(h))
        return nn.Dense(32, name="head")(x)


TOKENS = jnp.zeros((2, 8), jnp.int32)


def _params(model=None):
    model = model or Block()
    shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def _pruned(masks):
    leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None or isinstance(x, hinm_jax.Mask))[0]
    return sorted(hinm_jax._tree.path_str(p) for p, m in leaves if m is not None)


def test_linen_modules_in_call_order():
    infos = select.modules(Block(), TOKENS)
    paths = [i.path for i in infos]
    assert paths[:2] == ["Embed_0", "attn"]
    assert paths.index("up") < paths.index("down") < paths.index("head")
    assert {"attn/query", "attn/key", "attn/value", "attn/out"} <= set(paths)
    types = {i.path: i.type for i in infos}
    assert types["up"] is nn.Dense and types["attn/query"] is nn.DenseGeneral
    with pytest.raises(ValueError, match="pass example inputs"):
        select.modules(Block())


def test_module_type_selects_only_those_kernels():
    model, params = Block(), _params()
    masks = prune(params, "2:4", where=select.module_type(nn.Dense, model, TOKENS))
    assert _pruned(masks) == ["down/kernel", "head/kernel", "up/kernel"]  # not DenseGeneral, bias, embed


def test_keep_first_and_last_layers_dense():
    model, params = Block(), _params()
    dense = [i.path for i in select.modules(model, TOKENS) if i.type in (nn.Dense, nn.DenseGeneral)]
    assert dense[0] == "attn/query" and dense[-1] == "head"
    where = select.all_of(select.prunable(model, TOKENS), select.not_(select.in_modules([dense[0], dense[-1]])))
    folded = layers.fold_features(params, model, TOKENS)
    masks = prune(folded, "2:4", where=where)
    assert _pruned(masks) == ["attn/key/kernel", "attn/out/kernel", "attn/value/kernel", "down/kernel", "up/kernel"]


def test_attention_and_mlp_get_different_patterns():
    model, params = Block(), _params()
    folded = layers.fold_features(params, model, TOKENS)
    patterns = {r"^attn/": hinm_jax.NM(2, 4), r"^(up|down)/": hinm_jax.HiNM(32, 0.5, 2, 4), r"^head/": None}
    masks = prune(folded, patterns, where=select.prunable(model, TOKENS))
    assert masks["attn"]["query"]["kernel"].pattern == hinm_jax.NM(2, 4)
    assert masks["up"]["kernel"].pattern == hinm_jax.HiNM(32, 0.5, 2, 4)
    assert masks["head"]["kernel"] is None
    assert float(masks["up"]["kernel"].density) == pytest.approx(0.25)


def test_prunable_refuses_unfolded_multi_axis_kernels_and_grouped_convs():
    model, params = Block(), _params()
    with pytest.raises(ValueError, match=r"^attn/(key|query|value)/kernel: shape=\(64, 4, 16\) has 2 output axes \(4, 16\): prune it as a \(K=64, O=64\) matrix"):
        prune(params, "2:4", where=select.prunable(model, TOKENS))

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(32, (3, 3))(x)
            return nn.Conv(32, (3, 3), feature_group_count=8)(x)

    where = select.prunable(CNN(), jnp.ones((1, 8, 8, 8)))
    assert where("Conv_0/kernel", jnp.ones((3, 3, 8, 32)))
    assert not where("Conv_1/kernel", jnp.ones((3, 3, 4, 32)))
    assert not where("Conv_0/bias", jnp.ones(32))


def test_kernel_shapes():
    shapes = select.kernel_shapes(Block(), TOKENS)
    assert shapes["attn/query/kernel"] == ((), (64,), (4, 16))
    assert shapes["attn/out/kernel"] == ((), (4, 16), (64,))
    assert shapes["up/kernel"] == ((), (64,), (128,))
    assert "Embed_0/embedding" not in shapes


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.head = nnx.Linear(32, 10, rngs=rngs)  # defined first, called last
        self.blocks = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)])
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = nnx.relu(b(x))
        return self.head(self.norm(x))


def test_nnx_modules_graph_and_call_order():
    net = NnxNet(nnx.Rngs(0))
    graph = [i.path for i in select.modules(net)]
    assert set(graph) == {"head", "blocks/0", "blocks/1", "blocks", "norm"}
    called = [i.path for i in select.modules(net, jnp.ones((1, 16)))]
    assert called[:3] == ["blocks/0", "blocks/1", "head"]
    assert set(called) == set(graph)
    assert isinstance(net.head, nnx.Linear)  # untouched


def test_nnx_module_type_and_prune_on_state():
    net = NnxNet(nnx.Rngs(0))
    state = nnx.state(net, nnx.Param)
    order = [i.path for i in select.modules(net, jnp.ones((1, 16))) if i.type is nnx.Linear]
    where = select.all_of(select.module_type(nnx.Linear, net), select.not_(select.in_modules([order[-1]])))
    masks = prune(state, "2:4", where=where)
    assert _pruned(masks) == ["blocks/0/kernel", "blocks/1/kernel"]


def test_predicate_combinators():
    p = select.any_of(r"^a/", select.path_regex(r"kernel$"))
    assert p("a/bias", None) and p("b/kernel", None) and not p("b/bias", None)
    q = select.all_of(r"^a/", select.not_(r"bias$"))
    assert q("a/kernel", None) and not q("a/bias", None) and not q("b/kernel", None)
    with pytest.raises(ValueError, match="expected a predicate"):
        select.all_of(3)
    with pytest.raises(ValueError, match="expected a flax linen or nnx Module"):
        select.modules(object())


def test_replace_modules_in_place():
    net = NnxNet(nnx.Rngs(0))
    copy = nnx.clone(net)
    select.replace_modules(copy, lambda p, m: nnx.Linear(32, 5, rngs=nnx.Rngs(1)) if p == "head" else None)
    assert copy(jnp.ones((1, 16))).shape == (1, 5)
    assert net(jnp.ones((1, 16))).shape == (1, 10)


def test_selected_layer_that_does_not_fit_names_its_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(64)(x)
            return nn.Dense(30)(x)

    model, x = Net(), jnp.ones((1, 64))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    with pytest.raises(ValueError, match=r"^Dense_1/kernel: shape=\(64, 30\) does not fit pattern hinm:32"):
        hinm_jax.prune(params, hinm_jax.HiNM(32, 0.5, 2, 4), where=select.module_type(nn.Dense, model, x))
