"""Per-layer sparsity allocation: a HiNM vector sparsity per layer at a fixed whole-model density.

Uniform pruning gives every layer the same pattern. Layers are not equally sensitive, so
at the same number of kept weights some layers should keep more and others fewer.
:func:`allocate_sparsity` keeps the HiNM pattern of every layer (same ``V``, ``n``, ``m``:
the compressed format and every kernel apply unchanged) and chooses each layer's vector
sparsity ``s`` from a small set of candidates, so that the kept weights over the pruned
layers add up to exactly the target (by default the uniform pattern's), minimising the
score mass that pruning removes (error-based allocation: with Wanda scores, a proxy of the
output error of each layer).

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import core
from hinm_jax._tree import flatten_with_paths
from hinm_jax.masks import _leaf_mask, _plan, is_mask_leaf, leaf_scores
from hinm_jax.patterns import HiNM, as_pattern

__all__ = ["allocate_sparsity", "allocation_table"]

_MAX_DP_CELLS = 50_000_000


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


def _options(path, leaf, score, plan, base: HiNM, candidates, cost: str):
    """``[(pattern, kept weights, cost)]`` of one leaf, for every candidate that fits it."""
    stack, k, o = core.matrix_shape(leaf.shape, plan.stack_axes)
    s = jnp.asarray(score, jnp.float32)
    s = jnp.where(jnp.isnan(s), 0.0, s)
    if bool(jnp.any(s < 0)):
        raise ValueError(f"{path}: shape={tuple(leaf.shape)} pattern {base}: scores must be >= 0 "
                         f"(got a minimum of {float(jnp.min(s))})")
    total = float(jnp.sum(s))
    options = []
    for vs in candidates:
        pattern = HiNM(base.vector_size, vs, base.n, base.m)
        if pattern.fit_error(k, o) is not None:  # K_v must stay a valid multiple of m, >= m
            continue
        v, kv, n, m = pattern.structure(k, o)
        kept = int(np.prod(stack, dtype=np.int64)) * kv * o * n // m
        mask = _leaf_mask(leaf, s, plan._replace(pattern=pattern)).mask
        removed = total - float(jnp.sum(jnp.where(mask, s, 0.0)))
        if cost == "relative":  # in units of the layer's mean score: the fraction removed times the size
            removed = removed / total * s.size if total > 0 else 0.0
        options.append((pattern, kept, removed))
    if not any(p.vector_sparsity == base.vector_sparsity for p, _, _ in options):
        raise ValueError(f"{path}: shape={tuple(leaf.shape)} does not fit the base pattern {base}")
    return options


def allocation_table(
    params,
    pattern,
    *,
    score=None,
    where: Callable[[str, Any], bool] | str | None = None,
    stack_axes: int | Callable[[str, Any], int] = 0,
    vector_sparsities: Sequence[float] | None = None,
    cost: str = "relative",
) -> dict:
    """Every candidate of every layer: ``{path: [(pattern, kept weights, cost)]}``.

    The input of :func:`allocate_sparsity`'s choice (same arguments), to inspect or to
    plot a layer's sensitivity: ``cost`` is the score mass the candidate removes (in
    units of the layer's mean score when ``cost="relative"``).
    """
    base = as_pattern(pattern)
    if not isinstance(base, HiNM):
        raise TypeError(f"pattern={pattern!r}: allocation varies HiNM's vector sparsity; expected a HiNM pattern "
                        f"(e.g. HiNM(32, 0.5, 2, 4) or 'hinm:32:0.5:2:4'), got {type(base).__name__}")
    if cost not in ("relative", "absolute"):
        raise ValueError(f"cost={cost!r}: expected 'relative' or 'absolute'")
    candidates = _check_candidates(vector_sparsities, base)
    if base.vector_sparsity not in candidates:
        candidates = sorted(set(candidates) | {base.vector_sparsity})
    leaves = flatten_with_paths(params, is_leaf=is_mask_leaf)
    plans = {p: _plan(p, leaf, base, where, stack_axes) for p, leaf in leaves}
    scored = leaf_scores(params, score, lambda p: plans[p].pattern is not None)
    if not scored:
        raise ValueError(f"no leaf of params is pruned with {base} (where={where!r}): nothing to allocate")
    leaf_of = dict(leaves)
    return {p: _options(p, leaf_of[p], scored[p], plans[p], base, candidates, cost) for p in scored}


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
) -> dict:
    """Per-layer HiNM patterns that keep the whole model's density, allocated by sensitivity.

    Every leaf that :func:`hinm_jax.prune` would prune with ``pattern`` (same ``where`` /
    ``stack_axes`` rules) gets ``HiNM(V, s_l, n, m)``: ``V``, ``n`` and ``m`` of
    ``pattern``, the vector sparsity ``s_l`` one of ``vector_sparsities`` that fits the
    layer (its ``K_v`` a multiple of ``m``, at least ``m``; checked by the pattern's own
    ``fit_error``). The choice minimises the total score mass removed (``score``, e.g.
    Wanda; ``|W|`` by default) under the constraint that the kept weights over all these
    layers equal exactly ``density`` times their size: a multiple-choice knapsack solved
    exactly by dynamic programming.

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
      cost: ``"relative"`` (default): each layer's removed score mass divided by the
        layer's mean score (the fraction removed times the layer's size), so layers of
        different scales count alike and layers whose scores are spread alike keep the
        uniform pattern; ``"absolute"``: the raw mass, so layers with large scores (e.g.
        large input norms) keep more.

    Returns:
      ``{path regex: HiNM}``, one exact-path entry (``^path$``) per pruned leaf, to pass as
      :func:`hinm_jax.prune`'s ``pattern`` (leaves not in it stay dense).

    Raises:
      TypeError: ``pattern`` is not a HiNM pattern, or bad argument types.
      ValueError: no leaf to prune, a selected leaf that does not fit ``pattern``,
        negative scores, an invalid candidate, or a ``density`` that no combination of
        candidates reaches exactly (the message names the nearest reachable ones).

    Example:
        >>> import jax, hinm_jax
        >>> params = {"a": jax.random.normal(jax.random.key(0), (128, 64)),
        ...           "b": jax.random.normal(jax.random.key(1), (128, 64))}
        >>> per_layer = hinm_jax.allocate_sparsity(params, "hinm:32:0.5:2:4")
        >>> sorted(per_layer)
        ['^a$', '^b$']
        >>> hinm_jax.summary(params, hinm_jax.prune(params, per_layer)).density
        0.25
    """
    table = allocation_table(params, pattern, score=score, where=where, stack_axes=stack_axes,
                             vector_sparsities=vector_sparsities, cost=cost)
    base = as_pattern(pattern)
    paths = list(table)
    uniform = sum(next(kept for pat, kept, _ in options if pat.vector_sparsity == base.vector_sparsity)
                  for options in table.values())
    total = sum(int(np.prod(np.shape(leaf))) for path, leaf in flatten_with_paths(params, is_leaf=is_mask_leaf)
                if path in table)
    if density is None:
        target = uniform
    else:
        if isinstance(density, bool) or not isinstance(density, (int, float, np.floating)):
            raise TypeError(f"density={density!r}: expected a float in (0, 1]")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density={density!r}: must be in (0, 1]")
        target = int(round(float(density) * total))
    counts = [o[1] for options in table.values() for o in options] + [target]
    g = 0
    for c in counts:
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
        order = sorted(range(len(table[p])), key=lambda j: table[p][j][0].vector_sparsity != base.vector_sparsity)
        for j in order:
            _, kept, c = table[p][j]
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
        raise ValueError(f"density={density!r}: no combination of vector_sparsities {sorted({o[0].vector_sparsity for v in table.values() for o in v})} "
                         f"keeps exactly {target} of the {total} weights of the {len(paths)} pruned layers; "
                         f"nearest reachable densities: {', '.join(f'{d:.6g}' for d in near)}")
    out = {}
    u = units
    for li in range(len(paths) - 1, -1, -1):
        p = paths[li]
        pat, kept, _ = table[p][int(choice[li, u])]
        out[p] = pat
        u -= kept // g
    assert u == 0
    return {f"^{re.escape(p)}$": out[p] for p in paths}
