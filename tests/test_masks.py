import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hinm_jax
from hinm_jax import HSS, NM, HiNM, Unstructured, VectorWise
from hinm_jax.masks import matrix_mask
from oracle import oracle_block_mask, oracle_hss, oracle_unstructured

NMS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]


@st.composite
def block_cases(draw):
    """A random (K, O) integer score matrix (many ties) and a pattern that fits it."""
    kind = draw(st.sampled_from(["hinm", "nm", "vw"]))
    n, m = draw(st.sampled_from(NMS))
    v = draw(st.sampled_from([1, 2, 4, 8]))
    o = v * draw(st.integers(1, 4))
    k = draw(st.integers(1, 12)) * (m if kind == "nm" else 1) + (0 if kind == "nm" else draw(st.integers(m, 24)))
    s = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    pattern = {"hinm": HiNM(v, s, n, m), "nm": NM(n, m), "vw": VectorWise(v, s)}[kind]
    if pattern.fit_error(k, o):
        s = 0.0
        pattern = {"hinm": HiNM(v, s, n, m), "nm": NM(n, m), "vw": VectorWise(v, s)}[kind]
    seed = draw(st.integers(0, 2**31 - 1))
    hi = draw(st.sampled_from([3, 1000]))
    score = np.random.default_rng(seed).integers(0, hi, size=(k, o)).astype(np.float32)
    return score, pattern


@settings(max_examples=25, deadline=None)
@given(block_cases())
def test_block_masks_match_the_spec_oracle(case):
    score, pattern = case
    k, o = score.shape
    mask, layout = matrix_mask(jnp.asarray(score), pattern)
    v, kv, n, m = pattern.structure(k, o)
    want, want_vi = oracle_block_mask(score, v, kv, n, m)
    np.testing.assert_array_equal(np.asarray(layout.vector_index), want_vi)
    np.testing.assert_array_equal(np.asarray(mask), want)
    # the density is exact and the layout is the identity
    assert int(mask.sum()) == o * kv * n // m
    np.testing.assert_array_equal(np.asarray(layout.row_perm), np.arange(o))


@settings(max_examples=15, deadline=None)
@given(block_cases(), st.integers(0, 2**31 - 1))
def test_block_masks_in_a_permuted_layout(case, seed):
    """With a permutation π, blocks are π[bV:(b+1)V] (SPEC step 1)."""
    score, pattern = case
    k, o = score.shape
    perm = np.random.default_rng(seed).permutation(o).astype(np.int32)
    mask, layout = matrix_mask(jnp.asarray(score), pattern, row_perm=perm)
    v, kv, n, m = pattern.structure(k, o)
    want, want_vi = oracle_block_mask(score, v, kv, n, m, row_perm=perm)
    np.testing.assert_array_equal(np.asarray(mask), want)
    np.testing.assert_array_equal(np.asarray(layout.vector_index), want_vi)
    # and with a shuffled walk order σ, stripes follow the given order
    rng = np.random.default_rng(seed + 1)
    vi = np.stack([rng.permutation(row) for row in want_vi]).astype(np.int32)
    got = hinm_jax.masks.mask_from_layout(jnp.asarray(score), jnp.asarray(perm), jnp.asarray(vi), n, m)
    want2, _ = oracle_block_mask(score, v, kv, n, m, row_perm=perm, vector_index=vi)
    np.testing.assert_array_equal(np.asarray(got), want2)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.integers(0, 2**31 - 1))
