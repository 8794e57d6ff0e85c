"""Path-aware selection: which parameter leaves to prune, by path, by module type, by
position in the model.

:func:`hinm_jax.prune` takes ``where`` as a predicate ``(path, leaf) -> bool`` over
"/"-joined parameter paths (``"encoder/Dense_0/kernel"``, ``"layers/0/kernel"``). The
helpers here build such predicates from what the model is made of: :func:`modules` lists
a model's submodules with their paths and types (linen: traced abstractly with example
inputs; nnx: the live object graph), and :func:`module_type` / :func:`prunable` turn that
into a ``where``.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, hinm_jax
    >>> from hinm_jax import select
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         for _ in range(3):
    ...             x = nn.relu(nn.Dense(64)(x))
    ...         return nn.Dense(10, name="head")(x)
    >>> model, x = MLP(), jnp.ones((1, 64))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> dense = [m.path for m in select.modules(model, x) if m.type is nn.Dense]
    >>> dense
    ['Dense_0', 'Dense_1', 'Dense_2', 'head']
    >>> where = select.all_of(select.module_type(nn.Dense, model, x),
    ...                       select.not_(select.in_modules([dense[0], dense[-1]])))
    >>> masks = hinm_jax.prune(params, "2:4", where=where)
    >>> [p for p in ("Dense_0", "Dense_1", "Dense_2", "head") if masks[p]["kernel"] is not None]
    ['Dense_1', 'Dense_2']
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax

from hinm_jax import _capture
from hinm_jax._capture import replace_modules

__all__ = [
    "ModuleInfo",
    "Predicate",
    "modules",
    "module_type",
    "prunable",
    "in_modules",
    "path_regex",
    "all_of",
    "any_of",
    "not_",
    "kernel_shapes",
    "replace_modules",
]

Predicate = Callable[[str, Any], bool]


class ModuleInfo(NamedTuple):
    """One submodule of a model.

    Attributes:
      path: "/"-joined path of the module (its parameters are ``path + "/kernel"``, ...).
      type: the module's class.
      module: the module object, to read its configuration (``features``, ``axis``,
        ``feature_group_count``, ...). A linen module here is the instance seen while
        tracing: read its attributes, do not call it.
    """

    path: str
    type: type
    module: Any


def _is_linen(model) -> bool:
    import flax.linen as nn

    return isinstance(model, nn.Module)


def _is_nnx(model) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def _linen_modules(model, args, kwargs, method) -> tuple[ModuleInfo, ...]:
    import flax.linen as nn

    seen: dict[str, ModuleInfo] = {}

    def record(next_fun, a, kw, context):
        mod = context.module
        if mod.scope is not None:
            path = _capture.join_path(mod.scope.path)
            if path not in seen:
                seen[path] = ModuleInfo(path, type(mod), mod)
        return next_fun(*a, **kw)

    def init():
        kw = dict(kwargs)
        if method is not None:
            kw["method"] = method
        return model.init(jax.random.key(0), *args, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(init)
    return tuple(seen.values())


def _nnx_graph_modules(model) -> tuple[ModuleInfo, ...]:
    from flax import nnx

    return tuple(ModuleInfo(_capture.join_path(path), type(mod), mod) for path, mod in nnx.iter_modules(model))


def _nnx_layer_types():
    from flax import nnx

    return (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)


def _nnx_call_order(model, args, kwargs) -> tuple[ModuleInfo, ...]:
    """The kernel layers in the order a call on ``args`` enters them, then the rest."""
    infos = {info.path: info for info in _nnx_graph_modules(model)}
    order: list[ModuleInfo] = []

    def record(path, mod, x):
        if all(info.path != path for info in order):
            order.append(infos[path])

    types = _nnx_layer_types()
    run = _capture.runner(model, None, lambda m, _: m(*args, **kwargs), wanted=lambda mod: isinstance(mod, types))
    jax.eval_shape(lambda p: run(p, None, record), _capture.model_params(model))
    called = {info.path for info in order}
    return tuple(order) + tuple(info for path, info in infos.items() if path not in called)


def _all_modules(model, args, kwargs, method=None) -> tuple[ModuleInfo, ...]:
    """Like :func:`modules`, with the root (path ``""``) included."""
    if _is_linen(model):
        if not args and not kwargs:
            raise ValueError(
                f"model: {type(model).__name__} is a linen module: pass example inputs, "
                "modules(model, x), to trace which submodules it calls"
            )
        return _linen_modules(model, args, kwargs, method)
    if _is_nnx(model):
        if args or kwargs:
            return _nnx_call_order(model, args, kwargs)
        return _nnx_graph_modules(model)
    raise ValueError(f"model: expected a flax linen or nnx Module, got {type(model).__name__}")


def modules(model, *args, method=None, **kwargs) -> tuple[ModuleInfo, ...]:
    """The submodules of ``model`` with their paths and types.

    Args:
      model: a linen ``nn.Module`` or an nnx ``nnx.Module``.
      *args: example inputs. Required for linen (the model is traced abstractly with
        ``jax.eval_shape``, nothing is computed), giving the modules in call order.
        Optional for nnx: with inputs, the kernel layers (``Linear``, ``LinearGeneral``,
        ``Conv``, ``ConvTranspose``, ``Einsum``) come first in the order a call enters
        them, then the other modules; without, everything is in graph order.
      method: linen only, the method to trace (default ``__call__``).
      **kwargs: keyword arguments of the call.

    Returns:
      ``ModuleInfo(path, type, module)`` per submodule (the root left out), each shared
      module once.

    Example:
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.relu)
        >>> [(i.path, i.type.__name__) for i in modules(m)]
        [('layers/0', 'Linear'), ('layers', 'List')]
    """
    return tuple(info for info in _all_modules(model, args, kwargs, method) if info.path)


def _as_predicate(p) -> Predicate:
    if isinstance(p, str):
        return path_regex(p)
    if callable(p):
        return p
    raise ValueError(f"where: expected a predicate (path, leaf) -> bool or a path regex, got {p!r}")


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def in_modules(paths: Iterable[str], leaves: Sequence[str] | None = ("kernel",)) -> Predicate:
    """Selects the leaves named ``leaves`` (all leaves if ``None``) directly inside the
    modules at ``paths``.

    Example:
        >>> where = in_modules(["Dense_1"])
        >>> where("Dense_1/kernel", None), where("Dense_1/bias", None), where("Dense_10/kernel", None)
        (True, False, False)
    """
    paths = frozenset(paths)
    names = None if leaves is None else frozenset(leaves)

    def where(path: str, leaf) -> bool:
        return _parent(path) in paths and (names is None or _leaf_name(path) in names)

    return where


def module_type(types, model, *args, leaves: Sequence[str] | None = ("kernel",), **kwargs) -> Predicate:
    """Selects the ``leaves`` (default the kernel) of every submodule of ``model`` that
    is an instance of ``types``.

    Args:
      types: a module class or a tuple of them (``nn.Dense``, ``nnx.Linear``, ...).
      model: the model (linen or nnx).
      *args: example inputs (required for linen, see :func:`modules`).
      leaves: parameter names to select inside those modules, ``None`` for all.
      **kwargs: keyword arguments of the call.

    Example:
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(0)))
        >>> where = module_type(nnx.Linear, m)
        >>> where("layers/0/kernel", None), where("layers/1/scale", None)
        (True, False)
    """
    types = tuple(types) if isinstance(types, (tuple, list)) else (types,)
    found = [info.path for info in _all_modules(model, args, kwargs) if issubclass(info.type, types)]
    return in_modules(found, leaves)


def kernel_shapes(model, *args, **kwargs) -> dict[str, tuple[tuple, tuple, tuple]]:
    """The matrix view of every dense-layer kernel: ``{kernel path: (batch_shape,
    in_shape, out_shape)}``.

    ``K = prod(in_shape)`` and ``O = prod(out_shape)``. For ``nn.Dense`` / ``nnx.Linear``
    that is ``((), (K,), (O,))``; a ``DenseGeneral`` / ``LinearGeneral`` with
    ``features=(H, D)`` has ``out_shape=(H, D)``; a conv ``((), (kh, kw, I), (O,))``.
    Linen modules that are never called are not listed.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> kernel_shapes(nn.DenseGeneral((4, 16)), jnp.ones((2, 32)))
        {'kernel': ((), (32,), (4, 16))}
    """
    import flax.linen as nn
    from flax import nnx

    infos = _all_modules(model, args, kwargs)
    out = {}
    if _is_linen(model):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)).get("params", {})
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        for info in infos:
            kpath, mod = _capture.kernel_path(info.path), info.module
            if kpath not in flat:
                continue
            shape = tuple(flat[kpath].shape)
            if isinstance(mod, nn.DenseGeneral):
                nf = len(mod.features) if isinstance(mod.features, Sequence) else 1
                nb = len(mod.batch_dims) if isinstance(mod.batch_dims, Sequence) else 1
                out[kpath] = (shape[:nb], shape[nb : len(shape) - nf], shape[len(shape) - nf :])
            elif isinstance(mod, (nn.Dense, nn.Conv)):
                out[kpath] = ((), shape[:-1], shape[-1:])
        return out
    for info in infos:
        kpath, mod = _capture.kernel_path(info.path), info.module
        if isinstance(mod, nnx.LinearGeneral):
            shape = tuple(mod.kernel.shape)
            nb, nf = len(mod.batch_axis), len(mod.out_features)
            out[kpath] = (shape[:nb], shape[nb : len(shape) - nf], shape[len(shape) - nf :])
        elif isinstance(mod, (nnx.Linear, nnx.Conv)):
            shape = tuple(mod.kernel.shape)
            out[kpath] = ((), shape[:-1], shape[-1:])
    return out


def _sparse_capable(info: ModuleInfo) -> str | None:
    """Why sparse inference cannot run this module's kernel (``None`` if it can)."""
    import flax.linen as nn
    from flax import nnx

    mod = info.module
    if isinstance(mod, (nn.Conv, nnx.Conv)):
        if mod.feature_group_count != 1:
            return f"grouped conv (feature_group_count={mod.feature_group_count})"
        return None
    if isinstance(mod, nn.DenseGeneral):
        if mod.batch_dims:
            return f"DenseGeneral with batch_dims={mod.batch_dims}"
        return None
    if isinstance(mod, nnx.LinearGeneral):
        if mod.batch_axis:
            return f"LinearGeneral with batch_axis={dict(mod.batch_axis)}"
        return None
    if isinstance(mod, (nn.Dense, nnx.Linear)):
        return None
    return f"{info.type.__name__} has no sparse inference path"


