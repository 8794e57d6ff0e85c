"""The pure-jnp reference product ``x @ densify(w)`` (``implementation="xla"``), fast on CPU.

Three strategies compute ``(T, K) @ (K, O)`` from the canonical compressed format, each
returning ``(T, O)`` with the columns in *packed* order (column ``r`` is output channel
``row_perm[r]``); :func:`matmul` picks one per shape (:func:`strategy`) and undoes the
permutation:

- ``"select"`` (one token): for each kept value, select its activation among the
  candidates of its stripe and multiply; one pass over ``values`` and ``metadata`` (a
  quarter of the bytes a dense GEMV reads for HiNM at 25% density, half for 2:4), and no
  expanded weight is ever built.
- ``"gather"`` (several tokens): for a chunk of packed rows, expand the values to tiles
  ``(rows, K_v)``, gather the chunk's blocks' kept activation rows ``(K_v, T)`` and
  multiply them with one batched dot: ``T * O * K_v`` multiply-adds instead of
  ``T * O * K``.
- ``"dense"`` (tiny weights only): densify into ``(K, O)`` and run one dense dot.

How XLA:CPU shapes this code (measured on a 2-core machine, ``benchmarks/spmm_cpu.py``):

- Large temporaries are slow: glibc returns buffers of 32 MiB and more to the system
  after each call, and touching fresh pages costs about as much as the arithmetic. So the
  weight is processed in equal chunks of a few MiB, and each chunk's work is sequenced
  after the previous chunk so that XLA reuses one chunk's buffers for the next. Up to
  ``_MAX_UNROLLED`` chunks are unrolled; beyond, a ``lax.scan`` keeps compiling fast.
- XLA fuses freely and cannot be told not to (``optimization_barrier`` is removed before
  fusion on CPU): unpacking the metadata or transposing ``x`` inside every consumer, or
  reading a dynamic slice inside a fusion, costs several times the arithmetic.
  :func:`_opaque` computes its function behind a conditional whose two branches are the
  same function, so its results are materialised buffers, and its predicate (any
  runtime scalar, here taken from the previous chunk's output) orders it after that
  chunk. Both branches compute the same value, so the result never depends on the
  predicate.
- Dots and sums go to XLA's YNNPACK fusions; the expansion of values into tiles and the
  selection of activations are loop fusions that vectorise when the minor axis is long.

fp32 is exact to rounding; bf16/fp16 accumulate in fp32. Everything is differentiable in
``x`` and works under ``jax.jit``.

Example:
    >>> import jax, jax.numpy as jnp, hinm_jax
    >>> from hinm_jax import _xla
    >>> w = jax.random.normal(jax.random.key(0), (512, 256))
    >>> sw = hinm_jax.compress({"w": w}, hinm_jax.prune({"w": w}, "hinm:32:0.5:2:4"))["w"]
    >>> x = jnp.ones((4, 512))
    >>> _xla.strategy(4, sw), _xla.strategy(1, sw)
    ('gather', 'select')
    >>> bool(jnp.allclose(_xla.matmul(x, sw), x @ sw.densify(), rtol=1e-5, atol=1e-4))
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hinm_jax import _structure
from hinm_jax.format import SparseWeight, metadata_bits

__all__ = ["matmul", "strategy", "STRATEGIES", "select_path", "gather_path", "dense_path"]

STRATEGIES = ("select", "gather", "dense")

# Tuning constants (measured with benchmarks/spmm_cpu.py on a 2-core x86 machine; tests
# shrink them to exercise many chunks on small shapes).
# Working set of one "gather" chunk (expanded tiles plus gathered activations), in bytes:
# it stays in the last-level cache and far below glibc's 32 MiB mmap threshold.
_CHUNK_BYTES = 4 << 20
# Values per "select" chunk (they are never expanded; the chunk's uint8 positions and
# partial sums are the temporaries).
_SELECT_CHUNK_VALUES = 2 << 20
# Stripes each lane of the "select" loop fusion sums before the final YNNPACK sum (more
# makes XLA copy the values out of the fusion).
_SELECT_STRIPES = 2
# Tokens per slice: longer inputs are cut so that one block's gathered activations
# (``K_v * T``) stay small.
_MAX_TOKENS = 512
# Chunks up to which the chunk loop is unrolled (beyond, a scan keeps compiling fast).
_MAX_UNROLLED = 24
# Weights with at most this many dense entries just densify: the fewest thunks.
_DENSE_MAX_ENTRIES = 1 << 16


# --- dtypes ---------------------------------------------------------------------------


def out_dtype(x, w: SparseWeight):
    """The product's dtype: ``x``'s promoted with ``w``'s."""
    return jnp.result_type(x.dtype, w.dtype)


