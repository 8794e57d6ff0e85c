"""nnx: sparse modules and the conversion of a trained model (:func:`to_inference`)."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hinm_jax import _activation
from hinm_jax._capture import kernel_path, replace_modules
from hinm_jax._tree import path_str
from hinm_jax.format import SparseWeight, compress
from hinm_jax.layers.functional import (
    ConvSpec,
    DenseFallbackWarning,
    _prod,
    _tuple,
    conv,
    dense_general,
    dense_many,
    feed_forward,
    patch_order,
)
from hinm_jax.masks import Mask, is_mask_leaf
from hinm_jax.ops import default_implementation, pack_for

__all__ = [
    "SparseParam",
    "SparseLinear",
    "SparseConv",
    "FeedForward",
    "Parallel",
    "Conversion",
    "conversion_report",
    "to_inference",
]


class SparseParam(nnx.Variable):
    """An nnx variable holding a :class:`~hinm_jax.SparseWeight` (not an ``nnx.Param``:
    its integer index arrays are not trainable)."""


def _mask_mismatch(path: str, shape, mask: Mask) -> ValueError:
    """The error for a mask whose shape fits neither the kernel nor its folded form."""
    return ValueError(f"{path}: shape={tuple(shape)} but its mask has shape {tuple(mask.mask.shape)}")


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
            raise _mask_mismatch(path, kernel.shape, mask)
    done = _compress_all({p: k for p, (k, _) in items.items()}, {p: m for p, (_, m) in items.items()})
    for path, (sw, ok) in done.items():
        if not bool(ok):
            kernel, mask = items[path]
            raise ValueError(
                f"{path}: shape={tuple(kernel.shape)} pattern {mask.pattern}: the mask does not follow "
                "its layout (every stripe keeps exactly n of m, nothing outside the vector index)"
            )
    return {p: sw for p, (sw, _) in done.items()}


def _linear_kernel(module, mask: Mask, path: str):
    """The kernel of an ``nnx.Linear`` / ``nnx.LinearGeneral`` in the mask's shape."""
    kernel = module.kernel[...]
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(
                f"{kernel_path(path)}: shape={tuple(kernel.shape)}: LinearGeneral with batch_axis has no sparse path"
            )
        folded = tuple(module.in_features) + (_prod(module.out_features),)
    else:
        folded = tuple(kernel.shape)
    mshape = tuple(mask.mask.shape)
    if mshape not in (tuple(kernel.shape), folded):
        raise _mask_mismatch(kernel_path(path), kernel.shape, mask)
    return kernel.reshape(mshape)


def _conv_kernel(module, mask: Mask, path: str):
    """The kernel of an ``nnx.Conv``, its ``mask=`` attribute folded in."""
    kernel = module.kernel[...]
    if tuple(mask.mask.shape) != tuple(kernel.shape):
        raise _mask_mismatch(kernel_path(path), kernel.shape, mask)
    if module.mask is not None:
        kernel = kernel * module.mask
    return kernel


def _set_fields(module, kernel, bias, dtype, preferred_element_type, implementation, path) -> None:
    """The fields :class:`SparseLinear` and :class:`SparseConv` share."""
    module.kernel = SparseParam(kernel)
    module.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
    module.dtype = dtype
    module.preferred_element_type = preferred_element_type
    module.implementation = implementation
    module.path = path


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
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact), applied to the output (fused
        into the ``"cpu"`` kernel); set it and drop the model's own call of the activation.

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
        activation: str | None = None,
    ):
        if not isinstance(kernel, SparseWeight):
            raise ValueError(f"{path or 'kernel'}: expected a SparseWeight, got {type(kernel).__name__}")
        _activation.check(activation, kernel_path(path))
        _set_fields(self, kernel, bias, dtype, preferred_element_type, implementation, path)
        self.activation = activation
        self.axis = _tuple(axis)
        self.out_features = (kernel.matrix_shape[1],) if out_features is None else _tuple(out_features)

    @classmethod
    def from_linear(cls, module, mask: Mask, *, implementation: str | None = None, path: str = ""):
        """Compresses an ``nnx.Linear`` / ``nnx.LinearGeneral`` kernel with ``mask``.

        A ``LinearGeneral`` with several output axes takes a mask of its folded kernel
        ``(*in, prod(out))`` (see :func:`fold_features`).
        """
        kernel = _linear_kernel(module, mask, path)
        sw = _compress_checked({kernel_path(path): (kernel, mask)})[kernel_path(path)]
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
        kpath = kernel_path(self.path)
        y = dense_general(
            inputs, self.kernel.get_value(), bias, axis=self.axis, features=self.out_features,
            dtype=self.dtype, implementation=self.implementation, path=kpath, activation=self.activation,
        )
        if self.preferred_element_type is not None:
            y = y.astype(self.preferred_element_type)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y


