"""Masks in a pattern for every selected leaf of a parameter pytree.

:func:`prune` walks a parameter pytree (a linen param dict, an nnx ``State``, any pytree
of arrays), chooses which leaves to prune, and returns a pytree shaped like ``params``
holding a :class:`Mask` for every pruned leaf and ``None`` for every leaf left dense.
A :class:`Mask` carries the boolean mask (in the leaf's original coordinates) and, for
block-structured patterns, the :class:`Layout` it was computed in: the output-channel
permutation ``π`` and each block's vector index in walk order (``σ`` applied), so that
compression never searches again and a mask refresh can reuse the layout.

Example:
    >>> import jax, hinm_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64)),
    ...                     "bias": jax.numpy.zeros(64)}}
    >>> masks = hinm_jax.prune(params, hinm_jax.HiNM(32, 0.5, 2, 4))
    >>> masks["dense"]["bias"] is None, float(masks["dense"]["kernel"].density)
    (True, 0.25)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _structure, scores as _scores
from hinm_jax._tree import is_mask_leaf, map_with_path, path_str
from hinm_jax.patterns import HSS, Pattern, Unstructured, as_pattern

__all__ = [
    "Layout",
    "Mask",
    "prune",
    "apply_masks",
    "summary",
    "Summary",
    "matrix_mask",
    "mask_from_layout",
    "named_leaves",
]


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """The mask of one pruned leaf (a pytree).

    Attributes:
      mask: bool, the leaf's shape, in original coordinates.
      layout: the :class:`Layout`, or ``None`` for patterns without block structure.
      pattern: the pattern (static).
      stack_axes: leading axes that are independent matrices (static).
    """

    mask: jax.Array
    layout: Layout | None
    pattern: Pattern = dataclasses.field(metadata=dict(static=True))
    stack_axes: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def density(self):
        """Fraction of the leaf kept."""
        return jnp.mean(self.mask.astype(jnp.float32))


# ---------------------------------------------------------------------------------------
# One matrix (K, O)
# ---------------------------------------------------------------------------------------


def _clean(score):
    score = jnp.asarray(score, jnp.float32)
    return jnp.where(jnp.isnan(score), -jnp.inf, score)


def stripe_keep(s, n: int):
    """Keeps the ``n`` highest of the last axis (ties: lowest index wins); ``n`` may
    be traced."""
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
    block = _structure.to_blocks(score, row_perm, nb).sum(axis=2).T  # (nb, K)
    _, idx = jax.lax.top_k(block, kept_inputs)  # ties: lowest index first
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def _nm_step(score, row_perm, vector_index, n: int, m: int):
    nb, kv = vector_index.shape
    k = score.shape[0]
    g = _structure.gather_blocks(_structure.to_blocks(score, row_perm, nb), vector_index)  # (nb, K_v, V)
    keep = stripe_keep(jnp.moveaxis(g.reshape(nb, kv // m, m, -1), 2, 3), n)  # (nb, J, V, m)
    keep = jnp.moveaxis(keep, 3, 2).reshape(g.shape)
    return _structure.from_blocks(_structure.scatter_blocks(keep, vector_index, k), row_perm)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def mask_from_layout(score, row_perm, vector_index, n: int, m: int):
    """The N:M step of one ``(K, O)`` matrix in a given layout: a bool ``(K, O)`` mask."""
    return _nm_step(_clean(score), row_perm, vector_index, n, m)


def _hss_mask(score, levels):
    s = score.T  # (O, K): groups run along the input axis of each output channel
    o, k = s.shape
    keep = jnp.ones((o, k), bool)
    group, unit = s, 1
    for n, m in reversed(levels):
        g = group.reshape(o, -1, m)
        kg = stripe_keep(g, n)
        keep = keep & jnp.repeat(kg.reshape(o, -1), unit, axis=-1)
        group = jnp.sum(jnp.where(kg, g, 0.0), axis=-1)
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
        >>> mask, layout = matrix_mask(jnp.arange(16.0).reshape(8, 2), NM(2, 4))
        >>> mask[:, 0].tolist()
        [False, False, True, True, False, False, True, True]
    """
    score = _clean(score)
    k, o = score.shape
    if isinstance(pattern, Unstructured):
        return _unstructured_mask(score, pattern.kept_count(k * o)), None
    if isinstance(pattern, HSS):
        return _hss_mask(score, pattern.levels), None
    v, kv, n, m = pattern.structure(k, o)
    if row_perm is not None:
        row_perm = jnp.asarray(row_perm, jnp.int32)
    vector_index = vector_step(score, row_perm, v, kv)
    mask = _nm_step(score, row_perm, vector_index, n, m)
    if row_perm is None:
        row_perm = jnp.arange(o, dtype=jnp.int32)
    return mask, Layout(row_perm, vector_index)