def _compute_dtypes(x, w: SparseWeight):
    """``(operand dtype, accumulator dtype)``. fp16 runs in fp32 (exact, and XLA:CPU has no
    fast fp16 dot); bf16 stays bf16 with fp32 accumulation."""
    dt = out_dtype(x, w)
    if dt == jnp.float16:
        dt = jnp.dtype(jnp.float32)
    acc = jnp.promote_types(dt, jnp.float32)
    return dt, acc


def _dot(a, b, dims, acc):
    return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)


# --- the heuristic --------------------------------------------------------------------


def strategy(t: int, w: SparseWeight) -> str:
    """The strategy :func:`matmul` uses for ``t`` tokens: a static rule, no timing at
    run time (measured with ``benchmarks/spmm_cpu.py``, 2-core x86, K=4096, O=4096/11008).

    - tiny weights (at most ``2**16`` dense entries): ``"dense"``, the fewest operations;
    - one token: ``"select"``. A GEMV is bound by the bytes it reads, and this reads only
      the compressed weight; its cost grows with every token, so already at two tokens
      ``"gather"`` is faster.
    - otherwise ``"gather"``: expanding a chunk costs ``O(rows * K_v)`` once, then every
      token runs at dot speed on ``K_v`` inputs instead of ``K``. A dense product with the
      densified weight is never chosen above the tiny size: it does ``K / K_v`` times the
      work (as much for plain N:M, where ``K_v = K``) and needs the whole ``(K, O)`` weight
      as a temporary (64 MiB and more here), whose fresh pages cost more than the product.
    """
    k, o = w.matrix_shape
    if k * o <= _DENSE_MAX_ENTRIES:
        return "dense"
    return "select" if t == 1 else "gather"


# --- building blocks --------------------------------------------------------------------


def _opaque(fn, pred, *args):
    """``fn(*args)`` as materialised buffers, ordered after whatever computed ``pred``.

    Both branches of the conditional are ``fn``, so the value never depends on ``pred``
    (any runtime boolean scalar); XLA cannot fuse across a conditional, so the outputs are
    real buffers, and the conditional waits for ``pred``'s producer.
    """
    return jax.lax.cond(pred, fn, fn, *args)


def _positions(metadata, m: int, nnz: int):
    """Unpacked metadata ``(rows, words)`` uint32 -> stripe positions ``(rows, nnz)`` uint8,
    by broadcasting the words against the field shifts (no gathers)."""
    bits = metadata_bits(m)
    rows = metadata.shape[0]
    if bits == 0:
        return jnp.zeros((rows, nnz), jnp.uint8)
    per = 32 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    pos = (metadata[:, :, None] >> shifts) & jnp.uint32((1 << bits) - 1)
    return pos.reshape(rows, -1)[:, :nnz].astype(jnp.uint8)


