"""``sparse_matmul``: ``x @ W`` with ``W`` in the compressed format, on every backend.

Implementations, tried in this order by the default dispatch:

- ``"cuda"``: the ``mma.sp`` kernel behind ``jax.ffi`` (NVIDIA GPU, compute capability
  >= 8.0, library built by nvcc);
- ``"pallas"``: the Pallas kernel (GPU; on CPU only when asked for, in interpret mode);
- ``"xla"``: the pure-jnp reference, the test oracle of every backend and the CPU path.

A backend that cannot run a given shape or dtype raises ``NotImplementedError`` and the
default dispatch falls through to the next one.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 128))}
    >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:32:0.5:2:4"))["w"]
    >>> x = jnp.ones((4, 256))
    >>> bool(jnp.allclose(hinm_jax.sparse_matmul(x, sw), x @ sw.densify(), rtol=1e-5))
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hinm_jax import _xla
from hinm_jax.format import SparseWeight, backend_module

__all__ = ["sparse_matmul", "reference_matmul", "available_implementations", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("cuda", "pallas", "xla")


def _kernel_backend(name: str):
    """The adapter module, or ``None`` if it cannot even be imported here."""
    try:
        return backend_module(name)
    except ImportError:
        return None


def available_implementations() -> tuple[str, ...]:
    """The implementations that can run on jax's default backend here, in dispatch
    order. ``"pallas"`` is listed on CPU too: it runs there in interpret mode (slow,
    for testing)."""
    out = []
    for name in IMPLEMENTATIONS[:-1]:
        mod = _kernel_backend(name)
        if mod is not None and mod.is_available():
            out.append(name)
    return tuple(out) + ("xla",)


def _gather_path(x, w: SparseWeight):
    """Expanded tiles times gathered activations: ``(T, K)`` -> ``(T, O)``, columns in
    packed order (see :mod:`hinm_jax._xla`)."""
    return _xla.gather_path(x, w)


def _dense_path(x, w: SparseWeight):
    """The densified weight in one dense dot: ``(T, K)`` -> ``(T, O)``, columns in packed
    order."""
    return _xla.dense_path(x, w)


def reference_matmul(x, w: SparseWeight):
    """The pure-jnp reference: ``x @ w.densify()`` for ``x`` of shape ``(T, K)``.

    It never builds the dense weight (except for tiny ones): it picks per shape between
    reading the compressed values once per token (one token) and expanding them chunk by
    chunk into tiles that multiply gathered activations (several tokens); see
    :func:`hinm_jax._xla.strategy`. fp32 is exact to rounding; fp16/bf16 accumulate in
    fp32. Differentiable in ``x``; works under ``jax.jit``.
    """
    return _xla.matmul(x, w)


def _check(x, w) -> None:
    if not isinstance(w, SparseWeight):
        raise ValueError(f"w: expected a SparseWeight (from hinm_jax.compress), got {type(w).__name__}")
    if w.stack_axes:
        raise ValueError(
            f"w: shape={w.shape} pattern {w.pattern} has stack_axes={w.stack_axes}: sparse_matmul "
            "takes one matrix; map over the stack (e.g. jax.vmap or lax.scan)"
        )
    k, o = w.matrix_shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x: shape={tuple(x.shape)} does not match w: shape={w.shape} (K={k}, O={o}) pattern {w.pattern}"
        )


def sparse_matmul(x, w: SparseWeight, *, bias=None, implementation: str | None = None):
    """``x @ densify(w) (+ bias)`` for ``x`` of shape ``(..., K)``.

    Args:
      x: activations ``(..., K)``; leading dims are flattened.
      w: a :class:`~hinm_jax.format.SparseWeight` with no stack axes (a conv kernel
        multiplies flattened patches: ``K = kh*kw*I``).
      bias: optional ``(O,)`` added to the output.
      implementation: ``"cuda"``, ``"pallas"``, ``"xla"`` or ``None`` (the best that
        runs here, see :func:`available_implementations`).

    Returns:
      ``(..., O)`` in ``x``'s dtype (promoted with ``w``'s); fp16/bf16 accumulate in fp32.

    Example:
        >>> y = hinm_jax.sparse_matmul(jnp.ones((2, 3, 256)), sw)  # doctest: +SKIP
    """
    x = jnp.asarray(x)
    _check(x, w)
    k, o = w.matrix_shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if implementation is None:
        names = available_implementations() if jax.default_backend() == "gpu" else ("xla",)
    elif implementation in IMPLEMENTATIONS:
        names = (implementation,)
    else:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS} or None")
    y = None
    for name in names:
        if name == "xla":
            y = reference_matmul(x2, w)
            break
        mod = _kernel_backend(name)
        if mod is None or not mod.is_available():
            raise ValueError(
                f"implementation={name!r} cannot run here (backend {jax.default_backend()}); "
                f"available: {available_implementations()}"
            )
        try:
            return mod.matmul(x2, w, bias=bias).reshape(lead + (o,))  # kernels may fuse the bias
        except NotImplementedError:
            if implementation is not None:
                raise
    y = y.reshape(lead + (o,))
    if bias is not None:
        y = (y + bias).astype(y.dtype)
    return y
