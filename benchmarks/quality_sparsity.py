"""Quality vs sparsity: task score and fidelity of MiniLM after the demo's recipe, for
2:4 (50%), HiNM(32, 0.25, 2, 4) (62.5%) and HiNM(32, 0.5, 2, 4) (75%), with and without 2CP.

Runs ``examples/minilm_demo.py`` once per pattern (``--variants plain,2cp``, the
recipe's defaults plus whatever follows ``--``), or, with ``--read``, only reads the
``summary.json`` files of runs already made. Writes ``quality_sparsity.png`` (task MRR
and fidelity cosine against sparsity, one line per variant, dense as a reference) and
``quality_sparsity.md`` (a table) to ``--out``.

Run:
    python benchmarks/quality_sparsity.py --out out/quality_sparsity -- --minutes 1000 --max-steps 1000
    python benchmarks/quality_sparsity.py --read out/quality_sparsity/*/summary.json --out out/quality_sparsity
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("2:4", "hinm:32:0.25:2:4", "hinm:32:0.5:2:4")


def _name(pattern: str) -> str:
    return pattern.replace(":", "_")


def run(patterns, out: Path, extra: list[str]) -> list[Path]:
    """Runs the demo once per pattern (plain and 2CP); returns the summary files."""
    files = []
    for pattern in patterns:
        folder = out / _name(pattern)
        cmd = [sys.executable, str(ROOT / "examples" / "minilm_demo.py"), "--pattern", pattern,
               "--variants", "plain,2cp", "--out", str(folder), *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        files.append(folder / "summary.json")
    return files


def rows_of(files) -> tuple[dict, list[dict]]:
    """``(dense task score, rows)``: one row per (pattern, variant) of the summaries."""
    dense, rows = None, []
    for f in files:
        s = json.loads(Path(f).read_text())
        dense = dense or s["task"]["dense"]
        density = s.get("pruned_layers_density")
        for variant, stages in s["fidelity"].items():
            task = s["task"][variant]
            final = next(st for st in ("fine-tuned", "reconstructed", "pruned") if stages.get(st))
            rows.append({
                "pattern": s["pattern"], "sparsity": None if density is None else 1 - density, "variant": variant,
                "allocation": s.get("allocation", "uniform") if isinstance(s.get("allocation"), str)
                else s["allocation"]["method"],
                "task": {st: task[st] for st in ("pruned", "reconstructed", "fine-tuned")},
                "fidelity": {st: stages[st] for st in ("pruned", "reconstructed", "fine-tuned")},
                "final": final, "steps": stages.get("steps"), "source": str(f),
            })
    rows.sort(key=lambda r: (r["sparsity"] or 0, r["variant"] != "plain"))
    return dense, rows


def _cell(task):
    return "—" if task is None else f"{task['mrr']:.1f} / {task['recall@1']:.1f}"


def table(dense, rows) -> str:
    lines = [
        f"Dense: MRR / R@1 **{dense['mrr']:.1f} / {dense['recall@1']:.1f}** (WordNet example -> definition "
        f"retrieval among {dense['pool']}).",
        "",
        "| pattern | sparsity | variant | pruned MRR / R@1 | refit | fine-tuned | gap to dense (MRR) "
        "| fidelity cos / top-5 (final) | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fin = r["task"][r["final"]]
        fid = r["fidelity"][r["final"]]
        lines.append(
            f"| {r['pattern']} | {100 * r['sparsity']:.1f}% | {r['variant']} | {_cell(r['task']['pruned'])} "
            f"| {_cell(r['task']['reconstructed'])} | {_cell(r['task']['fine-tuned'])} "
            f"| {fin['mrr'] - dense['mrr']:+.1f} | {fid['cosine']:.3f} / {fid['top5']:.3f} | {r['steps']} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, dense, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, marker, color in (("plain", "o", "tab:blue"), ("2cp", "s", "tab:orange")):
        sel = [r for r in rows if r["variant"] == variant]
        x = [100 * r["sparsity"] for r in sel]
        axes[0].plot(x, [r["task"][r["final"]]["mrr"] for r in sel], marker=marker, color=color,
                     label=f"{variant}, after recipe")
        axes[0].plot(x, [r["task"]["pruned"]["mrr"] for r in sel], marker=marker, color=color, ls=":", alpha=0.6,
                     label=f"{variant}, one-shot")
        axes[1].plot(x, [r["fidelity"][r["final"]]["cosine"] for r in sel], marker=marker, color=color,
                     label=f"{variant}, after recipe")
        axes[1].plot(x, [r["fidelity"]["pruned"]["cosine"] for r in sel], marker=marker, color=color, ls=":",
                     alpha=0.6, label=f"{variant}, one-shot")
    axes[0].axhline(dense["mrr"], color="k", lw=0.8, ls="--", label="dense")
    axes[0].set_ylabel("task MRR (x100)")
    axes[1].set_ylabel("held-out embedding cosine to dense")
    for ax in axes:
        ax.set_xlabel("sparsity of the 36 encoder linear layers (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("MiniLM-L6: 2:4 (50%), HiNM(32,0.25,2,4) (62.5%), HiNM(32,0.5,2,4) (75%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/quality_sparsity"))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--read", nargs="+", type=Path, default=None,
                    help="summary.json files of demo runs already made (nothing is run)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = args.read or run(args.patterns.split(","), args.out, extra)
    dense, rows = rows_of(files)
    md = table(dense, rows)
    (args.out / "quality_sparsity.md").write_text(md)
    plot(args.out / "quality_sparsity.png", dense, rows)
    print(md)
    return rows


if __name__ == "__main__":
    main()
