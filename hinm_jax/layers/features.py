"""Multi-axis outputs (``DenseGeneral`` / ``LinearGeneral`` with ``features=(H, D)``).

Such a kernel ``(K, H, D)`` must be pruned as the ``(K, H*D)`` matrix it computes:
:func:`fold_features` reshapes it before pruning and :func:`unfold_features` restores
the dense leaves after compression.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hinm_jax._tree import map_with_path
from hinm_jax.format import SparseWeight
from hinm_jax.layers.functional import _prod
from hinm_jax.masks import Mask
from hinm_jax.select import kernel_shapes

__all__ = ["fold_features", "unfold_features"]


def fold_features(params, model, *args, **kwargs):
    """``params`` with every kernel that has several output axes reshaped to one,
    ``(*in, H, D) -> (*in, H*D)``: the ``(K, O)`` matrix its layer computes, which is
    what :func:`hinm_jax.prune` must see (it takes the last axis as ``O``).

    Args:
      params: linen params or an nnx ``State`` of ``model``.
      model: the model (linen or nnx); ``*args``/``**kwargs``: example inputs (linen).

    Returns:
      ``params`` with those kernels folded (other leaves unchanged).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.DenseGeneral((4, 16))
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
        >>> fold_features(params, model, jnp.ones((1, 32)))["kernel"].shape
        (32, 64)
    """
    shapes = kernel_shapes(model, *args, **kwargs)

    def one(path, leaf):
        if path not in shapes or leaf is None:
            return leaf
        batch, ins, outs = shapes[path]
        if len(outs) < 2 or tuple(leaf.shape) != batch + ins + outs:
            return leaf
        return jnp.reshape(leaf, batch + ins + (_prod(outs),))

    return map_with_path(one, params)


def unfold_features(tree, params):
    """Reshapes the leaves of ``tree`` back to ``params``' shapes where
    :func:`fold_features` folded them: arrays, and the ``mask`` of :class:`Mask` leaves
    (for :func:`hinm_jax.apply_masks`); :class:`~hinm_jax.SparseWeight` leaves stay as
    compressed (sparse inference reads them folded).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, hinm_jax
        >>> model, x = nn.DenseGeneral((4, 16)), jnp.ones((1, 32))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> folded = fold_features(params, model, x)
        >>> masks = hinm_jax.prune(folded, "2:4", where=r"kernel$")
        >>> sparse = unfold_features(hinm_jax.compress(folded, masks), params)
        >>> with hinm_jax.sparse_inference():
        ...     y = model.apply({"params": sparse}, x)
        >>> masked = unfold_features(hinm_jax.apply_masks(folded, masks), params)
        >>> bool(jnp.allclose(y, model.apply({"params": masked}, x), rtol=1e-5, atol=1e-6))
        True
    """
    is_leaf = lambda x: x is None or isinstance(x, (Mask, SparseWeight))

    def one(path, leaf, ref):
        if leaf is None or isinstance(leaf, SparseWeight):
            return leaf
        shape = tuple(jnp.shape(ref))
        if isinstance(leaf, Mask):
            if tuple(leaf.mask.shape) == shape:
                return leaf
            return dataclasses.replace(leaf, mask=leaf.mask.reshape(shape))
        if tuple(jnp.shape(leaf)) == shape:
            return leaf
        if _prod(jnp.shape(leaf)) != _prod(shape):
            raise ValueError(f"{path}: shape={tuple(jnp.shape(leaf))} cannot be unfolded to {shape}")
        return jnp.reshape(leaf, shape)

    return map_with_path(one, tree, params, is_leaf=is_leaf, what="tree")
