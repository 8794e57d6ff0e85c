"""PyTorch ``state_dict`` <-> hinm_jax's canonical orientation.

PyTorch stores a ``Linear`` weight as ``(out, in)`` and a ``ConvNd`` weight as ``(out,
in/groups, *kernel)``; hinm_jax (and Flax) see a weight as ``(K, O)``: ``(in, out)`` and
``(*kernel, in/groups, out)``. :func:`from_torch` turns a ``state_dict`` into a nested dict
of arrays in that orientation (keys split on ``"."``, names kept: ``"fc1.weight"`` becomes
``params["fc1"]["weight"]``, path ``"fc1/weight"``), so that :func:`hinm_jax.prune` works
on it; :func:`to_torch` and :func:`masks_to_torch` turn params and masks back into torch
layout (masks ready for ``torch.nn.utils.prune.custom_from_mask``).

Which tensors are ``Linear`` and which ``Conv`` weights is read from the torch module
when one is given; otherwise from names and ranks: a 2-D ``*weight`` is a linear weight
unless its name says embedding, a 3-D to 5-D ``*weight`` a conv weight, everything else
(biases, norms, embeddings, buffers) is kept as it is. ``layouts`` overrides either.

Dtypes are kept bit for bit, never cast: a tensor becomes a jax array when jax holds its
dtype (floating and complex dtypes, bf16 and the float8 formats included), and stays a
numpy array of the same dtype otherwise: integer and bool buffers, and float64 /
complex128 unless ``jax_enable_x64`` is on (jax would cut them to float32 / complex64).
Such numpy leaves pass through :func:`to_torch` unchanged; jax operations on them follow
jax's x64 rule. A dtype with no numpy equivalent (``complex32``, packed ``float4``,
quantized tensors) raises a ``TypeError`` naming the tensor.

Example:
    >>> import numpy as np
    >>> sd = {"fc.weight": np.zeros((32, 64), np.float32), "fc.bias": np.zeros(32, np.float32)}
    >>> params = from_torch(sd)
    >>> params["fc"]["weight"].shape, params["fc"]["bias"].shape
    ((64, 32), (32,))
    >>> {k: tuple(v.shape) for k, v in to_torch(params).items()}
    {'fc.weight': (32, 64), 'fc.bias': (32,)}
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax._tree import path_str
from hinm_jax.format import SparseWeight
from hinm_jax.masks import Mask, is_mask_leaf

__all__ = ["LINEAR", "CONV", "KEEP", "torch_layouts", "from_torch", "to_torch", "masks_to_torch"]

LINEAR = "linear"
CONV = "conv"
KEEP = "keep"
_KINDS = (LINEAR, CONV, KEEP)
_EMBED = re.compile(r"embed", re.IGNORECASE)


def _guess(name: str, ndim: int) -> str:
    if not name.endswith("weight"):
        return KEEP
    if ndim == 2 and not _EMBED.search(name):
        return LINEAR
    if 3 <= ndim <= 5:
        return CONV
    return KEEP


def _module_layouts(module) -> dict[str, str]:
    import torch

    out = {}
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for name, mod in module.named_modules():
        prefix = f"{name}." if name else ""
        for pname, _ in mod.named_parameters(recurse=False):
            kind = KEEP
            if isinstance(mod, torch.nn.Linear) and pname == "weight":
                kind = LINEAR
            elif isinstance(mod, convs) and pname == "weight":
                kind = CONV
            elif isinstance(mod, torch.nn.MultiheadAttention) and pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                kind = LINEAR
            out[prefix + pname] = kind
    return out


def torch_layouts(shapes: Mapping[str, Any], module=None, layouts: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kind of each tensor: ``"linear"``, ``"conv"`` or ``"keep"``.

    Args:
      shapes: ``{name: tensor, array or shape}`` (a ``state_dict`` works).
      module: the ``torch.nn.Module`` the names belong to (types decide); without it,
        names and ranks decide (see the module docstring).
      layouts: ``{name regex: kind}`` overrides (first match wins).

    Example:
        >>> torch_layouts({"embed.weight": (100, 16), "conv.weight": (8, 3, 3, 3), "fc.weight": (4, 8)})
        {'embed.weight': 'keep', 'conv.weight': 'conv', 'fc.weight': 'linear'}
    """
    from_module = _module_layouts(module) if module is not None else {}
    out = {}
    for name, v in shapes.items():
        shape = tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape)
        kind = from_module.get(name) if module is not None else None
        if kind is None:
            kind = _guess(name, len(shape))
        for regex, override in (layouts or {}).items():
            if re.search(regex, name):
                if override not in _KINDS:
                    raise ValueError(f"{name}: layout {override!r} for {regex!r}: expected one of {_KINDS}")
                kind = override
                break
        if kind == LINEAR and len(shape) != 2:
            raise ValueError(f"{name}: shape={shape}: a linear weight must be 2-D")
        if kind == CONV and len(shape) < 3:
            raise ValueError(f"{name}: shape={shape}: a conv weight needs (out, in, *kernel)")
        out[name] = kind
    return out


