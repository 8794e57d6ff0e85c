"""hinm_jax: hierarchical N:M sparsity for Flax models, from pruning to Sparse Tensor Cores.

Example:
    >>> import jax, hinm_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}}
    >>> masks = hinm_jax.prune(params, hinm_jax.HiNM(64, 0.5, 2, 4))
    >>> sparse = hinm_jax.compress(params, masks)
    >>> y = hinm_jax.sparse_matmul(jax.numpy.ones((8, 256)), sparse["dense"]["kernel"])
"""

from hinm_jax import _serialization  # noqa: F401  (registers flax serialization)
from hinm_jax import checkpoint, interop, layers, optim, permute, reconstruct, scores, select
from hinm_jax.format import SparseWeight, compress, pack_for
from hinm_jax.layers import sparse_inference, to_inference
from hinm_jax.masks import Layout, Mask, Summary, apply_masks, named_leaves, prune, summary
from hinm_jax.ops import available_implementations, sparse_matmul
from hinm_jax.optim import ste_apply
from hinm_jax.permute import efficacy
from hinm_jax.patterns import HSS, NM, HiNM, Pattern, Unstructured, VectorWise, parse_pattern

__version__ = "0.1.0"

__all__ = [
    "HiNM",
    "NM",
    "VectorWise",
    "Unstructured",
    "HSS",
    "Pattern",
    "parse_pattern",
    "prune",
    "apply_masks",
    "summary",
    "Summary",
    "named_leaves",
    "ste_apply",
    "efficacy",
    "sparse_inference",
    "to_inference",
    "Mask",
    "Layout",
    "SparseWeight",
    "compress",
    "pack_for",
    "sparse_matmul",
    "available_implementations",
]
