"""Least-squares reconstruction of the kept weights, from calibration data.

Pruning by score throws away 75% of each layer's weights and leaves the rest as they
were. Given the mask, the kept weights that best reproduce the dense layer on real
inputs have a closed form: for each output column ``o`` with kept input rows ``S``,

    w_S = argmin ||X_s w_S - X_d w||^2 + λ ||w_S - w_S^dense||^2 = (H_SS + λI)^-1 (C w + λ w)_S,

with ``H = X_s^T X_s``, ``C = X_s^T X_d``, ``X_s`` the layer's inputs in the pruned model
and ``X_d`` in the dense one. This is the weight update of SparseGPT (Frantar & Alistarh,
2023) with the mask held fixed, so the HiNM structure found by :func:`hinm_jax.prune` (and
its 2CP permutation) is kept exactly. :func:`reconstruct` refits every masked ``Dense``
(linen) / ``Linear`` (nnx) layer of a model in the order the model calls them
(sequentially: each layer sees the outputs of the layers already refitted before it), the
bias with it, and returns new params; it is a good start for fine-tuning (see
``examples/minilm_demo.py``). :func:`solve` is the single-matrix step.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, hinm_jax
    >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(8)])
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> masks = hinm_jax.prune(params, hinm_jax.HiNM(32, 0.5, 2, 4), where=r"layers_0/kernel")
    >>> refit = reconstruct(model, params, masks, [x])
    >>> def err(p):
    ...     return float(jnp.mean((model.apply({"params": hinm_jax.apply_masks(p, masks)}, x)
    ...                            - model.apply({"params": params}, x)) ** 2))
    >>> err(refit) < err(params)
    True
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _capture
from hinm_jax._tree import map_with_path
from hinm_jax.masks import check_mask_shape, is_mask_leaf, named_leaves

__all__ = ["reconstruct", "solve", "call_order"]

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------
# One matrix
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kept", "chunk"))
def _solve(w, mask, gram, cross, damp, *, kept: int, chunk: int):
    k, o = w.shape
    scale = jnp.mean(jnp.diag(gram))
    scale = jnp.where(scale > 0, scale, 1.0)  # a layer that saw only zeros
    lam = (damp + 1e-7) * scale  # + a floor for rank-deficient data
    h = gram + lam * jnp.eye(k, dtype=gram.dtype)
    rhs = jnp.matmul(cross, w, precision=_HIGHEST) + lam * w  # ridge towards the dense weights
    # columns keeping fewer than `kept` rows (and the padding columns) fill their spare
    # slots with index K, a dummy row that is dropped, and an identity equation
    h = jnp.pad(h, ((0, 1), (0, 1)))
    pad_o = -o % chunk
    m = jnp.pad(mask, ((0, 0), (0, pad_o)))
    rhs = jnp.pad(rhs, ((0, 1), (0, pad_o)))
    order = jnp.argsort(~m, axis=0, stable=True)[:kept].T  # (O', kept) kept rows first
    valid = jnp.take_along_axis(m.T, order, axis=1)
    idx = jnp.where(valid, order, k)
    eye = jnp.eye(kept, dtype=h.dtype)

    def block(args):
        ii, vv, r = args  # (chunk, kept), (chunk, kept), (chunk, K + 1)
        both = vv[:, :, None] & vv[:, None, :]
        a = jnp.where(both, h[ii[:, :, None], ii[:, None, :]], eye)
        b = jnp.where(vv, jnp.take_along_axis(r, ii, axis=1), 0.0)
        x = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b[..., None])[..., 0]
        rows = jnp.arange(ii.shape[0])[:, None]
        return jnp.zeros((ii.shape[0], k + 1), w.dtype).at[rows, ii].set(x.astype(w.dtype))

    n = (o + pad_o) // chunk
    out = jax.lax.map(block, (idx.reshape(n, chunk, kept), valid.reshape(n, chunk, kept), rhs.T.reshape(n, chunk, k + 1)))
    return out.reshape(n * chunk, k + 1)[:o, :k].T


def solve(w, mask, gram, cross=None, *, damp: float = 0.01, chunk: int = 64) -> jax.Array:
    """The kept weights of one ``(K, O)`` kernel refit by least squares.

    For each output column ``o`` with kept rows ``S = mask[:, o]``:
    ``w_S = (H_SS + λI)^-1 (C w[:, o] + λ w[:, o])_S`` with ``H = gram``, ``C = cross``
    (default ``gram``: reproduce the layer on its own inputs) and ``λ = damp *
    mean(diag(H))`` (plus a 1e-7 floor): a ridge that pulls towards the dense weights, so
    that directions the data never excites keep their values. Pruned entries are 0. Any
    mask works (columns may keep different numbers of rows).

    Args:
      w: ``(K, O)`` dense kernel (``y = x @ w``).
      mask: ``(K, O)`` bool.
      gram: ``(K, K)``, ``X_s^T X_s`` over calibration inputs of the pruned model.
      cross: ``(K, K)``, ``X_s^T X_d`` (dense model's inputs on the right), or ``None``.
      damp: ridge term relative to the mean diagonal of ``gram`` (SparseGPT's 0.01).
      chunk: output columns solved at once (memory ``chunk * kept^2``).

    Returns:
      ``(K, O)``, zero where ``mask`` is False.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (512, 8))
        >>> w = jax.random.normal(jax.random.key(1), (8, 4))
        >>> mask = jnp.arange(8)[:, None] % 2 == jnp.arange(4) % 2
        >>> w2 = solve(w, mask, x.T @ x, damp=0.0)
        >>> bool(jnp.all(jnp.where(mask, True, w2 == 0)))
        True
        >>> bool(jnp.sum((x @ w2 - x @ w) ** 2) < jnp.sum((x @ (w * mask) - x @ w) ** 2))
        True
    """
    w = jnp.asarray(w)
    mask = jnp.asarray(mask, bool)
    if w.ndim != 2 or mask.shape != w.shape:
        raise ValueError(f"solve: w.shape={tuple(w.shape)} and mask.shape={tuple(mask.shape)} must be the same (K, O)")
    k = w.shape[0]
    gram = jnp.asarray(gram, jnp.float32)
    cross = gram if cross is None else jnp.asarray(cross, jnp.float32)
    if gram.shape != (k, k) or cross.shape != (k, k):
        raise ValueError(f"solve: gram.shape={tuple(gram.shape)} and cross.shape={tuple(cross.shape)} must be ({k}, {k})")
    if damp < 0:
        raise ValueError(f"solve: {damp=} must be >= 0")
    kept = max(int(np.max(np.sum(np.asarray(mask), axis=0))), 1)
    out = _solve(w.astype(jnp.float32), mask, gram, cross, jnp.float32(damp), kept=kept, chunk=min(chunk, w.shape[1]))
    return out.astype(w.dtype)


# ---------------------------------------------------------------------------------------
# Capturing the inputs of a model's dense layers
# ---------------------------------------------------------------------------------------


def _rows(x, weights, *, ones: bool):
    """``x`` as ``(rows, K)`` (``[x, 1]`` with ``ones``, for a bias), each row scaled by
    the square root of its weight."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if ones:
        x2 = jnp.concatenate([x2, jnp.ones_like(x2[:, :1])], 1)
    if weights is None:
        return x2
    w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), x.shape[:-1]).reshape(-1, 1)
    return x2 * jnp.sqrt(w)


