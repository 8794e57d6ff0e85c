"""What every kernel backend's adapter (``_cpu``, ``_cuda``, ``_pallas``) shares: building
and registering its library once with one clear warning when that fails, packing each matrix
of a stacked weight, and the backward pass through the reference.

Example:
    >>> from hinm_jax import _backend, _xla
    >>> f = _backend.with_reference_vjp(lambda x, w, packed, bias, activation: _xla.matmul(x, w))
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from hinm_jax import _activation, _xla
from hinm_jax.format import SparseWeight

__all__ = ["register_or_warn", "not_one_matrix", "require", "one_matrix", "per_matrix", "with_reference_vjp"]


def register_or_warn(register, errors: tuple, what: str) -> bool:
    """Calls ``register()`` (which builds the kernel library if needed); on one of
    ``errors`` warns once, naming ``what`` and the error (the compiler's message), and
    returns ``False``, so that the dispatch falls back to another implementation."""
    try:
        register()
    except errors as e:
        warnings.warn(
            f"hinm_jax: {what} is unavailable, so sparse_matmul falls back to the next implementation "
            f"(at last the 'xla' reference): {e}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def not_one_matrix(w) -> str | None:
    """Why no kernel takes ``w`` as it is (not a compressed weight, or stacked matrices:
    kernels multiply one matrix), or ``None``."""
    if not isinstance(w, SparseWeight) or w.pattern is None:
        return "not a compressed SparseWeight"
    if w.stack_axes:
        return f"shape={w.shape} stack_axes={w.stack_axes}: one matrix at a time"
    return None


def require(name: str, why: str | None, x) -> None:
    """Raises ``NotImplementedError`` (so that the dispatch falls through) when the backend
    ``name`` gave a reason ``why`` it cannot run the weight, or ``x`` is not ``(T, K)``."""
    if why is not None:
        raise NotImplementedError(f"{name}: {why}")
    if x.ndim != 2:
        raise NotImplementedError(f"{name}: x: shape={tuple(x.shape)}: expected (T, K)")


def one_matrix(w: SparseWeight) -> SparseWeight:
    """``w`` described as one of its matrices (no stack axes; the arrays are unchanged):
    what a backend's ``supports`` judges."""
    return dataclasses.replace(w, stack_axes=0, shape=w.shape[w.stack_axes :]) if w.stack_axes else w


def per_matrix(fn, w: SparseWeight):
    """``fn(values, metadata, vector_index, row_perm)`` for one matrix, mapped over ``w``'s
    stack axes (``jax.vmap``): a backend's packed arrays with the stack axes leading."""
    for _ in range(w.stack_axes):
        fn = jax.vmap(fn)
    return fn(w.values, w.metadata, w.vector_index, w.row_perm)


def _reference(activation, x, w: SparseWeight, bias):
    y = _xla.matmul(x, w)
    y = y if bias is None else (y + bias).astype(y.dtype)
    return _activation.apply(activation, y)


def with_reference_vjp(kernel):
    """A backend's product made differentiable with the reference's VJP.

    Args:
      kernel: ``kernel(x, w, packed, bias, activation) -> (T, O)``, the same function of
        ``(x, w, bias)`` as ``activation(_xla.matmul(x, w) + bias)`` (``packed`` is the
        backend's copy of ``w``; ``activation`` a static name or ``None``).

    Returns:
      ``f(x, w, packed, bias, activation)``: ``kernel`` forward; backward, the cotangents
      of ``x``, ``w``'s values and ``bias`` from the reference (none for ``packed``).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def f(x, w, packed, bias, activation):
        return kernel(x, w, packed, bias, activation)

    def fwd(x, w, packed, bias, activation):
        return kernel(x, w, packed, bias, activation), (x, w, bias)

    def bwd(activation, res, g):
        x, w, bias = res
        _, vjp = jax.vjp(functools.partial(_reference, activation), x, w, bias)
        gx, gw, gb = vjp(g.astype(jnp.result_type(x.dtype, w.dtype)))
        return gx, gw, None, gb

    f.defvjp(fwd, bwd)
    return f
