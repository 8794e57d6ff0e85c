"""Per-layer sparsity allocation: a HiNM vector sparsity per layer at a fixed whole-model density.

Uniform pruning gives every layer the same pattern. Layers are not equally sensitive, so
at the same number of kept weights some layers should keep more and others fewer.
:func:`allocate_sparsity` keeps the HiNM pattern of every layer (same ``V``, ``n``, ``m``:
the compressed format and every kernel apply unchanged) and chooses each layer's vector
sparsity ``s`` from a small set of candidates, so that the kept weights over the pruned
layers add up to exactly the target (by default the uniform pattern's). Two methods
give each candidate of each layer its cost:

* ``method="error"`` (default): the score mass that pruning removes (error-based
  allocation: with Wanda scores, a proxy of the output error of each layer).
* ``method="outlier"``: OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"). Each
  layer's outlier ratio (the fraction of its scores above ``outlier_threshold`` times the
  layer's mean score) sets a target density, linear in the ratio over a span of
  ``2 * outlier_range`` (more outliers, denser), whose size-weighted mean is the
  whole-model density; the cost is the squared distance to that target, times the
  layer's size.

The choice is an exact multiple-choice knapsack (dynamic programming over kept-weight
counts, in units of their greatest common divisor), so the whole-model density is met
exactly, not approximately. Each layer's cost is computed with the identity layout
(no permutation search); a permutation search afterwards moves every layer's cost alike.

Example:
    >>> import jax, hinm_jax
    >>> keys = jax.random.split(jax.random.key(0), 2)
    >>> params = {"a": jax.random.normal(keys[0], (64, 32)),
    ...           "b": jax.random.normal(keys[1], (64, 32)) * jax.numpy.arange(64.0)[:, None]}
    >>> per_layer = hinm_jax.allocate_sparsity(params, hinm_jax.HiNM(32, 0.5, 2, 4))
    >>> masks = hinm_jax.prune(params, per_layer)
    >>> hinm_jax.summary(params, masks).density  # the uniform pattern's density, exactly
    0.25
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import core
from hinm_jax._tree import flatten_with_paths
from hinm_jax.masks import _leaf_mask, _plan, is_mask_leaf, leaf_scores
from hinm_jax.patterns import HiNM, as_pattern

__all__ = ["allocate_sparsity", "allocation_table"]

_MAX_DP_CELLS = 50_000_000
_METHODS = ("error", "outlier")
_REAL = (int, float, np.integer, np.floating)


def _default_candidates(base: float) -> list[float]:
    return sorted({round(base + d, 6) for d in (-0.25, -0.125, 0.0, 0.125, 0.25) if 0.0 <= round(base + d, 6) < 1.0})


def _check_candidates(vector_sparsities, base: HiNM) -> list[float]:
    if vector_sparsities is None:
        return _default_candidates(base.vector_sparsity)
    if isinstance(vector_sparsities, (str, bytes)) or not isinstance(vector_sparsities, Sequence):
        raise TypeError(f"vector_sparsities={vector_sparsities!r}: expected a sequence of floats in [0, 1)")
    out = []
    for s in vector_sparsities:
        try:
            HiNM(base.vector_size, s, base.n, base.m)  # the pattern's own argument checks
        except (TypeError, ValueError) as e:
            raise type(e)(f"vector_sparsities: {s!r} is not a valid vector sparsity for {base}: {e}") from None
        out.append(float(s))
    if not out:
        raise ValueError("vector_sparsities: empty; give at least the base pattern's vector sparsity")
    return sorted(set(out))


def _check_arguments(pattern, density, method, cost, outlier_threshold, outlier_range) -> HiNM:
    """The base pattern; raises on any bad scalar argument (before any leaf is scored)."""
    base = as_pattern(pattern)
    if not isinstance(base, HiNM):
        raise TypeError(f"pattern={pattern!r}: allocation varies HiNM's vector sparsity; expected a HiNM pattern "
                        f"(e.g. HiNM(32, 0.5, 2, 4) or 'hinm:32:0.5:2:4'), got {type(base).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method={method!r}: expected a str, 'error' or 'outlier'")
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: expected 'error' or 'outlier'")
    if cost not in ("relative", "absolute"):
        raise ValueError(f"cost={cost!r}: expected 'relative' or 'absolute'")
    for name, value in (("outlier_threshold", outlier_threshold), ("outlier_range", outlier_range)):
        if isinstance(value, bool) or not isinstance(value, _REAL):
            raise TypeError(f"{name}={value!r}: expected a float")
    if not (math.isfinite(outlier_threshold) and outlier_threshold > 0):
        raise ValueError(f"outlier_threshold={outlier_threshold!r}: must be a finite number > 0")
    if not 0.0 <= float(outlier_range) <= 1.0:  # NaN fails too
        raise ValueError(f"outlier_range={outlier_range!r}: must be in [0, 1]")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, _REAL):
            raise TypeError(f"density={density!r}: expected a float in (0, 1]")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density={density!r}: must be in (0, 1]")
    return base


def _clean_score(path, leaf, score, base: HiNM):
    """The leaf's score as float32, NaN as 0; raises if any is negative."""
    s = jnp.asarray(score, jnp.float32)
    s = jnp.where(jnp.isnan(s), 0.0, s)
    if bool(jnp.any(s < 0)):
        raise ValueError(f"{path}: shape={tuple(leaf.shape)} pattern {base}: scores must be >= 0 "
                         f"(got a minimum of {float(jnp.min(s))})")
    return s


