"""Train-step time of sparse fine-tuning vs the same step dense, on CPU.

Sparse: ``ste_apply`` in the loss + ``optim.sparsify(adam, sr_ste=True,
refresh_every=100)`` (SR-STE and an in-graph mask refresh every 100 steps, HiNM(32, 0.5,
2:4)). Dense: the same model, loss and adam, without masks. Each timed run is 100 jitted
steps from the same start (so exactly one refresh), called from a Python loop as in a
real training script; medians of interleaved runs. Target: overhead <= 15%.

Run: python benchmarks/train_step.py [--steps 100] [--repeats 7]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import hinm_jax
from hinm_jax import optim

from _timing import block, interleaved, machine

PATTERN = hinm_jax.HiNM(32, 0.5, 2, 4)


class MLP(nn.Module):
    widths: tuple
    classes: int

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.classes)(x)


MODELS = {
    # the example's model (examples/finetune_classifier.py) and batch
    "digits MLP 64-256-256-10, batch 64": (MLP((256, 256), 10), 64, 64),
    # 4 layers of 1024x1024 (the head is the 4th), batch 256
    "MLP 4 x 1024x1024, batch 256": (MLP((1024, 1024, 1024), 1024), 1024, 256),
}


def make_steps(model, params, x, y, steps, refresh_every=100):
    def xent(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    dense_tx = optax.adam(1e-3)

    @jax.jit
    def dense_step(params, state):
        grads = jax.grad(xent)(params)
        updates, state = dense_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sparse_tx = optim.sparsify(optax.adam(1e-3), PATTERN, sr_ste=True, refresh_every=refresh_every)

    @jax.jit
    def sparse_step(params, state):
        masks = optim.get_masks(state)
        grads = jax.grad(lambda p: xent(optim.ste_apply(p, masks)))(params)
        updates, state = sparse_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def loop(step, state0):
        def run():
            p, s = params, state0
            for _ in range(steps):
                p, s = step(p, s)
            return p, s

        return run

    dense_state = dense_tx.init(params)
    sparse_state = jax.jit(sparse_tx.init)(params)
    return loop(dense_step, dense_state), loop(sparse_step, sparse_state), sparse_tx, sparse_step, sparse_state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run (one refresh per 100)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"# train step, sparse (STE + SR-STE + refresh every 100) vs dense; {machine()}")
    print(f"{'model':<36} {'dense ms':>9} {'sparse ms':>10} {'ratio':>7} {'overhead':>9} {'refresh ms':>11}")
    for name, (model, k, batch) in MODELS.items():
        kx, ky, kp = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, k))
        y = jax.random.randint(ky, (batch,), 0, model.classes)
        params = model.init(kp, x[:1])["params"]
        dense, sparse, tx, sparse_step, state0 = make_steps(model, params, x, y, args.steps)
        t = interleaved({"dense": dense, "sparse": sparse}, repeats=args.repeats, warmup=1)
        d, s = t["dense"] / args.steps, t["sparse"] / args.steps
        # the cost of one refresh: a step that refreshes vs one that does not
        _, always, _, _, _ = make_steps(model, params, x, y, 10, refresh_every=1)
        _, never, _, _, _ = make_steps(model, params, x, y, 10, refresh_every=10**9)
        r = interleaved({"always": always, "never": never}, repeats=args.repeats, warmup=1)
        refresh = (r["always"] - r["never"]) / 10
        print(f"{name:<36} {d * 1e3:>9.3f} {s * 1e3:>10.3f} {s / d:>7.3f} {100 * (s / d - 1):>8.1f}% {refresh * 1e3:>11.2f}")
    block(params)


if __name__ == "__main__":
    main()
