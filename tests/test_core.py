"""The single-matrix core: masks at traced levels and the scheduled K_v rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hinm_jax import HiNM, VectorWise, core
from oracle import oracle_block_mask, oracle_unstructured


# ---------------------------------------------------------------------------------------
# Masks at traced levels (the machinery of gradual sparsity)
# ---------------------------------------------------------------------------------------


# A few fixed shapes (one compilation each); scores, permutations and levels vary.
# (V, O, K, n, m, target K_v); K not always a multiple of m.
SHAPES = [(4, 8, 20, 2, 4, 8), (2, 6, 17, 1, 2, 8), (1, 3, 24, 2, 8, 8), (4, 8, 13, 3, 4, 4)]
_block_at = jax.jit(core.block_mask_at, static_argnums=(2, 3, 4, 5))
_in_layout = jax.jit(core.nm_step, static_argnums=(4,))


@st.composite
def traced_cases(draw):
    v, o, k, n, m, kv = draw(st.sampled_from(SHAPES))
    kv_t = draw(st.sampled_from(sorted({kv, kv + m, k // m * m, k})))
    n_t = draw(st.integers(n, m))
    seed = draw(st.integers(0, 2**31 - 1))
    hi = draw(st.sampled_from([3, 1000]))  # 3: many ties
    score = np.random.default_rng(seed).integers(0, hi, size=(k, o)).astype(np.float32)
    perm = np.random.default_rng(seed + 1).permutation(o).astype(np.int32)
    return score, perm, v, kv, n, m, kv_t, n_t


@settings(max_examples=60, deadline=None)
@given(traced_cases())
def test_masks_at_traced_levels_match_the_spec_oracle(case):
    score, perm, v, kv, n, m, kv_t, n_t = case
    mask, vi = _block_at(jnp.asarray(score), jnp.asarray(perm), v, kv, n, m, jnp.int32(kv_t), jnp.int32(n_t))
    want, _ = oracle_block_mask(score, v, kv_t, n_t, m, row_perm=perm)
    np.testing.assert_array_equal(np.asarray(mask), want)
    _, want_vi = oracle_block_mask(score, v, kv, n, m, row_perm=perm)
    np.testing.assert_array_equal(np.asarray(vi), want_vi)  # the target layout
    # in a fixed layout, a traced n agrees with the static N:M step
    got = _in_layout(jnp.asarray(score), jnp.asarray(perm), vi, jnp.int32(n_t), m)
    want, _ = oracle_block_mask(score, v, kv, n_t, m, row_perm=perm, vector_index=np.asarray(vi))
    np.testing.assert_array_equal(np.asarray(got), want)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1), st.sampled_from([3, 1000]))
def test_unstructured_at_a_traced_count_matches_the_oracle(count, seed, hi):
    score = np.random.default_rng(seed).integers(0, hi, size=(6, 10)).astype(np.float32)
    got = jax.jit(core.unstructured_mask_at)(jnp.asarray(score), jnp.int32(count))
    np.testing.assert_array_equal(np.asarray(got), oracle_unstructured(score, count))


@pytest.mark.parametrize("pattern", [HiNM(4, 0.5, 2, 4), HiNM(4, 0.3, 2, 4), HiNM(2, 0.7, 1, 8), VectorWise(4, 1 / 3)])
@pytest.mark.parametrize("k", [40, 64, 1000])
def test_scheduled_kept_inputs_ends_at_the_pattern_rule(pattern, k):
    """At fraction 1 the schedule gives the pattern's K_v exactly; at 0 it keeps all of K;
    in between it never drops below the target."""
    _, kv, _, m = pattern.structure(k, 8)
    assert int(core.scheduled_kept_inputs(pattern, k, 8, 1.0)) == kv
    assert int(core.scheduled_kept_inputs(pattern, k, 8, 0.0)) == k
    steps = [int(core.scheduled_kept_inputs(pattern, k, 8, f)) for f in np.linspace(0.0, 1.0, 11)]
    assert steps == sorted(steps, reverse=True) and min(steps) == kv


@pytest.mark.parametrize(
    "module",
    ["core", "masks", "format", "ops", "permute", "layers", "select", "scores", "reconstruct", "optim", "checkpoint"],
)
def test_every_module_imports_first(module):
    """No module needs another to have been imported before it (no runtime cycle)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import hinm_jax.{module}"], check=True)