def _fitting(path, leaf, plan, base: HiNM, candidates) -> list[tuple[HiNM, int]]:
    """``[(pattern, kept weights)]`` of one leaf, for every candidate that fits it."""
    stack, k, o = core.matrix_shape(leaf.shape, plan.stack_axes)
    out = []
    for vs in candidates:
        pattern = HiNM(base.vector_size, vs, base.n, base.m)
        if pattern.fit_error(k, o) is not None:  # K_v must stay a valid multiple of m, >= m
            continue
        v, kv, n, m = pattern.structure(k, o)
        out.append((pattern, int(np.prod(stack, dtype=np.int64)) * kv * o * n // m))
    if not any(p.vector_sparsity == base.vector_sparsity for p, _ in out):
        raise ValueError(f"{path}: shape={tuple(leaf.shape)} does not fit the base pattern {base}")
    return out


def _error_costs(leaf, s, plan, fits, cost: str) -> list[float]:
    """The score mass each candidate removes (in units of the layer's mean score if ``cost="relative"``)."""
    total = float(jnp.sum(s))
    out = []
    for pattern, _ in fits:
        mask = _leaf_mask(leaf, s, plan._replace(pattern=pattern)).mask
        removed = total - float(jnp.sum(jnp.where(mask, s, 0.0)))
        if cost == "relative":  # in units of the layer's mean score: the fraction removed times the size
            removed = removed / total * s.size if total > 0 else 0.0
        out.append(removed)
    return out


def _outlier_ratio(s, threshold: float) -> float:
    """OWL's layer outlier ratio: the fraction of scores above ``threshold`` times their mean."""
    return float(jnp.mean(s > threshold * jnp.mean(s)))


def _owl_densities(ratios, sizes, density: float, spread: float) -> np.ndarray:
    """OWL's per-layer target densities: linear in the outlier ratio, from the lowest to the
    highest over ``2 * spread``, shifted so that their size-weighted mean is ``density``
    (the paper's form, its mean weighted by layer size). Equal ratios give ``density`` everywhere."""
    r = np.asarray(ratios, np.float64)
    span = float(r.max() - r.min())
    a = (r - r.min()) / span * 2.0 * spread if span > 0 else np.zeros_like(r)
    return density + a - np.average(a, weights=np.asarray(sizes, np.float64))


class _Table(NamedTuple):
    options: dict  # {path: [(pattern, kept weights, cost)]}
    base: HiNM
    target: int  # kept weights over the pruned layers
    total: int  # weights of the pruned layers


def _table(params, pattern, score, where, stack_axes, vector_sparsities, density, method, cost,
           outlier_threshold, outlier_range) -> _Table:
    """Every candidate of every pruned leaf with its kept weights and its cost under ``method``."""
    base = _check_arguments(pattern, density, method, cost, outlier_threshold, outlier_range)
    candidates = _check_candidates(vector_sparsities, base)
    if base.vector_sparsity not in candidates:
        candidates = sorted(set(candidates) | {base.vector_sparsity})
    leaves = flatten_with_paths(params, is_leaf=is_mask_leaf)
    plans = {p: _plan(p, leaf, base, where, stack_axes) for p, leaf in leaves}
    scored = leaf_scores(params, score, lambda p: plans[p].pattern is not None)
    if not scored:
        raise ValueError(f"no leaf of params is pruned with {base} (where={where!r}): nothing to allocate")
    leaf_of = dict(leaves)
    cleaned, fits = {}, {}
    for p in scored:
        cleaned[p] = _clean_score(p, leaf_of[p], scored[p], base)
        fits[p] = _fitting(p, leaf_of[p], plans[p], base, candidates)
    sizes = {p: int(np.prod(np.shape(leaf_of[p]), dtype=np.int64)) for p in scored}
    total = sum(sizes.values())
    if density is None:  # the uniform pattern's kept weights
        target = sum(next(kept for pat, kept in fits[p] if pat.vector_sparsity == base.vector_sparsity) for p in fits)
    else:
        target = int(round(float(density) * total))
    if method == "error":
        costs = {p: _error_costs(leaf_of[p], cleaned[p], plans[p], fits[p], cost) for p in scored}
    else:
        paths = list(scored)
        ratios = [_outlier_ratio(cleaned[p], float(outlier_threshold)) for p in paths]
        goal = _owl_densities(ratios, [sizes[p] for p in paths], target / total, float(outlier_range))
        costs = {p: [(kept - d * sizes[p]) ** 2 / sizes[p] for _, kept in fits[p]]  # size * (density - d)^2
                 for p, d in zip(paths, goal)}
    options = {p: [(pat, kept, c) for (pat, kept), c in zip(fits[p], costs[p])] for p in scored}
    return _Table(options, base, target, total)


def _knapsack(table: _Table, density) -> dict:
    """The least-cost choice of one candidate per layer keeping exactly ``table.target`` weights."""
    options, base, target, total = table
    paths = list(options)
    g = 0
    for c in [o[1] for opts in options.values() for o in opts] + [target]:
        g = math.gcd(g, int(c))
    g = max(g, 1)
    units = target // g
    if len(paths) * (units + 1) > _MAX_DP_CELLS:
        raise ValueError(f"density={density!r}: the exact allocation needs a table of {len(paths)} layers x "
                         f"{units + 1} kept-weight units (greatest common divisor {g}); more than "
                         f"{_MAX_DP_CELLS}: use fewer, coarser or more regular vector_sparsities")
    inf = np.inf
    best = np.full(units + 1, inf)
    best[0] = 0.0
    choice = np.zeros((len(paths), units + 1), np.int16)
    for li, p in enumerate(paths):
        new = np.full(units + 1, inf)
        # the base candidate first: on exact ties the uniform choice wins
        order = sorted(range(len(options[p])), key=lambda j: options[p][j][0].vector_sparsity != base.vector_sparsity)
        for j in order:
            _, kept, c = options[p][j]
            u = kept // g
            if u > units:
                continue
            cand = np.full(units + 1, inf)
            cand[u:] = best[: units + 1 - u] + c
            better = cand < new
            new = np.where(better, cand, new)
            choice[li] = np.where(better, j, choice[li])
        best = new
    if not np.isfinite(best[units]):
        reachable = np.flatnonzero(np.isfinite(best)) * g / total
        near = sorted(reachable, key=lambda d: abs(d - target / total))[:3]
        raise ValueError(f"density={density!r}: no combination of vector_sparsities {sorted({o[0].vector_sparsity for v in options.values() for o in v})} "
                         f"keeps exactly {target} of the {total} weights of the {len(paths)} pruned layers; "
                         f"nearest reachable densities: {', '.join(f'{d:.6g}' for d in near)}")
    out = {}
    u = units
    for li in range(len(paths) - 1, -1, -1):
        p = paths[li]
        pat, kept, _ = options[p][int(choice[li, u])]
        out[p] = pat
        u -= kept // g
    assert u == 0
    return {f"^{re.escape(p)}$": out[p] for p in paths}


def allocation_table(
    params,
    pattern,
    *,
    score=None,
    where: Callable[[str, Any], bool] | str | None = None,
    stack_axes: int | Callable[[str, Any], int] = 0,
    vector_sparsities: Sequence[float] | None = None,
    cost: str = "relative",
    method: str = "error",
    outlier_threshold: float = 5.0,
    outlier_range: float = 0.08,
    density: float | None = None,
) -> dict:
    """Every candidate of every layer: ``{path: [(pattern, kept weights, cost)]}``.

    The input of :func:`allocate_sparsity`'s choice (same arguments), to inspect or to
    plot a layer's sensitivity.

    Args:
      params, pattern, score, where, stack_axes, vector_sparsities, cost, method,
        outlier_threshold, outlier_range: as for :func:`allocate_sparsity`.
      density: the whole-model density; only ``method="outlier"``'s costs depend on it
        (its per-layer targets average to it). Default: the uniform pattern's.

    Returns:
      ``{path: [(pattern, kept weights, cost)]}`` for every pruned leaf and every candidate
      that fits it. With ``method="error"`` the cost is the score mass the candidate
      removes (in units of the layer's mean score when ``cost="relative"``); with
      ``method="outlier"`` it is ``size * (candidate density - OWL target density)**2``.

    Raises:
      TypeError, ValueError: as for :func:`allocate_sparsity` (except an unreachable
        ``density``, which only the choice detects).
    """
    return _table(params, pattern, score, where, stack_axes, vector_sparsities, density, method, cost,
                  outlier_threshold, outlier_range).options


def allocate_sparsity(
    params,
    pattern,
    *,
    score=None,
    where: Callable[[str, Any], bool] | str | None = None,
    stack_axes: int | Callable[[str, Any], int] = 0,
    vector_sparsities: Sequence[float] | None = None,
    density: float | None = None,
    cost: str = "relative",
    method: str = "error",
    outlier_threshold: float = 5.0,
    outlier_range: float = 0.08,
) -> dict:
    """Per-layer HiNM patterns that keep the whole model's density, allocated by sensitivity.

    Every leaf that :func:`hinm_jax.prune` would prune with ``pattern`` (same ``where`` /
    ``stack_axes`` rules) gets ``HiNM(V, s_l, n, m)``: ``V``, ``n`` and ``m`` of
    ``pattern``, the vector sparsity ``s_l`` one of ``vector_sparsities`` that fits the
    layer (its ``K_v`` a multiple of ``m``, at least ``m``; checked by the pattern's own
    ``fit_error``). The choice minimises the total cost of ``method`` under the constraint
    that the kept weights over all these layers equal exactly ``density`` times their
    size: a multiple-choice knapsack solved exactly by dynamic programming.

    ``method="error"`` minimises the score mass removed (``score``, e.g. Wanda; ``|W|`` by
    default). ``method="outlier"`` is OWL (Yin et al. 2023): layer ``l``'s outlier ratio
    ``D_l`` is the fraction of its scores above ``outlier_threshold`` times its mean score;
    its target density is ``density + a_l - mean(a)``, ``a_l = 2 * outlier_range * (D_l -
    min D) / (max D - min D)`` (the mean weighted by layer size; every target is
    ``density`` when all ``D_l`` are equal), so the target sparsities span
    ``2 * outlier_range`` and the layers with more outliers are pruned less. The candidates
    are then chosen to minimise ``sum_l size_l * (density_l - target_l)**2`` at exactly the
    whole-model density.

    Args:
      params: a pytree of arrays.
      pattern: the base :class:`~hinm_jax.patterns.HiNM` pattern (or its string form).
      score: importance, as for :func:`hinm_jax.prune` (``None`` for ``|W|``, a pytree or
        a function ``(path, leaf) -> array``); must be >= 0 (NaN counts as 0).
      where: leaf selection, as for :func:`hinm_jax.prune`.
      stack_axes: leading axes of independent matrices, as for :func:`hinm_jax.prune`.
      vector_sparsities: the candidate vector sparsities (fractions of input indices
        each block drops); default ``pattern``'s ``+-0.125`` and ``+-0.25`` within
        ``[0, 1)``. ``pattern``'s own is always a candidate.
      density: the whole-model density over the pruned layers; default that of
        ``pattern`` on every layer (uniform), which is always reachable. Another value
        must be reachable exactly (in kept weights, rounded to the nearest integer).
      cost: ``method="error"`` only. ``"relative"`` (default): each layer's removed score
        mass divided by the layer's mean score (the fraction removed times the layer's
        size), so layers of different scales count alike and layers whose scores are
        spread alike keep the uniform pattern; ``"absolute"``: the raw mass, so layers
        with large scores (e.g. large input norms) keep more.
      method: ``"error"`` (default) or ``"outlier"`` (OWL), as above.
      outlier_threshold: ``method="outlier"``: OWL's ``M``, a score is an outlier above
        ``M`` times its layer's mean score; > 0, default 5.
      outlier_range: ``method="outlier"``: OWL's ``lambda``, half the span of the target
        whole-layer sparsities; in ``[0, 1]``, default 0.08.

    Returns:
      ``{path regex: HiNM}``, one exact-path entry (``^path$``) per pruned leaf, to pass as
      :func:`hinm_jax.prune`'s ``pattern`` (leaves not in it stay dense).

    Raises:
      TypeError: ``pattern`` is not a HiNM pattern, or bad argument types.
      ValueError: no leaf to prune, a selected leaf that does not fit ``pattern``,
        negative scores, an invalid candidate, a bad ``method``, ``cost``,
        ``outlier_threshold`` or ``outlier_range``, or a ``density`` that no combination
        of candidates reaches exactly (the message names the nearest reachable ones).

    Example:
        >>> import jax, hinm_jax
        >>> params = {"a": jax.random.normal(jax.random.key(0), (128, 64)),
        ...           "b": jax.random.normal(jax.random.key(1), (128, 64))}
        >>> per_layer = hinm_jax.allocate_sparsity(params, "hinm:32:0.5:2:4")
        >>> sorted(per_layer)
        ['^a$', '^b$']
        >>> hinm_jax.summary(params, hinm_jax.prune(params, per_layer)).density
        0.25
        >>> owl = hinm_jax.allocate_sparsity(params, "hinm:32:0.5:2:4", method="outlier")
        >>> hinm_jax.summary(params, hinm_jax.prune(params, owl)).density
        0.25
    """
    table = _table(params, pattern, score, where, stack_axes, vector_sparsities, density, method, cost,
                   outlier_threshold, outlier_range)
    return _knapsack(table, density)
