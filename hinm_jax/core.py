"""The mask of one ``(K, O)`` matrix: the rules of ``shared/SPEC.md``, once.

Everything else builds on these functions: :mod:`hinm_jax.masks` maps them over a
pytree, :mod:`hinm_jax.permute` searches the :class:`Layout` they take,
:mod:`hinm_jax.format` compresses in it, and :mod:`hinm_jax.optim` recomputes masks with
them inside a jitted train step (with traced sparsity levels).

A block-structured pattern (:class:`~hinm_jax.patterns.HiNM`, ``NM``, ``VectorWise``)
has a block structure ``(V, K_v, n, m)`` (:meth:`Pattern.structure`):

1. the *vector step* (:func:`vector_step`): each block of ``V`` output channels (in the
   order ``row_perm``) keeps the ``K_v`` inputs with the highest block score sum;
2. the *N:M step* (:func:`nm_step`): walking each block's kept inputs in vector-index
   order, every output channel keeps the ``n`` best of each ``m`` consecutive entries.

Scores are cleaned first (:func:`clean_score`): NaN counts as least important, ``±inf``
are ordered as the extremes, and sums of scores (block sums, HSS group values) are
:func:`ordered_sum`: never NaN, so every pattern keeps exactly its density whatever the
scores. Ties break towards the lowest index everywhere.

Example:
    >>> import jax.numpy as jnp
    >>> from hinm_jax import core, patterns
    >>> mask, layout = core.matrix_mask(jnp.arange(32.0).reshape(8, 4), patterns.HiNM(2, 0.5, 1, 2))
    >>> layout.vector_index.tolist()
    [[4, 5, 6, 7], [4, 5, 6, 7]]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _structure
from hinm_jax.patterns import HSS, Pattern, Unstructured

__all__ = [
    "Layout",
    "check_layout",
    "is_concrete",
    "clean_score",
    "ordered_sum",
    "magnitude",
    "matrix_shape",
    "stripe_keep",
    "vector_step",
    "nm_blocks",
    "nm_step",
    "mask_from_layout",
    "matrix_mask",
    "scheduled_kept_inputs",
    "block_mask_at",
    "unstructured_mask_at",
]

matrix_shape = _structure.matrix_shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a block-structured mask lives.

    Attributes:
      row_perm: ``(*stack, O)`` int32, the output-channel permutation ``π``: packed row
        ``r`` is output channel ``row_perm[r]``, block ``r // V``.
      vector_index: ``(*stack, O/V, K_v)`` int32, each block's kept input indices in
        N:M walk order (``σ`` applied).
    """

    row_perm: jax.Array
    vector_index: jax.Array


