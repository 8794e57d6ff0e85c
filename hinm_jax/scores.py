"""Importance scores: arrays shaped like the weight, higher means more important.

Example:
    >>> import jax.numpy as jnp
    >>> magnitude(jnp.array([[-2.0, 1.0]])).tolist()
    [[2.0, 1.0]]
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["magnitude"]


def magnitude(w):
    """``|W|`` in float32, the default importance."""
    return jnp.abs(jnp.asarray(w)).astype(jnp.float32)
