"""Masks recomputed from the current weights inside a jitted step (:func:`refresh`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hinm_jax import core
from hinm_jax._tree import map_with_path
from hinm_jax.core import Layout
from hinm_jax.masks import Mask, check_mask_shape, is_mask_leaf, leaf_scores, named_leaves
from hinm_jax.optim.schedule import SparsitySchedule, fraction
from hinm_jax.optim.sharding import replicate, shard_like
from hinm_jax.patterns import HSS, Unstructured

__all__ = ["refresh", "REFRESH_MODES"]

REFRESH_MODES = ("nm", "vector")


def _leaf_refresh(path, mask: Mask, w, s, mode, vfrac, nfrac) -> Mask:
    """One leaf's new mask; under explicit sharding computed replicated, then resharded
    like the old mask (so both ``lax.cond`` branches have the same types)."""
    new = _leaf_refresh_replicated(path, _replicate_mask(mask), w.shape, replicate(s), mode, vfrac, nfrac)
    layout = mask.layout
    if layout is not None:
        layout = Layout(shard_like(new.layout.row_perm, layout.row_perm), shard_like(new.layout.vector_index, layout.vector_index))
    return Mask(shard_like(new.mask, mask.mask), layout, new.pattern, new.stack_axes)


def _replicate_mask(mask: Mask) -> Mask:
    layout = mask.layout
    if layout is not None:
        layout = Layout(replicate(layout.row_perm), replicate(layout.vector_index))
    return Mask(replicate(mask.mask), layout, mask.pattern, mask.stack_axes)


def _leaf_refresh_replicated(path, mask: Mask, shape, s, mode, vfrac, nfrac) -> Mask:
    pattern = mask.pattern
    stack, k, o = core.matrix_shape(shape, mask.stack_axes)
    s = core.clean_score(s).reshape(stack + (k, o))

    def vmapped(fn, *args):
        for _ in stack:
            fn = jax.vmap(fn)
        return fn(*args)

    if isinstance(pattern, HSS):
        if vfrac is not None or nfrac is not None:
            raise ValueError(f"{path}: shape={tuple(shape)} pattern {pattern}: HSS has no gradual schedule")
        new = vmapped(lambda x: core.matrix_mask(x, pattern)[0], s)
        return Mask(new.reshape(shape), None, pattern, mask.stack_axes)

    if isinstance(pattern, Unstructured):
        if vfrac is None:
            new = vmapped(lambda x: core.matrix_mask(x, pattern)[0], s)
        else:
            size = k * o
            final = pattern.kept_count(size)
            count = jnp.round((1.0 - vfrac * pattern.sparsity) * size).astype(jnp.int32)
            count = jnp.clip(count, final, size)
            new = vmapped(lambda x: core.unstructured_mask_at(x, count), s)
        return Mask(new.reshape(shape), None, pattern, mask.stack_axes)

    v, kv, n, m = pattern.structure(k, o)
    layout = mask.layout
    kv_t = kv if vfrac is None else core.scheduled_kept_inputs(pattern, k, o, vfrac)
    n_t = n if nfrac is None else (m - jnp.round(nfrac * (m - n))).astype(jnp.int32)

    def full(x, rp):
        return core.block_mask_at(x, rp, v, kv, n, m, kv_t, n_t)

    def static_full(x, rp):
        mk, lay = core.matrix_mask(x, pattern, rp)
        return mk, lay.vector_index

    def in_layout(x, rp, vi):
        if nfrac is None:
            return core.mask_from_layout(x, rp, vi, n, m), vi
        return core.nm_step(x, rp, vi, n_t, m), vi

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
    return Mask(new.reshape(shape), Layout(rp, vi), pattern, mask.stack_axes)


def refresh(
    params,
    masks,
    *,
    score=None,
    mode: str = "nm",
    schedule: SparsitySchedule | None = None,
    step=None,
):
    """Recomputes ``masks`` from ``params`` (jit-able), keeping each mask's pattern and
    output-channel permutation ``π``.

    Args:
      params: the current (dense) weights.
      masks: a pytree like ``params`` of :class:`~hinm_jax.Mask` / ``None``.
      score: importance, as for :func:`hinm_jax.prune`: ``None`` (``|W|``), a pytree
        like ``params`` or a function ``(path, leaf) -> array``.
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
    if mode not in REFRESH_MODES:
        raise ValueError(f"mode={mode!r}: use one of {REFRESH_MODES}")
    vfrac = nfrac = None
    if schedule is not None:
        if step is None:
            raise ValueError("refresh: a schedule needs the step it is evaluated at (step=...)")
        vfrac, nfrac = fraction(schedule.vector, step), fraction(schedule.nm, step)

    def check(path, mask, w):
        if mask is not None:
            check_mask_shape(path, mask, w)
        return mask is not None

    masked = map_with_path(check, masks, params, is_leaf=is_mask_leaf, what="masks")
    wanted = {p for p, on in named_leaves(masked).items() if on}
    scored = leaf_scores(params, score, wanted.__contains__)

    def one(path, mask, w):
        if mask is None:
            return None
        return _leaf_refresh(path, mask, w, scored[path], mode, vfrac, nfrac)

    return map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")
