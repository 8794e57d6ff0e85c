"""Tile configurations of the kernel and the per-shape heuristic that picks one.

The table mirrors ``HINM_SPMM_CONFIGS`` in ``hinm_spmm.cu`` (a test checks both the source
text and the compiled library). A configuration tiles ``BM`` packed rows of one vector block
by ``BN`` tokens with ``WARPS_M x WARPS_N`` warps and a ``STAGES``-deep ``cp.async``
pipeline over the gathered input axis (64 inputs per stage).

Example:
    >>> from cuda_ffi import tiles
    >>> tiles.select_config(num_tokens=4096, rows=4096, vector_size=64, gather=True).bm
    64
"""

from __future__ import annotations

import dataclasses

__all__ = ["TileConfig", "CONFIGS", "select_config", "valid_configs", "tile_height"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One compiled tile shape.

    Attributes:
      id: the ``config`` attribute the FFI handler takes.
      bm: packed rows per thread block (a divisor of the vector size).
      bn: tokens per thread block.
      warps_m: warps along rows.
      warps_n: warps along tokens.
      stages: ``cp.async`` pipeline depth.
    """

    id: int
    bm: int
    bn: int
    warps_m: int
    warps_n: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def direct(self) -> bool:
        """Whether the direct (plain 2:4, no gather) kernel exists for this shape."""
        return self.bm == 128

    @property
    def smem_bytes(self) -> int:
        stage = self.bm * 64 + self.bm * 8 + 64 * self.bn * 2
        return self.stages * stage + self.bm * 8


CONFIGS = (
    TileConfig(0, 128, 128, 2, 4, 4),
    TileConfig(1, 128, 256, 2, 4, 3),
    TileConfig(2, 128, 64, 2, 2, 4),
    TileConfig(3, 128, 32, 4, 1, 4),
    TileConfig(4, 64, 256, 1, 8, 3),
    TileConfig(5, 64, 128, 1, 4, 4),
    TileConfig(6, 64, 64, 1, 2, 4),
    TileConfig(7, 64, 32, 2, 1, 4),
    TileConfig(8, 32, 256, 1, 4, 3),
    TileConfig(9, 32, 128, 1, 4, 4),
    TileConfig(10, 32, 32, 1, 1, 4),
)


def tile_height(vector_size: int, gather: bool) -> int | None:
    """The tallest ``BM`` in {128, 64, 32} that divides the vector size, ``None`` if none."""
    if not gather:
        return 128
    for bm in (128, 64, 32):
        if vector_size % bm == 0:
            return bm
    return None


def valid_configs(rows: int, vector_size: int, gather: bool) -> tuple[TileConfig, ...]:
    """Every configuration the kernel can run for this packed weight."""
    out = []
    for c in CONFIGS:
        if rows % c.bm:
            continue
        if gather and vector_size % c.bm:
            continue
        if not gather and not c.direct:
            continue
        out.append(c)
    return tuple(out)


def select_config(num_tokens: int, rows: int, vector_size: int, gather: bool, sm_count: int = 132) -> TileConfig:
    """Picks a tile for ``T = num_tokens`` tokens.

    Rows: the tallest ``BM`` the vector size allows (each gathered activation tile is reused
    by ``BM`` rows). Tokens: the smallest ``BN`` covering ``T`` for small ``T``; 128 for large
    ``T``, 256 when that still leaves two waves of thread blocks on ``sm_count`` SMs (fewer
    block switches and, for plain 2:4, the 64x64 warp tile), 64 when 128 would leave SMs idle.

    Raises:
      NotImplementedError: the vector size is not a multiple of 32 (no tile fits a block).
    """
    bm = tile_height(vector_size, gather)
    if bm is None or rows % bm:
        raise NotImplementedError(
            f"vector_size={vector_size}, rows={rows}: the kernel tiles rows by 32, 64 or 128 inside a block"
        )
    by_bn = {c.bn: c for c in CONFIGS if c.bm == bm and (gather or c.direct)}
    t = max(int(num_tokens), 1)
    tiles_of = lambda bn: (rows // bm) * -(-t // bn)
    if t <= 32:
        return by_bn[32]
    if t <= 64 and 64 in by_bn:
        return by_bn[64]
    if 256 in by_bn and tiles_of(256) >= 2 * sm_count:
        return by_bn[256]
    if 64 in by_bn and tiles_of(128) < sm_count:
        return by_bn[64]
    return by_bn[128]
