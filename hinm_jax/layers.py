"""Sparse inference for unmodified Flax models.

- **linen**: inside ``with sparse_inference():`` every ``nn.Dense``, ``nn.DenseGeneral``
  and ``nn.Conv`` whose ``kernel`` is a :class:`~hinm_jax.SparseWeight` runs through
  :func:`hinm_jax.sparse_matmul`; all other modules run as usual. Built on
  ``flax.linen.intercept_methods``: the model code is not touched.
- **nnx**: :func:`to_inference` returns a new model whose pruned ``nnx.Linear`` /
  ``nnx.LinearGeneral`` / ``nnx.Conv`` are swapped for :class:`SparseLinear` /
  :class:`SparseConv` holding the compressed weight (``nnx.jit`` works on it).

Convolutions run as patch extraction (``lax.conv_general_dilated_patches``) followed by
one sparse matmul. The patches come out with the input channel *slowest* (``(I, kh,
kw)``), while the canonical kernel flattens ``(kh, kw, I)`` with ``I`` fastest; rather
than transposing activations, the weight's vector index is renumbered into patch order
(a gather on ``(O/V, K_v)`` integers; :func:`patch_order`). Grouped/depthwise
convolutions are left dense (masked) and reported with a :class:`DenseFallbackWarning`.

A ``DenseGeneral(features=(H, D))`` kernel ``(K, H, D)`` must be pruned as the ``(K,
H*D)`` matrix it computes: :func:`fold_features` reshapes such kernels before pruning
and :func:`unfold_features` restores the dense leaves after compression.

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

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import lax

from hinm_jax._tree import is_mask_leaf, map_with_path, path_str
from hinm_jax.format import SparseWeight, compress, pack_for
from hinm_jax.masks import Mask
from hinm_jax.ops import sparse_matmul

__all__ = [
    "sparse_inference",
    "to_inference",
    "conversion_report",
    "Conversion",
    "SparseLinear",
    "SparseConv",
    "SparseParam",
    "ConvSpec",
    "DenseFallbackWarning",
    "dense_general",
    "conv",
    "conv_patches",
    "patch_order",
    "fold_features",
    "unfold_features",
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
):
    """``DenseGeneral`` with a compressed kernel: contracts ``x``'s ``axis`` with the
    kernel's input axes, output axes ``features`` last.

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
    dt = _result_dtype(dtype, x, w.values, bias)
    x = x.astype(dt)
    w = _cast_weight(w, dt)
    b = None if bias is None else jnp.asarray(bias, dt).reshape(-1)
    n = len(axis)
    xt = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    lead = xt.shape[: x.ndim - n]
    y = sparse_matmul(xt.reshape(lead + (k,)), w, bias=b, implementation=implementation)
    return y.reshape(lead + features)


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


# ---------------------------------------------------------------------------------------
# linen: method interception
# ---------------------------------------------------------------------------------------


def _own_params(module) -> dict:
    """The module's own parameters (not its children's), unboxed."""
    from flax.core import meta

    if module.scope is None:  # unbound: nothing to intercept
        return {}
    params = module.variables.get("params", {})
    out = {}
    for name, v in params.items():
        if isinstance(v, Mapping):
            continue
        out[name] = v.unbox() if isinstance(v, meta.AxisMetadata) else v
    return out


