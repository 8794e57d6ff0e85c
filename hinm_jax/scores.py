"""Importance scores: arrays shaped like the weight, higher means more important.

- :func:`magnitude`: ``|W|`` (the default of :func:`hinm_jax.prune`).
- :func:`wanda`: ``|W|`` times the L2 norm of each input feature over calibration data
  (Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023). The norms come
  from :func:`input_norms`, which runs the unmodified model (linen or nnx) on calibration
  batches and records the inputs of every ``Dense`` / ``DenseGeneral`` / ``Conv`` (for a
  convolution, the norms of its patch features).
- :func:`ria`: relative importance and activations (Zhang et al., 2024): each ``|W|``
  relative to its output channel's and its input feature's sums, times the input norms
  to the power 0.5.
- :func:`taylor`: first-order Taylor importance ``|W * dL/dW|`` (Molchanov et al., 2019),
  averaged over batches.

:func:`wanda` and :func:`ria` return a function ``(path, leaf) -> score`` and :func:`taylor` a pytree
like ``params``: both are accepted as ``score=`` everywhere (:func:`hinm_jax.prune`,
:func:`hinm_jax.optim.sparsify`, :func:`hinm_jax.optim.refresh`,
:func:`hinm_jax.optim.repermute`; see :func:`hinm_jax.masks.leaf_scores`).

Example:
    >>> import jax.numpy as jnp
    >>> magnitude(jnp.array([[-2.0, 1.0]])).tolist()
    [[2.0, 1.0]]
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _capture
from hinm_jax.core import magnitude
from hinm_jax.layers.functional import ConvSpec, _normalize_axes, _tuple, conv_patches

__all__ = ["magnitude", "input_norms", "wanda", "ria", "taylor"]




# ---------------------------------------------------------------------------------------
# Wanda: input norms captured by running the model
# ---------------------------------------------------------------------------------------


def _dense_sumsq(x, axis, path, weights=None):
    """Sum of squares of ``x`` over every axis but the contracted ones (in ``axis``
    order): the input features of a dense layer; each row scaled by its weight."""
    x = jnp.asarray(x, jnp.float32)
    axis = _normalize_axes(_tuple(axis), x.ndim)
    n = len(axis)
    xt = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    sq = jnp.square(xt)
    if weights is not None:
        lead = xt.shape[: x.ndim - n]
        try:
            w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), lead)
        except ValueError:
            raise ValueError(
                f"{path}: row_weights shape={tuple(jnp.shape(weights))} does not broadcast to the "
                f"input's rows {tuple(lead)}"
            ) from None
        sq = sq * w.reshape(lead + (1,) * n)
    return jnp.sum(sq, axis=tuple(range(x.ndim - n)))


def _conv_sumsq(x, module):
    """Sum of squares of each patch feature, in kernel order ``(*kernel_size, I)``."""
    spec = ConvSpec.of(module)
    spec_1 = ConvSpec(spec.kernel_size, spec.strides, spec.padding, spec.input_dilation, spec.kernel_dilation)
    p = conv_patches(jnp.asarray(x, jnp.float32), spec_1)  # (..., I * P), input channel slowest
    s = jnp.sum(jnp.square(p), axis=tuple(range(p.ndim - 1)))
    i = x.shape[-1]
    s = s.reshape((i,) + tuple(spec.kernel_size))
    return jnp.moveaxis(s, 0, -1)  # (*kernel_size, I)


def _grouped(norm, groups: int, out_features: int):
    """Per-channel conv norms ``(*k, I)`` -> ``(*k, I/g, O)``: output ``o`` reads group
    ``o // (O/g)``."""
    *ks, i = norm.shape
    n = norm.reshape(tuple(ks) + (groups, i // groups))
    group_of = np.arange(out_features) // (out_features // groups)
    return jnp.moveaxis(jnp.take(n, jnp.asarray(group_of), axis=-2), -2, -1)


def _module_sumsq(kind, module, x, path, weights=None):
    if kind == "dense":
        return _dense_sumsq(x, (-1,), path, weights)
    if kind == "dense_general":
        batch = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
        if batch:
            raise ValueError(f"{path}: DenseGeneral/LinearGeneral with batch axes: input norms are not captured")
        return _dense_sumsq(x, module.axis, path, weights)
    if weights is not None:
        raise ValueError(f"{path}: row_weights are for dense layers; a convolution's patches have other rows")
    return _conv_sumsq(x, module)


def _finish(sums: Mapping[str, Any], modules: Mapping[str, Any]) -> dict[str, jax.Array]:
    out = {}
    for path, s in sums.items():
        norm = jnp.sqrt(s)
        mod = modules[path]
        groups = getattr(mod, "feature_group_count", 1)
        if groups != 1:
            o = getattr(mod, "features", None) or getattr(mod, "out_features")
            norm = _grouped(norm, groups, int(o))
        out[path] = norm
    return out


def _norms(model, batches, variables, call, row_weights) -> dict[str, jax.Array]:
    run = _capture.runner(model, variables, call)
    modules = {}

    def stats(params, batch):
        sums = {}
        weights = None if row_weights is None else row_weights(batch)

        def record(mpath, mod, x):
            path = _capture.kernel_path(mpath)
            s = _module_sumsq(_capture.layer_kind(mod), mod, x, path, weights)
            sums[path] = sums[path] + s if path in sums else s
            modules[path] = mod

        run(params, batch, record)
        return sums

    step = jax.jit(stats)
    params = _capture.model_params(model, variables)
    total = None
    for batch in batches:
        s = step(params, batch)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    if total is None:
        raise ValueError("batches: no calibration batch given")
    return _finish(total, modules)


def input_norms(
    model,
    batches: Iterable,
    variables=None,
    *,
    call: Callable[[Callable, Any], Any] | None = None,
    row_weights: Callable[[Any], Any] | None = None,
) -> dict[str, jax.Array]:
    """The L2 norm of every input feature of every dense/conv layer over calibration
    data, captured by running the unmodified model.

    Args:
      model: a linen module (with ``variables``) or an nnx module.
      batches: calibration batches (an iterable).
      variables: linen only, ``{"params": ..., ...}``.
      call: ``call(f, batch)`` runs the model ``f`` (``model.apply`` bound to the
        variables, or the nnx model) on one batch; default ``f(batch)``. Use it for
        other signatures, e.g. ``lambda f, b: f(b["image"], train=False)``.
      row_weights: ``row_weights(batch)``, a weight per input row broadcast against a
        dense layer's leading input axes (e.g. a ``(B, T)`` attention mask, so that
        padding tokens do not count); dense layers only.

    Returns:
      ``{kernel path: norms}``, norms shaped like the kernel's input axes: ``(K,)`` for
      ``Dense``; the contracted axes for ``DenseGeneral`` (``(H, D)`` for an attention
      output projection); ``(*kernel_size, I)`` for ``Conv`` (the norms of the patch
      features, padding included; a grouped conv gets the full ``(*kernel_size, I/g,
      O)``). A layer called several times accumulates all its calls.

    Example:
        >>> import flax.linen as nn
        >>> model = nn.Dense(4)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> input_norms(model, [jnp.array([[3.0, 0.0, 1.0]]), jnp.array([[4.0, 0.0, 0.0]])], variables)
        {'kernel': Array([5., 0., 1.], dtype=float32)}
    """
    return _norms(model, batches, variables, call, row_weights)


def _input_norms_of(norms: Mapping[str, Any], fallback, path: str, leaf):
    """``leaf``'s captured input norms reshaped to broadcast over its output axes, or
    ``None`` when it has none and a ``fallback`` is given."""
    if path not in norms:
        if fallback is not None:
            return None
        raise ValueError(
            f"{path}: shape={tuple(leaf.shape)}: no input norms were captured for this leaf "
            f"(captured: {sorted(norms)[:4]}{'...' if len(norms) > 4 else ''}); pass fallback= "
            "or exclude it with where="
        )
    n = jnp.asarray(norms[path], jnp.float32)
    shape = tuple(leaf.shape)
    if n.shape == shape:
        return n
    if n.ndim >= len(shape) or tuple(shape[: n.ndim]) != tuple(n.shape):
        raise ValueError(f"{path}: shape={shape} does not start with its input norms' shape {tuple(n.shape)}")
    return n.reshape(n.shape + (1,) * (len(shape) - n.ndim))


def wanda(norms: Mapping[str, Any], *, fallback: Callable | None = None) -> Callable[[str, Any], jax.Array]:
    """The Wanda score ``|W| * ||X_k||`` as a ``score=`` function for :func:`hinm_jax.prune`.

    Args:
      norms: from :func:`input_norms` (``{kernel path: input-feature norms}``).
      fallback: score for pruned leaves without captured norms (e.g.
        :func:`magnitude`); by default such a leaf raises, naming its path.

    Returns:
      ``score(path, leaf)``: ``|leaf|`` times the norms broadcast over the output axes
      (a kernel folded with :func:`hinm_jax.layers.fold_features` works too).

    Example:
        >>> import hinm_jax
        >>> params = {"kernel": jnp.ones((8, 4))}
        >>> norms = {"kernel": jnp.arange(8.0)}
        >>> masks = hinm_jax.prune(params, "2:4", score=wanda(norms))
        >>> masks["kernel"].mask[:, 0].tolist()
        [False, False, True, True, False, False, True, True]
    """
    norms = dict(norms)

    def score(path: str, leaf):
        n = _input_norms_of(norms, fallback, path, leaf)
        return fallback(leaf) if n is None else magnitude(leaf) * n

    return score


def ria(norms: Mapping[str, Any], *, alpha: float = 0.5, fallback: Callable | None = None) -> Callable[[str, Any], jax.Array]:
    """Relative importance and activations (RIA; Zhang et al., "Plug-and-Play: An
    Efficient Post-training Pruning Method for Large Language Models", ICLR 2024) as a
    ``score=`` function: ``(|W| / sum_in |W| + |W| / sum_out |W|) * ||X_k|| ** alpha``.

    Each weight counts relative to the other weights of its output channel (the sum over
    the input axes) and of its input feature (the sum over the output axes), so no
    channel loses all its weights to louder neighbours; ``alpha`` (0.5 in the paper)
    softens the activation factor that Wanda applies in full (``alpha=1`` without the
    relative part is Wanda).

    Args:
      norms: from :func:`input_norms` (``{kernel path: input-feature norms}``); the
        leading axes of a kernel that its norms cover are its input axes.
      alpha: exponent of the input norms (>= 0).
      fallback: score for pruned leaves without captured norms; by default such a leaf
        raises, naming its path.

    Returns:
      ``score(path, leaf)``, shaped like the leaf.

    Example:
        >>> params = {"kernel": jnp.array([[4.0, 1.0], [2.0, 1.0]])}
        >>> s = ria({"kernel": jnp.array([1.0, 4.0])})("kernel", params["kernel"])
        >>> [[round(v, 3) for v in row] for row in s.tolist()]
        [[1.467, 0.7], [2.0, 1.667]]
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"ria: alpha={alpha!r} must be a number")
    if not alpha >= 0:
        raise ValueError(f"ria: alpha={alpha!r} must be >= 0")
    norms = dict(norms)

    def score(path: str, leaf):
        n = _input_norms_of(norms, fallback, path, leaf)
        if n is None:
            return fallback(leaf)
        a = magnitude(leaf)
        k = int(jnp.ndim(norms[path]))
        if k >= a.ndim:
            raise ValueError(
                f"{path}: shape={tuple(a.shape)}: RIA needs output axes after the {k} input axes its norms cover"
            )
        tiny = jnp.finfo(jnp.float32).tiny
        per_output = jnp.sum(a, axis=tuple(range(k)), keepdims=True)  # over the inputs
        per_input = jnp.sum(a, axis=tuple(range(k, a.ndim)), keepdims=True)  # over the outputs
        rel = a / jnp.maximum(per_output, tiny) + a / jnp.maximum(per_input, tiny)
        return rel * jnp.power(n, alpha)

    return score


# ---------------------------------------------------------------------------------------
# First-order Taylor
# ---------------------------------------------------------------------------------------


def taylor(loss_fn: Callable[[Any, Any], jax.Array], params, batches: Iterable):
    """First-order Taylor importance ``mean over batches of |W * dL/dW|``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: a pytree of floating arrays (linen params, nnx ``State``).
      batches: an iterable of batches.

    Returns:
      A float32 pytree like ``params``, usable as ``score=`` in :func:`hinm_jax.prune`.

    Example:
        >>> params = {"w": jnp.array([[1.0, -2.0]])}
        >>> loss = lambda p, x: jnp.sum(x @ p["w"])
        >>> taylor(loss, params, [jnp.array([[3.0]])])["w"].tolist()
        [[3.0, 6.0]]
    """

    @jax.jit
    def step(acc, params, batch):
        grads = jax.grad(loss_fn)(params, batch)
        return jax.tree.map(lambda a, w, g: a + jnp.abs(jnp.asarray(w, jnp.float32) * jnp.asarray(g, jnp.float32)), acc, params, grads)

    acc = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
    n = 0
    for batch in batches:
        acc = step(acc, params, batch)
        n += 1
    if n == 0:
        raise ValueError("batches: no batch given")
    return jax.tree.map(lambda a: a / n, acc)
