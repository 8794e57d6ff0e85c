"""The HiNM sparse x dense product as a Pallas (Triton) kernel.

``y = x @ W`` for a weight ``W (K, O)`` in the kernel layout of :mod:`pallas_kernels.packing`.

One program per (tile of ``block_rows`` packed rows of one vector block) x (tile of
``block_tokens`` tokens). Per inner step of ``stripes = block_k // m`` stripes it

1. loads the tile's compressed values and uint8 positions (``n`` tiles of
   ``block_rows x stripes`` each: only the kept values are read);
2. expands them in registers to the dense ``block_rows x block_k`` weight tile, columns
   in (position ``q``, stripe ``j``) order: each kept value broadcast over ``q`` and
   selected where its position is ``q`` (no dense copy of the weight is ever stored);
3. gathers the ``block_k`` activation rows named by the block's vector index, in the
   same (q, j) order, by ref indexing (``x_ref[rows, tokens]`` with ``rows`` read from a
   ref: the Triton lowering has no gather primitive, but pointer arithmetic on loaded
   indices is exactly a gather; plain N:M computes ``rows`` instead);
4. accumulates ``X^T W^T`` in f32 (tokens x rows, so both tensor-core operands are
   staged in shared memory).

The epilogue casts and writes packed row ``r`` straight to output channel
``row_perm[r]`` (a store through indices: no permutation pass after the kernel).

Activations are read laid out ``(K, T)``, so each gathered row is ``block_tokens``
contiguous elements (coalesced, vectorisable loads). :func:`hinm_spmm` transposes a
``(T, K)`` input first unless told it is already ``(K, T)``.

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from pallas_kernels import testing, pack, hinm_spmm
    >>> w = testing.random_canonical(np.random.default_rng(0), k=64, o=32, vector_size=16,
    ...                              kept_inputs=32, n=2, m=4)
    >>> p = pack(w.values, w.metadata, w.vector_index, w.row_perm, n=2, m=4)
    >>> x = np.ones((3, 64), np.float32)
    >>> y = hinm_spmm(jnp.asarray(x), *p, m=4, interpret=True)
    >>> bool(np.allclose(y, x @ w.dense, rtol=1e-5, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import MAX_OFFSET, BlockSizes, unsupported

__all__ = ["hinm_spmm", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _spmm_kernel(
    *refs,
    n: int,
    m: int,
    vector_size: int,
    block_rows: int,
    block_tokens: int,
    stripes: int,
    num_steps: int,
    num_tokens: int,
    num_inputs: int,
    gather: bool,
    output_ot: bool,
    precision,
):
    it = iter(refs)
    x_ref = next(it)  # (K, T)
    val_ref = next(it)  # (O, n, J_pad)
    pos_ref = next(it) if m > 1 else None  # (O, n, J_pad) uint8
    vi_ref = next(it) if gather else None  # (O // V, m, J_pad) int32
    perm_ref = next(it)  # (O,) int32
    y_ref = next(it)  # (T, O), or (O, T) when output_ot

    row0 = pl.program_id(0) * block_rows
    block = lax.div(row0, vector_size)
    tok0 = pl.program_id(1) * block_tokens
    tok_row = tok0 + lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
    tok_col = tok0 + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
    masked = num_tokens % block_tokens != 0
    rows_slice = pl.ds(row0, block_rows)

    block_k = stripes * m
    # Columns of the expanded tile are in (q, j) order: column q * stripes + j holds
    # the value of stripe j at position q (or 0). The n kept values of each stripe are
    # broadcast over q and selected where their position is q; the gathered activation
    # rows follow the same order (the packed vector index is stored (q, j)).
    col_q = lax.broadcasted_iota(jnp.int32, (1, m, stripes), 1)
    col_j = lax.broadcasted_iota(jnp.int32, (m, stripes), 1)
    col_p = lax.broadcasted_iota(jnp.int32, (m, stripes), 0)

    def step(s, acc):
        j0 = pl.multiple_of(s * stripes, stripes)
        cols = pl.ds(j0, stripes)
        if m == 1:
            w = val_ref[rows_slice, 0, cols]
        else:
            w = jnp.zeros((block_rows, m, stripes), val_ref.dtype)
            for t in range(n):  # positions inside a stripe are distinct: one t selects
                v = jnp.broadcast_to(val_ref[rows_slice, t, cols][:, None, :], w.shape)
                p = jnp.broadcast_to(pos_ref[rows_slice, t, cols][:, None, :], w.shape)
                w = jnp.where(p == col_q.astype(p.dtype), v, w)
            w = w.reshape(block_rows, block_k)
        if gather:
            rows = vi_ref[block, :, cols].reshape(block_k, 1)
        else:  # plain N:M: the vector index is arange(K); padded stripes clamp.
            rows = jnp.minimum((j0 + col_j) * m + col_p, num_inputs - 1).reshape(block_k, 1)
        if masked:
            x_s = plgpu.load(x_ref.at[rows, tok_row], mask=tok_row < num_tokens, other=0)
        else:
            x_s = x_ref[rows, tok_row]  # (block_k, block_tokens): the gather
        # (tokens, rows) orientation: both tensor-core operands come from shared memory.
        return acc + lax.dot_general(
            x_s, w, (((0,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, num_steps, step, jnp.zeros((block_tokens, block_rows), jnp.float32))
    perm = perm_ref[rows_slice][None, :]
    target = y_ref.at[perm, tok_col] if output_ot else y_ref.at[tok_col, perm]
    plgpu.store(target, acc.astype(y_ref.dtype), mask=tok_col < num_tokens if masked else None)


@functools.partial(
    jax.jit,
    static_argnames=("m", "block_sizes", "activations_kt", "output_ot", "interpret", "precision"),
)
def hinm_spmm(
    x,
    values,
    positions,
    vector_index,
    row_perm,
    *,
    m: int,
    block_sizes: BlockSizes | None = None,
    activations_kt: bool = False,
    output_ot: bool = False,
    interpret: bool = False,
    precision=None,
):
    """``x @ W`` for ``W`` packed by :func:`pallas_kernels.pack`.

    Args:
      x: activations ``(T, K)`` (``(K, T)`` if ``activations_kt``); float32, float16 or
        bfloat16, the dtype of ``values``. Any ``T >= 1``.
      values: ``(O, n, J_pad)``.
      positions: ``(O, n, J_pad)`` uint8, or ``None`` when ``m == 1``.
      vector_index: ``(O // V, m, J_pad)`` int32, or ``None`` for plain N:M
        (``vector_index = arange(K)``, ``V = O``).
      row_perm: ``(O,)`` int32.
      m: stripe length (``n`` is ``values.shape[1]``; VectorWise is ``n = m = 1``).
      block_sizes: tile sizes; default :meth:`BlockSizes.default` for this shape, its
        ``block_k`` halved until it divides the packed stripes.
      activations_kt: ``x`` is already laid out ``(K, T)`` (skips a transpose).
      output_ot: return ``y`` laid out ``(O, T)`` (coalesced stores through
        ``row_perm``) instead of ``(T, O)``.
      interpret: run the kernel in Pallas interpret mode (CPU).
      precision: ``lax.Precision`` or ``lax.DotAlgorithmPreset`` of the tile products.
        Default for float32: 3xTF32 on the GPU (fp32-accurate on tensor cores),
        ``HIGHEST`` in interpret mode; for 16-bit dtypes the native tensor-core product.

    Returns:
      ``y`` ``(T, O)`` (or ``(O, T)``) in ``x``'s dtype, accumulated in f32.

    Raises:
      ValueError: inconsistent shapes or dtypes, or block sizes that do not fit.
      NotImplementedError: what the Triton lowering cannot compile (in interpret mode
        too, so that both modes run the same set): a vector size that is not a multiple
        of 16, a stripe length ``m`` that is not a power of two, or an operand with
        ``2**31`` elements or more (the kernel's element offsets are int32).
    """
    if activations_kt:
        k, t = x.shape
        xt = x
    else:
        t, k = x.shape
        xt = x.T
    o, n, j_pad = values.shape
    dtype = jnp.dtype(x.dtype)
    if dtype not in SUPPORTED_DTYPES or jnp.dtype(values.dtype) != dtype:
        raise ValueError(
            f"hinm_spmm: x.dtype={dtype} values.dtype={values.dtype}: expected the same dtype, "
            f"one of {[str(d) for d in SUPPORTED_DTYPES]}"
        )
    if t < 1:
        raise ValueError(f"hinm_spmm: x.shape={x.shape}: needs at least one token")
    if (m == 1) != (positions is None) or (m == 1 and n != 1) or not 1 <= n < max(m, 2):
        raise ValueError(
            f"hinm_spmm: m={m}, n={n}, positions {'absent' if positions is None else 'given'}: "
            "expected 1 <= n < m with positions, or n = m = 1 without"
        )
    if positions is not None and (tuple(positions.shape) != (o, n, j_pad) or positions.dtype != jnp.uint8):
        raise ValueError(
            f"hinm_spmm: positions shape={positions.shape} dtype={positions.dtype}: expected "
            f"{(o, n, j_pad)} uint8"
        )
    if tuple(row_perm.shape) != (o,):
        raise ValueError(f"hinm_spmm: row_perm.shape={row_perm.shape}: expected ({o},)")
    gather = vector_index is not None
    if gather:
        nb = vector_index.shape[0]
        if o % nb or tuple(vector_index.shape) != (nb, m, j_pad):
            raise ValueError(
                f"hinm_spmm: vector_index.shape={vector_index.shape} with values.shape={values.shape}: "
                f"expected (O // V, m={m}, {j_pad})"
            )
        vector_size = o // nb
    else:
        vector_size = o
        if j_pad * m < k:
            raise ValueError(
                f"hinm_spmm: no vector index and values.shape={values.shape} covers {j_pad * m} "
                f"inputs < K={k}"
            )

    why = unsupported(vector_size, m)
    if why is not None:
        raise NotImplementedError(f"hinm_spmm: {why}")
    sizes = {"x": k * t, "y": t * o, "values": o * n * j_pad}
    if gather:
        sizes["vector_index"] = vector_index.shape[0] * m * j_pad
    too_big = {name: size for name, size in sizes.items() if size > MAX_OFFSET}
    if too_big:
        raise NotImplementedError(
            f"hinm_spmm: x.shape={x.shape} values.shape={values.shape}: {too_big} elements: the kernel's "
            "offsets are int32 (at most 2**31 - 1 elements per operand); split the tokens"
        )
    if block_sizes is None:
        block_sizes = BlockSizes.default(t, vector_size, j_pad * m, m, dtype)
        while block_sizes.block_k // m > 16 and j_pad % (block_sizes.block_k // m):
            block_sizes = dataclasses.replace(block_sizes, block_k=block_sizes.block_k // 2)
    stripes = block_sizes.stripes_per_step(m)
    if j_pad % stripes:
        raise ValueError(
            f"hinm_spmm: values.shape={values.shape}: {j_pad} stripes per block is not a multiple "
            f"of block_k // m = {stripes} (pack with the same block_k)"
        )
    if vector_size % block_sizes.block_rows:
        raise ValueError(
            f"hinm_spmm: block_rows={block_sizes.block_rows} does not divide vector_size={vector_size}"
        )
    if precision is None and dtype == jnp.float32:
        # 3xTF32 on tensor cores is fp32-accurate; an IEEE fp32 Triton dot spills.
        precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3

    kernel = functools.partial(
        _spmm_kernel,
        n=n,
        m=m,
        vector_size=vector_size,
        block_rows=block_sizes.block_rows,
        block_tokens=block_sizes.block_tokens,
        stripes=stripes,
        num_steps=j_pad // stripes,
        num_tokens=t,
        num_inputs=k,
        gather=gather,
        output_ot=output_ot,
        precision=precision,
    )
    inputs = [xt, values]
    if positions is not None:
        inputs.append(positions)
    if gather:
        inputs.append(vector_index.astype(jnp.int32))
    inputs.append(row_perm.astype(jnp.int32))
    out_shape = jax.ShapeDtypeStruct((o, t) if output_ot else (t, o), dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(o // block_sizes.block_rows, pl.cdiv(t, block_sizes.block_tokens)),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="hinm_spmm",
    )(*inputs)
