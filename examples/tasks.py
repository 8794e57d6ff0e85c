"""Task-level evaluation for the MiniLM demo: WordNet example-to-definition retrieval.

``examples/data/wordnet_eval.tsv`` (built by ``scripts/make_wordnet_data.py`` from
Princeton WordNet 3.0, licence in ``examples/data/LICENSE.wordnet``) holds 2000 synsets,
each with one example sentence and its definition, both written by WordNet's
lexicographers. The task: embed every example and every definition; for each example,
rank all the definitions by cosine similarity; the right one is its own synset's.
Scores (x100): recall@1 and mean reciprocal rank (MRR, the headline figure). Several
senses of one word are often in the pool (``bank`` the institution and the slope), so a
model must read the sentence, not only match its topic.

The sentences of this file are disjoint from ``wordnet_corpus.txt`` (the demo's
distillation and calibration corpus): no synset and no sentence in both (checked by
``scripts/make_wordnet_data.py --check`` and by :func:`check_disjoint`).

Example:
    >>> rows = load_eval(50)
    >>> len(rows), sorted(rows[0])
    (50, ['definition', 'example', 'lemma', 'offset', 'pos'])
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
EVAL_FILE = DATA / "wordnet_eval.tsv"
CORPUS_FILE = DATA / "wordnet_corpus.txt"


def load_eval(n: int | None = None, *, seed: int = 0) -> list[dict]:
    """The evaluation rows; ``n`` a random subset (fixed by ``seed``), default all 2000."""
    with EVAL_FILE.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if n is not None and n < len(rows):
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        rows = [rows[i] for i in pick]
    return rows


def load_corpus() -> list[str]:
    """The general-English distillation/calibration corpus (shuffled WordNet glosses and
    examples of the synsets that are not in the evaluation)."""
    return [s for s in CORPUS_FILE.read_text().splitlines() if s.strip()]


def _key(s: str) -> str:
    return " ".join(s.lower().split())


def check_disjoint(sentences: Sequence[str], rows: Sequence[dict]) -> None:
    """Raises if a training sentence is one of the evaluation's examples or definitions."""
    held = {_key(r[c]) for r in rows for c in ("example", "definition")}
    shared = [s for s in sentences if _key(s) in held]
    if shared:
        raise ValueError(f"{len(shared)} training sentences are evaluation sentences, e.g. {shared[:2]}")


def retrieval(encode: Callable[[list[str]], np.ndarray], rows: Sequence[dict]) -> dict:
    """Example-to-definition retrieval among all definitions of ``rows``.

    Args:
      encode: sentences -> ``(n, d)`` embeddings (normalised here).
      rows: from :func:`load_eval`.

    Returns:
      ``{"mrr": ..., "recall@1": ..., "recall@10": ..., "pool": n}``, scores x100.
    """
    examples = [r["example"] for r in rows]
    definitions = [r["definition"] for r in rows]
    emb = np.asarray(encode(examples + definitions), np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q, d = emb[: len(rows)], emb[len(rows) :]
    sim = q @ d.T
    right = np.diag(sim)
    rank = np.sum(sim >= right[:, None], axis=1)  # 1 = best; ties count against the model
    return {
        "mrr": float(100 * np.mean(1.0 / rank)),
        "recall@1": float(100 * np.mean(rank == 1)),
        "recall@10": float(100 * np.mean(rank <= 10)),
        "pool": len(rows),
    }
