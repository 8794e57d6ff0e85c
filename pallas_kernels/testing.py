"""Random weights in the canonical HiNM format, on plain numpy arrays (for tests and
GPU timing of the kernel without ``hinm_jax``).

Example:
    >>> import numpy as np
    >>> w = random_canonical(np.random.default_rng(0), k=64, o=32, vector_size=16,
    ...                      kept_inputs=32, n=2, m=4)
    >>> w.values.shape, w.metadata.shape, w.vector_index.shape, w.dense.shape
    ((32, 16), (32, 1), (2, 32), (64, 32))
    >>> int((w.dense != 0).sum())
    512
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pallas_kernels.packing import metadata_bits

__all__ = ["CanonicalWeight", "random_canonical", "pack_positions"]


class CanonicalWeight(NamedTuple):
    """One ``(K, O)`` matrix in the canonical format, with its dense equivalent.

    Attributes:
      values: ``(O, K_v*n//m)`` in the requested dtype.
      metadata: ``(O, words)`` uint32.
      vector_index: ``(O//V, K_v)`` int32.
      row_perm: ``(O,)`` int32.
      dense: ``(K, O)`` float32, ``W * mask`` (the values, exactly, at their places).
    """

    values: np.ndarray
    metadata: np.ndarray
    vector_index: np.ndarray
    row_perm: np.ndarray
    dense: np.ndarray


def pack_positions(pos: np.ndarray, m: int) -> np.ndarray:
    """Positions ``(O, nnz)`` in ``0..m-1`` -> canonical uint32 words, LSB first."""
    bits = metadata_bits(m)
    o, nnz = pos.shape
    if bits == 0:
        return np.zeros((o, 0), np.uint32)
    per = 32 // bits
    words = -(-nnz // per)
    padded = np.zeros((o, words * per), np.uint64)
    padded[:, :nnz] = pos
    shifts = np.arange(per, dtype=np.uint64) * bits
    return (padded.reshape(o, words, per) << shifts).sum(-1).astype(np.uint32)


def random_canonical(
    rng: np.random.Generator,
    *,
    k: int,
    o: int,
    vector_size: int,
    kept_inputs: int,
    n: int,
    m: int,
    dtype=np.float32,
    shuffle: bool = True,
) -> CanonicalWeight:
    """A random weight in the canonical format.

    Args:
      rng: numpy generator.
      k: ``K`` inputs.
      o: ``O`` outputs (a multiple of ``vector_size``).
      vector_size: ``V`` (``O`` for plain N:M).
      kept_inputs: ``K_v`` (a multiple of ``m``; ``K`` for plain N:M).
      n: kept per stripe (``n = m = 1`` for VectorWise).
      m: stripe length.
      dtype: values dtype (e.g. ``jnp.bfloat16``).
      shuffle: random ``row_perm`` and vector indices in random walk order (as after OCP
        and IVP); otherwise identity and ascending. Plain N:M (``V = O``,
        ``K_v = K``) always gets ``vector_index = arange(K)``.
    """
    if o % vector_size or kept_inputs % m or kept_inputs > k:
        raise ValueError(f"random_canonical: {k=} {o=} {vector_size=} {kept_inputs=} {m=}: not a structure")
    nb, j = o // vector_size, kept_inputs // m
    if vector_size == o and kept_inputs == k:
        vi = np.arange(k, dtype=np.int32)[None]
    elif shuffle:
        vi = np.stack([rng.choice(k, kept_inputs, replace=False) for _ in range(nb)]).astype(np.int32)
    else:
        vi = np.stack([np.sort(rng.choice(k, kept_inputs, replace=False)) for _ in range(nb)])
        vi = vi.astype(np.int32)
    row_perm = (rng.permutation(o) if shuffle else np.arange(o)).astype(np.int32)
    pos = np.sort(np.argsort(rng.random((o, j, m)), axis=-1)[..., :n], axis=-1).reshape(o, j * n)
    values = rng.standard_normal((o, j * n)).astype(np.float32).astype(dtype)
    dense = np.zeros((k, o), np.float32)
    r = np.arange(o)[:, None]
    i = np.arange(j * n)[None, :]
    rows = vi[r // vector_size, (i // n) * m + pos]
    dense[rows, row_perm[r]] = values.astype(np.float32)
    return CanonicalWeight(values, pack_positions(pos, m), vi, row_perm, dense)
