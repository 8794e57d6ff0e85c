"""cuda_ffi: the HiNM / 2:4 ``mma.sp`` SpMM kernel (CUDA C++) as a JAX operation.

Plain arrays in, plain arrays out; no dependency on ``hinm_jax``. Modules:

- :mod:`cuda_ffi.packing`: canonical compressed format -> the kernel's layout (numpy or
  ``jax.numpy``), done once at conversion.
- :mod:`cuda_ffi.tiles`: the compiled tile shapes and the per-shape heuristic.
- :mod:`cuda_ffi.build`: nvcc build on first use into a per-user cache.
- :mod:`cuda_ffi.ffi`: FFI registration (platform CUDA) and :func:`spmm` via ``jax.ffi.ffi_call``.
- :mod:`cuda_ffi.mma_model`: a numpy model of ``mma.sp``/``ldmatrix`` (from the PTX ISA)
  and an emulator of the kernel, for CPU tests.

Importing this package never compiles anything.

Example:
    >>> import cuda_ffi
    >>> packed = cuda_ffi.pack(values, metadata, vector_index, row_perm)  # doctest: +SKIP
    >>> y = cuda_ffi.spmm(x, packed, out_features=values.shape[0])        # doctest: +SKIP
"""

from cuda_ffi.build import BuildError, find_nvcc
from cuda_ffi.ffi import TARGET_NAME, register, spmm
from cuda_ffi.packing import Layout, layout_of, pack
from cuda_ffi.tiles import CONFIGS, TileConfig, select_config

__all__ = [
    "pack",
    "layout_of",
    "Layout",
    "spmm",
    "register",
    "TARGET_NAME",
    "select_config",
    "TileConfig",
    "CONFIGS",
    "BuildError",
    "find_nvcc",
]