def test_unstructured_matches_the_oracle(k, o, s, seed):
    pattern = Unstructured(s)
    if pattern.fit_error(k, o):
        return
    score = np.random.default_rng(seed).integers(0, 4, size=(k, o)).astype(np.float32)
    mask, layout = matrix_mask(jnp.asarray(score), pattern)
    assert layout is None
    np.testing.assert_array_equal(np.asarray(mask), oracle_unstructured(score, pattern.kept_count(k * o)))


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from([((3, 4), (2, 4)), ((1, 2), (2, 4)), ((2, 4),), ((1, 2), (1, 2), (3, 4))]),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_hss_matches_the_oracle(levels, groups, o, seed):
    pattern = HSS(levels)
    k = pattern.group * groups
    score = np.random.default_rng(seed).integers(0, 5, size=(k, o)).astype(np.float32)
    mask, _ = matrix_mask(jnp.asarray(score), pattern)
    np.testing.assert_array_equal(np.asarray(mask), oracle_hss(score, pattern.levels))
    assert int(mask.sum()) == round(k * o * pattern.density())


def _params(key=0):
    ks = jax.random.split(jax.random.key(key), 4)
    return {
        "mlp": {"kernel": jax.random.normal(ks[0], (256, 128)), "bias": jnp.zeros(128)},
        "conv": {"kernel": jax.random.normal(ks[1], (3, 3, 16, 64))},
        "head": {"kernel": jax.random.normal(ks[2], (128, 10))},
        "embed": {"embedding": jax.random.normal(ks[3], (50, 64))},
        "step": jnp.array(3, jnp.int32),
    }


def test_prune_selects_by_default_and_summary_says_why():
    params = _params()
    masks = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    assert masks["mlp"]["bias"] is None and masks["head"]["kernel"] is None
    assert masks["embed"]["embedding"] is None and masks["step"] is None
    assert masks["mlp"]["kernel"].mask.shape == (256, 128)
    assert float(masks["conv"]["kernel"].density) == 0.25
    s = hinm_jax.summary(params, masks, "hinm:32:0.5:2:4")
    notes = {r.path: r.note for r in s.rows}
    assert notes["head/kernel"].startswith("does not fit hinm:32:0.5:2:4: O=10")
    assert notes["embed/embedding"] == "embedding table"
    assert notes["mlp/bias"].startswith("1-d")
    assert "not floating" in notes["step"]
    assert "pruned 2 leaves" in str(s)


def test_conv_kernels_flatten_inputs_with_i_fastest():
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 64))
    mask = hinm_jax.prune({"k": w}, "hinm:32:0.5:2:4")["k"].mask
    want, _ = oracle_block_mask(np.abs(np.asarray(w)).reshape(144, 64), 32, 72, 2, 4)
    np.testing.assert_array_equal(np.asarray(mask).reshape(144, 64), want)


def test_stacked_leading_axes_are_independent_matrices():
    w = jax.random.normal(jax.random.key(2), (3, 64, 32))
    masks = hinm_jax.prune({"layers": {"kernel": w}}, "hinm:16:0.5:2:4", stack_axes=1)
    m = masks["layers"]["kernel"]
    assert m.layout.vector_index.shape == (3, 2, 32)
    for i in range(3):
        want, _ = oracle_block_mask(np.abs(np.asarray(w[i])), 16, 32, 2, 4)
        np.testing.assert_array_equal(np.asarray(m.mask[i]), want)


def test_where_pattern_dict_and_scores():
    params = _params()
    masks = hinm_jax.prune(params, {"conv": None, ".*": "2:4"}, where=r"kernel$")
    assert masks["conv"]["kernel"] is None
    assert float(masks["head"]["kernel"].density) == 0.5  # explicit: O=10 fits 2:4
    # a score pytree and a score function give the same masks as the default |W|
    scores = jax.tree.map(lambda w: jnp.abs(w) if w.ndim >= 2 else None, params)
    a = hinm_jax.prune(params, "2:4", score=scores)
    b = hinm_jax.prune(params, "2:4", score=lambda path, w: jnp.abs(w))
    c = hinm_jax.prune(params, "2:4")
    for x, y, z in zip(*(jax.tree.leaves(t) for t in (a, b, c))):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(y, z)
    # a different score gives a different mask
    d = hinm_jax.prune(params, "2:4", score=lambda path, w: -jnp.abs(w))
    assert not np.array_equal(d["mlp"]["kernel"].mask, c["mlp"]["kernel"].mask)


