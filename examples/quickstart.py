"""Quickstart: prune a small Flax model to HiNM 75%, see what was kept, run it sparse.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

import hinm_jax


class MLP(nn.Module):
    widths: tuple = (512, 512, 256)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.classes)(x)


def main():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (64, 784))
    params = model.init(jax.random.key(0), x)["params"]

    pattern = hinm_jax.HiNM(vector_size=32, vector_sparsity=0.5, n=2, m=4)
    print(f"pattern {pattern}: density {pattern.density(512):.2f} on K=512")
    masks = hinm_jax.prune(params, pattern)
    print(hinm_jax.summary(params, masks, pattern))

    sparse = hinm_jax.compress(params, masks)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        sparse, is_leaf=lambda l: isinstance(l, hinm_jax.SparseWeight)
    )[0]:
        if isinstance(leaf, hinm_jax.SparseWeight):
            name = "/".join(str(k.key) for k in path)
            print(
                f"{name:<20} {str(leaf.shape):<12} values {leaf.values.shape}, "
                f"fp16 size {leaf.compression_ratio('float16'):.3f}x dense"
            )

    # The unmodified model runs its compressed Dense layers through sparse_matmul.
    masked = hinm_jax.apply_masks(params, masks)
    want = model.apply({"params": masked}, x)
    with hinm_jax.sparse_inference():
        got = jax.jit(model.apply)({"params": sparse}, x)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    print(f"sparse inference vs masked dense: max rel err {err:.2e} (implementations here: "
          f"{', '.join(hinm_jax.available_implementations())})")
    assert err < 1e-5, err


if __name__ == "__main__":
    main()
