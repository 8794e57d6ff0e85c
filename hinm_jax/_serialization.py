"""``flax.serialization`` support for hinm_jax's pytree dataclasses, so that
``to_bytes`` / ``from_bytes`` / ``to_state_dict`` work on masks and compressed params as
they do on plain params (orbax needs nothing: it sees them as pytrees)."""

from __future__ import annotations

import dataclasses

from flax import serialization

from hinm_jax.format import SparseWeight
from hinm_jax.core import Layout
from hinm_jax.masks import Mask


def _data_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static", False)]


def _register(cls):
    names = _data_fields(cls)

    def to_state(obj):
        return {n: serialization.to_state_dict(getattr(obj, n)) for n in names}

    def from_state(target, state):
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"{cls.__name__}: the state dict has no {missing}")
        return dataclasses.replace(
            target, **{n: serialization.from_state_dict(getattr(target, n), state[n], name=n) for n in names}
        )

    serialization.register_serialization_state(cls, to_state, from_state, override=True)


for _cls in (SparseWeight, Mask, Layout):
    _register(_cls)
