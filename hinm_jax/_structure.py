"""Moving between original ``(K, O)`` coordinates and packed coordinates.

Packed coordinates of a block-structured matrix: packed row ``r`` is output channel
``row_perm[r]``; it belongs to block ``b = r // V`` and walks that block's vector index
``vector_index[b]`` (``K_v`` input indices, in N:M walk order). A ``(O, K_v)`` array in
packed coordinates holds ``a[vector_index[r // V, j], row_perm[r]]`` at ``[r, j]``.

All functions work on a single matrix; callers ``vmap`` over stacked leading axes.
"""

from __future__ import annotations

import jax.numpy as jnp


def gather_packed(a, row_perm, vector_index):
    """``(K, O)`` -> ``(O, K_v)`` in packed coordinates."""
    nb, kv = vector_index.shape
    o = row_perm.shape[0]
    cols = a.T[row_perm].reshape(nb, o // nb, a.shape[0])
    return jnp.take_along_axis(cols, vector_index[:, None, :], axis=2).reshape(o, kv)


def packed_rows(g, vector_index, k):
    """``(O, K_v)`` in packed coordinates -> ``(O, K)``: packed row ``r`` spread over the
    input axis (zeros where nothing lands), rows still in packed order.

    Built from gathers only (a position map of each block's vector index), which XLA
    runs far faster than a scatter of ``O * K_v`` elements.
    """
    nb, kv = vector_index.shape
    o = g.shape[0]
    pos = jnp.full((nb, k), -1, jnp.int32)
    pos = pos.at[jnp.arange(nb)[:, None], vector_index].set(
        jnp.broadcast_to(jnp.arange(kv, dtype=jnp.int32), (nb, kv)), unique_indices=True
    )
    rows = jnp.take_along_axis(g.reshape(nb, o // nb, kv), jnp.maximum(pos, 0)[:, None, :], axis=2)
    rows = jnp.where(pos[:, None, :] >= 0, rows, jnp.zeros((), g.dtype))
    return rows.reshape(o, k)


def scatter_packed(g, row_perm, vector_index, k):
    """``(O, K_v)`` in packed coordinates -> ``(K, O)``, zeros where nothing lands."""
    return packed_rows(g, vector_index, k)[inverse_permutation(row_perm)].T


def inverse_permutation(perm):
    """``inv`` with ``inv[perm[i]] = i``."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[-1], dtype=perm.dtype))


def matrix_shape(shape, stack_axes: int):
    """``(stack, K, O)`` of a leaf: leading ``stack_axes`` axes are independent matrices,
    the last axis is ``O``, everything between is flattened into ``K`` (last fastest)."""
    stack = tuple(shape[:stack_axes])
    o = shape[-1]
    k = 1
    for d in shape[stack_axes:-1]:
        k *= d
    return stack, k, o
