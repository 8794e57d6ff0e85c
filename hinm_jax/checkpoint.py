"""Save and restore masks and compressed params with orbax, bit for bit.

A checkpoint is an orbax composite checkpoint with two items: ``arrays`` (every array of
the tree, saved by ``orbax.checkpoint.StandardSave``) and ``structure`` (JSON: the tree's
shape and the static fields that are not arrays: each :class:`~hinm_jax.Mask` /
:class:`~hinm_jax.SparseWeight`'s pattern, shape and stack axes, nnx ``Variable``
classes). :func:`restore` rebuilds the tree without being given a target.

Trees may hold dicts (linen params), nnx ``State`` (with ``Param`` / ``SparseParam``
variables), lists, tuples, ``None``, arrays (jax or numpy), Python scalars,
:class:`~hinm_jax.Mask` and :class:`~hinm_jax.SparseWeight` leaves. nnx variable metadata
is kept when it is plain data (bools, numbers, strings, tuples of them); other metadata
(e.g. a ``jax.sharding.Mesh``) is dropped and listed in the structure as
``dropped_metadata``.

Example:
    >>> import jax, hinm_jax, tempfile, os
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}
    >>> masks = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    >>> d = tempfile.mkdtemp()
    >>> save(os.path.join(d, "masks"), masks)
    >>> back = restore(os.path.join(d, "masks"))
    >>> bool((back["dense"]["kernel"].mask == masks["dense"]["kernel"].mask).all())
    True
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax.core import Layout
from hinm_jax.format import SparseWeight
from hinm_jax.masks import Mask
from hinm_jax.patterns import Pattern, parse_pattern

__all__ = ["save", "restore", "disk_bytes", "SizeReport", "size_report"]

_FORMAT = "hinm_jax.checkpoint/2"  # /2: patterns stored as their spec string


# ---------------------------------------------------------------------------------------
# Tree <-> (structure JSON, flat arrays)
# ---------------------------------------------------------------------------------------


def _pattern_spec(p, path: str) -> str:
    if not isinstance(p, Pattern):
        raise TypeError(f"{path}: pattern {p!r}: not a hinm_jax pattern, cannot be saved")
    return p.spec  # parse_pattern(p.spec) == p exactly


def _is_variable(x) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(x, nnx.Variable)


def _is_state(x) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.State)


def _variable_class(qualname: str):
    from flax import nnx

    module, _, name = qualname.rpartition(".")
    if not (module.startswith("flax.") or module.startswith("hinm_jax.")):
        raise ValueError(f"variable class {qualname}: only flax and hinm_jax variable classes are restored")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
        raise ValueError(f"variable class {qualname}: not an nnx.Variable")
    return cls


_UNSAVED = object()


def _meta_json(v):
    """Variable metadata as JSON (scalars, strings, tuples/lists of them), or _UNSAVED."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        items = [_meta_json(x) for x in v]
        if any(x is _UNSAVED for x in items):
            return _UNSAVED
        return {"tuple" if isinstance(v, tuple) else "list": items}
    return _UNSAVED


