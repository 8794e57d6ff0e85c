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
array. Backends add their own packed copy in ``packed`` (see :func:`hinm_jax.ops.pack_for`).

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))
    >>> masks = hinm_jax.prune({"w": w}, hinm_jax.HiNM(32, 0.5, 2, 4))
    >>> sw = hinm_jax.compress({"w": w}, masks)["w"]
    >>> bool(jnp.all(sw.densify() == w * masks["w"].mask))
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _structure
from hinm_jax._tree import map_with_path
from hinm_jax.core import Layout, check_layout, is_concrete
from hinm_jax.masks import check_mask_shape, is_mask_leaf, refuse_narrowed
from hinm_jax.patterns import Pattern

__all__ = ["SparseWeight", "compress", "metadata_bits", "pack_metadata", "unpack_metadata", "expand_values"]


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


def expand_values(values, positions, n: int, m: int):
    """Values ``(..., J*n)`` and their stripe positions -> ``(..., J*m)`` with
    ``out[..., j*m + p]`` the value of stripe ``j`` at position ``p``, or zero.

    Example:
        >>> import jax.numpy as jnp
        >>> expand_values(jnp.array([5.0, 7.0]), jnp.array([1, 3]), 2, 4).tolist()
        [0.0, 5.0, 0.0, 7.0]
    """
    lead = values.shape[:-1]
    j = values.shape[-1] // n
    vals = values.reshape(lead + (j, n))
    onehot = positions.reshape(lead + (j, n))[..., None] == jnp.arange(m, dtype=positions.dtype)
    tiles = jnp.sum(jnp.where(onehot, vals[..., None], jnp.zeros((), values.dtype)), axis=-2)
    return tiles.reshape(lead + (j * m,))


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
        return expand_values(self.values, self.positions(), self.n, self.m)

    def densify(self):
        """The dense weight ``W * mask`` in the leaf's original shape, exactly."""
        k, _ = self.matrix_shape
        fn = lambda t, rp, vi: _structure.scatter_packed(t, rp, vi, k)
        for _ in range(self.stack_axes):
            fn = jax.vmap(fn)
        return fn(self.packed_tiles(), self.row_perm, self.vector_index).reshape(self.shape)

    # -- validation ------------------------------------------------------------------
    def validate(self, path: str = "w") -> "SparseWeight":
        """Checks that the arrays are a valid compressed weight of ``shape`` in ``pattern``;
        raises naming ``path``, the shape and the pattern (``TypeError`` for a ``pattern``
        or ``stack_axes`` of the wrong type, else ``ValueError``), else returns ``self``.

        Always checked: the pattern has a compressed format and fits the matrix, and
        every array has the shape and dtype kind the format prescribes. Checked when the
        arrays are concrete, including concrete arrays closed over by a function being
        traced (skipped for tracers, i.e. for arrays computed or passed in under
        ``jax.jit``): the layout's values (:func:`~hinm_jax.core.check_layout`: every
        ``vector_index`` entry is an input ``0 <= k < K`` and a block's entries are
        distinct, ``row_perm`` is a permutation of ``0..O-1``), and the metadata holds
        positions ``< m``, strictly ascending in each stripe, with zero padding bits.
        :func:`compress`, eager :func:`~hinm_jax.sparse_matmul`,
        :func:`~hinm_jax.pack_for` and :func:`hinm_jax.checkpoint.restore` call it.

        Example:
            >>> import jax, hinm_jax
            >>> p = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
            >>> sw = hinm_jax.compress(p, hinm_jax.prune(p, "2:4"))["w"]
            >>> sw.validate("w") is sw
            True
        """
        where = f"{path}: shape={tuple(self.shape)} pattern {self.pattern}"
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"{where}: pattern must be a Pattern, got {type(self.pattern).__name__}")
        if not isinstance(self.stack_axes, int) or isinstance(self.stack_axes, bool) or self.stack_axes < 0:
            raise TypeError(f"{where}: stack_axes={self.stack_axes!r}: expected an int >= 0")
        if len(self.shape) - self.stack_axes < 2:
            raise ValueError(f"{where}: needs at least 2 axes after stack_axes={self.stack_axes}")
        k, o = self.matrix_shape
        err = self.pattern.fit_error(k, o)
        if err is not None:
            raise ValueError(f"{where}: does not fit: {err}")
        struct = self.pattern.structure(k, o)
        if struct is None:
            raise ValueError(f"{where}: this pattern has no compressed format (HiNM, NM and VectorWise do)")
        v, kv, n, m = struct
        nnz = kv // m * n
        stack = self.stack_shape
        bits = metadata_bits(m)
        words = -(-nnz // (32 // bits)) if bits else 0
        for name, shape in (("values", stack + (o, nnz)), ("metadata", stack + (o, words))):
            got = tuple(np.shape(getattr(self, name)))
            if got != shape:
                raise ValueError(f"{where}: {name} has shape {got}, expected {shape}")
        if np.dtype(self.metadata.dtype) != np.uint32:
            raise ValueError(f"{where}: metadata has dtype {self.metadata.dtype}, expected uint32")
        if not jnp.issubdtype(self.values.dtype, jnp.inexact):
            raise ValueError(f"{where}: values have dtype {self.values.dtype}, expected a floating dtype")
        check_layout(Layout(self.row_perm, self.vector_index), self.pattern, self.shape, self.stack_axes, path, "")
        if not is_concrete(self.metadata):
            return self
        with jax.ensure_compile_time_eval():  # concrete arrays closed over by a trace
            pos = np.asarray(self.positions()).reshape(-1, o, nnz // n, n)
            if np.any(pos >= m) or (n > 1 and np.any(np.diff(pos, axis=-1) <= 0)):
                raise ValueError(f"{where}: metadata positions must be < m={m} and strictly ascending in each stripe")
            repacked = np.asarray(pack_metadata(jnp.asarray(pos.reshape(stack + (o, nnz))), m))
        if not np.array_equal(repacked, np.asarray(self.metadata)):
            raise ValueError(f"{where}: metadata has bits set outside its {nnz} positions")
        return self

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


def _compress_leaf(path: str, w, mask) -> SparseWeight:
    check_mask_shape(path, mask, w)
    refuse_narrowed(path, w, "compress")
    w = jnp.asarray(w)
    pattern = mask.pattern
    stack, k, o = _structure.matrix_shape(w.shape, mask.stack_axes)
    struct = pattern.structure(k, o)
    if struct is None:
        raise ValueError(
            f"{path}: shape={tuple(w.shape)} pattern {pattern}: this pattern has no compressed "
            "format (HiNM, NM and VectorWise do); keep it dense with apply_masks"
        )
    fn = lambda a, b, rp, vi: _compress_matrix(a, b, rp, vi, struct.n, struct.m)
    for _ in stack:
        fn = jax.vmap(fn)
    layout = mask.layout
    args = (w.reshape(stack + (k, o)), mask.mask.reshape(stack + (k, o)), layout.row_perm, layout.vector_index)
    concrete = is_concrete(w, mask.mask, layout.row_perm, layout.vector_index)
    with jax.ensure_compile_time_eval() if concrete else contextlib.nullcontext():
        vals, meta, per_stripe, outside = fn(*args)
        if concrete and (bool(jnp.any(per_stripe != struct.n)) or bool(jnp.any(outside != 0))):
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
    ).validate(path)


def compress(params, masks):
    """Compresses every pruned leaf of ``params`` into a :class:`SparseWeight`.

    Leaves whose mask is ``None`` are returned unchanged. Every mask is checked
    (:meth:`~hinm_jax.Mask.validate`, with :func:`~hinm_jax.core.check_layout`), it must
    follow its layout (every stripe keeps exactly ``n`` of ``m``, nothing outside the
    vector index), and every result is checked with :meth:`SparseWeight.validate`. On
    concrete arrays (eagerly, or closed over by a traced function) every check runs.
    On arrays traced under ``jax.jit`` only the static checks run (types, pattern fit,
    shapes, dtypes); these are skipped there: the mask follows its layout, ``row_perm``
    is a permutation, ``vector_index`` entries are distinct and in range, and the
    metadata positions; a damaged layout then gives a wrong result with no error, so
    compress eagerly when the masks come from elsewhere. A numpy float64 / complex128
    leaf with ``jax_enable_x64`` off raises a ``TypeError`` (its dtype is never narrowed
    silently).

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
        0.305
    """

    def one(path, mask, w):
        if mask is None:
            return w
        return _compress_leaf(path, w, mask)

    return map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")
