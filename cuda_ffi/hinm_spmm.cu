// HiNM / 2:4 sparse x dense matmul on Sparse Tensor Cores (mma.sp m16n8k32), behind an XLA FFI handler.
//
// Computes y[t, row_perm[r]] = bias[row_perm[r]] + sum_k A[r, k] * x[t, index(r, k)] where A is the packed
// 2:4-compressed weight (one row per output channel, "packed row" r) and index(r, k) is the k-th kept input of
// r's vector block (HiNM) or k itself (plain 2:4, no gather).
//
// Operands (all produced by cuda_ffi.packing, see there for the exact layouts):
//   x       gather mode: (K, T_pad) = x^T, T_pad a multiple of 8; direct mode: (T, K), K a multiple of 8.
//   values  (O_p, Kc_p) f16/bf16: compressed rows, Kc_p = K_vp / 2, K_vp a multiple of kBK (zero padded).
//   meta    (O_p / 16, K_vp / 32, 16) uint32: per 16-row tile and mma k-step, the 16 metadata words in the
//           order the threads of a warp hold them (word g*2+t = lane 4g+t: low half row g, high half row g+8).
//   vidx    gather mode: (O_p / V, K_vp) int32, -1 = padding (the activation row is zero filled). Any other entry
//           outside 0..K-1 is never read: the kernel fills that activation row with NaN instead, so every output
//           that uses it is NaN (mma.sp multiplies only the B rows the metadata selects: other outputs stay exact).
//   perm    (O_p,) int32 output channel of every packed row (-1 = padding row), or (0,): packed row r is
//           channel r (rows >= O are padding). A non-empty perm requires transposed_out = 1.
//   bias    (O,) f32 or (0,) for none.
//   y       transposed_out = 0: (T, O); transposed_out = 1: y^T (O, T_y), T_y a multiple of 8. Dtype of x.
// One thread block computes a BM x BN tile of (packed rows within one vector block) x (tokens); the rows of the
// tile share one vector index, so the activation rows it names are gathered once per tile with cp.async into a
// multi-stage shared memory pipeline; ldmatrix (.trans for x^T) feeds mma.sp with f32 accumulation. The
// epilogue adds the bias, stages the tile in shared memory and writes 16-byte vectors: runs of channels of y
// when packed rows are channels in order, else runs of tokens of y^T row perm[r] (the rows of a vector block are
// arbitrary channels after output-channel permutation; writing them into y would scatter 2-byte stores).
//
// Plain CUDA C++; no dependency on the Python package that uses it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace hinm {

// ---------------------------------------------------------------------------------------------------------------
// Geometry shared by every tile configuration.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kBK = 64;          // logical (gathered) K per pipeline stage
constexpr int kBKc = kBK / 2;    // compressed values per row per stage
constexpr int kKStep = 32;       // logical K of one mma.sp.m16n8k32
constexpr int kStepsPerStage = kBK / kKStep;
constexpr int kMetaWordsPerStep = 16;  // per 16-row tile
constexpr int kChunk = 16;       // bytes per cp.async / ldmatrix row
constexpr uint32_t kPadMetaWord = 0x44444444u;  // every 2:4 group: indices (0, 1)
constexpr uint32_t kNanPairF16 = 0x7E007E00u;   // two float16 quiet NaNs
constexpr uint32_t kNanPairBf16 = 0x7FC07FC0u;  // two bfloat16 quiet NaNs

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory swizzles (units: 16-byte chunks). Each makes the 8 row addresses of one ldmatrix 8x8 matrix fall
// into 8 distinct 16-byte bank groups. Host-callable so the Python model can check them.
// ---------------------------------------------------------------------------------------------------------------
// A tile: [BM rows][4 chunks] (64 B per row: 32 compressed values).
__host__ __device__ constexpr int a_chunk_offset(int row, int chunk) {
  return row * 4 + (chunk ^ ((row >> 1) & 3));
}
// Gathered x^T tile: [kBK k-rows][cpr chunks of 8 tokens], cpr = BN / 8 in {4, 8, 16, 32}.
__host__ __device__ constexpr int bt_chunk_offset(int k, int chunk, int cpr) {
  return k * cpr + (cpr >= 8 ? (chunk ^ (k & 7)) : (chunk ^ ((k >> 1) & 3)));
}
// Direct x tile: [BN token rows][8 chunks of 8 k].
__host__ __device__ constexpr int bn_chunk_offset(int n, int chunk) { return n * 8 + (chunk ^ (n & 7)); }

