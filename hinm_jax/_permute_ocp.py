"""Output-channel search (OCP): which output channels share a block.

The value of putting channel ``o`` in block ``b`` is read off a *proxy layout* of the
block, a layout that follows from the block's members alone:

- ``"ascending"``: the paper's rule, the ``K_v`` best input indices by block sum walked
  in ascending order (what ``method="ocp"`` returns, so its objective is exact);
- ``"snake"``: the same indices ranked by block sum and dealt to the stripes
  boustrophedon (stripe ``t`` gets ranks ``t, 2J-1-t, 2J+t, ...``), so that every stripe
  holds ``n`` of the block's top ``n*J``. This is the order the input-vector search
  starts from; it is generic (tuned to the block's sum, not to each member), which
  keeps the search from locking channels into layouts that were fitted to them.

``Q[o, b]`` is the exact N:M value of channel ``o`` in block ``b``'s proxy layout. Given
``Q``, the best assignment of channels to blocks of ``V`` is a transportation problem,
solved exactly by one ``linear_sum_assignment`` when it is small, else by assignment
over random subsets of ``s`` members per block (every subset keeps the block sizes).
Assignment and layout alternate to a fixed point (a descent). Then large-neighbourhood
cycles: the blocks are cut at random into groups of up to ``group`` blocks; each group's
channels are perturbed by random swaps and the group alone descends (all groups of all
matrices in one batch); a group keeps its new channels if its value went up. Block
values are additive, so every kept group raises the matrix's value. With a group as
large as the matrix this is plain iterated local search.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["topn_sum", "proxy_layout", "channel_values", "assign", "search"]

_EPS = 1e-6
_CHUNK = 1 << 20  # elements per chunk of blocks in channel_values (cache-sized)


def topn_sum(x, n: int, axis: int):
    """Sum of the ``n`` largest entries along a (short) axis."""
    m = x.shape[axis]
    if n >= m:
        return jnp.sum(x, axis=axis)
    if n == 1:
        return jnp.max(x, axis=axis)
    if n == m - 1:
        return jnp.sum(x, axis=axis) - jnp.min(x, axis=axis)
    if (n, m) == (2, 4):
        a, b, c, d = (jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(4))
        hi1, lo1 = jnp.maximum(a, b), jnp.minimum(a, b)
        hi2, lo2 = jnp.maximum(c, d), jnp.minimum(c, d)
        return jnp.maximum(hi1, hi2) + jnp.maximum(jnp.minimum(hi1, hi2), jnp.maximum(lo1, lo2))
    srt = jnp.sort(x, axis=axis)
    return jnp.sum(jax.lax.slice_in_dim(srt, m - n, m, axis=axis), axis=axis)


def snake_order(kv: int, m: int) -> np.ndarray:
    """Ranks ``0..kv-1`` (best first) in stripe-major walk order, dealt boustrophedon."""
    j = kv // m
    r = np.arange(kv)
    level, i = r // j, r % j
    stripe = np.where(level % 2 == 0, i, j - 1 - i)
    return np.argsort(stripe * m + level, kind="stable")


@functools.partial(jax.jit, static_argnames=("v", "kv", "m", "order"))
def proxy_layout(s, perm, *, v: int, kv: int, m: int, order: str):
    """``(B, K, O)`` scores and ``(B, O)`` permutations -> ``(B, O/V, K_v)`` vector index.

    Block ``b``'s ``K_v`` best inputs by block sum (ties: lowest index), walked in
    ascending order (``order="ascending"``) or dealt boustrophedon (``"snake"``).
    """
    bsz, k, o = s.shape
    nb = o // v
    cols = jnp.take_along_axis(s, perm[:, None, :], axis=2)
    bsum = jnp.sum(cols.reshape(bsz, k, nb, v), axis=-1).transpose(0, 2, 1)  # (B, nb, K)
    if kv == k:
        idx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (bsz, nb, k))
        if order == "ascending":
            return idx
        idx = jnp.argsort(-bsum, axis=-1, stable=True).astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(bsum, kv)  # descending, ties: lowest index first
        idx = idx.astype(jnp.int32)
        if order == "ascending":
            return jnp.sort(idx, axis=-1)
    return idx[..., snake_order(kv, m)]


@functools.partial(jax.jit, static_argnames=("n", "m"))
def channel_values(s, vidx, *, n: int, m: int):
    """``Q[B, o, b]``: the N:M value of channel ``o`` walked in block ``b``'s layout.

    Args:
      s: ``(B, K, O)`` scores.
      vidx: ``(B, nb, K_v)`` layouts.
    """
    bsz, k, o = s.shape
    _, nb, kv = vidx.shape

    def one(sm, layout):  # (K, O), (kv,)
        g = sm[layout].reshape(kv // m, m, o)
        return jnp.sum(topn_sum(g, n, axis=1), axis=0)  # (O,)

    def per_matrix(sm, lay):
        batch = max(1, min(nb, _CHUNK // max(1, kv * o)))
        return jax.lax.map(lambda l: one(sm, l), lay, batch_size=batch).T  # (O, nb)

    return jax.vmap(per_matrix)(s, vidx)


@functools.partial(jax.jit, static_argnames=("v", "kv", "n", "m", "order"))
def _proxy_values(s, perm, *, v, kv, n, m, order):
    """``Q`` (``(B, O, nb)``) of every channel against every block's proxy layout."""
    return channel_values(s, proxy_layout(s, perm, v=v, kv=kv, m=m, order=order), n=n, m=m)


