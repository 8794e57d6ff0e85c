"""Moving between original ``(K, O)`` coordinates and a block layout.

A block-structured matrix has an output-channel permutation ``row_perm`` (packed row
``r`` is output channel ``row_perm[r]``, in block ``b = r // V``) and a vector index
``vector_index[b]`` (block ``b``'s ``K_v`` kept inputs in N:M walk order).

The functions here work in the *blocked* layout ``(K, nb, V)``: the ``(K, O)`` matrix with
its columns in packed order, cut into blocks. Moving to and from it needs no transpose,
and gathering a block's kept inputs moves contiguous ``V``-wide rows, which XLA does far
faster than element gathers or scatters. All functions work on one matrix; callers
``vmap`` over stacked leading axes.
"""

from __future__ import annotations

import jax.numpy as jnp


def inverse_permutation(perm):
    """``inv`` with ``inv[perm[i]] = i``."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[-1], dtype=perm.dtype))


def to_blocks(a, row_perm, nb: int):
    """``(K, O)`` -> ``(K, nb, V)``, columns in packed order (``row_perm=None``: identity)."""
    if row_perm is not None:
        a = a[:, row_perm]
    return a.reshape(a.shape[0], nb, a.shape[1] // nb)


def from_blocks(ab, row_perm):
    """``(K, nb, V)`` -> ``(K, O)`` in original column order (inverse of :func:`to_blocks`)."""
    a = ab.reshape(ab.shape[0], -1)
    if row_perm is not None:
        a = a[:, inverse_permutation(row_perm)]
    return a


def gather_blocks(ab, vector_index):
    """``(K, nb, V)`` -> ``(nb, K_v, V)``: each block's kept inputs in walk order."""
    nb = ab.shape[1]
    return ab[vector_index, jnp.arange(nb)[:, None]]


def position_map(vector_index, k: int):
    """``(nb, K)`` int32: where input ``k`` sits in block ``b``'s vector index, or -1."""
    nb, kv = vector_index.shape
    pos = jnp.full((nb, k), -1, jnp.int32)
    return pos.at[jnp.arange(nb)[:, None], vector_index].set(
        jnp.broadcast_to(jnp.arange(kv, dtype=jnp.int32), (nb, kv)), unique_indices=True
    )


def scatter_blocks(g, vector_index, k: int):
    """``(nb, K_v, V)`` -> ``(K, nb, V)``, zeros where an input is not kept (inverse of
    :func:`gather_blocks`, built from a gather)."""
    nb = g.shape[0]
    pos = position_map(vector_index, k).T  # (K, nb)
    out = g[jnp.arange(nb)[None, :], jnp.maximum(pos, 0)]
    return jnp.where(pos[..., None] >= 0, out, jnp.zeros((), g.dtype))


def rows_to_blocks(g, nb: int):
    """Packed rows ``(O, K_v)`` -> ``(nb, K_v, V)``."""
    o, kv = g.shape
    return g.reshape(nb, o // nb, kv).transpose(0, 2, 1)


def blocks_to_rows(g):
    """``(nb, K_v, V)`` -> packed rows ``(O, K_v)``."""
    nb, kv, v = g.shape
    return g.transpose(0, 2, 1).reshape(nb * v, kv)


def gather_packed(a, row_perm, vector_index):
    """``(K, O)`` -> packed rows ``(O, K_v)``: ``[r, j] = a[vector_index[r // V, j], row_perm[r]]``."""
    nb = vector_index.shape[0]
    return blocks_to_rows(gather_blocks(to_blocks(a, row_perm, nb), vector_index))


def scatter_packed(g, row_perm, vector_index, k: int):
    """Packed rows ``(O, K_v)`` -> ``(K, O)``, zeros where nothing lands."""
    nb = vector_index.shape[0]
    return from_blocks(scatter_blocks(rows_to_blocks(g, nb), vector_index, k), row_perm)


def matrix_shape(shape, stack_axes: int):
    """``(stack, K, O)`` of a leaf: leading ``stack_axes`` axes are independent matrices,
    the last axis is ``O``, everything between is flattened into ``K`` (last fastest)."""
    stack = tuple(shape[:stack_axes])
    o = shape[-1]
    k = 1
    for d in shape[stack_axes:-1]:
        k *= d
    return stack, k, o