def _meta_from_json(v):
    if isinstance(v, dict):
        ((kind, items),) = v.items()
        items = [_meta_from_json(x) for x in items]
        return tuple(items) if kind == "tuple" else items
    return v


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, Any] = {}

    def array(self, x, path: str) -> dict:
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        kind = "numpy" if isinstance(x, (np.ndarray, np.generic)) else "jax"
        if x.size == 0:  # orbax refuses empty arrays; the shape says it all
            return {"type": "empty", "shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "kind": kind}
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.asarray(x) if kind == "numpy" else x
        return {"type": "array", "key": key, "kind": kind, "path": path}

    def node(self, x, path: str) -> dict:
        name = path or "<root>"
        if x is None:
            return {"type": "none"}
        if isinstance(x, SparseWeight):
            return {
                "type": "sparse",
                "shape": list(x.shape),
                "pattern": _pattern_spec(x.pattern, path),
                "stack_axes": x.stack_axes,
                "packed_for": x.packed_for,
                "packed": self.node(x.packed, f"{path}/packed"),
                **{f: self.array(getattr(x, f), f"{path}/{f}") for f in ("values", "metadata", "vector_index", "row_perm")},
            }
        if isinstance(x, Mask):
            out = {
                "type": "mask",
                "pattern": _pattern_spec(x.pattern, path),
                "stack_axes": x.stack_axes,
                "mask": self.array(x.mask, f"{path}/mask"),
                "layout": None,
            }
            if x.layout is not None:
                out["layout"] = {
                    "row_perm": self.array(x.layout.row_perm, f"{path}/row_perm"),
                    "vector_index": self.array(x.layout.vector_index, f"{path}/vector_index"),
                }
            return out
        if _is_variable(x):
            cls = type(x)
            meta = {k: _meta_json(v) for k, v in x.get_metadata().items()}
            return {
                "type": "variable",
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "metadata": {k: v for k, v in meta.items() if v is not _UNSAVED},
                "dropped_metadata": sorted(k for k, v in meta.items() if v is _UNSAVED),
                "value": self.node(x.get_value(), path),
            }
        if _is_state(x) or isinstance(x, Mapping):
            keys, items = [], []
            mapping = x.raw_mapping if _is_state(x) else x
            for k, v in mapping.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise ValueError(f"{name}: key {k!r} of type {type(k).__name__}: only str and int keys can be saved")
                keys.append([type(k).__name__, k])
                items.append(self.node(v, f"{path}/{k}" if path else str(k)))
            return {"type": "state" if _is_state(x) else "dict", "keys": keys, "items": items}
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return {
                "type": type(x).__name__,
                "items": [self.node(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)],
            }
        if isinstance(x, (bool, int, float, str)):
            return {"type": "scalar", "value": x}
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return self.array(x, path)
        raise ValueError(f"{name}: cannot save a {type(x).__name__}")


def _decode(spec: dict, arrays: Mapping[str, Any]):
    t = spec["type"]
    if t == "none":
        return None
    if t == "scalar":
        return spec["value"]
    if t == "empty":
        a = np.zeros(spec["shape"], jnp.dtype(spec["dtype"]))
        return a if spec["kind"] == "numpy" else jnp.asarray(a)
    if t == "array":
        a = arrays[spec["key"]]
        return np.asarray(a) if spec["kind"] == "numpy" else jnp.asarray(a)
    if t == "sparse":
        return SparseWeight(
            **{f: _decode(spec[f], arrays) for f in ("values", "metadata", "vector_index", "row_perm")},
            packed=_decode(spec["packed"], arrays),
            shape=tuple(spec["shape"]),
            pattern=parse_pattern(spec["pattern"]),
            stack_axes=spec["stack_axes"],
            packed_for=spec["packed_for"],
        )
    if t == "mask":
        layout = None
        if spec["layout"] is not None:
            layout = Layout(_decode(spec["layout"]["row_perm"], arrays), _decode(spec["layout"]["vector_index"], arrays))
        return Mask(_decode(spec["mask"], arrays), layout, parse_pattern(spec["pattern"]), spec["stack_axes"])
    if t == "variable":
        var = _variable_class(spec["class"])(_decode(spec["value"], arrays))
        if spec["metadata"]:
            var.set_metadata(**{k: _meta_from_json(v) for k, v in spec["metadata"].items()})
        return var
    if t in ("dict", "state"):
        keys = [int(v) if kind == "int" else v for kind, v in spec["keys"]]
        d = {k: _decode(item, arrays) for k, item in zip(keys, spec["items"])}
        if t == "state":
            from flax import nnx

            return nnx.State(d)
        return d
    if t in ("list", "tuple"):
        items = [_decode(item, arrays) for item in spec["items"]]
        return items if t == "list" else tuple(items)
    raise ValueError(f"checkpoint structure: unknown node type {t!r}")


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(directory, tree, *, overwrite: bool = False) -> None:
    """Saves ``tree`` (params, masks, compressed params, nnx state) to ``directory``.

    Args:
      directory: a path that does not exist yet (or ``overwrite=True``).
      tree: the pytree (see the module docstring for what it may hold).
      overwrite: replace an existing checkpoint.

    Example:
        >>> save("/tmp/ckpt/sparse", hinm_jax.compress(params, masks))  # doctest: +SKIP
    """
    directory = os.path.abspath(os.fspath(directory))
    enc = _Encoder()
    structure = {"format": _FORMAT, "tree": enc.node(tree, "")}
    if os.path.exists(directory):
        if not overwrite:
            raise ValueError(f"{directory}: exists; pass overwrite=True to replace it")
        shutil.rmtree(directory)
    ocp, ckptr = _checkpointer()
    items = {"structure": ocp.args.JsonSave(structure)}
    if enc.arrays:
        items["arrays"] = ocp.args.StandardSave(enc.arrays)
    ckptr.save(directory, args=ocp.args.Composite(**items))  # synchronous


def restore(directory):
    """Restores a tree written by :func:`save`, bit for bit: same structure, dtypes,
    values, patterns, layouts (no target needed).

    Example:
        >>> masks = restore("/tmp/ckpt/masks")  # doctest: +SKIP
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no checkpoint there")
    ocp, ckptr = _checkpointer()
    structure = ckptr.restore(directory, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))["structure"]
    if not isinstance(structure, Mapping) or structure.get("format") != _FORMAT:
        raise ValueError(f"{directory}: not a hinm_jax checkpoint (format {structure.get('format') if isinstance(structure, Mapping) else None!r})")
    arrays = {}
    if os.path.isdir(os.path.join(directory, "arrays")):
        arrays = ckptr.restore(directory, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
    return _decode(structure["tree"], arrays)


def disk_bytes(directory) -> int:
    """Bytes on disk under ``directory`` (all files: arrays, metadata, orbax's own)."""
    total = 0
    for root, _, files in os.walk(os.fspath(directory)):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


class SizeReport(NamedTuple):
    """Checkpoint sizes of the same model dense and compressed.

    Attributes:
      dense_bytes: on disk, the dense params.
      sparse_bytes: on disk, the compressed params.
      dense_array_bytes: bytes of the dense arrays themselves (no file overhead).
      sparse_array_bytes: bytes of the compressed arrays themselves.
    """

    dense_bytes: int
    sparse_bytes: int
    dense_array_bytes: int
    sparse_array_bytes: int

    @property
    def ratio(self) -> float:
        """``sparse_bytes / dense_bytes`` on disk."""
        return self.sparse_bytes / self.dense_bytes

    @property
    def array_ratio(self) -> float:
        """The same ratio for the arrays alone."""
        return self.sparse_array_bytes / self.dense_array_bytes

    def __str__(self):
        return (
            f"dense {self.dense_bytes:,} B, sparse {self.sparse_bytes:,} B on disk "
            f"({self.ratio:.3f}x); arrays alone {self.array_ratio:.3f}x"
        )


def _array_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree)
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x))) for x in leaves if hasattr(x, "dtype")))


def size_report(dense, sparse, directory=None) -> SizeReport:
    """Saves ``dense`` and ``sparse`` (e.g. ``params`` and ``compress(params, masks)``)
    under ``directory`` (a temporary one, removed after, if ``None``) and measures them.

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {"w": jax.random.normal(jax.random.key(0), (1024, 1024)).astype(jnp.float16)}
        >>> sparse = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:64:0.5:2:4"))
        >>> round(size_report(params, sparse).array_ratio, 3)
        0.299
    """
    own = directory is None
    directory = tempfile.mkdtemp(prefix="hinm_ckpt_") if own else os.fspath(directory)
    try:
        d_path, s_path = os.path.join(directory, "dense"), os.path.join(directory, "sparse")
        save(d_path, dense, overwrite=True)
        save(s_path, sparse, overwrite=True)
        return SizeReport(disk_bytes(d_path), disk_bytes(s_path), _array_bytes(dense), _array_bytes(sparse))
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)