def _linen_call(module, params, args, kwargs, path: str, implementation):
    if len(args) != 1 or kwargs:
        raise ValueError(f"{path}: expected {type(module).__name__}(inputs), got {len(args)} args and {sorted(kwargs)}")
    (x,) = args
    w, bias = params["kernel"], params.get("bias")
    kpath = f"{path}/kernel" if path else "kernel"
    if isinstance(module, nn.Dense):
        return dense_general(
            x, w, bias, axis=-1, features=(module.features,), dtype=module.dtype,
            implementation=implementation, path=kpath,
        )
    if isinstance(module, nn.DenseGeneral):
        if _tuple(module.batch_dims):
            raise ValueError(
                f"{kpath}: shape={w.shape}: DenseGeneral with batch_dims={module.batch_dims} has no "
                "sparse inference path; leave it dense"
            )
        return dense_general(
            x, w, bias, axis=module.axis, features=_tuple(module.features), dtype=module.dtype,
            implementation=implementation, path=kpath,
        )
    # nn.Conv
    if module.mask is not None:
        raise ValueError(
            f"{kpath}: shape={w.shape}: nn.Conv(mask=...) with a sparse kernel: fold the mask into "
            "the pruning mask instead"
        )
    spec = ConvSpec.of(module)
    if spec.feature_group_count != 1:
        warnings.warn(
            f"{kpath}: shape={w.shape}: grouped conv (feature_group_count={spec.feature_group_count}) "
            "has no sparse path; computed densely with its mask",
            DenseFallbackWarning,
            stacklevel=2,
        )
        return _dense_conv(x, w.densify(), bias, spec, module.dtype, module.precision)
    return conv(x, w, bias, spec=spec, dtype=module.dtype, implementation=implementation, path=kpath)


@contextlib.contextmanager
def sparse_inference(implementation: str | None = None):
    """Runs linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` layers whose kernel is
    a :class:`~hinm_jax.SparseWeight` through :func:`hinm_jax.sparse_matmul`.

    Layers with a dense kernel run unchanged, so a partly compressed tree works. Any
    other module holding a ``SparseWeight`` parameter raises a ``ValueError`` naming
    its path. Works under ``jax.jit`` (the context must be active while tracing).

    Args:
      implementation: passed to :func:`hinm_jax.sparse_matmul` (``None``: best here).

    Example:
        >>> with sparse_inference():  # doctest: +SKIP
        ...     y = model.apply({"params": hinm_jax.compress(params, masks)}, x)
    """
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        params = _own_params(module)
        sparse = sorted(name for name, v in params.items() if isinstance(v, SparseWeight))
        if not sparse:
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.scope.path)
        handled = isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))
        if handled and sparse == ["kernel"]:
            return _linen_call(module, params, args, kwargs, path, implementation)
        name = f"{path}/{sparse[0]}" if path else sparse[0]
        raise ValueError(
            f"{name}: shape={params[sparse[0]].shape}: {type(module).__name__} has no sparse "
            "inference path (nn.Dense, nn.DenseGeneral and nn.Conv kernels do); leave it dense"
        )

    with nn.intercept_methods(interceptor):
        yield


# ---------------------------------------------------------------------------------------
# nnx: module swap
# ---------------------------------------------------------------------------------------


class SparseParam(nnx.Variable):
    """An nnx variable holding a :class:`~hinm_jax.SparseWeight` (not an ``nnx.Param``:
    its integer index arrays are not trainable)."""


@jax.jit
def _compress_all(kernels: dict, masks: dict):
    out = {}
    for path, kernel in kernels.items():
        mask = masks[path]
        sw = compress({"kernel": kernel}, {"kernel": mask})["kernel"]
        masked = jnp.where(mask.mask, kernel, jnp.zeros((), kernel.dtype))
        out[path] = (sw, jnp.array_equal(sw.densify(), masked, equal_nan=True))
    return out


def _compress_checked(items: Mapping[str, tuple[Any, Mask]]) -> dict[str, SparseWeight]:
    """``compress`` of ``{path: (kernel, mask)}`` in one compiled call, checked: every
    compressed kernel must densify to exactly ``kernel * mask``."""
    for path, (kernel, mask) in items.items():
        if tuple(mask.mask.shape) != tuple(kernel.shape):
            raise ValueError(f"{path}: shape={tuple(kernel.shape)} but its mask has shape {tuple(mask.mask.shape)}")
    done = _compress_all({p: k for p, (k, _) in items.items()}, {p: m for p, (_, m) in items.items()})
    for path, (sw, ok) in done.items():
        if not bool(ok):
            kernel, mask = items[path]
            raise ValueError(
                f"{path}: shape={tuple(kernel.shape)} pattern {mask.pattern}: the mask does not follow "
                "its layout (every stripe keeps exactly n of m, nothing outside the vector index)"
            )
    return {p: sw for p, (sw, _) in done.items()}


