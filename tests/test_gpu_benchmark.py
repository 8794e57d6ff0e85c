"""``benchmarks/spmm_gpu.py``: the budget it states, its exit status without a GPU, and its
check and timing code run on CPU with the ``cuda`` backend stood in for by the reference
(so a GPU window is not spent on a Python error). The GPU run itself is
``python benchmarks/spmm_gpu.py --quick`` on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "spmm_gpu.py"


def _load(argv):
    """The benchmark as a module, parsed with ``argv``."""
    old = sys.argv
    sys.argv = ["spmm_gpu.py", *argv]
    try:
        spec = importlib.util.spec_from_file_location("spmm_gpu_bench", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.argv = old
    return mod


def test_quick_plan_counts_fit_the_budget():
    """The --quick sweep is what the issue asks for, and its estimate (counted work x the
    stated unit costs) stays under the budget with a margin for the unmeasured costs."""
    bench = _load(["--quick"])
    plan = bench.make_plan(True, ["float16", "bfloat16"], [], False, False, False, False)
    timed = {(o, k, t, p) for o, k, t, _, p in plan.timing_cases}
    for o, k, t in [(4096, 4096, 16), (4096, 4096, 256), (4096, 4096, 4096), (1024, 4096, 1024)]:
        for p in ("dense", "2:4", "hinm32", "hinm64"):
            assert (o, k, t, p) in timed
    assert {c[3] for c in plan.check_cases} == {"float16", "bfloat16"}
    assert plan.pallas_checks == len(plan.check_cases) and plan.minilm and plan.archs == 1
    total, lines = plan.estimate()
    assert total <= 0.8 * bench.BUDGET_S, lines


def test_help_states_budget_and_estimate():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "Budget (--quick): under 300 s" in out
    assert "total (budget 300 s)" in out and "nvcc builds" in out


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a GPU is present")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "t.txt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA GPU is visible" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="runs the real kernels on a GPU instead")
def test_check_and_timing_code_runs_with_a_stand_in_backend(monkeypatch):
    """run_checks and run_timing end to end on CPU: cuda replaced by the reference, pallas
    in interpret mode. A planted error in the stand-in must be reported as a failure."""
    bench = _load(["--quick", "--min-time", "0.001", "--l2-bytes", "1"])
    from hinm_jax import _activation, _cuda, _xla

    def stand_in(x, w, bias=None, activation=None):
        y = _xla.matmul(x, w)
        return _activation.apply(activation, y if bias is None else (y + bias).astype(y.dtype))

    monkeypatch.setattr(_cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "matmul", stand_in)
    plan = bench.make_plan(True, ["float16", "bfloat16"], [], False, False, False, False)
    small = dataclasses.replace(
        plan,
        check_cases=plan.check_cases[:2],
        timing_cases=((128, 256, 16, "float16", "dense"), (128, 256, 16, "float16", "hinm64")),
    )
    rows = bench.run_checks(small, pallas=True)
    assert [r["pattern"] for r in rows] == ["hinm32", "hinm32"]
    assert all(r["cuda_err"] < 2e-3 and r["pallas_err"] < 2e-3 for r in rows)
    times = bench.run_timing(small, pallas=True)
    assert times[0]["pattern"] == "dense" and times[0]["us"] > 0
    assert times[1]["cuda_err"] < 2e-3 and times[1]["pallas_err"] < 2e-3 and times[1]["cuda_x"] > 0
    assert not bench.TALLY.failures, bench.TALLY.failures
    text = bench.table(["header"], rows, times, None, small, 1.0, 1.0)
    assert "ALL CHECKS PASSED" in text and "hinm64" in text

    monkeypatch.setattr(_cuda, "matmul", lambda x, w, bias=None, activation=None: stand_in(x, w, bias, activation) * 1.1)  # a wrong kernel
    bench.run_checks(dataclasses.replace(small, check_cases=small.check_cases[:1]), pallas=False)
    assert any("cuda check" in f for f in bench.TALLY.failures)
    assert f"{len(bench.TALLY.failures)} FAILED" in bench.table(["header"], [], [], None, small, 1.0, 1.0)
