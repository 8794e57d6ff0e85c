"""Least-squares reconstruction of kept weights: the one-matrix solve against a numpy
oracle, and the model-level refit (linen and nnx, sequential and not)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import hinm_jax
from hinm_jax import reconstruct as rc

PATTERN = hinm_jax.HiNM(16, 0.5, 2, 4)


def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _oracle(w, mask, gram, cross, damp):
    """Column by column, with numpy: w_S = (H_SS + λI)^-1 (C w + λ w)_S."""
    w, mask, gram, cross = (np.asarray(a, np.float64) for a in (w, mask, gram, cross))
    lam = damp * np.mean(np.diag(gram))
    h = gram + lam * np.eye(len(gram))
    rhs = cross @ w + lam * w
    out = np.zeros_like(w)
    for o in range(w.shape[1]):
        s = np.flatnonzero(mask[:, o])
        if len(s):
            out[s, o] = np.linalg.solve(h[np.ix_(s, s)], rhs[s, o])
    return out


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(2, 24),
    o=st.integers(1, 20),
    density=st.floats(0.0, 1.0),
    damp=st.sampled_from([0.0, 0.01, 0.5]),
    with_cross=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_solve_matches_oracle_for_any_mask(k, o, density, damp, with_cross, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k + 8, k))
    xd = x + 0.3 * rng.standard_normal(x.shape)
    w = rng.standard_normal((k, o))
    mask = rng.random((k, o)) < density  # columns keep different numbers of rows, some none
    gram, cross = x.T @ x, (x.T @ xd if with_cross else None)
    got = rc.solve(jnp.asarray(w, jnp.float32), mask, gram, cross, damp=damp, chunk=7)
    want = _oracle(w, mask, gram, gram if cross is None else cross, damp)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)
    assert not np.any(np.asarray(got)[~mask])


def test_solve_recovers_weights_that_already_fit_the_mask():
    x = _normal((256, 32))
    mask = hinm_jax.prune({"w": _normal((32, 16), 1)}, PATTERN)["w"].mask
    w = _normal((32, 16), 2) * mask
    np.testing.assert_allclose(np.asarray(rc.solve(w, mask, x.T @ x, damp=0.0)), np.asarray(w), atol=1e-4)


def test_solve_beats_plain_masking_on_correlated_inputs():
    base = _normal((512, 8))
    x = jnp.tile(base, (1, 4)) + 0.1 * _normal((512, 32), 1)  # each feature has three near-copies
    w = _normal((32, 16), 2)
    mask = hinm_jax.prune({"w": w}, PATTERN)["w"].mask
    err_mask = float(jnp.sum((x @ (w * mask) - x @ w) ** 2))
    err_fit = float(jnp.sum((x @ rc.solve(w, mask, x.T @ x) - x @ w) ** 2))
    assert err_fit < 0.5 * err_mask


def test_solve_without_data_keeps_the_kept_weights():
    w = _normal((32, 16), 2)
    mask = hinm_jax.prune({"w": w}, PATTERN)["w"].mask
    np.testing.assert_allclose(np.asarray(rc.solve(w, mask, jnp.zeros((32, 32)))), np.asarray(w * mask), rtol=1e-6)


def test_solve_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"mask.shape=\(4, 3\)"):
        rc.solve(jnp.ones((4, 4)), jnp.ones((4, 3), bool), jnp.eye(4))
    with pytest.raises(ValueError, match=r"gram.shape=\(3, 3\)"):
        rc.solve(jnp.ones((4, 4)), jnp.ones((4, 4), bool), jnp.eye(3))
    with pytest.raises(ValueError, match="damp"):
        rc.solve(jnp.ones((4, 4)), jnp.ones((4, 4), bool), jnp.eye(4), damp=-1.0)


class Block(nn.Module):
    """Three layers reading the same input (one stage), then two more in sequence."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(32, name=n)(x) for n in ("q", "k", "v"))
        h = nn.gelu(nn.Dense(64, name="up")(q * jax.nn.sigmoid(k) + v))
        return nn.Dense(32, name="down")(h)


def _block():
    model = Block()
    x = _normal((8, 16, 32), 3)
    params = jax.tree.map(lambda a: a + 0.05, model.init(jax.random.key(0), x)["params"])
    return model, params, [x, _normal((8, 16, 32), 4)]


def _error(model, params, masks, dense, batches):
    p = hinm_jax.apply_masks(params, masks)
    return sum(float(jnp.mean((model.apply({"params": p}, b) - model.apply({"params": dense}, b)) ** 2)) for b in batches)


def test_call_order_groups_layers_that_share_an_input():
    model, params, batches = _block()
    assert rc.call_order(model, params, batches[0]) == [["q/kernel", "k/kernel", "v/kernel"], ["up/kernel"], ["down/kernel"]]


