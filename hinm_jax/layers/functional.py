"""Sparse dense and convolution ops on a compressed kernel, as plain functions.

:func:`dense_general` and :func:`conv` compute what ``flax`` ``DenseGeneral`` and
``Conv`` compute, with the kernel a :class:`~hinm_jax.SparseWeight`, through one
:func:`hinm_jax.sparse_matmul`; :func:`dense_many` (``Dense`` layers of one input) and
:func:`feed_forward` (two ``Dense`` layers with an activation between) through one
:func:`hinm_jax.sparse_matmuls` / :func:`hinm_jax.sparse_ffn`. A convolution runs as patch
extraction (``lax.conv_general_dilated_patches``) followed by one sparse matmul; the patches come
out with the input channel *slowest* (``(I, kh, kw)``), so the weight's vector index is
renumbered into patch order (:func:`patch_order`) instead of transposing activations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hinm_jax import _activation
from hinm_jax.format import SparseWeight
from hinm_jax.ops import sparse_ffn, sparse_matmul, sparse_matmuls

__all__ = [
    "DenseFallbackWarning",
    "dense_general",
    "dense_many",
    "feed_forward",
    "ConvSpec",
    "conv",
    "conv_patches",
    "patch_order",
]


class DenseFallbackWarning(UserWarning):
    """A pruned layer that sparse inference cannot run (e.g. a grouped convolution) is
    computed densely with its mask applied."""


def _tuple(x) -> tuple:
    if isinstance(x, Sequence) and not isinstance(x, str):
        return tuple(x)
    return (x,)


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    return tuple(a if a >= 0 else ndim + a for a in axes)


def _result_dtype(dtype, *xs):
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*(x for x in xs if x is not None))


def _cast_bias(bias, dtype):
    return None if bias is None else jnp.asarray(bias, dtype).reshape(-1)


def _cast_weight(w: SparseWeight, dtype) -> SparseWeight:
    if w.values.dtype == dtype:
        return w
    # A backend's packed copy holds the old dtype: drop it (repacked in-graph).
    return dataclasses.replace(w, values=w.values.astype(dtype), packed=None, packed_for=None)


# ---------------------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------------------


def dense_general(
    x,
    w: SparseWeight,
    bias=None,
    *,
    axis=-1,
    features=None,
    dtype=None,
    implementation: str | None = None,
    path: str = "kernel",
    activation: str | None = None,
):
    """``DenseGeneral`` with a compressed kernel: contracts ``x``'s ``axis`` with the
    kernel's input axes, output axes ``features`` last, then applies ``activation``.

    Args:
      x: activations.
      w: the kernel, a :class:`~hinm_jax.SparseWeight` whose matrix is ``(K, O)`` with
        ``K = prod(x.shape[a] for a in axis)`` and ``O = prod(features)``.
      bias: ``features``-shaped bias or ``None``.
      axis: input axes contracted (an int or a tuple, order as in the kernel).
      features: output feature shape (default ``(O,)``).
      dtype: computation dtype (default: promoted from ``x``, the kernel and bias, as
        flax does).
      implementation: passed to :func:`hinm_jax.sparse_matmul`.
      path: the kernel's path, named in errors.
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact), applied after the bias
        (fused into the ``"cpu"`` kernel, see :func:`hinm_jax.sparse_matmul`).

    Returns:
      ``x``'s other axes followed by ``features``.

    Example:
        >>> import jax, hinm_jax
        >>> params = {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}
        >>> w = hinm_jax.compress(params, hinm_jax.prune(params, "2:4"))["kernel"]
        >>> dense_general(jnp.ones((2, 5, 64)), w).shape
        (2, 5, 32)
    """
    x = jnp.asarray(x)
    axis, k, features = _dense_check(x, w, bias, axis, features, path, activation)
    dt = _result_dtype(dtype, x, w.values, bias)
    x = x.astype(dt)
    w = _cast_weight(w, dt)
    b = _cast_bias(bias, dt)
    n = len(axis)
    xt = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    lead = xt.shape[: x.ndim - n]
    y = sparse_matmul(xt.reshape(lead + (k,)), w, bias=b, activation=activation, implementation=implementation)
    return y.reshape(lead + features)


def _dense_check(x, w, bias, axis, features, path: str, activation) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Checks that ``w`` (at ``path``) and ``bias`` fit a ``DenseGeneral`` over ``x``'s ``axis``
    with output ``features``; returns the axes (non-negative), ``K`` and the features."""
    if not isinstance(w, SparseWeight):
        raise ValueError(f"{path}: expected a SparseWeight, got {type(w).__name__}")
    axis = _normalize_axes(_tuple(axis), x.ndim)
    if any(a < 0 or a >= x.ndim for a in axis):
        raise ValueError(f"{path}: axis={axis} out of range for x: shape={tuple(x.shape)}")
    in_shape = tuple(x.shape[a] for a in axis)
    k, o = w.matrix_shape
    features = (o,) if features is None else _tuple(features)
    if w.stack_axes:
        raise ValueError(
            f"{path}: shape={w.shape} has stack_axes={w.stack_axes}: a batched kernel has no "
            "sparse inference path here; leave it dense"
        )
    if (k, o) != (_prod(in_shape), _prod(features)) or tuple(w.shape[: len(in_shape)]) != in_shape:
        hint = ""
        if len(features) > 1 and tuple(w.shape) == in_shape + features:
            hint = (
                f": it was pruned with O={o} (its last axis); prune its output axes {features} "
                "as one, with hinm_jax.layers.fold_features"
            )
        raise ValueError(
            f"{path}: shape={w.shape} (K={k}, O={o}) does not fit this layer: x: "
            f"shape={tuple(x.shape)} contracts axes {axis} of sizes {in_shape} into "
            f"features {features} (K={_prod(in_shape)}, O={_prod(features)}){hint}"
        )
    if bias is not None and _prod(jnp.shape(bias)) != o:
        raise ValueError(f"{path}: bias shape={tuple(jnp.shape(bias))} does not match features {features}")
    _activation.check(activation, f"{path}: shape={w.shape} pattern {w.pattern}")
    return axis, k, features