# ---------------------------------------------------------------------------------------
# Pytrees
# ---------------------------------------------------------------------------------------

_EMBEDDING = re.compile(r"embed", re.IGNORECASE)


def _default_skip(path: str, leaf) -> str | None:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return "not an array"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"dtype {leaf.dtype} is not floating point"
    if leaf.ndim < 2:
        return f"{leaf.ndim}-d (bias, norm or scalar)"
    if path.rsplit("/", 1)[-1] == "bias":
        return "bias"
    if _EMBEDDING.search(path):
        return "embedding table"
    return None


def _pattern_for(path: str, leaf, pattern) -> Pattern | None:
    if isinstance(pattern, Mapping):
        for regex, pat in pattern.items():
            if re.search(regex, path):
                pattern = pat
                break
        else:
            return None
    elif callable(pattern) and not isinstance(pattern, Pattern):
        pattern = pattern(path, leaf)
    if pattern is None:
        return None
    return as_pattern(pattern)


def _fit_error(leaf, pattern: Pattern, stack_axes: int) -> str | None:
    if leaf.ndim - stack_axes < 2:
        return f"needs at least 2 axes after stack_axes={stack_axes}"
    _, k, o = _structure.matrix_shape(leaf.shape, stack_axes)
    return pattern.fit_error(k, o)


class _Plan(NamedTuple):
    pattern: Pattern | None
    stack_axes: int
    reason: str | None  # why the leaf is left dense


def _plan(path: str, leaf, pattern, where, stack_axes) -> _Plan:
    sa = stack_axes(path, leaf) if callable(stack_axes) else int(stack_axes)
    if where is not None:
        selected = bool(re.search(where, path)) if isinstance(where, str) else bool(where(path, leaf))
        if not selected:
            return _Plan(None, sa, "excluded by where")
    else:
        reason = _default_skip(path, leaf)
        if reason is not None:
            return _Plan(None, sa, reason)
    pat = _pattern_for(path, leaf, pattern)
    if pat is None:
        return _Plan(None, sa, "no pattern for this path")
    if where is not None:
        reason = _default_skip(path, leaf)
        if reason is not None and reason != "embedding table":
            raise ValueError(f"{path}: shape={tuple(getattr(leaf, 'shape', ()))} pattern {pat}: cannot prune: {reason}")
    err = _fit_error(leaf, pat, sa)
    if err is not None:
        if where is not None:
            raise ValueError(f"{path}: shape={tuple(leaf.shape)} does not fit pattern {pat}: {err}")
        return _Plan(None, sa, f"does not fit {pat}: {err}")
    return _Plan(pat, sa, None)


def _score_for(path: str, leaf, score, score_leaf):
    if score is None:
        s = _scores.magnitude(leaf)
    elif callable(score):
        s = score(path, leaf)
    else:
        s = score_leaf
    if s is None:
        raise ValueError(f"{path}: shape={tuple(leaf.shape)}: the score pytree has no score for this leaf")
    if tuple(s.shape) != tuple(leaf.shape):
        raise ValueError(f"{path}: shape={tuple(leaf.shape)} but its score has shape {tuple(s.shape)}")
    return s


def _leaf_mask(leaf, s, plan: _Plan, layout: Layout | None = None) -> Mask:
    stack, k, o = _structure.matrix_shape(leaf.shape, plan.stack_axes)
    s = jnp.asarray(s).reshape(stack + (k, o))
    pattern = plan.pattern
    if layout is None:
        fn = lambda x: matrix_mask(x, pattern)
        for _ in stack:
            fn = jax.vmap(fn)
        mask, layout = fn(s)
    else:
        _, _, n, m = pattern.structure(k, o)
        fn = lambda x, rp, vi: mask_from_layout(x, rp, vi, n, m)
        for _ in stack:
            fn = jax.vmap(fn)
        mask = fn(s, layout.row_perm, layout.vector_index)
    return Mask(mask.reshape(leaf.shape), layout, pattern, plan.stack_axes)


