"""Channel permutation search for block patterns: OCP, IVP and 2CP.

A HiNM mask is computed in a *layout* (:class:`~hinm_jax.core.Layout`): an output-channel
permutation ``π`` (which channels share a block of ``V``) and, per block, its ``K_v`` kept
input indices in N:M walk order (``σ``). The layout is metadata: weights and neighbouring
layers are never rewritten, and the mask stays in original coordinates. This module
searches layouts that keep more importance than the paper's rule with identity ``π`` and
``σ``:

- ``"ocp"``: output-channel permutation only; each block keeps the paper's ``K_v``
  indices (best block sums) in ascending order. Channels are assigned to blocks by an
  exact assignment problem on their N:M value in each block's layout (the paper's
  Hungarian step, for all channels at once), the layouts follow the new members, and
  the two alternate to a fixed point; then random perturbations of groups of blocks,
  each followed by such a descent, kept where they pay.
- ``"ivp"``: identity ``π``; per block, the kept indices *and* their walk order (SPEC
  allows any ``K_v`` indices per block). Starting from the best block sums dealt
  boustrophedon over the stripes: rounds of cyclic exchange (one position per stripe and
  some unused indices re-dealt by an assignment problem with exact gains) and of
  re-splitting random pairs of stripes (all cuts, exact), with kicks out of local optima.
- ``"2cp"``: both. The output-channel search scores a channel against each block's
  generic N:M layout (block sums dealt boustrophedon), which predicts what the
  input-vector search will reach without locking channels into layouts fitted to them;
  the input-vector search then runs on the blocks found, and a last exact assignment
  moves channels to the searched layouts that suit them best.

NM patterns (and any matrix with ``O == V``) have one block, so only the input order is
searched (``"ivp"``, ``"2cp"``; ``"ocp"`` raises); VectorWise has no N:M step, so only
the output channels (``"ocp"``, ``"2cp"``; ``"ivp"`` raises).
Unstructured and HSS patterns have no layout to search.

Measure a layout with :func:`efficacy` (SPEC's definition): ``0`` is the paper's rule,
``100`` is every output channel keeping its own best ``round(density * K)`` scores.

Example:
    >>> import jax, hinm_jax
    >>> from hinm_jax import permute
    >>> score = abs(jax.random.normal(jax.random.key(0), (64, 64)))
    >>> layout = permute.search(score, hinm_jax.HiNM(16, 0.5, 2, 4), "2cp", key=jax.random.key(1))
    >>> permute.efficacy(score, "hinm:16:0.5:2:4", layout) > 0
    True
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _permute_ivp, _permute_ocp, _structure
from hinm_jax.core import Layout, check_layout, mask_from_layout, matrix_mask
from hinm_jax.patterns import BlockStructure, Pattern, VectorWise, as_pattern

__all__ = ["METHODS", "Budget", "search", "search_tree", "efficacy", "kept", "planted"]

METHODS = ("ocp", "ivp", "2cp")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How hard the search works on each matrix. Iteration counts are deterministic for
    a given key; ``time_limit`` makes the result depend on the machine's speed.

    Attributes:
      ocp_cycles: large-neighbourhood cycles of the output-channel search after its
        first descent (each: in random groups of ``ocp_group`` blocks, random swaps of
        ``ocp_perturb`` of the group's channels, then a descent of the group alone).
      ocp_descent: most assignment/layout alternations per descent.
      ocp_perturb: fraction of a group's channels a perturbation moves.
      ocp_subset: largest assignment problem (channels) solved at once; more channels
        are assigned in random subsets of equal size per block.
      ocp_group: blocks per group in a cycle (a group as large as the matrix makes it
        plain iterated local search).
      ivp_rounds: most rounds of the input-vector search (each: a cyclic exchange,
        and every other one a re-split of stripe pairs).
      ivp_group: most stripes in one exchange (assignment) problem.
      ivp_unused: most unused input indices offered to one exchange problem.
      ivp_patience: a block of the input-vector search is stuck after this many
        re-split rounds in a row without gain.
      ivp_kicks: times a stuck block is perturbed (a few stripes dealt anew) and
        searched again; the best layout seen is kept.
      time_limit: seconds per matrix (``None``: no limit); the output-channel search
        gets 40% of it. Rounds and cycles stop early when it runs out.
      scale: shrink the counts above for matrices whose steps cost more (at least one
        of each; MiniLM's 384 x 384 layers get them in full), so that a 4096 x 4096
        layer takes seconds, not minutes. Deterministic.
      batch: most matrices of one shape searched together (they move in lock-step, so
        on CPU one at a time is usually fastest).
    """

    ocp_cycles: int = 10
    ocp_descent: int = 30
    ocp_perturb: float = 0.1
    ocp_subset: int = 512
    ocp_group: int = 12
    ivp_rounds: int = 150
    ivp_group: int = 64
    ivp_unused: int = 32
    ivp_patience: int = 4
    ivp_kicks: int = 4
    time_limit: float | None = None
    scale: bool = True
    batch: int = 1

    def __post_init__(self):
        for name, low in (*((f, 0) for f in _COUNTS_FROM_0), *((f, 1) for f in _COUNTS_FROM_1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"Budget: {name}={value!r}: must be an int >= {low}, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"Budget: {name}={value!r}: must be an int >= {low}")
        for name in ("ocp_perturb", "time_limit"):
            value = getattr(self, name)
            if value is None and name == "time_limit":
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"Budget: {name}={value!r}: must be a number, got {type(value).__name__}")
        if not (0.0 <= self.ocp_perturb <= 1.0):
            raise ValueError(f"Budget: ocp_perturb={self.ocp_perturb!r}: must be in [0, 1]")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"Budget: time_limit={self.time_limit!r}: must be > 0 seconds or None")
        if not isinstance(self.scale, bool):
            raise TypeError(f"Budget: scale={self.scale!r}: must be True or False, got {type(self.scale).__name__}")


