"""The kernel as a JAX operation: library loading, FFI registration and ``jax.ffi.ffi_call``.

Example:
    >>> from cpu_ffi import ffi, packing
    >>> packed = packing.pack(values, metadata, vector_index, row_perm, m=4, in_features=K)  # doctest: +SKIP
    >>> y = ffi.spmm(x, packed, n=2, m=4, vector_size=64, out_dtype=x.dtype)     # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpu_ffi import build as _build

__all__ = [
    "TARGET_NAME",
    "LAYERS_TARGET_NAME",
    "MODES",
    "library",
    "register",
    "isa",
    "bf16_dot",
    "lanes",
    "tile_tokens",
    "default_mode",
    "spmm",
    "spmm_many",
    "ffn",
]

TARGET_NAME = "hinm_spmm_cpu"
# Several layers in one call of the tokens schedule: products of one input (spmm_many), or a feed-forward
# block of two whose intermediate activations stay in the kernel's tile layout (ffn).
LAYERS_TARGET_NAME = "hinm_layers_cpu"
MODES = ("rows", "tokens")  # mode 0: packed rows in vector lanes; mode 1: tokens in vector lanes
# The epilogue's activations, in the order of the kernel's codes (Act in hinm_spmm_cpu.cc).
ACTIVATIONS = (None, "relu", "gelu")

# Tokens from which the tokens-in-lanes schedule is used (benchmarks/spmm_cpu.py --modes measures
# both schedules; on a 2-core AVX-512 machine rows-in-lanes wins below this): float32 activations,
# whose rows schedule builds four-token windows by shuffles, and bfloat16 activations (BF16 dot
# products in both schedules).
TOKENS_MODE_FROM = 32
TOKENS_MODE_FROM_BF16 = 16
# AVX2 builds (8 lanes, no BF16 dot products; 32-token tiles): on a 2-core Zen 3 the two schedules broke
# even at T = 16 (HiNM and 2:4 layers, float32 and bfloat16) and the tokens schedule was 1.17-1.55x
# faster at T = 20-24.
TOKENS_MODE_FROM_AVX2 = 16


@functools.cache
def library(path: str | None = None) -> ctypes.CDLL:
    """Loads (building on first use) the kernel library."""
    lib = ctypes.cdll.LoadLibrary(str(path or _build.build()))
    lib.hinm_cpu_lanes.restype = ctypes.c_int
    lib.hinm_cpu_tile_tokens.restype = ctypes.c_int
    lib.hinm_cpu_isa.restype = ctypes.c_char_p
    lib.hinm_cpu_bf16_dot.restype = ctypes.c_int
    return lib


@functools.cache
def register(path: str | None = None) -> None:
    """Builds if needed and registers the handlers ``hinm_spmm_cpu`` and ``hinm_layers_cpu`` for
    platform cpu (once).

    Raises:
      BuildError: no compiler, or the build failed.
    """
    lib = library(path)
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(lib.HinmSpmmCpu), platform="cpu")
    jax.ffi.register_ffi_target(LAYERS_TARGET_NAME, jax.ffi.pycapsule(lib.HinmLayersCpu), platform="cpu")


def isa() -> str:
    """The instruction set the library was built for: ``"avx512"``, ``"avx2"`` or ``"generic"``."""
    return library().hinm_cpu_isa().decode()


def bf16_dot() -> bool:
    """Whether the build multiplies bfloat16 activations with the AVX-512 BF16 dot instructions
    (pair-layout weights, :func:`cpu_ffi.packing.use_pairs`); otherwise it widens them to float32."""
    return bool(library().hinm_cpu_bf16_dot())


def lanes() -> int:
    """fp32 lanes per vector in the built library (16, 8 or 4)."""
    return int(library().hinm_cpu_lanes())


def tile_tokens() -> int:
    """Tokens per tile of the tokens-in-lanes schedule."""
    return int(library().hinm_cpu_tile_tokens())


def default_mode(tokens: int, dtype=jnp.float32) -> str:
    """The schedule for ``tokens`` rows of activations of ``dtype``."""
    if lanes() == 8:
        start = TOKENS_MODE_FROM_AVX2
    else:
        start = TOKENS_MODE_FROM_BF16 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else TOKENS_MODE_FROM
    return "rows" if tokens < start else "tokens"


def _layer(packed: dict, bias) -> tuple:
    if bias is None:
        bias = jnp.zeros((0,), jnp.float32)
    keys = ("values", "positions", "inputs", "vector_index", "row_perm")
    return tuple(packed[key] for key in keys) + (jnp.asarray(bias, jnp.float32),)


def spmm(x, packed: dict, *, n: int, m: int, vector_size: int, out_dtype, bias=None, mode: str | None = None,
         activation: str | None = None):
    """``y (T, O)``: ``y[t, row_perm[r]] = sum of the packed row r's values times x[t, its inputs]``.

    Args:
      x: ``(T, K)`` float32 or bfloat16.
      packed: :func:`cpu_ffi.packing.pack`'s dict (float32 or bfloat16 values).
      n, m: kept values per stripe and stripe length.
      vector_size: packed rows per block (``O`` for plain N:M).
      out_dtype: float32 or bfloat16.
      bias: ``(O,)`` float32 added in the epilogue, or ``None``.
      mode: ``"rows"``, ``"tokens"`` or ``None`` (:func:`default_mode`).
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact, erf: ``v * (1 + erf(v / sqrt 2)) / 2``),
        applied to every output after the bias (:data:`ACTIVATIONS`).

    The library must be registered (:func:`register`). Runs under ``jit``.
    """
    t = x.shape[0]
    o = packed["row_perm"].shape[0]
    mode = mode or default_mode(t, x.dtype)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((t, o), out_dtype))
    return call(
        x,
        *_layer(packed, bias),
        n=np.int64(n),
        m=np.int64(m),
        vector_size=np.int64(vector_size),
        mode=np.int64(MODES.index(mode)),
        activation=np.int64(ACTIVATIONS.index(activation)),
    )


def _layers(x, packed: tuple, shapes: tuple, biases: tuple, activations: tuple, outputs: tuple, chained: bool):
    for activation in activations:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    t = x.shape[0]
    call = jax.ffi.ffi_call(LAYERS_TARGET_NAME, tuple(jax.ShapeDtypeStruct((t, o), jnp.float32) for o in outputs))
    args = [a for p, b in zip(packed, biases) for a in _layer(p, b)]
    return call(
        x,
        *args,
        n=np.array([s[0] for s in shapes], np.int64),
        m=np.array([s[1] for s in shapes], np.int64),
        vector_size=np.array([s[2] for s in shapes], np.int64),
        activation=np.array([ACTIVATIONS.index(a) for a in activations], np.int64),
        chained=np.int64(chained),
    )


def spmm_many(x, packed: tuple[dict, ...], *, shapes: tuple[tuple[int, int, int], ...], biases=None, activations=None):
    """``(y_1, ..., y_L)``, ``y_l = activation_l(x W_l + bias_l)``: up to 4 products of one ``x`` in one
    call of the tokens schedule (``x`` transposed into tiles once, for all of them).

    Args:
      x: ``(T, K)`` float32.
      packed: :func:`cpu_ffi.packing.pack`'s dicts, one per weight ``(K, O_l)``: all float32 values or all
        bfloat16 values in the same layout, all with ``inputs`` (``K`` at most 65536).
      shapes: ``(n, m, vector_size)`` per weight, as :func:`spmm`'s.
      biases: ``None`` or one ``(O_l,)`` float32 or ``None`` per weight.
      activations: ``None`` or one activation per weight, as :func:`spmm`'s.

    Returns:
      a tuple of ``(T, O_l)`` float32. The library must be registered (:func:`register`). Runs under ``jit``.
    """
    biases = biases or (None,) * len(packed)
    activations = activations or (None,) * len(packed)
    outputs = tuple(p["row_perm"].shape[0] for p in packed)
    return tuple(_layers(x, tuple(packed), tuple(shapes), tuple(biases), tuple(activations), outputs, False))


def ffn(x, packed1: dict, packed2: dict, *, shapes: tuple[tuple[int, int, int], tuple[int, int, int]], bias1=None,
        bias2=None, activation: str | None = None):
    """``y (T, O) = activation(x W1 + bias1) W2 + bias2``: two layers in one call of the tokens schedule,
    the intermediate activations ``(T, H)`` passed from the first layer to the second in the kernel's
    tile layout (float32), never written out whole.

    Args:
      x: ``(T, K)`` float32.
      packed1, packed2: :func:`cpu_ffi.packing.pack`'s dicts of ``W1`` ``(K, H)`` and ``W2`` ``(H, O)``,
        both with float32 values or both with bfloat16 values in the same layout, both with ``inputs``
        (``K`` and ``H`` at most 65536).
      shapes: ``((n1, m1, vector_size1), (n2, m2, vector_size2))``, as :func:`spmm`'s.
      bias1, bias2: ``(H,)`` and ``(O,)`` float32, or ``None``.
      activation: of the first layer, as :func:`spmm`'s.

    Returns:
      ``(T, O)`` float32. The library must be registered (:func:`register`). Runs under ``jit``.
    """
    outputs = (packed2["row_perm"].shape[0],)
    (y,) = _layers(x, (packed1, packed2), tuple(shapes), (bias1, bias2), (activation, None), outputs, True)
    return y