def prunable(model, *args, **kwargs) -> Predicate:
    """Selects the kernels that :mod:`hinm_jax.layers` can run sparse: ``nn.Dense``,
    ``nn.DenseGeneral`` (no batch dims), ``nn.Conv`` (not grouped), ``nnx.Linear``,
    ``nnx.LinearGeneral`` (no batch axes), ``nnx.Conv`` (not grouped).

    A multi-axis-output kernel (``DenseGeneral(features=(H, D))``, kernel ``(K, H, D)``)
    is selected only once its output axes are folded into one (see
    :func:`hinm_jax.layers.fold_features`): pruned as it is, its last axis ``D`` would be
    taken as the output axis, which sparse inference cannot run. Such a leaf raises,
    naming its path.

    Example:
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0)),
        ...                    nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=nnx.Rngs(0)))
        >>> where = prunable(m)
        >>> where("layers/0/kernel", None), where("layers/1/kernel", None)
        (True, False)
    """
    shapes = kernel_shapes(model, *args, **kwargs)
    ok = {
        _capture.kernel_path(info.path)
        for info in _all_modules(model, args, kwargs)
        if _sparse_capable(info) is None and _capture.kernel_path(info.path) in shapes
    }

    def where(path: str, leaf) -> bool:
        if path not in ok:
            return False
        batch, ins, outs = shapes[path]
        shape = tuple(getattr(leaf, "shape", ())) if leaf is not None else None
        if len(outs) > 1 and shape is not None and shape == batch + ins + outs:
            raise ValueError(
                f"{path}: shape={shape} has {len(outs)} output axes {outs}: prune it as a "
                f"(K={math.prod(ins)}, O={math.prod(outs)}) matrix, folded with "
                "hinm_jax.layers.fold_features(params, model, ...) first"
            )
        return True

    return where


def path_regex(regex: str) -> Predicate:
    """Selects the paths where ``re.search(regex, path)`` matches.

    Example:
        >>> path_regex(r"attention/(query|key)/kernel$")("block/attention/key/kernel", None)
        True
    """
    compiled = re.compile(regex)

    def where(path: str, leaf) -> bool:
        return compiled.search(path) is not None

    return where


def all_of(*preds) -> Predicate:
    """Selects what every predicate (or path regex) selects."""
    ps = [_as_predicate(p) for p in preds]
    return lambda path, leaf: all(p(path, leaf) for p in ps)


def any_of(*preds) -> Predicate:
    """Selects what any predicate (or path regex) selects."""
    ps = [_as_predicate(p) for p in preds]
    return lambda path, leaf: any(p(path, leaf) for p in ps)


def not_(pred) -> Predicate:
    """Selects what ``pred`` (a predicate or path regex) does not."""
    p = _as_predicate(pred)
    return lambda path, leaf: not p(path, leaf)
