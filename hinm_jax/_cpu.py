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
dispatch falls through. Besides :func:`matmul`, one call runs several layers of float32
activations: :func:`ffn` (a feed-forward block of two, for :func:`hinm_jax.sparse_ffn`) and
:func:`matmuls` (products of one input, for :func:`hinm_jax.sparse_matmuls`).

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

__all__ = ["NAME", "is_available", "supports", "pack", "matmul", "matmuls", "ffn"]

NAME = "cpu"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MAX_M = 255  # stripe positions are stored in a byte
_MAX_LAYERS = 4  # weights of one call of products of one input (kMaxLayers in the kernel)


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
    o = w.matrix_shape[1]
    bias = _check_bias(bias, w)
    if activation not in cpu_ffi.ACTIVATIONS:
        raise NotImplementedError(f"cpu: activation={activation!r}: the kernel applies {cpu_ffi.ACTIVATIONS[1:]}")
    if x.shape[0] == 0:
        return jnp.zeros((0, o), jnp.result_type(x.dtype, w.dtype))
    packed, plain = _packed(w)
    return _matmul(x, plain, packed, bias, activation)


def _packed(w: SparseWeight) -> tuple[dict, SparseWeight]:
    """``w``'s kernel layout (its own when packed for this backend in the current layout, else
    packed in-graph) and ``w`` without it."""
    current = w.packed_for == NAME and w.packed is not None and set(cpu_packing.KEYS) <= set(w.packed)
    return (w.packed if current else pack(w)), dataclasses.replace(w, packed=None, packed_for=None)


def _check_bias(bias, w: SparseWeight, name: str = "bias"):
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    o = w.matrix_shape[1]
    if bias.shape != (o,):
        raise ValueError(f"{name}: shape={tuple(bias.shape)} but w: shape={w.shape} pattern {w.pattern} has O={o} outputs")
    return bias


def _ffn_kernel(x, ws: tuple, packed: tuple, biases: tuple, activation):
    shapes = tuple((w.n, w.m, w.vector_size) for w in ws)
    return cpu_ffi.ffn(x, *packed, shapes=shapes, bias1=biases[0], bias2=biases[1], activation=activation)


def _many_kernel(x, ws: tuple, packed: tuple, biases: tuple, activations: tuple):
    shapes = tuple((w.n, w.m, w.vector_size) for w in ws)
    return cpu_ffi.spmm_many(x, packed, shapes=shapes, biases=biases, activations=activations)


_ffn = _backend.with_reference_vjp(_ffn_kernel, _backend.ffn_reference)
_many = _backend.with_reference_vjp(_many_kernel, _backend.many_reference)


def _layers_packed(what: str, x, ws: tuple, biases: tuple, activations: tuple) -> tuple[tuple, tuple, tuple]:
    """Checks that one call can run ``ws`` on ``x`` (else ``NotImplementedError``) and returns the
    packed copies, the weights without them and the checked biases."""
    for w in ws:
        _backend.require(NAME, supports(w), x)
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.float32) or len({w.dtype for w in ws}) != 1:
        raise NotImplementedError(
            f"cpu: {what}: x: dtype {x.dtype}, weights {[str(w.dtype) for w in ws]}: float32 x and weights of one dtype only"
        )
    biases = tuple(_check_bias(b, w, f"bias{i + 1}") for i, (w, b) in enumerate(zip(ws, biases)))
    for a in activations:
        if a not in cpu_ffi.ACTIVATIONS:
            raise NotImplementedError(f"cpu: activation={a!r}: the kernel applies {cpu_ffi.ACTIVATIONS[1:]}")
    if cpu_ffi.default_mode(x.shape[0], x.dtype) != "tokens":
        raise NotImplementedError(f"cpu: {what}: x: shape={tuple(x.shape)}: too few tokens for one call")
    packed, plain = zip(*(_packed(w) for w in ws))
    if any(p["inputs"].size == 0 for p in packed):
        raise NotImplementedError(f"cpu: {what}: {[w.shape for w in ws]}: inputs above 65536")
    if len({p["values"].shape[-1] for p in packed}) != 1:  # bfloat16: some in the pair layout, some not
        raise NotImplementedError(f"cpu: {what}: patterns {[str(w.pattern) for w in ws]}: packed in different layouts")
    return packed, plain, biases


def ffn(x, w1: SparseWeight, w2: SparseWeight, bias1=None, bias2=None, activation: str | None = None):
    """``activation(x @ w1.densify() + bias1) @ w2.densify() + bias2`` in one call of the C++ kernel.

    The first layer's outputs, activated, go to the second layer in the kernel's tile layout (x^T
    tiles, float32), a group of token tiles at a time, so that they are never written out whole,
    transposed back into tiles, nor staged for a permuted layout; the result is the same, bit for
    bit, as two :func:`matmul` calls (the same sums in the same order). Weights are used as
    :func:`matmul` uses them (packed once, or in-graph). Differentiable (the backward pass is the
    reference's).

    Raises:
      NotImplementedError: what one call cannot run, so that the caller multiplies layer by layer
        instead: anything :func:`matmul` cannot run; ``x`` not float32; weights of different
        dtypes or layouts; fewer tokens than the tokens schedule takes
        (:func:`cpu_ffi.default_mode`: the rows schedule is faster there); ``K`` or the hidden
        size above 65536.
      ValueError: a bias whose shape does not match its weight.

    Example:
        >>> y = ffn(x, w1, w2, bias1=b1, bias2=b2, activation="gelu")  # doctest: +SKIP
    """
    if w1.matrix_shape[1] != w2.matrix_shape[0]:
        raise ValueError(f"w2: shape={w2.shape} pattern {w2.pattern} does not take w1: shape={w1.shape}'s outputs")
    packed, plain, biases = _layers_packed("feed-forward block", x, (w1, w2), (bias1, bias2), (activation,))
    return _ffn(x, plain, packed, biases, activation)


def matmuls(x, ws: tuple, biases: tuple | None = None, activations: tuple | None = None) -> tuple:
    """``activation_l(x @ w_l.densify() + bias_l)`` for each weight, in one call of the C++ kernel
    (up to 4 weights).

    ``x`` is transposed into the kernel's tiles once for all of them, instead of once per product;
    each result is the same, bit for bit, as :func:`matmul`'s (the same sums in the same order).
    Weights are used as :func:`matmul` uses them (packed once, or in-graph). Differentiable (the
    backward pass is the reference's).

    Raises:
      NotImplementedError: what one call cannot run, so that the caller multiplies weight by
        weight instead: anything :func:`matmul` cannot run; ``x`` not float32; weights of
        different dtypes or layouts; more than 4 weights; fewer tokens than the tokens schedule
        takes; ``K`` above 65536.
      ValueError: a bias whose shape does not match its weight.

    Example:
        >>> q, k, v = matmuls(x, (wq, wk, wv), biases=(bq, bk, bv))  # doctest: +SKIP
    """
    ws = tuple(ws)
    biases = tuple(biases) if biases is not None else (None,) * len(ws)
    activations = tuple(activations) if activations is not None else (None,) * len(ws)
    if not 1 <= len(ws) <= _MAX_LAYERS:
        raise NotImplementedError(f"cpu: {len(ws)} weights: one call takes 1 to {_MAX_LAYERS}")
    packed, plain, biases = _layers_packed("products of one input", x, ws, biases, activations)
    return _many(x, plain, packed, biases, activations)
