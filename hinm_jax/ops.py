"""``sparse_matmul``: ``x @ W`` with ``W`` in the compressed format, on every backend.

Implementations, tried in this order by the default dispatch:

- ``"cuda"``: the ``mma.sp`` kernel behind ``jax.ffi`` (NVIDIA GPU, compute capability
  >= 8.0, library built by nvcc);
- ``"pallas"``: the Pallas kernel (GPU; on CPU only when asked for, in interpret mode);
- ``"cpu"``: the CPU kernel behind ``jax.ffi`` (CPU backend);
- ``"xla"``: the pure-jnp reference (:mod:`hinm_jax._xla`), the test oracle of every
  backend.

The default order is ``cuda, pallas, xla`` on a GPU and ``cpu, xla`` on a CPU. A backend
whose adapter module cannot be imported, or whose ``is_available()`` is false, is
skipped; one that cannot run a given shape or dtype raises ``NotImplementedError`` and
the default dispatch falls through to the next one.

A backend is an adapter module registered in ``_BACKENDS`` with ``NAME``,
``is_available() -> bool``, ``pack(w) -> pytree | None`` (its own copy of the arrays,
stored by :func:`pack_for`) and ``matmul(x2d, w, bias=None, activation=None)``; optionally
``ffn(x2d, w1, w2, bias1, bias2, activation)``, a feed-forward block of two products in one
call (:func:`sparse_ffn`), and ``matmuls(x2d, ws, biases, activations)``, several products of
one input in one call (:func:`sparse_matmuls`): ``"cpu"`` has both.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 128))}
    >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:32:0.5:2:4"))["w"]
    >>> x = jnp.ones((4, 256))
    >>> bool(jnp.allclose(hinm_jax.sparse_matmul(x, sw), x @ sw.densify(), rtol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _activation, _xla
from hinm_jax._tree import map_with_path
from hinm_jax.format import SparseWeight

__all__ = [
    "default_implementation",
    "sparse_matmul",
    "sparse_ffn",
    "sparse_matmuls",
    "reference_matmul",
    "available_implementations",
    "pack_for",
    "backend_module",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("cuda", "pallas", "cpu", "xla")
_BACKENDS = {"cuda": "hinm_jax._cuda", "pallas": "hinm_jax._pallas", "cpu": "hinm_jax._cpu"}
_ORDER = {"gpu": ("cuda", "pallas", "xla"), "cpu": ("cpu", "xla")}

reference_matmul = _xla.matmul
"""The pure-jnp reference ``x @ w.densify()`` for ``x`` of shape ``(T, K)``: the same
function as :func:`hinm_jax._xla.matmul`."""


def backend_module(name: str):
    """The adapter module of a kernel backend (``"cuda"``, ``"pallas"`` or ``"cpu"``);
    raises ``ImportError`` when it cannot be imported here."""
    if name not in _BACKENDS:
        raise ValueError(f"implementation={name!r}: expected one of {sorted(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name])


def _kernel_backend(name: str):
    """The adapter module, or ``None`` if it cannot even be imported here."""
    try:
        return backend_module(name)
    except ImportError:
        return None


def _runs_here(name: str) -> bool:
    if name == "xla":
        return True
    mod = _kernel_backend(name)
    return mod is not None and mod.is_available()


def available_implementations() -> tuple[str, ...]:
    """The implementations that can run on jax's default backend here, in dispatch
    order. ``"pallas"`` is listed on CPU too: it runs there in interpret mode (slow,
    for testing)."""
    return tuple(name for name in IMPLEMENTATIONS if _runs_here(name))


def default_implementation() -> str:
    """The implementation the default dispatch tries first here: the first kernel backend
    of this platform's order that runs (``"cpu"`` on a CPU whose compiler built the
    kernel; ``"cuda"`` or ``"pallas"`` on a GPU), else ``"xla"``."""
    return next(name for name in _ORDER.get(jax.default_backend(), ("xla",)) + ("xla",) if _runs_here(name))


def pack_for(params, implementation: str | None = None):
    """Adds a backend's packed copy to every :class:`~hinm_jax.format.SparseWeight` in
    ``params``, once, so that :func:`sparse_matmul` does not repack on every call.
    Every weight is checked first (:meth:`~hinm_jax.format.SparseWeight.validate`, all
    checks on concrete arrays), naming its path.

    Args:
      params: a pytree holding :class:`~hinm_jax.format.SparseWeight` leaves (e.g. the
        output of :func:`hinm_jax.compress`).
      implementation: the backend to pack for; ``None`` packs for
        :func:`default_implementation` (``"xla"`` needs no packing).

    Example:
        >>> sparse = hinm_jax.pack_for(hinm_jax.compress(params, masks))  # doctest: +SKIP
    """
    if implementation is None:
        implementation = default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    mod = None if implementation == "xla" else backend_module(implementation)

    def one(path, leaf):
        if not isinstance(leaf, SparseWeight):
            return leaf
        leaf.validate(path or "w")
        if mod is None:
            return leaf
        return dataclasses.replace(leaf, packed=mod.pack(leaf), packed_for=implementation)

    return map_with_path(one, params, is_leaf=lambda x: isinstance(x, SparseWeight))


def _check(x, w, bias, wname: str = "w", bname: str = "bias", xname: str = "x") -> None:
    """Checks ``w`` and that ``x`` (``xname``) and ``bias`` fit it, naming each as the caller does."""
    if not isinstance(w, SparseWeight):
        raise TypeError(f"{wname}: expected a SparseWeight (from hinm_jax.compress), got {type(w).__name__}")
    w.validate(wname)
    if w.stack_axes:
        raise ValueError(
            f"{wname}: shape={w.shape} pattern {w.pattern} has stack_axes={w.stack_axes}: sparse_matmul "
            "takes one matrix; map over the stack (e.g. jax.vmap or lax.scan)"
        )
    k, o = w.matrix_shape
    if len(x.shape) < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{xname}: shape={tuple(x.shape)} does not match {wname}: shape={w.shape} (K={k}, O={o}) pattern {w.pattern}"
        )
    if bias is not None and tuple(np.shape(bias)) != (o,):
        raise ValueError(
            f"{bname}: shape={tuple(np.shape(bias))} does not match {wname}: shape={w.shape} (O={o}) pattern "
            f"{w.pattern}: expected ({o},)"
        )


def _names(implementation: str | None) -> tuple[str, ...]:
    """The implementations to try, in order."""
    if implementation is None:
        return tuple(n for n in _ORDER.get(jax.default_backend(), ("xla",)) if _runs_here(n))
    if implementation in IMPLEMENTATIONS:
        return (implementation,)
    raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS} or None")


def sparse_matmul(x, w: SparseWeight, *, bias=None, activation: str | None = None, implementation: str | None = None):
    """``activation(x @ densify(w) (+ bias))`` for ``x`` of shape ``(..., K)``.

    Args:
      x: activations ``(..., K)``; leading dims are flattened.
      w: a :class:`~hinm_jax.format.SparseWeight` with no stack axes (a conv kernel
        multiplies flattened patches: ``K = kh*kw*I``).
      bias: optional ``(O,)`` added to the output.
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact, through erf), applied after
        the bias. The ``"cpu"`` kernel applies it to each output as it writes it (no
        separate pass over the output); the other implementations after their product.
      implementation: ``"cuda"``, ``"pallas"``, ``"cpu"``, ``"xla"`` or ``None`` (the
        best that runs here, in the order of the module docstring).

    Returns:
      ``(..., O)`` in ``x``'s dtype (promoted with ``w``'s); fp16/bf16 accumulate in fp32.

    Raises:
      TypeError: ``activation`` is not a string or ``None``.
      ValueError: ``w`` is not a :class:`~hinm_jax.format.SparseWeight`, ``x`` or
        ``bias`` does not match ``w``, ``activation`` is unknown, or ``w`` is broken. ``w`` is
        checked with :meth:`~hinm_jax.format.SparseWeight.validate` on every call: on
        concrete arrays (eagerly, or closed over by a traced function) every check runs
        and a damaged weight never gives a wrong product; on arrays traced under
        ``jax.jit`` only shapes and dtypes are checked (``row_perm`` being a
        permutation, ``vector_index`` ranges and distinctness, and the metadata
        positions are not).

    Example:
        >>> y = hinm_jax.sparse_matmul(jnp.ones((2, 3, 256)), sw)  # doctest: +SKIP
    """
    x = jnp.asarray(x)
    _check(x, w, bias)
    _activation.check(activation, f"w: shape={w.shape} pattern {w.pattern}")
    return _matmul(x, w, bias, activation, implementation)


def _matmul(x, w: SparseWeight, bias, activation, implementation):
    """:func:`sparse_matmul` of arguments already checked (``_check``, the activation's)."""
    k, o = w.matrix_shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = None
    for name in _names(implementation):
        if name == "xla":
            y = reference_matmul(x2, w)
            break
        mod = _kernel_backend(name)
        if mod is None or not mod.is_available():
            raise ValueError(
                f"implementation={name!r} cannot run here (backend {jax.default_backend()}); "
                f"available: {available_implementations()}"
            )
        try:
            # kernels may fuse the bias and the activation
            return mod.matmul(x2, w, bias=bias, activation=activation).reshape(lead + (o,))
        except NotImplementedError:
            if implementation is not None:
                raise
    y = y.reshape(lead + (o,))
    if bias is not None:
        y = (y + bias).astype(y.dtype)
    return _activation.apply(activation, y)


def _in_one_call(implementation: str | None, method: str, *args, **kwargs):
    """The result of ``method`` (several products in one kernel call: ``"ffn"`` or ``"matmuls"``) of
    the first backend in the dispatch order that has it and can run this call, or ``None`` when none
    can (the caller then runs one product at a time, which names a backend that cannot run here)."""
    for name in _names(implementation):
        if name == "xla":
            return None
        mod = _kernel_backend(name)
        if mod is None or not mod.is_available() or not hasattr(mod, method):
            continue
        try:
            return getattr(mod, method)(*args, **kwargs)
        except NotImplementedError:
            continue  # one call cannot run these products
    return None


def sparse_ffn(
    x,
    w1: SparseWeight,
    w2: SparseWeight,
    *,
    bias1=None,
    bias2=None,
    activation: str | None = None,
    implementation: str | None = None,
):
    """A feed-forward block, ``activation(x @ densify(w1) + bias1) @ densify(w2) + bias2``, for
    ``x`` of shape ``(..., K)``: the same function as two :func:`sparse_matmul` calls, in one
    kernel call where a backend has one.

    The ``"cpu"`` kernel runs both layers in one call when ``x`` and the weights are float32
    (or both weights bfloat16) and there are enough tokens for its tokens schedule: the
    first layer's outputs go to the second in the kernel's own tile layout, a group of tokens
    at a time, instead of being written out whole and transposed back (the same sums in the
    same order: the result is that of two calls, bit for bit). Otherwise, and on the other
    implementations, it is two :func:`sparse_matmul` calls.

    Args:
      x: activations ``(..., K)``; leading dims are flattened.
      w1: the first layer, a :class:`~hinm_jax.format.SparseWeight` ``(K, H)``.
      w2: the second layer, ``(H, O)``.
      bias1, bias2: optional ``(H,)`` and ``(O,)``.
      activation: ``None``, ``"relu"`` or ``"gelu"`` (exact, through erf), applied to the
        first layer's outputs after ``bias1``.
      implementation: as :func:`sparse_matmul`'s (``None``: the best that runs here).

    Returns:
      ``(..., O)``, in the dtype two :func:`sparse_matmul` calls give.

    Raises:
      TypeError, ValueError: as :func:`sparse_matmul`, for either layer, naming it (``w1``,
        ``bias1``, ``w2``, ``bias2``); ``w2``'s ``K`` is not ``w1``'s ``O``.

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {"up": jax.random.normal(jax.random.key(0), (64, 256)),
        ...           "down": jax.random.normal(jax.random.key(1), (256, 64))}
        >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:32:0.5:2:4"))
        >>> x = jnp.ones((40, 64))
        >>> y = hinm_jax.sparse_ffn(x, sw["up"], sw["down"], activation="gelu")
        >>> h = jax.nn.gelu(x @ sw["up"].densify(), approximate=False)
        >>> bool(jnp.allclose(y, h @ sw["down"].densify(), rtol=1e-4, atol=1e-3))
        True
    """
    x = jnp.asarray(x)
    _check(x, w1, bias1, "w1", "bias1")
    hidden = jax.ShapeDtypeStruct(x.shape[:-1] + (w1.matrix_shape[1],), x.dtype)
    _check(hidden, w2, bias2, "w2", "bias2", xname=f"w1: shape={w1.shape}'s outputs")
    _activation.check(activation, f"w1: shape={w1.shape} pattern {w1.pattern}")
    lead, o = x.shape[:-1], w2.matrix_shape[1]
    x2 = x.reshape(-1, w1.matrix_shape[0])
    y = _in_one_call(implementation, "ffn", x2, w1, w2, bias1=bias1, bias2=bias2, activation=activation)
    if y is not None:
        return y.reshape(lead + (o,))
    y = _matmul(x, w1, bias1, activation, implementation)
    return _matmul(y, w2, bias2, None, implementation)


def sparse_matmuls(x, ws, *, biases=None, activations=None, implementation: str | None = None) -> tuple:
    """Several products of one input, ``activation_l(x @ densify(w_l) + bias_l)`` for each weight
    (an attention layer's query, key and value): the same as one :func:`sparse_matmul` per
    weight, in one kernel call where a backend has one.

    The ``"cpu"`` kernel runs up to 4 weights in one call when ``x`` and the weights are float32
    (or all weights bfloat16 in one layout) and there are enough tokens for its tokens
    schedule: ``x`` is transposed into its tiles once for all of them, and each result is the
    one :func:`sparse_matmul` gives, bit for bit. Otherwise, and on the other implementations,
    it is one :func:`sparse_matmul` per weight.

    Args:
      x: activations ``(..., K)``; leading dims are flattened.
      ws: a sequence of :class:`~hinm_jax.format.SparseWeight`, each ``(K, O_l)``.
      biases: ``None``, or one bias (``(O_l,)`` or ``None``) per weight.
      activations: ``None``, or one activation (``None``, ``"relu"``, ``"gelu"``) per weight.
      implementation: as :func:`sparse_matmul`'s.

    Returns:
      a tuple of ``(..., O_l)``, in the dtypes :func:`sparse_matmul` gives.

    Raises:
      TypeError, ValueError: as :func:`sparse_matmul`, for each weight, naming it (``ws[l]``,
        ``biases[l]``); ``biases`` or ``activations`` not one per weight.

    Example:
        >>> import jax, jax.numpy as jnp, hinm_jax
        >>> params = {n: jax.random.normal(jax.random.key(i), (64, 64)) for i, n in enumerate("qkv")}
        >>> sw = hinm_jax.compress(params, hinm_jax.prune(params, "hinm:32:0.5:2:4"))
        >>> q, k, v = hinm_jax.sparse_matmuls(jnp.ones((40, 64)), [sw["q"], sw["k"], sw["v"]])
        >>> bool(jnp.allclose(k, jnp.ones((40, 64)) @ sw["k"].densify(), rtol=1e-5, atol=1e-4))
        True
    """
    x = jnp.asarray(x)
    ws = tuple(ws)
    if not ws:
        raise ValueError("ws: expected at least one weight")
    biases = (None,) * len(ws) if biases is None else tuple(biases)
    activations = (None,) * len(ws) if activations is None else tuple(activations)
    for name, seq in (("biases", biases), ("activations", activations)):
        if len(seq) != len(ws):
            raise ValueError(f"{name}: {len(seq)} entries for {len(ws)} weights: expected one per weight")
    for i, (w, b, a) in enumerate(zip(ws, biases, activations)):
        _check(x, w, b, f"ws[{i}]", f"biases[{i}]")
        _activation.check(a, f"ws[{i}]: shape={w.shape} pattern {w.pattern}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, ws[0].matrix_shape[0])
    ys = _in_one_call(implementation, "matmuls", x2, ws, biases=biases, activations=activations)
    if ys is not None:
        return tuple(y.reshape(lead + (w.matrix_shape[1],)) for y, w in zip(ys, ws))
    return tuple(_matmul(x, w, b, a, implementation) for w, b, a in zip(ws, biases, activations))