def is_concrete(*arrays) -> bool:
    """``True`` when no array is a tracer: their values can be read with numpy (also for
    concrete arrays closed over by a function being traced)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_layout(
    layout, pattern: Pattern, shape, stack_axes: int = 0, path: str = "layout", prefix: str = "layout "
) -> Layout:
    """The one check of a :class:`Layout` for a leaf of ``shape`` in ``pattern``.

    Always checked: ``layout`` is a :class:`Layout`, the pattern has a block structure and
    fits, ``row_perm`` has shape ``(*stack, O)`` and ``vector_index`` ``(*stack, O/V, K_v)``,
    both of an integer dtype. Checked when the arrays are concrete (skipped for tracers,
    i.e. on arrays computed inside ``jax.jit``; concrete arrays closed over by a traced
    function are checked): every ``row_perm`` is a permutation of ``0..O-1``, and every
    block's ``vector_index`` holds distinct inputs ``0 <= k < K``.

    Args:
      layout: the layout to check.
      pattern: its pattern.
      shape: the leaf's shape.
      stack_axes: leading axes of independent matrices.
      path: the leaf's path, for the messages.
      prefix: what the messages put before ``row_perm`` / ``vector_index`` (``""`` for
        a :class:`~hinm_jax.format.SparseWeight`, whose own fields they are).

    Returns:
      ``layout``.

    Raises:
      TypeError: ``layout`` is not a :class:`Layout`.
      ValueError: anything else, naming ``path``, the shape and the pattern.

    Example:
        >>> import jax.numpy as jnp
        >>> from hinm_jax.patterns import NM
        >>> lay = Layout(jnp.arange(2), jnp.array([[0, 1, 2, 3]]))
        >>> check_layout(lay, NM(2, 4), (4, 2)) is lay
        True
    """
    shape = tuple(shape)
    where = f"{path}: shape={shape} pattern {pattern}"
    if not isinstance(layout, Layout):
        raise TypeError(f"{where}: layout must be a hinm_jax.core.Layout, got {type(layout).__name__}")
    if len(shape) - stack_axes < 2:
        raise ValueError(f"{where}: needs at least 2 axes after stack_axes={stack_axes}")
    stack, k, o = matrix_shape(shape, stack_axes)
    err = pattern.fit_error(k, o)
    if err is not None:
        raise ValueError(f"{where}: does not fit: {err}")
    struct = pattern.structure(k, o)
    if struct is None:
        raise ValueError(f"{where}: has a layout, but this pattern has no block structure")
    v, kv, _, _ = struct
    rp, vi = layout.row_perm, layout.vector_index
    for name, a, want in (("row_perm", rp, stack + (o,)), ("vector_index", vi, stack + (o // v, kv))):
        if tuple(np.shape(a)) != want:
            raise ValueError(
                f"{where}: {prefix}{name} has shape {tuple(np.shape(a))}, expected {want} (layout shapes follow "
                "the leaf and its pattern)"
            )
        dt = np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype
        if dt.kind not in "iu":
            raise ValueError(f"{where}: {prefix}{name} has dtype {dt}, expected int32")
    if not is_concrete(rp, vi):
        return layout
    rp = np.asarray(rp).reshape(-1, o)
    if np.any(np.sort(rp, axis=-1) != np.arange(o)):
        raise ValueError(f"{where}: {prefix}row_perm is not a permutation of 0..{o - 1}")
    vi = np.asarray(vi).reshape(-1, kv)
    if vi.size and (vi.min() < 0 or vi.max() >= k):
        raise ValueError(f"{where}: {prefix}vector_index has entries outside 0..{k - 1}")
    if kv > 1 and np.any(np.diff(np.sort(vi, axis=-1), axis=-1) == 0):
        raise ValueError(f"{where}: {prefix}vector_index repeats an input inside a block")
    return layout


def clean_score(score):
    """``score`` in float32 with NaN replaced by ``-inf`` (least important)."""
    score = jnp.asarray(score, jnp.float32)
    return jnp.where(jnp.isnan(score), -jnp.inf, score)


def ordered_sum(x, axis, where=None):
    """The sum of cleaned scores (no NaN) along ``axis``, never NaN: ``+inf`` when any
    summed entry is ``+inf``, else ``-inf`` when any is ``-inf``, else the sum. Only
    ``where`` entries count (all by default)."""
    if where is not None:
        x = jnp.where(where, x, 0.0)
    finite = jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0), axis=axis)
    total = jnp.where(jnp.any(x == -jnp.inf, axis=axis), -jnp.inf, finite)
    total = jnp.where(jnp.any(x == jnp.inf, axis=axis), jnp.inf, total)
    return jnp.where(jnp.isnan(total), -jnp.inf, total)


def magnitude(w):
    """``|W|`` in float32, the default importance score.

    Example:
        >>> import jax.numpy as jnp
        >>> magnitude(jnp.array([-2.0, 1.0])).tolist()
        [2.0, 1.0]
    """
    return jnp.abs(jnp.asarray(w)).astype(jnp.float32)


def stripe_keep(s, n):
    """Keeps the ``n`` highest of the last axis (ties: lowest index wins); ``n`` may be
    traced."""
    m = s.shape[-1]
    if isinstance(n, int) and n >= m:
        return jnp.ones(s.shape, bool)
    i = jnp.arange(m)
    a = s[..., :, None]  # s_i
    b = s[..., None, :]  # s_j
    beats = (b > a) | ((b == a) & (i[None, :] < i[:, None]))
    return jnp.sum(beats, axis=-1) < n


def vector_step(score, row_perm, vector_size: int, kept_inputs: int):
    """Each block's ``kept_inputs`` best input indices, ascending: ``(O/V, K_v)`` int32.

    ``row_perm=None`` is the identity permutation.
    """
    k, o = score.shape
    nb = o // vector_size
    if kept_inputs == k:
        return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (nb, k))
    block = ordered_sum(_structure.to_blocks(score, row_perm, nb), axis=2).T  # (nb, K)
    _, idx = jax.lax.top_k(block, kept_inputs)  # ties: lowest index first
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def nm_blocks(g, n, m: int):
    """The N:M choice on blocked scores ``(nb, L, V)`` walked along ``L`` (a multiple of
    ``m``); ``n`` may be traced. Returns a bool ``(nb, L, V)``."""
    nb, length, v = g.shape
    keep = stripe_keep(jnp.moveaxis(g.reshape(nb, length // m, m, v), 2, 3), n)  # (nb, J, V, m)
    return jnp.moveaxis(keep, 3, 2).reshape(g.shape)


def nm_step(score, row_perm, vector_index, n, m: int):
    """The N:M step of one cleaned ``(K, O)`` score matrix in a given layout: a bool
    ``(K, O)`` mask; ``n`` may be traced."""
    nb = vector_index.shape[0]
    k = score.shape[0]
    g = _structure.gather_blocks(_structure.to_blocks(score, row_perm, nb), vector_index)  # (nb, K_v, V)
    return _structure.from_blocks(_structure.scatter_blocks(nm_blocks(g, n, m), vector_index, k), row_perm)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def mask_from_layout(score, row_perm, vector_index, n: int, m: int):
    """The N:M step of one ``(K, O)`` matrix in a given layout: a bool ``(K, O)`` mask.

    Example:
        >>> import jax.numpy as jnp
        >>> vi = jnp.array([[0, 1, 2, 3]], jnp.int32)
        >>> mask_from_layout(jnp.arange(4.0)[:, None], jnp.array([0]), vi, 2, 4)[:, 0].tolist()
        [False, False, True, True]
    """
    return nm_step(clean_score(score), row_perm, vector_index, n, m)


def _hss_mask(score, levels):
    s = score.T  # (O, K): groups run along the input axis of each output channel
    o, k = s.shape
    keep = jnp.ones((o, k), bool)
    group, unit = s, 1
    for n, m in reversed(levels):
        g = group.reshape(o, -1, m)
        kg = stripe_keep(g, n)
        keep = keep & jnp.repeat(kg.reshape(o, -1), unit, axis=-1)
        group = ordered_sum(g, axis=-1, where=kg)
        unit *= m
    return keep.T


def _unstructured_mask(score, count: int):
    flat = score.reshape(-1)
    _, idx = jax.lax.top_k(flat, count)  # ties: lowest index first
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(score.shape)


@functools.partial(jax.jit, static_argnames=("pattern",))
def matrix_mask(score, pattern: Pattern, row_perm=None):
    """The mask of one ``(K, O)`` matrix of scores, in SPEC semantics.

    Args:
      score: ``(K, O)`` importance (NaN counts as least important).
      pattern: the pattern.
      row_perm: an output-channel permutation for block patterns (identity if ``None``).

    Returns:
      ``(mask, layout)``: a bool ``(K, O)`` mask and its :class:`Layout` (``None`` for
      patterns without block structure).

    Example:
        >>> import jax.numpy as jnp
        >>> from hinm_jax.patterns import NM
        >>> mask, layout = matrix_mask(jnp.arange(16.0).reshape(8, 2), NM(2, 4))
        >>> mask[:, 0].tolist()
        [False, False, True, True, False, False, True, True]
    """
    score = clean_score(score)
    k, o = score.shape
    if isinstance(pattern, Unstructured):
        return _unstructured_mask(score, pattern.kept_count(k * o)), None
    if isinstance(pattern, HSS):
        return _hss_mask(score, pattern.levels), None
    v, kv, n, m = pattern.structure(k, o)
    if row_perm is not None:
        row_perm = jnp.asarray(row_perm, jnp.int32)
    vector_index = vector_step(score, row_perm, v, kv)
    mask = nm_step(score, row_perm, vector_index, n, m)
    if row_perm is None:
        row_perm = jnp.arange(o, dtype=jnp.int32)
    return mask, Layout(row_perm, vector_index)


# ---------------------------------------------------------------------------------------
# Traced sparsity levels (gradual sparsity inside a jitted train step)
# ---------------------------------------------------------------------------------------


def scheduled_kept_inputs(pattern: Pattern, k: int, o: int, fraction):
    """``K_v`` at a (traced) fraction ``f`` of the pattern's vector sparsity ``s``:
    :meth:`Pattern.structure`'s rule ``floor(K (1 - f s) / m) m`` evaluated at ``f s``,
    never below the target ``K_v`` (reached exactly at ``f = 1``) and ``K`` at ``f s = 0``.

    Example:
        >>> from hinm_jax.patterns import HiNM
        >>> int(scheduled_kept_inputs(HiNM(4, 0.5), 64, 8, 0.5))
        48
    """
    v, kv, n, m = pattern.structure(k, o)
    s_t = jnp.asarray(fraction, jnp.float32) * float(getattr(pattern, "vector_sparsity", 0.0))
    kv_t = (jnp.floor(k * (1.0 - s_t) / m) * m).astype(jnp.int32)
    return jnp.where(s_t <= 0.0, k, jnp.clip(kv_t, kv, k))


def _rank(score):
    """Rank of each entry along the last axis, best first (ties: lowest index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)
    flat = order.reshape(-1, score.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    ranks = jnp.zeros(flat.shape, jnp.int32).at[rows, flat].set(
        jnp.arange(flat.shape[1], dtype=jnp.int32)[None, :], unique_indices=True
    )
    return ranks.reshape(score.shape), order


def block_mask_at(score, row_perm, vector_size: int, kept_inputs: int, n: int, m: int, kv_t, n_t):
    """A block-structured mask whose levels are traced: every block keeps its ``kv_t``
    best input indices (walked in ascending order), every output channel ``n_t`` of
    every ``m`` of them. Static shapes throughout: a fixed-size rank mask replaces the
    vector step's ``top_k``.

    Returns ``(mask, vector_index)``; ``vector_index`` is each block's ``kept_inputs``
    (the target ``K_v``) best indices, ascending: the layout the schedule converges to.
    With ``kv_t == kept_inputs`` and ``n_t == n`` the mask equals :func:`matrix_mask`.
    """
    k, o = score.shape
    nb = o // vector_size
    sb = _structure.to_blocks(score, row_perm, nb)  # (K, nb, V)
    rank, order = _rank(ordered_sum(sb, axis=2).T)  # (nb, K)
    idx = jnp.arange(k, dtype=jnp.int32)
    walk = jnp.argsort(jnp.where(rank < kv_t, idx, idx + k), axis=-1).astype(jnp.int32)  # kept first, ascending
    valid = (idx < kv_t)[None, :, None]
    g = jnp.where(valid, _structure.gather_blocks(sb, walk), -jnp.inf)  # (nb, K, V) in walk order
    kp = -(-k // m) * m
    g = jnp.pad(g, ((0, 0), (0, kp - k), (0, 0)), constant_values=-jnp.inf)
    keep = nm_blocks(g, n_t, m)[:, :k] & valid
    mask = _structure.from_blocks(_structure.scatter_blocks(keep, walk, k), row_perm)
    vector_index = jnp.sort(order[:, :kept_inputs], axis=-1).astype(jnp.int32)
    return mask, vector_index


def unstructured_mask_at(score, count):
    """The ``count`` (traced) best entries of ``score`` (ties: lowest index first)."""
    rank, _ = _rank(score.reshape(-1))
    return (rank < count).reshape(score.shape)
