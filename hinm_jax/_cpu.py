"""The ``"cpu"`` backend of :func:`hinm_jax.sparse_matmul`: adapter between the canonical
:class:`~hinm_jax.format.SparseWeight` and the C++ kernel in :mod:`cpu_ffi`.

Runs every block-structured weight (``HiNM``, ``NM``, ``VectorWise``; any ``m`` up to 255)
with float32 or bfloat16 weights and activations on jax's CPU backend, through ``jax.ffi``,
on every core of XLA's intra-op thread pool (bfloat16 2:4 weights, packed in value pairs, are
multiplied with bfloat16 activations by the AVX-512 BF16 dot instructions where the CPU has
them). The library is compiled for the host's instruction set the first time
:func:`is_available` is asked (into ``~/.cache/hinm_jax/cpu``, a few seconds); importing this
module compiles nothing. When no compiler is there or the build fails, :func:`is_available`
warns once, naming the compiler's message, and the default dispatch uses the ``"xla"``
reference instead. Anything the kernel cannot run raises ``NotImplementedError`` so that the
dispatch falls through.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 128))}
    >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:64:0.5:2:4"))["w"]
    >>> sw = hinm_jax.pack_for(sw, "cpu")  # once, at conversion  # doctest: +SKIP
    >>> y = hinm_jax.sparse_matmul(jnp.ones((4, 256)), sw, implementation="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

import cpu_ffi
from cpu_ffi import packing as cpu_packing
from hinm_jax import _backend
from hinm_jax.format import SparseWeight

__all__ = ["NAME", "is_available", "supports", "pack", "matmul"]

NAME = "cpu"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MAX_M = 255  # stripe positions are stored in a byte


@functools.cache
def is_available() -> bool:
    """jax's default backend is the CPU and the kernel library is built and registered
    (built here on the first call; the answer is cached, the warning given once)."""
    if jax.default_backend() != "cpu":
        return False
    return _backend.register_or_warn(cpu_ffi.register, (cpu_ffi.BuildError, OSError), "the CPU sparse kernel")


def supports(w: SparseWeight) -> str | None:
    """Why the kernel cannot run ``w`` (ignoring the activations), or ``None`` if it can."""
    why = _backend.not_one_matrix(w)
    if why is not None:
        return why
    if w.dtype not in _DTYPES:
        return f"shape={w.shape} pattern {w.pattern}: dtype {w.dtype}: float32 or bfloat16 weights only"
    if w.m > _MAX_M:
        return f"shape={w.shape} pattern {w.pattern}: m={w.m} > {_MAX_M}"
    return None


def _pack_matrix(m: int, k: int, pairs: bool, values, metadata, vector_index, row_perm) -> dict:
    return cpu_packing.pack(values, metadata, vector_index, row_perm, m=m, in_features=k, pairs=pairs)


def pack(w: SparseWeight) -> dict | None:
    """The kernel layout of ``w`` as device arrays (see :mod:`cpu_ffi.packing`), or ``None``
    when the kernel cannot run ``w``. Stacked weights get a leading stack axis on every
    array; bfloat16 2:4 weights are packed in the pair layout (the same on every host, so a
    checkpoint of packed weights restores anywhere). Works under ``jit`` (traced arrays are
    packed with ``jax.numpy``).

    Example:
        >>> packed = pack(sw)  # doctest: +SKIP
    """
    if supports(_backend.one_matrix(w)) is not None:
        return None
    pairs = cpu_packing.use_pairs(w.dtype, w.n, w.m)  # bfloat16 2:4: the layout of the BF16 dot path
    packed = _backend.per_matrix(functools.partial(_pack_matrix, w.m, w.matrix_shape[0], pairs), w)
    return {key: jnp.asarray(v) for key, v in packed.items()}


def _kernel(x, w: SparseWeight, packed: dict, bias, activation):
    return cpu_ffi.spmm(
        x,
        packed,
        n=w.n,
        m=w.m,
        vector_size=w.vector_size,
        out_dtype=jnp.result_type(x.dtype, w.dtype),
        bias=bias,
        activation=activation,
    )


_matmul = _backend.with_reference_vjp(_kernel)


def matmul(x, w: SparseWeight, bias=None, activation: str | None = None):
    """``activation(x @ w.densify() (+ bias))`` for ``x`` ``(T, K)`` with the C++ kernel.

    Uses ``w.packed`` when it was packed for this backend (:func:`hinm_jax.pack_for`) in the
    current layout, otherwise packs in-graph (every call: pack once for speed; a checkpoint's
    weights packed in an older layout, without ``inputs``, are packed again this way). Accumulates in float32; the
    bias (``(O,)``) is added and the activation (``None``, ``"relu"``, ``"gelu"``: see
    :mod:`hinm_jax._activation`) applied in float32 in the kernel's epilogue, before the one
    rounding to the output dtype (``x``'s promoted with ``w``'s). Differentiable (the backward pass is the reference's).

    Raises:
      NotImplementedError: stacked weights, a weight or activation dtype other than
        float32/bfloat16, ``m > 255``.
      ValueError: a bias whose shape is not ``(O,)``.
    """
    _backend.require(NAME, supports(w), x)
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise NotImplementedError(f"cpu: x: shape={tuple(x.shape)} dtype {x.dtype}: float32 or bfloat16 only")
    k, o = w.matrix_shape
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (o,):
            raise ValueError(f"bias: shape={tuple(bias.shape)} but w: shape={w.shape} pattern {w.pattern} has O={o} outputs")
    if activation not in cpu_ffi.ACTIVATIONS:
        raise NotImplementedError(f"cpu: activation={activation!r}: the kernel applies {cpu_ffi.ACTIVATIONS[1:]}")
    if x.shape[0] == 0:
        return jnp.zeros((0, o), jnp.result_type(x.dtype, w.dtype))
    current = w.packed_for == NAME and w.packed is not None and set(cpu_packing.KEYS) <= set(w.packed)
    packed = w.packed if current else pack(w)
    plain = dataclasses.replace(w, packed=None, packed_for=None)
    return _matmul(x, plain, packed, bias, activation)
