"""What every kernel backend's adapter (``_cpu``, ``_cuda``, ``_pallas``) shares: building
and registering its library once with one clear warning when that fails, packing each matrix
of a stacked weight, and the backward pass through the reference (of one product, of a
feed-forward block of two, or of several products of one input).

Example:
    >>> from hinm_jax import _backend, _xla
    >>> f = _backend.with_reference_vjp(lambda x, w, packed, bias, activation: _xla.matmul(x, w))
    >>> ffn = _backend.with_reference_vjp(kernel, _backend.ffn_reference)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from hinm_jax import _activation, _xla
from hinm_jax.format import SparseWeight

__all__ = [
    "register_or_warn",
    "not_one_matrix",
    "require",
    "one_matrix",
    "per_matrix",
    "reference",
    "ffn_reference",
    "many_reference",
    "with_reference_vjp",
]


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


def reference(activation, x, w: SparseWeight, bias):
    """``activation(x @ w + bias)`` through the reference (``bias`` may be ``None``)."""
    y = _xla.matmul(x, w)
    y = y if bias is None else (y + bias).astype(y.dtype)
    return _activation.apply(activation, y)


def ffn_reference(activation, x, ws: tuple, biases: tuple):
    """A feed-forward block through the reference: ``activation(x @ w1 + b1) @ w2 + b2``."""
    (w1, w2), (b1, b2) = ws, biases
    return reference(None, reference(activation, x, w1, b1), w2, b2)


def many_reference(activations: tuple, x, ws: tuple, biases: tuple) -> tuple:
    """Products of one input through the reference: ``activation_l(x @ w_l + b_l)`` for each ``l``."""
    return tuple(reference(a, x, w, b) for a, w, b in zip(activations, ws, biases))


def with_reference_vjp(kernel, reference=reference):
    """A backend's product made differentiable with the reference's VJP.

    Args:
      kernel: ``kernel(x, w, packed, bias, static)``, the same function of ``(x, w, bias)`` as
        ``reference(static, x, w, bias)``: ``w`` a weight or a tuple of them, ``packed`` the
        backend's copies, ``bias`` the bias or biases, ``static`` a hashable of the call (the
        activation, or one per weight).
      reference: the reference of ``kernel`` (default: one product, :func:`reference`;
        :func:`ffn_reference` and :func:`many_reference` for the calls of several weights).

    Returns:
      ``f(x, w, packed, bias, static)``: ``kernel`` forward; backward, the cotangents of ``x``,
      the weights' values and the biases from ``reference`` (none for ``packed``).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def f(x, w, packed, bias, static):
        return kernel(x, w, packed, bias, static)

    def fwd(x, w, packed, bias, static):
        return kernel(x, w, packed, bias, static), (x, w, bias)

    def bwd(static, res, g):
        x, w, bias = res
        out, vjp = jax.vjp(functools.partial(reference, static), x, w, bias)
        gx, gw, gb = vjp(jax.tree.map(lambda g, o: g.astype(o.dtype), g, out))
        return gx, gw, None, gb

    f.defvjp(fwd, bwd)
    return f