// ldmatrix lane -> (row, chunk) it addresses, for one 16x16 compressed A tile at k-step ks.
__host__ __device__ constexpr int a_ldsm_row(int lane) { return lane & 15; }
__host__ __device__ constexpr int a_ldsm_chunk(int lane, int ks) { return 2 * ks + (lane >> 4); }
// x^T (.trans): one 32(k) x 8(tokens) B fragment: lane l addresses k-row ks*32 + l.
__host__ __device__ constexpr int bt_ldsm_krow(int lane, int ks) { return ks * kKStep + lane; }
// x (no .trans): lane l addresses token row (l & 7), k chunk ks*4 + (l >> 3).
__host__ __device__ constexpr int bn_ldsm_row(int lane) { return lane & 7; }
__host__ __device__ constexpr int bn_ldsm_chunk(int lane, int ks) { return ks * 4 + (lane >> 3); }
// Metadata word a lane passes to mma.sp (sparsity selector 0: lanes 4g and 4g+1 are read; others duplicate).
__host__ __device__ constexpr int meta_word(int lane) { return (lane >> 2) * 2 + (lane & 1); }

// ---------------------------------------------------------------------------------------------------------------
// Tile configurations: (id, BM, BN, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS). BM rows of one vector block x BN tokens;
// MIN_BLOCKS = 2 caps registers at 128/thread on sm_90+ so two 256-thread blocks share an SM (2 x 103 KB of shared
// memory; an sm_80 SM has room for one, so there the cap would only cost spills and is not applied).
// ---------------------------------------------------------------------------------------------------------------
#define HINM_SPMM_CONFIGS(X)    \
  X(0, 128, 128, 2, 4, 4, 2)    \
  X(1, 128, 256, 2, 4, 3, 1)    \
  X(2, 128, 64, 2, 2, 4, 1)     \
  X(3, 128, 32, 4, 1, 4, 1)     \
  X(4, 64, 256, 1, 8, 3, 1)     \
  X(5, 64, 128, 1, 4, 4, 1)     \
  X(6, 64, 64, 1, 2, 4, 1)      \
  X(7, 64, 32, 2, 1, 4, 1)      \
  X(8, 32, 256, 1, 4, 3, 1)     \
  X(9, 32, 128, 1, 4, 4, 1)     \
  X(10, 32, 32, 1, 1, 4, 1)

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WTM = BM / WARPS_M;  // warp tile rows
  static constexpr int WTN = BN / WARPS_N;  // warp tile tokens
  static constexpr int MT = WTM / 16;       // m16 tiles per warp
  static constexpr int NT = WTN / 8;        // n8 tiles per warp
  static constexpr int CPR = BN / 8;        // 16-byte chunks per gathered k-row
  static constexpr int A_BYTES = BM * kBKc * 2;
  static constexpr int META_BYTES = (BM / 16) * kStepsPerStage * kMetaWordsPerStep * 4;
  static constexpr int B_BYTES = kBK * BN * 2;
  static constexpr int STAGE_BYTES = A_BYTES + META_BYTES + B_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int OUT_LD = BM + 8;     // epilogue staging [token][row] stride (elements)
  static constexpr int OUT_LD_T = BN + 8;   // epilogue staging [row][token] stride (elements)
  static constexpr int SMEM_BYTES = PIPE_BYTES + BM * 8;  // + perm (int32) + bias (f32)
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "warp tiling");
  static_assert(BM >= 32 && BM % 32 == 0, "BM must be a multiple of 32");
  static_assert(CPR == 4 || CPR % 8 == 0, "swizzle needs BN in {32, 64k}");
  static_assert(BN * OUT_LD * 2 <= PIPE_BYTES && BM * OUT_LD_T * 2 <= PIPE_BYTES, "epilogue staging must fit");
  static_assert(STAGES >= 2, "pipeline");
};

struct Params {
  const void* x;
  const void* values;
  const uint32_t* meta;
  const int32_t* vidx;
  const int32_t* perm;  // nullptr: packed row r is channel r
  const float* bias;    // nullptr: no bias
  void* y;
  int T;     // activation rows of x (direct mode load bound)
  int T_out; // tokens written: rows of y, or the (padded) token axis of y^T
  int K;     // logical input features (direct mode: row length of x)
  int O;     // output features (row length of y)
  int x_ld;  // row stride of x in elements: K (direct) or T_pad (gather)
  int Kc_p;  // compressed row length of values
  int K_vp;  // padded kept inputs per block (multiple of kBK)
  int V;     // packed rows per vector block (gather mode)
  int transposed_out;  // 1: y is y^T (O, T) and row r writes y^T[perm[r], :]
};

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: zero fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// A 16-byte shared-memory store (an invalid vector index entry's activation row: NaN).
__device__ __forceinline__ void st_shared16(uint32_t dst, uint32_t word) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(word) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

