"""Train-step time of sparse fine-tuning vs the same step dense, on CPU.

Sparse: ``ste_apply`` in the loss + ``optim.sparsify(adam, sr_ste=True,
refresh_every=100)`` (SR-STE and an in-graph mask refresh every 100 steps, HiNM(32, 0.5,
2:4)). Dense: the same model, loss and adam, without masks. Each timed run is 100 jitted
steps (params and state donated) from the same start, so exactly one refresh, called from
a Python loop as in a real training script. Medians of interleaved runs, as wall time and
as the process's CPU time (all threads; robust to other load on a shared machine).
Target: overhead <= 15%.

Run: python benchmarks/train_step.py [--steps 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import hinm_jax
from hinm_jax import optim

from _timing import machine

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

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def dense_step(params, state):
        grads = jax.grad(xent)(params)
        updates, state = dense_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sparse_tx = optim.sparsify(optax.adam(1e-3), PATTERN, sr_ste=True, refresh_every=refresh_every)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sparse_step(params, state):
        masks = optim.get_masks(state)
        grads = jax.grad(lambda p: xent(optim.ste_apply(p, masks)))(params)
        updates, state = sparse_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def loop(step, state0):
        def run():
            p, s = jax.tree.map(jnp.copy, (params, state0))  # fresh buffers to donate
            for _ in range(steps):
                p, s = step(p, s)
            return p, s

        return run

    dense_state = dense_tx.init(params)
    sparse_state = jax.jit(sparse_tx.init)(params)
    return loop(dense_step, dense_state), loop(sparse_step, sparse_state)


def interleaved(fns: dict, *, repeats: int, warmup: int = 1):
    """Median wall and CPU seconds of each zero-argument function, runs interleaved."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f())
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = lambda d: {k: float(np.median(v)) for k, v in d.items()}
    return med(wall), med(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run (one refresh per 100)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"# train step, sparse (STE + SR-STE + refresh every 100) vs dense; {machine()}")
    print(
        f"{'model':<36} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6} {'overhead':>9}"
        f" | {'cpu: dense ms':>13} {'sparse ms':>10} {'ratio':>6} {'overhead':>9} | {'refresh ms':>10}"
    )
    for name, (model, k, batch) in MODELS.items():
        kx, ky, kp = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, k))
        y = jax.random.randint(ky, (batch,), 0, model.classes)
        params = model.init(kp, x[:1])["params"]
        dense, sparse = make_steps(model, params, x, y, args.steps)
        wall, cpu = interleaved({"dense": dense, "sparse": sparse}, repeats=args.repeats)
        # the cost of one refresh: steps that always refresh vs steps that never do
        _, always = make_steps(model, params, x, y, 10, refresh_every=1)
        _, never = make_steps(model, params, x, y, 10, refresh_every=10**9)
        r, _ = interleaved({"always": always, "never": never}, repeats=args.repeats)
        refresh = (r["always"] - r["never"]) / 10
        row = [name]
        for t in (wall, cpu):
            d, s = t["dense"] / args.steps, t["sparse"] / args.steps
            row.append(f"{d * 1e3:>9.3f} {s * 1e3:>10.3f} {s / d:>6.3f} {100 * (s / d - 1):>8.1f}%")
        print(f"{row[0]:<36} {row[1]} | {row[2]:>13} | {refresh * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
