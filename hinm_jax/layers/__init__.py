"""Sparse inference for unmodified Flax models.

- **linen**: inside ``with sparse_inference():`` every ``nn.Dense``, ``nn.DenseGeneral``
  and ``nn.Conv`` whose ``kernel`` is a :class:`~hinm_jax.SparseWeight` runs through
  :func:`hinm_jax.sparse_matmul`; a :class:`FeedForward` (two of them with an activation
  between) runs as one :func:`hinm_jax.sparse_ffn` and a :class:`Parallel` (several of
  one input) as one :func:`hinm_jax.sparse_matmuls`; all other modules run as usual.
  Built on ``flax.linen.intercept_methods``: the model code is not touched.
- **nnx**: :func:`to_inference` returns a new model whose pruned ``nnx.Linear`` /
  ``nnx.LinearGeneral`` / ``nnx.Conv`` are swapped for :class:`SparseLinear` /
  :class:`SparseConv` holding the compressed weight (``nnx.jit`` works on it);
  :class:`hinm_jax.layers.nnx.FeedForward` and :class:`hinm_jax.layers.nnx.Parallel` hold
  ``nnx.Linear`` layers and, once these are :class:`SparseLinear`, run as one
  :func:`hinm_jax.sparse_ffn` / :func:`hinm_jax.sparse_matmuls`.

Convolutions run as patch extraction (``lax.conv_general_dilated_patches``) followed by
one sparse matmul. The patches come out with the input channel *slowest* (``(I, kh,
kw)``), while the canonical kernel flattens ``(kh, kw, I)`` with ``I`` fastest; rather
than transposing activations, the weight's vector index is renumbered into patch order
(a gather on ``(O/V, K_v)`` integers; :func:`patch_order`). Grouped/depthwise
convolutions are left dense (masked) and reported with a :class:`DenseFallbackWarning`.

A ``DenseGeneral(features=(H, D))`` kernel ``(K, H, D)`` must be pruned as the ``(K,
H*D)`` matrix it computes: :func:`fold_features` reshapes such kernels before pruning
and :func:`unfold_features` restores the dense leaves after compression.

Modules: :mod:`~hinm_jax.layers.functional` (the ops: :func:`dense_general`,
:func:`dense_many`, :func:`feed_forward`, :func:`conv`, :func:`patch_order`),
:mod:`~hinm_jax.layers.linen` (:func:`sparse_inference`, :class:`Dense`: ``nn.Dense`` with an
activation that sparse inference fuses into the kernel, :class:`FeedForward` and
:class:`Parallel`: layers that run as one call),
:mod:`~hinm_jax.layers.nnx` (:class:`SparseLinear`, :class:`SparseConv`,
:func:`to_inference`, and its own ``FeedForward`` and ``Parallel``), :mod:`~hinm_jax.layers.features` (:func:`fold_features`).

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, hinm_jax
    >>> model = nn.Dense(64)
    >>> x = jnp.ones((2, 128))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> masks = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    >>> sparse = hinm_jax.compress(params, masks)
    >>> with sparse_inference():
    ...     y = model.apply({"params": sparse}, x)
    >>> y_ref = model.apply({"params": hinm_jax.apply_masks(params, masks)}, x)
    >>> bool(jnp.allclose(y, y_ref, rtol=1e-5, atol=1e-6))
    True
"""

from hinm_jax.layers.features import fold_features, unfold_features
from hinm_jax.layers.functional import (
    ConvSpec,
    DenseFallbackWarning,
    conv,
    conv_patches,
    dense_general,
    dense_many,
    feed_forward,
    patch_order,
)
from hinm_jax.layers.linen import Dense, FeedForward, Parallel, sparse_inference
from hinm_jax.layers.nnx import Conversion, SparseConv, SparseLinear, SparseParam, conversion_report, to_inference

__all__ = [
    "sparse_inference",
    "Dense",
    "FeedForward",
    "Parallel",
    "to_inference",
    "conversion_report",
    "Conversion",
    "SparseLinear",
    "SparseConv",
    "SparseParam",
    "ConvSpec",
    "DenseFallbackWarning",
    "dense_general",
    "dense_many",
    "feed_forward",
    "conv",
    "conv_patches",
    "patch_order",
    "fold_features",
    "unfold_features",
]