template <bool kBf16>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

template <bool kBf16>
struct Elem;
template <>
struct Elem<false> {
  using T = __half;
  static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<true> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
};

// ---------------------------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HINM_MIN_BLOCKS(C) (C::MIN_BLOCKS)
#else
#define HINM_MIN_BLOCKS(C) 1
#endif

template <class C, bool kGather, bool kBf16>
__global__ void __launch_bounds__(C::THREADS, HINM_MIN_BLOCKS(C)) spmm_kernel(const Params p) {
  using E = typename Elem<kBf16>::T;
  extern __shared__ __align__(128) uint8_t smem[];
  int32_t* perm_s = reinterpret_cast<int32_t*>(smem + C::PIPE_BYTES);
  float* bias_s = reinterpret_cast<float*>(smem + C::PIPE_BYTES + C::BM * 4);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / C::WARPS_N;
  const int warp_n = warp % C::WARPS_N;
  const int row0 = blockIdx.x * C::BM;  // first packed row of the tile
  const int n0 = blockIdx.y * C::BN;    // first token of the tile
  const int KT = p.K_vp / kBK;          // pipeline iterations
  const int KS = p.K_vp / kKStep;       // mma k-steps per row (metadata layout)

  const E* __restrict__ xg = static_cast<const E*>(p.x);
  const E* __restrict__ vals = static_cast<const E*>(p.values);
  const int32_t* __restrict__ vrow = kGather ? p.vidx + static_cast<size_t>(row0 / p.V) * p.K_vp : nullptr;

  // Per-tile epilogue data: output channel (-1: padding row) and bias of every row.
  for (int r = tid; r < C::BM; r += C::THREADS) {
    const int c = p.perm != nullptr ? p.perm[row0 + r] : (row0 + r < p.O ? row0 + r : -1);
    perm_s[r] = c;
    bias_s[r] = (p.bias != nullptr && c >= 0) ? p.bias[c] : 0.0f;
  }  // read after the main loop's barriers

  const uint32_t smem_base = smem_addr(smem);

  // ---- global -> shared copies of one pipeline stage --------------------------------------------------------
  constexpr int A_CHUNKS = C::BM * 4;
  constexpr int META_CHUNKS = C::META_BYTES / kChunk;
  constexpr int B_CHUNKS = C::B_BYTES / kChunk;
  constexpr int B_ITERS = (B_CHUNKS + C::THREADS - 1) / C::THREADS;

  auto load_indices = [&](int kt, int (&idx)[B_ITERS]) {
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int c = tid + i * C::THREADS;
      idx[i] = -1;
      if (kGather && kt < KT && c < B_CHUNKS) idx[i] = __ldg(vrow + kt * kBK + c / C::CPR);
    }
  };

  auto load_stage = [&](int slot, int kt, const int (&idx)[B_ITERS]) {
    if (kt >= KT) return;
    const uint32_t stage = smem_base + slot * C::STAGE_BYTES;
    // A: BM rows x 32 compressed values.
    for (int c = tid; c < A_CHUNKS; c += C::THREADS) {
      const int r = c >> 2, ch = c & 3;
      const E* src = vals + static_cast<size_t>(row0 + r) * p.Kc_p + kt * kBKc + ch * 8;
      cp_async16(stage + a_chunk_offset(r, ch) * kChunk, src, true);
    }
    // Metadata: per 16-row tile, the 2 k-steps of this stage are 32 consecutive words.
    for (int c = tid; c < META_CHUNKS; c += C::THREADS) {
      const int mt = c >> 3, q = c & 7;
      const uint32_t* src =
          p.meta + (static_cast<size_t>(row0 / 16 + mt) * KS + kt * kStepsPerStage) * kMetaWordsPerStep + q * 4;
      cp_async16(stage + C::A_BYTES + c * kChunk, src, true);
    }
    // Activations.
    const uint32_t bstage = stage + C::A_BYTES + C::META_BYTES;
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int c = tid + i * C::THREADS;
      if (c < B_CHUNKS) {
        if constexpr (kGather) {
          const int kr = c / C::CPR, ch = c % C::CPR;
          const int tok = n0 + ch * 8;
          const uint32_t dst = bstage + bt_chunk_offset(kr, ch, C::CPR) * kChunk;
          if (idx[i] < -1 || idx[i] >= p.K) {  // not an input and not padding: never read it, poison the row
            st_shared16(dst, kBf16 ? kNanPairBf16 : kNanPairF16);
          } else {
            const bool valid = idx[i] >= 0 && tok < p.x_ld;
            const E* src = valid ? xg + static_cast<size_t>(idx[i]) * p.x_ld + tok : xg;
            cp_async16(dst, src, valid);
          }
        } else {
          const int nr = c >> 3, ch = c & 7;
          const int tok = n0 + nr, k = kt * kBK + ch * 8;
          const bool valid = tok < p.T && k < p.K;
          const E* src = valid ? xg + static_cast<size_t>(tok) * p.x_ld + k : xg;
          cp_async16(bstage + bn_chunk_offset(nr, ch) * kChunk, src, valid);
        }
      }
    }
  };

  // ---- accumulators --------------------------------------------------------------------------------------------
  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

  // ---- prologue ------------------------------------------------------------------------------------------------
  int idx[B_ITERS];
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    load_indices(s, idx);
    load_stage(s, s, idx);
    cp_async_commit();
  }
  load_indices(C::STAGES - 1, idx);

  // ---- main loop -----------------------------------------------------------------------------------------------
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage kt is visible to all; the slot refilled below was consumed at kt - 1 by everyone
    load_stage((kt + C::STAGES - 1) % C::STAGES, kt + C::STAGES - 1, idx);
    cp_async_commit();
    load_indices(kt + C::STAGES, idx);  // in flight during the math below

    const int slot = kt % C::STAGES;
    const uint32_t a_s = smem_base + slot * C::STAGE_BYTES;
    const uint32_t* meta_s = reinterpret_cast<const uint32_t*>(smem + slot * C::STAGE_BYTES + C::A_BYTES);
    const uint32_t b_s = a_s + C::A_BYTES + C::META_BYTES;

