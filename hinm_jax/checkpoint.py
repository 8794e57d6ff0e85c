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

Integrity: every array's sha256 is recorded in the structure, and ``hinm_jax.json``
(written last) records the size and sha256 of every file of the checkpoint, the
structure file included. :func:`restore` checks all of them, the dtype and shape of every
array, and validates each restored :class:`~hinm_jax.SparseWeight`
(:meth:`~hinm_jax.SparseWeight.validate`) and :class:`~hinm_jax.Mask` (shapes, layout
ranges, ``row_perm`` a permutation) before returning; a damaged or edited checkpoint
raises a ``ValueError`` naming the directory and the file or array path. Round trips are
bit for bit.

A save never destroys what it did not write: :func:`save` writes into a temporary
sibling directory (``.NAME.saving-*``), verifies it by restoring it, then renames it into
place; with ``overwrite=True`` it replaces only a directory that holds a hinm_jax
checkpoint and nothing else, and only once the new one is complete. On any failure the
previous checkpoint is untouched and the temporary directory is removed.

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

import hashlib
import importlib
import json
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

_FORMAT = "hinm_jax.checkpoint/3"  # /2: patterns stored as their spec string; /3: checksums
_LEGACY_FORMATS = ("hinm_jax.checkpoint/2",)  # no checksums: replaced by save, not restored
_MANIFEST = "hinm_jax.json"  # sizes and sha256 of every file, written last
_STRUCTURE = os.path.join("structure", "metadata")  # where orbax's JsonSave puts the structure
_ORBAX_ENTRIES = {"_CHECKPOINT_METADATA", "commit_success.txt", "structure", "arrays"}


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


def _variable_class(qualname: str, path: str):
    from flax import nnx

    module, _, name = qualname.rpartition(".")
    if not (module.startswith("flax.") or module.startswith("hinm_jax.")):
        raise ValueError(f"{path}: variable class {qualname}: only flax and hinm_jax variable classes are restored")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
        raise ValueError(f"{path}: variable class {qualname}: not an nnx.Variable")
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
        dtype = np.dtype(x.dtype)
        if dtype.kind not in "biufcV" or dtype.names is not None or dtype.name.startswith("void"):
            # V: ml_dtypes' bfloat16, float8, int4 (not structured or raw void)
            raise TypeError(f"{path or '<root>'}: dtype={dtype}: only numeric and bool arrays can be saved")
        if x.size == 0:  # orbax refuses empty arrays; the shape says it all
            return {"type": "empty", "shape": list(x.shape), "dtype": dtype.name, "kind": kind}
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.asarray(x) if kind == "numpy" else x
        return {
            "type": "array", "key": key, "kind": kind, "path": path,
            "dtype": dtype.name, "shape": list(x.shape), "sha256": _array_sha256(x),
        }

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


