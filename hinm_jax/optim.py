"""Sparse training with optax: straight-through masks, SR-STE, mask refresh, gradual sparsity.

The dense weights stay in ``params`` for the whole run; the masks live in the optimizer
state (so they checkpoint and shard with it). Inside the loss, :func:`ste_apply` gives
the forward pass ``W * mask`` and passes the gradient to the dense ``W`` unmasked
(straight-through). :func:`sparsify` wraps any ``optax.GradientTransformation`` and

- adds SR-STE's ``λ·(1−mask)·W`` to the gradient (Zhou et al., ICLR 2021), as an option;
- recomputes the masks from the current weights every ``refresh_every`` steps, under
  ``lax.cond`` (one ``jax.jit`` for the whole train step, no host round trip);
- follows a :class:`SparsitySchedule` (optax schedules) for gradual sparsity: the vector
  level ramps from 0 to its target, then N:M switches on (:func:`gradual`), or any
  schedule of the two levels.

At the end, :func:`final_params` (``apply_masks`` with the state's masks) makes the
weights exactly sparse for :func:`hinm_jax.compress`.

Re-running the permutation search (OCP/IVP/2CP, eager numpy/scipy) is deliberately
outside the jitted step: call :func:`repermute` between steps when you want a new
layout; it replaces the masks in the state.

Multi-device and multi-host: nothing here communicates. Shard ``params``, the batch and
the optimizer state with ``jax.sharding`` (:func:`state_sharding` gives the masks and
params-shaped moments the params' shardings) and ``jax.jit`` inserts the collectives;
on several hosts call ``jax.distributed.initialize()`` first and build the mesh over
``jax.devices()`` as usual.

Example:
    >>> import jax, jax.numpy as jnp, optax, hinm_jax
    >>> from hinm_jax import optim
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    >>> tx = optim.sparsify(optax.sgd(0.1), hinm_jax.HiNM(16, 0.5, 2, 4), sr_ste=True,
    ...                     refresh_every=10)
    >>> state = tx.init(params)
    >>> def loss(p, masks):
    ...     return jnp.sum(optim.ste_apply(p, masks)["w"] ** 2)
    >>> @jax.jit
    ... def step(params, state):
    ...     grads = jax.grad(loss)(params, optim.get_masks(state))
    ...     updates, state = tx.update(grads, state, params)
    ...     return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state)
    >>> float(jnp.mean(optim.final_params(params, state)["w"] != 0))
    0.25
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hinm_jax import _structure
from hinm_jax._tree import is_mask_leaf, map_with_path, path_str
from hinm_jax.masks import (
    HSS,
    Layout,
    Mask,
    Unstructured,
    _clean,
    apply_masks,
    check_mask_shape,
    map_masked,
    mask_from_layout,
    matrix_mask,
    prune,
    stripe_keep,
)
from hinm_jax.scores import magnitude

__all__ = [
    "ste_apply",
    "sparsify",
    "SparsityState",
    "SparsitySchedule",
    "gradual",
    "get_masks",
    "set_masks",
    "final_params",
    "refresh",
    "repermute",
    "state_sharding",
    "SR_STE_LAMBDA",
]

SR_STE_LAMBDA = 2e-4
"""SR-STE's default decay strength λ (Zhou et al., ICLR 2021)."""

