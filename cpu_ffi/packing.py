"""The kernel's layout, made once from the canonical compressed format.

Canonical format (see ``hinm_jax.format``): ``values (O, nnz)``, ``metadata (O, words)`` uint32
with ``ceil(log2 m)``-bit stripe positions least-significant first, ``vector_index (nb, K_v)``
and ``row_perm (O,)``; packed row ``r`` is in block ``r // V``.

Kernel layout: the rows of each block in groups of 16, the group's 16 rows interleaved value by
value, so that 16 rows' ``i``-th values (and positions) are one contiguous vector:

- ``values (nb, G, nnz, 16)``, ``G = ceil(V / 16)``; rows past ``V`` are zero padding;
- ``positions (nb, G, nnz, 16)`` uint8, the stripe position of each value;
- ``inputs (nb, G, nnz, 16)`` uint16, the input (column of ``x``) of each value:
  ``vector_index[b, stripe * m + position]``, so that the tokens schedule reads its activations
  without looking the position up in ``vector_index`` (one load less per value). Empty ``(0,)``
  when ``K > 65536`` (the index would not fit uint16): the kernel then runs the rows schedule;
- ``vector_index (nb, K_v)`` and ``row_perm (O,)`` int32, unchanged.

The **pair layout** (``pairs=True``: bfloat16 values of 2:4 stripes) keeps each row's two values of a
stripe next to each other, as one 32-bit word, the operand of the AVX-512 BF16 dot instruction:
``values`` and ``positions`` are ``(nb, G, nnz / 2, 32)``, element ``(j, 2 r + q)`` being row ``r``'s
``q``-th value of stripe ``j``, the two positions ascending; ``inputs`` follows ``positions``. The
kernel tells the layouts apart by the last axis (16 or 32).

Works on numpy arrays and on jax arrays (also traced, under ``jit``). This package must not
import ``hinm_jax``, so it unpacks the metadata itself; a test checks that it agrees with
``hinm_jax.format``'s codec.

Example:
    >>> import numpy as np
    >>> from cpu_ffi import packing
    >>> values = np.arange(8, dtype=np.float32).reshape(2, 4)        # O=2 rows, 2:4 on K=8
    >>> metadata = np.array([[0b11_00_10_00], [0b11_01_01_00]], np.uint32)
    >>> p = packing.pack(values, metadata, np.arange(8, dtype=np.int32)[None], np.arange(2, dtype=np.int32), m=4, in_features=8)
    >>> p["values"].shape, p["positions"][0, 0, :, 1].tolist(), p["inputs"][0, 0, :, 1].tolist()
    ((1, 1, 4, 16), [0, 1, 1, 3], [0, 1, 5, 7])
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["GROUP", "MAX_INPUTS", "KEYS", "positions", "pack", "groups", "use_pairs"]

GROUP = 16  # rows interleaved per group (the kernel's fixed layout)
MAX_INPUTS = 1 << 16  # inputs (K) up to which the layout has its per-value input index (uint16)
KEYS = ("values", "positions", "inputs", "vector_index", "row_perm")  # the arrays of the layout, as pack returns them


def _xp(*arrays):
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def positions(metadata, m: int, nnz: int):
    """Stripe positions ``(..., nnz)`` uint8 from packed metadata words ``(..., words)``."""
    xp = _xp(metadata)
    bits = (m - 1).bit_length()
    if bits == 0:
        return xp.zeros(metadata.shape[:-1] + (nnz,), xp.uint8)
    per = 32 // bits
    shifts = xp.arange(per, dtype=xp.uint32) * xp.uint32(bits)
    pos = (metadata[..., None].astype(xp.uint32) >> shifts) & xp.uint32((1 << bits) - 1)
    return pos.reshape(metadata.shape[:-1] + (-1,))[..., :nnz].astype(xp.uint8)


def groups(vector_size: int) -> int:
    """Groups of 16 rows per block."""
    return -(-vector_size // GROUP)


def use_pairs(dtype, n: int, m: int) -> bool:
    """Whether :func:`pack` uses the pair layout for weights of ``dtype`` in ``n:m`` stripes."""
    return np.dtype(dtype) == np.dtype(jnp.bfloat16) and n == 2 and m == 4


def pack(values, metadata, vector_index, row_perm, *, m: int, in_features: int, pairs: bool = False) -> dict:
    """The kernel layout of one matrix (see the module docstring).

    Args:
      values: ``(O, nnz)`` kept values (float32 or bfloat16; kept as they are).
      metadata: ``(O, words)`` uint32 packed stripe positions.
      vector_index: ``(nb, K_v)`` int32.
      row_perm: ``(O,)`` int32.
      m: stripe length (at most 255: positions are stored in a byte).
      in_features: the matrix's inputs ``K`` (the per-value input index is stored up to
        :data:`MAX_INPUTS`).
      pairs: the pair layout (bfloat16 values, 2 kept of every 4; see :func:`use_pairs`).

    Returns:
      The arrays named by :data:`KEYS`, numpy arrays for numpy inputs, jax arrays otherwise.
    """
    if m > 255:
        raise ValueError(f"m={m}: stripe positions must fit a byte (m <= 255)")
    xp = _xp(values, metadata, vector_index, row_perm)
    o, nnz = values.shape
    nb = vector_index.shape[0]
    v = o // nb
    g = groups(v)

    pos = positions(metadata, m, nnz)
    if pairs:
        kv = vector_index.shape[1]
        if m != 4 or nnz != 2 * (kv // m) or np.dtype(values.dtype) != np.dtype(jnp.bfloat16):
            raise ValueError(f"pairs=True: bfloat16 values of 2:4 stripes only, got {values.dtype} with nnz={nnz}, K_v={kv}, {m=}")
        vals2, pos2 = values.reshape(o, -1, 2), pos.reshape(o, -1, 2)
        swap = pos2[..., 0] > pos2[..., 1]  # ascending positions in each pair (the kernel's pair index)
        vals2 = xp.where(swap[..., None], vals2[..., ::-1], vals2)
        pos2 = xp.where(swap[..., None], pos2[..., ::-1], pos2)

        def interleave_pairs(a, pad):
            a = a.reshape(nb, v, nnz // 2, 2)
            a = xp.concatenate([a, xp.broadcast_to(xp.asarray(pad, a.dtype), (nb, g * GROUP - v, nnz // 2, 2))], axis=1)
            return a.reshape(nb, g, GROUP, nnz // 2, 2).transpose(0, 1, 3, 2, 4).reshape(nb, g, nnz // 2, 2 * GROUP)

        packed_values, packed_positions = interleave_pairs(vals2, [0, 0]), interleave_pairs(pos2, [0, 1])
    else:

        def interleave(a):
            a = a.reshape(nb, v, nnz)
            a = xp.pad(a, ((0, 0), (0, g * GROUP - v), (0, 0)))
            return a.reshape(nb, g, GROUP, nnz).transpose(0, 1, 3, 2)

        packed_values, packed_positions = interleave(values), interleave(pos)
    inputs = _inputs(packed_positions, vector_index, m, in_features, pairs)
    arrays = (packed_values, packed_positions, inputs, vector_index.astype(xp.int32), row_perm.astype(xp.int32))
    return dict(zip(KEYS, arrays))


def _inputs(packed_positions, vector_index, m: int, in_features: int, pairs: bool):
    """``inputs`` (see the module docstring) from the packed positions: the stripe of entry ``i`` of
    axis 2 is ``i`` (pairs) or ``i // n``."""
    xp = _xp(packed_positions, vector_index)
    if in_features > MAX_INPUTS:
        return xp.zeros((0,), xp.uint16)
    nb, g, count, _ = packed_positions.shape
    stripes = vector_index.shape[1] // m
    stripe = xp.arange(count) // (1 if pairs or not stripes else count // stripes)
    at = stripe[None, None, :, None] * m + packed_positions.astype(xp.int32)  # (nb, G, count, lanes)
    rows = xp.take_along_axis(vector_index.astype(xp.int32), at.reshape(nb, -1), axis=1)
    return rows.reshape(packed_positions.shape).astype(xp.uint16)
