"""The ``"pallas"`` backend of :func:`hinm_jax.sparse_matmul`: adapter between the
canonical :class:`~hinm_jax.format.SparseWeight` and the plain-array kernel in
:mod:`pallas_kernels`.

On an NVIDIA GPU the kernel is compiled by the Pallas Triton lowering; on CPU it runs
in Pallas interpret mode (slow: for tests), and only when asked for explicitly
(``implementation="pallas"``); the default dispatch on CPU uses the reference.

It runs exactly what the Triton lowering can compile, in interpret mode too: one matrix
(no stack axes), float32/float16/bfloat16, a vector size that is a multiple of 16, a
stripe length ``m`` that is a power of two (NM(2, 4), NM(2, 8), HiNM(., ., n, 4),
VectorWise, ...), and operands whose element offsets fit in int32. Anything else raises
``NotImplementedError`` (so the default dispatch falls through to the reference), and
:func:`pack` returns ``None`` for a weight the kernel cannot run.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 128))}
    >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:32:0.5:2:4"))["w"]
    >>> sw = hinm_jax.pack_for(sw, "pallas")  # once, at conversion
    >>> y = hinm_jax.sparse_matmul(jnp.ones((4, 256)), sw, implementation="pallas")
    >>> bool(jnp.allclose(y, jnp.ones((4, 256)) @ sw.densify(), rtol=1e-4, atol=1e-4))
    True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels
from hinm_jax import _activation, _backend
from hinm_jax.format import SparseWeight
from hinm_jax.patterns import NM

__all__ = ["NAME", "is_available", "supports", "pack", "matmul"]

NAME = "pallas"


def is_available() -> bool:
    """True on a GPU (compiled Triton kernel) and on CPU (interpret mode, on request)."""
    return jax.default_backend() in ("gpu", "cpu")


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def supports(w: SparseWeight) -> str | None:
    """Why the kernel cannot run ``w`` (ignoring the activations), or ``None`` if it can."""
    why = _backend.not_one_matrix(w)
    if why is not None:
        return why
    if jnp.dtype(w.dtype) not in pallas_kernels.SUPPORTED_DTYPES:
        return f"shape={w.shape} pattern {w.pattern}: dtype {w.dtype}: float32, float16 or bfloat16 only"
    return pallas_kernels.unsupported(w.vector_size, w.m)


def _pack_matrix(w: SparseWeight, values, metadata, vector_index, row_perm) -> dict:
    packed = pallas_kernels.pack(
        values,
        metadata,
        vector_index,
        row_perm,
        n=w.n,
        m=w.m,
        identity_index=isinstance(w.pattern, NM),
    )
    return {k: v for k, v in packed._asdict().items() if v is not None}


def pack(w: SparseWeight) -> dict | None:
    """The kernel layout of ``w`` (see :mod:`pallas_kernels.packing`) as ``jax.Array``
    leaves: ``values`` ``(*stack, O, n, J_pad)``, ``positions`` uint8 (absent for
    VectorWise), ``vector_index`` ``(*stack, O/V, m, J_pad)`` (absent for plain N:M) and
    ``row_perm``; ``None`` when the kernel cannot run ``w`` (see :func:`supports`; stack
    axes are packed, the matmul takes one matrix).

    Example:
        >>> packed = pack(sw)  # doctest: +SKIP
    """
    if supports(_backend.one_matrix(w)) is not None:
        return None
    return _backend.per_matrix(lambda *arrays: _pack_matrix(w, *arrays), w)


def _kernel(x, w: SparseWeight, packed: dict, bias, activation):
    y = pallas_kernels.hinm_spmm(
        x,
        packed["values"].astype(x.dtype),
        packed.get("positions"),
        packed.get("vector_index"),
        packed["row_perm"],
        m=w.m,
        interpret=_interpret(),
    )
    return _activation.apply(activation, y if bias is None else (y + bias).astype(y.dtype))


_matmul = _backend.with_reference_vjp(_kernel)


def matmul(x, w: SparseWeight, bias=None, activation: str | None = None):
    """``activation(x @ w.densify() (+ bias))`` for ``x`` ``(T, K)``, with the Pallas kernel
    (the activation, ``None``, ``"relu"`` or ``"gelu"``, applied after it).

    Uses ``w.packed`` when it was packed for this backend (:func:`hinm_jax.pack_for`),
    otherwise packs in-graph. Differentiable (the backward pass is the reference's).

    Raises:
      NotImplementedError: what the Triton lowering cannot compile (see the module
        docstring): stacked weights, a dtype other than float32/float16/bfloat16, a vector
        size that is not a multiple of 16, a stripe length that is not a power of two, or
        operands too large for int32 offsets.
    """
    _backend.require(NAME, supports(w), x)
    dtype = jnp.dtype(jnp.result_type(x.dtype, w.dtype))
    if dtype not in pallas_kernels.SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"pallas: shape={w.shape} pattern {w.pattern}: dtype {dtype} (x {x.dtype}, w {w.dtype}): "
            "float32, float16 or bfloat16 only"
        )
    _, o = w.matrix_shape
    x = x.astype(dtype)
    if x.shape[0] == 0:
        return jnp.zeros((0, o), dtype)
    packed = w.packed if (w.packed_for == NAME and w.packed is not None) else pack(w)
    plain = dataclasses.replace(w, packed=None, packed_for=None)
    return _matmul(x, plain, packed, bias, activation)
