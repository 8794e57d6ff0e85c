"""The pure-jnp reference product ``x @ densify(w)``: the code to check against the SPEC.

For a compressed weight (see :mod:`hinm_jax.format`), packed row ``r`` computes output
channel ``row_perm[r]`` from the ``K_v`` inputs ``vector_index[r // V]`` of its block:

1. expand the values into tiles ``(O, K_v)`` (:meth:`SparseWeight.packed_tiles`: each
   value placed at its stripe position, zeros elsewhere);
2. gather each block's kept activation columns ``x[:, vector_index[b]]``;
3. one batched dot per block, ``(V, K_v) x (K_v, T)``, accumulating fp16/bf16 in fp32;
4. undo ``row_perm``.

This is ``implementation="xla"`` of :func:`hinm_jax.sparse_matmul`, the test oracle of
every kernel backend, and their backward pass. Differentiable in ``x``; jittable.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> from hinm_jax import _xla
    >>> w = jax.random.normal(jax.random.key(0), (512, 256))
    >>> sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:32:0.5:2:4"))["w"]
    >>> x = jnp.ones((4, 512))
    >>> bool(jnp.allclose(_xla.matmul(x, sw), x @ sw.densify(), rtol=1e-5, atol=1e-4))
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hinm_jax import _structure
from hinm_jax.format import SparseWeight

__all__ = ["matmul"]


@jax.jit
def matmul(x, w: SparseWeight):
    """``x @ densify(w)`` for ``x`` of shape ``(T, K)`` and an unstacked ``w``.

    Returns:
      ``(T, O)`` in ``result_type(x, w)``; fp16/bf16 accumulate in fp32.
    """
    dtype = jnp.result_type(x.dtype, w.dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    nb, kv = w.vector_index.shape
    o = w.row_perm.shape[0]
    tiles = w.packed_tiles().astype(dtype).reshape(nb, o // nb, kv)  # (nb, V, K_v)
    xg = x.astype(dtype).T[w.vector_index]  # (nb, K_v, T)
    y = jax.lax.dot_general(
        tiles, xg, (((2,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc
    )  # (nb, V, T)
    y = y.reshape(o, -1)[_structure.inverse_permutation(w.row_perm)]
    return y.T.astype(dtype)
