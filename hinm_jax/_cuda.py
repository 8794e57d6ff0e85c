"""The ``"cuda"`` backend of :func:`hinm_jax.sparse_matmul`: adapter between the canonical
:class:`~hinm_jax.format.SparseWeight` and the ``mma.sp`` kernel in :mod:`cuda_ffi`.

Runs ``HiNM(V, s, 2, 4)`` (``V`` a multiple of 32) and ``NM(2, 4)`` weights in float16 or
bfloat16 on NVIDIA GPUs of compute capability 8.0 or newer, through ``jax.ffi``. The
library is compiled by nvcc the first time :func:`is_available` is asked (into
``~/.cache/hinm_jax/cuda``); importing this module compiles nothing. Anything else raises
``NotImplementedError`` so that the default dispatch falls through to another backend.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 128), jnp.float16)}
    >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:64:0.5:2:4"))["w"]
    >>> sw = hinm_jax.pack_for(sw, "cuda")  # once, at conversion  # doctest: +SKIP
    >>> y = hinm_jax.sparse_matmul(jnp.ones((4, 256), jnp.float16), sw, implementation="cuda")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import cuda_ffi
from cuda_ffi import packing as cuda_packing
from cuda_ffi import tiles as cuda_tiles
from hinm_jax import _activation, _backend
from hinm_jax.format import SparseWeight
from hinm_jax.patterns import NM

__all__ = ["NAME", "is_available", "supports", "pack", "matmul"]

NAME = "cuda"
_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _cuda_compute_capability() -> tuple[int, int] | None:
    """Compute capability of jax's first CUDA device, ``None`` without one."""
    if jax.default_backend() != "gpu":
        return None
    for d in jax.devices():
        cc = getattr(d, "compute_capability", None)  # CUDA devices only (not ROCm)
        if d.platform == "gpu" and cc:
            major, minor = str(cc).split(".")[:2]
            return int(major), int(minor)
    return None


@functools.cache
def is_available() -> bool:
    """A CUDA GPU of compute capability >= 8.0 is jax's default backend and the kernel
    library is built and registered (built here on first call; the answer is cached)."""
    cc = _cuda_compute_capability()
    if cc is None or cc < (8, 0):
        return False
    return _backend.register_or_warn(cuda_ffi.register, (cuda_ffi.BuildError, OSError), "the CUDA kernel")


def supports(w: SparseWeight) -> str | None:
    """Why the kernel cannot run ``w`` (ignoring the activations), or ``None`` if it can."""
    why = _backend.not_one_matrix(w)
    if why is not None:
        return why
    if (w.n, w.m) != (2, 4):
        return f"pattern {w.pattern}: only 2:4-based patterns (HiNM(., ., 2, 4), NM(2, 4)) run on mma.sp"
    if w.dtype not in _DTYPES:
        return f"dtype {w.dtype}: float16 or bfloat16 weights only"
    if not isinstance(w.pattern, NM) and w.vector_size % 32:
        return f"pattern {w.pattern}: vector size {w.vector_size} is not a multiple of 32"
    return None


def _concrete(arrays):
    """numpy copies of ``arrays``, or ``None`` if any is traced."""
    try:
        return [np.asarray(a) for a in arrays]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _pack_matrix(w: SparseWeight, values, metadata, vector_index, row_perm) -> dict:
    k, _ = w.matrix_shape
    concrete = _concrete((values, metadata, vector_index, row_perm))
    if concrete is not None:
        direct = True if isinstance(w.pattern, NM) else None
        return cuda_packing.pack(*concrete, direct=direct, in_features=k)
    return cuda_packing.pack(
        values, metadata, vector_index, row_perm, direct=isinstance(w.pattern, NM), in_features=k, xp=jnp
    )