_COUNTS_FROM_0 = ("ocp_cycles", "ocp_descent", "ivp_rounds", "ivp_unused", "ivp_kicks")
_COUNTS_FROM_1 = ("ocp_subset", "ocp_group", "ivp_group", "ivp_patience", "batch")


class _Plan(NamedTuple):
    """What a method does on one pattern and matrix shape."""

    structure: BlockStructure
    ocp: bool
    ivp: bool
    order: str  # proxy layout of the output-channel search


def _plan(pattern: Pattern, method: str, shape, k: int, o: int, path: str) -> _Plan:
    where = f"{path}: shape={tuple(shape)} pattern {pattern}"
    if method not in METHODS:
        raise ValueError(f"{where}: method={method!r}: expected one of {METHODS}")
    err = pattern.fit_error(k, o)
    if err is not None:
        raise ValueError(f"{where}: does not fit: {err}")
    struct = pattern.structure(k, o)
    if struct is None:
        raise ValueError(
            f"{where}: has no permutation search (only HiNM, NM and VectorWise have blocks and "
            "stripes to permute); use permute=None"
        )
    v, kv, n, m = struct
    no_blocks = o // v == 1
    no_stripes = isinstance(pattern, VectorWise) or n >= m
    if no_blocks and no_stripes:
        raise ValueError(
            f"{where}: has a single block of vector_size={v} and no N:M step; there is nothing to "
            "permute (the best block sums are already optimal)"
        )
    if no_blocks and method == "ocp":
        raise ValueError(
            f"{where}: method='ocp' moves output channels between blocks, but this matrix has a "
            f"single block (O={o}, vector_size={v}); use 'ivp' (the N:M input order), '2cp', or a "
            "smaller vector_size"
        )
    if no_stripes and method == "ivp":
        raise ValueError(
            f"{where}: method='ivp' orders each block's inputs for the N:M step, but this pattern "
            "has no N:M step (the best block sums are already optimal); use 'ocp' or '2cp'"
        )
    ocp = method in ("ocp", "2cp") and not no_blocks
    ivp = method in ("ivp", "2cp") and not no_stripes
    return _Plan(struct, ocp, ivp, "snake" if ivp else "ascending")


