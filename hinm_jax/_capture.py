"""What a Flax model's layers are called with: one input-capture helper for linen and nnx.

:func:`runner` turns a model into ``run(params, batch, record)``: it runs the unmodified
model with ``params`` on ``batch`` and calls ``record(module_path, module, x)`` with the
first positional input ``x`` (``None`` if there is none) of every layer the caller wants. linen layers are intercepted with
``flax.linen.intercept_methods``; nnx layers are wrapped by a probe module in a fresh
copy of the model. ``run`` is traceable (``jax.jit``, ``jax.eval_shape``): ``record``
sees tracers and may return values computed from them through the caller's closure.
:mod:`hinm_jax.scores`, :mod:`hinm_jax.reconstruct` and :mod:`hinm_jax.select` use it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
from flax import nnx

__all__ = ["runner", "model_params", "layer_kind", "replace_modules", "join_path", "kernel_path"]

Record = Callable[[str, Any, Any], None]


def join_path(parts) -> str:
    """A module path as ``"encoder/layers/0"``."""
    return "/".join(str(p) for p in parts)


def kernel_path(module_path: str) -> str:
    """The path of a layer's kernel parameter: ``"encoder/q"`` -> ``"encoder/q/kernel"``
    (``"kernel"`` for the root module)."""
    return f"{module_path}/kernel" if module_path else "kernel"


def layer_kind(module) -> str | None:
    """``"dense"``, ``"dense_general"`` or ``"conv"`` for the dense and convolution layers
    of linen (``Dense``, ``DenseGeneral``, ``Conv``) and nnx (``Linear``,
    ``LinearGeneral``, ``Conv``); ``None`` for any other module."""
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return "dense"
    if isinstance(module, (nn.DenseGeneral, nnx.LinearGeneral)):
        return "dense_general"
    if isinstance(module, (nn.Conv, nnx.Conv)):
        return "conv"
    return None


def _child(parent, key):
    if isinstance(key, int):
        return parent[key]
    try:
        return getattr(parent, key)
    except AttributeError:
        return parent[key]


def _set_child(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
        return
    if hasattr(parent, key):
        setattr(parent, key, value)
    else:
        parent[key] = value


def replace_modules(model, fn: Callable[[str, Any], Any]):
    """Replaces, **in place**, every nnx submodule ``m`` at path ``p`` for which
    ``fn(p, m)`` returns a module (``None`` keeps ``m``); returns ``model``.

    Call it on a copy (``nnx.clone(model)``) to keep the original. Paths are "/"-joined
    (``"layers/0"``); the root itself is never replaced.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.relu)
        >>> m = replace_modules(m, lambda p, mod: nnx.Linear(4, 2, rngs=nnx.Rngs(1))
        ...                     if isinstance(mod, nnx.Linear) else None)
        >>> m(jax.numpy.ones((1, 4))).shape
        (1, 2)
    """
    todo = []
    for path, mod in nnx.iter_modules(model):
        if not path:
            continue
        new = fn(join_path(path), mod)
        if new is not None:
            todo.append((path, new))
    for path, new in todo:
        parent = model
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], new)
    return model


class _Probe(nnx.Module):
    """Calls ``record(path, inner, x)`` (``x`` the first positional input, or ``None``)
    before running ``inner``."""

    def __init__(self, inner, path: str, record: Record):
        self.inner, self.path, self.record = inner, path, record

    def __call__(self, *args, **kwargs):
        self.record(self.path, self.inner, args[0] if args else None)
        return self.inner(*args, **kwargs)


def _check_model(model, variables) -> None:
    if isinstance(model, nn.Module):
        return
    if isinstance(model, nnx.Module):
        if variables:
            raise ValueError("variables: only for linen modules; an nnx module carries its own state")
        return
    raise ValueError(f"model: expected a flax linen or nnx Module, got {type(model).__name__}")


def model_params(model, variables=None):
    """The parameters ``run`` takes: ``variables["params"]`` (linen) or
    ``nnx.state(model, nnx.Param)`` (nnx)."""
    _check_model(model, variables)
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(f"variables: {type(model).__name__} is a linen module: pass its variables ({{'params': ...}})")
        return variables["params"]
    return nnx.state(model, nnx.Param)


def runner(model, variables=None, call=None, wanted: Callable[[Any], bool] = lambda m: layer_kind(m) is not None):
    """``run(params, batch, record)``: the model on ``batch`` with ``params``, calling
    ``record(module_path, module, x)`` for every layer with ``wanted(module)``.

    Args:
      model: a linen module (with ``variables``) or an nnx module (left untouched).
      variables: linen only: ``{"params": ..., ...}`` (or ``None``); ``run``'s
        ``params`` replace ``variables["params"]``.
      call: ``call(f, batch)`` runs the model ``f`` (``model.apply`` bound to the
        variables, or the nnx model) on one batch; default ``f(batch)``.
      wanted: which layers to record (default: dense and convolution layers).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model, x = nn.Dense(2), jnp.ones((1, 3))
        >>> variables = model.init(jax.random.key(0), x)
        >>> seen = []
        >>> _ = runner(model, variables)(variables["params"], x, lambda p, m, x: seen.append((p, x.shape)))
        >>> seen
        [('', (1, 3))]
    """
    _check_model(model, variables)
    call = call or (lambda f, batch: f(batch))
    if isinstance(model, nn.Module):
        variables = dict(variables or {})

        def run_linen(params, batch, record: Record):
            inside = set()  # modules whose __call__ runs: a subclass calling super().__call__ is recorded once

            def intercept(next_fun, args, kwargs, context):
                mod = context.module
                if context.method_name != "__call__" or not wanted(mod) or id(mod) in inside:
                    return next_fun(*args, **kwargs)
                record(join_path(mod.scope.path), mod, args[0] if args else None)
                inside.add(id(mod))
                try:
                    return next_fun(*args, **kwargs)
                finally:
                    inside.discard(id(mod))

            with nn.intercept_methods(intercept):
                return call(lambda *a, **kw: model.apply({**variables, "params": params}, *a, **kw), batch)

        return run_linen

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def run_nnx(params, batch, record: Record):
        m = nnx.merge(graphdef, params, rest)  # a fresh copy: probing it in place is safe
        replace_modules(m, lambda path, mod: _Probe(mod, path, record) if wanted(mod) else None)
        return call(m, batch)

    return run_nnx