@pytest.mark.parametrize("target", ["dense", "self"])
@pytest.mark.parametrize("sequential", [True, False])
def test_linen_reconstruct_reduces_error_and_keeps_masks(target, sequential):
    model, params, batches = _block()
    masks = hinm_jax.prune(params, PATTERN, where=r"kernel$")
    refit = rc.reconstruct(model, params, masks, batches, target=target, sequential=sequential)
    assert jax.tree.structure(refit) == jax.tree.structure(params)
    before, after = _error(model, params, masks, params, batches), _error(model, refit, masks, params, batches)
    assert after < 0.7 * before, (before, after)
    for path, m in hinm_jax.masks.named_leaves(masks).items():
        if m is not None:
            w = np.asarray(hinm_jax.masks.named_leaves(refit)[path])
            assert not np.any(w[~np.asarray(m.mask)]), path
    # and the biases moved
    assert not np.allclose(np.asarray(refit["down"]["bias"]), np.asarray(params["down"]["bias"]))
    no_bias = rc.reconstruct(model, params, masks, batches, target=target, sequential=sequential, fit_bias=False)
    np.testing.assert_array_equal(np.asarray(no_bias["down"]["bias"]), np.asarray(params["down"]["bias"]))


def test_sequential_dense_target_is_exact_layer_by_layer():
    """With only the last layer masked its inputs are the dense ones, so every mode
    computes the same single solve, equal to :func:`solve` on the captured Gram."""
    model, params, batches = _block()
    masks = hinm_jax.prune(params, PATTERN, where=r"^down/kernel$")
    got = [rc.reconstruct(model, params, masks, batches, sequential=s, target=t, fit_bias=False)
           for s in (True, False) for t in ("dense", "self")]
    h = 0
    for b in batches:
        _, inter = model.apply({"params": params}, b, capture_intermediates=True, mutable=["intermediates"])
        a = inter["intermediates"]["up"]["__call__"][0]
        a = nn.gelu(a).reshape(-1, 64)
        h = h + a.T @ a
    want = rc.solve(params["down"]["kernel"], masks["down"]["kernel"].mask, h)
    for g in got:
        np.testing.assert_allclose(np.asarray(g["down"]["kernel"]), np.asarray(want), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(g["q"]["kernel"]), np.asarray(params["q"]["kernel"]))


def test_row_weights_ignore_padding_rows():
    model, params, batches = _block()
    masks = hinm_jax.prune(params, PATTERN, where=r"kernel$")
    padded = [jnp.concatenate([b, 100.0 * _normal((8, 4, 32), 9)], axis=1) for b in batches]
    weights = lambda b: jnp.broadcast_to((jnp.arange(b.shape[1]) < 16).astype(jnp.float32), b.shape[:2])  # noqa: E731
    want = rc.reconstruct(model, params, masks, batches)
    got = rc.reconstruct(model, params, masks, padded, row_weights=weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_nnx_reconstruct_matches_linen():
    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, 64, rngs=rngs)
            self.down = nnx.Linear(64, 32, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.gelu(self.up(x)))

    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))

    model = NnxMLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    batches = [_normal((64, 32), 5), _normal((64, 32), 6)]
    masks = hinm_jax.prune(state, PATTERN, where=r"kernel$")
    refit = rc.reconstruct(model, state, masks, batches)
    assert isinstance(refit, nnx.State)
    linen_params = {n: {"kernel": getattr(model, n).kernel.get_value(), "bias": getattr(model, n).bias.get_value()}
                    for n in ("up", "down")}
    linen_masks = hinm_jax.prune(linen_params, PATTERN, where=r"kernel$")
    want = rc.reconstruct(LinenMLP(), linen_params, linen_masks, batches)
    for n in ("up", "down"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(refit[n][leaf].get_value()), np.asarray(want[n][leaf]), rtol=1e-4, atol=1e-5)
    nnx.update(model, hinm_jax.apply_masks(refit, masks))  # the refit state drops back into the model
    assert model(batches[0]).shape == (64, 32)


def test_errors_name_the_path():
    class WithConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.Conv(16, (1,), name="conv")(x).reshape(x.shape[0], -1))

    model = WithConv()
    x = _normal((4, 2, 16))
    params = model.init(jax.random.key(0), x)["params"]
    masks = hinm_jax.prune(params, hinm_jax.HiNM(8, 0.5, 2, 4), where=r"conv/kernel")
    with pytest.raises(ValueError, match=r"conv/kernel: shape=\(1, 16, 16\)"):
        rc.reconstruct(model, params, masks, [x])
    with pytest.raises(ValueError, match="target"):
        rc.reconstruct(model, params, masks, [x], target="teacher")
    with pytest.raises(ValueError, match="no calibration batch"):
        rc.reconstruct(model, params, masks, [])
