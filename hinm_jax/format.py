"""The canonical compressed format of a block-structured sparse weight.

One matrix of shape ``(K, O)`` (``K`` inputs, ``O`` output channels) pruned with a
pattern of block structure ``(V, K_v, n, m)`` (see :mod:`hinm_jax.patterns`) is stored as:

- ``values`` ``(O, K_v*n/m)``, the weight's dtype: row ``r`` is *packed row* ``r``, which
  computes output channel ``row_perm[r]``; entry ``i`` belongs to stripe ``i // n``.
- ``metadata`` ``(O, words)`` uint32: for each value, its position ``p`` in ``0..m-1``
  inside its stripe, ``b = ceil(log2 m)`` bits each (2 for 2:4), ``32 // b`` per word,
  least-significant bits first. Positions inside a stripe are strictly ascending.
- ``vector_index`` ``(O/V, K_v)`` int32: block ``b``'s kept input indices in N:M walk
  order. ``values[r, i]`` multiplies input ``vector_index[r // V, (i // n) * m + p]``.
- ``row_perm`` ``(O,)`` int32: the output-channel permutation ``π``.

Plain N:M is one block (``V = O``, ``vector_index = arange(K)``); VectorWise has
``n = m = 1`` and no metadata bits. Leading stack axes (scanned layers) prefix every
array. Backends add their own packed copy in ``packed`` (see :func:`pack_for`).

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))
    >>> masks = hinm_jax.prune({"w": w}, hinm_jax.HiNM(32, 0.5, 2, 4))
    >>> sw = hinm_jax.compress({"w": w}, masks)["w"]
    >>> bool(jnp.all(sw.densify() == w * masks["w"].mask))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _structure
from hinm_jax._tree import is_mask_leaf, map_with_path
from hinm_jax.masks import Mask, check_mask_shape
from hinm_jax.patterns import Pattern

__all__ = ["SparseWeight", "compress", "pack_for", "metadata_bits", "pack_metadata", "unpack_metadata"]


def metadata_bits(m: int) -> int:
    """Bits per metadata entry for stripes of ``m``: ``ceil(log2 m)`` (0 for ``m = 1``)."""
    return (m - 1).bit_length()


def pack_metadata(pos, m: int):
    """Packs positions ``(..., nnz)`` in ``0..m-1`` into uint32 words ``(..., words)``."""
    bits = metadata_bits(m)
    nnz = pos.shape[-1]
    if bits == 0:
        return jnp.zeros(pos.shape[:-1] + (0,), jnp.uint32)
    per = 32 // bits
    words = -(-nnz // per)
    pos = jnp.pad(pos.astype(jnp.uint32), [(0, 0)] * (pos.ndim - 1) + [(0, words * per - nnz)])
    pos = pos.reshape(pos.shape[:-1] + (words, per))
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).astype(jnp.uint32)
    # Fields do not overlap, so the sum is their bitwise or.
    return jnp.sum(pos << shifts, axis=-1, dtype=jnp.uint32)


def unpack_metadata(words, m: int, nnz: int):
    """Inverse of :func:`pack_metadata`: uint32 ``(..., words)`` -> int32 ``(..., nnz)``."""
    bits = metadata_bits(m)
    if bits == 0:
        return jnp.zeros(words.shape[:-1] + (nnz,), jnp.int32)
    per = 32 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).astype(jnp.uint32)
    pos = (words[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
    return pos.reshape(words.shape[:-1] + (-1,))[..., :nnz].astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """A pruned weight in the canonical compressed format (a pytree).

    Attributes:
      values: kept values ``(*stack, O, K_v*n/m)``.
      metadata: packed stripe positions ``(*stack, O, words)`` uint32.
      vector_index: ``(*stack, O/V, K_v)`` int32, each block's inputs in walk order.
      row_perm: ``(*stack, O)`` int32, packed row ``r`` computes output ``row_perm[r]``.
      packed: a backend's own copy of the arrays (see :func:`pack_for`), or ``None``.
      shape: the dense leaf's shape (static).
      pattern: the pattern it was pruned with (static).
      stack_axes: leading axes that are independent matrices (static).
      packed_for: the backend ``packed`` belongs to, or ``None`` (static).
    """

    values: jax.Array
    metadata: jax.Array
    vector_index: jax.Array
    row_perm: jax.Array
    packed: Any = None
    shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    pattern: Pattern | None = dataclasses.field(default=None, metadata=dict(static=True))
    stack_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    packed_for: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    # -- structure -------------------------------------------------------------------
    @property
    def dtype(self):
        return self.values.dtype

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(K, O)`` of each matrix."""
        _, k, o = _structure.matrix_shape(self.shape, self.stack_axes)
        return k, o

    @property
    def stack_shape(self) -> tuple:
        return tuple(self.shape[: self.stack_axes])

    @property
    def n(self) -> int:
        return self.pattern.structure(*self.matrix_shape).n

    @property
    def m(self) -> int:
        return self.pattern.structure(*self.matrix_shape).m

    @property
    def vector_size(self) -> int:
        return self.pattern.structure(*self.matrix_shape).vector_size

    @property
    def kept_inputs(self) -> int:
        return self.vector_index.shape[-1]

    def positions(self):
        """Unpacked metadata: int32 ``(*stack, O, K_v*n/m)`` stripe positions."""
        return unpack_metadata(self.metadata, self.m, self.values.shape[-1])

    def packed_tiles(self):
        """Each packed row expanded over its block's vector index: ``(*stack, O, K_v)``
        with ``tiles[r, j] = W[vector_index[r // V, j], row_perm[r]]``."""
        n, m = self.n, self.m
        pos = self.positions()
        lead = self.values.shape[:-1]
        j = self.values.shape[-1] // n
        vals = self.values.reshape(lead + (j, n))
        onehot = pos.reshape(lead + (j, n))[..., None] == jnp.arange(m, dtype=jnp.int32)
        tiles = jnp.sum(jnp.where(onehot, vals[..., None], jnp.zeros((), self.dtype)), axis=-2)
        return tiles.reshape(lead + (j * m,))

    def densify(self):
        """The dense weight ``W * mask`` in the leaf's original shape, exactly."""
        k, o = self.matrix_shape
        nb = self.vector_index.shape[-2]
        fn = lambda t, rp, vi: _structure.from_blocks(
            _structure.scatter_blocks(_structure.rows_to_blocks(t, nb), vi, k), rp
        )
        for _ in range(self.stack_axes):
            fn = jax.vmap(fn)
        return fn(self.packed_tiles(), self.row_perm, self.vector_index).reshape(self.shape)

    # -- storage ---------------------------------------------------------------------
    def storage_bytes(self, dtype=None) -> int:
        """Bytes stored: values (in ``dtype`` if given), metadata, vector index and
        permutation (the backend copy in ``packed`` is not counted)."""
        itemsize = np.dtype(dtype or self.dtype).itemsize
        return int(
            self.values.size * itemsize
            + self.metadata.size * 4
            + self.vector_index.size * 4
            + self.row_perm.size * 4
        )

    def compression_ratio(self, dtype=None) -> float:
        """``storage_bytes(dtype) / dense bytes`` in the same dtype."""
        dense = int(np.prod(self.shape)) * np.dtype(dtype or self.dtype).itemsize
        return self.storage_bytes(dtype) / dense

    def __repr__(self):
        return (
            f"SparseWeight(shape={self.shape}, pattern={self.pattern}, dtype={self.dtype}, "
            f"stack_axes={self.stack_axes}, packed_for={self.packed_for})"
        )


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _compress_matrix(w, mask, row_perm, vector_index, n, m):
    """One matrix -> (values, metadata, kept per stripe, kept outside the vector index);
    the last two let the caller check that ``mask`` follows the layout."""
    g_w = _structure.gather_packed(w, row_perm, vector_index)
    g_m = _structure.gather_packed(mask, row_perm, vector_index)
    o, kv = g_w.shape
    j = kv // m
    g_m = g_m.reshape(o, j, m)
    # Kept positions first (stable sort keeps them ascending), then the first n of each stripe.
    pos = jnp.argsort(~g_m, axis=-1, stable=True)[..., :n].astype(jnp.int32)
    vals = jnp.take_along_axis(g_w.reshape(o, j, m), pos, axis=-1)
    per_stripe = jnp.sum(g_m, axis=-1)
    outside = jnp.sum(mask) - jnp.sum(g_m)
    return vals.reshape(o, j * n), pack_metadata(pos.reshape(o, j * n), m), per_stripe, outside