def _one_call(modules):
    """``(kernels, biases, paths, dtype, implementation)`` when every module is a
    :class:`SparseLinear` over the last axis with one output axis and no
    ``preferred_element_type``, and they share one dtype and implementation; else ``None``
    (then they run one by one)."""
    if not all(isinstance(m, SparseLinear) for m in modules):
        return None
    if any(m.axis != (-1,) or len(m.out_features) != 1 or m.preferred_element_type is not None for m in modules):
        return None
    if len({m.dtype for m in modules}) != 1 or len({m.implementation for m in modules}) != 1:
        return None
    kernels = tuple(m.kernel.get_value() for m in modules)
    biases = tuple(m.bias[...] if m.bias is not None else None for m in modules)
    paths = tuple(kernel_path(m.path) for m in modules)
    return kernels, biases, paths, modules[0].dtype, modules[0].implementation


class FeedForward(nnx.Module):
    """Two linear layers with an activation between, ``second(activation(first(x)))``, that
    runs as one :func:`hinm_jax.sparse_ffn` once :func:`to_inference` has made both layers
    :class:`SparseLinear` (one call of the ``"cpu"`` kernel: the intermediate activations never
    leave its tile layout); otherwise layer by layer.

    The nnx counterpart of :class:`hinm_jax.layers.FeedForward`. The layers are its children
    (parameter paths ``<name>/first/kernel`` and ``<name>/second/kernel``). Layers with an
    activation of their own (:class:`SparseLinear`'s ``activation``) run layer by layer.

    Args:
      first: the ``(K, H)`` layer, an ``nnx.Linear`` (or a :class:`SparseLinear`).
      second: the ``(H, O)`` layer.
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact), applied between them.

    Example:
        >>> from flax import nnx
        >>> import hinm_jax
        >>> from hinm_jax.layers import nnx as hnnx
        >>> block = hnnx.FeedForward(nnx.Linear(64, 256, rngs=nnx.Rngs(0)),
        ...                          nnx.Linear(256, 64, rngs=nnx.Rngs(1)), activation="gelu")
        >>> masks = hinm_jax.prune(nnx.state(block, nnx.Param), "hinm:32:0.5:2:4")
        >>> sparse = hnnx.to_inference(block, masks)  # first and second become SparseLinear
        >>> sparse(jnp.ones((3, 64))).shape
        (3, 64)
    """

    def __init__(self, first, second, *, activation: str | None = None):
        _activation.check(activation, "FeedForward")
        self.first, self.second, self.activation = first, second, activation

    def __call__(self, x):
        found = _one_call((self.first, self.second))
        if found is not None and self.first.activation is None and self.second.activation is None:
            (w1, w2), (b1, b2), paths, dtype, implementation = found
            return feed_forward(
                x, w1, b1, w2, b2, activation=self.activation, dtype=dtype, implementation=implementation, paths=paths
            )
        return self.second(_activation.apply(self.activation, self.first(x)))