def pack(w: SparseWeight) -> dict | None:
    """The kernel layout of ``w`` (see :mod:`cuda_ffi.packing`) as device arrays
    (``jax.Array``), or ``None`` when the kernel cannot run ``w`` (its matmul then falls
    through to another backend).

    Concrete weights are validated (:meth:`SparseWeight.validate`, ``ValueError`` for a
    broken one) and packed with numpy, then put on the default device once, so that a
    jitted function taking the packed weight does not upload it on every call. Traced ones
    are packed with ``jax.numpy``, which cannot raise: there, 2:4 groups with unordered
    positions are reordered and vector index entries outside ``0..K-1`` are marked invalid
    (the kernel writes NaN for the outputs that use them; see :mod:`cuda_ffi.packing`).
    Stacked weights get a leading stack axis on every array.

    Example:
        >>> packed = pack(sw)  # doctest: +SKIP
    """
    flat = _backend.one_matrix(w)
    if supports(flat) is not None:
        return None
    fn = lambda *arrays: _pack_matrix(flat, *arrays)
    arrays = (w.values, w.metadata, w.vector_index, w.row_perm)
    concrete = _concrete(arrays) is not None
    if concrete:
        # Concrete arrays may still be closed over by a function being traced: evaluate the
        # checks eagerly rather than staging them into that trace.
        with jax.ensure_compile_time_eval():
            w.validate()
    if not w.stack_axes:
        out = fn(*arrays)
    else:
        lead = w.shape[: w.stack_axes]
        flat_arrays = [jnp.reshape(a, (-1,) + a.shape[w.stack_axes :]) for a in arrays]
        if not concrete:
            out = jax.vmap(fn)(*flat_arrays)
        else:
            parts = [fn(*(np.asarray(a[i]) for a in flat_arrays)) for i in range(flat_arrays[0].shape[0])]
            out = {key: np.stack([p[key] for p in parts]) for key in parts[0]}
        out = {key: v.reshape(lead + v.shape[1:]) for key, v in out.items()}
    return {key: jnp.asarray(v) for key, v in out.items()}


def _kernel(x, w: SparseWeight, packed: dict, bias, activation):
    return _activation.apply(activation, cuda_ffi.spmm(x, packed, w.matrix_shape[1], bias))


_matmul = _backend.with_reference_vjp(_kernel)


def matmul(x, w: SparseWeight, bias=None, activation: str | None = None):
    """``activation(x @ w.densify() (+ bias))`` for ``x`` ``(T, K)`` with the ``mma.sp`` kernel.

    Uses ``w.packed`` when it was packed for this backend (:func:`hinm_jax.pack_for`),
    otherwise packs in-graph. The bias (``(O,)``, optional) is added in float32 in the
    kernel's epilogue; the activation (``None``, ``"relu"``, ``"gelu"``) after the
    kernel. Differentiable (the backward pass is the reference's).

    Raises:
      NotImplementedError: a pattern other than HiNM(., ., 2, 4) / NM(2, 4), a dtype other
        than float16/bfloat16 (x and w alike), a vector size that is not a multiple of 32,
        or stacked weights.
    """
    _backend.require(NAME, supports(w), x)
    dtype = jnp.dtype(jnp.result_type(x.dtype, w.dtype))
    if dtype != w.dtype or x.dtype != w.dtype:
        raise NotImplementedError(f"cuda: x dtype {x.dtype} with w dtype {w.dtype}: both must be float16 or both bfloat16")
    _, o = w.matrix_shape
    if x.shape[0] == 0:
        return jnp.zeros((0, o), dtype)
    packed = w.packed if (w.packed_for == NAME and w.packed is not None) else pack(w)
    lay = cuda_packing.layout_of(packed, o)
    if cuda_tiles.tile_height(lay.vector_size, lay.gather) is None:
        raise NotImplementedError(f"cuda: pattern {w.pattern}: no tile fits vector size {lay.vector_size}")
    plain = dataclasses.replace(w, packed=None, packed_for=None)
    return _matmul(x, plain, packed, bias, activation)