def _subset_size(v: int, nb: int, cap: int) -> int:
    """Members per block in one assignment subproblem: a divisor of ``v`` with
    ``nb * s <= cap`` (at least 1)."""
    best = 1
    for d in range(1, v + 1):
        if v % d == 0 and nb * d <= cap:
            best = d
    return best


def assign(q, perm, v: int, rng, *, cap: int = 512):
    """A better assignment of channels to blocks for fixed block values ``q``.

    Args:
      q: ``(O, nb)`` values.
      perm: ``(O,)`` current permutation (block ``b`` is ``perm[b*v:(b+1)*v]``).
      v: block size.
      rng: ``numpy.random.Generator`` for the subsets (unused when one problem fits).
      cap: largest assignment problem (channels).

    Returns:
      A permutation whose value ``sum_b sum_{o in b} q[o, b]`` is at least ``perm``'s.
    """
    o, nb = q.shape
    s = _subset_size(v, nb, cap)
    members = perm.reshape(nb, v)
    if s < v:
        members = np.take_along_axis(members, np.argsort(rng.random((nb, v)), axis=1), axis=1)
    out = members.copy()
    for t in range(v // s):
        chans = members[:, t * s : (t + 1) * s].reshape(-1)  # nb*s channels, s per block
        cost = np.repeat(q[chans], s, axis=1).astype(np.float64)  # (nb*s, nb*s)
        rows, cols = linear_sum_assignment(cost, maximize=True)
        new_blk = cols // s
        order = np.argsort(new_blk, kind="stable")
        out[:, t * s : (t + 1) * s] = chans[rows[order]].reshape(nb, s)
    return out.reshape(-1)


def _value(q, perm, v):
    nb = q.shape[1]
    return float(q[perm, np.repeat(np.arange(nb), v)].sum())


def _descend(s, p, rngs, *, v, kv, n, m, order, steps, subset):
    """Alternates assignment and layout on a batch until the assignment stops moving
    channels (or ``steps`` alternations); returns the best permutations seen and their
    values (proxy), never worse than the start."""
    bsz = s.shape[0]

    def values(p):
        return np.asarray(_proxy_values(s, jnp.asarray(p, jnp.int32), v=v, kv=kv, n=n, m=m, order=order))

    q = values(p)
    val = np.array([_value(q[i], p[i], v) for i in range(bsz)])
    best, best_val = p.copy(), val.copy()
    active = np.ones(bsz, bool)
    for _ in range(steps):
        new = p.copy()
        for i in np.nonzero(active)[0]:
            new[i] = assign(q[i], p[i], v, rngs[i], cap=subset)
            # A move pays under the current layouts, or the descent has ended.
            active[i] = _value(q[i], new[i], v) > val[i] + _EPS * abs(val[i])
        if not active.any():
            break
        p = np.where(active[:, None], new, p)
        q = values(p)
        val = np.array([_value(q[i], p[i], v) for i in range(bsz)])
        better = active & (val > best_val + _EPS * np.abs(best_val))
        best = np.where(better[:, None], p, best)
        best_val = np.where(better, val, best_val)
    return best, best_val


def search(s, perms, rngs, *, v, kv, n, m, order, cycles, descent, perturb, subset=512, group=12, deadline=None):
    """Output-channel search on a batch of matrices: a descent from ``perms``, then
    ``cycles`` rounds of large-neighbourhood search.

    A cycle cuts each matrix's blocks at random into groups of ``group`` blocks; in
    every group it swaps a fraction ``perturb`` of the channels between the group's
    blocks at random and descends on the group alone (a ``(K, group * V)`` problem; all
    groups of all matrices form one batch), keeping the group's new channels where the
    group's value went up. Block values are additive, so every kept group raises the
    matrix's value; the random grouping lets channels travel across the matrix.

    Args:
      s: ``(B, K, O)`` float32 scores (jax array).
      perms: ``(B, O)`` starting permutations.
      rngs: one ``numpy.random.Generator`` per matrix.
      v, kv, n, m: the block structure.
      order: proxy layout, ``"ascending"`` or ``"snake"``.
      cycles: large-neighbourhood cycles after the first descent.
      descent: most assignment/layout alternations per descent.
      perturb: fraction of a group's channels moved by its perturbation.
      subset: largest assignment problem (see :func:`assign`).
      group: blocks per group (all blocks when there are fewer).
      deadline: ``time.perf_counter()`` value after which no new cycle starts.

    Returns:
      ``(B, O)`` permutations, each at least as good (in its proxy) as its start.
    """
    bsz, k, o = s.shape
    nb = o // v
    opts = dict(v=v, kv=kv, n=n, m=m, order=order, steps=descent, subset=subset)
    perms = np.asarray(perms, np.int32).copy()
    if nb < 2:
        return perms
    best, _ = _descend(s, perms, rngs, **opts)
    gs = min(group, nb)
    ng = nb // gs
    width = gs * v
    swaps = max(1, int(round(perturb * width / 2)))
    for _ in range(cycles):
        if deadline is not None and time.perf_counter() > deadline:
            break
        chans = np.empty((bsz, ng, width), np.int32)
        trial = np.tile(np.arange(width, dtype=np.int32), (bsz, ng, 1))
        for i in range(bsz):
            blocks = rngs[i].permutation(nb)[: ng * gs].reshape(ng, gs)
            chans[i] = best[i].reshape(nb, v)[blocks].reshape(ng, width)
            for t in range(ng):
                a = rngs[i].choice(width, swaps, replace=False)
                b = rngs[i].choice(width, swaps, replace=False)
                for x, y in zip(a, b):
                    trial[i, t, x], trial[i, t, y] = trial[i, t, y], trial[i, t, x]
        sub = jnp.take_along_axis(s[:, None], jnp.asarray(chans)[:, :, None, :], axis=3)
        sub = sub.reshape(bsz * ng, k, width)
        ident = np.tile(np.arange(width, dtype=np.int32), (bsz * ng, 1))
        q0 = np.asarray(_proxy_values(sub, jnp.asarray(ident), v=v, kv=kv, n=n, m=m, order=order))
        before = np.array([_value(q0[g], ident[g], v) for g in range(bsz * ng)])
        sub_rngs = [rngs[g // ng] for g in range(bsz * ng)]
        after_p, after = _descend(sub, trial.reshape(bsz * ng, width), sub_rngs, **opts)
        flat = chans.reshape(bsz * ng, width)
        keep = after > before + _EPS * np.abs(before)
        flat = np.where(keep[:, None], np.take_along_axis(flat, after_p, axis=1), flat)
        for i in range(bsz):
            rest = best[i].reshape(nb, v)
            blocks_kept = flat[i * ng : (i + 1) * ng].reshape(ng * gs, v)
            used = np.zeros(o, bool)
            used[blocks_kept.reshape(-1)] = True
            others = rest[~used[rest].any(axis=1)]  # blocks left out of every group
            best[i] = np.concatenate([blocks_kept.reshape(-1), others.reshape(-1)])
    return best
