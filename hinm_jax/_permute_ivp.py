"""Input-vector search (IVP with column choice): each block's kept input indices and
their N:M walk order.

A block is ``V`` output channels with scores ``X`` (``(K, V)``); its layout is ``J``
stripes of ``m`` input indices (``cols``, ``(J, m)``) plus the unused indices (``pool``).
The value of a stripe is ``sum_o top_n(X[stripe, o])``; the block's value is the sum
over its stripes, which is exactly what the N:M step keeps. Two neighbourhoods alternate:

- *Cyclic exchange* (every round): cut the stripes at random into groups of ``G``; in
  every stripe of a group pick one position at random; add ``u`` random unused indices.
  The ``G + u`` indices are re-dealt to the ``G`` picked positions and ``u`` unused slots
  by one assignment problem (``scipy.optimize.linear_sum_assignment``) whose gain
  ``D[slot, item]`` (stripe value with ``item`` in the picked position, minus the
  stripe's value now) is exact because every stripe changes in one position only. The
  identity is feasible (gain 0), so a round never loses. Its moves are arbitrary cycles
  (``a -> stripe 2``, ``stripe 2's -> stripe 5``, ..., ``-> unused``) that pairwise swaps
  cannot reach when no single swap pays; taking an unused index in is how a block
  chooses its own ``K_v`` indices jointly with the N:M step (SPEC allows any ``K_v``).
- *Re-split* (every other round): pair the stripes at random and re-cut each pair's
  ``2m`` indices into the best two stripes, trying all ``C(2m, m) / 2`` cuts (35 for
  ``m = 4``): two positions change at once, which the exchange cannot do.

A block with no gain from either for ``patience`` re-split rounds is stuck: it is kicked
(a few of its stripes dealt anew at random) up to ``kicks`` times, and the best layout
seen is kept (iterated local search).

Gains of all blocks (of every matrix in a batch) are one jitted array program each;
the assignment problems are small (``2G`` at most) and solved one by one.
"""

from __future__ import annotations

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from hinm_jax._permute_ocp import topn_sum

__all__ = ["group_size", "improve"]

_TOL = 1e-5  # gains below this fraction of a stripe's largest value are rounding noise


def group_size(j: int, cap: int) -> int:
    """Stripes per assignment problem: the largest divisor of ``j`` that is ``<= cap``
    (or ``j`` itself when that divisor would be tiny)."""
    if j <= cap:
        return j
    g = max(d for d in range(1, cap + 1) if j % d == 0)
    return g if g >= 8 else j


def _rest_stats(rest, n: int):
    """For the ``m - 1`` values ``rest`` (a list of equal arrays): the sum of their top
    ``n`` and their ``n``-th largest (the bar a new value must pass to be kept)."""
    if n == 1:
        hi = functools.reduce(jnp.maximum, rest)
        return hi, hi
    if n == len(rest):
        return sum(rest), functools.reduce(jnp.minimum, rest)
    if n == 2 and len(rest) == 3:
        a, b, c = rest
        lo, hi = jnp.minimum(jnp.minimum(a, b), c), jnp.maximum(jnp.maximum(a, b), c)
        total = a + b + c
        return total - lo, total - lo - hi
    srt = -jnp.sort(-jnp.stack(rest, axis=0), axis=0)
    return jnp.sum(srt[:n], axis=0), srt[n - 1]


