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
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import core
from hinm_jax._tree import flatten_with_paths, map_with_path
from hinm_jax.core import Layout, check_layout, mask_from_layout, matrix_mask
from hinm_jax.patterns import Pattern, as_pattern

__all__ = [
    "Layout",
    "Mask",
    "prune",
    "apply_masks",
    "ste_apply",
    "summary",
    "Summary",
    "matrix_mask",
    "mask_from_layout",
    "named_leaves",
    "is_mask_leaf",
    "leaf_scores",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """The mask of one pruned leaf (a pytree).

    Attributes:
      mask: bool, the leaf's shape, in original coordinates.
      layout: the :class:`~hinm_jax.core.Layout`, or ``None`` for patterns without
        block structure.
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

    def validate(self, path: str = "mask") -> "Mask":
        """Checks that this is a consistent mask; raises naming ``path``, the shape and the
        pattern, else returns ``self``.

        Checked: ``pattern`` is a :class:`~hinm_jax.patterns.Pattern` and ``stack_axes`` an
        int leaving 2 axes (``TypeError`` otherwise), ``mask`` is a bool array whose matrix
        fits the pattern, a block pattern has a layout (checked with
        :func:`~hinm_jax.core.check_layout`, whose value checks run on concrete arrays
        only) and other patterns none. A mask need not keep exactly ``n`` of every ``m``
        (gradual sparsity keeps more); :func:`hinm_jax.compress` checks that.

        Example:
            >>> import jax.numpy as jnp, hinm_jax
            >>> m = hinm_jax.prune({"w": jnp.ones((8, 4))}, "2:4")["w"]
            >>> m.validate("w") is m
            True
        """
        shape = tuple(np.shape(self.mask))
        where = f"{path}: shape={shape} pattern {self.pattern}"
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"{where}: pattern must be a hinm_jax Pattern, got {type(self.pattern).__name__}")
        sa = self.stack_axes
        if not isinstance(sa, (int, np.integer)) or isinstance(sa, bool):
            raise TypeError(f"{where}: stack_axes={sa!r}: expected an int")
        if not 0 <= sa <= len(shape) - 2:
            raise ValueError(f"{where}: stack_axes={sa!r}: expected an int leaving at least 2 axes")
        dtype = getattr(self.mask, "dtype", None)
        if dtype != jnp.bool_:
            raise ValueError(f"{where}: mask has dtype {dtype}, expected bool (a hinm_jax.Mask from prune)")
        _, k, o = core.matrix_shape(shape, sa)
        err = self.pattern.fit_error(k, o)
        if err is not None:
            raise ValueError(f"{where}: does not fit: {err}")
        if self.pattern.structure(k, o) is None:
            if self.layout is not None:
                raise ValueError(f"{where}: has a layout, but this pattern has no block structure")
            return self
        if self.layout is None:
            raise ValueError(f"{where}: has no layout, but this pattern has a block structure")
        check_layout(self.layout, self.pattern, shape, sa, path)
        return self


def is_mask_leaf(x) -> bool:
    """``True`` for the leaves of a masks pytree: a :class:`Mask` or ``None``."""
    return x is None or isinstance(x, Mask)


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
    _, k, o = core.matrix_shape(leaf.shape, stack_axes)
    return pattern.fit_error(k, o)


def _stack_axes(path: str, leaf, stack_axes) -> int:
    sa = stack_axes(path, leaf) if callable(stack_axes) else stack_axes
    if not isinstance(sa, (int, np.integer)) or isinstance(sa, bool):
        raise TypeError(f"{path}: stack_axes={sa!r}: expected an int")
    if sa < 0:
        raise ValueError(f"{path}: stack_axes={sa!r}: must be >= 0")
    return int(sa)


class _Plan(NamedTuple):
    pattern: Pattern | None
    stack_axes: int
    reason: str | None  # why the leaf is left dense


def _plan(path: str, leaf, pattern, where, stack_axes) -> _Plan:
    sa = _stack_axes(path, leaf, stack_axes)
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


def leaf_scores(params, score, wanted: Callable[[str], bool]) -> dict:
    """``{path: score}`` for the leaves of ``params`` whose path is ``wanted``.

    ``score`` is the same everywhere in hinm_jax (:func:`prune`, :func:`hinm_jax.optim.sparsify`,
    :func:`hinm_jax.optim.refresh`, :func:`hinm_jax.optim.repermute`): ``None`` for
    ``|W|``, a pytree like ``params`` (e.g. :func:`hinm_jax.scores.taylor`) or a function
    ``(path, leaf) -> array``. Each score must have its leaf's shape.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf_scores({"w": jnp.array([[-2.0]])}, None, lambda p: True)["w"].tolist()
        [[2.0]]
    """
    leaves = flatten_with_paths(params)
    if score is not None and not callable(score):
        map_with_path(lambda *_: None, params, score, what="score")  # names the first path that differs
        given = jax.tree_util.tree_structure(params).flatten_up_to(score)
    else:
        given = [None] * len(leaves)
    items = [(path, leaf, s) for (path, leaf), s in zip(leaves, given)]
    out = {}
    for path, leaf, s in items:
        if not wanted(path):
            continue
        if score is None:
            s = core.magnitude(leaf)
        elif callable(score):
            s = score(path, leaf)
        if s is None:
            raise ValueError(f"{path}: shape={tuple(leaf.shape)}: the score pytree has no score for this leaf")
        if not hasattr(s, "shape"):
            raise TypeError(f"{path}: shape={tuple(leaf.shape)}: its score is a {type(s).__name__}, expected an array")
        if tuple(s.shape) != tuple(leaf.shape):
            raise ValueError(f"{path}: shape={tuple(leaf.shape)} but its score has shape {tuple(s.shape)}")
        out[path] = s
    return out


def _leaf_mask(leaf, s, plan: _Plan, layout: Layout | None = None) -> Mask:
    stack, k, o = core.matrix_shape(leaf.shape, plan.stack_axes)
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
        ``(path, leaf) -> array`` (see :func:`leaf_scores`).
      where: a predicate ``(path, leaf) -> bool`` or a path regex choosing the leaves
        to prune (paths look like ``"encoder/layer_0/query/kernel"``: the keys joined by
        ``"/"``, a ``"/"`` inside a key kept as is; two leaves with the same path raise a
        ``ValueError`` naming both). A chosen leaf that
        does not fit raises. By default every floating leaf with >= 2 axes that fits the
        pattern is pruned, except embedding tables (see :func:`summary` for what was
        skipped and why).
      stack_axes: leading axes of independent matrices (scanned layers), an int or a
        function ``(path, leaf) -> int``.
      permute: ``None`` (identity layout), ``"ocp"``, ``"ivp"`` or ``"2cp"``: search a
        layout per matrix with :mod:`hinm_jax.permute` (eager; not under ``jit``).
      key: PRNG key for the permutation search (required with ``permute``).
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
    if permute is not None and key is None:
        raise ValueError(f"permute={permute!r} needs key= (a PRNG key, e.g. jax.random.key(0)) for the search")
    plan_of = {p: _plan(p, leaf, pattern, where, stack_axes) for p, leaf in _flat_with_path(params)}
    scored = leaf_scores(params, score, lambda p: plan_of[p].pattern is not None)

    layouts = {}
    if permute is not None:
        from hinm_jax import permute as _permute

        layouts = _permute.search_tree(
            list(scored.items()),
            {p: plan_of[p].pattern for p in scored},
            stack_axes={p: plan_of[p].stack_axes for p in scored},
            method=permute,
            key=key,
            **dict(permute_options or {}),
        )

    def one(path, leaf):
        plan = plan_of[path]
        if plan.pattern is None:
            return None
        return _leaf_mask(leaf, scored[path], plan, layouts.get(path))

    return map_with_path(one, params)


def _flat_with_path(tree):
    return flatten_with_paths(tree, is_leaf=is_mask_leaf)


def named_leaves(tree) -> dict:
    """``{path: leaf}`` of a params or masks pytree (a :class:`Mask` or ``None`` counts as
    one leaf), with the paths :func:`prune` uses (two leaves with the same path raise).

    Example:
        >>> import jax.numpy as jnp, hinm_jax
        >>> masks = hinm_jax.prune({"a": {"w": jnp.ones((8, 4))}}, "2:4")
        >>> list(named_leaves(masks))
        ['a/w']
    """
    return dict(_flat_with_path(tree))


def apply_masks(params, masks):
    """``params`` with every masked leaf multiplied by its mask (others unchanged).

    A leaf keeps its dtype: a numpy float64 / complex128 leaf with ``jax_enable_x64`` off
    is masked with numpy (eagerly; under ``jax.jit`` it raises a ``TypeError``).

    Example:
        >>> import jax, hinm_jax
        >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
        >>> sparse = hinm_jax.apply_masks(params, hinm_jax.prune(params, "2:4"))
        >>> float((sparse["w"] == 0).mean())
        0.5
    """

    def one(path, w, mask):
        if narrowed_by_jax(w):
            if not core.is_concrete(mask):
                refuse_narrowed(path, w, "apply_masks under jax.jit")
            return np.where(np.asarray(mask), w, np.zeros((), w.dtype))  # keeps float64 / complex128
        return jnp.where(mask, w, jnp.zeros((), w.dtype))

    return map_masked(one, params, masks, with_path=True)


@jax.custom_jvp
def _ste(w, mask):
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


@_ste.defjvp
def _ste_jvp(primals, tangents):
    w, mask = primals
    w_dot, _ = tangents
    return _ste(w, mask), w_dot  # straight through: d(W*mask)/dW := identity


def ste_apply(params, masks):
    """``params`` with every masked leaf replaced by ``W * mask`` in the forward pass and
    the identity in the backward pass (straight-through estimator).

    Use it inside the loss: the model computes with the sparse weights, and
    ``jax.grad`` returns ``dL/d(W*mask)`` for every entry of the dense ``W`` (pruned
    entries included), which is what lets a pruned weight grow back when masks are
    refreshed.

    Args:
      params: the dense parameter pytree.
      masks: a pytree like ``params`` of :class:`Mask` / ``None`` (from :func:`prune` or
        :func:`hinm_jax.optim.get_masks`).

    Returns:
      A pytree like ``params``.

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2)}
        >>> masks = hinm_jax.prune(params, "2:4")
        >>> g = jax.grad(lambda p: jnp.sum(ste_apply(p, masks)["w"]))(params)
        >>> g["w"].tolist()  # every entry, pruned or not
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    def one(path, w, mask):
        refuse_narrowed(path, w, "ste_apply")
        return _ste(w, mask)

    return map_masked(one, params, masks, with_path=True)