def dense_many(
    x,
    kernels,
    biases,
    *,
    activations=None,
    dtype=None,
    implementation: str | None = None,
    paths=None,
) -> tuple:
    """``Dense`` layers over ``x``'s last axis, ``tuple(activation_l(dense(x, w_l, b_l)))``, as
    one :func:`hinm_jax.sparse_matmuls` (one call of the ``"cpu"`` kernel where it can run them).

    Args:
      x: activations ``(..., K)``.
      kernels: :class:`~hinm_jax.SparseWeight` kernels, each ``(K, O_l)``.
      biases: one bias (``(O_l,)`` or ``None``) per kernel.
      activations: ``None`` or one activation per kernel (``None``, ``"relu"``, ``"gelu"``).
      dtype: the computation dtype (default: promoted as flax does; kernels whose promoted
        dtypes differ run as one :func:`dense_general` each).
      implementation: passed to :func:`hinm_jax.sparse_matmuls`.
      paths: the kernels' paths, named in errors (default ``"0/kernel"``, ``"1/kernel"``, ...).

    Returns:
      a tuple of ``(..., O_l)``.

    Example:
        >>> import jax, hinm_jax
        >>> params = {n: jax.random.normal(jax.random.key(i), (64, 32)) for i, n in enumerate("qkv")}
        >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "2:4"))
        >>> [y.shape for y in dense_many(jnp.ones((2, 5, 64)), [sw[n] for n in "qkv"], [None] * 3)]
        [(2, 5, 32), (2, 5, 32), (2, 5, 32)]
    """
    x = jnp.asarray(x)
    kernels, biases = tuple(kernels), tuple(biases)
    activations = (None,) * len(kernels) if activations is None else tuple(activations)
    paths = tuple(paths) if paths is not None else tuple(f"{i}/kernel" for i in range(len(kernels)))
    for w, b, path, a in zip(kernels, biases, paths, activations, strict=True):
        _dense_check(x, w, b, -1, None, path, a)
    dts = {_result_dtype(dtype, x, w.values, b) for w, b in zip(kernels, biases)}
    if len(dts) != 1:
        return tuple(
            dense_general(x, w, b, dtype=dtype, implementation=implementation, path=path, activation=a)
            for w, b, path, a in zip(kernels, biases, paths, activations)
        )
    (dt,) = dts
    return sparse_matmuls(
        x.astype(dt),
        [_cast_weight(w, dt) for w in kernels],
        biases=[_cast_bias(b, dt) for b in biases],
        activations=activations,
        implementation=implementation,
    )


