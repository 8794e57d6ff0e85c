"""hinm_jax: hierarchical N:M sparsity for Flax models, from pruning to Sparse Tensor Cores.

``import hinm_jax`` loads only jax and the mask and format core; the parts that need
flax, optax, scipy, orbax or tqdm (``layers``, ``optim``, ``permute``, ``scores``,
``select``, ``reconstruct``, ``checkpoint``, ``interop``, ``models``) are imported when
first used. See ``ARCHITECTURE.md`` for the layers of the package.

Example:
    >>> import jax, hinm_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}}
    >>> masks = hinm_jax.prune(params, hinm_jax.HiNM(64, 0.5, 2, 4))
    >>> sparse = hinm_jax.compress(params, masks)
    >>> y = hinm_jax.sparse_matmul(jax.numpy.ones((8, 256)), sparse["dense"]["kernel"])
"""

import importlib
import importlib.abc
import importlib.util
import sys

from hinm_jax import core, format, masks, ops, patterns
from hinm_jax.core import Layout
from hinm_jax.format import SparseWeight, compress
from hinm_jax.masks import Mask, Summary, apply_masks, named_leaves, prune, ste_apply, summary
from hinm_jax.allocate import allocate_sparsity, allocation_table
from hinm_jax.ops import available_implementations, pack_for, sparse_ffn, sparse_matmul, sparse_matmuls
from hinm_jax.patterns import HSS, NM, HiNM, Pattern, Unstructured, VectorWise, parse_pattern

__version__ = "0.1.0"

_LAZY_MODULES = ("checkpoint", "interop", "layers", "models", "optim", "permute", "reconstruct", "scores", "select")
_LAZY_NAMES = {"efficacy": "permute", "sparse_inference": "layers", "to_inference": "layers"}


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"hinm_jax.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"hinm_jax.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'hinm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))


class _AfterFlaxSerialization(importlib.abc.MetaPathFinder):
    """Registers hinm_jax's pytrees with ``flax.serialization`` once flax loads it, so
    ``import hinm_jax`` does not import flax."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "flax.serialization":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.modules[fullname] = module
            importlib.import_module("hinm_jax._serialization")

        spec.loader.exec_module = exec_and_register
        return spec


if "flax.serialization" in sys.modules:
    importlib.import_module("hinm_jax._serialization")
else:
    sys.meta_path.insert(0, _AfterFlaxSerialization())

__all__ = [
    "HiNM",
    "NM",
    "VectorWise",
    "Unstructured",
    "HSS",
    "Pattern",
    "parse_pattern",
    "prune",
    "apply_masks",
    "summary",
    "Summary",
    "named_leaves",
    "ste_apply",
    "efficacy",
    "sparse_inference",
    "to_inference",
    "Mask",
    "Layout",
    "SparseWeight",
    "compress",
    "pack_for",
    "sparse_matmul",
    "sparse_matmuls",
    "sparse_ffn",
    "available_implementations",
]