# torch dtypes numpy lacks, carried bit for bit as ml_dtypes through an integer view
_BIT_VIEWS = (
    ("bfloat16", "int16"),
    ("float8_e4m3fn", "uint8"),
    ("float8_e4m3fnuz", "uint8"),
    ("float8_e5m2", "uint8"),
    ("float8_e5m2fnuz", "uint8"),
    ("float8_e8m0fnu", "uint8"),
)


def _bit_views():
    """``[(torch dtype, numpy (ml_dtypes) dtype, torch int view, numpy int view)]`` for
    the dtypes both libraries have."""
    import ml_dtypes
    import torch

    return [
        (getattr(torch, n), np.dtype(getattr(ml_dtypes, n)), getattr(torch, i), np.dtype(i))
        for n, i in _BIT_VIEWS
        if hasattr(torch, n) and hasattr(ml_dtypes, n)
    ]


def _check_numeric(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "biufcV" or a.dtype.names is not None or a.dtype.name.startswith("void"):
        raise TypeError(f"{name}: dtype={a.dtype}: not a numeric tensor")
    return a


def _to_numpy(name: str, t) -> np.ndarray:
    """A torch tensor (bf16 and float8 included) or array as a numpy array, bit exact;
    a ``TypeError`` naming ``name`` for dtypes numpy cannot hold."""
    if isinstance(t, np.ndarray):
        return _check_numeric(name, t)
    if type(t).__module__.startswith("torch"):
        t = t.detach().cpu()
        for tdt, ndt, tview, _ in _bit_views():
            if t.dtype == tdt:
                return t.contiguous().view(tview).numpy().view(ndt)
        try:
            return t.resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"{name}: dtype={t.dtype}: no numpy/jax equivalent, cannot be converted bit for bit ({e})") from None
    return _check_numeric(name, np.asarray(t))


def _from_numpy(name: str, a: np.ndarray):
    import torch

    a = np.array(a, order="C", copy=True)  # torch wants a writable buffer of its own
    for tdt, ndt, _, nview in _bit_views():
        if a.dtype == ndt:
            return torch.from_numpy(a.view(nview)).view(tdt)
    try:
        return torch.from_numpy(a)
    except TypeError as e:
        raise TypeError(f"{name}: dtype={a.dtype}: torch has no such dtype ({e})") from None


def _jax_holds(dtype) -> bool:
    """Whether a jax array holds ``dtype`` itself (float64 only with x64 on)."""
    return jnp.issubdtype(dtype, jnp.inexact) and jax.dtypes.canonicalize_dtype(dtype) == dtype


def _check_collisions(names) -> None:
    """Raises when two torch names become the same hinm_jax path (``"."`` and ``"/"``
    both separate path parts)."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{name!r}: state_dict keys must be str, got {type(name).__name__}")
        path = name.replace(".", "/")
        if path in seen:
            raise ValueError(
                f"{seen[path]!r} and {name!r}: both become the path {path!r}, so prune, summary "
                "and named_leaves could not tell them apart; rename one"
            )
        seen[path] = name


def _canonical(a, kind: str):
    if kind == LINEAR:
        return a.T
    if kind == CONV:  # (O, I, *k) -> (*k, I, O)
        nd = a.ndim
        return a.transpose(tuple(range(2, nd)) + (1, 0))
    return a


def _torch_order(a, kind: str):
    if kind == LINEAR:
        return a.T
    if kind == CONV:  # (*k, I, O) -> (O, I, *k)
        nd = a.ndim
        return a.transpose((nd - 1, nd - 2) + tuple(range(nd - 2)))
    return a


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        parts = name.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name}: another tensor is named by its prefix, which cannot be nested")
        if parts[-1] in node:
            raise ValueError(f"{name}: it is a prefix of other tensor names, which cannot be nested")
        node[parts[-1]] = v
    return out


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """``"."``-joined names of a nested mapping's leaves, in insertion order."""
    if isinstance(tree, Mapping) or hasattr(tree, "items") and not isinstance(tree, (SparseWeight, Mask)):
        out = {}
        for k, v in tree.items():
            for name, leaf in _flat(v, f"{prefix}{k}.").items():
                if name in out:
                    raise ValueError(f"{name}: two leaves get this torch name (a key holds '.'); rename one")
                out[name] = leaf
        return out
    if tree is None or isinstance(tree, (SparseWeight, Mask)) or hasattr(tree, "shape"):
        return {prefix[:-1]: tree}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: is_mask_leaf(x) or isinstance(x, SparseWeight))[0]
    return {prefix + path_str(p).replace("/", "."): v for p, v in leaves}


