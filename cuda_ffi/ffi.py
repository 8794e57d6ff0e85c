"""The kernel as a JAX operation: library loading, FFI registration and ``jax.ffi.ffi_call``.

Example:
    >>> import jax.numpy as jnp
    >>> from cuda_ffi import ffi, packing
    >>> packed = packing.pack(values, metadata, vector_index, row_perm)  # doctest: +SKIP
    >>> y = ffi.spmm(x, packed, out_features=4096)                        # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cuda_ffi import build as _build
from cuda_ffi import packing, tiles

__all__ = [
    "TARGET_NAME",
    "library",
    "register",
    "library_configs",
    "probe",
    "check_call",
    "call_operands",
    "spmm",
    "prepare_activations",
]

TARGET_NAME = "hinm_spmm"


@functools.cache
def library(path: str | None = None) -> ctypes.CDLL:
    """Loads (building on first use) the kernel library. Works without a GPU."""
    lib = ctypes.cdll.LoadLibrary(str(path or _build.build()))
    lib.hinm_spmm_num_configs.restype = ctypes.c_int
    lib.hinm_spmm_config_info.restype = ctypes.c_int
    lib.hinm_spmm_config_info.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.hinm_spmm_probe.restype = ctypes.c_longlong
    lib.hinm_spmm_probe.argtypes = [ctypes.c_int] * 4
    lib.hinm_spmm_check.restype = ctypes.c_int
    lib.hinm_spmm_check.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_char_p, ctypes.c_int]
    return lib


@functools.cache
def register(path: str | None = None) -> None:
    """Registers the handler as ``hinm_spmm`` for platform CUDA (once per process)."""
    lib = library(path)
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(lib.HinmSpmm), platform="CUDA")


def library_configs(lib: ctypes.CDLL) -> tuple[tuple[tiles.TileConfig, int, int], ...]:
    """The compiled table: ``(TileConfig, smem_bytes, built)`` per configuration."""
    out = []
    buf = (ctypes.c_int * 10)()
    for i in range(lib.hinm_spmm_num_configs()):
        if lib.hinm_spmm_config_info(i, buf) != 0:
            raise RuntimeError(f"hinm_spmm_config_info({i}) failed")
        v = list(buf)
        out.append((tiles.TileConfig(*v[:6]), v[7], v[9]))
    return tuple(out)


_PROBES = {
    "a_chunk_offset": 0,
    "bt_chunk_offset": 1,
    "bn_chunk_offset": 2,
    "a_ldsm_row": 3,
    "a_ldsm_chunk": 4,
    "bt_ldsm_krow": 5,
    "bn_ldsm_row": 6,
    "bn_ldsm_chunk": 7,
    "meta_word": 8,
    "kBK": 9,
    "kPadMetaWord": 10,
}


def probe(lib: ctypes.CDLL, name: str, *args: int) -> int:
    """Evaluates one of the kernel's host-callable index functions."""
    a = list(args) + [0] * (3 - len(args))
    return int(lib.hinm_spmm_probe(_PROBES[name], *a))


def check_call(lib: ctypes.CDLL, operands, out_shape, attrs) -> str | None:
    """The FFI handler's own argument checks, run on the host (no GPU needed).

    Args:
      lib: the kernel library (:func:`library`).
      operands: the six FFI operands ``(x, values, metadata, vector_index, row_perm, bias)``
        (anything with ``.shape``), as :func:`call_operands` returns them.
      out_shape: the shape of ``y``.
      attrs: ``{"gather", "config", "vector_size", "transposed_out"}``.

    Returns:
      ``None`` when the handler would accept the call, else its error message.
    """
    x, vals, meta, vidx, perm, bias = (tuple(int(d) for d in a.shape) for a in operands)
    for name, shape, rank in (("x", x, 2), ("values", vals, 2), ("metadata", meta, 3), ("vector_index", vidx, 2),
                              ("row_perm", perm, 1), ("y", tuple(out_shape), 2)):
        if len(shape) != rank:
            return f"{name}: shape={shape}: ranks must be x 2, values 2, meta 3, vector_index 2, row_perm 1, y 2"
    count = int(np.prod(bias)) if bias else 1
    dims = [*x, *vals, *meta, *vidx, *perm, *out_shape, count, len(bias), bias[0] if bias else 0]
    dims += [int(attrs[k]) for k in ("gather", "config", "vector_size", "transposed_out")]
    buf = ctypes.create_string_buffer(512)
    rc = lib.hinm_spmm_check((ctypes.c_longlong * len(dims))(*dims), buf, len(buf))
    return None if rc == 0 else buf.value.decode()


