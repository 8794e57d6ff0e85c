"""linen: sparse inference for unmodified models by method interception."""

from __future__ import annotations

import contextlib
import warnings
from typing import Mapping

from flax import linen as nn

from hinm_jax import _activation
from hinm_jax._capture import kernel_path
from hinm_jax.format import SparseWeight
from hinm_jax.layers.functional import ConvSpec, DenseFallbackWarning, _dense_conv, _tuple, conv, dense_general

__all__ = ["Dense", "sparse_inference"]


class Dense(nn.Dense):
    """``nn.Dense`` followed by an activation, which :func:`sparse_inference` fuses into
    the sparse product (the ``"cpu"`` kernel applies it to each output as it writes it,
    instead of a separate pass over the whole output).

    The parameters are ``nn.Dense``'s (``kernel``, ``bias``), so pruning, compression and
    checkpoints treat it as one; with a dense kernel it computes
    ``activation(nn.Dense(...)(x))``.

    Attributes:
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact, through erf).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> layer = Dense(64, activation="gelu")
        >>> params = layer.init(jax.random.key(0), jnp.ones((2, 128)))["params"]
        >>> sorted(params)
        ['bias', 'kernel']
    """

    activation: str | None = None

    def __call__(self, inputs):
        _activation.check(self.activation, "/".join(str(p) for p in self.scope.path) or self.name or type(self).__name__)
        return _activation.apply(self.activation, super().__call__(inputs))


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
    kpath = kernel_path(path)
    if isinstance(module, nn.Dense):
        return dense_general(
            x, w, bias, axis=-1, features=(module.features,), dtype=module.dtype,
            implementation=implementation, path=kpath,
            activation=module.activation if isinstance(module, Dense) else None,
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
    a :class:`~hinm_jax.SparseWeight` through :func:`hinm_jax.sparse_matmul`; a
    :class:`Dense` passes its activation to it (fused into the ``"cpu"`` kernel).

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
