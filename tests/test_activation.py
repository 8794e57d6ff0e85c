"""hinm_jax._activation: the reference activations of sparse_matmul's epilogue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hinm_jax import _activation


def test_gelu_is_the_exact_gelu():
    """The GELU (through erf) is jax.nn.gelu(approximate=False) (through erfc) to float32
    rounding, and keeps the dtype."""
    x = jnp.linspace(-12.0, 12.0, 100_001, dtype=jnp.float32)
    got, want = np.asarray(_activation.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False))
    assert np.all(np.abs(got - want) <= 3e-7 * np.maximum(1.0, np.abs(np.asarray(x))))
    xb = x.astype(jnp.bfloat16)
    gb = _activation.gelu(xb)
    assert gb.dtype == jnp.bfloat16
    wb = np.asarray(jax.nn.gelu(xb, approximate=False), np.float32)
    assert np.all(np.abs(np.asarray(gb, np.float32) - wb) <= 2**-7 * np.maximum(1.0, np.abs(wb)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_keeps_the_dtype(dtype):
    y = jnp.array([-2.0, -0.5, 0.0, 1.5], dtype)
    assert _activation.apply(None, y) is y
    np.testing.assert_array_equal(np.asarray(_activation.apply("relu", y), np.float32), [0.0, 0.0, 0.0, 1.5])
    g = _activation.apply("gelu", y)
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(jax.nn.gelu(y, approximate=False), np.float32),
                               rtol=1e-6, atol=2**-7 if dtype == jnp.bfloat16 else 1e-6)


def test_check_names_the_place():
    _activation.check(None, "w")
    for name in _activation.ACTIVATIONS:
        _activation.check(name, "w")
    with pytest.raises(ValueError, match=r"layer/kernel: activation='swish': expected None or one of \('relu', 'gelu'\)"):
        _activation.check("swish", "layer/kernel")
    with pytest.raises(TypeError, match="layer/kernel: activation=1"):
        _activation.check(1, "layer/kernel")