def _kpath(path: str) -> str:
    return f"{path}/kernel" if path else "kernel"


def _linear_kernel(module, mask: Mask, path: str):
    """The kernel of an ``nnx.Linear`` / ``nnx.LinearGeneral`` in the mask's shape."""
    kernel = module.kernel[...]
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(
                f"{_kpath(path)}: shape={tuple(kernel.shape)}: LinearGeneral with batch_axis has no sparse path"
            )
        folded = tuple(module.in_features) + (_prod(module.out_features),)
    else:
        folded = tuple(kernel.shape)
    mshape = tuple(mask.mask.shape)
    if mshape not in (tuple(kernel.shape), folded):
        raise ValueError(f"{_kpath(path)}: shape={tuple(kernel.shape)} but its mask has shape {mshape}")
    return kernel.reshape(mshape)


def _conv_kernel(module, mask: Mask, path: str):
    """The kernel of an ``nnx.Conv``, its ``mask=`` attribute folded in."""
    kernel = module.kernel[...]
    if tuple(mask.mask.shape) != tuple(kernel.shape):
        raise ValueError(f"{_kpath(path)}: shape={tuple(kernel.shape)} but its mask has shape {tuple(mask.mask.shape)}")
    if module.mask is not None:
        kernel = kernel * module.mask
    return kernel


class SparseLinear(nnx.Module):
    """``nnx.Linear`` / ``nnx.LinearGeneral`` with a compressed kernel.

    Args:
      kernel: a :class:`~hinm_jax.SparseWeight` whose matrix is ``(K, O)``.
      bias: ``out_features``-shaped bias or ``None``.
      axis: input axes contracted (default the last).
      out_features: output feature shape (default ``(O,)``).
      dtype: computation dtype (default: promoted as flax does).
      preferred_element_type: output dtype, if set.
      implementation: passed to :func:`hinm_jax.sparse_matmul`.
      path: the layer's path in its model, named in errors.

    Example:
        >>> from flax import nnx
        >>> import hinm_jax
        >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
        >>> mask = hinm_jax.prune({"kernel": lin.kernel[...]}, "2:4")["kernel"]
        >>> sparse = SparseLinear.from_linear(lin, mask)
        >>> sparse(jnp.ones((3, 64))).shape
        (3, 32)
    """

    def __init__(
        self,
        kernel: SparseWeight,
        bias=None,
        *,
        axis=-1,
        out_features=None,
        dtype=None,
        preferred_element_type=None,
        implementation: str | None = None,
        path: str = "",
    ):
        if not isinstance(kernel, SparseWeight):
            raise ValueError(f"{path or 'kernel'}: expected a SparseWeight, got {type(kernel).__name__}")
        self.kernel = SparseParam(kernel)
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
        self.axis = _tuple(axis)
        self.out_features = (kernel.matrix_shape[1],) if out_features is None else _tuple(out_features)
        self.dtype = dtype
        self.preferred_element_type = preferred_element_type
        self.implementation = implementation
        self.path = path

    @classmethod
    def from_linear(cls, module, mask: Mask, *, implementation: str | None = None, path: str = ""):
        """Compresses an ``nnx.Linear`` / ``nnx.LinearGeneral`` kernel with ``mask``.

        A ``LinearGeneral`` with several output axes takes a mask of its folded kernel
        ``(*in, prod(out))`` (see :func:`fold_features`).
        """
        kernel = _linear_kernel(module, mask, path)
        sw = _compress_checked({_kpath(path): (kernel, mask)})[_kpath(path)]
        return cls._wrap(module, sw, implementation=implementation, path=path)

    @classmethod
    def _wrap(cls, module, sw: SparseWeight, *, implementation, path):
        if isinstance(module, nnx.LinearGeneral):
            axis, out_features = module.axis, module.out_features
        else:
            axis, out_features = (-1,), (module.out_features,)
        bias = module.bias[...] if module.bias is not None else None
        return cls(
            sw, bias, axis=axis, out_features=out_features, dtype=module.dtype,
            preferred_element_type=module.preferred_element_type, implementation=implementation, path=path,
        )

    def __call__(self, inputs, out_sharding=None):
        bias = self.bias[...] if self.bias is not None else None
        kpath = f"{self.path}/kernel" if self.path else "kernel"
        y = dense_general(
            inputs, self.kernel.get_value(), bias, axis=self.axis, features=self.out_features,
            dtype=self.dtype, implementation=self.implementation, path=kpath,
        )
        if self.preferred_element_type is not None:
            y = y.astype(self.preferred_element_type)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y