class Parallel(nnx.Module):
    """Linear layers applied to one input, ``tuple(layer(x) for layer in layers)`` (an attention
    layer's query, key and value), that runs as one :func:`hinm_jax.sparse_matmuls` once
    :func:`to_inference` has made every layer a :class:`SparseLinear` (one call of the ``"cpu"``
    kernel: the input is transposed into its tiles once, not once per layer); otherwise layer
    by layer.

    The nnx counterpart of :class:`hinm_jax.layers.Parallel`; the layers are its children
    (paths ``<name>/layers/0/kernel``, ...).

    Args:
      layers: the ``nnx.Linear`` layers, each ``(K, O_l)``.

    Example:
        >>> from flax import nnx
        >>> from hinm_jax.layers import nnx as hnnx
        >>> qkv = hnnx.Parallel([nnx.Linear(64, 64, rngs=nnx.Rngs(i)) for i in range(3)])
        >>> [y.shape for y in qkv(jnp.ones((3, 64)))]
        [(3, 64), (3, 64), (3, 64)]
    """

    def __init__(self, layers):
        self.layers = nnx.List(layers)

    def __call__(self, x):
        found = _one_call(tuple(self.layers))
        if found is not None:
            kernels, biases, paths, dtype, implementation = found
            return dense_many(
                x, kernels, biases, activations=tuple(m.activation for m in self.layers), dtype=dtype,
                implementation=implementation, paths=paths,
            )
        return tuple(layer(x) for layer in self.layers)


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
      path: the layer's path in its model, named in errors.
      implementation: passed to :func:`hinm_jax.sparse_matmul`.

    Example:
        >>> import hinm_jax
        >>> from flax import nnx
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
        kpath = kernel_path(path)
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
        _set_fields(self, kernel, bias, dtype, preferred_element_type, implementation, path)
        self.spec = spec
        self.in_features = int(in_features)

    @classmethod
    def from_conv(cls, module, mask: Mask, *, implementation: str | None = None, path: str = ""):
        """Compresses an ``nnx.Conv`` kernel with ``mask`` (``Conv(mask=...)`` is folded
        into the values)."""
        kernel = _conv_kernel(module, mask, path)
        sw = _compress_checked({kernel_path(path): (kernel, mask)})[kernel_path(path)]
        return cls._wrap(module, sw, implementation=implementation, path=path)

    @classmethod
    def _wrap(cls, module, sw: SparseWeight, *, implementation, path):
        bias = module.bias[...] if module.bias is not None else None
        return cls(
            sw, bias, spec=ConvSpec.of(module), in_features=module.in_features, dtype=module.dtype,
            preferred_element_type=module.preferred_element_type, implementation=implementation, path=path,
        )

    def __call__(self, inputs, out_sharding=None):
        kpath = kernel_path(self.path)
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
        owners[kernel_path(mp)] = mod
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
                raise _mask_mismatch(path, shape, mask)
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
                raise _mask_mismatch(path, shape, mask)
        elif isinstance(mod, nnx.Linear):
            if tuple(mask.mask.shape) != shape:
                raise _mask_mismatch(path, shape, mask)
        else:
            reason = f"{name} has no sparse inference path" if mod is not None else "not a layer kernel"
        if not reason and mask.layout is None:
            reason = f"pattern {mask.pattern} has no compressed format"
        if reason and _prod(mask.mask.shape) != _prod(shape):
            raise _mask_mismatch(path, shape, mask)
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
      implementation: passed to :func:`hinm_jax.sparse_matmul`. Every kernel is packed
        once, here, for this backend (``None``: for
        :func:`hinm_jax.ops.default_implementation`, e.g. ``"cpu"`` on a CPU).

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
    compressed = _compress_checked({kernel_path(p): (k, m) for p, (_, k, m) in todo.items()}) if todo else {}
    swaps = {}
    for mpath, (mod, _, _) in todo.items():
        cls = SparseConv if isinstance(mod, nnx.Conv) else SparseLinear
        swaps[mpath] = cls._wrap(mod, compressed[kernel_path(mpath)], implementation=implementation, path=mpath)
    for c in dense:
        warnings.warn(f"{c.path}: {c.module} left dense (mask applied): {c.reason}", DenseFallbackWarning, stacklevel=2)
    if dense:
        for path, var in nnx.iter_graph(new):
            p = "/".join(str(k) for k in path)
            if isinstance(var, nnx.Variable) and any(p == c.path for c in dense):
                w = var.get_value()
                m = by_path[p].mask.reshape(w.shape)
                var.set_value(jnp.where(m, w, jnp.zeros((), w.dtype)))
    replace_modules(new, lambda p, mod: swaps.get(p))
    packed_for = implementation or default_implementation()
    if packed_for != "xla":
        nnx.update(new, pack_for(nnx.state(new, SparseParam), packed_for))
    return new
