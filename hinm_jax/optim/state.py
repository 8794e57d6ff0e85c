"""The state of :func:`hinm_jax.optim.sparsify`: reading and replacing its masks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from hinm_jax._tree import map_with_path
from hinm_jax.masks import apply_masks, is_mask_leaf, prune

__all__ = ["SparsityState", "get_masks", "set_masks", "final_params", "repermute"]


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


def _ours(path, _value) -> bool:
    last = path[-1] if path else None
    return getattr(last, "tuple_name", None) == "SparsityState"


def get_masks(state):
    """The current masks in an optimizer state holding a :class:`SparsityState` (at any
    depth, e.g. inside ``optax.chain``). Same as
    ``optax.tree_utils.tree_get(state, "masks")`` when nothing else is named ``masks``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from hinm_jax.optim import sparsify
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
      key: PRNG key of the search (required).
      score: as for :func:`hinm_jax.prune`: ``None`` (``|W|``), a pytree like ``params`` or
        a function ``(path, leaf) -> array``.
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
