"""Bad inputs to the core API (issue #16): no crash, nothing silently wrong, errors that
name the argument, the path, the shape and the pattern. Checkpoints and PyTorch interop
are in ``test_bad_inputs_io.py``."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hinm_jax
from hinm_jax import optim, permute
from hinm_jax.core import Layout, check_layout
from hinm_jax.patterns import HSS, NM, HiNM, Unstructured, VectorWise, parse_pattern

PATTERN = HiNM(8, 0.5, 2, 4)
WHERE = "w: shape=(32, 32) pattern hinm:8:0.5:2:4"


def _normal(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _pruned(shape=(32, 32), pattern=PATTERN, seed=0):
    w = _normal(shape, seed)
    return w, hinm_jax.prune({"w": w}, pattern)["w"]


def _with_layout(mask, **change):
    return dataclasses.replace(mask, layout=dataclasses.replace(mask.layout, **change))


# ---------------------------------------------------------------------------------------
# Done in the restructure: verified here
# ---------------------------------------------------------------------------------------


def test_spec_round_trip_pattern_types_permute_key_and_one_score():
    for s in (1 / 3, 2 / 3, 1 / 7, 0.123456789, 0.9999999):
        for p in (HiNM(64, s), VectorWise(32, s), Unstructured(s)):
            assert parse_pattern(p.spec) == p
    for levels in (((2.5, 4),), ((True, 4),), (("2", "4"),)):
        with pytest.raises(TypeError, match="levels="):
            HSS(levels)
    with pytest.raises(TypeError, match="vector_sparsity='0.5'"):
        HiNM(64, "0.5")
    w = _normal((32, 32))
    with pytest.raises(ValueError, match="permute='2cp' needs key="):
        hinm_jax.prune({"w": w}, PATTERN, permute="2cp")
    # score= means the same everywhere: a pytree or a function, checked per path.
    score = {"w": -jnp.abs(w)}
    by_tree = hinm_jax.prune({"w": w}, PATTERN, score=score)["w"].mask
    by_fn = hinm_jax.prune({"w": w}, PATTERN, score=lambda path, leaf: score[path])["w"].mask
    assert np.array_equal(by_tree, by_fn)
    again = optim.refresh({"w": w}, {"w": hinm_jax.prune({"w": w}, PATTERN)["w"]}, score=score, mode="vector")
    assert np.array_equal(again["w"].mask, by_tree)
    with pytest.raises(TypeError, match=r"w: shape=\(32, 32\): its score is a list"):
        hinm_jax.prune({"w": w}, PATTERN, score=lambda path, leaf: [[1.0]])


# ---------------------------------------------------------------------------------------
# 1. The permutation search: no crash without input-vector rounds; Budget checked
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, pattern", [("2cp", HiNM(16, 0.5)), ("ivp", HiNM(16, 0.5)), ("ivp", NM(2, 4))])
def test_search_without_input_vector_rounds(method, pattern):
    score = jnp.abs(_normal((64, 64)))
    layout = permute.search(score, pattern, method, key=jax.random.key(0), ivp_rounds=0)
    check_layout(layout, pattern, (64, 64))
    assert permute.efficacy(score, pattern, layout) >= 0.0
    w = _normal((128, 128))
    masks = hinm_jax.prune(
        {"w": w}, HiNM(32, 0.5), permute="2cp", key=jax.random.key(0),
        permute_options={"time_limit": 1e-6, "progress": False},
    )  # the time runs out before the first input-vector round
    assert float(masks["w"].density) == 0.25
    hinm_jax.compress({"w": w}, masks)


def test_budget_fields_are_checked():
    with pytest.raises(TypeError, match="Budget: ocp_perturb='a': must be a number"):
        permute.Budget(ocp_perturb="a")
    with pytest.raises(TypeError, match="Budget: ivp_rounds=1.5: must be an int >= 0"):
        permute.Budget(ivp_rounds=1.5)
    with pytest.raises(TypeError, match="Budget: batch=True"):
        permute.Budget(batch=True)
    with pytest.raises(TypeError, match="Budget: time_limit='1'"):
        permute.Budget(time_limit="1")
    with pytest.raises(TypeError, match="Budget: scale=1"):
        permute.Budget(scale=1)
    with pytest.raises(ValueError, match="Budget: ocp_group=0: must be an int >= 1"):
        permute.Budget(ocp_group=0)
    with pytest.raises(ValueError, match=r"Budget: ocp_perturb=1.5: must be in \[0, 1\]"):
        permute.Budget(ocp_perturb=1.5)
    assert permute.Budget(ivp_rounds=0, time_limit=2).ivp_rounds == 0


# ---------------------------------------------------------------------------------------
# 2. Paths: a key with "/" never collides silently with nested keys
# ---------------------------------------------------------------------------------------


def test_colliding_paths_raise_naming_both():
    w = _normal((32, 32))
    params = {"a/b": {"weight": w}, "a": {"b": {"weight": w[:, :16]}}}
    with pytest.raises(ValueError, match=r"^a/b/weight: two leaves of params have this path") as info:
        hinm_jax.prune(params, PATTERN)
    assert "['a/b']['weight']" in str(info.value) and "['a']['b']['weight']" in str(info.value)
    mixed = {"a/b": {"weight": jnp.ones((32, 32), jnp.int32)}, "a": {"b": {"weight": w}}}
    with pytest.raises(ValueError, match="a/b/weight: two leaves"):
        hinm_jax.prune(mixed, PATTERN)
    with pytest.raises(ValueError, match="a/b/weight: two leaves"):
        hinm_jax.named_leaves(mixed)
    # A "/" in a key is fine when it collides with nothing: the path is the keys joined.
    masks = hinm_jax.prune({"a/b": {"weight": w}}, PATTERN, where="^a/b/weight$")
    assert list(hinm_jax.named_leaves(masks)) == ["a/b/weight"]


# ---------------------------------------------------------------------------------------
# 3. Every pattern keeps exactly its density, whatever the scores
# ---------------------------------------------------------------------------------------

DENSITY_PATTERNS = [HSS(((2, 4), (2, 4))), HSS(((1, 2),)), HiNM(8, 0.5), NM(2, 4), VectorWise(8, 0.5), Unstructured(0.75)]


def test_hss_with_inf_and_nan_keeps_its_density():
    score = np.ones((16, 1), np.float32)
    score[:4, 0] = [np.inf, np.nan, np.nan, np.nan]
    pattern = HSS(((2, 4), (2, 4)))
    mask = hinm_jax.prune({"w": jnp.ones((16, 1))}, pattern, score={"w": jnp.asarray(score)}, where="w")["w"].mask
    assert int(mask.sum()) == 4 and bool(mask[0, 0])  # 2 of 4 groups, 2 of 4 in each; +inf kept
    s = np.array(_normal((64, 32)))
    s[::3, ::2] = np.nan
    s[1::5] = np.inf
    s[2::7] = -np.inf
    params = {"w": jnp.ones((64, 32))}
    masks = hinm_jax.prune(params, pattern, score={"w": jnp.asarray(s)})
    assert float(masks["w"].density) == 0.25
    new = optim.refresh(params, masks, score={"w": jnp.asarray(s[::-1].copy())})
    assert float(new["w"].density) == 0.25


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(DENSITY_PATTERNS),
    seed=st.integers(0, 2**16),
    special=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38]), min_size=1, max_size=4),
    fraction=st.floats(0.0, 1.0),
)
def test_any_scores_keep_exactly_the_density(pattern, seed, special, fraction):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((64, 32)).astype(np.float32)
    hit = rng.random(s.shape) < fraction
    s[hit] = rng.choice(np.asarray(special, np.float32), int(hit.sum()))
    mask = hinm_jax.prune({"w": jnp.ones((64, 32))}, pattern, score={"w": jnp.asarray(s)}, where="w")["w"]
    assert float(mask.density) == pytest.approx(pattern.density(64, 32), abs=1e-7)
    assert float(optim.refresh({"w": jnp.asarray(s)}, {"w": mask})["w"].density) == pytest.approx(
        pattern.density(64, 32), abs=1e-7
    )


# ---------------------------------------------------------------------------------------
# 4. One validation of a Layout / SparseWeight; damaged ones never give a wrong product
# ---------------------------------------------------------------------------------------


def test_compress_and_validate_refuse_broken_layouts_and_fields():
    w, mask = _pruned()
    rp = mask.layout.row_perm
    broken = {
        "not a permutation": (_with_layout(mask, row_perm=rp.at[0].set(rp[1])), "row_perm is not a permutation"),
        "block dropped": (
            _with_layout(mask, vector_index=mask.layout.vector_index[:-1]),
            r"vector_index has shape \(3, 16\), expected \(4, 16\) \(layout shapes",
        ),
        "float row_perm": (_with_layout(mask, row_perm=rp.astype(jnp.float32)), "row_perm has dtype float32, expected int32"),
        "float mask": (dataclasses.replace(mask, mask=mask.mask.astype(jnp.float32)), "mask has dtype float32, expected bool"),
        "out of range": (
            _with_layout(mask, vector_index=mask.layout.vector_index.at[0, 0].set(40)),
            r"vector_index has entries outside 0..31",
        ),
    }
    for what, (bad, message) in broken.items():
        with pytest.raises(ValueError, match=re.escape(WHERE) + ".*" + message):
            hinm_jax.compress({"w": w}, {"w": bad})
    with pytest.raises(TypeError, match=re.escape("w: shape=(32, 32): expected a hinm_jax.Mask") + ".*got ArrayImpl"):
        hinm_jax.compress({"w": w}, {"w": mask.mask})
    sw = hinm_jax.compress({"w": w}, {"w": mask})["w"]
    for field, value, message in (
        ("row_perm", sw.row_perm.at[3].set(sw.row_perm[0]), "row_perm is not a permutation"),
        ("vector_index", sw.vector_index.at[1, 2].set(-1), "vector_index has entries outside"),
        ("metadata", sw.metadata ^ jnp.uint32(1 << 31), "metadata"),
    ):
        bad = dataclasses.replace(sw, **{field: value})
        with pytest.raises(ValueError, match=re.escape(WHERE) + ".*" + message):
            bad.validate("w")
        with pytest.raises(ValueError, match=message):
            hinm_jax.sparse_matmul(jnp.ones((2, 32)), bad)
        with pytest.raises(ValueError, match="layer/w: shape=.*" + message):
            hinm_jax.pack_for({"layer": {"w": bad}}, "xla")
        # Concrete fields closed over by a traced function are checked too.
        with pytest.raises(ValueError, match=message):
            jax.jit(lambda x: hinm_jax.sparse_matmul(x, bad, implementation="xla"))(jnp.ones((2, 32)))
    with pytest.raises(ValueError, match=re.escape(WHERE) + ".*row_perm is not a permutation"):
        jax.jit(lambda: hinm_jax.compress({"w": w}, {"w": broken["not a permutation"][0]}))()


def _oracle_dense(sw):
    """``W * mask`` decoded field by field with loops, or ``None`` when the fields are not
    a valid compressed weight (independent of ``SparseWeight.validate``)."""
    values, meta = np.asarray(sw.values), np.asarray(sw.metadata)
    vi, rp = np.asarray(sw.vector_index), np.asarray(sw.row_perm)
    (k, o), (v, kv, n, m) = sw.matrix_shape, PATTERN.structure(*sw.matrix_shape)
    if sorted(rp.tolist()) != list(range(o)) or vi.min() < 0 or vi.max() >= k:
        return None
    if any(len(set(row.tolist())) != kv for row in vi):
        return None
    dense = np.zeros((k, o), np.float32)
    nnz = values.shape[1]
    for r in range(o):
        fields = [(int(meta[r, j // 16]) >> (2 * (j % 16))) & 3 for j in range(16 * meta.shape[1])]
        if any(fields[nnz:]):
            return None  # padding bits set
        for j in range(nnz):
            stripe, pos = divmod(j, n)
            if j % n and fields[j] <= fields[j - 1]:
                return None  # positions must ascend inside a stripe
            dense[vi[r // v, stripe * m + fields[j]], rp[r]] = values[r, j]
    return dense


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["row_perm", "vector_index", "metadata", "values", "swap_rows", "swap_inputs"]),
    i=st.integers(0, 10**6),
    j=st.integers(0, 10**6),
    value=st.integers(-3, 40),
    word=st.integers(0, 2**32 - 1),
)
def test_damaged_fields_never_give_a_silently_wrong_product(field, i, j, value, word):
    w, mask = _pruned(seed=1)
    sw = hinm_jax.compress({"w": w}, {"w": mask})["w"]
    vi, rp = np.asarray(sw.vector_index), np.asarray(sw.row_perm)
    if field == "row_perm":
        rp = rp.copy()
        rp[i % 32] = value
    elif field == "swap_rows":
        rp = rp.copy()
        rp[[i % 32, j % 32]] = rp[[j % 32, i % 32]]
    elif field == "vector_index":
        vi = vi.copy()
        vi[i % 4, j % 16] = value
    elif field == "swap_inputs":
        vi = vi.copy()
        vi[i % 4, [j % 16, (j // 16) % 16]] = vi[i % 4, [(j // 16) % 16, j % 16]]
    damaged = dataclasses.replace(sw, row_perm=jnp.asarray(rp), vector_index=jnp.asarray(vi))
    if field == "metadata":
        damaged = dataclasses.replace(sw, metadata=sw.metadata.at[i % 32, 0].set(jnp.uint32(word)))
    if field == "values":
        damaged = dataclasses.replace(sw, values=sw.values.at[i % 32, j % 8].set(float(value)))
    x = _normal((3, 32), seed=2)
    want = _oracle_dense(damaged)
    try:
        got = hinm_jax.sparse_matmul(x, damaged, implementation="xla")
    except ValueError as e:
        assert "w: shape=(32, 32) pattern hinm:8:0.5:2:4" in str(e)
        assert want is None, f"a valid weight was refused: {e}"
        return
    assert want is not None, "a damaged weight gave a product with no error"
    np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ want, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["row_perm", "vector_index", "swap_rows", "swap_inputs"]),
    i=st.integers(0, 10**6),
    j=st.integers(0, 10**6),
    value=st.integers(-3, 40),
)
def test_damaged_layouts_never_compress_to_a_wrong_weight(field, i, j, value):
    w, mask = _pruned(seed=3)
    vi, rp = np.array(mask.layout.vector_index), np.array(mask.layout.row_perm)
    if field == "row_perm":
        rp[i % 32] = value
    elif field == "swap_rows":
        rp[[i % 32, j % 32]] = rp[[j % 32, i % 32]]
    elif field == "vector_index":
        vi[i % 4, j % 16] = value
    else:
        vi[i % 4, [j % 16, (j // 16) % 16]] = vi[i % 4, [(j // 16) % 16, j % 16]]
    damaged = _with_layout(mask, row_perm=jnp.asarray(rp), vector_index=jnp.asarray(vi))
    try:
        sw = hinm_jax.compress({"w": w}, {"w": damaged})["w"]
    except ValueError as e:
        assert WHERE in str(e)
        return
    assert np.array_equal(np.asarray(sw.densify()), np.asarray(w * mask.mask))


def test_layout_check_is_shared():
    w, mask = _pruned()
    bad = Layout(mask.layout.row_perm.at[0].set(1), mask.layout.vector_index)
    with pytest.raises(ValueError, match=re.escape("enc/q: shape=(32, 32) pattern hinm:8:0.5:2:4: layout row_perm")):
        check_layout(bad, PATTERN, (32, 32), path="enc/q")
    with pytest.raises(TypeError, match="layout must be a hinm_jax.core.Layout, got tuple"):
        check_layout(tuple(bad.__dict__.values()), PATTERN, (32, 32))
    with pytest.raises(ValueError, match="enc/q: .*row_perm is not a permutation"):
        dataclasses.replace(mask, layout=bad).validate("enc/q")
    with pytest.raises(ValueError, match="w: .*row_perm is not a permutation"):
        hinm_jax.apply_masks({"w": w}, {"w": dataclasses.replace(mask, layout=bad)})


# ---------------------------------------------------------------------------------------
# 5. SR-STE strength
# ---------------------------------------------------------------------------------------


def test_sr_ste_must_be_a_finite_number():
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=re.escape(f"sr_ste={bad!r}: λ must be a finite number >= 0")):
            optim.sparsify(optax.sgd(0.1), PATTERN, sr_ste=bad)
    with pytest.raises(TypeError, match="sr_ste='yes': expected True, False or a float"):
        optim.sparsify(optax.sgd(0.1), PATTERN, sr_ste="yes")
    optim.sparsify(optax.sgd(0.1), PATTERN, sr_ste=np.float32(1e-4))


# ---------------------------------------------------------------------------------------
# 6. reconstruct: masks must have the params' structure
# ---------------------------------------------------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.relu(nn.Dense(32)(x)))


def test_reconstruct_refuses_masks_of_another_structure():
    from hinm_jax import reconstruct as rc

    x = _normal((8, 32))
    params = _MLP().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"masks and params have different structures \(\['X'\] only in masks"):
        rc.reconstruct(_MLP(), params, {"X": None}, [x])
    masks = hinm_jax.prune(params, PATTERN)
    extra = {**masks, "Dense_9": {"kernel": masks["Dense_0"]["kernel"]}}
    with pytest.raises(ValueError, match=r"\['Dense_9/kernel'\] only in masks"):
        rc.reconstruct(_MLP(), params, extra, [x])


# ---------------------------------------------------------------------------------------
# 7. efficacy, stack_axes, "ocp" on a single block
# ---------------------------------------------------------------------------------------


def test_efficacy_stack_axes_and_single_block_ocp():
    w, mask = _pruned()
    score = jnp.abs(w)
    with pytest.raises(ValueError, match=re.escape("layout: shape=(32, 32) pattern hinm:8:0.5:2:4: layout row_perm is not")):
        permute.efficacy(score, PATTERN, Layout(jnp.zeros(32, jnp.int32), mask.layout.vector_index))
    for bad in (1.7, "1", True):
        with pytest.raises(TypeError, match=re.escape(f"w: stack_axes={bad!r}: expected an int")):
            hinm_jax.prune({"w": w}, PATTERN, stack_axes=bad)
    for pattern in (HiNM(32, 0.5), NM(2, 4)):
        with pytest.raises(ValueError, match=r"score: shape=\(32, 32\) pattern .*method='ocp' .* single block"):
            permute.search(score, pattern, "ocp", key=jax.random.key(0))
    with pytest.raises(ValueError, match="single block of vector_size=32 and no N:M step"):
        permute.search(score, VectorWise(32, 0.5), "2cp", key=jax.random.key(0))


# ---------------------------------------------------------------------------------------
# Confusing errors rewritten
# ---------------------------------------------------------------------------------------


def test_wrong_gradients_bias_and_score_pytree_in_training():
    w = _normal((32, 32))
    params = {"w": w}
    tx = optim.sparsify(optax.sgd(0.1), PATTERN, score={"w": jnp.abs(w)}, refresh_every=1)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"w": jnp.ones((32, 32))}, state, params)  # refresh with a score pytree
    assert float(optim.get_masks(state)["w"].density) == 0.25
    with pytest.raises(ValueError, match=re.escape("w: shape=(32, 32) pattern hinm:8:0.5:2:4: its gradient has shape (32, 16)")):
        tx.update({"w": jnp.ones((32, 16))}, state, params)
    sw = hinm_jax.compress(params, optim.get_masks(state))["w"]
    with pytest.raises(ValueError, match=re.escape("bias: shape=(16,) does not match w: shape=(32, 32) (O=32) pattern hinm:8:0.5:2:4")):
        hinm_jax.sparse_matmul(jnp.ones((2, 32)), sw, bias=jnp.ones(16))


# ---------------------------------------------------------------------------------------
# float64 numpy leaves (interop.from_torch without x64): kept or refused, never narrowed
# ---------------------------------------------------------------------------------------


def test_float64_numpy_leaves_keep_their_dtype_or_raise():
    if jax.config.jax_enable_x64:
        pytest.skip("x64 on: jax keeps float64 itself")
    w = np.random.default_rng(0).standard_normal((32, 32))  # float64
    masks = hinm_jax.prune({"w": w}, PATTERN)
    out = hinm_jax.apply_masks({"w": w}, masks)["w"]
    assert out.dtype == np.float64 and np.array_equal(out, np.where(np.asarray(masks["w"].mask), w, 0.0))
    with pytest.raises(TypeError, match=re.escape("w: shape=(32, 32) dtype float64: compress would compute it in float32")):
        hinm_jax.compress({"w": w}, masks)
    with pytest.raises(TypeError, match="w: shape=.*dtype float64: ste_apply"):
        hinm_jax.ste_apply({"w": w}, masks)
    hinm_jax.compress({"w": w.astype(np.float32)}, masks)  # a float32 numpy leaf is fine
