"""Activations a sparse product can apply to its output (after the bias): the reference.

``sparse_matmul(x, w, bias=b, activation=a)`` is ``apply(a, x @ densify(w) + b)``. The
``"cpu"`` kernel applies it in its epilogue, while each output is in registers, instead of
a separate pass over the whole output (MiniLM-L6's feed-forward GELU: ``benchmarks/RESULTS.md``);
the other backends apply this reference after their product.

Example:
    >>> import jax.numpy as jnp
    >>> from hinm_jax import _activation
    >>> _activation.apply("relu", jnp.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
"""

from __future__ import annotations

import math

import jax
import numpy as np

__all__ = ["ACTIVATIONS", "check", "apply", "gelu"]

ACTIVATIONS = ("relu", "gelu")


def gelu(x):
    """Exact (erf) GELU, ``x * Phi(x)``, written with ``erf``.

    ``jax.nn.gelu(x, approximate=False)`` computes ``Phi`` through ``erfc``, which XLA:CPU
    evaluates much more slowly than ``erf``: 2.5-2.9 against 1.0-1.1 ms for a 2048 x 1536
    float32 array on two Zen 3 cores (``benchmarks/RESULTS.md``). The two forms differ by at
    most 2.4e-7 * max(1, |x|) in float32.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


_FUNCTIONS = {"relu": jax.nn.relu, "gelu": gelu}


def check(activation, where: str) -> None:
    """Raises ``TypeError`` / ``ValueError`` naming ``where`` unless ``activation`` is
    ``None`` or one of :data:`ACTIVATIONS`."""
    if activation is None:
        return
    if not isinstance(activation, str):
        raise TypeError(f"{where}: activation={activation!r}: expected None or one of {ACTIVATIONS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation={activation!r}: expected None or one of {ACTIVATIONS}")


def apply(activation: str | None, y):
    """``activation(y)`` (``y`` unchanged for ``None``), in ``y``'s dtype."""
    return y if activation is None else _FUNCTIONS[activation](y)
