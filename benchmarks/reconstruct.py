"""One-shot fidelity of MiniLM-L6 at HiNM(32, 0.5, 2, 4): score x permutation x
least-squares reconstruction, before any fine-tuning.

Prints a table of held-out embedding fidelity to the dense model (mean cosine, top-5
neighbour agreement; the demo's 200 held-out sentences) and the seconds each refit
took. Calibration: the first 512 distillation sentences of the demo.

Run: python benchmarks/reconstruct.py
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import jax

import hinm_jax
from hinm_jax import reconstruct, scores
from hinm_jax.models import minilm

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("minilm_demo", ROOT / "examples" / "minilm_demo.py")
demo = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = demo
spec.loader.exec_module(demo)


def main():
    config, params = minilm.load_params()
    tokenizer = minilm.load_tokenizer()
    model = minilm.MiniLM(config)
    train, held = demo.load_sentences(3400, 200)
    calib = demo.calibration_batches(tokenizer, train[:512])
    run = lambda f, batch: f(*batch)  # noqa: E731
    tokens = lambda batch: batch[1]  # noqa: E731
    dense = minilm.encode(params, tokenizer, held, model=model)
    norms = scores.input_norms(model, calib, {"params": params}, call=run, row_weights=tokens)
    score_fns = {"magnitude": lambda path, w: scores.magnitude(w), "wanda": scores.wanda(norms)}
    pattern = hinm_jax.HiNM(32, 0.5, 2, 4)
    refits = {
        "none": None,
        "parallel": dict(sequential=False),
        "sequential, self": dict(target="self"),
        "sequential, dense": dict(target="dense"),
    }
    plan = [
        ("magnitude", None, ("none", "sequential, dense")),
        ("magnitude", "2cp", ("none", "sequential, dense")),
        ("wanda", None, ("none", "sequential, dense")),
        ("wanda", "2cp", tuple(refits)),
    ]
    rows = []
    for score_name, perm, todo in plan:
        masks = hinm_jax.prune(params, pattern, score=score_fns[score_name], where=demo.ENCODER_LINEAR,
                               permute=perm, key=jax.random.key(0))
        for refit in todo:
            t0 = time.perf_counter()
            p = params if refits[refit] is None else reconstruct.reconstruct(
                model, params, masks, calib, call=run, row_weights=tokens, **refits[refit])
            seconds = time.perf_counter() - t0
            f = demo.fidelity(minilm.encode(hinm_jax.apply_masks(p, masks), tokenizer, held, model=model), dense)
            rows.append((score_name, perm or "none", refit, f["cosine"], f["top5"], seconds))
            print(rows[-1], flush=True)
    print(f"\n{'score':<10} {'permute':<8} {'reconstruction':<18} {'cosine':>7} {'top-5':>6} {'seconds':>8}")
    for s, p, r, c, t, sec in rows:
        print(f"{s:<10} {p:<8} {r:<18} {c:7.3f} {t:6.3f} {sec:8.1f}")


if __name__ == "__main__":
    main()