ScoreFn = Callable[[str, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------
# Straight-through masks
# ---------------------------------------------------------------------------------------


@jax.custom_jvp
def _ste(w, mask):
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


@_ste.defjvp
def _ste_jvp(primals, tangents):
    w, mask = primals
    w_dot, _ = tangents
    return _ste(w, mask), w_dot  # straight through: d(W*mask)/dW := identity


def ste_apply(params, masks):
    """``params`` with every masked leaf replaced by ``W * mask`` in the forward pass and
    the identity in the backward pass (straight-through estimator).

    Use it inside the loss: the model computes with the sparse weights, and
    ``jax.grad`` returns ``dL/d(W*mask)`` for every entry of the dense ``W`` (pruned
    entries included), which is what lets a pruned weight grow back when masks are
    refreshed.

    Args:
      params: the dense parameter pytree.
      masks: a pytree like ``params`` of :class:`~hinm_jax.Mask` / ``None`` (from
        :func:`hinm_jax.prune` or :func:`get_masks`).

    Returns:
      A pytree like ``params``.

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2)}
        >>> masks = hinm_jax.prune(params, "2:4")
        >>> g = jax.grad(lambda p: jnp.sum(ste_apply(p, masks)["w"]))(params)
        >>> g["w"].tolist()  # every entry, pruned or not
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    return map_masked(_ste, params, masks)


# ---------------------------------------------------------------------------------------
# Masks at traced sparsity levels (the pattern is static; its levels need not be)
# ---------------------------------------------------------------------------------------


def _explicit_sharding(x):
    """The sharding of ``x`` when it is sharded over explicit mesh axes, else ``None``.

    Under explicit sharding (``jax.make_mesh``'s default axis type) the gathers of the
    mask computation cannot infer their output sharding; masks are then computed on a
    replicated copy (every ``refresh_every`` steps only) and resharded like the weight.
    """
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "_any_axis_explicit", False):
        return None
    return sharding


def _replicate(x):
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def _shard_like(x, ref):
    sharding = _explicit_sharding(ref)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def _rank(score):
    """Rank of each entry along the last axis, best first (ties: lowest index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)
    flat = order.reshape(-1, score.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    ranks = jnp.zeros(flat.shape, jnp.int32).at[rows, flat].set(
        jnp.arange(flat.shape[1], dtype=jnp.int32)[None, :], unique_indices=True
    )
    return ranks.reshape(score.shape), order


def _nm_blocks(g, n, m):
    """The N:M choice on blocked scores ``(nb, L, V)`` (``L`` a multiple of ``m``),
    ``n`` possibly traced: a bool ``(nb, L, V)``."""
    nb, length, v = g.shape
    keep = stripe_keep(jnp.moveaxis(g.reshape(nb, length // m, m, v), 2, 3), n)  # (nb, J, V, m)
    return jnp.moveaxis(keep, 3, 2).reshape(g.shape)


def _nm_in_layout(score, row_perm, vector_index, n, m):
    """The N:M step in a fixed layout with ``n`` possibly traced (a bool ``(K, O)``)."""
    nb = vector_index.shape[0]
    k = score.shape[0]
    g = _structure.gather_blocks(_structure.to_blocks(score, row_perm, nb), vector_index)  # (nb, K_v, V)
    return _structure.from_blocks(_structure.scatter_blocks(_nm_blocks(g, n, m), vector_index, k), row_perm)


def _block_mask_at(score, row_perm, vector_size, kept_inputs, n, m, kv_t, n_t):
    """A block-structured mask whose levels are traced: every block keeps its ``kv_t``
    best input indices (walked in ascending order), every output channel ``n_t`` of
    every ``m`` of them. Static shapes throughout: a fixed-size rank mask replaces the
    vector step's ``top_k``.

    Returns ``(mask, vector_index)``; ``vector_index`` is each block's ``kept_inputs``
    (the target ``K_v``) best indices, ascending: the layout the schedule converges to.
    With ``kv_t == kept_inputs`` and ``n_t == n`` the mask equals :func:`matrix_mask`.
    """
    k, o = score.shape
    nb = o // vector_size
    sb = _structure.to_blocks(score, row_perm, nb)  # (K, nb, V)
    rank, order = _rank(sb.sum(axis=2).T)  # (nb, K)
    idx = jnp.arange(k, dtype=jnp.int32)
    walk = jnp.argsort(jnp.where(rank < kv_t, idx, idx + k), axis=-1).astype(jnp.int32)  # kept first, ascending
    valid = (idx < kv_t)[None, :, None]
    g = jnp.where(valid, _structure.gather_blocks(sb, walk), -jnp.inf)  # (nb, K, V) in walk order
    kp = -(-k // m) * m
    g = jnp.pad(g, ((0, 0), (0, kp - k), (0, 0)), constant_values=-jnp.inf)
    keep = _nm_blocks(g, n_t, m)[:, :k] & valid
    mask = _structure.from_blocks(_structure.scatter_blocks(keep, walk, k), row_perm)
    vector_index = jnp.sort(order[:, :kept_inputs], axis=-1).astype(jnp.int32)
    return mask, vector_index


def _unstructured_mask_at(score, count):
    rank, _ = _rank(score.reshape(-1))
    return (rank < count).reshape(score.shape)


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------


class SparsitySchedule(NamedTuple):
    """How far each sparsity level is along, per step (each an optax schedule).

    Each schedule maps the step count to a fraction in ``[0, 1]`` (clipped) of the
    pattern's target at that level, so one schedule serves layers with different
    patterns. ``None`` means "at target from step 0".

    Attributes:
      vector: the vector level (``HiNM``, ``VectorWise``: a block keeps
        ``floor(K·(1 − f·s)/m)·m`` inputs, at least its target ``K_v``) or the element
        level of ``Unstructured`` (it keeps ``round((1 − f·s)·size)``).
      nm: the N:M level (``HiNM``, ``NM``): a stripe of ``m`` keeps
        ``m − round(f·(m − n))`` values, so ``0`` is off and ``1`` is ``n:m``.

    Example:
        >>> import optax
        >>> s = SparsitySchedule(vector=optax.linear_schedule(0.0, 1.0, 100), nm=None)
        >>> float(s.vector(50))
        0.5
    """

    vector: Callable[[Any], Any] | None = None
    nm: Callable[[Any], Any] | None = None


def gradual(vector_steps: int, *, begin: int = 0, nm_steps: int = 0, power: float = 3.0) -> SparsitySchedule:
    """The hinm_sp order: the vector level ramps from 0 to its target over
    ``vector_steps`` (the cubic ramp of Zhu & Gupta for ``power=3``), then the N:M level
    switches on (at once, or linearly over ``nm_steps``; for 2:4 that is 4:4 → 3:4 → 2:4).

    Args:
      vector_steps: steps of the vector ramp.
      begin: step at which the ramp starts (dense before).
      nm_steps: steps of the N:M ramp after the vector ramp (0: switch on at once).
      power: exponent of the vector ramp ``1 − (1 − t/T)^power``.

    Example:
        >>> s = gradual(100, begin=10)
        >>> [float(s.vector(t)) for t in (0, 10, 110)], [float(s.nm(t)) for t in (109, 110)]
        ([0.0, 0.0, 1.0], [0.0, 1.0])
    """
    if vector_steps < 1 or begin < 0 or nm_steps < 0:
        raise ValueError(f"gradual: {vector_steps=}, {begin=}, {nm_steps=}: need vector_steps >= 1, begin >= 0, nm_steps >= 0")
    vector = optax.polynomial_schedule(0.0, 1.0, power=power, transition_steps=vector_steps, transition_begin=begin)
    start = begin + vector_steps
    if nm_steps:
        nm = optax.linear_schedule(0.0, 1.0, transition_steps=nm_steps, transition_begin=start)
    else:

        def nm(step):
            return (jnp.asarray(step) >= start).astype(jnp.float32)

    return SparsitySchedule(vector, nm)


def _fraction(schedule, step):
    if schedule is None:
        return None
    return jnp.clip(jnp.asarray(schedule(step), jnp.float32), 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# Refresh: masks from the current weights (jit-able)
# ---------------------------------------------------------------------------------------

_REFRESH_MODES = ("nm", "vector")


def _vector_target(pattern) -> float:
    return float(getattr(pattern, "vector_sparsity", 0.0))


def _leaf_refresh(path, mask: Mask, w, score_fn, mode, vfrac, nfrac) -> Mask:
    """One leaf's new mask; under explicit sharding computed replicated, then resharded
    like the old mask (so both ``lax.cond`` branches have the same types)."""
    new = _leaf_refresh_replicated(path, _replicate_mask(mask), _replicate(w), score_fn, mode, vfrac, nfrac)
    layout = mask.layout
    if layout is not None:
        layout = Layout(_shard_like(new.layout.row_perm, layout.row_perm), _shard_like(new.layout.vector_index, layout.vector_index))
    return Mask(_shard_like(new.mask, mask.mask), layout, new.pattern, new.stack_axes)


def _replicate_mask(mask: Mask) -> Mask:
    layout = mask.layout
    if layout is not None:
        layout = Layout(_replicate(layout.row_perm), _replicate(layout.vector_index))
    return Mask(_replicate(mask.mask), layout, mask.pattern, mask.stack_axes)


def _leaf_refresh_replicated(path, mask: Mask, w, score_fn, mode, vfrac, nfrac) -> Mask:
    pattern = mask.pattern
    s = magnitude(w) if score_fn is None else score_fn(path, w)
    if tuple(s.shape) != tuple(w.shape):
        raise ValueError(f"{path}: shape={tuple(w.shape)} but its score has shape {tuple(s.shape)}")
    stack, k, o = _structure.matrix_shape(w.shape, mask.stack_axes)
    s = _clean(s).reshape(stack + (k, o))

    def vmapped(fn, *args):
        for _ in stack:
            fn = jax.vmap(fn)
        return fn(*args)

    if isinstance(pattern, HSS):
        if vfrac is not None or nfrac is not None:
            raise ValueError(f"{path}: shape={tuple(w.shape)} pattern {pattern}: HSS has no gradual schedule")
        new = vmapped(lambda x: matrix_mask(x, pattern)[0], s)
        return Mask(new.reshape(w.shape), None, pattern, mask.stack_axes)

    if isinstance(pattern, Unstructured):
        if vfrac is None:
            new = vmapped(lambda x: matrix_mask(x, pattern)[0], s)
        else:
            size = k * o
            final = pattern.kept_count(size)
            count = jnp.round((1.0 - vfrac * pattern.sparsity) * size).astype(jnp.int32)
            count = jnp.clip(count, final, size)
            new = vmapped(lambda x: _unstructured_mask_at(x, count), s)
        return Mask(new.reshape(w.shape), None, pattern, mask.stack_axes)

    v, kv, n, m = pattern.structure(k, o)
    layout = mask.layout
    if vfrac is None:
        kv_t = kv
    else:
        s_t = vfrac * _vector_target(pattern)
        kv_t = (jnp.floor(k * (1.0 - s_t) / m + 1e-6) * m).astype(jnp.int32)
        kv_t = jnp.where(s_t <= 0.0, k, jnp.clip(kv_t, kv, k))
    n_t = n if nfrac is None else (m - jnp.round(nfrac * (m - n))).astype(jnp.int32)

    def full(x, rp):
        return _block_mask_at(x, rp, v, kv, n, m, kv_t, n_t)

    def static_full(x, rp):
        mk, lay = matrix_mask(x, pattern, rp)
        return mk, lay.vector_index

    def in_layout(x, rp, vi):
        if nfrac is None:
            return mask_from_layout(x, rp, vi, n, m), vi
        return _nm_in_layout(x, rp, vi, n_t, m), vi

    rp, vi = layout.row_perm, layout.vector_index
    at_target = vfrac is None  # the vector level is static and at its target
    if mode == "nm":
        if at_target:
            new, vi = vmapped(in_layout, s, rp, vi)
        else:
            new, vi = jax.lax.cond(
                kv_t == kv,
                lambda: vmapped(in_layout, s, rp, vi),
                lambda: vmapped(full, s, rp),
            )
    elif at_target and nfrac is None:
        new, vi = vmapped(static_full, s, rp)
    else:
        new, vi = vmapped(full, s, rp)
    return Mask(new.reshape(w.shape), Layout(rp, vi), pattern, mask.stack_axes)


def refresh(
    params,
    masks,
    *,
    score: ScoreFn | None = None,
    mode: str = "nm",
    schedule: SparsitySchedule | None = None,
    step=None,
):
    """Recomputes ``masks`` from ``params`` (jit-able), keeping each mask's pattern and
    output-channel permutation ``π``.

    Args:
      params: the current (dense) weights.
      masks: a pytree like ``params`` of :class:`~hinm_jax.Mask` / ``None``.
      score: importance ``(path, leaf) -> array``, default ``|W|``.
      mode: ``"nm"`` keeps the whole layout (``π`` and each block's vector index in
        its walk order ``σ``) and re-chooses only the N:M step; ``"vector"`` keeps ``π``
        and redoes the vector step too (the new vector index is walked in ascending
        order). Patterns without a layout (``Unstructured``, ``HSS``) are recomputed.
      schedule: the sparsity levels to use (see :class:`SparsitySchedule`); with a
        schedule, ``mode="nm"`` redoes the vector step while the vector level is below
        its target, so the vector index freezes at the last refresh before the ramp
        ends.
      step: the step the schedule is evaluated at (required with a schedule).

    Returns:
      New masks, same structure, shapes and dtypes (so ``lax.cond`` can switch).

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
        >>> masks = hinm_jax.prune(params, "2:4")
        >>> new = refresh({"w": -params["w"]}, masks)  # |W| unchanged: same mask
        >>> bool(jnp.all(new["w"].mask == masks["w"].mask))
        True
    """
    if mode not in _REFRESH_MODES:
        raise ValueError(f"mode={mode!r}: use one of {_REFRESH_MODES}")
    vfrac = nfrac = None
    if schedule is not None:
        if step is None:
            raise ValueError("refresh: a schedule needs the step it is evaluated at (step=...)")
        vfrac, nfrac = _fraction(schedule.vector, step), _fraction(schedule.nm, step)

    def one(path, mask, w):
        if mask is None:
            return None
        check_mask_shape(path, mask, w)
        return _leaf_refresh(path, mask, w, score, mode, vfrac, nfrac)

    return map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")


# ---------------------------------------------------------------------------------------
# The optax transformation
# ---------------------------------------------------------------------------------------


class SparsityState(NamedTuple):
    """State of :func:`sparsify`.

    Attributes:
      count: updates done so far (int32).
      masks: a pytree like ``params`` of :class:`~hinm_jax.Mask` (mask and layout) /
        ``None``.
      inner_state: the wrapped transformation's state.
    """

    count: jax.Array
    masks: Any
    inner_state: Any


def sparsify(
    inner: optax.GradientTransformation,
    pattern=None,
    *,
    masks=None,
    where=None,
    stack_axes=0,
    score: ScoreFn | None = None,
    sr_ste: bool | float = False,
    refresh_every: int | None = None,
    refresh_mode: str = "nm",
    schedule: SparsitySchedule | None = None,
) -> optax.GradientTransformation:
    """Wraps ``inner`` for straight-through sparse training; the masks live in the state.

    The gradients passed to ``update`` are those of the dense weights through
    :func:`ste_apply` (use ``ste_apply(params, get_masks(state))`` in the loss). The
    returned updates are dense: the weights keep learning where they are masked.

    Args:
      inner: any ``optax.GradientTransformation`` (adam, sgd, a chain, ...).
      pattern: the pattern for :func:`hinm_jax.prune` at ``init`` (a pattern, its string,
        a per-path dict or function), if ``masks`` is not given.
      masks: initial masks (e.g. ``prune(params, pattern, permute="2cp")``, computed
        eagerly); ``init`` then checks them against ``params`` and stores them.
      where: leaf selection for ``prune`` (with ``pattern``).
      stack_axes: stacked leading axes for ``prune`` (with ``pattern``).
      score: importance ``(path, leaf) -> array`` for ``prune`` and refreshes; default
        ``|W|``.
      sr_ste: SR-STE: ``True`` for λ = :data:`SR_STE_LAMBDA` (2e-4), or a float λ; adds
        ``λ·(1−mask)·W`` to the gradient before ``inner``.
      refresh_every: recompute the masks from the weights after every ``k``-th update
        (``lax.cond`` on the step count); ``None``: never.
      refresh_mode: ``"nm"`` (keep the layout, re-choose N:M) or ``"vector"`` (also redo
        the vector step, keeping ``π``); see :func:`refresh`.
      schedule: gradual sparsity (:class:`SparsitySchedule`, e.g. :func:`gradual`);
        needs ``refresh_every``. The masks of step ``t`` are those of the last refresh.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`SparsityState`;
      ``update`` needs ``params`` when SR-STE or refresh is on.

    Example:
        >>> import jax, optax, hinm_jax
        >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
        >>> tx = sparsify(optax.adam(1e-3), "hinm:16:0.5:2:4", sr_ste=True, refresh_every=100)
        >>> state = tx.init(params)
        >>> float(get_masks(state)["w"].density)
        0.25
    """
    if (pattern is None) == (masks is None):
        raise ValueError("sparsify: give exactly one of pattern= (pruned at init) or masks= (precomputed)")
    if sr_ste is True:
        lam = SR_STE_LAMBDA
    elif sr_ste is False or sr_ste is None:
        lam = 0.0
    else:
        lam = float(sr_ste)
        if lam < 0:
            raise ValueError(f"sr_ste={sr_ste!r}: λ must be >= 0")
    if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
        raise ValueError(f"refresh_every={refresh_every!r}: must be an int >= 1 or None")
    if refresh_mode not in _REFRESH_MODES:
        raise ValueError(f"refresh_mode={refresh_mode!r}: use one of {_REFRESH_MODES}")
    if schedule is not None and refresh_every is None:
        raise ValueError("sparsify: a schedule needs refresh_every (masks change only at refreshes)")
    if schedule is not None and not isinstance(schedule, SparsitySchedule):
        raise ValueError(f"schedule={schedule!r}: expected a SparsitySchedule (see gradual())")

    def init_fn(params):
        if masks is None:
            m0 = prune(jax.tree.map(_replicate, params), pattern, score=score, where=where, stack_axes=stack_axes)
            m0 = map_with_path(
                lambda path, mk, w: None if mk is None else Mask(_shard_like(mk.mask, w), mk.layout, mk.pattern, mk.stack_axes),
                m0,
                params,
                is_leaf=is_mask_leaf,
                what="masks",
            )
        else:
            m0 = map_with_path(lambda path, mk, w: _checked(path, mk, w), masks, params, is_leaf=is_mask_leaf, what="masks")
        if schedule is not None:
            m0 = refresh(params, m0, score=score, mode=refresh_mode, schedule=schedule, step=0)
        return SparsityState(jnp.zeros([], jnp.int32), m0, inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None and (lam or refresh_every):
            raise ValueError("sparsify: update(updates, state, params) needs params for SR-STE and mask refresh")
        current = state.masks
        if lam:
            updates = map_with_path(
                lambda path, mk, g, w: g if mk is None else _sr_ste(g, mk.mask, w, lam),
                current,
                updates,
                params,
                is_leaf=is_mask_leaf,
                what="masks",
            )
        updates, inner_state = inner.update(updates, state.inner_state, params)
        count = optax.safe_int32_increment(state.count)
        new_masks = current
        if refresh_every is not None:
            # Refresh from the updated weights. ``params + updates`` is the same expression
            # as the caller's ``optax.apply_updates``, so XLA computes it once; passing the
            # result (not ``params``) into the cond also keeps donated buffers copy-free.
            # The cond carries the masks flattened to 1-D: a 2-D result may get a
            # transposed layout from the refresh branch, which would make every
            # non-refresh step pay a transposing copy of all masks.
            new_params = optax.apply_updates(params, updates)
            flat = jax.lax.cond(
                count % refresh_every == 0,
                lambda p, c, t: _flat(refresh(p, c, score=score, mode=refresh_mode, schedule=schedule, step=t)),
                lambda p, c, t: _flat(c),
                new_params,
                current,
                count,
            )
            new_masks = jax.tree.map(lambda a, b: a.reshape(b.shape), flat, current)
        return updates, SparsityState(count, new_masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _flat(masks):
    # (explicitly sharded arrays keep their shape: their flattening has no sharding)
    return jax.tree.map(lambda a: a if _explicit_sharding(a) is not None else a.reshape(-1), masks)


def _checked(path, mask, w):
    if mask is not None:
        check_mask_shape(path, mask, w)
    return mask


def _sr_ste(g, mask, w, lam):
    decay = (lam * w).astype(g.dtype)
    return jnp.where(mask, g, g + decay)


# ---------------------------------------------------------------------------------------
# Reading and replacing the masks in a (possibly nested) optimizer state
# ---------------------------------------------------------------------------------------


def _ours(path, _value) -> bool:
    last = path[-1] if path else None
    return getattr(last, "tuple_name", None) == "SparsityState"


def get_masks(state):
    """The current masks in an optimizer state holding a :class:`SparsityState` (at any
    depth, e.g. inside ``optax.chain``). Same as
    ``optax.tree_utils.tree_get(state, "masks")`` when nothing else is named ``masks``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = optax.chain(optax.clip(1.0), sparsify(optax.sgd(0.1), "2:4"))
        >>> state = tx.init({"w": jnp.ones((8, 4))})
        >>> get_masks(state)["w"].mask.shape
        (8, 4)
    """
    found = optax.tree_utils.tree_get(state, "masks", default=_MISSING, filtering=_ours)
    if found is _MISSING:
        raise ValueError("get_masks: the optimizer state holds no SparsityState (was it built with sparsify?)")
    return found


_MISSING = object()


def set_masks(state, masks):
    """``state`` with the masks of its :class:`SparsityState` replaced (e.g. after an eager
    permutation search, see :func:`repermute`)."""
    get_masks(state)  # raises if absent
    return optax.tree_utils.tree_set(state, _ours, masks=masks)


def final_params(params, state):
    """``apply_masks(params, get_masks(state))``: the weights made exactly sparse, ready
    for :func:`hinm_jax.compress` with ``get_masks(state)``."""
    return apply_masks(params, get_masks(state))


def repermute(params, state, *, permute: str = "2cp", key: jax.Array | None = None, score=None, permute_options=None):
    """Re-runs the permutation search on the current weights and puts the new masks
    (same patterns, new layouts) into ``state``. Eager (numpy/scipy search): call it
    between jitted steps, e.g. every few epochs; it is not traceable.

    Args:
      params: the current dense weights.
      state: the optimizer state holding a :class:`SparsityState`.
      permute: ``"ocp"``, ``"ivp"`` or ``"2cp"`` (see :func:`hinm_jax.prune`).
      key: PRNG key of the search.
      score: as for :func:`hinm_jax.prune` (default ``|W|``).
      permute_options: extra options of the search.

    Returns:
      The state with new masks.
    """
    old = get_masks(state)
    plans = {}

    def note(path, mask, w):
        if mask is not None:
            plans[path] = (mask.pattern, mask.stack_axes)
        return None

    map_with_path(note, old, params, is_leaf=is_mask_leaf, what="masks")
    masks = prune(
        params,
        lambda path, leaf: plans[path][0] if path in plans else None,
        score=score,
        where=lambda path, leaf: path in plans,
        stack_axes=lambda path, leaf: plans[path][1] if path in plans else 0,
        permute=permute,
        key=key,
        permute_options=permute_options,
    )
    return set_masks(state, masks)


def state_sharding(state, params_sharding):
    """Shardings for an optimizer state: every sub-pytree shaped like ``params`` (e.g.
    adam's moments) takes ``params_sharding``; each :class:`~hinm_jax.Mask` array takes
    its parameter's sharding and its layout is replicated; everything else (counts,
    scalars) is replicated on the same mesh.

    Args:
      state: the optimizer state, or its ``jax.eval_shape``.
      params_sharding: a pytree like ``params`` of ``NamedSharding``.

    Returns:
      A pytree of shardings like ``state`` (for ``jax.device_put`` or ``jax.jit``'s
      ``in_shardings`` / ``out_shardings``).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = {"w": jnp.ones((8, 4))}
        >>> shard = {"w": NamedSharding(mesh, P(None, "model"))}
        >>> tx = sparsify(optax.adam(1e-3), "2:4")
        >>> s = state_sharding(jax.eval_shape(tx.init, params), shard)
        >>> get_masks(s)["w"].mask.spec
        P(None, 'model')
    """
    leaves = jax.tree.leaves(params_sharding)
    if not leaves:
        raise ValueError("state_sharding: params_sharding has no sharding")
    mesh = leaves[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pdef = jax.tree.structure(params_sharding)

    def masks_sharding(masks):
        def one(path, mask, sh):
            if mask is None:
                return None
            layout = None
            if mask.layout is not None:
                layout = Layout(replicated, replicated)
            return Mask(sh, layout, mask.pattern, mask.stack_axes)

        return map_with_path(one, masks, params_sharding, is_leaf=is_mask_leaf, what="masks")

    def is_special(x):
        if isinstance(x, SparsityState):
            return True
        try:
            return jax.tree.structure(x) == pdef and not isinstance(x, Mask)
        except Exception:
            return False

    def assign(x):
        if isinstance(x, SparsityState):
            return SparsityState(replicated, masks_sharding(x.masks), state_sharding(x.inner_state, params_sharding))
        if is_special(x):
            return params_sharding
        return replicated

    return jax.tree.map(assign, state, is_leaf=is_special)
