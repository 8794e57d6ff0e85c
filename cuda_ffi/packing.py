"""Canonical compressed format -> the layout of the ``mma.sp`` kernel (``hinm_spmm.cu``).

The canonical format (one matrix, ``n = 2``, ``m = 4``) is ``values (O, K_v/2)``,
``metadata (O, ceil(K_v/32))`` uint32 (2-bit stripe positions, least-significant first),
``vector_index (O/V, K_v)`` int32 and ``row_perm (O,)`` int32. The kernel wants:

- ``values`` ``(O_p, K_vp/2)``: rows sorted by output channel inside each vector block (any
  order of a block's rows computes the same product, and sorted channels let the epilogue
  write contiguous runs); ``K_v`` zero-padded to ``K_vp``, a multiple of :data:`K_ALIGN`;
  rows zero-padded to ``O_p`` (a multiple of 128 for plain 2:4, where one tile spans rows of
  the single block).
- ``metadata`` ``(O_p/16, K_vp/32, 16)`` uint32: for every 16-row tile and ``mma.m16n8k32``
  k-step, the 16 words the threads of a warp hand to ``mma.sp`` with sparsity selector 0.
  A canonical word of row ``r`` covers exactly one k-step (16 positions = 8 groups of 4 =
  32 gathered inputs) with the same bit order the instruction uses, so word ``g*2 + t``
  (lane ``4g + t``) is ``half_t(row g) | half_t(row g + 8) << 16`` where ``half_t`` is the
  canonical word's low (t = 0) or high (t = 1) 16 bits. Padding groups get indices
  ``(0, 1)`` (``0x4``): never an invalid pattern.
- ``vector_index`` ``(O_p/V, K_vp)`` int32, ``-1`` past ``K_v`` (the kernel zero-fills
  those activation rows), or ``(0, K_vp)`` for the direct (plain 2:4) kernel, which reads
  ``x`` without a gather.
- ``row_perm`` ``(O_p,)`` int32, reordered with the rows, ``-1`` for padding rows; or ``(0,)``
  when packed row ``r`` is channel ``r`` (plain 2:4 always, HiNM without output-channel
  permutation), so the kernel writes ``y`` directly instead of ``y^T`` (see ``hinm_spmm.cu``).

:func:`pack` is written against the array API subset shared by numpy and ``jax.numpy``:
numpy at conversion time (with validation: broken inputs raise ``ValueError``), ``jax.numpy``
when a weight is packed inside a traced function, where nothing can raise. There, inputs
the instruction or the kernel cannot take are made safe instead:

- a 2:4 group whose two positions are not strictly ascending (a stripe with fewer than two
  kept values can be compressed that way) is rewritten to the same product with ascending
  positions: swapped pairs are swapped back with their values, and a repeated position
  ``p`` becomes ``p`` holding the sum of both values plus position ``p ^ 1`` holding zero
  (``mma.sp::ordered_metadata`` is undefined for anything else);
- a vector index entry outside ``0 .. in_features - 1`` (or negative, when ``in_features``
  is not given) becomes :data:`INVALID_INDEX`: the kernel never reads such a row and
  writes NaN to every output that uses it, rather than reading out of bounds.

Example:
    >>> import numpy as np
    >>> from cuda_ffi import packing
    >>> vals = np.ones((64, 32), np.float16)              # O=64, K_v=64
    >>> meta = np.full((64, 2), 0x44444444, np.uint32)   # positions (0, 1) everywhere
    >>> vi = np.tile(np.arange(64, dtype=np.int32), (2, 1))  # V=32: two blocks
    >>> packed = packing.pack(vals, meta, vi, np.arange(64, dtype=np.int32))
    >>> packed["metadata"].shape
    (4, 2, 16)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "K_ALIGN",
    "DIRECT_ROW_ALIGN",
    "PAD_META_WORD",
    "pack",
    "layout_of",
    "Layout",
    "is_direct",
    "packed_shapes",
    "INVALID_INDEX",
    "unpack_positions",
    "ordered_pairs",
]

#: ``K_v`` is padded to a multiple of this (the kernel's logical K per pipeline stage).
K_ALIGN = 64
#: Plain 2:4 (one block) pads its rows to a multiple of the largest tile height.
DIRECT_ROW_ALIGN = 128
#: Metadata word of padding: every group of 4 keeps positions (0, 1).
PAD_META_WORD = 0x44444444
#: Vector index entry the traced packer gives an input outside ``0..K-1``: never read, NaN out.
INVALID_INDEX = -2


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


class Layout(NamedTuple):
    """Static facts of a packed weight, all derived from its array shapes.

    Attributes:
      out_features: ``O``, the row length of the output.
      rows: ``O_p``, packed rows including padding.
      kept_padded: ``K_vp``, padded kept inputs per block.
      vector_size: packed rows per vector block (``rows`` for the direct kernel).
      gather: whether the kernel gathers activation rows (HiNM) or reads ``x`` directly.
      identity_rows: packed row ``r`` is output channel ``r`` (``row_perm`` is empty).
    """

    out_features: int
    rows: int
    kept_padded: int
    vector_size: int
    gather: bool
    identity_rows: bool


def layout_of(packed, out_features: int) -> Layout:
    """The :class:`Layout` of a dict returned by :func:`pack`."""
    rows, kc = packed["values"].shape
    nb = packed["vector_index"].shape[0]
    gather = nb > 0
    return Layout(
        int(out_features),
        int(rows),
        int(2 * kc),
        int(rows // nb if gather else rows),
        bool(gather),
        packed["row_perm"].shape[0] == 0,
    )


def packed_shapes(out_features: int, kept: int, blocks: int, direct: bool) -> dict:
    """Shapes of :func:`pack`'s arrays for ``O = out_features``, ``K_v = kept``."""
    kvp = _round_up(max(kept, 1), K_ALIGN)
    rows = _round_up(out_features, DIRECT_ROW_ALIGN) if direct else out_features
    return {
        "values": (rows, kvp // 2),
        "metadata": (rows // 16, kvp // 32, 16),
        "vector_index": (0 if direct else blocks, kvp),
        "row_perm": (rows,),  # (0,) when packed rows are the channels in order
    }


def is_direct(vector_index) -> bool:
    """Whether a (concrete) vector index is the identity of plain N:M: one block whose
    kept inputs are ``0 .. K_v - 1`` in order, so the kernel needs no gather."""
    vi = np.asarray(vector_index)
    return vi.shape[0] == 1 and bool(np.array_equal(vi[0], np.arange(vi.shape[1])))


def unpack_positions(metadata, count: int, xp=np):
    """Canonical 2-bit metadata ``(O, words)`` uint32 -> positions ``(O, count)`` uint32
    (entry ``i`` in bits ``2 (i % 16)`` of word ``i // 16``, least-significant first)."""
    shifts = (xp.arange(16, dtype=xp.uint32) * 2).astype(xp.uint32)
    pos = (metadata.astype(xp.uint32)[..., None] >> shifts) & xp.uint32(3)
    return pos.reshape(metadata.shape[:-1] + (-1,))[..., :count]


def _pack_positions(pos, words: int, xp=np):
    """Inverse of :func:`unpack_positions`: ``(O, count)`` in 0..3 -> ``(O, words)`` uint32."""
    o, count = pos.shape
    pos = xp.concatenate([pos.astype(xp.uint32), xp.zeros((o, 16 * words - count), dtype=xp.uint32)], axis=1)
    shifts = (xp.arange(16, dtype=xp.uint32) * 2).astype(xp.uint32)
    # Fields do not overlap: their sum is their bitwise or.
    return xp.sum(pos.reshape(o, words, 16) << shifts, axis=-1, dtype=xp.uint32)


def ordered_pairs(values, metadata, xp=np):
    """The same 2:4 weight with strictly ascending positions in every group of 4.

    ``values (O, K_v/2)`` and ``metadata (O, words)`` canonical. A group ``(p0, v0), (p1,
    v1)`` with ``p0 > p1`` becomes ``(p1, v1), (p0, v0)``; one with ``p0 == p1`` (the
    expansion adds both values at ``p0``) becomes ``p0`` holding ``v0 + v1`` and ``p0 ^ 1``
    holding zero, in ascending order. Ascending groups are unchanged. Traceable.

    Returns:
      ``(values, metadata)``.
    """
    o, kc = values.shape
    words = metadata.shape[1]
    pos = unpack_positions(metadata, kc, xp).astype(xp.int32)
    p0, p1 = pos[:, 0::2], pos[:, 1::2]
    v0, v1 = values[:, 0::2], values[:, 1::2]
    same = p0 == p1
    q = p0 ^ 1
    lo = xp.where(same, xp.minimum(p0, q), xp.minimum(p0, p1))
    hi = xp.where(same, xp.maximum(p0, q), xp.maximum(p0, p1))
    zero = xp.zeros_like(v0)
    total = v0 + v1
    first = p0 < p1
    v_lo = xp.where(same, xp.where(lo == p0, total, zero), xp.where(first, v0, v1))
    v_hi = xp.where(same, xp.where(hi == p0, total, zero), xp.where(first, v1, v0))
    vals = xp.stack([v_lo, v_hi], axis=-1).reshape(o, kc)
    new_pos = xp.stack([lo, hi], axis=-1).reshape(o, kc)
    return vals, _pack_positions(new_pos, words, xp)


def _validate(values, metadata, vector_index, row_perm, in_features):
    o, kc = values.shape
    nb, kv = vector_index.shape
    if kv != 2 * kc:
        raise ValueError(f"values: shape={values.shape} but vector_index: shape={vector_index.shape}: K_v/2 != {kc}")
    if metadata.shape != (o, -(-kc // 16)):
        raise ValueError(f"metadata: shape={metadata.shape}, expected {(o, -(-kc // 16))} for values {values.shape}")
    if nb < 1 or o % nb:
        raise ValueError(f"vector_index: shape={vector_index.shape}: O={o} is not a multiple of the block count")
    if row_perm.shape != (o,):
        raise ValueError(f"row_perm: shape={row_perm.shape}, expected ({o},)")
    if not np.array_equal(np.sort(row_perm), np.arange(o)):
        raise ValueError(f"row_perm: shape={row_perm.shape} is not a permutation of 0..{o - 1}")
    limit = in_features if in_features is not None else np.iinfo(np.int32).max
    if vector_index.size and (vector_index.min() < 0 or vector_index.max() >= limit):
        raise ValueError(f"vector_index: shape={vector_index.shape} has entries outside 0..{limit - 1}")
    # Unpack positions, check each group of 4 keeps two strictly ascending positions.
    pairs = unpack_positions(metadata, kc).reshape(o, kc // 2, 2)
    if not np.all(pairs[..., 0] < pairs[..., 1]):
        raise ValueError(
            f"metadata: shape={metadata.shape}: the two positions of every 2:4 group must be strictly "
            "ascending (mma.sp::ordered_metadata)"
        )


def pack(values, metadata, vector_index, row_perm, *, direct=None, in_features=None, xp=np) -> dict:
    """Packs one canonical 2:4-based matrix (HiNM(., ., 2, 4) or NM(2, 4)) for the kernel.

    Args:
      values: ``(O, K_v/2)`` float16/bfloat16.
      metadata: ``(O, ceil(K_v/32))`` uint32, 2-bit positions.
      vector_index: ``(O/V, K_v)`` int32.
      row_perm: ``(O,)`` int32.
      direct: pack for the direct (no gather) kernel. ``None``: decide from the concrete
        ``vector_index`` (numpy only); ``True`` requires the identity index of plain N:M.
      in_features: ``K``, to check the vector index against (optional): numpy raises for
        entries outside ``0..K-1``; ``jax.numpy`` maps them to :data:`INVALID_INDEX`.
      xp: ``numpy`` (validates its inputs) or ``jax.numpy`` (traceable; makes unordered
        groups ascending and out-of-range indices invalid instead of raising, see the
        module docstring).

    Returns:
      ``{"values", "metadata", "vector_index", "row_perm"}`` in the kernel's layout.

    Raises:
      ValueError: shapes or contents that break the canonical format.
    """
    o, kc = values.shape
    nb, kv = vector_index.shape
    if xp is np:
        values, metadata = np.asarray(values), np.asarray(metadata, np.uint32)
        vector_index, row_perm = np.asarray(vector_index, np.int32), np.asarray(row_perm, np.int32)
        _validate(values, metadata, vector_index, row_perm, in_features)
        if direct is None:
            direct = is_direct(vector_index)
        elif direct and not is_direct(vector_index):
            raise ValueError(f"vector_index: shape={vector_index.shape}: direct=True needs the identity index")
    else:
        if direct is None:
            raise ValueError("direct=None needs concrete (numpy) arrays; pass direct=True/False")
        # Nothing can raise under a trace: make what the kernel cannot take safe instead.
        values, metadata = ordered_pairs(values, metadata.astype(xp.uint32), xp)
        vector_index = vector_index.astype(xp.int32)
        bad = vector_index < 0
        if in_features is not None:
            bad = bad | (vector_index >= in_features)
        vector_index = xp.where(bad, xp.int32(INVALID_INDEX), vector_index)
    if direct and nb != 1:
        raise ValueError(f"vector_index: shape={vector_index.shape}: the direct kernel needs a single block")
    v = o // nb
    kvp = _round_up(max(kv, 1), K_ALIGN)
    kcp = kvp // 2
    steps = kvp // 32
    rows = _round_up(o, DIRECT_ROW_ALIGN) if direct else o
    if rows % 16:
        raise ValueError(f"values: shape={values.shape}: O={o} must be a multiple of 16 (vector size {v})")

    # Rows sorted by output channel inside each block.
    order = xp.argsort(row_perm.reshape(nb, v), axis=1, stable=True)
    order = (order + (xp.arange(nb, dtype=order.dtype) * v)[:, None]).reshape(o)
    vals = xp.take(values, order, axis=0)
    words = xp.take(metadata.astype(xp.uint32), order, axis=0)
    perm = xp.take(row_perm.astype(xp.int32), order, axis=0)

    # Metadata: one canonical word per row and k-step; fill missing groups with (0, 1).
    nw = words.shape[1]
    used = kc - 16 * (nw - 1) if nw else 0  # positions in the last canonical word
    if nw and used < 16:
        keep = np.uint32((1 << (2 * used)) - 1)
        fill = np.uint32(PAD_META_WORD & ~int(keep))
        last = (words[:, nw - 1 :] & keep) | fill
        words = xp.concatenate([words[:, : nw - 1], last], axis=1)
    words = xp.concatenate([words, xp.full((o, steps - nw), PAD_META_WORD, dtype=xp.uint32)], axis=1)

    # Padding: K_v -> K_vp (zero values), O -> rows (zero rows, channel -1).
    vals = xp.pad(vals, ((0, rows - o), (0, kcp - kc)))
    words = xp.concatenate([words, xp.full((rows - o, steps), PAD_META_WORD, dtype=xp.uint32)], axis=0)
    perm = xp.concatenate([perm, xp.full((rows - o,), -1, dtype=xp.int32)])

    # Interleave rows g and g + 8 of every 16-row tile, per half word t.
    halves = xp.stack([words & xp.uint32(0xFFFF), words >> xp.uint32(16)], axis=-1)  # (rows, steps, t)
    halves = halves.reshape(rows // 16, 2, 8, steps, 2)  # (tile, j, g, step, t); row = 16 tile + 8 j + g
    lanes = halves[:, 0] | (halves[:, 1] << xp.uint32(16))  # (tile, g, step, t)
    meta = xp.transpose(lanes, (0, 2, 1, 3)).reshape(rows // 16, steps, 16)  # word g*2 + t

    if direct:
        vidx = xp.zeros((0, kvp), dtype=xp.int32)
    else:
        vidx = xp.pad(vector_index.astype(xp.int32), ((0, 0), (0, kvp - kv)), constant_values=-1)
    # Sorted rows of a single block are the channels in order; otherwise check when concrete.
    identity = bool(direct) or (xp is np and np.array_equal(perm[:o], np.arange(o)))
    if identity:
        perm = xp.zeros((0,), dtype=xp.int32)
    return {"values": vals, "metadata": meta.astype(xp.uint32), "vector_index": vidx, "row_perm": perm}
