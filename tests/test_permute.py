"""Channel permutation search (hinm_jax.permute): planted layouts are found, every
layout is a valid HiNM structure, efficacy follows SPEC, errors name what is wrong."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hinm_jax
from hinm_jax import permute
from hinm_jax.masks import Layout, Mask, mask_from_layout, matrix_mask

HINM = hinm_jax.HiNM(16, 0.5, 2, 4)
FAST = dict(ocp_cycles=2, ivp_rounds=30)  # small budgets: these tests check behaviour, not reach


def random_score(seed, k=64, o=64):
    return jnp.abs(jax.random.normal(jax.random.key(seed), (k, o)))


def check_layout(score, pattern, layout, compressed=True):
    """The layout is a HiNM structure and its mask keeps exactly n of m per stripe."""
    score = np.asarray(score)
    k, o = score.shape
    v, kv, n, m = pattern.structure(k, o)
    rp, vi = np.asarray(layout.row_perm), np.asarray(layout.vector_index)
    assert rp.dtype == np.int32 and vi.dtype == np.int32
    assert sorted(rp.tolist()) == list(range(o))
    assert vi.shape == (o // v, kv)
    assert vi.min() >= 0 and vi.max() < k
    assert all(len(set(row.tolist())) == kv for row in vi)
    mask = np.asarray(mask_from_layout(score, rp, vi, n, m))
    for r in range(o):
        col = mask[:, rp[r]]
        assert (col[vi[r // v]].reshape(-1, m).sum(axis=1) == n).all()
        assert col.sum() == kv // m * n  # nothing outside the vector index
    if not compressed:
        return mask
    # The compressed format agrees (it raises on a mask that breaks its layout).
    w = jnp.asarray(score)
    sparse = hinm_jax.compress({"w": w}, {"w": Mask(jnp.asarray(mask), layout, pattern)})["w"]
    np.testing.assert_array_equal(np.asarray(sparse.densify()), np.where(mask, score, 0))
    return mask


# ---------------------------------------------------------------------------------------
# Planted layouts: the search finds them
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, shape, method",
    [
        (HINM, (64, 64), "2cp"),
        (hinm_jax.NM(2, 4), (64, 32), "ivp"),
        (hinm_jax.VectorWise(16, 0.5), (64, 64), "ocp"),
    ],
)
def test_planted_layout_is_found(pattern, shape, method):
    score, hidden = permute.planted(jax.random.key(0), *shape, pattern)
    assert permute.efficacy(score, pattern, hidden) == pytest.approx(100.0, abs=1e-3)
    assert permute.efficacy(score, pattern, matrix_mask(score, pattern)[1]) == 0.0
    layout = permute.search(score, pattern, method, key=jax.random.key(1))
    check_layout(score, pattern, layout)
    assert permute.efficacy(score, pattern, layout) > 99.0


def test_planted_each_axis_alone_improves():
    score, _ = permute.planted(jax.random.key(0), 64, 64, HINM)
    effs = {
        m: permute.efficacy(score, HINM, permute.search(score, HINM, m, key=jax.random.key(1), **FAST))
        for m in permute.METHODS
    }
    assert effs["ocp"] > 20 and effs["ivp"] > 10
    assert effs["2cp"] > max(effs["ocp"], effs["ivp"])


# ---------------------------------------------------------------------------------------
# Validity, no regression, determinism
# ---------------------------------------------------------------------------------------

PATTERNS = {
    "hinm": (HINM, ("ocp", "ivp", "2cp")),
    "hinm_1:4": (hinm_jax.HiNM(8, 0.5, 1, 4), ("ocp", "ivp", "2cp")),
    "hinm_3:4": (hinm_jax.HiNM(16, 0.25, 3, 4), ("2cp",)),
    "nm": (hinm_jax.NM(2, 4), ("ivp", "2cp")),  # on (64, 32), like the planted case
    "vw": (hinm_jax.VectorWise(16, 0.5), ("ocp", "2cp")),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_layouts_are_valid_and_never_below_the_paper(name):
    pattern, methods = PATTERNS[name]
    score = random_score(1, o=32 if name == "nm" else 64)
    for method in methods:
        layout = permute.search(score, pattern, method, key=jax.random.key(2), **FAST)
        check_layout(score, pattern, layout)
        assert permute.efficacy(score, pattern, layout) >= 0.0
    if name == "hinm":
        assert permute.efficacy(score, pattern, layout) > 5.0  # 2cp on random scores


def test_same_key_same_layout_and_search_tree_agrees():
    score = random_score(3)
    a = permute.search(score, HINM, "2cp", key=jax.random.key(7), **FAST)
    b = permute.search(score, HINM, "2cp", key=jax.random.key(7), **FAST)
    c = permute.search(score, HINM, "2cp", key=jax.random.key(8), **FAST)
    np.testing.assert_array_equal(a.row_perm, b.row_perm)
    np.testing.assert_array_equal(a.vector_index, b.vector_index)
    assert not np.array_equal(a.vector_index, c.vector_index)

    tree = permute.search_tree([("w", score)], {"w": HINM}, method="2cp", key=jax.random.key(7), progress=False, **FAST)
    np.testing.assert_array_equal(tree["w"].row_perm, a.row_perm)
    np.testing.assert_array_equal(tree["w"].vector_index, a.vector_index)


def test_non_finite_scores():
    score = np.asarray(random_score(4)).copy()
    score[3, :5] = np.nan
    score[7, 2] = np.inf
    score[9, 9] = -np.inf
    layout = permute.search(score, HINM, "2cp", key=jax.random.key(0), **FAST)
    check_layout(np.nan_to_num(score, nan=0.0, posinf=1e3, neginf=0.0), HINM, layout)


def test_time_limit_stops_early():
    score = random_score(5)
    t0 = time.perf_counter()
    layout = permute.search(
        score, HINM, "2cp", key=jax.random.key(0), ivp_rounds=10_000, ocp_cycles=10_000, time_limit=0.05
    )
    assert time.perf_counter() - t0 < 30  # 10k rounds and cycles would take minutes
    check_layout(score, HINM, layout)


def test_budgets_shrink_for_large_matrices():
    small = permute._scaled(permute.Budget(), HINM.structure(384, 384), 384, 384)
    big = permute._scaled(permute.Budget(), HINM.structure(4096, 4096), 4096, 4096)
    assert small == permute.Budget()
    assert 1 <= big.ivp_rounds < small.ivp_rounds and 1 <= big.ocp_descent < small.ocp_descent
    fixed = permute.Budget(scale=False)
    assert permute._scaled(fixed, HINM.structure(4096, 4096), 4096, 4096) == fixed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["hinm", "hinm_1:4"]),
    method=st.sampled_from(permute.METHODS),
    levels=st.integers(1, 6),  # few distinct values: many ties
    seed=st.integers(0, 2**16),
)
def test_property_valid_and_no_worse_with_ties(name, method, levels, seed):
    pattern, _ = PATTERNS[name]
    score = np.random.default_rng(seed).integers(0, levels, (64, 64)).astype(np.float32)
    layout = permute.search(score, pattern, method, key=jax.random.key(seed), ocp_cycles=1, ivp_rounds=5)
    check_layout(score, pattern, layout, compressed=False)
    assert permute.efficacy(score, pattern, layout) >= 0.0


# ---------------------------------------------------------------------------------------
# Efficacy (SPEC) and kept
# ---------------------------------------------------------------------------------------


def test_efficacy_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    k, o, v, kv = 16, 8, 4, 8
    pattern = hinm_jax.HiNM(v, 0.5, 2, 4)
    s = rng.random((k, o)).astype(np.float32)

    def hinm_kept(perm, vidx):
        total = 0.0
        for r, c in enumerate(perm):
            stripes = s[vidx[r // v], c].reshape(-1, 4)
            total += np.sort(stripes, axis=1)[:, 2:].sum()
        return total

    ident = np.arange(o)
    base_idx = [np.sort(np.argsort(-s[:, b * v : (b + 1) * v].sum(1), kind="stable")[:kv]) for b in range(o // v)]
    base = hinm_kept(ident, base_idx)
    opt = np.sort(s, axis=0)[-round(0.25 * k) :].sum()
    perm = rng.permutation(o)
    vidx = np.stack([rng.permutation(k)[:kv] for _ in range(o // v)])
    want = 100 * (hinm_kept(perm, vidx) - base) / (opt - base)
    got = permute.efficacy(s, pattern, Layout(jnp.asarray(perm, jnp.int32), jnp.asarray(vidx, jnp.int32)))
    assert got == pytest.approx(want, rel=1e-4)
    # A stack: totals over its matrices.
    two = Layout(jnp.asarray(np.stack([perm] * 2), jnp.int32), jnp.asarray(np.stack([vidx] * 2), jnp.int32))
    stacked = permute.efficacy(np.stack([s, s]), pattern, two)
    assert stacked == pytest.approx(want, rel=1e-4)


def test_efficacy_zero_when_nothing_to_gain_and_kept():
    flat = jnp.ones((16, 8))
    _, layout = matrix_mask(flat, hinm_jax.HiNM(4, 0.5, 2, 4))
    assert permute.efficacy(flat, "hinm:4:0.5:2:4", layout) == 0.0
    assert permute.kept(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[True, False], [False, True]])) == 5.0
    with pytest.raises(ValueError, match=re.escape("shape=(2, 2)")):
        permute.kept(jnp.ones((2, 2)), jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="layout shapes"):
        permute.efficacy(flat, "hinm:4:0.5:2:4", Layout(layout.row_perm[:4], layout.vector_index))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, method, match",
    [
        (hinm_jax.Unstructured(0.5), "2cp", "no permutation search"),
        (hinm_jax.HSS(((3, 4), (2, 4))), "ivp", "no permutation search"),
        (hinm_jax.NM(2, 4), "ocp", "single block"),
        (hinm_jax.VectorWise(16, 0.5), "ivp", "no N:M step"),
        (HINM, "3cp", "expected one of"),
        (hinm_jax.HiNM(24, 0.5, 2, 4), "2cp", "does not fit"),
    ],
)
def test_errors_name_path_shape_and_pattern(pattern, method, match):
    score = random_score(0)
    with pytest.raises(ValueError, match=match) as info:
        permute.search_tree([("enc/q/kernel", score)], {"enc/q/kernel": pattern}, method=method, progress=False)
    assert "enc/q/kernel" in str(info.value) and "shape=(64, 64)" in str(info.value) and str(pattern) in str(info.value)
    with pytest.raises(ValueError, match=match):
        permute.search(score, pattern, method)


def test_bad_options():
    score = random_score(0)
    with pytest.raises(ValueError, match="unknown search options"):
        permute.search(score, HINM, ivp_roundz=3)
    with pytest.raises(ValueError, match="ivp_rounds"):
        permute.Budget(ivp_rounds=-1)
    with pytest.raises(ValueError, match="time_limit"):
        permute.Budget(time_limit=0)
    with pytest.raises(ValueError, match=re.escape("shape=(2, 64, 64)")):
        permute.search(jnp.ones((2, 64, 64)), HINM)


# ---------------------------------------------------------------------------------------
# prune(..., permute=...)
# ---------------------------------------------------------------------------------------


def test_prune_with_permutation_carries_layouts(capsys):
    planted, _ = permute.planted(jax.random.key(0), 64, 64, HINM)
    params = {
        "planted": {"kernel": planted, "bias": jnp.zeros(64)},
        "conv": {"kernel": jax.random.normal(jax.random.key(1), (2, 2, 16, 32))},
        "scan": {"kernel": jax.random.normal(jax.random.key(2), (2, 64, 32))},
    }
    stack = lambda path, leaf: 1 if path.startswith("scan") else 0
    masks = hinm_jax.prune(
        params, HINM, stack_axes=stack, permute="2cp", key=jax.random.key(3), permute_options={"progress": True}
    )
    assert "efficacy" in capsys.readouterr().err  # the progress bar shows each layer's efficacy
    assert masks["planted"]["bias"] is None
    assert masks["scan"]["kernel"].layout.row_perm.shape == (2, 32)
    assert masks["scan"]["kernel"].layout.vector_index.shape == (2, 2, 32)
    assert masks["conv"]["kernel"].layout.vector_index.shape == (2, 32)
    sparse = hinm_jax.compress(params, masks)  # raises if a mask breaks its layout
    for name, matrices in (("planted", (64, 64)), ("conv", (64, 32)), ("scan", (2, 64, 32))):
        w, m = params[name]["kernel"], masks[name]["kernel"]
        np.testing.assert_array_equal(sparse[name]["kernel"].densify(), jnp.where(m.mask, w, 0))
        assert permute.efficacy(jnp.abs(w).reshape(matrices), HINM, m.layout) >= 0.0
    assert permute.efficacy(jnp.abs(planted), HINM, masks["planted"]["kernel"].layout) > 99.0


def test_prune_rejects_patterns_without_search():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
    with pytest.raises(ValueError, match="w: shape=\\(64, 64\\) pattern unstructured:0.5"):
        hinm_jax.prune(params, hinm_jax.Unstructured(0.5), permute="2cp", key=jax.random.key(0), permute_options={"progress": False})
