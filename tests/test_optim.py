import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import hinm_jax
from hinm_jax import HSS, NM, HiNM, Unstructured, VectorWise, optim
from hinm_jax.masks import mask_from_layout, matrix_mask
from oracle import oracle_block_mask, oracle_unstructured


def _params(seed=0, k=64, o=32):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    return {
        "hidden": {"kernel": jax.random.normal(k0, (k, o)), "bias": jnp.zeros(o)},
        "out": {"kernel": jax.random.normal(k1, (o, o)), "bias": jax.random.normal(k2, (o,))},
    }


def _forward(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


PATTERN = HiNM(16, 0.5, 2, 4)


# ---------------------------------------------------------------------------------------
# Straight-through masks
# ---------------------------------------------------------------------------------------


def test_ste_forward_is_masked_and_gradient_is_the_analytic_straight_through_one():
    kx, ky, kw = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(kw, (64, 32))
    x = jax.random.normal(kx, (8, 64))
    y = jax.random.normal(ky, (8, 32))
    params = {"w": w, "b": jnp.ones(32)}
    masks = hinm_jax.prune(params, PATTERN)
    mk = masks["w"].mask
    assert masks["b"] is None

    sparse = optim.ste_apply(params, masks)
    np.testing.assert_array_equal(sparse["w"], jnp.where(mk, w, 0.0))
    np.testing.assert_array_equal(sparse["b"], params["b"])

    def loss(p):
        q = optim.ste_apply(p, masks)
        r = x @ q["w"] + q["b"] - y
        return 0.5 * jnp.sum(r**2)

    g = jax.grad(loss)(params)
    r = x @ (w * mk) + 1.0 - y
    # dL/dW of the straight-through estimator: dL/d(W*M), every entry, pruned included
    np.testing.assert_allclose(g["w"], x.T @ r, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g["b"], r.sum(0), rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(g["w"][~mk]).max()) > 0  # pruned weights get gradient
    # not the masked gradient and not the dense model's gradient
    dense_g = x.T @ (x @ w + 1.0 - y)
    assert not np.allclose(g["w"], dense_g, atol=1e-3)

    # forward mode agrees: the tangent passes straight through
    t = jax.random.normal(jax.random.key(2), w.shape)
    out, tangent = jax.jvp(lambda a: optim.ste_apply({"w": a, "b": params["b"]}, masks)["w"], (w,), (t,))
    np.testing.assert_array_equal(out, w * mk)
    np.testing.assert_array_equal(tangent, t)


def test_ste_apply_checks_structure_and_shapes():
    params = _params()
    masks = hinm_jax.prune(params, PATTERN)
    with pytest.raises(ValueError, match="masks and params have different structures"):
        optim.ste_apply({"hidden": params["hidden"]}, masks)
    bad = dict(params, hidden=dict(params["hidden"], kernel=jnp.ones((32, 32))))
    with pytest.raises(ValueError, match=r"hidden/kernel: shape=\(32, 32\)"):
        optim.ste_apply(bad, masks)


# ---------------------------------------------------------------------------------------
# SR-STE and the state
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sr_ste, lam", [(True, 2e-4), (0.01, 0.01), (False, 0.0)])
def test_sr_ste_adds_lambda_times_pruned_weights(sr_ste, lam):
    params = _params()
    tx = optim.sparsify(optax.identity(), PATTERN, sr_ste=sr_ste)
    state = tx.init(params)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.5), params)
    updates, _ = tx.update(grads, state, params)
    mk = optim.get_masks(state)["hidden"]["kernel"].mask
    w = params["hidden"]["kernel"]
    np.testing.assert_allclose(updates["hidden"]["kernel"], 0.5 + lam * jnp.where(mk, 0.0, w), rtol=1e-6)
    # leaves without a mask (biases) pass through
    np.testing.assert_array_equal(updates["hidden"]["bias"], grads["hidden"]["bias"])
    assert optim.SR_STE_LAMBDA == 2e-4


def test_masks_live_in_the_state_and_are_readable_with_tree_get():
    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optim.sparsify(optax.adam(1e-3), PATTERN))
    state = tx.init(params)
    want = hinm_jax.prune(params, PATTERN)
    got = optax.tree_utils.tree_get(state, "masks")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert optim.get_masks(state) is got
    # replace them
    other = hinm_jax.prune(params, "2:4")
    state2 = optim.set_masks(state, other)
    assert optim.get_masks(state2)["hidden"]["kernel"].pattern == NM(2, 4)
    with pytest.raises(ValueError, match="no SparsityState"):
        optim.get_masks(optax.adam(1e-3).init(params))