def _expand(values, pos, n: int, m: int, dtype):
    """Values ``(rows, J*n)`` and positions -> tiles ``(rows, J*m)`` in ``dtype``:
    ``tiles[r, j*m + p]`` is the value of stripe ``j`` at position ``p``, or zero. One
    loop fusion of selects (no reductions, no one-hot axis)."""
    rows, nnz = values.shape
    j = nnz // n
    v = values.reshape(rows, j, n).astype(dtype)
    pos = pos.reshape(rows, j, n)
    p = jnp.arange(m, dtype=pos.dtype)
    tiles = jnp.zeros((rows, j, m), dtype)
    for q in range(n):  # positions inside a stripe are distinct: the order does not matter
        tiles = jnp.where(pos[:, :, q : q + 1] == p, v[:, :, q : q + 1], tiles)
    return tiles.reshape(rows, j * m)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _select_rows(values, pos, xs, n: int, m: int, acc):
    """One token: ``y[r] = sum_i values[r, i] * xs[b(r), p(r, i), j(i)]``.

    Args:
      values: ``(rows, J*n)``; pos: ``(rows, J*n)`` uint8 stripe positions.
      xs: ``(g, m, J)``: the activations of the rows' ``g`` blocks, position-major, so
        that a selected activation is read along the long stripe axis.

    Returns ``(rows,)`` in ``acc``. The loop fusion sums ``n`` values of ``s`` stripes
    per output lane and ends in a select (so it stays one loop fusion); a YNNPACK sum
    finishes the rows.
    """
    rows, nnz = values.shape
    g, _, j = xs.shape
    s = _largest_divisor(j, _SELECT_STRIPES)
    ja = j // s
    v = values.reshape(g, rows // g, s, ja, n).astype(acc)
    pos = pos.reshape(g, rows // g, s, ja, n)
    xs = xs.reshape(g, 1, m, s, ja).astype(acc)
    total = None
    for si in range(s):
        for q in range(n):
            pq, vq = pos[:, :, si, :, q], v[:, :, si, :, q]
            # Positions ascend inside a stripe: value q sits at q .. m - n + q.
            cand = {p: vq * xs[:, :, p, si] for p in range(q, m - n + q + 1)}
            if total is not None:
                cand = {p: total + c for p, c in cand.items()}
            out = cand[m - n + q]
            for p in range(m - n + q - 1, q - 1, -1):
                out = jnp.where(pq == p, cand[p], out)
            total = out
    return jnp.sum(total, axis=-1).reshape(rows)


def _chunk_rows(o: int, v: int, nb: int, rows_max: int) -> int:
    """Packed rows per chunk, at most ``rows_max`` (at least one row): whole blocks (a
    divisor of the block count) when a block fits, otherwise a divisor of the block size.
    Every chunk then has the same size and lies in whole blocks or inside one block."""
    if rows_max >= v:
        return _largest_divisor(nb, rows_max // v) * v
    return _largest_divisor(v, max(1, rows_max))


def _chunk_blocks(o: int, v: int, rows: int):
    """Static ``(chunks, blocks per chunk)`` int array: the blocks each chunk's rows are in."""
    nc, g = o // rows, max(1, rows // v)
    return (np.arange(nc)[:, None] * rows) // v + np.arange(g)[None, :]


def _map_chunks(nc: int, pred, unrolled, scanned, chunked):
    """Runs chunks ``0 .. nc-1`` one after the other and stacks their results.

    Up to ``_MAX_UNROLLED`` chunks: ``unrolled(c, pred)`` for each static ``c``, each
    ordered after the previous one (its ``pred`` comes from that chunk's output); static
    slices of the weight then feed the fusions directly. More chunks: one ``lax.scan``
    (the compile time stays flat) whose body calls ``scanned(*chunk)`` with
    ``chunk = tuple(a[c] for a in chunked)``; ``scanned`` must do its work inside
    :func:`_opaque`, since fusions that read a dynamic slice do not vectorise.
    """
    if nc <= _MAX_UNROLLED:
        ys = []
        for c in range(nc):
            ys.append(unrolled(c, pred if c == 0 else _first(ys[-1])))
        return jnp.stack(ys)
    return jax.lax.scan(lambda carry, chunk: (carry, scanned(*chunk)), None, chunked)[1]


def _first(a):
    """A runtime boolean scalar computed from ``a`` (for :func:`_opaque`)."""
    v = a.reshape(-1)[0]
    return v == v


def _geometry(w: SparseWeight):
    k, o = w.matrix_shape
    nb, kv = w.vector_index.shape
    return k, o, nb, kv, o // nb, w.values.shape[-1]


# --- strategies (columns in packed order) -----------------------------------------------


def _select_rows_of(x, w: SparseWeight):
    """One token ``x`` ``(1, K)`` -> ``(O,)`` in packed order."""
    k, o, nb, kv, v, nnz = _geometry(w)
    n, m = w.n, w.m
    _, acc = _compute_dtypes(x, w)
    j = kv // m
    rows = _chunk_rows(o, v, nb, _SELECT_CHUNK_VALUES // nnz)
    nc = o // rows
    # Each chunk's blocks' activations, position-major: xs[c, g, p, j] = x[vector_index[b, j*m + p]].
    order = w.vector_index.reshape(nb, j, m).transpose(0, 2, 1)[_chunk_blocks(o, v, rows)]

    def unrolled(c, pred):
        def prep(meta, order, x):
            return _positions(meta[c * rows : (c + 1) * rows], m, nnz), x[0][order[c]]

        pos, xs = _opaque(prep, pred, w.metadata, order, x)
        return _select_rows(w.values[c * rows : (c + 1) * rows], pos, xs, n, m, acc)

    def scanned(values, meta, order):
        def work(values, meta, order, x):
            pos = _opaque(lambda a: _positions(a, m, nnz), _first(values), meta)
            return _select_rows(values, pos, x[0][order], n, m, acc)

        return _opaque(work, _first(values), values, meta, order, x)

    chunked = (w.values.reshape(nc, rows, nnz), w.metadata.reshape(nc, rows, -1), order)
    return _map_chunks(nc, w.vector_index[0, 0] >= 0, unrolled, scanned, chunked).reshape(o)


def _gather_rows_of(x, w: SparseWeight):
    """``(T, K)`` -> ``(O, T)`` in packed row order, chunk by chunk."""
    t = x.shape[0]
    if t > _MAX_TOKENS:
        parts = [_gather_rows_of(x[i : i + _MAX_TOKENS], w) for i in range(0, t, _MAX_TOKENS)]
        return jnp.concatenate(parts, axis=1)
    k, o, nb, kv, v, nnz = _geometry(w)
    n, m = w.n, w.m
    dt, acc = _compute_dtypes(x, w)
    item = jnp.dtype(dt).itemsize
    # Whole blocks per chunk when a block's tiles and activations fit, each chunk gathering
    # its blocks' activations; otherwise pieces of a block.
    if _CHUNK_BYTES >= kv * (v + t) * item:
        rows = _chunk_rows(o, v, nb, _CHUNK_BYTES // (kv * (v + t) * item) * v)
    else:
        rows = _chunk_rows(o, v, nb, min(v - 1, _CHUNK_BYTES // (kv * item)))
    nc, g = o // rows, max(1, rows // v)
    pred = w.vector_index[0, 0] >= 0
    # x.T materialised once: gathering its rows moves contiguous T-wide rows.
    xt = _opaque(lambda x: x.T.astype(dt).reshape(-1), pred, x).reshape(k, t)
    blocks = w.vector_index[_chunk_blocks(o, v, rows)]  # (chunks, g, K_v)
    shared = nb == 1  # plain N:M: every chunk multiplies the same activations
    if shared:
        xt = _opaque(lambda vi, xt: xt[vi], pred, w.vector_index, xt)  # (1, K_v, T)

    def product(values, pos, xg):
        tiles = _expand(values, pos, n, m, dt).reshape(g, rows // g, kv)
        return _dot(tiles, xg, (((2,), (1,)), ((0,), (0,))), acc).reshape(rows, t)

    def unrolled(c, pred):
        def prep(meta, blocks, xt):
            pos = _positions(meta[c * rows : (c + 1) * rows], m, nnz)
            return pos, (xt if shared else xt[blocks[c]])

        pos, xg = _opaque(prep, pred, w.metadata, blocks, xt)
        return product(w.values[c * rows : (c + 1) * rows], pos, xg)

    def scanned(values, meta, blocks):
        def work(values, meta, blocks, xt):
            pos = _opaque(lambda a: _positions(a, m, nnz), _first(values), meta)
            return product(values, pos, xt if shared else xt[blocks])

        return _opaque(work, _first(values), values, meta, blocks, xt)

    chunked = (w.values.reshape(nc, rows, nnz), w.metadata.reshape(nc, rows, -1), blocks)
    return _map_chunks(nc, pred, unrolled, scanned, chunked).reshape(o, t)


def select_path(x, w: SparseWeight):
    """One token at a time: ``(T, K)`` -> ``(T, O)``, columns in packed order."""
    return jnp.stack([_select_rows_of(x[i : i + 1], w) for i in range(x.shape[0])])


def gather_path(x, w: SparseWeight):
    """Expanded tiles times gathered activations: ``(T, K)`` -> ``(T, O)``, columns in
    packed order."""
    return _gather_rows_of(x, w).T


def dense_path(x, w: SparseWeight):
    """Densify into ``(K, O)`` (columns in packed order) and one dense dot."""
    k, o, nb, kv, v, nnz = _geometry(w)
    dt, acc = _compute_dtypes(x, w)
    tiles = _expand(w.values, _positions(w.metadata, w.m, nnz), w.n, w.m, dt)
    dense = _structure.scatter_blocks(_structure.rows_to_blocks(tiles, nb), w.vector_index, k).reshape(k, o)
    return _dot(x.astype(dt), dense, (((1,), (0,)), ((), ())), acc)


@jax.jit
def _matmul(x, w: SparseWeight):
    name = strategy(x.shape[0], w)
    inv = _structure.inverse_permutation(w.row_perm)
    if name == "dense":
        y = dense_path(x, w)[:, inv]
    elif name == "select":
        y = _select_rows_of(x, w)[inv][None, :]
    else:
        y = _gather_rows_of(x, w)[inv].T  # moves whole T-wide rows, then one transpose
    return y.astype(out_dtype(x, w))


def matmul(x, w: SparseWeight):
    """``x @ densify(w)`` for ``x`` of shape ``(T, K)`` and an unstacked ``w``.

    Returns ``(T, O)`` in ``x``'s dtype promoted with ``w``'s. Jitted (retraced per shape
    and pattern); inside an outer ``jax.jit`` it is inlined.
    """
    return _matmul(x, w)