def _runner(model, variables, call):
    """``run(params, batch, record)`` calling ``record(kernel path, x)`` for every dense layer."""
    run = _capture.runner(model, variables, call, wanted=lambda mod: _capture.layer_kind(mod) == "dense")

    def run_dense(params, batch, record):
        return run(params, batch, lambda mpath, mod, x: record(_capture.kernel_path(mpath), x))

    return run_dense


def call_order(model, params, batch, *, variables=None, call=None) -> list[list[str]]:
    """The kernel paths of the model's ``Dense`` / ``Linear`` layers in the order the model
    calls them, grouped into stages: consecutive layers that read the same input (a
    transformer's query, key and value) form one stage.

    Example:
        >>> import flax.linen as nn
        >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 3))
        >>> call_order(model, model.init(jax.random.key(0), x)["params"], x)
        [['layers_0/kernel'], ['layers_2/kernel']]
    """
    run = _runner(model, variables, call)
    stages: list[list[str]] = []
    last = [None]
    seen: set[str] = set()

    def record(path, x):
        if path in seen:
            return
        seen.add(path)
        if stages and x is last[0]:
            stages[-1].append(path)
        else:
            stages.append([path])
        last[0] = x

    jax.eval_shape(lambda p, b: run(p, b, record), params, batch)
    return stages


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


