"""An independent numpy oracle of SPEC's mask semantics (loops, stable sorts), and of the
activations a sparse product applies (float64)."""

from __future__ import annotations

import math

import numpy as np


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest, ties to the lowest index (a stable sort on -score)."""
    return np.argsort(-scores, kind="stable")[:k]


def oracle_block_mask(score, v, kv, n, m, row_perm=None, vector_index=None):
    """SPEC steps 1-4 with loops: returns (mask (K, O) bool, vector_index (O/V, K_v))."""
    score = np.asarray(score, np.float64)
    k, o = score.shape
    perm = np.arange(o) if row_perm is None else np.asarray(row_perm)
    nb = o // v
    mask = np.zeros((k, o), bool)
    vis = []
    for b in range(nb):
        chans = perm[b * v : (b + 1) * v]
        if vector_index is None:
            idx = np.sort(_best(score[:, chans].sum(axis=1), kv))
        else:
            idx = np.asarray(vector_index[b])
        vis.append(idx)
        for c in chans:
            for j in range(0, kv, m):
                stripe = idx[j : j + m]
                for p in _best(score[stripe, c], n):
                    mask[stripe[p], c] = True
    return mask, np.stack(vis)


def oracle_unstructured(score, count):
    flat = np.asarray(score, np.float64).reshape(-1)
    mask = np.zeros(flat.shape, bool)
    mask[_best(flat, count)] = True
    return mask.reshape(np.shape(score))


def oracle_hss(score, levels):
    s = np.asarray(score, np.float64).T  # (O, K)
    o, k = s.shape
    keep = np.ones((o, k), bool)
    for c in range(o):
        group = list(s[c])
        unit = 1
        for n, m in reversed(levels):
            new_group = []
            for g0 in range(0, len(group), m):
                vals = np.array(group[g0 : g0 + m])
                kept = set(_best(vals, n).tolist())
                for q in range(m):
                    if q not in kept:
                        start = (g0 + q) * unit
                        keep[c, start : start + unit] = False
                new_group.append(sum(vals[q] for q in kept))
            group = new_group
            unit *= m
    return keep.T


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def oracle_activation(activation, y):
    """``activation(y)`` in float64: ``None``, ``"relu"`` or the exact GELU ``y * (1 + erf(y / sqrt 2)) / 2``."""
    y = np.asarray(y, np.float64)
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "gelu":
        return y * 0.5 * (1.0 + _ERF(y / math.sqrt(2.0)))
    return y
