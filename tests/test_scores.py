"""Wanda (activation-aware) and first-order Taylor scores, usable as ``score=``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hinm_jax
from hinm_jax import layers, scores

PATTERN = hinm_jax.HiNM(16, 0.5, 2, 4)


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), tree)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32)(x))
        return nn.Dense(16)(h)


def test_magnitude_is_abs():
    assert scores.magnitude(jnp.array([[-2.0, 0.5]])).tolist() == [[2.0, 0.5]]


def test_linen_input_norms_are_the_activation_norms():
    model = MLP()
    batches = [_normal((4, 16), seed=i) for i in range(3)]
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), batches[0])["params"])
    norms = scores.input_norms(model, batches, {"params": params})
    assert sorted(norms) == ["Dense_0/kernel", "Dense_1/kernel"]
    x = jnp.concatenate(batches)
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    np.testing.assert_allclose(norms["Dense_0/kernel"], jnp.linalg.norm(x, axis=0), rtol=1e-5)
    np.testing.assert_allclose(norms["Dense_1/kernel"], jnp.linalg.norm(h, axis=0), rtol=1e-5)


def test_dense_with_activation_is_captured_once_per_call():
    """layers.Dense calls nn.Dense.__call__ through super(): its input counts once, as nn.Dense's does."""
    batches = [jnp.array([[3.0, 0.0, 1.0]]), jnp.array([[4.0, 0.0, 0.0]])]
    for model in (nn.Dense(4), layers.Dense(4, activation="gelu")):
        variables = model.init(jax.random.key(0), batches[0])
        norms = scores.input_norms(model, batches, variables)
        np.testing.assert_allclose(norms["kernel"], [5.0, 0.0, 1.0])


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_input_norms_row_weights_drop_padding_rows(kind):
    """Rows with weight 0 (padding) do not count; weight 4 counts a row twice in norm."""
    batches = [_normal((4, 16), seed=i) for i in range(2)]
    padded = [jnp.concatenate([b, 50.0 * _normal((2, 16), seed=9)]) for b in batches]
    weights = lambda b: jnp.arange(b.shape[0]) < 4  # noqa: E731
    if kind == "linen":
        model = MLP()
        params = _random_like(jax.eval_shape(model.init, jax.random.key(0), batches[0])["params"])
        args = (model, {"params": params})
    else:
        model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 16, rngs=nnx.Rngs(1)))
        args = (model, None)
    want = scores.input_norms(args[0], batches, args[1])
    got = scores.input_norms(args[0], padded, args[1], row_weights=weights)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5)
    doubled = scores.input_norms(args[0], batches, args[1], row_weights=lambda b: 4.0)
    for path in want:
        np.testing.assert_allclose(doubled[path], 2 * want[path], rtol=1e-5)
    with pytest.raises(ValueError, match=r"row_weights shape=\(3,\)"):
        scores.input_norms(args[0], batches, args[1], row_weights=lambda b: jnp.ones(3))


def test_wanda_as_score_in_prune_equals_the_explicit_score_tree():
    model = MLP()
    batches = [_normal((8, 16), seed=i) for i in range(2)]
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), batches[0])["params"])
    norms = scores.input_norms(model, batches, {"params": params})
    where = r"kernel$"
    masks = hinm_jax.prune(params, PATTERN, score=scores.wanda(norms), where=where)
    tree = jax.tree.map(jnp.abs, params)
    for name in ("Dense_0", "Dense_1"):
        tree[name]["kernel"] = tree[name]["kernel"] * norms[f"{name}/kernel"][:, None]
    expected = hinm_jax.prune(params, PATTERN, score=tree, where=where)
    for name in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(masks[name]["kernel"].mask, expected[name]["kernel"].mask)
    # and it is not magnitude pruning
    plain = hinm_jax.prune(params, PATTERN, where=where)
    assert not np.array_equal(plain["Dense_0"]["kernel"].mask, masks["Dense_0"]["kernel"].mask)