def reconstruct(
    model,
    params,
    masks,
    batches: Iterable,
    *,
    variables=None,
    call: Callable[[Callable, Any], Any] | None = None,
    row_weights: Callable[[Any], Any] | None = None,
    damp: float = 0.01,
    target: str = "dense",
    sequential: bool = True,
    fit_bias: bool = True,
    progress: bool = False,
):
    """Refits the kept weights of every masked dense layer by least squares on calibration
    data, so the pruned model reproduces the dense one as closely as its masks allow.

    Every masked leaf must be the kernel of a ``flax.linen.Dense`` or ``nnx.Linear`` the
    model calls. Layers are refit stage by stage in call order (:func:`call_order`):
    each stage's inputs come from the model with all earlier stages already refit. The
    masks, and so the pattern and its 2CP layout, are unchanged.

    Args:
      model: a linen module or an nnx module (its ``Param`` state is replaced by ``params``).
      params: the dense parameters (linen ``params`` collection, or ``nnx.state(model,
        nnx.Param)``); also the reference the refit reproduces.
      masks: from :func:`hinm_jax.prune` on ``params``.
      batches: calibration batches (iterated once per stage: a list).
      variables: linen only, other collections (``{"batch_stats": ...}``).
      call: ``call(f, batch)`` runs the model ``f`` on one batch; default ``f(batch)``.
      row_weights: ``row_weights(batch)`` gives a weight per input row, broadcast
        against the inputs' leading axes (e.g. a ``(B, T)`` attention mask, so that
        padding tokens do not count); default all 1.
      damp: ridge term relative to the mean diagonal of each Gram matrix.
      target: ``"dense"`` fits each layer's outputs to the dense model's (``C = X_s^T
        X_d``); ``"self"`` to the dense weights applied to the pruned model's own
        inputs (``C = X_s^T X_s``, SparseGPT).
      sequential: ``False`` refits all layers at once from the dense model's inputs
        (one pass over the data instead of one per stage).
      fit_bias: refit each layer's bias together with its kernel.
      progress: show a progress bar over stages.

    Returns:
      ``params`` with the masked kernels (zero where pruned) and their biases replaced.

    Raises:
      ValueError: ``masks`` not shaped like ``params`` (naming the first path that
        differs), a masked leaf that is not a called dense kernel, a bad ``target``.
    """
    if target not in ("dense", "self"):
        raise ValueError(f"reconstruct: {target=} must be 'dense' or 'self'")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: no calibration batch given")
    run = _runner(model, variables, call)
    leaves = named_leaves(params)
    masked = {}

    def note(path, m, w):
        if m is not None:
            check_mask_shape(path, m, w)
            masked[path] = m

    map_with_path(note, masks, params, is_leaf=is_mask_leaf, what="masks")  # the same structure as params
    for path, m in masked.items():
        if leaves[path].ndim != 2 or m.stack_axes:
            raise ValueError(f"{path}: shape={tuple(leaves[path].shape)} pattern={m.pattern}: reconstruct refits 2-d Dense kernels only")
    order = call_order(model, params, batches[0], variables=variables, call=call)
    called = {p for stage in order for p in stage}
    missing = sorted(set(masked) - called)
    if missing:
        raise ValueError(
            f"{missing[0]}: shape={tuple(leaves[missing[0]].shape)} pattern={masked[missing[0]].pattern}: "
            f"masked but not the kernel of a Dense/Linear layer the model calls ({len(missing)} such leaves)"
        )
    stages = [[p for p in s if p in masked] for s in order]
    stages = [s for s in stages if s]
    if not sequential:
        stages = [[p for s in stages for p in s]]

    current = dict(leaves)
    bias_of = {p: p[: -len("kernel")] + "bias" for p in masked}
    augment = {p: fit_bias and bias_of[p] in leaves for p in masked}

    def stats(cur, dense, batch, paths, cross):
        xs: dict[str, list] = {p: [] for p in paths}
        xd: dict[str, list] = {p: [] for p in paths}
        weights = None if row_weights is None else row_weights(batch)

        def recorder(store):
            def record(path, x):
                if path in store:
                    store[path].append(_rows(x, weights, ones=augment[path]))

            return record

        run(cur, batch, recorder(xs))
        if cross:
            run(dense, batch, recorder(xd))
        out = {}
        for p in paths:
            a = jnp.concatenate(xs[p], 0)
            h = jnp.matmul(a.T, a, precision=_HIGHEST)
            out[p] = (h, jnp.matmul(a.T, jnp.concatenate(xd[p], 0), precision=_HIGHEST) if cross else h)
        return out

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in stages), desc="reconstruct", unit="layer")
    for i, stage in enumerate(stages):
        cur_params = _with_leaves(params, current)
        # until a layer is refit the pruned model's inputs are the dense ones: C = H
        cross = target == "dense" and i > 0
        fn = jax.jit(functools.partial(stats, paths=tuple(stage), cross=cross))
        total = None
        for batch in batches:
            s = fn(cur_params, params, batch)
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        for path in stage:
            h, c = total[path]
            w = leaves[path]
            m = masked[path].mask
            if augment[path]:
                bias_path = bias_of[path]
                b = leaves[bias_path]
                w_aug = jnp.concatenate([w, b[None].astype(w.dtype)], 0)
                m_aug = jnp.concatenate([m, jnp.ones((1, m.shape[1]), bool)], 0)
                new = solve(w_aug, m_aug, h, c, damp=damp)
                current[path], current[bias_path] = new[:-1], new[-1].astype(b.dtype)
            else:
                new = current[path] = solve(w, m, h, c, damp=damp)
            if not bool(jnp.all(jnp.isfinite(new))):
                raise ValueError(
                    f"{path}: shape={tuple(w.shape)} pattern={masked[path].pattern}: the refit is not finite "
                    f"(inputs with inf/nan, or rank-deficient with {damp=}): raise damp"
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(path)
    if bar is not None:
        bar.close()
    return _with_leaves(params, current)


def _with_leaves(params, leaves: dict):
    return map_with_path(lambda path, leaf: leaves.get(path, leaf), params)