#pragma unroll
    for (int ks = 0; ks < kStepsPerStage; ++ks) {
      uint32_t a[C::MT][4], e[C::MT], b[C::NT][4];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        const int r = warp_m * C::WTM + mt * 16 + a_ldsm_row(lane);
        ldsm_x4(a[mt], a_s + a_chunk_offset(r, a_ldsm_chunk(lane, ks)) * kChunk);
        const int tile16 = (warp_m * C::WTM) / 16 + mt;
        e[mt] = meta_s[(tile16 * kStepsPerStage + ks) * kMetaWordsPerStep + meta_word(lane)];
      }
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        const int nb = warp_n * C::WTN + nt * 8;  // first token of the n8 tile
        if constexpr (kGather) {
          ldsm_x4_trans(b[nt], b_s + bt_chunk_offset(bt_ldsm_krow(lane, ks), nb / 8, C::CPR) * kChunk);
        } else {
          ldsm_x4(b[nt], b_s + bn_chunk_offset(nb + bn_ldsm_row(lane), bn_ldsm_chunk(lane, ks)) * kChunk);
        }
      }
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) mma_sp<kBf16>(acc[mt][nt], a[mt], b[nt], e[mt]);
    }
  }

  // ---- epilogue: bias, convert, stage in shared memory, write 16-byte vectors of y or y^T ---------------------
  cp_async_wait<0>();
  __syncthreads();  // all warps are done reading the pipeline buffers
  E* out_s = reinterpret_cast<E*>(smem);
  E* yg = static_cast<E*>(p.y);
  const int g = lane >> 2, t4 = lane & 3;
  if (p.transposed_out) {
    // Stage [row][token]; row r writes tokens n0 .. n0+BN-1 of y^T row perm[r]: 16-byte runs.
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        const int r = warp_m * C::WTM + mt * 16 + g;
        const int n = warp_n * C::WTN + nt * 8 + 2 * t4;
        __align__(4) E lo[2] = {Elem<kBf16>::from_float(acc[mt][nt][0] + bias_s[r]),
                                Elem<kBf16>::from_float(acc[mt][nt][1] + bias_s[r])};
        __align__(4) E hi[2] = {Elem<kBf16>::from_float(acc[mt][nt][2] + bias_s[r + 8]),
                                Elem<kBf16>::from_float(acc[mt][nt][3] + bias_s[r + 8])};
        *reinterpret_cast<uint32_t*>(out_s + r * C::OUT_LD_T + n) = *reinterpret_cast<const uint32_t*>(lo);
        *reinterpret_cast<uint32_t*>(out_s + (r + 8) * C::OUT_LD_T + n) = *reinterpret_cast<const uint32_t*>(hi);
      }
    }
    __syncthreads();
    constexpr int VPR = C::BN / 8;  // 16-byte vectors per row of the tile
    for (int v = tid; v < C::BM * VPR; v += C::THREADS) {
      const int r = v / VPR, q = v % VPR;
      const int c = perm_s[r];
      if (c >= 0 && n0 + q * 8 < p.T_out) {
        const uint4 val = *reinterpret_cast<const uint4*>(out_s + r * C::OUT_LD_T + q * 8);
        *reinterpret_cast<uint4*>(yg + static_cast<size_t>(c) * p.T_out + n0 + q * 8) = val;
      }
    }
    return;
  }
  // Packed rows are channels row0 .. row0+BM-1: stage [token][row], write runs of channels of y.
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
      const int r = warp_m * C::WTM + mt * 16 + g;
      const int n = warp_n * C::WTN + nt * 8 + 2 * t4;
      out_s[n * C::OUT_LD + r] = Elem<kBf16>::from_float(acc[mt][nt][0] + bias_s[r]);
      out_s[(n + 1) * C::OUT_LD + r] = Elem<kBf16>::from_float(acc[mt][nt][1] + bias_s[r]);
      out_s[n * C::OUT_LD + r + 8] = Elem<kBf16>::from_float(acc[mt][nt][2] + bias_s[r + 8]);
      out_s[(n + 1) * C::OUT_LD + r + 8] = Elem<kBf16>::from_float(acc[mt][nt][3] + bias_s[r + 8]);
    }
  }
  __syncthreads();
  if (p.O % 8 == 0) {
    constexpr int VPR = C::BM / 8;  // 16-byte vectors per token row of the tile
    for (int v = tid; v < C::BN * VPR; v += C::THREADS) {
      const int n = v / VPR, rv = v % VPR;
      if (n0 + n < p.T_out && row0 + rv * 8 < p.O) {
        const uint4 val = *reinterpret_cast<const uint4*>(out_s + n * C::OUT_LD + rv * 8);
        *reinterpret_cast<uint4*>(yg + static_cast<size_t>(n0 + n) * p.O + row0 + rv * 8) = val;
      }
    }
  } else {
    for (int v = tid; v < C::BN * C::BM; v += C::THREADS) {
      const int n = v / C::BM, r = v % C::BM;
      if (n0 + n < p.T_out && row0 + r < p.O) yg[static_cast<size_t>(n0 + n) * p.O + row0 + r] = out_s[n * C::OUT_LD + r];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: launch by configuration id.
// ---------------------------------------------------------------------------------------------------------------
// The device that runs work on `stream` (not necessarily the calling thread's current device).
inline cudaError_t stream_device(cudaStream_t stream, int* device) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
  return cudaStreamGetDevice(stream, device);
#else
  (void)stream;  // older runtimes: XLA makes the stream's device current before calling a handler
  return cudaGetDevice(device);
#endif
}

template <class C, bool kGather, bool kBf16>
cudaError_t launch(const Params& p, int rows, int device, cudaStream_t stream) {
  auto kernel = spmm_kernel<C, kGather, kBf16>;
  // The dynamic shared memory opt-in is per device (the stream's); remember which devices are done.
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_acquire) & bit)) {
    // cudaFuncSetAttribute applies to the current device: make it the stream's for the call.
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES);
    if (current >= 0 && current != device) {
      const cudaError_t restore = cudaSetDevice(current);
      if (err == cudaSuccess) err = restore;
    }
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }
  const dim3 grid(static_cast<unsigned>(rows / C::BM), static_cast<unsigned>((p.T_out + C::BN - 1) / C::BN));
  kernel<<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(p);
  return cudaGetLastError();
}

