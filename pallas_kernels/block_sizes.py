"""Tile sizes and launch parameters of the HiNM SpMM kernel.

The kernel's grid is ``(O // block_rows, cdiv(T, block_tokens))``. Each program owns
``block_rows`` packed output rows (a whole vector block or a power-of-two slice of one,
so that all its rows share one vector index) and ``block_tokens`` tokens, and walks the
block's kept inputs ``block_k`` at a time (``block_k // m`` stripes per step).

The Triton lowering wants every tile a power of two and every ``dot`` dimension at
least 16, so ``block_rows``, ``block_tokens`` and ``block_k // m`` are powers of two
``>= 16``.

Example:
    >>> from pallas_kernels import BlockSizes
    >>> BlockSizes.default(num_tokens=4096, vector_size=64, kept_inputs=2048, m=4)
    BlockSizes(block_rows=64, block_tokens=128, block_k=128, num_warps=8, num_stages=3)
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BlockSizes",
    "default_block_k",
    "largest_pow2_divisor",
    "tuning_candidates",
    "unsupported",
    "MIN_TILE",
    "MAX_OFFSET",
]

MIN_TILE = 16  # smallest dot dimension the Triton lowering accepts
#: Element offsets inside one operand are int32 in the kernel: every operand must hold fewer elements.
MAX_OFFSET = 2**31 - 1


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def largest_pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two that divides ``v`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and v % (p * 2) == 0:
        p *= 2
    return p


def unsupported(vector_size: int, m: int) -> str | None:
    """Why the compiled kernel cannot run a weight of vector size ``V`` and stripe length
    ``m`` (``None`` if it can): every tile must be a power of two, so ``m`` must be one (the
    expanded weight tile is ``block_rows x (m * stripes)``), and ``V`` a multiple of 16.

    Example:
        >>> unsupported(64, 4) is None, unsupported(64, 3)
        (True, 'm=3: the Pallas kernel needs a power-of-two stripe length (Triton tiles are powers of two)')
    """
    if not _is_pow2(m):
        return f"m={m}: the Pallas kernel needs a power-of-two stripe length (Triton tiles are powers of two)"
    if vector_size % MIN_TILE:
        return f"vector_size={vector_size}: the Pallas kernel needs V to be a multiple of {MIN_TILE}"
    return None


def default_block_k(m: int, kept_inputs: int, target: int = 128) -> int:
    """Kept inputs per inner step: about ``target`` (128: bf16 tiles of 128 x 128 per
    step) with a power-of-two number of stripes, at least 16 stripes, no more stripes
    than the block has (rounded up to a power of two).

    Example:
        >>> default_block_k(4, 2048), default_block_k(4, 32), default_block_k(1, 1000)
        (128, 64, 128)
        >>> default_block_k(3, 3000) // 3  # stripes: a power of two even when 128 // m is not
        32
    """
    stripes = max(MIN_TILE, 1 << max(0, (target // m).bit_length() - 1))  # largest power of two <= target // m
    stripes = max(MIN_TILE, min(stripes, _next_pow2(-(-kept_inputs // m))))
    return stripes * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tile sizes and Triton launch parameters (hashable: a static argument).

    Attributes:
      block_rows: packed output rows per program; a power of two ``>= 16`` dividing the
        vector size ``V`` (every row of a program shares one vector index).
      block_tokens: tokens per program; a power of two ``>= 16`` (the token tail is
        masked).
      block_k: kept input indices per inner step; a multiple of ``m`` with
        ``block_k // m`` a power of two ``>= 16``. It must match the packing (the packer
        pads each block's stripes to a multiple of ``block_k // m``).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages of the inner loop.

    Example:
        >>> BlockSizes(block_rows=64, block_tokens=256, block_k=128, num_warps=8)
        BlockSizes(block_rows=64, block_tokens=256, block_k=128, num_warps=8, num_stages=3)
    """

    block_rows: int
    block_tokens: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _is_pow2(v) or v < MIN_TILE:
                raise ValueError(f"BlockSizes: {name}={v!r} must be a power of two >= {MIN_TILE}")
        if not isinstance(self.block_k, int) or self.block_k < 1:
            raise ValueError(f"BlockSizes: block_k={self.block_k!r} must be a positive int")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes: {name}={v!r} must be a positive int")

    def stripes_per_step(self, m: int) -> int:
        """``block_k // m``, checked against the stripe length ``m``."""
        if self.block_k % m or not _is_pow2(self.block_k // m) or self.block_k // m < MIN_TILE:
            raise ValueError(
                f"BlockSizes: block_k={self.block_k} with m={m}: block_k must be m times a "
                f"power of two >= {MIN_TILE}"
            )
        return self.block_k // m

    @classmethod
    def default(
        cls, num_tokens: int, vector_size: int, kept_inputs: int, m: int, dtype="bfloat16"
    ) -> "BlockSizes":
        """The per-shape default (a starting point for tuning on the GPU).

        16-bit: tiles of 64 rows x 128 tokens, 128 kept inputs per step, 8 warps, 3
        stages (sm_90 with Triton 3.9: wgmma, 127 registers, 93 KiB shared memory).
        float32 (3xTF32 products, which spill at 64-wide tiles): 32 x 32 x 64, 4 warps,
        2 stages.

        Args:
          num_tokens: ``T``, rows of the activations.
          vector_size: ``V``, packed rows sharing a vector index (``O`` for plain N:M).
          kept_inputs: ``K_v``, kept inputs per block (after packing).
          m: stripe length (1 for VectorWise).
          dtype: the activations' dtype.

        Raises:
          NotImplementedError: ``V`` is not a multiple of 16 (no tile of whole blocks).
        """
        wide = str(dtype) == "float32"
        rows = largest_pow2_divisor(vector_size, 32 if wide else 64)
        if rows < MIN_TILE:
            raise NotImplementedError(
                f"vector_size={vector_size}: the Pallas kernel needs V to be a multiple of {MIN_TILE}"
            )
        max_tokens, target_k, stages = (32, 64, 2) if wide else (128, 128, 3)
        tokens = max(MIN_TILE, min(max_tokens, _next_pow2(num_tokens)))
        warps = 8 if rows * tokens >= 64 * 128 else 4
        return cls(
            block_rows=rows,
            block_tokens=tokens,
            block_k=default_block_k(m, kept_inputs, target_k),
            num_warps=warps,
            num_stages=stages,
        )


def tuning_candidates(vector_size: int, m: int, dtype="bfloat16", packed_block_k: int | None = None):
    """Block sizes worth timing on a GPU for one weight (a sweep for the benchmark).

    Every candidate fits the weight: ``block_rows`` divides ``V`` and ``block_k // m``
    divides the stripes of a weight packed with ``packed_block_k`` (default: the
    packer's default for a long block, 128 for m = 4).

    Example:
        >>> len(tuning_candidates(64, 4)) > 4
        True
    """
    wide = str(dtype) == "float32"
    packed_block_k = packed_block_k or default_block_k(m, 1 << 20)
    max_stripes = packed_block_k // m
    out = []
    for rows in (64, 32, 128):
        if rows > vector_size or vector_size % rows:
            continue
        for tokens in ((32, 64) if wide else (64, 128, 256)):
            for block_k in (packed_block_k, packed_block_k // 2):
                stripes = block_k // m
                if stripes < MIN_TILE or max_stripes % stripes:
                    continue
                for warps in (4, 8):
                    # Triton 3.9, sm_90: 8 warps below 64 x 64 idle; 4 warps above
                    # 64 x 128 spill; more than 3 stages allocates no more buffers.
                    if (warps == 8 and rows * tokens < 64 * 64) or (warps == 4 and rows * tokens > 64 * 128):
                        continue
                    for stages in (2, 3):
                        out.append(BlockSizes(rows, tokens, block_k, warps, stages))
    return tuple(out)
