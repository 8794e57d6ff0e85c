"""Builds the MiniLM demo's task evaluation and its general-English corpus from WordNet 3.0.

Source: Princeton WordNet 3.0 as Debian ships it (``apt-get install wordnet-base``,
files ``/usr/share/wordnet/data.{noun,verb,adj,adv}``), licence "WordNet 3.0"
(BSD-style; the text is in ``examples/data/LICENSE.wordnet``). Every gloss in WordNet was
written by its lexicographers: a definition, often followed by example sentences in
double quotes (``a flat float; "we paddled the raft to shore"``).

Two outputs, from disjoint sets of synsets (no synset, and no sentence, in both):

- ``examples/data/wordnet_eval.tsv``: the task. ``EVAL_SYNSETS`` synsets drawn at random
  (seed 0) among those with a definition of at least 3 words and an example of at least
  4 words; one row per synset: ``pos``, ``offset`` (WordNet's synset id), ``lemma`` (its
  first word), ``example`` (its first such example), ``definition``. Task: given the
  example, retrieve the synset's definition among all the definitions in the file
  (recall@1, MRR; the labels, which example illustrates which definition, are the
  lexicographers'). Several senses of one word are often in the pool, so it tests
  word-sense understanding, not only topic.
- ``examples/data/wordnet_corpus.txt``: distillation and calibration sentences: the
  definitions and examples of the other synsets, deduplicated, with every line that also
  occurs in the evaluation file (case- and space-insensitive) removed, shuffled (seed 0),
  cut to ``CORPUS_BYTES``.

Usage::

    apt-get install wordnet-base
    python scripts/make_wordnet_data.py [--wordnet /usr/share/wordnet] [--check]

``--check`` rebuilds in memory and verifies that the committed files are what this
script makes and that they share no sentence and no synset.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
EVAL_FILE = DATA / "wordnet_eval.tsv"
CORPUS_FILE = DATA / "wordnet_corpus.txt"
EVAL_SYNSETS = 2000
CORPUS_BYTES = 3_000_000
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_QUOTED = re.compile(r'"([^"]+)"')


def normalise(s: str) -> str:
    """The key under which two lines count as the same sentence."""
    return " ".join(s.lower().split())


def _clean(s: str) -> str:
    s = " ".join(s.replace("\t", " ").split()).strip(" ;")
    return s if s.isascii() else ""


def read_synsets(wordnet: Path) -> list[dict]:
    """``[{pos, offset, lemma, definition, examples}]`` in file order."""
    out = []
    for name, pos in POS.items():
        for line in (wordnet / f"data.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            lemma = fields[4].replace("_", " ")
            lemma = re.sub(r"\([a-z]+\)$", "", lemma)  # adjective markers: (a), (p), (ip)
            first_quote = gloss.find('"')
            definition = _clean(gloss if first_quote < 0 else gloss[:first_quote])
            examples = [_clean(e) for e in _QUOTED.findall(gloss)]
            out.append({
                "pos": pos, "offset": fields[0], "lemma": lemma, "definition": definition,
                "examples": [e for e in examples if e],
            })
    return out


def build(wordnet: Path) -> tuple[list[tuple[str, ...]], list[str]]:
    synsets = read_synsets(wordnet)
    eligible = [
        i for i, s in enumerate(synsets)
        if len(s["definition"].split()) >= 3 and any(len(e.split()) >= 4 for e in s["examples"])
    ]
    rng = random.Random(0)
    chosen = sorted(rng.sample(eligible, EVAL_SYNSETS))
    rows, seen_defs = [], set()
    for i in chosen:
        s = synsets[i]
        if normalise(s["definition"]) in seen_defs:  # two synsets with one definition: ambiguous
            continue
        seen_defs.add(normalise(s["definition"]))
        example = next(e for e in s["examples"] if len(e.split()) >= 4)
        rows.append((s["pos"], s["offset"], s["lemma"], example, s["definition"]))
    held = {normalise(x) for r in rows for x in r[3:]}
    chosen_set = set(chosen)
    lines, seen = [], set(held)
    for i, s in enumerate(synsets):
        if i in chosen_set:
            continue
        for text in [s["definition"], *s["examples"]]:
            key = normalise(text)
            if len(text.split()) >= 3 and key not in seen:
                seen.add(key)
                lines.append(text)
    rng.shuffle(lines)
    corpus, size = [], 0
    for text in lines:
        size += len(text) + 1
        if size > CORPUS_BYTES:
            break
        corpus.append(text)
    return rows, corpus


def check_disjoint(rows, corpus) -> None:
    """No evaluation sentence (example or definition) is a corpus line."""
    held = {normalise(x) for r in rows for x in r[3:]}
    shared = [c for c in corpus if normalise(c) in held]
    if shared:
        raise AssertionError(f"{len(shared)} corpus lines are evaluation sentences, e.g. {shared[:3]}")


def write(rows, corpus) -> None:
    header = "pos\toffset\tlemma\texample\tdefinition\n"
    EVAL_FILE.write_text(header + "".join("\t".join(r) + "\n" for r in rows))
    CORPUS_FILE.write_text("".join(c + "\n" for c in corpus))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--check", action="store_true", help="verify the committed files instead of writing")
    args = ap.parse_args(argv)
    rows, corpus = build(args.wordnet)
    check_disjoint(rows, corpus)
    if args.check:
        assert EVAL_FILE.read_text() == "pos\toffset\tlemma\texample\tdefinition\n" + "".join("\t".join(r) + "\n" for r in rows)
        assert CORPUS_FILE.read_text() == "".join(c + "\n" for c in corpus)
        print("committed files match; disjoint")
        return
    write(rows, corpus)
    print(f"{EVAL_FILE.relative_to(ROOT)}: {len(rows)} (example, definition) pairs, {EVAL_FILE.stat().st_size} bytes")
    print(f"{CORPUS_FILE.relative_to(ROOT)}: {len(corpus)} lines, {CORPUS_FILE.stat().st_size} bytes")


if __name__ == "__main__":
    main()
