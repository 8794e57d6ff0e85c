"""cpu_ffi: the HiNM / N:M sparse product on the CPU (C++) as a JAX operation.

Plain arrays in, plain arrays out; no dependency on ``hinm_jax``. Modules:

- :mod:`cpu_ffi.packing`: canonical compressed format -> the kernel's layout, once.
- :mod:`cpu_ffi.build`: C++ build on first use into a per-user cache, for the host's ISA.
- :mod:`cpu_ffi.ffi`: FFI registration (platform cpu), :func:`spmm` (one layer), :func:`spmm_many`
  (products of one input in one call) and :func:`ffn` (a feed-forward block of two layers in one
  call) via ``jax.ffi.ffi_call``.

Importing this package never compiles anything.

Example:
    >>> import cpu_ffi
    >>> packed = cpu_ffi.pack(values, metadata, vector_index, row_perm, m=4, in_features=K)  # doctest: +SKIP
    >>> cpu_ffi.register()                                                         # doctest: +SKIP
    >>> y = cpu_ffi.spmm(x, packed, n=2, m=4, vector_size=64, out_dtype=x.dtype)   # doctest: +SKIP
"""

from cpu_ffi.build import BuildError, find_compiler
from cpu_ffi.ffi import (
    ACTIVATIONS,
    LAYERS_TARGET_NAME,
    MODES,
    TARGET_NAME,
    default_mode,
    ffn,
    isa,
    register,
    spmm,
    spmm_many,
)
from cpu_ffi.packing import pack

__all__ = [
    "pack",
    "spmm",
    "spmm_many",
    "ffn",
    "register",
    "isa",
    "default_mode",
    "MODES",
    "ACTIVATIONS",
    "TARGET_NAME",
    "LAYERS_TARGET_NAME",
    "BuildError",
    "find_compiler",
]
