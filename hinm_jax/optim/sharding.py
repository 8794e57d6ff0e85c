"""Sharding of the sparse-training state: the masks follow their parameters.

Nothing in :mod:`hinm_jax.optim` communicates. Shard ``params``, the batch and the
optimizer state with ``jax.sharding`` (:func:`state_sharding` gives the masks and
params-shaped moments the params' shardings) and ``jax.jit`` inserts the collectives.
Under explicit sharding the mask computation runs on a replicated copy
(:func:`replicate`) and is resharded like its weight (:func:`shard_like`).
"""

from __future__ import annotations

import jax

from hinm_jax._tree import map_with_path
from hinm_jax.core import Layout
from hinm_jax.masks import Mask, is_mask_leaf
from hinm_jax.optim.state import SparsityState

__all__ = ["state_sharding"]


def explicit_sharding(x):
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


def replicate(x):
    sharding = explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def shard_like(x, ref):
    sharding = explicit_sharding(ref)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


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
        >>> from hinm_jax.optim import get_masks, sparsify
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
