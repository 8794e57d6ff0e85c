"""The fine-tuning example runs end to end (``--fast``) and writes its table and plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_classifier_fast(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_classifier.py"), "--fast", "--out", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fine-tuned" in r.stdout and "HiNM 75%" in r.stdout
    png = tmp_path / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dense"] > 50.0  # it learned something, even in a few steps
    run = results["runs"]["HiNM 75%"]
    assert run["density"] == 0.25
    assert run["finetuned"] >= run["pruned"] - 5.0  # fine-tuning does not wreck the pruned model
    assert "HiNM 75% gradual" in results["runs"]
    two_cp = results["runs"]["HiNM 75% + 2CP"]  # the permutation search ran
    assert two_cp["density"] == 0.25 and two_cp["kept"] >= run["kept"]
