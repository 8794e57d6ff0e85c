"""A numpy model of ``mma.sp.m16n8k32`` (f16/bf16) and ``ldmatrix``, and of the kernel built on them.

Written from the PTX ISA (section 9.7.14.6, "Matrix multiply-accumulate operation using
mma.sp instruction with sparse matrix A", and 9.7.14.5.15 ``ldmatrix``), so the packer and
the kernel's data movement can be tested on a machine without a GPU:

- :func:`mma_sp_m16n8k32` takes the per-lane registers of a warp (A: 4 x .b32 = 8
  compressed values, B: 8 values, C: 4 floats, E: one metadata word) and returns D, by
  expanding A with the metadata exactly as the ISA describes;
- :func:`ldmatrix_x4` models the four-matrix load (with and without ``.trans``);
- :func:`fragment_product` computes ``y`` from packed arrays fragment by fragment (proves
  the packed layout means the same as the canonical one);
- :func:`emulate_kernel` replays ``hinm_spmm.cu`` tile by tile: the swizzled shared-memory
  images the ``cp.async`` copies build, the ``ldmatrix`` addresses of every lane, the
  metadata word of every lane, the ``mma.sp`` calls and the epilogue. The index functions
  below have the names of the C++ ones and are checked against the compiled library.

Fragment layouts used (``g = lane >> 2``, ``t = lane & 3``):

- A (compressed 16 x 16): ``a0 a1`` row ``g``, group ``t``; ``a2 a3`` row ``g + 8``, group
  ``t``; ``a4 a5`` row ``g``, group ``4 + t``; ``a6 a7`` row ``g + 8``, group ``4 + t``; each
  pair holds the two kept values of the 4-wide group (logical columns ``4 group .. + 3``).
- B (32 x 8): ``b_i`` at ``k = 2t + (i & 1) + 8 (i >> 1)``, ``n = g``.
- C/D (16 x 8): ``c0 c1`` at row ``g``, columns ``2t, 2t + 1``; ``c2 c3`` at row ``g + 8``.
- E with sparsity selector ``F``: lanes with ``t = 2F + h`` (``h`` in {0, 1}) hold bits
  ``[15:0]`` = row ``g``, groups ``4h .. 4h + 3`` and ``[31:16]`` = row ``g + 8``, same groups;
  group ``4h + j`` uses bits ``4j .. 4j + 3``: first index in the low two bits.
"""

from __future__ import annotations

import numpy as np

from cuda_ffi import packing

__all__ = [
    "mma_sp_m16n8k32",
    "ldmatrix_x4",
    "fragment_product",
    "emulate_kernel",
    "a_chunk_offset",
    "bt_chunk_offset",
    "bn_chunk_offset",
    "a_ldsm_row",
    "a_ldsm_chunk",
    "bt_ldsm_krow",
    "bn_ldsm_row",
    "bn_ldsm_chunk",
    "meta_word",
]

_LANE = np.arange(32)
_G = _LANE >> 2
_T = _LANE & 3
_I = np.arange(8)

# A: (32, 8) row, 4-wide group and which of its two kept values each a_i is.
A_ROW = np.where(((_I < 2) | ((_I >= 4) & (_I < 6)))[None, :], _G[:, None], _G[:, None] + 8)
A_GROUP = np.where((_I < 4)[None, :], _T[:, None], _T[:, None] + 4)
A_ELEM = np.broadcast_to(_I & 1, (32, 8))
# B: (32, 8) k and n of each b_i.
B_K = 2 * _T[:, None] + (_I & 1)[None, :] + 8 * (_I >> 1)[None, :]
B_N = np.broadcast_to(_G[:, None], (32, 8))
# C/D: (32, 4).
_J = np.arange(4)
C_ROW = _G[:, None] + 8 * (_J >> 1)[None, :]
C_COL = 2 * _T[:, None] + (_J & 1)[None, :]


