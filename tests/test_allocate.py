"""hinm_jax.allocate: per-layer HiNM vector sparsities at an exact whole-model density."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hinm_jax
from hinm_jax import HiNM, allocate_sparsity, allocation_table

BASE = HiNM(8, 0.5, 2, 4)


def _kept(params, per_layer, **kw):
    rows = hinm_jax.summary(params, hinm_jax.prune(params, per_layer, **kw)).pruned
    return sum(r.kept for r in rows), sum(r.total for r in rows)


def _uniform_kept(params, base=BASE, **kw):
    rows = hinm_jax.summary(params, hinm_jax.prune(params, base, **kw)).pruned
    return sum(r.kept for r in rows)


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([8, 16, 24])), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    cost=st.sampled_from(["relative", "absolute"]),
)
def test_exact_uniform_density_and_pattern_kept(shapes, seed, cost):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {f"l{i}": {"kernel": jax.random.normal(k, s) * (i + 1)} for i, (k, s) in enumerate(zip(keys, shapes))}
    per_layer = allocate_sparsity(params, BASE, cost=cost)
    assert len(per_layer) == len(shapes)
    for regex, pat in per_layer.items():
        assert isinstance(pat, HiNM)
        assert (pat.vector_size, pat.n, pat.m) == (BASE.vector_size, BASE.n, BASE.m)
        assert pat.vector_sparsity in (0.25, 0.375, 0.5, 0.625, 0.75)
        path = regex.strip("^$")
        k, o = params[path.split("/")[0]]["kernel"].shape
        assert pat.fit_error(k, o) is None
    kept, _ = _kept(params, per_layer)
    assert kept == _uniform_kept(params)  # exactly the uniform pattern's number of weights


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n_layers=st.integers(1, 4))
def test_never_worse_than_uniform(seed, n_layers):
    keys = jax.random.split(jax.random.key(seed), n_layers)
    params = {f"l{i}": jnp.abs(jax.random.normal(k, (32, 16))) ** (1 + 2 * i) for i, k in enumerate(keys)}
    table = allocation_table(params, BASE)
    per_layer = allocate_sparsity(params, BASE)
    chosen = sum(next(c for p, _, c in table[r.strip("^$")] if p == pat) for r, pat in per_layer.items())
    uniform = sum(next(c for p, _, c in opts if p.vector_sparsity == 0.5) for opts in table.values())
    assert chosen <= uniform + 1e-9


def test_sensitive_layer_keeps_more():
    # "peaky": a few input rows carry all the score (dropping half the inputs costs ~nothing);
    # "flat": every weight alike (every dropped weight costs the same)
    peaky = jnp.zeros((64, 16)).at[:8].set(1.0) + 1e-3
    flat = jnp.ones((64, 16))
    params = {"peaky": peaky, "flat": flat}
    per_layer = allocate_sparsity(params, BASE, score=lambda path, w: w)
    assert per_layer["^peaky$"].vector_sparsity > 0.5
    assert per_layer["^flat$"].vector_sparsity < 0.5
    assert _kept(params, per_layer)[0] == _uniform_kept(params)


def test_absolute_cost_favours_large_scores():
    w = jax.random.normal(jax.random.key(0), (64, 16))
    params = {"small": w, "large": w * 100.0}
    per_layer = allocate_sparsity(params, BASE, cost="absolute")
    assert per_layer["^large$"].vector_sparsity < per_layer["^small$"].vector_sparsity
    # relative cost: the same spread of scores, so the uniform pattern
    per_layer = allocate_sparsity(params, BASE, cost="relative")
    assert {p.vector_sparsity for p in per_layer.values()} == {0.5}


def test_where_regex_paths_and_compress():
    keys = jax.random.split(jax.random.key(1), 3)
    params = {
        "enc": {"q": {"kernel": jax.random.normal(keys[0], (64, 32))}, "ff": {"kernel": jax.random.normal(keys[1], (32, 64))}},
        "head": {"kernel": jax.random.normal(keys[2], (64, 32))},
    }
    per_layer = allocate_sparsity(params, "hinm:32:0.5:2:4", where=r"^enc/")
    assert sorted(per_layer) == sorted(f"^{re.escape(p)}$" for p in ("enc/q/kernel", "enc/ff/kernel"))
    masks = hinm_jax.prune(params, per_layer, where=r"^enc/")
    assert masks["head"]["kernel"] is None
    sparse = hinm_jax.compress(params, masks)
    x = jax.random.normal(jax.random.key(2), (4, 64))
    y = hinm_jax.sparse_matmul(x, sparse["enc"]["q"]["kernel"])
    ref = x @ hinm_jax.apply_masks(params, masks)["enc"]["q"]["kernel"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_stack_axes():
    w = jax.random.normal(jax.random.key(3), (3, 32, 16))
    params = {"stacked": w, "single": jax.random.normal(jax.random.key(4), (64, 16))}
    per_layer = allocate_sparsity(params, BASE, stack_axes=lambda p, leaf: 1 if p == "stacked" else 0)
    kept, _ = _kept(params, per_layer, stack_axes=lambda p, leaf: 1 if p == "stacked" else 0)
    assert kept == _uniform_kept(params, stack_axes=lambda p, leaf: 1 if p == "stacked" else 0)


def test_candidates_that_do_not_fit_are_skipped():
    # K = 8, m = 4: vector sparsity 0.625 or 0.75 keeps no full stripe; only <= 0.5 fits
    params = {"tiny": jnp.ones((8, 8)), "big": jax.random.normal(jax.random.key(5), (64, 8))}
    table = allocation_table(params, BASE)
    assert {p.vector_sparsity for p, _, _ in table["tiny"]} == {0.25, 0.375, 0.5}
    per_layer = allocate_sparsity(params, BASE)
    assert per_layer["^tiny$"].fit_error(8, 8) is None


def test_explicit_density_and_candidates():
    keys = jax.random.split(jax.random.key(6), 2)
    params = {"a": jax.random.normal(keys[0], (64, 16)), "b": jax.random.normal(keys[1], (64, 16))}
    per_layer = allocate_sparsity(params, BASE, vector_sparsities=[0.25, 0.5, 0.75], density=0.25)
    assert _kept(params, per_layer)[0] == _uniform_kept(params)
    # 0.3125 = (0.375 + 0.25) / 2: one layer at vector sparsity 0.25, the other at 0.5
    per_layer = allocate_sparsity(params, BASE, density=0.3125)
    kept, total = _kept(params, per_layer)
    assert kept == round(0.3125 * total)


def test_errors():
    params = {"a": jnp.ones((64, 16))}
    with pytest.raises(TypeError, match="HiNM"):
        allocate_sparsity(params, "2:4")
    with pytest.raises(ValueError, match="vector_sparsities: 1.5"):
        allocate_sparsity(params, BASE, vector_sparsities=[0.5, 1.5])
    with pytest.raises(TypeError, match="vector_sparsities"):
        allocate_sparsity(params, BASE, vector_sparsities=0.5)
    with pytest.raises(ValueError, match="nearest reachable"):
        allocate_sparsity(params, BASE, density=0.3)
    with pytest.raises(ValueError, match="density"):
        allocate_sparsity(params, BASE, density=1.5)
    with pytest.raises(TypeError, match="density"):
        allocate_sparsity(params, BASE, density="0.25")
    with pytest.raises(ValueError, match="cost"):
        allocate_sparsity(params, BASE, cost="owl")
    with pytest.raises(ValueError, match=r"a: shape=\(64, 16\).*>= 0"):
        allocate_sparsity(params, BASE, score=lambda p, w: -w)
    with pytest.raises(ValueError, match="nothing to allocate"):
        allocate_sparsity(params, BASE, where="^nothing$")
    with pytest.raises(ValueError, match=r"odd: shape=\(64, 12\)"):  # O not a multiple of V, selected by where
        allocate_sparsity({"odd": jnp.ones((64, 12))}, BASE, where="odd")
    with pytest.raises(ValueError, match=r"a: shape=\(64, 16\) but its score has shape"):
        allocate_sparsity(params, BASE, score={"a": jnp.ones((16, 64))})


# --------------------------------------------------------------------------- method="outlier" (OWL)


def _spiky(key, shape, n_spikes, scale=1000.0):
    """Normal weights with ``n_spikes`` entries ``scale`` times larger: ``n_spikes`` outliers."""
    w = jax.random.normal(key, shape)
    flat = w.reshape(-1)
    idx = jax.random.choice(jax.random.fold_in(key, 1), flat.size, (n_spikes,), replace=False)
    return flat.at[idx].set(scale).reshape(shape)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([8, 16, 24])), min_size=1, max_size=5),
    spikes=st.lists(st.integers(0, 12), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
    outlier_range=st.sampled_from([0.0, 0.08, 0.2]),
)
def test_outlier_exact_uniform_density(shapes, spikes, seed, outlier_range):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {f"l{i}": _spiky(k, s, spikes[i]) for i, (k, s) in enumerate(zip(keys, shapes))}
    per_layer = allocate_sparsity(params, BASE, method="outlier", outlier_range=outlier_range)
    assert sorted(per_layer) == sorted(f"^l{i}$" for i in range(len(shapes)))
    for regex, pat in per_layer.items():
        assert (pat.vector_size, pat.n, pat.m) == (BASE.vector_size, BASE.n, BASE.m)
        assert pat.fit_error(*params[regex.strip("^$")].shape) is None
    kept, _ = _kept(params, per_layer)
    assert kept == _uniform_kept(params)  # exactly the uniform pattern's number of weights


def test_outlier_explicit_density():
    keys = jax.random.split(jax.random.key(7), 2)
    params = {"a": _spiky(keys[0], (64, 16), 10), "b": jax.random.normal(keys[1], (64, 16))}
    # 0.3125 = (0.375 + 0.25) / 2: reachable only with the layers at different vector sparsities
    per_layer = allocate_sparsity(params, BASE, method="outlier", density=0.3125)
    kept, total = _kept(params, per_layer)
    assert kept == round(0.3125 * total)
    assert per_layer["^a$"].vector_sparsity < per_layer["^b$"].vector_sparsity
    with pytest.raises(ValueError, match="nearest reachable"):
        allocate_sparsity(params, BASE, method="outlier", density=0.3)


def test_outlier_layer_with_more_outliers_keeps_more():
    keys = jax.random.split(jax.random.key(8), 3)
    params = {
        "plain": jax.random.uniform(keys[0], (64, 16), minval=0.5, maxval=1.5),  # no score > 5x the mean
        "spiky": _spiky(keys[1], (64, 16), 12),
        "some": _spiky(keys[2], (64, 16), 3),
    }
    per_layer = allocate_sparsity(params, BASE, method="outlier")
    density = {r.strip("^$"): p.density(64) for r, p in per_layer.items()}
    assert density["spiky"] >= density["some"] >= density["plain"]
    assert density["spiky"] > density["plain"]  # lambda = 0.08: targets 0.33 and 0.17 around 0.25
    assert _kept(params, per_layer)[0] == _uniform_kept(params)
    # the table's costs: size * (candidate density - target)**2, one row per layer
    table = allocation_table(params, BASE, method="outlier")
    assert set(table) == set(params)
    assert all(c >= 0 for opts in table.values() for _, _, c in opts)
    # no spread (lambda = 0) or a single layer: every target is the uniform density, so the uniform pattern
    flat = allocate_sparsity(params, BASE, method="outlier", outlier_range=0.0)
    assert {p.vector_sparsity for p in flat.values()} == {0.5}
    single = allocate_sparsity({"spiky": params["spiky"]}, BASE, method="outlier")
    assert single["^spiky$"].vector_sparsity == 0.5


def test_outlier_threshold_and_scores():
    # the outlier ratio uses the given scores (Wanda-like here), not |W|: the score makes "b" the outlier layer
    w = jax.random.uniform(jax.random.key(9), (64, 16), minval=0.5, maxval=1.5)
    params = {"a": w, "b": w}
    boost = jnp.ones((64, 16)).at[:2, :4].set(1000.0)
    per_layer = allocate_sparsity(params, BASE, method="outlier",
                                  score=lambda path, x: jnp.abs(x) * (boost if path == "b" else 1.0))
    assert per_layer["^b$"].vector_sparsity < per_layer["^a$"].vector_sparsity
    # a threshold above every ratio of score to mean: no outliers anywhere, the uniform pattern
    per_layer = allocate_sparsity(params, BASE, method="outlier", outlier_threshold=1e9,
                                  score=lambda path, x: jnp.abs(x) * (boost if path == "b" else 1.0))
    assert {p.vector_sparsity for p in per_layer.values()} == {0.5}


def test_owl_target_densities():
    from hinm_jax.allocate import _owl_densities

    sizes = np.array([100, 300, 50, 50])
    goal = _owl_densities([0.01, 0.0, 0.03, 0.02], sizes, 0.25, 0.08)
    assert np.isclose(np.average(goal, weights=sizes), 0.25)
    assert np.isclose(goal.max() - goal.min(), 0.16)
    assert np.argmax(goal) == 2 and np.argmin(goal) == 1  # linear in the ratio: more outliers, denser
    np.testing.assert_allclose(_owl_densities([0.1, 0.1], [1, 2], 0.3, 0.08), [0.3, 0.3])


def test_outlier_errors():
    params = {"a": jnp.ones((64, 16))}
    with pytest.raises(ValueError, match="method='owl'"):
        allocate_sparsity(params, BASE, method="owl")
    with pytest.raises(TypeError, match="method=1"):
        allocate_sparsity(params, BASE, method=1)
    with pytest.raises(ValueError, match="outlier_threshold=0"):
        allocate_sparsity(params, BASE, method="outlier", outlier_threshold=0)
    with pytest.raises(ValueError, match="outlier_threshold=inf"):
        allocate_sparsity(params, BASE, method="outlier", outlier_threshold=float("inf"))
    with pytest.raises(TypeError, match="outlier_threshold='5'"):
        allocate_sparsity(params, BASE, method="outlier", outlier_threshold="5")
    with pytest.raises(ValueError, match="outlier_range=-0.1"):
        allocate_sparsity(params, BASE, method="outlier", outlier_range=-0.1)
    with pytest.raises(ValueError, match="outlier_range=nan"):
        allocate_sparsity(params, BASE, method="outlier", outlier_range=float("nan"))
    with pytest.raises(TypeError, match="outlier_range=True"):
        allocate_sparsity(params, BASE, method="outlier", outlier_range=True)
    with pytest.raises(ValueError, match="method='OWL'"):
        allocation_table(params, BASE, method="OWL")
    with pytest.raises(ValueError, match=r"a: shape=\(64, 16\).*>= 0"):
        allocate_sparsity(params, BASE, method="outlier", score=lambda p, w: -w)
    with pytest.raises(ValueError, match=r"odd: shape=\(64, 12\)"):
        allocate_sparsity({"odd": jnp.ones((64, 12))}, BASE, where="odd", method="outlier")