def from_torch(state_dict: Mapping[str, Any], *, module=None, layouts: Mapping[str, str] | None = None) -> dict:
    """A torch ``state_dict`` as a nested dict of jax arrays in canonical orientation.

    Args:
      state_dict: ``{name: tensor}`` (numpy arrays work too); dtypes are kept (bf16
        and float8 included) and values are copied bit for bit. Floating and complex
        tensors become jax arrays when jax holds their dtype; integer and bool buffers,
        and float64 / complex128 without ``jax_enable_x64``, stay numpy arrays of the
        same dtype (jax would cast them down).
      module: the torch module, to read layer types (see :func:`torch_layouts`).
      layouts: ``{name regex: "linear" | "conv" | "keep"}`` overrides.

    Returns:
      ``{"fc1": {"weight": (in, out), "bias": (out,)}, ...}``.

    Raises:
      TypeError: a tensor whose dtype numpy cannot hold (``complex32``, packed
        ``float4``, quantized), naming the tensor and its dtype.
      ValueError: two names that become the same path (``"a/b.weight"`` and
        ``"a.b.weight"``), or a name that is a prefix of another, naming both.

    Example:
        >>> import numpy as np
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch Linear(3, 2)
        >>> from_torch({"weight": w})["weight"].tolist()
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        >>> type(from_torch({"x": np.zeros(2)})["x"]).__name__  # float64 without x64
        'ndarray'
    """
    _check_collisions(state_dict)
    arrays = {name: _to_numpy(name, t) for name, t in state_dict.items()}
    kinds = torch_layouts(arrays, module, layouts)

    def convert(a, kind):
        a = _canonical(a, kind)
        return jnp.asarray(a) if _jax_holds(a.dtype) else np.array(a, copy=True)

    return _nest({name: convert(a, kinds[name]) for name, a in arrays.items()})


def to_torch(params, *, module=None, layouts: Mapping[str, str] | None = None) -> dict:
    """Canonical params (from :func:`from_torch`, possibly pruned or fine-tuned) back to a
    torch ``state_dict`` (a dict of tensors in torch layout, names ``"."``-joined).

    :class:`~hinm_jax.SparseWeight` leaves are densified (``W * mask``). Pass the same
    ``module`` / ``layouts`` as to :func:`from_torch`.

    Example:
        >>> import numpy as np
        >>> sd = {"conv.weight": np.ones((8, 3, 5, 5), np.float32)}
        >>> tuple(from_torch(sd)["conv"]["weight"].shape), tuple(to_torch(from_torch(sd))["conv.weight"].shape)
        ((5, 5, 3, 8), (8, 3, 5, 5))
    """
    flat = _flat(params)
    arrays = {}
    for name, v in flat.items():
        if isinstance(v, SparseWeight):
            v = v.densify()
        arrays[name] = np.asarray(v)
    kinds = torch_layouts(arrays, module, layouts)
    return {name: _from_numpy(name, _torch_order(a, kinds[name])) for name, a in arrays.items()}


def masks_to_torch(masks, *, module=None, layouts: Mapping[str, str] | None = None) -> dict:
    """Masks from :func:`hinm_jax.prune` on :func:`from_torch` params, as boolean torch
    tensors in torch layout, for the pruned tensors only (``None`` leaves are left out).

    Use them with ``torch.nn.utils.prune.custom_from_mask(layer, "weight", mask)`` or
    multiply them in.

    Example:
        >>> import numpy as np, hinm_jax
        >>> params = from_torch({"fc.weight": np.random.default_rng(0).normal(size=(32, 64))})
        >>> m = masks_to_torch(hinm_jax.prune(params, "2:4"))
        >>> tuple(m["fc.weight"].shape), float(m["fc.weight"].float().mean())
        ((32, 64), 0.5)
    """
    flat = _flat(masks)
    arrays = {}
    for name, m in flat.items():
        if m is None:
            continue
        if not isinstance(m, Mask):
            raise ValueError(f"{name}: expected a Mask or None, got {type(m).__name__}")
        arrays[name] = np.asarray(m.mask, bool)
    kinds = torch_layouts(arrays, module, layouts)
    return {name: _from_numpy(name, _torch_order(a, kinds[name])) for name, a in arrays.items()}
