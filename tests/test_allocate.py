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


@settings(max_examples=25, deadline=None)
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