def prune(
    params,
    pattern,
    *,
    score=None,
    where: Callable[[str, Any], bool] | str | None = None,
    stack_axes: int | Callable[[str, Any], int] = 0,
    permute: str | None = None,
    key: jax.Array | None = None,
    permute_options: Mapping[str, Any] | None = None,
):
    """Masks in ``pattern`` for the selected leaves of ``params``.

    Leaves are seen as ``(K, O)`` matrices: the last axis is the output channel, the
    axes before it (after ``stack_axes`` leading independent axes) are flattened into
    ``K`` (a conv kernel ``(kh, kw, I, O)`` has ``K = kh*kw*I``).

    Args:
      params: a pytree of arrays (linen ``params`` dict, nnx ``State``, ...).
      pattern: a :class:`~hinm_jax.patterns.Pattern` or its string form; or per layer,
        a dict ``{path regex: pattern | None}`` (first match wins, no match or ``None``
        leaves the layer dense) or a function ``(path, leaf) -> pattern | None``.
      score: importance, default ``|W|``: a pytree like ``params`` or a function
        ``(path, leaf) -> array``.
      where: a predicate ``(path, leaf) -> bool`` or a path regex choosing the leaves
        to prune (paths look like ``"encoder/layer_0/query/kernel"``). A chosen leaf that
        does not fit raises. By default every floating leaf with >= 2 axes that fits the
        pattern is pruned, except embedding tables (see :func:`summary` for what was
        skipped and why).
      stack_axes: leading axes of independent matrices (scanned layers), an int or a
        function ``(path, leaf) -> int``.
      permute: ``None`` (identity layout), ``"ocp"``, ``"ivp"`` or ``"2cp"``: search a
        layout per matrix with :mod:`hinm_jax.permute` (eager; not under ``jit``).
      key: PRNG key for the permutation search.
      permute_options: keyword arguments for :func:`hinm_jax.permute.search_tree`:
        ``progress=``, ``budget=`` or any :class:`hinm_jax.permute.Budget` field, e.g.
        ``{"ivp_rounds": 50}``.

    Returns:
      A pytree like ``params`` with a :class:`Mask` per pruned leaf and ``None`` elsewhere.

    Example:
        >>> import jax, hinm_jax
        >>> w = jax.random.normal(jax.random.key(0), (3, 3, 16, 64))  # a conv kernel
        >>> m = hinm_jax.prune({"conv": {"kernel": w}}, "hinm:32:0.5:2:4")
        >>> m["conv"]["kernel"].mask.shape
        (3, 3, 16, 64)
    """
    score_tree = None if (score is None or callable(score)) else score
    plan_of = {p: _plan(p, leaf, pattern, where, stack_axes) for p, leaf in _flat_with_path(params)}

    def score_of(path, leaf, s_leaf=None):
        return _score_for(path, leaf, score, s_leaf)

    if score_tree is not None:
        scored = map_with_path(
            lambda p, leaf, s: score_of(p, leaf, s) if plan_of[p].pattern is not None else None,
            params,
            score_tree,
            what="score",
        )
    else:
        scored = map_with_path(
            lambda p, leaf: score_of(p, leaf) if plan_of[p].pattern is not None else None, params
        )

    layouts = {}
    if permute is not None:
        from hinm_jax import permute as _permute

        todo = [(p, s) for p, s in _flat_with_path(scored) if s is not None]
        layouts = _permute.search_tree(
            todo,
            {p: plan_of[p] for p, _ in todo},
            method=permute,
            key=jax.random.key(0) if key is None else key,
            **dict(permute_options or {}),
        )

    def one(path, leaf, s):
        plan = plan_of[path]
        if plan.pattern is None:
            return None
        return _leaf_mask(leaf, s, plan, layouts.get(path))

    return map_with_path(one, params, scored, is_leaf=None)


def _flat_with_path(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_mask_leaf)[0]
    return [(path_str(p), x) for p, x in leaves]