// Direct (no gather) kernels are only instantiated for BM = 128: plain 2:4 has a single block of all rows.
template <class C>
constexpr bool kHasDirect = (C::BM == 128);

// A build may instantiate a single configuration (-DHINM_SPMM_ONLY_CONFIG=id): fast compile checks.
#ifndef HINM_SPMM_ONLY_CONFIG
#define HINM_SPMM_ONLY_CONFIG -1
#endif
constexpr bool is_built(int id) { return HINM_SPMM_ONLY_CONFIG < 0 || id == HINM_SPMM_ONLY_CONFIG; }

template <int ID, class C>
cudaError_t dispatch_config(bool gather, bool bf16, const Params& p, int rows, int device, cudaStream_t stream) {
  if constexpr (!is_built(ID)) {
    return cudaErrorInvalidConfiguration;
  } else {
    if (gather) {
      return bf16 ? launch<C, true, true>(p, rows, device, stream) : launch<C, true, false>(p, rows, device, stream);
    }
    if constexpr (kHasDirect<C>) {
      return bf16 ? launch<C, false, true>(p, rows, device, stream) : launch<C, false, false>(p, rows, device, stream);
    }
    return cudaErrorInvalidConfiguration;
  }
}

struct ConfigInfo {
  int id, bm, bn, warps_m, warps_n, stages, threads, smem_bytes, direct, built;
};

