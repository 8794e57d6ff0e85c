"""Prune a Flax MLP on scikit-learn's digits to HiNM 75%, then recover with sparse fine-tuning.

Trains a dense MLP on the 8x8 digits bundled with scikit-learn (offline), prunes its
hidden layers to ``HiNM(32, 0.5, 2, 4)`` (75% sparsity) with and without the 2CP
permutation search, fine-tunes each with straight-through masks + SR-STE (masks in the
optax state, refreshed every 100 steps in the layout found by pruning), and also runs
gradual sparsity (vector level ramps, then 2:4 switches on) from the dense weights.
Prints dense / one-shot pruned / fine-tuned test accuracy for each and writes a plot of
test accuracy over fine-tuning steps.

Run:
    python examples/finetune_classifier.py            # full run (about a minute on 2 CPU cores)
    python examples/finetune_classifier.py --fast     # seconds: a smoke test

Needs ``scikit-learn`` (data), ``matplotlib`` (plot) and ``tqdm``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import hinm_jax
from hinm_jax import optim


class MLP(nn.Module):
    widths: tuple = (256, 256)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.classes)(x)


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def batches(x, y, batch_size, key):
    """An endless stream of shuffled minibatches (epochs of a fixed permutation each)."""
    n = len(x)
    while True:
        key, sub = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(sub, n))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


def make_eval(model, x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y) * 100.0

    return lambda params: float(accuracy(params))


def xent(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_dense(model, params, data, steps, lr, key):
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(model, p, x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    stream = batches(*data, 64, key)
    for _ in tqdm(range(steps), desc="dense", leave=False):
        params, state, _ = step(params, state, *next(stream))
    return params


def finetune(model, params, data, evaluate, *, steps, lr, eval_every, key, desc, **sparsify_kwargs):
    """Sparse fine-tuning: one jitted step (STE forward, SR-STE, masks refreshed in-graph).

    Returns the final masked params, the final masks and the curve [(step, test acc)].
    """
    tx = optim.sparsify(optax.adam(optax.cosine_decay_schedule(lr, steps)), sr_ste=True, **sparsify_kwargs)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, x, y):
        masks = optim.get_masks(state)
        loss, grads = jax.value_and_grad(lambda p: xent(model, optim.ste_apply(p, masks), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    sparse_eval = jax.jit(optim.final_params)
    curve = [(0, evaluate(sparse_eval(params, state)))]
    stream = batches(*data, 64, key)
    bar = tqdm(range(1, steps + 1), desc=desc, leave=False)
    for t in bar:
        params, state, loss = step(params, state, *next(stream))
        if t % eval_every == 0 or t == steps:
            curve.append((t, evaluate(sparse_eval(params, state))))
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{curve[-1][1]:.2f}")
    return optim.final_params(params, state), optim.get_masks(state), curve


def kept_importance(params, masks):
    """Fraction of sum |W| over the pruned layers that the masks keep."""
    num = den = 0.0
    for w, mk in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda m: isinstance(m, hinm_jax.Mask) or m is None)):
        if isinstance(mk, hinm_jax.Mask):
            num += float(jnp.sum(jnp.abs(w) * mk.mask))
            den += float(jnp.sum(jnp.abs(w)))
    return num / den


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="a few seconds: tiny model, few steps")
    ap.add_argument("--out", type=Path, default=Path("out/finetune_classifier"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-steps", type=int, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    args = ap.parse_args(argv)

    fast = args.fast
    widths = (64, 64) if fast else (256, 256)
    dense_steps = args.dense_steps or (150 if fast else 3000)
    ft_steps = args.finetune_steps or (40 if fast else 2000)
    eval_every = 10 if fast else 50
    pattern = hinm_jax.HiNM(32, 0.5, 2, 4)

    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    model = MLP(widths)
    key = jax.random.key(args.seed)
    k_init, k_dense, k_ft, k_perm = jax.random.split(key, 4)
    params = model.init(k_init, jnp.zeros((1, 64)))["params"]
    evaluate = make_eval(model, x_te, y_te)

    t0 = time.perf_counter()
    params = train_dense(model, params, (x_tr, y_tr), dense_steps, 3e-3, k_dense)
    dense_acc = evaluate(params)
    print(f"dense MLP {widths}: test accuracy {dense_acc:.2f}% ({dense_steps} steps, {time.perf_counter() - t0:.1f} s)")

    runs = {}
    variants = [("HiNM 75%", None), ("HiNM 75% + 2CP", "2cp")]
    for name, permute in variants:
        try:
            masks = hinm_jax.prune(params, pattern, permute=permute, key=k_perm)
        except ImportError as e:  # hinm_jax.permute not available in this checkout
            print(f"{name}: skipped ({e})")
            continue
        if not runs:
            print(hinm_jax.summary(params, masks, pattern))
        pruned_acc = evaluate(hinm_jax.apply_masks(params, masks))
        _, final_masks, curve = finetune(
            model, params, (x_tr, y_tr), evaluate, steps=ft_steps, lr=1e-3, eval_every=eval_every,
            key=k_ft, desc=name, masks=masks, refresh_every=100,
        )
        runs[name] = dict(
            pruned=pruned_acc, finetuned=curve[-1][1], curve=curve,
            kept=kept_importance(params, masks), density=float(final_masks["Dense_1"]["kernel"].density),
        )

    # gradual: from the dense weights, vector level ramps over the first half, then 2:4
    ramp = ft_steps // 2
    _, final_masks, curve = finetune(
        model, params, (x_tr, y_tr), evaluate, steps=ft_steps, lr=1e-3, eval_every=eval_every, key=k_ft,
        desc="gradual", pattern=pattern, refresh_every=max(1, ramp // 20),
        refresh_mode="vector", schedule=optim.gradual(ramp, nm_steps=ramp // 4),
    )
    runs["HiNM 75% gradual"] = dict(
        pruned=dense_acc, finetuned=curve[-1][1], curve=curve, kept=float("nan"),
        density=float(final_masks["Dense_1"]["kernel"].density),
    )

    print()
    print(f"{'model':<20} {'kept |W|':>9} {'one-shot':>9} {'fine-tuned':>11} {'vs dense':>9}")
    print(f"{'dense':<20} {'1.000':>9} {dense_acc:>8.2f}% {dense_acc:>10.2f}% {0.0:>+9.2f}")
    for name, r in runs.items():
        kept = "-" if np.isnan(r["kept"]) else f"{r['kept']:.3f}"
        one_shot = "-" if name.endswith("gradual") else f"{r['pruned']:.2f}%"
        print(f"{name:<20} {kept:>9} {one_shot:>9} {r['finetuned']:>10.2f}% {r['finetuned'] - dense_acc:>+9.2f}")
    best = runs.get("HiNM 75% + 2CP")
    if best is not None:
        met = best["finetuned"] >= dense_acc - 1.0
        print(f"target: fine-tuned HiNM 75% + 2CP within 1 point of dense: {'met' if met else 'MISSED'}")

    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(dense_acc, color="k", ls="--", lw=1, label=f"dense ({dense_acc:.2f}%)")
    for name, r in runs.items():
        steps, accs = zip(*r["curve"])
        ax.plot(steps, accs, marker="." if fast else None, label=f"{name} ({r['finetuned']:.2f}%)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP {widths}, HiNM(32, 0.5, 2:4) = 75% sparse, STE + SR-STE")
    ax.set_ylim(max(0.0, min(min(a for _, a in r["curve"]) for r in runs.values()) - 2), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    png = args.out / "accuracy.png"
    fig.savefig(png, dpi=120)
    (args.out / "results.json").write_text(
        json.dumps(dict(dense=dense_acc, widths=widths, dense_steps=dense_steps, finetune_steps=ft_steps, runs=runs), indent=1)
    )
    print(f"wrote {png} and {args.out / 'results.json'}")
    return dense_acc, runs


if __name__ == "__main__":
    main()
