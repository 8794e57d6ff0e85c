"""The optax transformation of sparse training: :func:`sparsify`."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hinm_jax._tree import map_with_path
from hinm_jax.masks import Mask, check_mask_shape, is_mask_leaf, prune
from hinm_jax.optim.mask_refresh import REFRESH_MODES, refresh
from hinm_jax.optim.schedule import SparsitySchedule
from hinm_jax.optim.sharding import explicit_sharding, replicate, shard_like
from hinm_jax.optim.state import SparsityState

__all__ = ["sparsify", "SR_STE_LAMBDA"]

SR_STE_LAMBDA = 2e-4
"""SR-STE's default decay strength λ (Zhou et al., ICLR 2021)."""


def sparsify(
    inner: optax.GradientTransformation,
    pattern=None,
    *,
    masks=None,
    where=None,
    stack_axes=0,
    score=None,
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
      score: importance for ``prune`` and refreshes, as for :func:`hinm_jax.prune`:
        ``None`` (``|W|``), a pytree like ``params`` or a function ``(path, leaf) -> array``.
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
        >>> from hinm_jax.optim import get_masks
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
    elif isinstance(sr_ste, numbers.Real):
        lam = float(sr_ste)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"sr_ste={sr_ste!r}: λ must be a finite number >= 0")
    else:
        raise TypeError(f"sr_ste={sr_ste!r}: expected True, False or a float λ")
    if refresh_every is not None and (not isinstance(refresh_every, int) or isinstance(refresh_every, bool)):
        raise TypeError(f"refresh_every={refresh_every!r}: must be an int >= 1 or None")
    if refresh_every is not None and refresh_every < 1:
        raise ValueError(f"refresh_every={refresh_every!r}: must be an int >= 1 or None")
    if refresh_mode not in REFRESH_MODES:
        raise ValueError(f"refresh_mode={refresh_mode!r}: use one of {REFRESH_MODES}")
    if schedule is not None and refresh_every is None:
        raise ValueError("sparsify: a schedule needs refresh_every (masks change only at refreshes)")
    if schedule is not None and not isinstance(schedule, SparsitySchedule):
        raise ValueError(f"schedule={schedule!r}: expected a SparsitySchedule (see gradual())")

    def init_fn(params):
        if masks is None:
            m0 = prune(jax.tree.map(replicate, params), pattern, score=score, where=where, stack_axes=stack_axes)
            m0 = map_with_path(
                lambda path, mk, w: None if mk is None else Mask(shard_like(mk.mask, w), mk.layout, mk.pattern, mk.stack_axes),
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
        map_with_path(_check_grad, current, updates, is_leaf=is_mask_leaf, what="masks")
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
    return jax.tree.map(lambda a: a if explicit_sharding(a) is not None else a.reshape(-1), masks)


def _checked(path, mask, w):
    if mask is not None:
        check_mask_shape(path, mask, w)
    return mask


def _check_grad(path, mask, g):
    if mask is not None and tuple(np.shape(g)) != tuple(np.shape(mask.mask)):
        raise ValueError(
            f"{path}: shape={tuple(np.shape(mask.mask))} pattern {mask.pattern}: its gradient has shape "
            f"{tuple(np.shape(g))} (update(grads, state, params) takes gradients shaped like params)"
        )


def _sr_ste(g, mask, w, lam):
    decay = (lam * w).astype(g.dtype)
    return jnp.where(mask, g, g + decay)
