"""Test configuration: GPU tests skip cleanly where no NVIDIA GPU is present."""

from __future__ import annotations

import pytest


def has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
