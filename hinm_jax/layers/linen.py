"""linen: sparse inference for unmodified models by method interception."""

from __future__ import annotations

import contextlib
import warnings
from typing import Mapping

from flax import linen as nn

from hinm_jax import _activation
from hinm_jax._capture import kernel_path
from hinm_jax.format import SparseWeight
from hinm_jax.layers.functional import (
    ConvSpec,
    DenseFallbackWarning,
    _dense_conv,
    _tuple,
    conv,
    dense_general,
    dense_many,
    feed_forward,
)

__all__ = ["Dense", "FeedForward", "Parallel", "sparse_inference"]


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


class FeedForward(nn.Module):
    """A feed-forward block of two dense layers, ``second(first(x))``, which
    :func:`sparse_inference` runs as one :func:`hinm_jax.sparse_ffn` when both kernels are
    compressed (one call of the ``"cpu"`` kernel: the intermediate activations never leave
    its tile layout).

    The two layers are modules the caller creates (in its own ``@nn.compact`` method, named
    as it likes), so their parameters stay where they were: ``FeedForward`` has none, and
    pruning, compression and checkpoints see two ``Dense`` layers. The activation between
    them is ``first``'s (a :class:`Dense`'s ``activation``; none for a plain ``nn.Dense``).

    Attributes:
      first: the ``(K, H)`` layer: a :class:`Dense` (with its activation) or an ``nn.Dense``.
      second: the ``(H, O)`` layer, an ``nn.Dense``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> class Block(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         up, down = Dense(256, activation="gelu", name="up"), nn.Dense(64, name="down")
        ...         return FeedForward(up, down)(x)
        >>> params = Block().init(jax.random.key(0), jnp.ones((2, 64)))["params"]
        >>> sorted(params)
        ['down', 'up']
    """

    first: nn.Module
    second: nn.Module

    def __call__(self, x):
        return self.second(self.first(x))


def _feed_forward_call(module: FeedForward, args, kwargs, implementation):
    """``module`` as one :func:`feed_forward`, or ``None`` when it is not two ``nn.Dense``
    with compressed kernels, one dtype and no activation after the second (then its layers
    run one by one)."""
    first, second = module.first, module.second
    found = _dense_layers((first, second), args, kwargs)
    if found is None or _activation_of(second) is not None:
        return None
    (w1, w2), (b1, b2), paths = found
    return feed_forward(
        args[0], w1, b1, w2, b2, activation=_activation_of(first), dtype=first.dtype,
        implementation=implementation, paths=paths,
    )


class Parallel(nn.Module):
    """Dense layers applied to one input, ``tuple(layer(x) for layer in layers)`` (an attention
    layer's query, key and value), which :func:`sparse_inference` runs as one
    :func:`hinm_jax.sparse_matmuls` when every kernel is compressed (one call of the ``"cpu"``
    kernel: the input is transposed into its tiles once, not once per layer).

    Like :class:`FeedForward`, it holds no parameters: the layers are the caller's modules,
    whose parameters stay where they are.

    Attributes:
      layers: the ``nn.Dense`` (or :class:`Dense`) layers, each ``(K, O_l)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> class Attention(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return Parallel(tuple(nn.Dense(64, name=n) for n in ("query", "key", "value")))(x)
        >>> params = Attention().init(jax.random.key(0), jnp.ones((2, 64)))["params"]
        >>> sorted(params)
        ['key', 'query', 'value']
    """

    layers: tuple

    def __call__(self, x):
        return tuple(layer(x) for layer in self.layers)


def _dense_layers(modules, args, kwargs):
    """The modules' compressed kernels and biases when each is an ``nn.Dense`` with a compressed
    kernel and they share one dtype (else ``None``)."""
    if len(args) != 1 or kwargs or not all(isinstance(m, nn.Dense) for m in modules):
        return None
    params = [_own_params(m) for m in modules]
    if not all(isinstance(p.get("kernel"), SparseWeight) for p in params) or len({m.dtype for m in modules}) != 1:
        return None
    paths = tuple(kernel_path("/".join(str(p) for p in m.scope.path)) for m in modules)
    return tuple(p["kernel"] for p in params), tuple(p.get("bias") for p in params), paths


def _activation_of(module):
    return module.activation if isinstance(module, Dense) else None


def _parallel_call(module: Parallel, args, kwargs, implementation):
    """``module`` as one :func:`dense_many`, or ``None`` (then its layers run one by one)."""
    found = _dense_layers(tuple(module.layers), args, kwargs)
    if found is None:
        return None
    kernels, biases, paths = found
    return dense_many(
        args[0], kernels, biases, activations=tuple(_activation_of(m) for m in module.layers),
        dtype=module.layers[0].dtype, implementation=implementation, paths=paths,
    )


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
    :class:`Dense` passes its activation to it (fused into the ``"cpu"`` kernel), and a
    :class:`FeedForward` whose two kernels are compressed runs as one
    :func:`hinm_jax.sparse_ffn`.

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
        if isinstance(module, (FeedForward, Parallel)):
            block = _feed_forward_call if isinstance(module, FeedForward) else _parallel_call
            y = block(module, args, kwargs, implementation)
            return next_fun(*args, **kwargs) if y is None else y
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