def feed_forward(
    x,
    w1: SparseWeight,
    bias1,
    w2: SparseWeight,
    bias2,
    *,
    activation: str | None = None,
    dtype=None,
    implementation: str | None = None,
    paths: tuple[str, str] = ("first/kernel", "second/kernel"),
):
    """Two ``Dense`` layers over ``x``'s last axis with an activation between,
    ``dense(activation(dense(x, w1, bias1)), w2, bias2)``, as one :func:`hinm_jax.sparse_ffn`
    (one call of the ``"cpu"`` kernel where it can run the block).

    Args:
      x: activations ``(..., K)``.
      w1, bias1: the first layer's kernel (a :class:`~hinm_jax.SparseWeight` ``(K, H)``)
        and bias (``(H,)`` or ``None``).
      w2, bias2: the second layer's, ``(H, O)`` and ``(O,)`` or ``None``.
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact), after the first layer's bias.
      dtype: both layers' computation dtype (default: promoted as flax does, layer by layer;
        where the two layers' dtypes differ, they run as two :func:`dense_general` calls).
      implementation: passed to :func:`hinm_jax.sparse_ffn`.
      paths: the two kernels' paths, named in errors.

    Returns:
      ``(..., O)``.

    Example:
        >>> import jax, hinm_jax
        >>> params = {"up": jax.random.normal(jax.random.key(0), (64, 256)),
        ...           "down": jax.random.normal(jax.random.key(1), (256, 64))}
        >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "2:4"))
        >>> feed_forward(jnp.ones((2, 5, 64)), sw["up"], None, sw["down"], None, activation="gelu").shape
        (2, 5, 64)
    """
    x = jnp.asarray(x)
    _, _, (hidden,) = _dense_check(x, w1, bias1, -1, None, paths[0], activation)
    h = jax.ShapeDtypeStruct(x.shape[:-1] + (hidden,), x.dtype)
    _dense_check(h, w2, bias2, -1, None, paths[1], None)
    dt = _result_dtype(dtype, x, w1.values, bias1)
    if _result_dtype(dtype, jnp.zeros((), dt), w2.values, bias2) != dt:
        h = dense_general(x, w1, bias1, dtype=dtype, implementation=implementation, path=paths[0], activation=activation)
        return dense_general(h, w2, bias2, dtype=dtype, implementation=implementation, path=paths[1])
    return sparse_ffn(
        x.astype(dt), _cast_weight(w1, dt), _cast_weight(w2, dt), bias1=_cast_bias(bias1, dt),
        bias2=_cast_bias(bias2, dt), activation=activation, implementation=implementation,
    )