def _array_sha256(x) -> str:
    """sha256 of an array's bytes in C order (dtype and shape are recorded beside it)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Validation of restored leaves
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Decoding (every error names the tree path)
# ---------------------------------------------------------------------------------------


def _pattern(spec: dict, path: str) -> Pattern:
    try:
        return parse_pattern(spec["pattern"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: unknown pattern in the structure: {e}") from None


def _check_x64(spec: dict, dtype: np.dtype, path: str) -> None:
    """A jax array jax cannot hold now (float64 saved with x64 on) raises, never casts."""
    if spec["kind"] == "jax" and jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise TypeError(
            f"{path}: dtype={dtype}: saved as a jax array, which jax holds only with "
            "jax_enable_x64; call jax.config.update('jax_enable_x64', True) before restoring"
        )


def _decode_array(spec: dict, arrays: Mapping[str, Any], path: str):
    key, dtype, shape = spec["key"], jnp.dtype(spec["dtype"]), tuple(spec["shape"])
    if key not in arrays:
        raise ValueError(f"{path}: array {key} is missing from arrays/")
    a = arrays[key]
    _check_x64(spec, dtype, path)
    if np.dtype(a.dtype) != dtype or tuple(a.shape) != shape:
        raise ValueError(f"{path}: read back as {np.dtype(a.dtype)}{list(a.shape)}, saved as {dtype}{list(shape)}")
    if _array_sha256(a) != spec["sha256"]:
        raise ValueError(f"{path}: sha256 mismatch: the array's values are not those saved (damaged array data)")
    return np.asarray(a) if spec["kind"] == "numpy" else jnp.asarray(a)


def _decode(spec: dict, arrays: Mapping[str, Any], path: str = ""):
    name = path or "<root>"
    try:
        t = spec["type"]
        if t == "none":
            return None
        if t == "scalar":
            return spec["value"]
        if t == "empty":
            a = np.zeros(spec["shape"], jnp.dtype(spec["dtype"]))
            _check_x64(spec, a.dtype, name)
            return a if spec["kind"] == "numpy" else jnp.asarray(a)
        if t == "array":
            return _decode_array(spec, arrays, name)
        if t == "sparse":
            w = SparseWeight(
                **{f: _decode(spec[f], arrays, f"{path}/{f}") for f in ("values", "metadata", "vector_index", "row_perm")},
                packed=_decode(spec["packed"], arrays, f"{path}/packed"),
                shape=tuple(spec["shape"]),
                pattern=_pattern(spec, name),
                stack_axes=spec["stack_axes"],
                packed_for=spec["packed_for"],
            )
            return w.validate(name)
        if t == "mask":
            layout = None
            if spec["layout"] is not None:
                lay = spec["layout"]
                layout = Layout(
                    _decode(lay["row_perm"], arrays, f"{path}/row_perm"),
                    _decode(lay["vector_index"], arrays, f"{path}/vector_index"),
                )
            mask = Mask(_decode(spec["mask"], arrays, f"{path}/mask"), layout, _pattern(spec, name), spec["stack_axes"])
            return mask.validate(name)
        if t == "variable":
            var = _variable_class(spec["class"], name)(_decode(spec["value"], arrays, path))
            if spec["metadata"]:
                var.set_metadata(**{k: _meta_from_json(v) for k, v in spec["metadata"].items()})
            return var
        if t in ("dict", "state"):
            keys = [int(v) if kind == "int" else v for kind, v in spec["keys"]]
            if len(keys) != len(spec["items"]):
                raise ValueError(f"{name}: {len(keys)} keys but {len(spec['items'])} items in the structure")
            d = {k: _decode(item, arrays, f"{path}/{k}" if path else str(k)) for k, item in zip(keys, spec["items"])}
            if t == "state":
                from flax import nnx

                return nnx.State(d)
            return d
        if t in ("list", "tuple"):
            items = [_decode(item, arrays, f"{path}/{i}" if path else str(i)) for i, item in enumerate(spec["items"])]
            return items if t == "list" else tuple(items)
        raise ValueError(f"{name}: unknown node type {t!r} in the structure")
    except KeyError as e:
        raise ValueError(f"{name}: field {e.args[0]!r} is missing from the structure") from None


# ---------------------------------------------------------------------------------------
# Reading and checking a checkpoint directory
# ---------------------------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _files(directory: str) -> list[str]:
    """Every file under ``directory``, relative, sorted; the manifest left out."""
    out = []
    for root, _, files in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, f), directory) for f in files]
    return sorted(f for f in out if f != _MANIFEST)


def _write_manifest(directory: str) -> None:
    """Writes ``hinm_jax.json``: ``{relative path: [size, sha256]}`` of every file."""
    paths = {f: os.path.join(directory, f) for f in _files(directory)}
    files = {f: [os.path.getsize(p), _file_sha256(p)] for f, p in paths.items()}
    with open(os.path.join(directory, _MANIFEST), "w") as fh:
        json.dump({"format": _FORMAT, "files": files}, fh, indent=1)


def _legacy_format(directory: str) -> str | None:
    """The format of a checkpoint written before checksums, else ``None``."""
    try:
        with open(os.path.join(directory, _STRUCTURE)) as fh:
            fmt = json.load(fh).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if fmt in _LEGACY_FORMATS else None


def _manifest(directory: str) -> dict:
    """The manifest of ``directory``; raises a ``ValueError`` saying what is missing."""
    if os.path.isfile(directory):
        raise ValueError(f"{directory}: a file, not a checkpoint directory")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no checkpoint there")
    if not os.listdir(directory):
        raise ValueError(f"{directory}: an empty directory, not a checkpoint ({_MANIFEST}, structure/ and arrays/ are missing)")
    path = os.path.join(directory, _MANIFEST)
    if not os.path.isfile(path):
        legacy = _legacy_format(directory)
        if legacy:
            raise ValueError(f"{directory}: written in {legacy} without checksums; save it again with this version")
        raise ValueError(f"{directory}: {_MANIFEST} is missing: not a hinm_jax checkpoint (or a damaged one)")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
        files, fmt = manifest["files"], manifest["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory}: {_MANIFEST} is damaged ({type(e).__name__}: {e})") from None
    if fmt != _FORMAT:
        raise ValueError(f"{directory}: {_MANIFEST}: format {fmt!r}, expected {_FORMAT!r}")
    if not (
        isinstance(files, dict)
        and _STRUCTURE in files
        and all(isinstance(v, list) and len(v) == 2 for v in files.values())
        and all(not os.path.isabs(f) and os.path.normpath(f) == f and not f.startswith("..") for f in files)
    ):
        raise ValueError(f"{directory}: {_MANIFEST} is damaged (its file list is malformed)")
    return files


def _check_files(directory: str, files: Mapping[str, list]) -> list[str]:
    """Checks presence and size of every file; returns the files whose sha256 differs."""
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        # name a whole top-level directory (``arrays/``) when it is gone, else the files
        gone = sorted({f.split(os.sep)[0] for f in missing if not os.path.exists(os.path.join(directory, f.split(os.sep)[0]))})
        what = ", ".join(t + ("/" if any(f.startswith(t + os.sep) for f in files) else "") for t in gone) or ", ".join(missing)
        raise ValueError(f"{directory}: {what} missing ({len(missing)} file(s) of the checkpoint)")
    for f, (size, _) in files.items():
        got = os.path.getsize(os.path.join(directory, f))
        if got != size:
            raise ValueError(f"{directory}: {f} has {got} bytes, expected {size}: truncated or damaged")
    return [f for f, (_, digest) in files.items() if _file_sha256(os.path.join(directory, f)) != digest]


def _read(directory: str):
    """Restores and verifies the checkpoint in ``directory`` (see :func:`restore`)."""
    bad = _check_files(directory, _manifest(directory))
    if _STRUCTURE in bad:
        raise ValueError(f"{directory}: {_STRUCTURE} (the structure) has been edited or damaged: sha256 mismatch")
    if bad:  # orbax packs several arrays into each data file (OCDBT): name the files
        raise ValueError(f"{directory}: {', '.join(bad)} damaged: sha256 mismatch; not restored")
    with open(os.path.join(directory, _STRUCTURE)) as fh:
        structure = json.load(fh)
    if not isinstance(structure, Mapping) or structure.get("format") != _FORMAT or "tree" not in structure:
        raise ValueError(f"{directory}: {_STRUCTURE} is not a {_FORMAT} structure")
    arrays: Mapping[str, Any] = {}
    if os.path.isdir(os.path.join(directory, "arrays")):
        ocp, ckptr = _checkpointer()
        try:
            arrays = ckptr.restore(directory, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise ValueError(f"{directory}: arrays/ cannot be read: {type(e).__name__}: {e}") from e
    try:
        return _decode(structure["tree"], arrays)
    except TypeError as e:
        raise TypeError(f"{directory}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def _check_replaceable(directory: str) -> None:
    """Raises unless ``directory`` holds a hinm_jax checkpoint and nothing else."""
    if os.path.islink(directory):
        raise ValueError(f"{directory}: a symbolic link; overwrite=True replaces only a checkpoint directory (pass its target)")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: a file, not a checkpoint; overwrite=True replaces only a checkpoint directory")
    path = os.path.join(directory, _MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                listed = set(json.load(fh)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            listed = None
        extra = None if listed is None else sorted(set(_files(directory)) - listed)
    elif _legacy_format(directory):
        extra = sorted(set(os.listdir(directory)) - _ORBAX_ENTRIES)
    else:
        extra = None
    if extra is None:
        raise ValueError(f"{directory}: not a hinm_jax checkpoint; overwrite=True refuses to replace it")
    if extra:
        raise ValueError(
            f"{directory}: holds files that are not part of the checkpoint ({', '.join(extra[:5])}); "
            "overwrite=True refuses to replace it"
        )


def save(directory, tree, *, overwrite: bool = False) -> None:
    """Saves ``tree`` (params, masks, compressed params, nnx state) to ``directory``.

    The checkpoint is written into a temporary sibling directory, verified (restored and
    checked against the checksums), then renamed into place; an existing checkpoint is
    replaced only after that. On any failure nothing at ``directory`` has changed and the
    temporary directory is removed.

    Args:
      directory: a path that does not exist yet (or ``overwrite=True``).
      tree: the pytree (see the module docstring for what it may hold).
      overwrite: replace an existing checkpoint. Only a directory that holds a hinm_jax
        checkpoint and nothing else is replaced; anything else (a file, a link, a
        directory with other files) raises a ``ValueError`` and is left alone.

    Raises:
      ValueError: ``directory`` exists (without ``overwrite``) or cannot be replaced; a
        leaf cannot be saved (its path is named).
      TypeError: an array of a dtype that cannot be saved (strings, objects).

    Example:
        >>> save("/tmp/ckpt/sparse", hinm_jax.compress(params, masks))  # doctest: +SKIP
    """
    directory = os.path.abspath(os.fspath(directory))
    enc = _Encoder()
    structure = {"format": _FORMAT, "tree": enc.node(tree, "")}
    exists = os.path.lexists(directory)
    if exists:
        if not overwrite:
            raise ValueError(f"{directory}: exists; pass overwrite=True to replace it")
        _check_replaceable(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    keep_staging = False  # set only if the previous checkpoint could not be put back
    try:
        new = os.path.join(staging, "new")
        ocp, ckptr = _checkpointer()
        items = {"structure": ocp.args.JsonSave(structure)}
        if enc.arrays:
            items["arrays"] = ocp.args.StandardSave(enc.arrays)
        ckptr.save(new, args=ocp.args.Composite(**items))  # synchronous
        if not os.path.isfile(os.path.join(new, _STRUCTURE)):
            raise RuntimeError(f"{directory}: orbax did not write the structure to {_STRUCTURE}")
        _write_manifest(new)
        _read(new)  # verify before anything at `directory` changes
        if exists:
            old = os.path.join(staging, "old")
            os.rename(directory, old)
            try:
                os.rename(new, directory)
            except BaseException as e:
                try:
                    os.rename(old, directory)
                except OSError:
                    keep_staging = True
                    raise OSError(f"{directory}: could not be replaced nor put back; the previous checkpoint is in {old}") from e
                raise
        else:
            os.rename(new, directory)
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)


def restore(directory):
    """Restores a tree written by :func:`save`, bit for bit: same structure, dtypes,
    values, patterns, layouts (no target needed), after verifying it.

    Verified: every file's size and sha256, every array's dtype, shape and sha256, each
    :class:`~hinm_jax.SparseWeight` against its pattern
    (:meth:`~hinm_jax.SparseWeight.validate`) and each :class:`~hinm_jax.Mask` (a bool
    mask fitting its pattern; layout shapes; ``row_perm`` a permutation;
    ``vector_index`` distinct inputs in range).

    Raises:
      ValueError: no checkpoint at ``directory``, a file or directory of it is missing,
        truncated, edited or damaged, or a restored leaf is inconsistent; the message
        names the directory and the file or tree path.
      TypeError: a jax float64 / int64 array saved with ``jax_enable_x64``, restored
        without it.

    Example:
        >>> masks = restore("/tmp/ckpt/masks")  # doctest: +SKIP
    """
    return _read(os.path.abspath(os.fspath(directory)))


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