def _meta_lane_and_shift(row, group, elem, selector):
    """Lane holding the index of (row, group, elem) and the bit offset inside its word."""
    lane = 4 * (row % 8) + 2 * selector + group // 4
    shift = 16 * (row // 8) + 4 * (group % 4) + 2 * elem
    return lane, shift


def mma_sp_m16n8k32(a, b, c, e, selector=0):
    """One warp's ``mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32`` (f16/bf16).

    Args:
      a: ``(32, 8)`` compressed A values per lane (``a0 .. a7``).
      b: ``(32, 8)`` B values per lane (``b0 .. b7``).
      c: ``(32, 4)`` accumulators per lane.
      e: ``(32,)`` uint32 metadata word per lane.
      selector: the sparsity selector (0 or 1).

    Returns:
      ``(32, 4)`` D per lane, computed in float64.

    Raises:
      ValueError: metadata that is not strictly ascending inside a group (undefined
        behaviour on the hardware).
    """
    e = np.asarray(e, np.uint32)
    lane, shift = _meta_lane_and_shift(A_ROW, A_GROUP, A_ELEM, selector)
    pos = (e[lane].astype(np.uint64) >> shift.astype(np.uint64)) & 3
    if not np.all(pos[:, 0::2] < pos[:, 1::2]):
        raise ValueError("mma.sp::ordered_metadata: group indices must be strictly ascending")
    # The instruction multiplies only the B rows the metadata selects (a NaN in another row
    # does not reach D), so the product is a sum over the 16 kept values of each row.
    comp = np.zeros((16, 16))
    kcol = np.zeros((16, 16), np.int64)
    comp[A_ROW, 2 * A_GROUP + A_ELEM] = np.asarray(a, np.float64)
    kcol[A_ROW, 2 * A_GROUP + A_ELEM] = 4 * A_GROUP + pos.astype(np.int64)
    dense_b = np.zeros((32, 8))
    dense_b[B_K, B_N] = np.asarray(b, np.float64)
    d = np.einsum("ri,rin->rn", comp, dense_b[kcol])
    return np.asarray(c, np.float64) + d[C_ROW, C_COL]


def ldmatrix_x4(mem, row_addr, trans=False):
    """``ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16``.

    Args:
      mem: 1-D array of 16-bit elements (any dtype holding them).
      row_addr: ``(32,)`` element offsets; lane ``l`` gives row ``l % 8`` of matrix ``l // 8``.
      trans: whether to load each 8x8 matrix transposed.

    Returns:
      ``(32, 4, 2)``: register ``j`` of lane ``l`` holds two elements of matrix ``j``:
      ``M[l // 4, 2 (l % 4) + {0, 1}]``, or ``M[2 (l % 4) + {0, 1}, l // 4]`` with ``.trans``.
    """
    mem = np.asarray(mem)
    rows = mem[np.asarray(row_addr)[:, None] + np.arange(8)[None, :]]  # (32, 8)
    mats = rows.reshape(4, 8, 8)  # matrix, row, col
    j = np.arange(4)[None, :, None]
    r = (_LANE // 4)[:, None, None]
    cidx = (2 * (_LANE % 4))[:, None, None] + np.arange(2)[None, None, :]
    return mats[j, cidx, r] if trans else mats[j, r, cidx]


# ---------------------------------------------------------------------------------------------------------------
# The kernel's index functions (same names and formulas as in hinm_spmm.cu).
# ---------------------------------------------------------------------------------------------------------------
K_STEP = 32


def a_chunk_offset(row, chunk):
    return row * 4 + (chunk ^ ((row >> 1) & 3))


def bt_chunk_offset(k, chunk, cpr):
    return k * cpr + ((chunk ^ (k & 7)) if cpr >= 8 else (chunk ^ ((k >> 1) & 3)))


def bn_chunk_offset(n, chunk):
    return n * 8 + (chunk ^ (n & 7))


def a_ldsm_row(lane):
    return lane & 15


def a_ldsm_chunk(lane, ks):
    return 2 * ks + (lane >> 4)


def bt_ldsm_krow(lane, ks):
    return ks * K_STEP + lane


def bn_ldsm_row(lane):
    return lane & 7


def bn_ldsm_chunk(lane, ks):
    return ks * 4 + (lane >> 3)


def meta_word(lane):
    return (lane >> 2) * 2 + (lane & 1)


# ---------------------------------------------------------------------------------------------------------------
# Fragment-level product straight from the packed arrays (no shared memory).
# ---------------------------------------------------------------------------------------------------------------
def _gathered_inputs(x, packed):
    """``(nb, K_vp, T)`` activation rows each block multiplies (zero for padding)."""
    vals = packed["values"]
    kvp = 2 * vals.shape[1]
    t, k = x.shape
    vi = packed["vector_index"]
    if vi.shape[0] == 0:  # direct: inputs 0 .. K_vp - 1, zero past K
        xt = np.zeros((1, kvp, t))
        xt[0, : min(k, kvp)] = x.T[: min(k, kvp)]
        return xt
    safe = np.where((vi >= 0) & (vi < k), vi, 0)
    rows = np.where((vi >= 0)[..., None], x.T[safe], 0.0)
    return np.where(((vi < -1) | (vi >= k))[..., None], np.nan, rows)  # invalid entries: NaN, as the kernel


def fragment_product(x, packed, out_features, bias=None):
    """``y (T, O)`` computed from a :func:`packing.pack` dict one ``mma.sp`` at a time.

    Every 16-row tile, k-step and 8-token tile is fed to :func:`mma_sp_m16n8k32` with the
    registers the ISA's fragment layouts name, read directly from the packed arrays.
    """
    x = np.asarray(x, np.float64)
    vals = np.asarray(packed["values"], np.float64)
    meta = np.asarray(packed["metadata"], np.uint32)
    perm = np.asarray(packed["row_perm"])
    lay = packing.layout_of(packed, out_features)
    t = x.shape[0]
    xg = _gathered_inputs(x, packed)
    tp = -(-t // 8) * 8
    y = np.zeros((lay.rows, tp))
    for tile in range(lay.rows // 16):
        blk = (16 * tile) // lay.vector_size
        for ks in range(lay.kept_padded // K_STEP):
            a = vals[16 * tile + A_ROW, 16 * ks + 2 * A_GROUP + A_ELEM]
            e = meta[tile, ks, meta_word(_LANE)]
            for n0 in range(0, t, 8):
                bmat = np.zeros((K_STEP, 8))
                cols = xg[blk, K_STEP * ks : K_STEP * (ks + 1), n0 : n0 + 8]
                bmat[:, : cols.shape[1]] = cols
                c = y[16 * tile + C_ROW, n0 + C_COL]
                y[16 * tile + C_ROW, n0 + C_COL] = mma_sp_m16n8k32(a, bmat[B_K, B_N], c, e)
    if perm.size == 0:  # packed row r is channel r
        perm = np.where(np.arange(lay.rows) < out_features, np.arange(lay.rows), -1)
    out = np.zeros((t, out_features))
    live = perm >= 0
    out[:, perm[live]] = y[live, :t].T
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Kernel emulation.
# ---------------------------------------------------------------------------------------------------------------
def emulate_kernel(x, packed, out_features, config, bias=None, out_dtype=np.float32):
    """Replays ``spmm_kernel<config, gather>`` of ``hinm_spmm.cu`` on the CPU.

    Args:
      x: ``(T, K)`` activations (values exactly representable in the kernel dtype).
      packed: a :func:`packing.pack` dict (numpy).
      out_features: ``O``.
      config: a :class:`cuda_ffi.tiles.TileConfig`.
      bias: optional ``(O,)``.
      out_dtype: the dtype the epilogue rounds to.

    Returns:
      ``y (T, O)`` as the kernel writes it (rounded to ``out_dtype``).
    """
    x = np.asarray(x, np.float64)
    vals = np.asarray(packed["values"], np.float64)
    meta = np.asarray(packed["metadata"], np.uint32)
    vidx = np.asarray(packed["vector_index"])
    perm = np.asarray(packed["row_perm"])
    lay = packing.layout_of(packed, out_features)
    t, k = x.shape
    bm, bn = config.bm, config.bn
    wtm, wtn = bm // config.warps_m, bn // config.warps_n
    cpr = bn // 8
    kt_count = lay.kept_padded // 64
    if lay.gather:
        tpad = -(-t // 8) * 8
        src = np.zeros((k, tpad))
        src[:, :t] = x.T  # the adapter passes x^T padded to a multiple of 8 tokens
    else:
        src = x
    bias_full = np.zeros(out_features) if bias is None else np.asarray(bias, np.float64)
    transposed = not lay.identity_rows
    t_out = -(-t // 8) * 8 if transposed else t  # y^T (O, T_pad), as cuda_ffi.ffi.spmm allocates it
    y = np.zeros((t, out_features), out_dtype)
    y_t = np.zeros((out_features, t_out), out_dtype)
    if lay.rows % bm or (lay.gather and lay.vector_size % bm):
        raise ValueError(f"config {config} does not tile rows={lay.rows}, vector_size={lay.vector_size}")

    chunk8 = np.arange(8)
    for row0 in range(0, lay.rows, bm):
        blk = row0 // lay.vector_size
        for n0 in range(0, t_out, bn):
            acc = np.zeros((config.warps_m, config.warps_n, wtm // 16, wtn // 8, 32, 4))
            for kt in range(kt_count):
                # cp.async images of this stage.
                a_s = np.zeros(bm * 32)
                for r in range(bm):
                    for ch in range(4):
                        a_s[a_chunk_offset(r, ch) * 8 + chunk8] = vals[row0 + r, kt * 32 + ch * 8 + chunk8]
                meta_s = meta[row0 // 16 : row0 // 16 + bm // 16, 2 * kt : 2 * kt + 2, :].reshape(-1)
                b_s = np.zeros(64 * bn)
                if lay.gather:
                    for kr in range(64):
                        idx = vidx[blk, kt * 64 + kr]
                        for ch in range(cpr):
                            tok = n0 + ch * 8
                            if idx < -1 or idx >= k:  # not an input, not padding: NaN, never read
                                b_s[bt_chunk_offset(kr, ch, cpr) * 8 + chunk8] = np.nan
                            elif idx >= 0 and tok < src.shape[1]:
                                b_s[bt_chunk_offset(kr, ch, cpr) * 8 + chunk8] = src[idx, tok + chunk8]
                else:
                    for nr in range(bn):
                        for ch in range(8):
                            tok, kk = n0 + nr, kt * 64 + ch * 8
                            if tok < t and kk < k:
                                b_s[bn_chunk_offset(nr, ch) * 8 + chunk8] = src[tok, kk + chunk8]
                # Warps.
                for wm in range(config.warps_m):
                    for wn in range(config.warps_n):
                        for ks in range(2):
                            a_regs, e_regs = [], []
                            for mt in range(wtm // 16):
                                rr = wm * wtm + mt * 16 + a_ldsm_row(_LANE)
                                a_regs.append(ldmatrix_x4(a_s, a_chunk_offset(rr, a_ldsm_chunk(_LANE, ks)) * 8))
                                tile16 = (wm * wtm) // 16 + mt
                                e_regs.append(meta_s[(tile16 * 2 + ks) * 16 + meta_word(_LANE)])
                            for nt in range(wtn // 8):
                                nb = wn * wtn + nt * 8
                                if lay.gather:
                                    addr = bt_chunk_offset(bt_ldsm_krow(_LANE, ks), nb // 8, cpr) * 8
                                    b_regs = ldmatrix_x4(b_s, addr, trans=True)
                                else:
                                    addr = bn_chunk_offset(nb + bn_ldsm_row(_LANE), bn_ldsm_chunk(_LANE, ks)) * 8
                                    b_regs = ldmatrix_x4(b_s, addr)
                                for mt in range(wtm // 16):
                                    acc[wm, wn, mt, nt] = mma_sp_m16n8k32(
                                        a_regs[mt].reshape(32, 8),
                                        b_regs.reshape(32, 8),
                                        acc[wm, wn, mt, nt],
                                        e_regs[mt],
                                    )
            # Epilogue: bias by output channel, round, stage, write 16-byte runs of y or y^T.
            if perm.size:
                tile_perm = perm[row0 : row0 + bm]
            else:
                rr = np.arange(row0, row0 + bm)
                tile_perm = np.where(rr < out_features, rr, -1)
            tile_bias = np.where(tile_perm >= 0, bias_full[np.maximum(tile_perm, 0)], 0.0)
            out_s = np.zeros((bn, bm), out_dtype)  # [token][row]; y^T mode stages its transpose
            for wm in range(config.warps_m):
                for wn in range(config.warps_n):
                    for mt in range(wtm // 16):
                        for nt in range(wtn // 8):
                            r = wm * wtm + mt * 16 + C_ROW
                            n = wn * wtn + nt * 8 + C_COL
                            out_s[n, r] = (acc[wm, wn, mt, nt] + tile_bias[r]).astype(out_dtype)
            if transposed:
                for r in range(bm):
                    for q in range(bn // 8):
                        if tile_perm[r] >= 0 and n0 + 8 * q < t_out:
                            y_t[tile_perm[r], n0 + 8 * q : n0 + 8 * q + 8] = out_s[8 * q : 8 * q + 8, r]
            else:
                for n in range(bn):
                    if n0 + n < t:
                        live = tile_perm >= 0
                        y[n0 + n, tile_perm[live]] = out_s[n, live]
    return y_t[:, :t].T if transposed else y