# ---------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The geometry of a convolution, as ``nn.Conv`` / ``nnx.Conv`` define it (static).

    Attributes:
      kernel_size: spatial kernel shape.
      strides: window strides.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"`` or
        ``((lo, hi), ...)`` per spatial axis.
      input_dilation: dilation of the input (transposed-conv style).
      kernel_dilation: dilation of the kernel (atrous).
      feature_group_count: groups (1 for an ordinary convolution).
    """

    kernel_size: tuple
    strides: tuple
    padding: Any
    input_dilation: tuple
    kernel_dilation: tuple
    feature_group_count: int = 1

    @classmethod
    def of(cls, module) -> "ConvSpec":
        """The spec of a linen ``nn.Conv`` or an ``nnx.Conv``."""
        from flax.linen.linear import canonicalize_padding

        ks = _tuple(module.kernel_size)

        def bcast(v):
            v = 1 if v is None else v
            return (v,) * len(ks) if isinstance(v, int) else tuple(v)

        pad = canonicalize_padding(module.padding, len(ks))
        if not isinstance(pad, str):
            pad = tuple((int(lo), int(hi)) for lo, hi in pad)
        return cls(
            kernel_size=ks,
            strides=bcast(module.strides),
            padding=pad,
            input_dilation=bcast(module.input_dilation),
            kernel_dilation=bcast(module.kernel_dilation),
            feature_group_count=int(module.feature_group_count),
        )


def _dimension_numbers(ndim: int):
    lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _conv_input(x, spec: ConvSpec):
    """flax's input handling: one batch axis, string paddings lowered to explicit pads.
    Returns ``(x (N, *spatial, C), lax padding, batch shape or None)``."""
    nsp = len(spec.kernel_size)
    nbatch = x.ndim - (nsp + 1)
    batch_shape = None
    if nbatch != 1:
        batch_shape = x.shape[:nbatch]
        x = x.reshape((-1,) + x.shape[nbatch:])
    pad = spec.padding
    if pad in ("CIRCULAR", "REFLECT"):
        dil = [(k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
        pad = "VALID"
    elif pad == "CAUSAL":
        if nsp != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        left = spec.kernel_dilation[0] * (spec.kernel_size[0] - 1)
        x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
        pad = "VALID"
    elif not isinstance(pad, str):
        pad = [tuple(p) for p in pad]
    return x, pad, batch_shape


def _restore_batch(y, batch_shape):
    if batch_shape is None:
        return y
    return y.reshape(tuple(batch_shape) + y.shape[1:])


def conv_patches(x, spec: ConvSpec):
    """The patches a convolution multiplies: ``(*batch, *out_spatial, I*prod(kernel_size))``
    with the feature axis in **patch order**, input channel slowest (``(I, kh, kw)``), as
    ``lax.conv_general_dilated_patches`` lays it out.

    Example:
        >>> spec = ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1))
        >>> conv_patches(jnp.ones((2, 8, 8, 4)), spec).shape
        (2, 8, 8, 36)
    """
    x2, pad, batch_shape = _conv_input(jnp.asarray(x), spec)
    p = lax.conv_general_dilated_patches(
        x2,
        filter_shape=spec.kernel_size,
        window_strides=spec.strides,
        padding=pad,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=_dimension_numbers(x2.ndim),
        precision=lax.Precision.HIGHEST,  # one-hot conv: keep fp32 patches exact (no TF32)
    )
    return _restore_batch(p, batch_shape)


def _patch_permutation(kernel_size, in_channels: int) -> np.ndarray:
    """``perm[k]``: the patch-order feature of kernel-order input ``k = s*I + i``."""
    p = _prod(kernel_size)
    k = np.arange(p * in_channels)
    return ((k % in_channels) * p + k // in_channels).astype(np.int32)


def patch_order(w: SparseWeight, path: str = "kernel") -> SparseWeight:
    """A conv kernel ``(*kernel_size, I, O)`` as the 2-D ``(I*prod(kernel_size), O)``
    matrix that multiplies :func:`conv_patches` (input channel slowest).

    Only the vector index changes (each block's kept inputs renumbered); the values and
    metadata stay, so the N:M structure is the same.

    Example:
        >>> import jax, hinm_jax
        >>> k = jax.random.normal(jax.random.key(0), (3, 3, 8, 32))
        >>> w = hinm_jax.compress({"k": k}, hinm_jax.prune({"k": k}, "hinm:32:0.5:2:4"))["k"]
        >>> dense = patch_order(w).densify()
        >>> bool(jnp.all(dense == w.densify().transpose(2, 0, 1, 3).reshape(72, 32)))
        True
    """
    if w.stack_axes or len(w.shape) < 3:
        raise ValueError(f"{path}: shape={w.shape} stack_axes={w.stack_axes}: expected a conv kernel (*kernel_size, I, O)")
    if w.packed_for is not None:
        raise ValueError(
            f"{path}: shape={w.shape} is packed for {w.packed_for!r}: convert to patch order "
            "before pack_for"
        )
    *ks, i, o = w.shape
    perm = jnp.asarray(_patch_permutation(ks, i))
    return dataclasses.replace(w, vector_index=perm[w.vector_index], shape=(_prod(ks) * i, o))


def conv(
    x,
    w: SparseWeight,
    bias=None,
    *,
    spec: ConvSpec,
    dtype=None,
    implementation: str | None = None,
    path: str = "kernel",
):
    """``nn.Conv`` with a compressed kernel: patches times the sparse matrix.

    Args:
      x: ``(*batch, *spatial, I)`` channels-last input.
      w: the kernel, either canonical ``(*kernel_size, I, O)`` or already in patch order
        (2-D ``(I*prod(kernel_size), O)``, see :func:`patch_order`).
      bias: ``(O,)`` or ``None``.
      spec: the convolution's :class:`ConvSpec` (``feature_group_count`` must be 1).
      dtype: computation dtype (default: promoted as flax does).
      implementation: passed to :func:`hinm_jax.sparse_matmul`.
      path: the kernel's path, named in errors.

    Example:
        >>> import jax, hinm_jax
        >>> k = jax.random.normal(jax.random.key(0), (3, 3, 8, 32))
        >>> w = hinm_jax.compress({"k": k}, hinm_jax.prune({"k": k}, "2:4"))["k"]
        >>> spec = ConvSpec((3, 3), (2, 2), "SAME", (1, 1), (1, 1))
        >>> conv(jnp.ones((1, 16, 16, 8)), w, spec=spec).shape
        (1, 8, 8, 32)
    """
    x = jnp.asarray(x)
    if not isinstance(w, SparseWeight):
        raise ValueError(f"{path}: expected a SparseWeight, got {type(w).__name__}")
    if spec.feature_group_count != 1:
        raise ValueError(
            f"{path}: shape={w.shape}: grouped conv (feature_group_count={spec.feature_group_count}) "
            "has no sparse path; keep it dense"
        )
    if w.stack_axes:
        raise ValueError(f"{path}: shape={w.shape} has stack_axes={w.stack_axes}: not a conv kernel")
    ks = spec.kernel_size
    in_ch = x.shape[-1]
    k, o = w.matrix_shape
    canonical = len(w.shape) == len(ks) + 2
    if canonical and tuple(w.shape) != tuple(ks) + (in_ch, o):
        raise ValueError(
            f"{path}: shape={w.shape} does not fit this conv: kernel_size={ks} and x: "
            f"shape={tuple(x.shape)} need a kernel {tuple(ks) + (in_ch, o)}"
        )
    if not canonical and (len(w.shape) != 2 or k != _prod(ks) * in_ch):
        raise ValueError(
            f"{path}: shape={w.shape} does not fit this conv: kernel_size={ks} and x: "
            f"shape={tuple(x.shape)} need K={_prod(ks) * in_ch} patch features"
        )
    if bias is not None and tuple(jnp.shape(bias)) != (o,):
        raise ValueError(f"{path}: bias shape={tuple(jnp.shape(bias))} does not match O={o}")
    dt = _result_dtype(dtype, x, w.values, bias)
    x = x.astype(dt)
    w = _cast_weight(w, dt)
    b = None if bias is None else jnp.asarray(bias, dt)
    patches = conv_patches(x, spec)
    if canonical and w.packed_for is None:
        w = patch_order(w, path)
    elif canonical:
        # The backend copy is packed in kernel order: reorder the patches instead.
        lead = patches.shape[:-1]
        patches = jnp.swapaxes(patches.reshape(lead + (in_ch, _prod(ks))), -1, -2).reshape(lead + (k,))
        w = dataclasses.replace(w, shape=(k, o))
    return sparse_matmul(patches, w, bias=b, implementation=implementation)


def _dense_conv(x, kernel, bias, spec: ConvSpec, dtype, precision=None):
    """The dense convolution flax computes (used for layers left dense)."""
    dt = _result_dtype(dtype, x, kernel, bias)
    x2, pad, batch_shape = _conv_input(jnp.asarray(x, dt), spec)
    y = lax.conv_general_dilated(
        x2,
        jnp.asarray(kernel, dt),
        spec.strides,
        pad,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=_dimension_numbers(x2.ndim),
        feature_group_count=spec.feature_group_count,
        precision=precision,
    )
    if bias is not None:
        y = y + jnp.asarray(bias, dt)
    return _restore_batch(y, batch_shape)
