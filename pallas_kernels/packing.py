"""Canonical HiNM format -> the layout the Pallas kernel reads (done once per weight).

Canonical format of one ``(K, O)`` matrix with block structure ``(V, K_v, n, m)`` and
``J = K_v // m`` stripes per block (see ``shared/SPEC.md``):
``values (O, J*n)``, ``metadata (O, words)`` uint32 with ``b = ceil(log2 m)`` bits per
entry (least-significant first), ``vector_index (O//V, K_v)`` int32 in walk order,
``row_perm (O,)`` int32.

The kernel reorders every step of ``s = block_k // m`` stripes by position inside the
stripe: column ``q * s + j`` of its expanded weight tile is stripe ``j``'s value at
position ``q`` (or zero), and multiplies activation row ``vector_index[b, j*m + q]``.
So the packer stores

- ``values (O, n, J_pad)``: ``values[r, t, j]`` = canonical ``values[r, j*n + t]``;
- ``positions (O, n, J_pad)`` uint8: its position in ``0..m-1`` (``None`` when ``m == 1``);
- ``vector_index (O//V, m, J_pad)`` int32: ``[b, q, j]`` = canonical
  ``vector_index[b, j*m + q]`` (``None`` for plain N:M, whose index is ``arange(K)``);
- ``row_perm (O,)`` int32, unchanged.

``J_pad`` rounds ``J`` up to whole inner steps of ``block_k // m`` stripes; padded
stripes hold value 0 at position 0 of input 0. The values stay compressed in memory: the
dense ``block_rows x block_k`` tile exists only on chip (registers, shared memory).

Example:
    >>> import numpy as np
    >>> from pallas_kernels import testing, pack
    >>> w = testing.random_canonical(np.random.default_rng(0), k=64, o=32, vector_size=16,
    ...                              kept_inputs=32, n=2, m=4)
    >>> p = pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    >>> p.values.shape, p.positions.shape, p.vector_index.shape
    ((32, 2, 16), (32, 2, 16), (2, 4, 16))
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sizes import MIN_TILE, _is_pow2, default_block_k

__all__ = ["PackedHiNM", "pack", "unpack_positions", "metadata_bits"]


class PackedHiNM(NamedTuple):
    """The kernel's view of one weight (see the module docstring for the layout)."""

    values: jax.Array
    positions: Optional[jax.Array]
    vector_index: Optional[jax.Array]
    row_perm: jax.Array


def metadata_bits(m: int) -> int:
    """``ceil(log2 m)``: bits per canonical metadata entry (0 for ``m = 1``)."""
    return (m - 1).bit_length()


def unpack_positions(metadata, m: int, count: int):
    """Canonical uint32 metadata ``(O, words)`` -> uint8 positions ``(O, count)``."""
    bits = metadata_bits(m)
    if bits == 0:
        return jnp.zeros(metadata.shape[:-1] + (count,), jnp.uint8)
    per = 32 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    pos = (metadata.astype(jnp.uint32)[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
    pos = pos.reshape(metadata.shape[:-1] + (-1,))[..., :count]
    return pos.astype(jnp.uint8)


def pack(
    values,
    metadata,
    vector_index,
    row_perm,
    *,
    n: int,
    m: int,
    block_k: int | None = None,
    identity_index: bool = False,
) -> PackedHiNM:
    """Repacks one matrix from the canonical format for :func:`pallas_kernels.hinm_spmm`.

    Args:
      values: ``(O, K_v*n//m)`` kept values.
      metadata: ``(O, words)`` uint32 canonical positions (``(O, 0)`` when ``m == 1``).
      vector_index: ``(O//V, K_v)`` int32.
      row_perm: ``(O,)`` int32.
      n: values kept per stripe.
      m: stripe length.
      block_k: the kernel's ``BlockSizes.block_k`` (default :func:`default_block_k`).
      identity_index: the vector index is ``arange(K)`` (plain N:M): drop it, the kernel
        computes the rows instead of loading them.

    Returns:
      A :class:`PackedHiNM`. Works under ``jax.jit`` (all arguments but the arrays static).

    Raises:
      ValueError: shapes that do not form a ``(V, K_v, n, m)`` structure, or a ``block_k``
        that does not fit ``m``.
      NotImplementedError: ``m`` is not a power of two (the kernel cannot run it).
    """
    values = jnp.asarray(values)
    vector_index = jnp.asarray(vector_index)
    o, nnz = values.shape
    nb, kv = vector_index.shape
    if n < 1 or m < n or (m > 1 and n == m):
        raise ValueError(f"pack: n={n}, m={m}: expected 1 <= n < m, or n = m = 1")
    if kv % m or nnz * m != kv * n or o % nb or tuple(row_perm.shape) != (o,):
        raise ValueError(
            f"pack: values.shape={values.shape} vector_index.shape={vector_index.shape} "
            f"row_perm.shape={tuple(row_perm.shape)} do not form a (V, K_v, n={n}, m={m}) structure"
        )
    if not _is_pow2(m):
        raise NotImplementedError(f"pack: m={m}: the Pallas kernel needs a power-of-two stripe length")
    j = kv // m
    block_k = default_block_k(m, kv) if block_k is None else block_k
    if block_k % m or block_k // m < MIN_TILE or (block_k // m) & (block_k // m - 1):
        raise ValueError(f"pack: block_k={block_k} with m={m}: must be m times a power of two >= {MIN_TILE}")
    jb = block_k // m
    j_pad = -(-j // jb) * jb
    if identity_index:
        if nb != 1:
            raise ValueError(
                f"pack: identity_index with vector_index.shape={vector_index.shape}: needs one block"
            )
        if not isinstance(vector_index, jax.core.Tracer) and not np.array_equal(
            np.asarray(vector_index)[0], np.arange(kv)  # index in numpy: no op staged into a trace
        ):
            raise ValueError("pack: identity_index=True but vector_index is not arange(K)")
    return _pack_arrays(
        values, jnp.asarray(metadata), vector_index, jnp.asarray(row_perm),
        n=n, m=m, j_pad=j_pad, identity_index=identity_index,
    )


@functools.partial(jax.jit, static_argnames=("n", "m", "j_pad", "identity_index"))
def _pack_arrays(values, metadata, vector_index, row_perm, *, n, m, j_pad, identity_index):
    o, nnz = values.shape
    nb, kv = vector_index.shape
    j = kv // m
    pad = [(0, 0), (0, 0), (0, j_pad - j)]
    vals = jnp.pad(values.reshape(o, j, n).transpose(0, 2, 1), pad)
    pos = None
    if m > 1:
        pos = unpack_positions(metadata, m, nnz)
        pos = jnp.pad(pos.reshape(o, j, n).transpose(0, 2, 1), pad)
    vi = None
    if not identity_index:
        vi = jnp.pad(vector_index.astype(jnp.int32).reshape(nb, j, m).transpose(0, 2, 1), pad)
    return PackedHiNM(vals, pos, vi, row_perm.astype(jnp.int32))