def test_prune_is_deterministic_and_jit_matches_eager():
    params = _params()
    eager = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    again = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    jitted = jax.jit(lambda p: hinm_jax.prune(p, "hinm:32:0.5:2:4"))(params)
    for a, b, c in zip(*(jax.tree.leaves(t) for t in (eager, again, jitted))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_apply_masks():
    params = _params()
    masks = hinm_jax.prune(params, "2:4")
    out = hinm_jax.apply_masks(params, masks)
    np.testing.assert_array_equal(out["mlp"]["kernel"], params["mlp"]["kernel"] * masks["mlp"]["kernel"].mask)
    assert out["mlp"]["bias"] is params["mlp"]["bias"]
    assert float((out["mlp"]["kernel"] == 0).mean()) == 0.5


def test_bad_inputs_name_the_path_shape_and_pattern():
    params = _params()
    with pytest.raises(ValueError, match=r"head/kernel: shape=\(128, 10\) does not fit pattern hinm:32:0.5:2:4: O=10"):
        hinm_jax.prune(params, "hinm:32:0.5:2:4", where=lambda path, w: path.endswith("kernel"))
    with pytest.raises(ValueError, match=r"mlp/bias: shape=\(128,\) pattern 2:4: cannot prune: 1-d"):
        hinm_jax.prune(params, "2:4", where=r"mlp")
    with pytest.raises(ValueError, match=r"mlp/kernel: shape=\(256, 128\) but its score has shape \(128, 256\)"):
        hinm_jax.prune(params, "2:4", where="mlp/kernel", score=lambda path, w: w.T)
    with pytest.raises(ValueError, match="not understood"):
        hinm_jax.prune(params, "2-4")
    masks = hinm_jax.prune(params, "2:4")
    with pytest.raises(ValueError, match="only in masks"):
        hinm_jax.apply_masks({"mlp": params["mlp"]}, masks)
    bad = dict(params, mlp={"kernel": params["mlp"]["kernel"][:128], "bias": params["mlp"]["bias"]})
    with pytest.raises(ValueError, match=r"mlp/kernel: shape=\(128, 128\) but its mask \(2:4\) has shape \(256, 128\)"):
        hinm_jax.apply_masks(bad, masks)


def test_permutation_search_needs_a_key():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
    with pytest.raises(ValueError, match="permute='2cp' needs key="):
        hinm_jax.prune(params, "hinm:16:0.5:2:4", permute="2cp")


@pytest.mark.parametrize("stack_axes", [1.7, "1", True])
def test_stack_axes_must_be_an_int(stack_axes):
    params = {"w": jnp.ones((2, 64, 32))}
    with pytest.raises(TypeError, match=r"w: stack_axes="):
        hinm_jax.prune(params, "2:4", stack_axes=stack_axes)


def test_score_function_must_return_an_array():
    params = {"w": jnp.ones((64, 32))}
    with pytest.raises(TypeError, match="w: shape=\\(64, 32\\): its score is a list"):
        hinm_jax.prune(params, "2:4", score=lambda path, leaf: [1.0])


def test_import_is_light():
    """``import hinm_jax`` loads neither flax, optax, scipy, orbax nor tqdm; they load
    with the parts that use them, and flax serialization still knows hinm_jax's types."""
    import subprocess
    import sys

    code = (
        "import sys, hinm_jax\n"
        "heavy = [m for m in ('flax', 'optax', 'scipy', 'orbax', 'tqdm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "hinm_jax.optim, hinm_jax.layers, hinm_jax.efficacy\n"
        "assert 'optax' in sys.modules and 'flax' in sys.modules and 'scipy' in sys.modules\n"
        "from flax import serialization\n"
        "p = {'w': hinm_jax.patterns.HiNM(16, 0.5).spec}\n"
        "m = hinm_jax.prune({'w': __import__('jax').numpy.ones((64, 32))}, '2:4')\n"
        "assert serialization.to_state_dict(m)['w']['mask'].shape == (64, 32)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