def narrowed_by_jax(w) -> bool:
    """``True`` for a numpy leaf whose dtype jax would narrow (float64 or complex128 with
    ``jax_enable_x64`` off, as :func:`hinm_jax.interop.from_torch` hands them over)."""
    return isinstance(w, (np.ndarray, np.generic)) and jax.dtypes.canonicalize_dtype(w.dtype) != w.dtype


def refuse_narrowed(path: str, w, what: str) -> None:
    """Raises a ``TypeError`` naming ``path`` when jax would silently narrow leaf ``w``."""
    if narrowed_by_jax(w):
        raise TypeError(
            f"{path}: shape={tuple(w.shape)} dtype {w.dtype}: {what} would compute it in "
            f"{jax.dtypes.canonicalize_dtype(w.dtype)} (jax_enable_x64 is off); enable x64 "
            "(jax.config.update('jax_enable_x64', True)) or cast the leaf yourself"
        )


def check_mask_shape(path: str, mask, w) -> None:
    """Checks the mask of leaf ``w`` (a ``TypeError`` when it is not a :class:`Mask`, else
    :meth:`Mask.validate`) and that it has ``w``'s shape (``ValueError``), naming ``path``."""
    if not isinstance(mask, Mask):
        raise TypeError(
            f"{path}: shape={tuple(np.shape(w))}: expected a hinm_jax.Mask (from hinm_jax.prune) or None, "
            f"got {type(mask).__name__}"
        )
    if tuple(np.shape(mask.mask)) != tuple(np.shape(w)):
        raise ValueError(
            f"{path}: shape={tuple(np.shape(w))} but its mask ({mask.pattern}) has shape {tuple(np.shape(mask.mask))}"
        )
    mask.validate(path)


def map_masked(fn, params, masks, with_path: bool = False):
    """``fn(w, mask)`` (``fn(path, w, mask)`` ``with_path``) on every masked leaf (``mask``
    the bool array), other leaves unchanged; each mask is checked with
    :func:`check_mask_shape`, naming the path."""

    def one(path, mask, w):
        if mask is None:
            return w
        check_mask_shape(path, mask, w)
        return fn(path, w, mask.mask) if with_path else fn(w, mask.mask)

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