@functools.partial(jax.jit, static_argnames=("n",))
def _gains(x, cols, pos, items, *, n: int):
    """Exact gains of putting ``items`` at the picked position of each stripe.

    Args:
      x: ``(Bk, K, V)`` block scores.
      cols: ``(Bk, ng, G, m)`` the stripes, grouped.
      pos: ``(Bk, ng, G)`` the picked position in each stripe.
      items: ``(Bk, ng, G + u)`` input indices: the picked occupants, then unused ones.

    Returns:
      ``(Bk, ng, G, G + u)``: ``D[.., slot, item]``.
    """
    take = jax.vmap(lambda xb, c: xb[c])
    vals = take(x, cols)  # (Bk, ng, G, m, V)
    m = vals.shape[3]
    p = pos[..., None]
    # The stripe without its picked position: m - 1 values, by selects (no gather).
    rest = [jnp.where(p <= i, vals[:, :, :, i + 1], vals[:, :, :, i]) for i in range(m - 1)]
    rest_top, thresh = _rest_stats(rest, n)  # (Bk, ng, G, V)
    now = topn_sum(vals, n, axis=3)
    base = jnp.sum(rest_top - now, axis=-1)  # (Bk, ng, G)
    xi = take(x, items)  # (Bk, ng, G+u, V)
    add = jnp.sum(jnp.maximum(xi[:, :, None, :, :] - thresh[:, :, :, None, :], 0.0), axis=-1)
    return base[..., None] + add


def _one_round(x, cols, pool, rngs, active, tol, g, u, n):
    """One cyclic-exchange round over ``Bk`` blocks; ``rngs[i]`` draws block ``i``'s
    random choices; only ``active`` blocks move, by gains above ``tol`` (per block).
    Returns new ``cols``, ``pool`` and the gain of each block."""
    bk, j, m = cols.shape
    ng = j // g
    p = pool.shape[1]
    order = np.stack([r.permutation(j) for r in rngs])  # stripe order
    pick = np.stack([r.integers(0, m, j) for r in rngs])  # picked position per stripe
    cols = np.take_along_axis(cols, order[:, :, None], axis=1)
    pick = np.take_along_axis(pick, order, axis=1)
    if u:
        porder = np.stack([r.permutation(p) for r in rngs])
        pool = np.take_along_axis(pool, porder, axis=1)
    gcols = cols.reshape(bk, ng, g, m)
    gpick = pick.reshape(bk, ng, g)
    occ = np.take_along_axis(gcols, gpick[..., None], axis=3)[..., 0]  # (bk, ng, g)
    extra = pool[:, : ng * u].reshape(bk, ng, u)
    items = np.concatenate([occ, extra], axis=2)  # (bk, ng, g+u)
    d = np.asarray(_gains(x, gcols, gpick, items, n=n))
    # Item i lands in slot choice[i]: slots 0..g-1 are the picked positions, g.. unused.
    choice = np.broadcast_to(np.arange(g + u), (bk, ng, g + u)).copy()
    gain = np.zeros(bk)
    up = d > tol[:, None, None, None]
    worth = up.any(axis=(2, 3)) & active[:, None]  # a positive cycle needs a positive edge
    # Keep the positions (with their occupants) and unused indices that touch an
    # improving move; the rest stay put. Each problem is items x positions; the items
    # left over go to the unused slots.
    item_up = up.any(axis=2)  # (bk, ng, g+u)
    slot_up = up.any(axis=3) | item_up[..., :g]  # (bk, ng, g)
    for b, q in zip(*np.nonzero(worth)):
        slots = np.flatnonzero(slot_up[b, q])
        items_kept = np.concatenate([slots, g + np.flatnonzero(item_up[b, q, g:])])
        cost = d[b, q][np.ix_(slots, items_kept)].T.astype(np.float64)
        rows, to = linear_sum_assignment(cost, maximize=True)
        total = cost[rows, to].sum()
        if total > tol[b]:
            moved = items_kept[rows]
            choice[b, q, moved] = slots[to]
            taken = np.zeros(g + u, bool)
            taken[moved] = True
            # Unused indices taken into stripes free their slots for the occupants pushed out.
            choice[b, q, slots[~taken[slots]]] = moved[moved >= g]
            gain[b] += total
    placed = np.empty_like(items)
    np.put_along_axis(placed, choice, items, axis=2)  # placed[slot] = item
    np.put_along_axis(gcols, gpick[..., None], placed[..., :g, None], axis=3)
    cols = gcols.reshape(bk, j, m)
    if u:
        pool = pool.copy()
        pool[:, : ng * u] = placed[..., g:].reshape(bk, ng * u)
    return cols, pool, gain