#define HINM_INFO(ID, BM, BN, WM, WN, S, MB)                                                     \
  ConfigInfo{ID, BM, BN, WM, WN, S, Config<BM, BN, WM, WN, S, MB>::THREADS,                      \
             Config<BM, BN, WM, WN, S, MB>::SMEM_BYTES, kHasDirect<Config<BM, BN, WM, WN, S, MB>> ? 1 : 0, \
             is_built(ID) ? 1 : 0},
constexpr ConfigInfo kConfigs[] = {HINM_SPMM_CONFIGS(HINM_INFO)};
#undef HINM_INFO
constexpr int kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);

cudaError_t dispatch(int config, bool gather, bool bf16, const Params& p, int rows, int device, cudaStream_t stream) {
  switch (config) {
#define HINM_CASE(ID, BM, BN, WM, WN, S, MB) \
  case ID:                                   \
    return dispatch_config<ID, Config<BM, BN, WM, WN, S, MB>>(gather, bf16, p, rows, device, stream);
    HINM_SPMM_CONFIGS(HINM_CASE)
#undef HINM_CASE
    default:
      return cudaErrorInvalidConfiguration;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (host only, on shapes and attributes): shared by the FFI handler and the ctypes entry point
// hinm_spmm_check, so a machine without a GPU tests exactly the checks the handler applies.
// ---------------------------------------------------------------------------------------------------------------
struct CallShapes {
  int64_t x[2], values[2], meta[3], vidx[2], perm[1], y[2];
  int64_t bias_count, bias_rank, bias0;
  int64_t gather, config, vector_size, transposed_out;
};

std::string dims_str(const int64_t* d, int n) {
  std::string s = "(";
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (n == 1 ? ",)" : ")");
}

// Fills the shape fields of `p` and returns "" when the call is valid, else what is wrong. `*empty` is set when the
// output has no elements (nothing to launch).
std::string check_call(const CallShapes& c, Params* p, bool* empty) {
  const auto D = [](const int64_t* d, int n) { return dims_str(d, n); };
  *empty = false;
  if (c.config < 0 || c.config >= kNumConfigs || !kConfigs[c.config].built)
    return "config=" + std::to_string(c.config) + " is not compiled into this library";
  const ConfigInfo& cfg = kConfigs[c.config];
  const bool transposed = c.transposed_out != 0;
  if (c.transposed_out != 0 && c.transposed_out != 1)
    return "transposed_out=" + std::to_string(c.transposed_out) + " must be 0 or 1";
  if (c.gather != 0 && c.gather != 1) return "gather=" + std::to_string(c.gather) + " must be 0 or 1";
  // A permutation is only applied by the y^T epilogue: with y written directly it would be ignored.
  if (c.perm[0] != 0 && !transposed)
    return "row_perm " + D(c.perm, 1) + " is not empty but transposed_out=0: the direct epilogue writes packed row r "
           "to channel r and would ignore it (pass transposed_out=1, or row_perm (0,))";

  // y: (T, O), or y^T: (O, T_y) with T_y a multiple of 8 (its padding tokens are written too).
  const int64_t T = transposed ? c.y[1] : c.y[0], O = transposed ? c.y[0] : c.y[1];
  const int64_t rows = c.values[0], Kc_p = c.values[1], K_vp = 2 * Kc_p;
  if (T == 0 || O == 0) {
    *empty = true;
    return "";
  }
  const int64_t kMax = int64_t{1} << 30;
  if (T >= kMax || O >= kMax || rows >= kMax || K_vp >= kMax) return "a dimension exceeds 2**30";
  if (transposed && T % 8 != 0) return "y^T " + D(c.y, 2) + ": token axis must be a multiple of 8";
  if (Kc_p <= 0 || Kc_p % kBKc != 0) return "values " + D(c.values, 2) + ": row length must be a multiple of 32";
  if (rows % cfg.bm != 0 || O > rows)
    return "values " + D(c.values, 2) + ": rows must be a multiple of BM=" + std::to_string(cfg.bm) +
           " and >= O=" + std::to_string(O);
  if (c.meta[0] != rows / 16 || c.meta[1] != K_vp / kKStep || c.meta[2] != kMetaWordsPerStep)
    return "metadata " + D(c.meta, 3) + " does not match values " + D(c.values, 2);
  if (c.perm[0] != rows && c.perm[0] != 0)
    return "row_perm " + D(c.perm, 1) + " must be (0,) or match values " + D(c.values, 2);
  if (c.bias_count != 0 && (c.bias_rank != 1 || c.bias0 != O))
    return "bias (" + std::to_string(c.bias_count) + " elements) must be (0,) or (O,) with O=" + std::to_string(O);

  p->T = static_cast<int>(T);
  p->T_out = static_cast<int>(T);
  p->O = static_cast<int>(O);
  p->Kc_p = static_cast<int>(Kc_p);
  p->K_vp = static_cast<int>(K_vp);
  p->transposed_out = transposed ? 1 : 0;
  if (c.gather) {
    // x is x^T: (K, T_pad); tokens past T_pad are zero filled.
    if (c.x[1] % 8 != 0 || c.x[1] >= kMax || c.x[0] >= kMax)
      return "x^T " + D(c.x, 2) + ": token axis must be a multiple of 8";
    if (c.vector_size <= 0 || c.vector_size % cfg.bm != 0 || rows % c.vector_size != 0)
      return "vector_size=" + std::to_string(c.vector_size) + " must be a multiple of BM=" + std::to_string(cfg.bm) +
             " dividing rows=" + std::to_string(rows);
    if (c.vidx[0] != rows / c.vector_size || c.vidx[1] != K_vp)
      return "vector_index " + D(c.vidx, 2) + " must be (rows / vector_size, K_vp) = (" +
             std::to_string(rows / c.vector_size) + ", " + std::to_string(K_vp) + ")";
    p->K = static_cast<int>(c.x[0]);
    p->x_ld = static_cast<int>(c.x[1]);
    p->V = static_cast<int>(c.vector_size);
  } else {
    if (!cfg.direct) return "config=" + std::to_string(c.config) + " has no direct (2:4) kernel";
    if (c.x[1] % 8 != 0 || c.x[1] > K_vp || (transposed ? c.x[0] > T : c.x[0] != T))
      return "x " + D(c.x, 2) + ": must be (T, K) with K a multiple of 8 and K <= " + std::to_string(K_vp);
    p->K = static_cast<int>(c.x[1]);
    p->x_ld = p->K;
    p->V = static_cast<int>(rows);
    p->T = static_cast<int>(c.x[0]);  // y^T may have padding tokens past the activation rows (computed as zeros)
  }
  if ((T + cfg.bn - 1) / cfg.bn > 65535) return "too many token tiles for one launch";
  return "";
}

// ---------------------------------------------------------------------------------------------------------------
// XLA FFI handler.
// ---------------------------------------------------------------------------------------------------------------
ffi::Error invalid(const std::string& what) { return ffi::Error::InvalidArgument("hinm_spmm: " + what); }

template <size_t N>
bool copy_dims(ffi::Span<const int64_t> d, int64_t (&out)[N]) {
  if (d.size() != N) return false;
  for (size_t i = 0; i < N; ++i) out[i] = d[i];
  return true;
}

ffi::Error SpmmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::Buffer<ffi::U32> meta,
                    ffi::Buffer<ffi::S32> vidx, ffi::Buffer<ffi::S32> perm, ffi::Buffer<ffi::F32> bias,
                    ffi::Result<ffi::AnyBuffer> y, int64_t gather, int64_t config, int64_t vector_size,
                    int64_t transposed_out) {
  const ffi::DataType dt = x.element_type();
  if (dt != ffi::DataType::F16 && dt != ffi::DataType::BF16) return invalid("x must be float16 or bfloat16");
  if (values.element_type() != dt || y->element_type() != dt) return invalid("x, values and y dtypes differ");
  CallShapes c{};
  if (!copy_dims(x.dimensions(), c.x) || !copy_dims(values.dimensions(), c.values) ||
      !copy_dims(meta.dimensions(), c.meta) || !copy_dims(vidx.dimensions(), c.vidx) ||
      !copy_dims(perm.dimensions(), c.perm) || !copy_dims(y->dimensions(), c.y))
    return invalid("ranks must be x 2, values 2, meta 3, vector_index 2, row_perm 1, y 2");
  c.bias_count = static_cast<int64_t>(bias.element_count());
  c.bias_rank = static_cast<int64_t>(bias.dimensions().size());
  c.bias0 = c.bias_rank > 0 ? bias.dimensions()[0] : 0;
  c.gather = gather;
  c.config = config;
  c.vector_size = vector_size;
  c.transposed_out = transposed_out;

  Params p{};
  bool empty = false;
  const std::string why = check_call(c, &p, &empty);
  if (!why.empty()) return invalid(why);
  if (empty) return ffi::Error::Success();
  p.x = x.untyped_data();
  p.values = values.untyped_data();
  p.meta = meta.typed_data();
  p.vidx = vidx.typed_data();
  p.perm = c.perm[0] ? perm.typed_data() : nullptr;
  p.bias = c.bias_count ? bias.typed_data() : nullptr;
  p.y = y->untyped_data();

  int device = 0, major = 0;
  cudaError_t err = stream_device(stream, &device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hinm_spmm: ") + cudaGetErrorString(err));
  if (major < 8) return ffi::Error(ffi::ErrorCode::kUnimplemented, "hinm_spmm: mma.sp needs compute capability >= 8.0");

  err = dispatch(static_cast<int>(config), gather != 0, dt == ffi::DataType::BF16, p, static_cast<int>(c.values[0]),
                 device, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hinm_spmm launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace hinm

XLA_FFI_DEFINE_HANDLER_SYMBOL(HinmSpmm, hinm::SpmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()              // x or x^T
                                  .Arg<ffi::AnyBuffer>()              // values
                                  .Arg<ffi::Buffer<ffi::U32>>()       // metadata
                                  .Arg<ffi::Buffer<ffi::S32>>()       // vector_index
                                  .Arg<ffi::Buffer<ffi::S32>>()       // row_perm
                                  .Arg<ffi::Buffer<ffi::F32>>()       // bias
                                  .Ret<ffi::AnyBuffer>()              // y
                                  .Attr<int64_t>("gather")
                                  .Attr<int64_t>("config")
                                  .Attr<int64_t>("vector_size")
                                  .Attr<int64_t>("transposed_out"));

// ---------------------------------------------------------------------------------------------------------------
// Host-callable introspection (ctypes): the configuration table and the index functions, so the Python model and
// heuristics are checked against the exact code the kernel uses. Works without a GPU.
// ---------------------------------------------------------------------------------------------------------------
extern "C" int hinm_spmm_num_configs() { return hinm::kNumConfigs; }

extern "C" int hinm_spmm_config_info(int id, int* out) {
  if (id < 0 || id >= hinm::kNumConfigs) return -1;
  const hinm::ConfigInfo& c = hinm::kConfigs[id];
  const int v[10] = {c.id, c.bm, c.bn, c.warps_m, c.warps_n, c.stages, c.threads, c.smem_bytes, c.direct, c.built};
  for (int i = 0; i < 10; ++i) out[i] = v[i];
  return 0;
}

// The handler's argument checks on plain shapes: dims = x(2) values(2) meta(3) vidx(2) perm(1) y(2) bias(count, rank,
// dim0) attrs(gather, config, vector_size, transposed_out) = 19 values. Returns 0 and an empty message when the call
// is valid, else 1 and the message (truncated to msg_len - 1 bytes).
extern "C" int hinm_spmm_check(const long long* dims, char* msg, int msg_len) {
  hinm::CallShapes c{};
  int i = 0;
  for (auto* d : {&c.x[0], &c.x[1], &c.values[0], &c.values[1], &c.meta[0], &c.meta[1], &c.meta[2], &c.vidx[0],
                  &c.vidx[1], &c.perm[0], &c.y[0], &c.y[1], &c.bias_count, &c.bias_rank, &c.bias0, &c.gather,
                  &c.config, &c.vector_size, &c.transposed_out})
    *d = dims[i++];
  hinm::Params p{};
  bool empty = false;
  const std::string why = hinm::check_call(c, &p, &empty);
  if (msg_len > 0) {
    const size_t n = why.size() < static_cast<size_t>(msg_len - 1) ? why.size() : static_cast<size_t>(msg_len - 1);
    why.copy(msg, n);
    msg[n] = '\0';
  }
  return why.empty() ? 0 : 1;
}

extern "C" long long hinm_spmm_probe(int fn, int a, int b, int c) {
  switch (fn) {
    case 0: return hinm::a_chunk_offset(a, b);
    case 1: return hinm::bt_chunk_offset(a, b, c);
    case 2: return hinm::bn_chunk_offset(a, b);
    case 3: return hinm::a_ldsm_row(a);
    case 4: return hinm::a_ldsm_chunk(a, b);
    case 5: return hinm::bt_ldsm_krow(a, b);
    case 6: return hinm::bn_ldsm_row(a);
    case 7: return hinm::bn_ldsm_chunk(a, b);
    case 8: return hinm::meta_word(a);
    case 9: return hinm::kBK;
    case 10: return hinm::kPadMetaWord;
    default: return -1;
  }
}