class SparseConv(nnx.Module):
    """``nnx.Conv`` with a compressed kernel, stored in patch order (see
    :func:`patch_order`): one sparse matmul of the input's patches.

    Args:
      kernel: the compressed kernel, canonical ``(*kernel_size, I, O)`` (converted to
        patch order here) or already 2-D in patch order.
      bias: ``(O,)`` or ``None``.
      spec: the convolution's :class:`ConvSpec` (not grouped).
      in_features: ``I``.
      dtype: computation dtype (default: promoted as flax does).
      preferred_element_type: output dtype, if set.
      implementation: passed to :func:`hinm_jax.sparse_matmul`.
      path: the layer's path in its model, named in errors.

    Example:
        >>> from flax import nnx
        >>> import hinm_jax
        >>> c = nnx.Conv(8, 32, (3, 3), rngs=nnx.Rngs(0))
        >>> mask = hinm_jax.prune({"kernel": c.kernel[...]}, "hinm:32:0.5:2:4")["kernel"]
        >>> SparseConv.from_conv(c, mask)(jnp.ones((1, 10, 10, 8))).shape
        (1, 10, 10, 32)
    """

    def __init__(
        self,
        kernel: SparseWeight,
        bias=None,
        *,
        spec: ConvSpec,
        in_features: int,
        dtype=None,
        preferred_element_type=None,
        implementation: str | None = None,
        path: str = "",
    ):
        kpath = f"{path}/kernel" if path else "kernel"
        if not isinstance(kernel, SparseWeight):
            raise ValueError(f"{kpath}: expected a SparseWeight, got {type(kernel).__name__}")
        if spec.feature_group_count != 1:
            raise ValueError(f"{kpath}: shape={kernel.shape}: grouped conv has no sparse path; keep nnx.Conv")
        if len(kernel.shape) != 2:
            kernel = patch_order(kernel, kpath)
        if kernel.matrix_shape[0] != _prod(spec.kernel_size) * in_features:
            raise ValueError(
                f"{kpath}: shape={kernel.shape} does not fit kernel_size={spec.kernel_size} with "
                f"in_features={in_features}"
            )
        self.kernel = SparseParam(kernel)
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
        self.spec = spec
        self.in_features = int(in_features)
        self.dtype = dtype
        self.preferred_element_type = preferred_element_type
        self.implementation = implementation
        self.path = path

    @classmethod
    def from_conv(cls, module, mask: Mask, *, implementation: str | None = None, path: str = ""):
        """Compresses an ``nnx.Conv`` kernel with ``mask`` (``Conv(mask=...)`` is folded
        into the values)."""
        kernel = _conv_kernel(module, mask, path)
        sw = _compress_checked({_kpath(path): (kernel, mask)})[_kpath(path)]
        return cls._wrap(module, sw, implementation=implementation, path=path)

    @classmethod
    def _wrap(cls, module, sw: SparseWeight, *, implementation, path):
        bias = module.bias[...] if module.bias is not None else None
        return cls(
            sw, bias, spec=ConvSpec.of(module), in_features=module.in_features, dtype=module.dtype,
            preferred_element_type=module.preferred_element_type, implementation=implementation, path=path,
        )

    def __call__(self, inputs, out_sharding=None):
        kpath = f"{self.path}/kernel" if self.path else "kernel"
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"{kpath}: shape={self.kernel.get_value().shape} expects {self.in_features} input "
                f"channels, x: shape={tuple(inputs.shape)}"
            )
        bias = self.bias[...] if self.bias is not None else None
        y = conv(
            inputs, self.kernel.get_value(), bias, spec=self.spec, dtype=self.dtype,
            implementation=self.implementation, path=kpath,
        )
        if self.preferred_element_type is not None:
            y = y.astype(self.preferred_element_type)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y