def prepare_activations(x, layout: packing.Layout):
    """``x (T, K)`` -> what the kernel reads: ``x^T (K, T_pad)`` (gather) or ``x (T, K_pad)``."""
    t, k = x.shape
    if layout.gather:
        tp = -(-t // 8) * 8
        return jnp.pad(x.T, ((0, 0), (0, tp - t)))
    kp = -(-k // 8) * 8
    return x if kp == k else jnp.pad(x, ((0, 0), (0, kp - k)))


def call_operands(x, packed, out_features: int, bias=None, *, config: tiles.TileConfig | int | None = None):
    """What :func:`spmm` hands the FFI call: ``(operands, out_shape, attrs, transposed)``.

    ``operands`` is ``(x or x^T, values, metadata, vector_index, row_perm, bias)``; ``attrs``
    the handler's attributes. Arguments and errors as :func:`spmm`.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: shape={x.shape}: expected (T, K)")
    vals = packed["values"]
    if x.dtype not in (jnp.float16, jnp.bfloat16) or vals.dtype != x.dtype:
        raise NotImplementedError(f"x: dtype={x.dtype}, values: dtype={vals.dtype}: the kernel needs equal f16/bf16")
    lay = packing.layout_of(packed, out_features)
    t, k = x.shape
    if not lay.gather and k > lay.kept_padded:
        raise ValueError(f"x: shape={x.shape}: K={k} exceeds the packed weight's {lay.kept_padded} inputs")
    if config is None:
        config = tiles.select_config(t, lay.rows, lay.vector_size, lay.gather, _sm_count())
    elif isinstance(config, int):
        config = tiles.CONFIGS[config]
    if config not in tiles.valid_configs(lay.rows, lay.vector_size, lay.gather):
        raise NotImplementedError(f"config {config} cannot tile this weight ({lay})")
    if bias is None:
        bias_arr = jnp.zeros((0,), jnp.float32)
    else:
        bias_arr = jnp.asarray(bias, jnp.float32).reshape(out_features)
    xin = prepare_activations(x, lay)
    # Permuted channels: the kernel writes coalesced rows of y^T (O, T_pad); XLA transposes.
    transposed = not lay.identity_rows
    out_shape = (out_features, -(-t // 8) * 8) if transposed else (t, out_features)
    operands = (xin, vals, packed["metadata"], packed["vector_index"], packed["row_perm"], bias_arr)
    attrs = dict(
        gather=np.int64(lay.gather),
        config=np.int64(config.id),
        vector_size=np.int64(lay.vector_size),
        transposed_out=np.int64(transposed),
    )
    return operands, out_shape, attrs, transposed


def spmm(x, packed, out_features: int, bias=None, *, config: tiles.TileConfig | int | None = None):
    """``y = x @ W (+ bias)`` with ``W`` packed by :func:`cuda_ffi.packing.pack`.

    Args:
      x: ``(T, K)`` float16 or bfloat16, the dtype of ``packed["values"]``.
      packed: the dict of kernel arrays.
      out_features: ``O``.
      bias: optional ``(O,)`` (added in float32 before rounding).
      config: a tile configuration or its id (default: :func:`tiles.select_config`).

    Returns:
      ``(T, O)`` in ``x``'s dtype. A vector index entry outside ``0..K-1`` (other than the
      ``-1`` padding) is never read: outputs that use it are NaN.

    Raises:
      NotImplementedError: dtypes or shapes the kernel does not run.
    """
    operands, out_shape, attrs, transposed = call_operands(x, packed, out_features, bias, config=config)
    if _gpu_present():
        register()  # builds on first use; lowering alone (no GPU) needs no registration
    t = jnp.shape(x)[0]
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct(out_shape, operands[0].dtype))
    y = call(*operands, **attrs)
    return y[:, :t].T if transposed else y


def _gpu_present() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _sm_count() -> int:
    """SMs of the first GPU (132 if unknown: an H100/H200)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", 0) or 132)
    except RuntimeError:
        return 132