def _compress_leaf(path: str, w, mask: Mask) -> SparseWeight:
    pattern = mask.pattern
    stack, k, o = _structure.matrix_shape(w.shape, mask.stack_axes)
    struct = pattern.structure(k, o)
    if struct is None or mask.layout is None:
        raise ValueError(
            f"{path}: shape={tuple(w.shape)} pattern {pattern}: this pattern has no compressed "
            "format (HiNM, NM and VectorWise do); keep it dense with apply_masks"
        )
    check_mask_shape(path, mask, w)
    fn = lambda a, b, rp, vi: _compress_matrix(a, b, rp, vi, struct.n, struct.m)
    for _ in stack:
        fn = jax.vmap(fn)
    layout = mask.layout
    vals, meta, per_stripe, outside = fn(
        w.reshape(stack + (k, o)), mask.mask.reshape(stack + (k, o)), layout.row_perm, layout.vector_index
    )
    if not isinstance(per_stripe, jax.core.Tracer):
        if bool(jnp.any(per_stripe != struct.n)) or bool(jnp.any(outside != 0)):
            raise ValueError(
                f"{path}: shape={tuple(w.shape)} pattern {pattern}: the mask does not follow its "
                f"layout (every stripe must keep exactly n={struct.n} of m={struct.m}, and nothing "
                "outside the vector index)"
            )
    return SparseWeight(
        values=vals,
        metadata=meta,
        vector_index=layout.vector_index,
        row_perm=layout.row_perm,
        shape=tuple(w.shape),
        pattern=pattern,
        stack_axes=mask.stack_axes,
    )


