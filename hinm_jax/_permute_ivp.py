"""Input-vector search (IVP with column choice): each block's kept input indices and
their N:M walk order, by cyclic exchange.

A block is ``V`` output channels with scores ``X`` (``(K, V)``); its layout is ``J``
stripes of ``m`` input indices (``cols``, ``(J, m)``) plus the unused indices (``pool``).
The value of a stripe is ``sum_o top_n(X[stripe, o])``; the block's value is the sum
over its stripes, which is exactly what the N:M step keeps.

One round, for every block: cut the stripes at random into groups of ``G``; in every
stripe of a group pick one position at random; add ``u`` random unused indices. The
``G + u`` indices are then re-dealt to the ``G`` picked positions and ``u`` unused slots
by one assignment problem (``scipy.optimize.linear_sum_assignment``), whose gain
``D[slot, item]`` (stripe value with ``item`` in the picked position, minus the stripe's
value now) is exact because every stripe changes in one position only. The optimum
contains the identity (gain 0), so a round never loses. Its moves are arbitrary cycles:
``a -> stripe 2``, ``stripe 2's -> stripe 5``, ..., ``-> unused``, which pairwise swaps
cannot reach when no single swap pays; and taking an unused index in is how a block
chooses its own ``K_v`` indices jointly with the N:M step (SPEC allows any ``K_v``).

The gains of all blocks (of every matrix in a batch) are one jitted array program; the
assignment problems are small (``2G`` at most) and solved one by one.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["group_size", "improve"]

_EPS = 1e-6


def group_size(j: int, cap: int) -> int:
    """Stripes per assignment problem: the largest divisor of ``j`` that is ``<= cap``
    (or ``j`` itself when that divisor would be tiny)."""
    if j <= cap:
        return j
    g = max(d for d in range(1, cap + 1) if j % d == 0)
    return g if g >= 8 else j


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
    srt = -jnp.sort(-vals, axis=3)  # descending along the stripe
    top = jnp.sum(srt[:, :, :, :n], axis=3)  # (Bk, ng, G, V)
    nth = srt[:, :, :, n - 1]  # n-th largest
    nxt = srt[:, :, :, n]  # (n+1)-th largest
    here = jnp.take_along_axis(vals, pos[..., None, None], axis=3)[:, :, :, 0]  # (Bk, ng, G, V)
    idx = jnp.arange(m)
    beats = (vals > here[:, :, :, None]) | ((vals == here[:, :, :, None]) & (idx[:, None] < pos[..., None, None]))
    in_top = jnp.sum(beats, axis=3) < n  # the picked value is one of the n kept
    rest_top = jnp.where(in_top, top - here + nxt, top)  # top-n of the other m-1
    thresh = jnp.where(in_top, nxt, nth)  # n-th largest of the other m-1
    base = jnp.sum(rest_top - top, axis=-1)  # (Bk, ng, G)
    xi = take(x, items)  # (Bk, ng, G+u, V)
    add = jnp.sum(jnp.maximum(xi[:, :, None, :, :] - thresh[:, :, :, None, :], 0.0), axis=-1)
    return base[..., None] + add


def _one_round(x, cols, pool, rngs, g, u, n):
    """One cyclic-exchange round over ``Bk`` blocks; ``rngs[i]`` draws block ``i``'s
    random choices. Returns new ``cols``, ``pool`` and the total gain."""
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
    gain = 0.0
    worth = (d > _EPS).any(axis=(2, 3))  # a positive cycle needs a positive edge
    for b, q in zip(*np.nonzero(worth)):
        # Items x picked positions; the u items left over go to the unused slots.
        cost = d[b, q].T.astype(np.float64)
        rows, slots = linear_sum_assignment(cost, maximize=True)
        total = cost[rows, slots].sum()
        if total > _EPS:
            left = np.setdiff1d(np.arange(g + u), rows, assume_unique=True)
            choice[b, q, rows] = slots
            choice[b, q, left] = np.arange(g, g + u)
            gain += total
    placed = np.empty_like(items)
    np.put_along_axis(placed, choice, items, axis=2)  # placed[slot] = item
    np.put_along_axis(gcols, gpick[..., None], placed[..., :g, None], axis=3)
    cols = gcols.reshape(bk, j, m)
    if u:
        pool = pool.copy()
        pool[:, : ng * u] = placed[..., g:].reshape(bk, ng * u)
    return cols, pool, gain


def improve(x, cols, pool, rngs, *, n: int, rounds: int, group: int = 64, patience: int = 8, deadline=None):
    """Cyclic-exchange rounds on a batch of blocks.

    Args:
      x: ``(Bk, K, V)`` float32 block scores (numpy or jax).
      cols: ``(Bk, J, m)`` int32 stripes.
      pool: ``(Bk, K - J*m)`` int32 unused input indices.
      rngs: one ``numpy.random.Generator`` per block.
      n: values kept per stripe.
      rounds: number of rounds.
      group: most stripes per assignment problem.
      patience: stop after this many rounds in a row without gain.
      deadline: ``time.perf_counter()`` value after which no new round starts.

    Returns:
      ``(cols, pool)`` after the rounds; stripes are then sorted inside (the order inside
      a stripe does not change the N:M step) and ordered by their first index.
    """
    bk, j, m = cols.shape
    x = jnp.asarray(x, jnp.float32)
    cols = np.asarray(cols, np.int32)
    pool = np.asarray(pool, np.int32)
    g = group_size(j, group)
    u = min(g, pool.shape[1] // (j // g))
    idle = 0
    if n < m:
        for _ in range(rounds):
            if deadline is not None and time.perf_counter() > deadline:
                break
            cols, pool, gain = _one_round(x, cols, pool, rngs, g, u, n)
            idle = 0 if gain > _EPS else idle + 1
            if idle >= patience:
                break
    cols = np.sort(cols, axis=2)
    order = np.argsort(cols[:, :, 0], axis=1, kind="stable")
    return np.take_along_axis(cols, order[:, :, None], axis=1), np.sort(pool, axis=1)
