"""Gradual sparsity: how far each sparsity level is along, per step (optax schedules)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import optax

__all__ = ["SparsitySchedule", "gradual", "fraction"]


class SparsitySchedule(NamedTuple):
    """How far each sparsity level is along, per step (each an optax schedule).

    Each schedule maps the step count to a fraction in ``[0, 1]`` (clipped) of the
    pattern's target at that level, so one schedule serves layers with different
    patterns. ``None`` means "at target from step 0".

    Attributes:
      vector: the vector level (``HiNM``, ``VectorWise``: a block keeps
        ``floor(K·(1 − f·s)/m)·m`` inputs, at least its target ``K_v``) or the element
        level of ``Unstructured`` (it keeps ``round((1 − f·s)·size)``).
      nm: the N:M level (``HiNM``, ``NM``): a stripe of ``m`` keeps
        ``m − round(f·(m − n))`` values, so ``0`` is off and ``1`` is ``n:m``.

    Example:
        >>> import optax
        >>> s = SparsitySchedule(vector=optax.linear_schedule(0.0, 1.0, 100), nm=None)
        >>> float(s.vector(50))
        0.5
    """

    vector: Callable[[Any], Any] | None = None
    nm: Callable[[Any], Any] | None = None


def gradual(vector_steps: int, *, begin: int = 0, nm_steps: int = 0, power: float = 3.0) -> SparsitySchedule:
    """The hinm_sp order: the vector level ramps from 0 to its target over
    ``vector_steps`` (the cubic ramp of Zhu & Gupta for ``power=3``), then the N:M level
    switches on (at once, or linearly over ``nm_steps``; for 2:4 that is 4:4 → 3:4 → 2:4).

    Args:
      vector_steps: steps of the vector ramp.
      begin: step at which the ramp starts (dense before).
      nm_steps: steps of the N:M ramp after the vector ramp (0: switch on at once).
      power: exponent of the vector ramp ``1 − (1 − t/T)^power``.

    Example:
        >>> s = gradual(100, begin=10)
        >>> [float(s.vector(t)) for t in (0, 10, 110)], [float(s.nm(t)) for t in (109, 110)]
        ([0.0, 0.0, 1.0], [0.0, 1.0])
    """
    if vector_steps < 1 or begin < 0 or nm_steps < 0:
        raise ValueError(f"gradual: {vector_steps=}, {begin=}, {nm_steps=}: need vector_steps >= 1, begin >= 0, nm_steps >= 0")
    vector = optax.polynomial_schedule(0.0, 1.0, power=power, transition_steps=vector_steps, transition_begin=begin)
    start = begin + vector_steps
    if nm_steps:
        nm = optax.linear_schedule(0.0, 1.0, transition_steps=nm_steps, transition_begin=start)
    else:

        def nm(step):
            return (jnp.asarray(step) >= start).astype(jnp.float32)

    return SparsitySchedule(vector, nm)


def fraction(schedule, step):
    if schedule is None:
        return None
    return jnp.clip(jnp.asarray(schedule(step), jnp.float32), 0.0, 1.0)
