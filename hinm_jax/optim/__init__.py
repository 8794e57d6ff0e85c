"""Sparse training with optax: straight-through masks, SR-STE, mask refresh, gradual sparsity.

The dense weights stay in ``params`` for the whole run; the masks live in the optimizer
state (so they checkpoint and shard with it). Inside the loss, :func:`ste_apply` gives
the forward pass ``W * mask`` and passes the gradient to the dense ``W`` unmasked
(straight-through). :func:`sparsify` wraps any ``optax.GradientTransformation`` and

- adds SR-STE's ``λ·(1−mask)·W`` to the gradient (Zhou et al., ICLR 2021), as an option;
- recomputes the masks from the current weights every ``refresh_every`` steps, under
  ``lax.cond`` (one ``jax.jit`` for the whole train step, no host round trip);
- follows a :class:`SparsitySchedule` (optax schedules) for gradual sparsity: the vector
  level ramps from 0 to its target, then N:M switches on (:func:`gradual`), or any
  schedule of the two levels.

At the end, :func:`final_params` (``apply_masks`` with the state's masks) makes the
weights exactly sparse for :func:`hinm_jax.compress`.

Re-running the permutation search (OCP/IVP/2CP, eager numpy/scipy) is deliberately
outside the jitted step: call :func:`repermute` between steps when you want a new
layout; it replaces the masks in the state.

Modules: :mod:`~hinm_jax.optim.transform` (:func:`sparsify`), :mod:`~hinm_jax.optim.mask_refresh`
(:func:`refresh`), :mod:`~hinm_jax.optim.schedule` (:class:`SparsitySchedule`,
:func:`gradual`), :mod:`~hinm_jax.optim.state` (reading and replacing the masks,
:func:`repermute`), :mod:`~hinm_jax.optim.sharding` (:func:`state_sharding`).
:func:`ste_apply` lives in :mod:`hinm_jax.masks`.

Multi-device and multi-host: nothing here communicates. Shard ``params``, the batch and
the optimizer state with ``jax.sharding`` (:func:`state_sharding` gives the masks and
params-shaped moments the params' shardings) and ``jax.jit`` inserts the collectives;
on several hosts call ``jax.distributed.initialize()`` first and build the mesh over
``jax.devices()`` as usual.

Example:
    >>> import jax, jax.numpy as jnp, optax, hinm_jax
    >>> from hinm_jax import optim
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    >>> tx = optim.sparsify(optax.sgd(0.1), hinm_jax.HiNM(16, 0.5, 2, 4), sr_ste=True,
    ...                     refresh_every=10)
    >>> state = tx.init(params)
    >>> def loss(p, masks):
    ...     return jnp.sum(optim.ste_apply(p, masks)["w"] ** 2)
    >>> @jax.jit
    ... def step(params, state):
    ...     grads = jax.grad(loss)(params, optim.get_masks(state))
    ...     updates, state = tx.update(grads, state, params)
    ...     return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state)
    >>> float(jnp.mean(optim.final_params(params, state)["w"] != 0))
    0.25
"""

from hinm_jax.masks import ste_apply
from hinm_jax.optim.mask_refresh import refresh
from hinm_jax.optim.schedule import SparsitySchedule, gradual
from hinm_jax.optim.sharding import state_sharding
from hinm_jax.optim.state import SparsityState, final_params, get_masks, repermute, set_masks
from hinm_jax.optim.transform import SR_STE_LAMBDA, sparsify

__all__ = [
    "ste_apply",
    "sparsify",
    "SparsityState",
    "SparsitySchedule",
    "gradual",
    "get_masks",
    "set_masks",
    "final_params",
    "refresh",
    "repermute",
    "state_sharding",
    "SR_STE_LAMBDA",
]