def named_leaves(tree) -> dict:
    """``{path: leaf}`` of a params or masks pytree (a :class:`Mask` or ``None`` counts as
    one leaf), with the paths :func:`prune` uses.

    Example:
        >>> import jax.numpy as jnp, hinm_jax
        >>> masks = hinm_jax.prune({"a": {"w": jnp.ones((8, 4))}}, "2:4")
        >>> list(named_leaves(masks))
        ['a/w']
    """
    return dict(_flat_with_path(tree))


def apply_masks(params, masks):
    """``params`` with every masked leaf multiplied by its mask (others unchanged).

    Example:
        >>> import jax, hinm_jax
        >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
        >>> sparse = hinm_jax.apply_masks(params, hinm_jax.prune(params, "2:4"))
        >>> float((sparse["w"] == 0).mean())
        0.5
    """

    return map_masked(lambda w, mask: jnp.where(mask, w, jnp.zeros((), w.dtype)), params, masks)


def check_mask_shape(path: str, mask: Mask, w) -> None:
    """Raises a ``ValueError`` naming ``path`` when ``mask`` does not fit leaf ``w``."""
    if tuple(mask.mask.shape) != tuple(w.shape):
        raise ValueError(
            f"{path}: shape={tuple(w.shape)} but its mask ({mask.pattern}) has shape {tuple(mask.mask.shape)}"
        )


def map_masked(fn, params, masks):
    """``fn(w, mask)`` on every masked leaf (``mask`` the bool array), other leaves
    unchanged; a mask whose shape differs from its leaf raises, naming the path."""

    def one(path, mask, w):
        if mask is None:
            return w
        check_mask_shape(path, mask, w)
        return fn(w, mask.mask)

    return map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")


class SummaryRow(NamedTuple):
    path: str
    shape: tuple
    pattern: str | None
    kept: int
    total: int
    note: str


class Summary(NamedTuple):
    """What :func:`prune` did: one row per leaf. ``str(summary)`` is a table."""

    rows: tuple

    @property
    def pruned(self):
        return tuple(r for r in self.rows if r.pattern is not None)

    @property
    def skipped(self):
        return tuple(r for r in self.rows if r.pattern is None)

    @property
    def density(self) -> float:
        """Kept fraction of all parameters (pruned and dense)."""
        total = sum(r.total for r in self.rows)
        return sum(r.kept for r in self.rows) / max(total, 1)

    def __str__(self):
        lines = [f"{'path':<48} {'shape':<20} {'pattern':<18} {'density':>8}  note"]
        for r in self.rows:
            dens = f"{r.kept / max(r.total, 1):8.4f}"
            lines.append(f"{r.path:<48} {str(r.shape):<20} {r.pattern or '-':<18} {dens}  {r.note}")
        pruned = self.pruned
        pk, pt = sum(r.kept for r in pruned), sum(r.total for r in pruned)
        lines.append(
            f"pruned {len(pruned)} leaves ({pt:,} weights, density {pk / max(pt, 1):.4f}); "
            f"{len(self.skipped)} left dense; whole model density {self.density:.4f}"
        )
        return "\n".join(lines)


def summary(params, masks, pattern=None, *, where=None, stack_axes=0) -> Summary:
    """What was pruned (path, shape, pattern, density) and what was left dense and why.

    Pass the same ``pattern`` / ``where`` / ``stack_axes`` as to :func:`prune` to get
    the reason each skipped leaf was skipped.

    Example:
        >>> import jax.numpy as jnp, hinm_jax
        >>> params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
        >>> s = hinm_jax.summary(params, hinm_jax.prune(params, "2:4"), "2:4")
        >>> [r.note for r in s.rows]
        ['1-d (bias, norm or scalar)', '']
    """

    def one(path, mask, w):
        size = int(np.prod(np.shape(w)))
        if mask is not None:
            return SummaryRow(path, tuple(w.shape), str(mask.pattern), int(jnp.sum(mask.mask)), size, "")
        note = "not pruned"
        if pattern is not None:
            note = _plan(path, w, pattern, where, stack_axes).reason or note
        return SummaryRow(path, tuple(np.shape(w)), None, size, size, note)

    rows = map_with_path(one, masks, params, is_leaf=is_mask_leaf, what="masks")
    return Summary(tuple(jax.tree.leaves(rows, is_leaf=lambda x: isinstance(x, SummaryRow))))