def test_precomputed_masks_are_checked_against_params():
    params = _params()
    masks = hinm_jax.prune(params, PATTERN)
    tx = optim.sparsify(optax.sgd(0.1), masks=masks)
    assert optim.get_masks(tx.init(params)) is not None
    bad = jax.tree.map(lambda a: jnp.ones((a.shape[0] * 2,) + a.shape[1:]), params)
    with pytest.raises(ValueError, match=r"hidden/kernel: shape=\(128, 32\)"):
        tx.init(bad)


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of pattern"):
        optim.sparsify(optax.sgd(1.0))
    with pytest.raises(ValueError, match="schedule needs refresh_every"):
        optim.sparsify(optax.sgd(1.0), PATTERN, schedule=optim.gradual(10))
    with pytest.raises(ValueError, match="refresh_every=0"):
        optim.sparsify(optax.sgd(1.0), PATTERN, refresh_every=0)
    with pytest.raises(ValueError, match="refresh_mode='x'"):
        optim.sparsify(optax.sgd(1.0), PATTERN, refresh_mode="x")
    with pytest.raises(ValueError, match="sr_ste=-1"):
        optim.sparsify(optax.sgd(1.0), PATTERN, sr_ste=-1.0)
    with pytest.raises(ValueError, match="vector_steps=0"):
        optim.gradual(0)
    params = _params()
    tx = optim.sparsify(optax.sgd(1.0), PATTERN, sr_ste=True)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    tx = optim.sparsify(optax.sgd(1.0), HSS(((1, 2), (2, 4))), refresh_every=2, schedule=optim.gradual(4))
    with pytest.raises(ValueError, match="HSS has no gradual schedule"):
        tx.init(params)


# ---------------------------------------------------------------------------------------
# Refresh under one jit
# ---------------------------------------------------------------------------------------


def _train_step(tx, traces):
    x = jax.random.normal(jax.random.key(5), (16, 64))
    y = jax.random.normal(jax.random.key(6), (16, 32))

    def step(params, state):
        traces.append(1)
        masks = optim.get_masks(state)
        loss = lambda p: jnp.mean((_forward(optim.ste_apply(p, masks), x) - y) ** 2)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step), step


@pytest.mark.parametrize("mode", ["nm", "vector"])
def test_refresh_every_k_steps_inside_one_jit(mode):
    k = 3
    tx = optim.sparsify(optax.sgd(2.0), PATTERN, sr_ste=True, refresh_every=k, refresh_mode=mode)
    params = _params()
    state = tx.init(params)
    traces = []
    step, raw = _train_step(tx, traces)
    jaxpr = str(jax.make_jaxpr(raw)(params, state))
    assert "cond[" in jaxpr and "callback" not in jaxpr
    initial = optim.get_masks(state)["hidden"]["kernel"]
    changed = False
    for t in range(1, 8):
        prev = optim.get_masks(state)["hidden"]["kernel"]
        params, state = step(params, state)
        got = optim.get_masks(state)["hidden"]["kernel"]
        assert int(state.count) == t
        if t % k:
            np.testing.assert_array_equal(got.mask, prev.mask)
            continue
        w = params["hidden"]["kernel"]
        if mode == "nm":  # the layout is kept, N:M re-chosen on the current weights
            lay = initial.layout
            want = mask_from_layout(jnp.abs(w), lay.row_perm, lay.vector_index, 2, 4)
            np.testing.assert_array_equal(got.layout.vector_index, lay.vector_index)
        else:  # vector step redone too
            want = hinm_jax.prune({"w": w}, PATTERN)["w"].mask
        np.testing.assert_array_equal(got.mask, want)
        changed |= bool(jnp.any(got.mask != prev.mask))
    assert changed, "the weights moved enough for a refresh to change the mask"
    assert len(traces) == 1  # one trace, one compiled step


def test_refresh_keeps_a_permuted_layout():
    w = jax.random.normal(jax.random.key(3), (64, 32))
    perm = np.random.default_rng(0).permutation(32).astype(np.int32)
    mask, layout = matrix_mask(jnp.abs(w), PATTERN, row_perm=perm)
    sigma = jnp.flip(layout.vector_index, axis=-1)  # a different walk order
    mask = mask_from_layout(jnp.abs(w), layout.row_perm, sigma, 2, 4)
    masks = {"w": hinm_jax.Mask(mask, hinm_jax.Layout(layout.row_perm, sigma), PATTERN)}
    w2 = w + 0.3 * jax.random.normal(jax.random.key(4), w.shape)
    new = optim.refresh({"w": w2}, masks)["w"]
    np.testing.assert_array_equal(new.layout.row_perm, perm)
    np.testing.assert_array_equal(new.layout.vector_index, sigma)
    np.testing.assert_array_equal(new.mask, mask_from_layout(jnp.abs(w2), perm, sigma, 2, 4))
    new = optim.refresh({"w": w2}, masks, mode="vector")["w"]
    want, want_vi = oracle_block_mask(np.abs(np.asarray(w2)), 16, 32, 2, 4, row_perm=perm)
    np.testing.assert_array_equal(new.mask, want)
    np.testing.assert_array_equal(new.layout.vector_index, want_vi)
    np.testing.assert_array_equal(new.layout.row_perm, perm)


