"""Pallas (Triton) kernel for the hierarchical N:M sparse x dense product.

Plain arrays in, plain arrays out: this package never imports ``hinm_jax``. Pack the
canonical format once with :func:`pack`, then call :func:`hinm_spmm` (compiled on an
NVIDIA GPU, or ``interpret=True`` on CPU).

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> import pallas_kernels as pk
    >>> w = pk.testing.random_canonical(np.random.default_rng(0), k=128, o=64,
    ...                                 vector_size=32, kept_inputs=64, n=2, m=4)
    >>> packed = pk.pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    >>> y = pk.hinm_spmm(jnp.ones((5, 128)), *packed, m=4, interpret=True)
    >>> y.shape
    (5, 64)
"""

from pallas_kernels import testing
from pallas_kernels.block_sizes import MAX_OFFSET, MIN_TILE, BlockSizes, default_block_k, tuning_candidates, unsupported
from pallas_kernels.packing import PackedHiNM, pack, unpack_positions
from pallas_kernels.spmm import SUPPORTED_DTYPES, hinm_spmm

__all__ = [
    "BlockSizes",
    "default_block_k",
    "MIN_TILE",
    "MAX_OFFSET",
    "unsupported",
    "tuning_candidates",
    "PackedHiNM",
    "pack",
    "unpack_positions",
    "hinm_spmm",
    "SUPPORTED_DTYPES",
    "testing",
]