def _budget(budget: Budget | None, overrides: Mapping[str, Any]) -> Budget:
    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise ValueError(f"budget={budget!r}: expected a hinm_jax.permute.Budget")
    fields = {f.name for f in dataclasses.fields(Budget)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown search options {unknown}: expected fields of Budget {sorted(fields)}")
    return dataclasses.replace(budget, **overrides)


def _seed_words(key) -> list[int]:
    if key is None:
        key = jax.random.key(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(w) for w in np.asarray(key, np.uint32).reshape(-1)]


def _finite(scores: np.ndarray) -> np.ndarray:
    """NaN and -inf count as least important, +inf as most (the search needs sums)."""
    s = np.asarray(scores, np.float32)
    if np.isfinite(s).all():
        return s
    ok = np.isfinite(s)
    lo = float(s[ok].min()) if ok.any() else 0.0
    hi = float(s[ok].max()) if ok.any() else 0.0
    return np.where(np.isnan(s) | (s == -np.inf), lo - 1.0, np.where(s == np.inf, hi + 1.0, s)).astype(np.float32)


# Work per step (elements touched) up to which the budget counts apply unscaled. Above
# it, counts shrink: perturbation cycles and descent steps in proportion (they are worth
# least on matrices with many blocks), exchange rounds with the 3/4 power.
_OCP_CYCLE_WORK = 2e6  # one assignment/layout alternation, nb * K_v * O (MiniLM: <= 1.4e7)
_OCP_STEP_WORK = 1.5e8
_IVP_ROUND_WORK = 4e6  # one exchange round: nb * (J/G) * G * (G + u) * V (MiniLM: <= 9.4e6)


def _scaled(budget: Budget, struct: BlockStructure, k: int, o: int) -> Budget:
    """``budget`` with its counts shrunk for matrices whose steps cost more."""
    if not budget.scale:
        return budget
    v, kv, n, m = struct
    nb = o // v
    j = max(1, kv // m)
    g = _permute_ivp.group_size(j, budget.ivp_group)
    u = min(budget.ivp_unused, (k - kv) // (j // g))
    step = nb * kv * o
    round_ = nb * j * (g + u) * v
    shrink = lambda count, f: count if count == 0 else max(1, int(count * min(1.0, f)))
    return dataclasses.replace(
        budget,
        ocp_cycles=int(budget.ocp_cycles * min(1.0, _OCP_CYCLE_WORK / step)),
        ocp_descent=shrink(budget.ocp_descent, _OCP_STEP_WORK / step),
        ivp_rounds=shrink(budget.ivp_rounds, (_IVP_ROUND_WORK / round_) ** 0.75),
    )


def _search_batch(scores: np.ndarray, plan: _Plan, seeds: Sequence[Sequence[int]], budget: Budget):
    """Searches ``B`` matrices of one shape: ``(B, K, O)`` -> ``(B, O)``, ``(B, nb, K_v)``."""
    v, kv, n, m = plan.structure
    bsz, k, o = scores.shape
    nb = o // v
    start = time.perf_counter()
    limit = None if budget.time_limit is None else budget.time_limit * bsz
    s = jnp.asarray(scores)
    perms = np.tile(np.arange(o, dtype=np.int32), (bsz, 1))
    counts = _scaled(budget, plan.structure, k, o)
    if plan.ocp and nb > 1:
        rngs = [np.random.default_rng(list(seed)) for seed in seeds]
        perms = _permute_ocp.search(
            s,
            perms,
            rngs,
            v=v, kv=kv, n=n, m=m, order=plan.order,
            cycles=counts.ocp_cycles,
            descent=counts.ocp_descent,
            perturb=budget.ocp_perturb,
            subset=budget.ocp_subset,
            group=budget.ocp_group,
            deadline=None if limit is None else start + (0.4 if plan.ivp else 1.0) * limit,
        )
    layout = np.asarray(_permute_ocp.proxy_layout(s, jnp.asarray(perms), v=v, kv=kv, m=m, order=plan.order))
    if not plan.ivp:
        return _no_worse(s, perms, layout, plan)
    x = np.take_along_axis(scores, perms[:, None, :], axis=2)
    x = x.reshape(bsz, k, nb, v).transpose(0, 2, 1, 3).reshape(bsz * nb, k, v)
    cols = layout.reshape(bsz * nb, kv // m, m)
    kept = np.zeros((bsz * nb, k), bool)
    np.put_along_axis(kept, layout.reshape(bsz * nb, kv), True, axis=1)
    pool = np.argsort(kept, axis=1, kind="stable")[:, : k - kv].astype(np.int32)  # unused, ascending
    rngs = [np.random.default_rng([*seed, 1, b]) for seed in seeds for b in range(nb)]
    cols, _ = _permute_ivp.improve(
        x,
        cols,
        pool,
        rngs,
        n=n,
        rounds=counts.ivp_rounds,
        group=budget.ivp_group,
        unused=budget.ivp_unused,
        patience=budget.ivp_patience,
        kicks=budget.ivp_kicks,
        deadline=None if limit is None else start + limit,
    )
    vidx = cols.reshape(bsz, nb, kv)
    if plan.ocp and nb > 1:
        # Final exact step: every channel against every block's searched layout; the
        # assignment keeps the layouts, so it can only keep more. It fixes channels the
        # output-channel search (in its proxy) left in the wrong block.
        q = np.asarray(_permute_ocp.channel_values(s, jnp.asarray(vidx), n=n, m=m))
        rng = [np.random.default_rng([*seed, 2]) for seed in seeds]
        perms = np.stack([_permute_ocp.assign(q[i], perms[i], v, rng[i], cap=budget.ocp_subset) for i in range(bsz)])
    return _no_worse(s, perms, vidx, plan)


def _no_worse(s, perms, vidx, plan: _Plan):
    """The found layouts, or the paper's (identity ``π`` and ``σ``) where that keeps more:
    the search never returns a layout below the efficacy baseline."""
    v, kv, n, m = plan.structure
    bsz, _, o = s.shape
    ident = jnp.broadcast_to(jnp.arange(o, dtype=jnp.int32), (bsz, o))
    base = _permute_ocp.proxy_layout(s, ident, v=v, kv=kv, m=m, order="ascending")
    found = np.asarray(_layout_values(s, jnp.asarray(perms), jnp.asarray(vidx), n=n, m=m))
    paper = np.asarray(_layout_values(s, ident, base, n=n, m=m))
    worse = found < paper
    perms = np.where(worse[:, None], np.asarray(ident), perms)
    vidx = np.where(worse[:, None, None], np.asarray(base), vidx)
    return perms, vidx


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _layout_values(s, perms, vidx, *, n: int, m: int):
    """Kept score of each ``(K, O)`` matrix in its layout (the N:M step, summed)."""

    def one(sm, rp, vi):
        g = _structure.gather_packed(sm, rp, vi)  # (O, K_v)
        return jnp.sum(_permute_ocp.topn_sum(g.reshape(g.shape[0], -1, m), n, axis=2))

    return jax.vmap(one)(s, perms, vidx)


def search(score, pattern, method: str = "2cp", *, key=None, budget: Budget | None = None, **options) -> Layout:
    """Searches a layout for one ``(K, O)`` matrix.

    Args:
      score: ``(K, O)`` importance (higher is more important).
      pattern: a block pattern (:class:`~hinm_jax.patterns.HiNM`, ``NM``, ``VectorWise``)
        or its string form.
      method: ``"ocp"``, ``"ivp"`` or ``"2cp"`` (see the module docstring).
      key: PRNG key; the same key gives the same layout.
      budget: a :class:`Budget`; ``options`` override its fields
        (e.g. ``ivp_rounds=50``, ``time_limit=2.0``).

    Returns:
      A :class:`~hinm_jax.core.Layout`; the mask is
      ``mask_from_layout(score, layout.row_perm, layout.vector_index, n, m)``.

    Example:
        >>> import jax, hinm_jax
        >>> from hinm_jax import permute
        >>> s = abs(jax.random.normal(jax.random.key(0), (32, 64)))
        >>> layout = permute.search(s, "hinm:16:0.5:2:4", "ivp", key=jax.random.key(0))
        >>> layout.row_perm.shape, layout.vector_index.shape
        ((64,), (4, 16))
    """
    pattern = as_pattern(pattern)
    shape = tuple(np.shape(score))
    if len(shape) != 2:
        raise ValueError(f"score: shape={shape}: search takes one (K, O) matrix; use search_tree for stacks")
    plan = _plan(pattern, method, shape, shape[0], shape[1], "score")
    budget = _budget(budget, options)
    perms, vidx = _search_batch(_finite(np.asarray(score))[None], plan, [_seed_words(key) + [0, 0]], budget)
    return Layout(jnp.asarray(perms[0], jnp.int32), jnp.asarray(vidx[0], jnp.int32))


def search_tree(
    todo: Sequence[tuple[str, Any]],
    patterns: Mapping[str, Pattern | str],
    *,
    stack_axes: Mapping[str, int] | int = 0,
    method: str = "2cp",
    key=None,
    progress: bool = True,
    budget: Budget | None = None,
    **options,
) -> dict[str, Layout]:
    """Searches a layout for every leaf of a model (the hook of ``prune(permute=...)``).

    Matrices of the same shape and pattern (stacked leaves included) are searched
    together, ``budget.batch`` at a time, under a progress bar that shows each finished
    layer's efficacy.

    Args:
      todo: ``(path, score)`` pairs, the score shaped like the leaf.
      patterns: ``{path: pattern}`` for every path in ``todo``.
      stack_axes: ``{path: leading stack axes}`` (missing paths: 0), or one int for all;
        the leaf is the stack of ``(K, O)`` matrices ``score.reshape(stack + (K, O))``.
      method: ``"ocp"``, ``"ivp"`` or ``"2cp"``.
      key: PRNG key; matrix ``j`` of the ``i``-th leaf draws from ``(key, i, j)``.
      progress: show a tqdm progress bar.
      budget: a :class:`Budget`; ``options`` override its fields.

    Returns:
      ``{path: Layout}`` with ``row_perm`` shaped ``stack + (O,)`` and ``vector_index``
      shaped ``stack + (O/V, K_v)`` (int32).

    Example:
        >>> import jax, hinm_jax
        >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
        >>> masks = hinm_jax.prune(params, "hinm:16:0.5:2:4", permute="2cp", key=jax.random.key(0),
        ...                        permute_options={"progress": False})
        >>> masks["a"]["kernel"].layout.vector_index.shape
        (4, 32)
    """
    budget = _budget(budget, options)
    words = _seed_words(key)
    leaves = []  # (path, score, stack, K, O, plan, pattern); matrices are read when searched
    for path, score in todo:
        pattern = as_pattern(patterns[path])
        shape = tuple(np.shape(score))
        sa = stack_axes.get(path, 0) if isinstance(stack_axes, Mapping) else stack_axes
        if len(shape) - sa < 2:
            raise ValueError(f"{path}: shape={shape} pattern {pattern}: needs 2 axes after stack_axes={sa}")
        stack, k, o = _structure.matrix_shape(shape, sa)
        leaves.append((path, score, stack, k, o, _plan(pattern, method, shape, k, o, path), pattern))

    def matrix(i, j):
        _, score, _, k, o, _, _ = leaves[i]
        return _finite(np.asarray(score).reshape((-1, k, o))[j])

    count = [int(np.prod(stack)) for _, _, stack, _, _, _, _ in leaves]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, (_, _, _, k, o, plan, _) in enumerate(leaves):
        groups.setdefault((k, o, plan), []).extend((i, j) for j in range(count[i]))
    perms = [np.zeros((count[i], o), np.int32) for i, (_, _, _, _, o, _, _) in enumerate(leaves)]
    vidx = [np.zeros((count[i],) + _nb_kv(plan, o), np.int32) for i, (_, _, _, _, o, plan, _) in enumerate(leaves)]
    left = list(count)

    bar = _progress_bar(sum(count), method, progress)
    try:
        for (_, _, plan), items in groups.items():
            for c in range(0, len(items), budget.batch):
                chunk = items[c : c + budget.batch]
                mats = np.stack([matrix(i, j) for i, j in chunk])
                p, vi = _search_batch(mats, plan, [words + [i, j] for i, j in chunk], budget)
                for t, (i, j) in enumerate(chunk):
                    perms[i][j], vidx[i][j] = p[t], vi[t]
                    left[i] -= 1
                    if left[i] == 0 and bar is not None:
                        path, score, _, k, o, _, pattern = leaves[i]
                        eff = efficacy(np.asarray(score).reshape((-1, k, o)), pattern, Layout(perms[i], vidx[i]))
                        bar.set_postfix_str(f"{path}: efficacy {eff:.1f}%", refresh=False)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()

    out = {}
    for i, (path, _, stack, _, o, plan, _) in enumerate(leaves):
        out[path] = Layout(
            jnp.asarray(perms[i].reshape(stack + (o,)), jnp.int32),
            jnp.asarray(vidx[i].reshape(stack + vidx[i].shape[1:]), jnp.int32),
        )
    return out


def _nb_kv(plan: _Plan, o: int) -> tuple[int, int]:
    return (o // plan.structure.vector_size, plan.structure.kept_inputs)


def _progress_bar(total: int, method: str, progress: bool):
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"permute {method}", unit="matrix")


# ---------------------------------------------------------------------------------------
# Efficacy (SPEC)
# ---------------------------------------------------------------------------------------


def kept(score, mask) -> float:
    """``Σ score`` over the elements ``mask`` keeps.

    Example:
        >>> import jax.numpy as jnp
        >>> kept(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[True, False], [False, True]]))
        5.0
    """
    score = jnp.asarray(score, jnp.float32)
    mask = jnp.asarray(mask, bool)
    if score.shape != mask.shape:
        raise ValueError(f"score: shape={tuple(score.shape)} but mask has shape {tuple(mask.shape)}")
    return float(jnp.sum(jnp.where(mask, score, 0.0), dtype=jnp.float32))


def _opt_mask(score, count: int):
    """Every output channel (column) keeps its ``count`` best scores."""
    _, idx = jax.lax.top_k(score.T, count)  # (O, count), ties: lowest index
    rows = jnp.zeros(score.T.shape, bool).at[jnp.arange(score.shape[1])[:, None], idx].set(True)
    return rows.T


def efficacy(score, pattern, layout: Layout) -> float:
    """SPEC's efficacy of a layout, in percent.

    ``(kept(perm) - kept(base)) / (kept(opt) - kept(base)) * 100`` where ``base`` is the
    paper's rule with identity ``π`` and ``σ``, ``opt`` keeps every output channel's
    ``round(density * K)`` best scores, and ``perm`` is the N:M step in ``layout``. For a
    stack of matrices the kept sums are totals over the stack. ``0.0`` when ``opt``
    keeps no more than ``base`` (nothing to gain).

    Args:
      score: ``(K, O)`` importance, or ``(*stack, K, O)`` with a stacked ``layout``.
      pattern: the block pattern (or its string form).
      layout: the :class:`~hinm_jax.core.Layout` to measure (checked with
        :func:`~hinm_jax.core.check_layout`: a broken one raises).

    Example:
        >>> import jax, hinm_jax
        >>> s = abs(jax.random.normal(jax.random.key(0), (32, 64)))
        >>> _, base = hinm_jax.core.matrix_mask(s, hinm_jax.HiNM(16, 0.5, 2, 4))
        >>> efficacy(s, "hinm:16:0.5:2:4", base)
        0.0
    """
    pattern = as_pattern(pattern)
    score = jnp.asarray(score, jnp.float32)
    if score.ndim < 2:
        raise ValueError(f"score: shape={tuple(score.shape)}: expected (K, O) or (*stack, K, O)")
    k, o = score.shape[-2:]
    struct = pattern.structure(k, o)
    if struct is None:
        raise ValueError(f"score: shape={tuple(score.shape)} pattern {pattern}: efficacy needs a block pattern")
    stack = score.shape[:-2]
    check_layout(layout, pattern, score.shape, len(stack), "layout")
    row_perm = jnp.asarray(layout.row_perm, jnp.int32)
    vector_index = jnp.asarray(layout.vector_index, jnp.int32)
    count = round(pattern.density(k, o) * k)
    sums = _efficacy_sums(
        score.reshape((-1, k, o)),
        row_perm.reshape((-1, o)),
        vector_index.reshape((-1,) + vector_index.shape[-2:]),
        pattern,
        count,
    )
    base, opt, perm = (float(x) for x in np.asarray(sums, np.float64).sum(axis=0))
    if not opt > base:
        return 0.0
    return 100.0 * (perm - base) / (opt - base)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _efficacy_sums(scores, row_perms, vector_indices, pattern, count):
    struct = pattern.structure(*scores.shape[1:])
    n, m = struct.n, struct.m

    def one(s, rp, vi):
        s = jnp.where(jnp.isnan(s), -jnp.inf, s)
        finite = jnp.where(jnp.isfinite(s), s, 0.0)
        base, _ = matrix_mask(s, pattern)
        perm = mask_from_layout(s, rp, vi, n, m)
        opt = _opt_mask(s, count)
        total = lambda mk: jnp.sum(jnp.where(mk, finite, 0.0))
        return jnp.stack([total(base), total(opt), total(perm)])

    return jax.vmap(one)(scores, row_perms, vector_indices)


# ---------------------------------------------------------------------------------------
# A planted test case
# ---------------------------------------------------------------------------------------


def planted(key, k: int, o: int, pattern, *, noise: float = 0.1) -> tuple[jax.Array, Layout]:
    """Scores with a hidden layout in which every output channel keeps its own best.

    The hidden layout has a random ``π``; each hidden block a random set of ``K_v``
    inputs dealt into stripes at random. Every channel scores ``n`` random positions of
    each stripe of its block in ``[1, 2)`` and everything else in ``[0, noise)``. The
    hidden layout keeps exactly each channel's ``round(density * K)`` best, so its
    efficacy is 100%; the identity layout mixes the hidden blocks.

    Args:
      key: PRNG key.
      k, o: the matrix shape ``(K, O)``.
      pattern: a block pattern (or its string form) that fits ``(K, O)``.
      noise: the top of the small scores (``< 1``).

    Returns:
      ``(score, layout)``: ``(K, O)`` float32 scores and the hidden :class:`Layout`.

    Example:
        >>> import jax
        >>> score, hidden = planted(jax.random.key(0), 64, 64, "hinm:16:0.5:2:4")
        >>> round(efficacy(score, "hinm:16:0.5:2:4", hidden), 3)
        100.0
    """
    pattern = as_pattern(pattern)
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise={noise!r}: must be in [0, 1)")
    struct = pattern.structure(k, o)
    err = pattern.fit_error(k, o)
    if struct is None or err is not None:
        raise ValueError(f"planted: shape={(k, o)} pattern {pattern}: needs a block pattern that fits ({err})")
    v, kv, n, m = struct
    nb, j = o // v, kv // m
    rng = np.random.default_rng(_seed_words(key))
    row_perm = rng.permutation(o).astype(np.int32)
    vector_index = np.stack([rng.permutation(k)[:kv] for _ in range(nb)]).astype(np.int32)
    score = rng.uniform(0.0, noise, (k, o)).astype(np.float32)
    big = rng.uniform(1.0, 2.0, (o, j, n)).astype(np.float32)
    for r in range(o):
        stripes = vector_index[r // v].reshape(j, m)
        pos = np.argsort(rng.random((j, m)), axis=1)[:, :n]  # n random positions per stripe
        score[np.take_along_axis(stripes, pos, axis=1), row_perm[r]] = big[r]
    return jnp.asarray(score), Layout(jnp.asarray(row_perm), jnp.asarray(vector_index))