def test_wanda_keeps_weights_of_loud_inputs():
    w = jnp.ones((8, 16))
    norms = {"kernel": jnp.array([1.0, 1.0, 1.0, 50.0, 1.0, 1.0, 1.0, 1.0])}
    mask = hinm_jax.prune({"kernel": w}, hinm_jax.HiNM(16, 0.5, 1, 4), score=scores.wanda(norms))["kernel"].mask
    assert bool(mask[3].all())  # input 3 survives the vector step and every stripe


def test_ria_matches_its_formula():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    n = jnp.asarray(rng.uniform(0.5, 3.0, size=8), jnp.float32)
    got = scores.ria({"d/kernel": n}, alpha=0.5)("d/kernel", w)
    a = np.abs(np.asarray(w))
    want = (a / a.sum(0, keepdims=True) + a / a.sum(1, keepdims=True)) * np.sqrt(np.asarray(n))[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a DenseGeneral kernel (H, D, O) with (H, D) input norms: sums over (H, D) and over O
    w3 = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    n3 = jnp.asarray(rng.uniform(0.5, 3.0, size=(2, 4)), jnp.float32)
    got3 = scores.ria({"k": n3}, alpha=1.0)("k", w3)
    flat = scores.ria({"k": n3.reshape(8)}, alpha=1.0)("k", w3.reshape(8, 6))
    np.testing.assert_allclose(got3.reshape(8, 6), flat, rtol=1e-6)


def test_ria_errors():
    with pytest.raises(ValueError, match="alpha"):
        scores.ria({}, alpha=-1.0)
    with pytest.raises(TypeError, match="alpha"):
        scores.ria({}, alpha="0.5")
    with pytest.raises(ValueError, match=r"a/kernel: shape=\(8, 4\): no input norms"):
        scores.ria({})("a/kernel", jnp.ones((8, 4)))
    with pytest.raises(ValueError, match=r"b: shape=\(8,\): RIA needs output axes"):
        scores.ria({"b": jnp.ones(8)})("b", jnp.ones(8))
    assert scores.ria({}, fallback=scores.magnitude)("c", -jnp.ones(3)).tolist() == [1.0, 1.0, 1.0]


def _conv_patch_norms(x, kh, kw, stride, pad):
    """Reference: explicit windows, kernel order (kh, kw, I)."""
    x = np.pad(np.asarray(x), ((0, 0), pad[0], pad[1], (0, 0)))
    n, h, w, c = x.shape
    out = np.zeros((kh, kw, c))
    for i in range(0, h - kh + 1, stride):
        for j in range(0, w - kw + 1, stride):
            out += np.sum(np.square(x[:, i : i + kh, j : j + kw, :]), axis=0)
    return np.sqrt(out)


def test_conv_input_norms_are_patch_feature_norms():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(16, (3, 2), strides=2, padding=((1, 1), (0, 1)))(x)
            return nn.Conv(16, (3, 3), feature_group_count=4)(x)

    model = CNN()
    x = _normal((2, 7, 6, 4))
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    norms = scores.input_norms(model, [x], {"params": params})
    ref = _conv_patch_norms(x, 3, 2, 2, ((1, 1), (0, 1)))
    np.testing.assert_allclose(norms["Conv_0/kernel"], ref, rtol=1e-5)
    # grouped conv: full (kh, kw, I/g, O) norms, output o reads its group's inputs
    g = norms["Conv_1/kernel"]
    assert g.shape == params["Conv_1"]["kernel"].shape == (3, 3, 4, 16)
    h = nn.Conv(16, (3, 2), strides=2, padding=((1, 1), (0, 1))).apply({"params": params["Conv_0"]}, x)
    per_channel = _conv_patch_norms(h, 3, 3, 1, ((1, 1), (1, 1)))  # (3, 3, 16)
    np.testing.assert_allclose(g[:, :, :, 5], per_channel[:, :, 4:8], rtol=1e-5)  # o=5 is in group 1
    np.testing.assert_allclose(g[:, :, :, 15], per_channel[:, :, 12:16], rtol=1e-5)
    s = scores.wanda(norms)("Conv_1/kernel", params["Conv_1"]["kernel"])
    assert s.shape == (3, 3, 4, 16)


def test_attention_norms_fit_folded_and_output_kernels():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
    x = _normal((2, 5, 16))
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    norms = scores.input_norms(model, [x], {"params": params})
    assert norms["query/kernel"].shape == (16,)
    assert norms["out/kernel"].shape == (2, 8)  # contracted (heads, head_dim)
    folded = layers.fold_features(params, model, x)
    masks = hinm_jax.prune(folded, hinm_jax.NM(2, 4), score=scores.wanda(norms), where=r"kernel$")
    assert masks["query"]["kernel"].mask.shape == (16, 16)
    assert masks["out"]["kernel"].mask.shape == (2, 8, 16)


def test_nnx_input_norms_match_linen():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 16, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return self.fc(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

    net = Net(nnx.Rngs(0))
    batches = [_normal((2, 6, 6, 4), seed=i) for i in range(2)]
    norms = scores.input_norms(net, batches)
    assert sorted(norms) == ["conv/kernel", "fc/kernel"]
    x = jnp.concatenate(batches)
    np.testing.assert_allclose(norms["conv/kernel"], _conv_patch_norms(x, 3, 3, 1, ((1, 1), (1, 1))), rtol=1e-5)
    h = nnx.relu(net.conv(x)).mean(axis=(1, 2))
    np.testing.assert_allclose(norms["fc/kernel"], jnp.linalg.norm(h, axis=0), rtol=1e-5)
    # the model itself is not modified
    assert isinstance(net.conv, nnx.Conv) and isinstance(net.fc, nnx.Linear)
    masks = hinm_jax.prune(nnx.state(net, nnx.Param), PATTERN, score=scores.wanda(norms), where=r"kernel$")
    assert masks["fc"]["kernel"].mask.shape == (16, 16)


def test_wanda_errors_name_the_path():
    score = scores.wanda({"a/kernel": jnp.ones(8)})
    with pytest.raises(ValueError, match=r"^b/kernel: shape=\(8, 4\): no input norms"):
        score("b/kernel", jnp.ones((8, 4)))
    with pytest.raises(ValueError, match=r"^a/kernel: shape=\(4, 8\) does not start with its input norms' shape \(8,\)"):
        score("a/kernel", jnp.ones((4, 8)))
    with_fallback = scores.wanda({}, fallback=scores.magnitude)
    np.testing.assert_array_equal(with_fallback("x", -jnp.ones((2, 4))), jnp.ones((2, 4)))


def test_taylor_is_weight_times_gradient():
    model = MLP()
    batches = [(_normal((4, 16), seed=i), _normal((4, 16), seed=10 + i)) for i in range(2)]
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), batches[0][0])["params"])

    def loss(p, batch):
        x, y = batch
        return jnp.mean(jnp.square(model.apply({"params": p}, x) - y))

    t = scores.taylor(loss, params, batches)
    g = [jax.grad(loss)(params, b) for b in batches]
    expected = jax.tree.map(lambda w, g0, g1: (jnp.abs(w * g0) + jnp.abs(w * g1)) / 2, params, *g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), t, expected)
    masks = hinm_jax.prune(params, PATTERN, score=t, where=r"kernel$")
    assert float(masks["Dense_0"]["kernel"].density) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no batch given"):
        scores.taylor(loss, params, [])


def test_taylor_on_nnx_state():
    model = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
    graph_def, state = nnx.split(model, nnx.Param)

    def loss(s, x):
        return jnp.sum(nnx.merge(graph_def, s)(x) ** 2)

    t = scores.taylor(loss, state, [_normal((3, 16))])
    masks = hinm_jax.prune(state, PATTERN, score=t)
    assert masks["kernel"].mask.shape == (16, 16)