@functools.lru_cache(maxsize=None)
def _splits(m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ways to cut ``2m`` indices into two stripes of ``m`` (the first holds index 0;
    split 0 is the current pair)."""
    left = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    right = [[i for i in range(2 * m) if i not in c] for c in left]
    return np.asarray(left, np.int32), np.asarray(right, np.int32)


_MAX_SPLITS = 128  # re-split stripe pairs only when C(2m, m) / 2 is at most this
_RESPLIT_EVERY = 2  # a re-split round after every this many exchange rounds


@functools.partial(jax.jit, static_argnames=("n",))
def _best_splits(x, pairs, *, n: int):
    """For ``pairs`` (``(Bk, P, 2m)`` input indices of two stripes): the best cut into
    two stripes and its gain over the current one. Returns ``(index, gain)``."""
    m = pairs.shape[-1] // 2
    left, right = _splits(m)
    vals = jax.vmap(lambda xb, c: xb[c])(x, pairs)  # (Bk, P, 2m, V)
    each = [vals[:, :, i] for i in range(2 * m)]  # slices, no gathers
    if (n, m) == (2, 4):
        # top-2 of (a, b, c, d) from the pairs' max and min, shared by all cuts.
        hi = {p: jnp.maximum(each[p[0]], each[p[1]]) for p in itertools.combinations(range(8), 2)}
        lo = {p: jnp.minimum(each[p[0]], each[p[1]]) for p in itertools.combinations(range(8), 2)}

        def value(idx):
            ab, cd = (int(idx[0]), int(idx[1])), (int(idx[2]), int(idx[3]))
            h1, h2 = hi[ab], hi[cd]
            top = jnp.maximum(h1, h2) + jnp.maximum(jnp.minimum(h1, h2), jnp.maximum(lo[ab], lo[cd]))
            return jnp.sum(top, axis=-1)

    else:

        def value(idx):
            return jnp.sum(topn_sum(jnp.stack([each[i] for i in idx], axis=0), n, axis=0), axis=-1)

    scores = jnp.stack([value(a) + value(b) for a, b in zip(left, right)], axis=-1)  # (Bk, P, S)
    best = jnp.argmax(scores, axis=-1)  # first maximum: the current cut wins ties
    return best, jnp.max(scores, axis=-1) - scores[..., 0]


def _resplit_round(x, cols, rngs, active, tol, n):
    """Pairs the stripes of every block at random and re-cuts each pair's ``2m``
    indices into the best two stripes (exact, all cuts). Returns ``cols``, gain."""
    bk, j, m = cols.shape
    half = j // 2
    order = np.stack([r.permutation(j) for r in rngs])[:, : 2 * half]
    a, b = order[:, :half], order[:, half:]
    pairs = np.concatenate([np.take_along_axis(cols, a[..., None], 1), np.take_along_axis(cols, b[..., None], 1)], -1)
    best, gain = (np.asarray(t) for t in _best_splits(x, pairs, n=n))
    move = (gain > tol[:, None]) & active[:, None]
    best = np.where(move, best, 0)
    left, right = _splits(m)
    new_a = np.take_along_axis(pairs, left[best], axis=2)
    new_b = np.take_along_axis(pairs, right[best], axis=2)
    cols = cols.copy()
    np.put_along_axis(cols, a[..., None], new_a, axis=1)
    np.put_along_axis(cols, b[..., None], new_b, axis=1)
    return cols, np.where(move, gain, 0.0).sum(axis=1)


def _kick(cols, rng, stripes: int = 4):
    """Deals the indices of a few random stripes of one block ``(J, m)`` anew."""
    j, m = cols.shape
    pick = rng.choice(j, min(stripes, j), replace=False)
    cols = cols.copy()
    cols[pick] = rng.permutation(cols[pick].reshape(-1)).reshape(-1, m)
    return cols


@functools.partial(jax.jit, static_argnames=("n",))
def _block_values(x, cols, *, n: int):
    """``(Bk,)``: what each block keeps (``x`` ``(Bk, K, V)``, ``cols`` ``(Bk, J, m)``)."""
    vals = jax.vmap(lambda xb, c: xb[c])(x, cols)  # (Bk, J, m, V)
    return jnp.sum(topn_sum(vals, n, axis=2), axis=(1, 2))


def improve(
    x,
    cols,
    pool,
    rngs,
    *,
    n: int,
    rounds: int,
    group: int = 64,
    unused: int = 32,
    patience: int = 4,
    kicks: int = 4,
    deadline=None,
):
    """Cyclic-exchange rounds on a batch of blocks.

    Args:
      x: ``(Bk, K, V)`` float32 block scores (numpy or jax).
      cols: ``(Bk, J, m)`` int32 stripes.
      pool: ``(Bk, K - J*m)`` int32 unused input indices.
      rngs: one ``numpy.random.Generator`` per block.
      n: values kept per stripe.
      rounds: number of rounds.
      group: most stripes per assignment problem.
      unused: most unused indices offered to one assignment problem.
      patience: a block is stuck after this many re-split rounds in a row without gain.
      kicks: times a stuck block is perturbed (a few stripes dealt anew) and searched
        again; the best layout seen is kept.
      deadline: ``time.perf_counter()`` value after which no new round starts.

    Returns:
      ``(cols, pool)``: the best layout seen per block, stripes sorted inside (the order
      inside a stripe does not change the N:M step) and ordered by their first index;
      the unused indices ascending.
    """
    bk, j, m = cols.shape
    x = jnp.asarray(x, jnp.float32)
    cols = np.array(cols, np.int32)  # a writable copy: the caller's may be a read-only view
    pool = np.array(pool, np.int32)
    g = group_size(j, group)
    u = min(unused, pool.shape[1] // (j // g))
    tol = _TOL * n * np.asarray(jnp.max(jnp.abs(x), axis=(1, 2)) * x.shape[2], np.float64)  # (Bk,)
    idle = np.zeros(bk, np.int64)  # re-split rounds in a row without gain, per block
    resplit = j >= 2 and len(_splits(m)[0]) <= _MAX_SPLITS
    left = np.full(bk, kicks)  # perturbations left per block
    best_cols, best_val = cols.copy(), np.array(_block_values(x, cols, n=n))
    if n < m:
        for r in range(rounds):
            if deadline is not None and time.perf_counter() > deadline:
                break
            stuck = (idle >= patience) & (left > 0)
            if stuck.any():
                # Iterated local search: keep the best layout seen, kick stuck blocks.
                val = np.asarray(_block_values(x, cols, n=n))
                better = val > best_val
                best_cols[better], best_val[better] = cols[better], val[better]
                for b in np.flatnonzero(stuck):
                    cols[b] = _kick(cols[b], rngs[b])
                idle[stuck], left[stuck] = 0, left[stuck] - 1
            active = idle < patience
            if not active.any():
                break
            cols, pool, gain = _one_round(x, cols, pool, rngs, active, tol, g, u, n)
            tried = resplit and r % _RESPLIT_EVERY == _RESPLIT_EVERY - 1
            if tried:
                cols, more = _resplit_round(x, cols, rngs, active, tol, n)
                gain = gain + more
            # A block is idle after rounds without gain in either neighbourhood.
            idle = np.where(gain > tol, 0, idle + (tried or not resplit))
    val = np.asarray(_block_values(x, cols, n=n))
    worse = val < best_val
    cols[worse] = best_cols[worse]
    cols = np.sort(cols, axis=2)
    order = np.argsort(cols[:, :, 0], axis=1, kind="stable")
    cols = np.take_along_axis(cols, order[:, :, None], axis=1)
    kept = np.zeros((bk, x.shape[1]), bool)
    np.put_along_axis(kept, cols.reshape(bk, -1), True, axis=1)
    return cols, np.argsort(kept, axis=1, kind="stable")[:, : x.shape[1] - j * m].astype(np.int32)