def test_refresh_of_stacked_and_unstructured_leaves():
    w = jax.random.normal(jax.random.key(7), (3, 64, 32))
    u = jax.random.normal(jax.random.key(8), (16, 16))
    params = {"stack": w, "u": u}
    masks = hinm_jax.prune(
        params, {"stack": PATTERN, "u": Unstructured(0.75)}, stack_axes=lambda p, leaf: 1 if p == "stack" else 0
    )
    w2, u2 = -2.0 * w[:, ::-1], u[::-1]
    new = optim.refresh({"stack": w2, "u": u2}, masks, mode="vector")
    want = hinm_jax.prune(
        {"stack": w2, "u": u2},
        {"stack": PATTERN, "u": Unstructured(0.75)},
        stack_axes=lambda p, leaf: 1 if p == "stack" else 0,
    )
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Gradual sparsity
# ---------------------------------------------------------------------------------------


def _densities(tx, params, steps):
    """Density of hidden/kernel after init and after each step (weights fixed: lr 0)."""
    state = jax.jit(tx.init)(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    out = [float(optim.get_masks(state)["hidden"]["kernel"].density)]
    for _ in range(steps):
        _, state = update(zero, state, params)
        out.append(float(optim.get_masks(state)["hidden"]["kernel"].density))
    return out, state


def test_gradual_vector_ramp_then_nm_switches_on():
    params = _params()
    sched = optim.gradual(8, begin=2, nm_steps=2)
    tx = optim.sparsify(optax.sgd(0.0), PATTERN, refresh_every=1, schedule=sched)
    dens, state = _densities(tx, params, 14)
    # dense until the ramp begins, then the vector level falls to 1/2 (N:M off), then
    # 4:4 -> 3:4 -> 2:4
    assert dens[:3] == [1.0, 1.0, 1.0]
    ramp = dens[2:11]
    assert all(a >= b for a, b in zip(ramp, ramp[1:])) and len(set(ramp)) > 3
    assert dens[10] == 0.5 and dens[11] == 0.375 and dens[12:] == [0.25] * 3
    # each intermediate mask is vector-wise: a block's channels keep the same inputs
    mid = optim.refresh(params, optim.get_masks(state), schedule=sched, step=6)["hidden"]["kernel"].mask
    blocks = np.asarray(mid).reshape(64, 2, 16)
    assert (blocks == blocks[:, :, :1]).all()
    # at the end: exactly the one-shot mask and layout
    final = optim.get_masks(state)["hidden"]["kernel"]
    want = hinm_jax.prune(params, PATTERN)["hidden"]["kernel"]
    np.testing.assert_array_equal(final.mask, want.mask)
    np.testing.assert_array_equal(final.layout.vector_index, want.layout.vector_index)


def test_any_optax_schedule_drives_the_levels():
    params = _params()
    sched = optim.SparsitySchedule(vector=optax.linear_schedule(0.0, 1.0, 4), nm=optax.linear_schedule(0.0, 1.0, 4))
    tx = optim.sparsify(optax.sgd(0.0), PATTERN, refresh_every=2, schedule=sched, refresh_mode="vector")
    dens, _ = _densities(tx, params, 5)
    # refreshes at steps 2 and 4 only; K=64: f=0.5 keeps 48 inputs (s=0.25) at 3:4
    assert dens == [1.0, 1.0, 48 / 64 * 3 / 4, 48 / 64 * 3 / 4, 0.25, 0.25]

    nm_only = optim.sparsify(
        optax.sgd(0.0), NM(2, 8), refresh_every=1, schedule=optim.SparsitySchedule(nm=optax.linear_schedule(0.0, 1.0, 6))
    )
    dens, _ = _densities(nm_only, params, 6)
    assert dens == [1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8]

    un = optim.sparsify(
        optax.sgd(0.0), Unstructured(0.5), refresh_every=1, schedule=optim.SparsitySchedule(vector=optax.linear_schedule(0.0, 1.0, 2))
    )
    dens, _ = _densities(un, params, 2)
    assert dens == [1.0, 0.75, 0.5]

    vw = optim.sparsify(optax.sgd(0.0), VectorWise(16, 0.5), refresh_every=1, schedule=optim.gradual(2))
    dens, state = _densities(vw, params, 3)
    assert dens[0] == 1.0 and dens[-1] == 0.5
    np.testing.assert_array_equal(
        optim.get_masks(state)["hidden"]["kernel"].mask, hinm_jax.prune(params, VectorWise(16, 0.5))["hidden"]["kernel"].mask
    )


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


def test_sparse_training_recovers_a_sparse_teacher_and_compresses():
    """Linear regression on a HiNM-sparse teacher from a dense random start: STE + SR-STE
    + refresh finds the teacher's support; the final params are exactly sparse and
    compress to the same function."""
    kw, kx, ks = jax.random.split(jax.random.key(11), 3)
    w_true = jax.random.normal(kw, (64, 32))
    w_true = hinm_jax.apply_masks({"w": w_true}, hinm_jax.prune({"w": w_true}, PATTERN))["w"]
    x = jax.random.normal(kx, (256, 64))
    y = x @ w_true
    params = {"w": jax.random.normal(ks, (64, 32)), "b": jnp.zeros(32)}
    lr = optax.cosine_decay_schedule(3e-2, 400)
    tx = optim.sparsify(optax.adam(lr), PATTERN, sr_ste=True, refresh_every=10, refresh_mode="vector")
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state):
        masks = optim.get_masks(state)

        def loss(p):
            q = optim.ste_apply(p, masks)
            return jnp.mean((x @ q["w"] + q["b"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(400):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    sparse = optim.final_params(params, state)
    final = float(jnp.mean((x @ sparse["w"] + sparse["b"] - y) ** 2))
    assert final < 0.02 * first, (first, final)
    masks = optim.get_masks(state)
    wrong = int(jnp.sum(masks["w"].mask != (w_true != 0)))
    assert wrong < 0.05 * int(jnp.sum(w_true != 0)), wrong  # the support is (nearly) found
    packed = hinm_jax.compress(sparse, masks)
    np.testing.assert_array_equal(packed["w"].densify(), sparse["w"])

    # the state is a plain pytree: a host round trip (checkpoint) restores the run exactly
    host = jax.tree.map(np.asarray, state)
    p1, s1, _ = step(params, state)
    p2, s2, _ = step(params, jax.tree.map(jnp.asarray, host))
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)


def test_repermute_puts_searched_masks_into_the_state():
    pytest.importorskip("hinm_jax.permute")
    params = {"w": jax.random.normal(jax.random.key(9), (64, 64))}
    tx = optim.sparsify(optax.sgd(0.1), PATTERN, refresh_every=5)
    state = tx.init(params)
    state = optim.repermute(params, state, permute="2cp", key=jax.random.key(0))
    new = optim.get_masks(state)["w"]
    assert new.pattern == PATTERN and float(new.density) == 0.25
    base = hinm_jax.prune(params, PATTERN)["w"]
    kept = lambda mk: float(jnp.sum(jnp.abs(params["w"]) * mk.mask))
    assert kept(new) >= kept(base)
    # the searched layout is reused by the jitted refresh
    again = optim.refresh(params, optim.get_masks(state))["w"]
    np.testing.assert_array_equal(again.mask, new.mask)


def test_score_pytree_works_at_init_and_at_every_refresh():
    """``score=`` means the same everywhere: a pytree (e.g. scores.taylor) as for prune."""
    params = _params()
    score = jax.tree.map(lambda w: jnp.abs(w) + jnp.arange(w.size, dtype=jnp.float32).reshape(w.shape) % 3, params)
    want = hinm_jax.prune(params, PATTERN, score=score)
    tx = optim.sparsify(optax.sgd(0.0), PATTERN, score=score, refresh_every=1)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    _, state = jax.jit(tx.update)(zero, state, params)
    for name in ("hidden", "out"):
        got = optim.get_masks(state)[name]["kernel"].mask
        np.testing.assert_array_equal(got, want[name]["kernel"].mask)
    new = optim.refresh(params, want, score=score)
    np.testing.assert_array_equal(new["hidden"]["kernel"].mask, want["hidden"]["kernel"].mask)


def test_sr_ste_must_be_a_finite_number():
    with pytest.raises(ValueError, match="sr_ste=nan"):
        optim.sparsify(optax.sgd(0.1), PATTERN, sr_ste=float("nan"))
    with pytest.raises(TypeError, match="sr_ste='yes'"):
        optim.sparsify(optax.sgd(0.1), PATTERN, sr_ste="yes")


def test_repermute_needs_a_key():
    params = _params()
    tx = optim.sparsify(optax.sgd(0.1), PATTERN)
    with pytest.raises(ValueError, match="needs key="):
        optim.repermute(params, tx.init(params), permute="2cp")