def compress(params, masks):
    """Compresses every pruned leaf of ``params`` into a :class:`SparseWeight`.

    Leaves whose mask is ``None`` are returned unchanged. Works eagerly and under
    ``jax.jit`` (under jit the layout check is skipped).

    Args:
      params: a parameter pytree.
      masks: the pytree returned by :func:`hinm_jax.prune` for ``params``.

    Returns:
      ``params`` with pruned leaves replaced by :class:`SparseWeight`.

    Example:
        >>> import jax, hinm_jax
        >>> params = {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}
        >>> sparse = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:64:0.5:2:4"))
        >>> round(sparse["kernel"].compression_ratio("float16"), 3)
        0.297
    """

    def one(path, mask, w):
        if mask is None:
            return w
        return _compress_leaf(path, jnp.asarray(w), mask)

    return map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")


_BACKEND_MODULES = {"pallas": "hinm_jax._pallas", "cuda": "hinm_jax._cuda"}


def backend_module(name: str):
    """The adapter module of a kernel backend (``"pallas"`` or ``"cuda"``)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"implementation={name!r}: expected one of {sorted(_BACKEND_MODULES)} or 'xla'")
    return importlib.import_module(_BACKEND_MODULES[name])


def pack_for(params, implementation: str):
    """Adds a backend's packed copy to every :class:`SparseWeight` in ``params``, once,
    so that :func:`hinm_jax.sparse_matmul` does not repack on every call.

    Example:
        >>> sparse = hinm_jax.pack_for(sparse, "cuda")  # doctest: +SKIP
    """
    if implementation == "xla":
        return params
    mod = backend_module(implementation)

    def one(leaf):
        if not isinstance(leaf, SparseWeight):
            return leaf
        return dataclasses.replace(leaf, packed=mod.pack(leaf), packed_for=implementation)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, SparseWeight))