class Conversion(NamedTuple):
    """What :func:`to_inference` does with one pruned leaf.

    Attributes:
      path: the leaf's path (``"layers/0/kernel"``).
      module: the type name of the module owning it.
      action: ``"sparse"`` (swapped for a sparse module) or ``"dense"`` (kept dense,
        mask applied).
      reason: why a leaf stays dense (empty when sparse).
    """

    path: str
    module: str
    action: str
    reason: str


def _masks_by_path(masks) -> dict[str, Mask]:
    leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_mask_leaf)[0]
    out = {}
    for p, m in leaves:
        if m is None:
            continue
        if not isinstance(m, Mask):
            raise ValueError(f"{path_str(p)}: expected a Mask or None in masks, got {type(m).__name__}")
        out[path_str(p)] = m
    return out


def _plan(model, masks: Mapping[str, Mask]) -> list[tuple[Conversion, Any]]:
    """``(Conversion, module or None)`` per mask."""
    params = {
        path_str(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    }
    owners = {}
    for mpath, mod in nnx.iter_modules(model):
        mp = "/".join(str(k) for k in mpath)
        owners[f"{mp}/kernel" if mp else "kernel"] = mod
    plan = []
    for path, mask in masks.items():
        if path not in params:
            raise ValueError(
                f"{path}: masks and model have different structures: the model has no nnx.Param "
                f"at this path (mask shape {tuple(mask.mask.shape)})"
            )
        mod = owners.get(path)
        name = type(mod).__name__ if mod is not None else "-"
        shape = tuple(params[path].shape)
        reason = ""
        if isinstance(mod, nnx.Conv):
            if mod.feature_group_count != 1:
                reason = f"grouped conv (feature_group_count={mod.feature_group_count})"
            elif tuple(mask.mask.shape) != shape:
                raise ValueError(f"{path}: shape={shape} but its mask has shape {tuple(mask.mask.shape)}")
        elif isinstance(mod, nnx.LinearGeneral):
            folded = tuple(mod.in_features) + (_prod(mod.out_features),)
            if mod.batch_axis:
                reason = f"LinearGeneral with batch_axis={dict(mod.batch_axis)}"
            elif tuple(mask.mask.shape) == folded:
                pass
            elif tuple(mask.mask.shape) == shape and len(mod.out_features) == 1:
                pass
            elif tuple(mask.mask.shape) == shape:
                reason = (
                    f"pruned with O={shape[-1]} (its last axis) but it computes O={folded[-1]}: "
                    "prune it folded (hinm_jax.layers.fold_features)"
                )
            else:
                raise ValueError(f"{path}: shape={shape} but its mask has shape {tuple(mask.mask.shape)}")
        elif isinstance(mod, nnx.Linear):
            if tuple(mask.mask.shape) != shape:
                raise ValueError(f"{path}: shape={shape} but its mask has shape {tuple(mask.mask.shape)}")
        else:
            reason = f"{name} has no sparse inference path" if mod is not None else "not a layer kernel"
        if not reason and mask.layout is None:
            reason = f"pattern {mask.pattern} has no compressed format"
        if reason and _prod(mask.mask.shape) != _prod(shape):
            raise ValueError(f"{path}: shape={shape} but its mask has shape {tuple(mask.mask.shape)}")
        plan.append((Conversion(path, name, "dense" if reason else "sparse", reason), mod))
    return plan


def conversion_report(model, masks) -> tuple[Conversion, ...]:
    """What :func:`to_inference` would do with each pruned leaf, without converting.

    Example:
        >>> from flax import nnx
        >>> import hinm_jax
        >>> m = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)),
        ...                    nnx.Conv(64, 64, (3, 3), feature_group_count=64, rngs=nnx.Rngs(0)))
        >>> masks = hinm_jax.prune(nnx.state(m, nnx.Param), "2:4", where=r"layers/0/kernel")
        >>> [(c.path, c.action) for c in conversion_report(m, masks)]
        [('layers/0/kernel', 'sparse')]
    """
    return tuple(c for c, _ in _plan(model, _masks_by_path(masks)))


def to_inference(model, masks, *, implementation: str | None = None):
    """A new nnx model whose pruned ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv``
    are :class:`SparseLinear` / :class:`SparseConv` holding the compressed kernel.

    Pruned leaves that have no sparse path (grouped convs, other modules' parameters,
    patterns without a compressed format) keep their module, with the mask applied, and
    each raises a :class:`DenseFallbackWarning` naming it (see :func:`conversion_report`).
    ``model`` itself is not modified. The result's outputs equal the masked-dense model's.

    Args:
      model: an nnx module.
      masks: from :func:`hinm_jax.prune` on ``nnx.state(model, nnx.Param)`` (an nnx
        ``State`` or a nested dict with the same paths; ``None`` leaves are dense).
      implementation: passed to :func:`hinm_jax.sparse_matmul`; ``"cuda"`` or
        ``"pallas"`` also packs every kernel for that backend once, here.

    Example:
        >>> from flax import nnx
        >>> import hinm_jax
        >>> m = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu,
        ...                    nnx.Linear(64, 32, rngs=nnx.Rngs(1)))
        >>> masks = hinm_jax.prune(nnx.state(m, nnx.Param), "hinm:32:0.5:2:4")
        >>> sparse = to_inference(m, masks)
        >>> type(sparse.layers[0]).__name__
        'SparseLinear'
        >>> nnx.jit(lambda mod, x: mod(x))(sparse, jnp.ones((4, 64))).shape
        (4, 32)
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected an nnx.Module, got {type(model).__name__}")
    by_path = _masks_by_path(masks)
    new = nnx.clone(model)
    plan = _plan(new, by_path)
    todo, dense = {}, []
    for c, mod in plan:
        if c.action == "dense":
            dense.append(c)
            continue
        mpath = c.path[: -len("/kernel")] if c.path != "kernel" else ""
        if not mpath:
            raise ValueError(f"{c.path}: the root module itself cannot be swapped; wrap it in a parent module")
        mask = by_path[c.path]
        kernel = _conv_kernel(mod, mask, mpath) if isinstance(mod, nnx.Conv) else _linear_kernel(mod, mask, mpath)
        todo[mpath] = (mod, kernel, mask)
    compressed = _compress_checked({_kpath(p): (k, m) for p, (_, k, m) in todo.items()}) if todo else {}
    swaps = {}
    for mpath, (mod, _, _) in todo.items():
        cls = SparseConv if isinstance(mod, nnx.Conv) else SparseLinear
        swaps[mpath] = cls._wrap(mod, compressed[_kpath(mpath)], implementation=implementation, path=mpath)
    for c in dense:
        warnings.warn(f"{c.path}: {c.module} left dense (mask applied): {c.reason}", DenseFallbackWarning, stacklevel=2)
    if dense:
        for path, var in nnx.iter_graph(new):
            p = "/".join(str(k) for k in path)
            if isinstance(var, nnx.Variable) and any(p == c.path for c in dense):
                w = var.get_value()
                m = by_path[p].mask.reshape(w.shape)
                var.set_value(jnp.where(m, w, jnp.zeros((), w.dtype)))
    from hinm_jax.select import replace_modules

    replace_modules(new, lambda p, mod: swaps.get(p))
    if implementation in ("cuda", "pallas"):
        nnx.update(new, pack_for(nnx.state(new, SparseParam), implementation))
    return new


# ---------------------------------------------------------------------------------------
# Multi-axis outputs (DenseGeneral / LinearGeneral with features=(H, D))
# ---------------------------------------------------------------------------------------


def fold_features(params, model, *args, **kwargs):
    """``params`` with every kernel that has several output axes reshaped to one,
    ``(*in, H, D) -> (*in, H*D)``: the ``(K, O)`` matrix its layer computes, which is
    what :func:`hinm_jax.prune` must see (it takes the last axis as ``O``).

    Args:
      params: linen params or an nnx ``State`` of ``model``.
      model: the model (linen or nnx); ``*args``/``**kwargs``: example inputs (linen).

    Returns:
      ``params`` with those kernels folded (other leaves unchanged).

    Example:
        >>> import flax.linen as nn
        >>> model = nn.DenseGeneral((4, 16))
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
        >>> fold_features(params, model, jnp.ones((1, 32)))["kernel"].shape
        (32, 64)
    """
    from hinm_jax.select import kernel_shapes

    shapes = kernel_shapes(model, *args, **kwargs)

    def one(path, leaf):
        if path not in shapes or leaf is None:
            return leaf
        batch, ins, outs = shapes[path]
        if len(outs) < 2 or tuple(leaf.shape) != batch + ins + outs:
            return leaf
        return jnp.reshape(leaf, batch + ins + (_prod(outs),))

    return map_with_path(one, params)


def unfold_features(tree, params):
    """Reshapes the leaves of ``tree`` back to ``params``' shapes where
    :func:`fold_features` folded them: arrays, and the ``mask`` of :class:`Mask` leaves
    (for :func:`hinm_jax.apply_masks`); :class:`~hinm_jax.SparseWeight` leaves stay as
    compressed (sparse inference reads them folded).

    Example:
        >>> import flax.linen as nn, hinm_jax
        >>> model, x = nn.DenseGeneral((4, 16)), jnp.ones((1, 32))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> folded = fold_features(params, model, x)
        >>> masks = hinm_jax.prune(folded, "2:4", where=r"kernel$")
        >>> sparse = unfold_features(hinm_jax.compress(folded, masks), params)
        >>> with sparse_inference():
        ...     y = model.apply({"params": sparse}, x)
        >>> masked = unfold_features(hinm_jax.apply_masks(folded, masks), params)
        >>> bool(jnp.allclose(y, model.apply({"params": masked}, x), rtol=1e-5, atol=1e-6))
        True
    """
    is_leaf = lambda x: x is None or isinstance(x, (Mask, SparseWeight))

    def one(path, leaf, ref):
        if leaf is None or isinstance(leaf, SparseWeight):
            return leaf
        shape = tuple(jnp.shape(ref))
        if isinstance(leaf, Mask):
            if tuple(leaf.mask.shape) == shape:
                return leaf
            return dataclasses.replace(leaf, mask=leaf.mask.reshape(shape))
        if tuple(jnp.shape(leaf)) == shape:
            return leaf
        if _prod(jnp.shape(leaf)) != _prod(shape):
            raise ValueError(f"{path}: shape={tuple(jnp.shape(leaf))} cannot be unfolded to {shape}")
        return jnp.reshape(leaf, shape)

    return map_with_path(one, tree, params, is_leaf=is_leaf, what="tree")
