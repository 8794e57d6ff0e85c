// HiNM / N:M sparse x dense product on the CPU, as XLA FFI handlers ("hinm_spmm_cpu", "hinm_layers_cpu").
//
//   y[t, perm[b*V + r]] = sum_i vals[b, r, i] * x[t, vidx[b, (i / n) * m + pos[b, r, i]]]  (+ bias)
//
// for every block b of V output channels (packed rows), every packed row r of the block and every
// kept value i (stripe j = i / n, position pos in 0..m-1 inside the stripe). The layout the kernel
// reads (cpu_ffi/packing.py makes it from the canonical compressed format, once):
//
//   vals  (nb, G, nnz, 16)  the values, 16 packed rows interleaved ("groups": G = ceil(V / 16));
//                           rows past V in the last group of a block are padding (value 0).
//   pos   (nb, G, nnz, 16)  uint8 stripe positions, same order.
//   in    (nb, G, nnz, 16)  uint16 input of each value, vidx[b, (i / n) * m + pos], same order (mode 1);
//                           empty where K > 65536 (mode 1 then runs as mode 0).
//   vidx  (nb, K_v)         int32, each block's kept inputs in walk order.
//   perm  (nb * V,)         int32, packed row -> output channel.
//
// bfloat16 values of 2:4 stripes come in the pair layout instead, vals, pos and in (nb, G, nnz / 2, 32): a
// row's two values of a stripe side by side (one 32-bit word), positions ascending (see Wts below).
//
// Two schedules, chosen by the caller per call (attribute `mode`):
//
//   mode 0 (few tokens): rows in vector lanes. For each block, the kept activations of each token are
//     gathered once into a window (K_v floats); a stripe's m window entries are loaded into one vector
//     and every lane (packed row) picks its own with a variable permute (vpermps), then one FMA with
//     the 16 rows' values. Values and positions are read once per call: at T = 1 the kernel reads
//     only the compressed weight (bandwidth bound, like a dense GEMV on a quarter of the bytes).
//     With m = 4 (AVX-512 or AVX2), from three tokens on, one window vector holds a stripe's 4 inputs
//     for L / 4 tokens, built by shuffles from x transposed once per call into 8-token chunks (windows4).
//   mode 1 (many tokens): tokens in vector lanes (XNNPACK's SpMM layout). x is transposed into
//     tiles xt[tile][k][TT] (TT tokens per tile), a group of tiles at a time into a two-group ring
//     (xt_slot) right before the units that read it; each kept value of a block is broadcast and
//     multiplies the TT-token row of xt at its input (in: no lookup of pos in vidx), read in place: one
//     FMA per value per L tokens, R rows at a time so R*TT/L independent accumulators hide the FMA
//     latency, a chunk of stripes at a time so that the chunk's rows of xt stay in L1 while every row
//     of the unit walks them. Where there are two tiles or more, a float32 unit takes two tiles side
//     by side (float32 tiles are stored in pairs, each row of xt 2 * TT tokens), so that each broadcast
//     value and input index serves twice the tokens. Units run in super-tiles (a group of blocks x a
//     group of tiles) so that weights and x tiles both stay cached.
//
// Both schedules accumulate in fp32, add the bias, apply the activation (attribute `activation`: none,
// ReLU or the exact GELU, see epilogue) and write output channel perm[r] directly; mode 1 stages the
// outputs of a permuted layout (rows of a block going to non-consecutive channels, as after 2CP) in
// packed-row order and writes each finished token tile 16 channels x L tokens at a time
// (permute_out, put16). Work is split into units (block pieces x token tiles) taken from an atomic counter
// by the calling thread and, in calls large enough (kParallelFrom), by tasks on XLA's intra-op
// thread pool (ffi::ThreadPool), so the kernel uses every core the dense dot it replaces would use.
// A second handler, hinm_layers_cpu, runs several layers of float32 activations in one call of mode 1
// (run_tokens): up to kMaxLayers products of one x (an attention layer's query, key and value: x is
// transposed into tiles once for all of them), or a feed-forward block of two, whose first layer writes
// its activated outputs straight into the second layer's x^T tiles (rows of tokens are what its
// accumulators hold) a group of tiles at a time, so that the intermediate activations are never written
// out whole nor transposed back. Each output is the same, bit for bit, as one call per layer.
// bf16 activations with pair-layout weights use the AVX-512 BF16 dot product (vdpbf16ps: two
// multiply-adds per lane) where the build has it; other bf16 inputs are widened to fp32 on load.
// bf16 outputs are rounded to nearest even.
//
// Instruction sets: GCC vector extensions of L lanes, L = 16 with AVX-512, 8 with AVX2, 4 otherwise,
// chosen by the compiler flags of the build (cpu_ffi/build.py compiles for the host, -march=native,
// and keys its cache by the host's ISA). Stripes longer than L (m > L) take a portable scalar path.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace hinm_cpu {

#if defined(__AVX512F__)
#define HINM_LANES 16
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__)
#define HINM_LANES 8
constexpr const char* kIsa = "avx2";
#else
#define HINM_LANES 4
constexpr const char* kIsa = "generic";
#endif
constexpr int L = HINM_LANES;

constexpr int kGroup = 16;  // packed rows interleaved in the layout (fixed: the packer's layout)
constexpr int kSub = kGroup / L;
// Mode 1's register tile: kRows packed rows x 2 * kTile tokens (two tiles side by side, kSpan), that
// is kRows * 2 * kTile / L accumulators. AVX-512 (32 registers): 4 rows x 4 vectors. AVX2 has 16
// registers: 4 rows x 4 vectors (16 tokens a tile) spilled; 1 row x 8 vectors (32 tokens a tile) has
// 8 accumulators and the fewest loads per multiply-add (8 x-row loads, a broadcast weight and its input
// index per 8 FMAs): on a 2-core Zen 3, calls 384x1536 / 1536x384 T = 64-2048 ran 1.04-1.24x faster
// than with 2 rows x 4 vectors, 1.1-1.9x faster than with the spilling tile, and MiniLM-L6 end to end
// 1.05x (benchmarks/RESULTS.md).
constexpr int kTile = L == 8 ? 4 * L : 2 * L;  // tokens per tile in mode 1
constexpr int kRows = L == 8 ? 1 : 4;          // packed rows per register tile in mode 1
// Token tiles side by side in one unit of mode 1 (float32 multiply-adds, two tiles or more): each
// broadcast weight and position then serves 2 * kTile tokens (4 vectors with AVX-512). On one Zen 4
// core this raised the multiply-add loop alone from 1.6 to 2.2-2.4 zmm FMA/ns; whole calls gain less
// (benchmarks/RESULTS.md). With AVX-512, register tiles stay kRows rows (x 4 vectors): 2 or 1 rows ran
// faster in the loop alone but 0-6% slower in whole calls.
constexpr int kSpan = 2;
constexpr int kChains = 8;    // independent accumulators in mode 0 (the FMA latency bounds a single chain)
constexpr int kAhead = 16;    // panel rows prefetched ahead in mode 1 (bfloat16 dot products)
constexpr int64_t kPanelBytes = 8 << 10;   // panel bytes per chunk of stripes in mode 1 (bfloat16 dot products)
// Bytes of xt rows per chunk of stripes in mode 1 (float32 multiply-adds). Reading the rows in place
// with 16 KB chunks, instead of copying 8 KB chunks into a contiguous panel, made one-thread calls
// 1536x384 / 384x1536 T = 256-2048 5-10% faster (benchmarks/RESULTS.md).
constexpr int64_t kChunkBytes = 16 << 10;
constexpr double kSuperBytes = 2 << 20;   // mode 1: weight bytes and x^T bytes of one super-tile

typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint8_t vu8 __attribute__((vector_size(L)));
typedef uint16_t vu16 __attribute__((vector_size(2 * L)));
typedef uint32_t vu32 __attribute__((vector_size(4 * L)));

// ---- scalar types ----------------------------------------------------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

struct F32 {
  using T = float;
  static float get(const T* p, int64_t i) { return p[i]; }
  static void put(T* p, int64_t i, float v) { p[i] = v; }
  static vf load(const T* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
};

struct BF16 {
  using T = uint16_t;
  static float get(const T* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void put(T* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
  static vf load(const T* p) {
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    vu32 u = __builtin_convertvector(h, vu32) << 16;
    vf v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
};

inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storef(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline vi load_pos(const uint8_t* p) {
#if HINM_LANES == 16
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif HINM_LANES == 8
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vu8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vi);
#endif
}

// Lane i of the result is w[idx[i]] (idx < L).
inline vf permute(vf w, vi idx) {
#if HINM_LANES == 16
  return (vf)_mm512_permutexvar_ps((__m512i)idx, (__m512)w);
#elif HINM_LANES == 8
  return (vf)_mm256_permutevar8x32_ps((__m256)w, (__m256i)idx);
#else
  return __builtin_shuffle(w, idx);
#endif
}

inline vf splat(float s) {
#if HINM_LANES == 16
  return (vf)_mm512_set1_ps(s);
#elif HINM_LANES == 8
  return (vf)_mm256_set1_ps(s);
#else
  return vf{} + s;
#endif
}

// ---- the weight layouts ----------------------------------------------------------------------------

// Where packed row r's value i (and its position) lies inside its group, for the two layouts:
//   canonical  [i][16 rows]               (any n, float32 or bfloat16 values)
//   pairs      [i / 2][16 rows][i % 2]    (bfloat16, n = 2, m = 4: a row's two values of a stripe are one
//                                          32-bit word, the operand of the AVX-512 BF16 dot instruction)
// The packer chooses (cpu_ffi/packing.py); the kernel tells them apart by the arrays' last axis (16 or 32).
template <class W, bool P>
struct Wts {
  using T = typename W::T;
  static_assert(!P || std::is_same_v<W, BF16>, "the pair layout holds bfloat16 values");
  static constexpr bool pairs = P;
  static int64_t off(int64_t i, int64_t r) { return P ? (i >> 1) * 2 * kGroup + 2 * r + (i & 1) : i * kGroup + r; }
  static float get(const T* g, int64_t i, int64_t r) { return W::get(g, off(i, r)); }
  static int pos(const uint8_t* g, int64_t i, int64_t r) { return g[off(i, r)]; }
  // Lanes s*L .. s*L+L-1 (packed rows) of value i, widened to fp32.
  static vf load(const T* g, int64_t i, int s) {
    if constexpr (!P) {
      return W::load(g + i * kGroup + s * L);
    } else {
      vu32 u;  // L words: (value 2j, value 2j+1) of L rows; a bfloat16 in the top half is its float32
      std::memcpy(&u, g + (i >> 1) * 2 * kGroup + s * 2 * L, sizeof(u));
      u = (i & 1) ? (u & 0xffff0000u) : (u << 16);
      vf v;
      std::memcpy(&v, &u, sizeof(v));
      return v;
    }
  }
  static vi load_pos(const uint8_t* g, int64_t i, int s) {
    if constexpr (!P) {
      return hinm_cpu::load_pos(g + i * kGroup + s * L);
    } else {
      typedef uint8_t vb2 __attribute__((vector_size(2 * L)));
      typedef uint16_t vh2 __attribute__((vector_size(4 * L)));
      vb2 b;
      std::memcpy(&b, g + (i >> 1) * 2 * kGroup + s * 2 * L, sizeof(b));
      const vh2 h = __builtin_convertvector(b, vh2);
      vu32 u;
      std::memcpy(&u, &h, sizeof(u));
      u = (i & 1) ? (u >> 16) : (u & 0xffffu);
      return (vi)u;
    }
  }
};

// ---- the problem -----------------------------------------------------------------------------------

struct Problem {
  int64_t t, k, o;      // tokens, inputs, outputs
  int64_t nb, kv, v;    // blocks, kept inputs per block, packed rows per block
  int64_t n, m, nnz;    // kept per stripe, stripe length, kept values per row (kv / m * n)
  int64_t groups;       // 16-row groups per block
  const void* x;
  const void* vals;
  const uint8_t* pos;
  const uint16_t* in;   // nullptr: none (mode 1 needs it for float32 multiply-adds)
  const int32_t* vidx;
  const int32_t* perm;
  const float* bias;    // nullptr: none
  int64_t act;          // the activation of the epilogue (Act)
  void* y;
  float* xt;            // mode 1: transposed tiles, k * kTile floats each (slots, see xt_tile); mode 0: x8 (windows4)
  int64_t xt_stride;    // mode 1: floats from one row of a tile of xt to the next: kTile, or 2 * kTile (pairs)
  int64_t ring_tiles;   // mode 1: tiles per group of the x^T ring (0: one slot per tile)
  // mode 1 with permuted output rows (row_perm not consecutive inside a block): each unit stores its
  // partial outputs in packed-row order, stage[tile][packed row][kTile] (see stage_tile), and the unit
  // that completes a tile writes it to y, 16 channels x L tokens at a time (see permute_out).
  // nullptr: direct writes.
  float* stage;
  const int32_t* inv;             // output channel -> packed row (the inverse of perm); set: staged
  std::atomic<int32_t>* tile_done;  // units finished per tile, with stage
  int64_t pieces;                 // units per tile (mode 1)
  // The first layer of a feed-forward block (hinm_layers_cpu, mode 1): its outputs, activated, are written
  // as the second layer's x^T (tile_rows(ht, slot, o, xt_stride), row = output channel) instead of y:
  // rows of kTile tokens, so a unit's partial sums go there as they are, in any row order (no transposes
  // and no staging), and they stay in the caches for the second layer's units. nullptr: write y.
  float* ht;
  bool direct;          // a single block whose vector index is 0..K-1
  // float32 outputs of kStreamFrom bytes or more are written by put16 with streaming stores: they
  // would not stay in a core's L2, and skipping the read for ownership of each line made MiniLM-L6
  // about 4% faster end to end (benchmarks/RESULTS.md).
  bool stream;
};

// Mode 1: x^T is a ring of kRing groups of ring_tiles token tiles (consecutive tiles of a group in
// consecutive slots): a group's slots are transposed into once the units of the group kRing before
// it have finished, so x^T stays in the caches instead of being written to memory for the whole call.
// Three slots: a group is transposed while the units of the group before it run (see run), into the
// slots of the one before that.
constexpr int64_t kRing = 3;
inline int64_t xt_slot(const Problem& p, int64_t tile) {
  return p.ring_tiles ? (tile / p.ring_tiles) % kRing * p.ring_tiles + tile % p.ring_tiles : tile;
}
// Row 0 of tile i of an array of tiles of `rows` rows of kTile floats, rows `stride` floats apart: with
// stride = 2 * kTile, tiles 2j and 2j + 1 are stored as one pair, row r of the pair holding both tiles'
// tokens (so that a unit of two tiles reads or accumulates 2 * kTile floats per row).
inline float* tile_rows(float* base, int64_t i, int64_t rows, int64_t stride) {
  const int64_t per = stride / kTile;  // tiles side by side: 1 or 2
  return base + (i / per) * rows * stride + (i % per) * kTile;
}
inline float* xt_tile(const Problem& p, int64_t tile) { return tile_rows(p.xt, xt_slot(p, tile), p.k, p.xt_stride); }

// Thread-local scratch that grows and is never shrunk: windows, panels and partial sums are rebuilt
// every unit, and a fresh allocation per call would pay page faults larger than the work it holds.
// Aligned to a cache line: the panels' vector loads must not straddle two lines.
inline float* scratch(size_t floats) {
  constexpr size_t kLine = 64 / sizeof(float);
  thread_local std::vector<float> buf;
  if (buf.size() < floats + kLine) buf.resize(floats + kLine);
  const auto at = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - at % 64) % 64) / sizeof(float);
}

// The per-call buffer (mode 1: the x^T ring, then the staged outputs of a permuted layout; mode 0: x in
// 8-token chunks for windows4), owned by the calling thread for the duration of the call (the pool's
// helpers reach it through Problem) and kept for its next call up to kKeepFloats; larger ones are
// freed when the call ends. It used to be a second output of the custom call, which made XLA's
// temporary arena of a whole model larger by that much, and its pages were faulted in again in
// every run: a sparse FFN block (384x1536, GELU, 1536x384 at T = 2048) took 26.5 ms with 12,000
// page faults per run against 15.1 ms and 200 now (benchmarks/RESULTS.md).
constexpr size_t kKeepFloats = size_t(64) << 20 >> 2;  // 64 MB
constexpr int64_t kStreamFrom = int64_t(1) << 20;       // output bytes from which put16 streams (Problem::stream)

class CallBuffer {
 public:
  explicit CallBuffer(size_t floats) {
    constexpr size_t kLine = 64 / sizeof(float);
    thread_local std::vector<float> kept;
    float* base;
    if (floats <= kKeepFloats) {
      if (kept.size() < floats + kLine) kept.resize(floats + kLine);
      base = kept.data();
    } else {
      own_.reset(new float[floats + kLine]);
      base = own_.get();
    }
    const auto at = reinterpret_cast<uintptr_t>(base);
    data_ = base + ((64 - at % 64) % 64) / sizeof(float);
  }
  float* data() const { return data_; }

 private:
  std::unique_ptr<float[]> own_;
  float* data_;
};

// ---- the epilogue ----------------------------------------------------------------------------------

// The activation applied to every output after the bias (attribute `activation`). Fusing it saves the
// separate pass over the whole output that the activation is otherwise (MiniLM-L6's GELU:
// benchmarks/RESULTS.md).
enum Act : int64_t { kNone = 0, kRelu = 1, kGelu = 2 };

// Exact GELU, v * Phi(v) with Phi(v) = (1 + erf(v / sqrt 2)) / 2. erf from Abramowitz and Stegun
// 7.1.28: for z >= 0, erf(z) = 1 - 1 / s(z) with s(z) = (1 + a1 z + ... + a6 z^6)^16, |error| <= 3e-7
// (in float32 the 16th power adds rounding: the GELU within 6e-7 * max(1, |v|), tests/test_cpu_ffi.py);
// so Phi(v) = 1 - 0.5 / s(|v| / sqrt 2) for v >= 0 and 0.5 / s(|v| / sqrt 2) below (no cancellation in
// the negative tail). s overflows to infinity for large |v|, which gives Phi = 1 or 0 as it should.
inline vf gelu(vf v) {
  const vf z = (vf)((vi)v & 0x7fffffff) * 0.70710678118654752f;
  vf s = 0.0000430638f * z + 0.0002765672f;
  s = s * z + 0.0001520143f;
  s = s * z + 0.0092705272f;
  s = s * z + 0.0422820123f;
  s = s * z + 0.0705230784f;
  s = s * z + 1.0f;
  s *= s;  // ^2
  s *= s;  // ^4
  s *= s;  // ^8
  s *= s;  // ^16
  const vf h = 0.5f / s;
  return v * (v < 0.0f ? h : 1.0f - h);
}

inline vf activate(const Problem& p, vf v) {
  if (p.act == kGelu) return gelu(v);
  if (p.act == kRelu) return v < 0.0f ? vf{} : v;  // NaN stays NaN
  return v;
}

inline float activate(const Problem& p, float v) {
  if (p.act == kNone) return v;
  return activate(p, splat(v))[0];
}

// Writes one packed row's outputs for tokens t0.. (cnt of them): y[t, perm[row]] = act(acc[i] + bias).
template <class Y>
inline void put_row(const Problem& p, int64_t row, int64_t t0, int64_t cnt, const float* acc, int64_t stride) {
  const int64_t c = p.perm[row];
  const float b = p.bias ? p.bias[c] : 0.0f;
  auto* y = static_cast<typename Y::T*>(p.y);
  for (int64_t i = 0; i < cnt; ++i) Y::put(y, (t0 + i) * p.o + c, activate(p, acc[i * stride] + b));
}

// Writes a unit's outputs token by token: y[t0 + tt, c0 + r] = act(at(r, tt) + bias) for r < rows, tt <
// cnt: rows whose channels are consecutive from c0 (permuted layouts are staged instead, see
// finish_unit), in float32 stored as vectors. With AVX-512 or AVX2 only the rows past the last 16 come here
// (put16 writes 16 at a time).
template <class Y, class At>
inline void put_tokens(const Problem& p, int64_t c0, int64_t rows, int64_t t0, int64_t cnt, const At& at) {
  auto* y = static_cast<typename Y::T*>(p.y) + t0 * p.o + c0;
  const float* bias = p.bias ? p.bias + c0 : nullptr;
  for (int64_t tt = 0; tt < cnt; ++tt, y += p.o) {
    int64_t r = 0;
    if constexpr (std::is_same_v<Y, F32>) {
      alignas(64) float buf[L];
      for (; r + L <= rows; r += L) {
        for (int l = 0; l < L; ++l) buf[l] = at(r + l, tt);
        vf v = loadf(buf);
        if (bias) v += loadf(bias + r);
        storef(y + r, activate(p, v));
      }
    }
    for (; r < rows; ++r) Y::put(y, r, activate(p, at(r, tt) + (bias ? bias[r] : 0.0f)));
  }
}

// One group's outputs of mode 0: out[tt * kGroup + r] is packed row g * kGroup + r of block b, token t0 + tt.
template <class Y>
inline void put_group(const Problem& p, int64_t b, int64_t g, int64_t t0, int64_t cnt, const float* out) {
  const int64_t rows = std::min<int64_t>(kGroup, p.v - g * kGroup);
  for (int64_t r = 0; r < rows; ++r) put_row<Y>(p, b * p.v + g * kGroup + r, t0, cnt, out + r, kGroup);
}

// ---- mode 0: rows in lanes -------------------------------------------------------------------------

// Tokens per pass: accumulators and windows both live in registers.
constexpr int kTokens0 = L == 16 ? 8 : (L == 8 ? 4 : 2);
constexpr int64_t kX8 = 8;  // tokens per chunk of x8 (windows4, AVX-512 and AVX2)

// win[tt * stride + jj] = x[t0 + tt, vidx[b, jj]] in fp32, for tt < cnt; padded with zeros to stride.
template <class X>
void gather_windows(const Problem& p, int64_t b, int64_t t0, int64_t cnt, float* win, int64_t stride) {
  const auto* x = static_cast<const typename X::T*>(p.x);
  const int32_t* vi_b = p.vidx + b * p.kv;
  for (int64_t tt = 0; tt < cnt; ++tt) {
    const typename X::T* row = x + (t0 + tt) * p.k;
    float* w = win + tt * stride;
    if (p.direct) {
      for (int64_t jj = 0; jj < p.kv; ++jj) w[jj] = X::get(row, jj);
    } else {
      for (int64_t jj = 0; jj < p.kv; ++jj) w[jj] = X::get(row, vi_b[jj]);
    }
    std::fill(w + p.kv, w + stride, 0.0f);
  }
}

// One group of 16 packed rows, tokens t0 .. t0+cnt (cnt <= kTokens0), windows already gathered.
template <class W, class Y, int NT>
void group_rows_in_lanes(const Problem& p, int64_t b, int64_t g, int64_t t0, const float* win, int64_t stride) {
  const auto* vals = static_cast<const typename W::T*>(p.vals) + (b * p.groups + g) * p.nnz * kGroup;
  const uint8_t* pos = p.pos + (b * p.groups + g) * p.nnz * kGroup;
  // A independent partial sums per output vector (stripes j = a mod A), so that about kChains
  // FMA chains are in flight: the FMA latency, not the port, bounds a single chain.
  constexpr int A = std::max(1, kChains / (NT * kSub));
  vf acc[A][NT][kSub];
  for (int a = 0; a < A; ++a)
    for (int tt = 0; tt < NT; ++tt)
      for (int s = 0; s < kSub; ++s) acc[a][tt][s] = vf{};
  const int64_t stripes = p.kv / p.m;
  auto stripe = [&](int64_t j, vf (&part)[NT][kSub]) {
    vf w[NT];
    for (int tt = 0; tt < NT; ++tt) w[tt] = loadf(win + tt * stride + j * p.m);  // stripe j in lanes 0..m-1
    for (int64_t q = 0; q < p.n; ++q) {
      const int64_t i = j * p.n + q;
      for (int s = 0; s < kSub; ++s) {
        const vf v = W::load(vals, i, s);
        const vi ps = W::load_pos(pos, i, s);
        for (int tt = 0; tt < NT; ++tt) part[tt][s] += v * permute(w[tt], ps);
      }
    }
  };
  int64_t j = 0;
  for (; j + A <= stripes; j += A)
    for (int a = 0; a < A; ++a) stripe(j + a, acc[a]);
  for (; j < stripes; ++j) stripe(j, acc[0]);
  for (int a = 1; a < A; ++a)
    for (int tt = 0; tt < NT; ++tt)
      for (int s = 0; s < kSub; ++s) acc[0][tt][s] += acc[a][tt][s];
  alignas(64) float out[NT][kGroup];
  for (int tt = 0; tt < NT; ++tt)
    for (int s = 0; s < kSub; ++s) storef(&out[tt][s * L], acc[0][tt][s]);
  put_group<Y>(p, b, g, t0, NT, &out[0][0]);
}

template <class W, class Y>
void group_rows_in_lanes_n(const Problem& p, int64_t b, int64_t g, int64_t t0, int64_t cnt, const float* win,
                           int64_t stride) {
  switch (cnt) {
#define HINM_CASE(N) \
  case N:            \
    return group_rows_in_lanes<W, Y, N>(p, b, g, t0, win, stride);
    HINM_CASE(1)
    HINM_CASE(2)
#if HINM_LANES >= 8
    HINM_CASE(3)
    HINM_CASE(4)
#endif
#if HINM_LANES >= 16
    HINM_CASE(5)
    HINM_CASE(6)
    HINM_CASE(7)
    HINM_CASE(8)
#endif
#undef HINM_CASE
  }
}

// ---- portable path: any m (also the reference for the vector paths in tests) -----------------------

template <class W, class Y>
void group_scalar(const Problem& p, int64_t b, int64_t g, int64_t t0, int64_t cnt, const float* win,
                  int64_t stride) {
  const auto* vals = static_cast<const typename W::T*>(p.vals) + (b * p.groups + g) * p.nnz * kGroup;
  const uint8_t* pos = p.pos + (b * p.groups + g) * p.nnz * kGroup;
  const int64_t rows = std::min<int64_t>(kGroup, p.v - g * kGroup);
  std::vector<float> acc(cnt);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < p.nnz; ++i) {
      const float v = W::get(vals, i, r);
      const int64_t jj = (i / p.n) * p.m + W::pos(pos, i, r);
      for (int64_t tt = 0; tt < cnt; ++tt) acc[tt] += v * win[tt * stride + jj];
    }
    put_row<Y>(p, b * p.v + g * kGroup + r, t0, cnt, acc.data(), 1);
  }
}

#if HINM_LANES >= 8
// In-register transpose of an 8 x 8 block of 32-bit elements: r[i] (row i) becomes column i.
__attribute__((always_inline)) inline void transpose8(__m256 r[8]) {
  const __m256 a0 = _mm256_unpacklo_ps(r[0], r[1]), a1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 a2 = _mm256_unpacklo_ps(r[2], r[3]), a3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 a4 = _mm256_unpacklo_ps(r[4], r[5]), a5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 a6 = _mm256_unpacklo_ps(r[6], r[7]), a7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
  const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
  const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
  const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
  // b_i: column i of rows 0-3 | column 4 + i of rows 0-3, likewise b_{4+i} for rows 4-7
  r[0] = _mm256_permute2f128_ps(b0, b4, 0x20), r[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
  r[2] = _mm256_permute2f128_ps(b2, b6, 0x20), r[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
  r[4] = _mm256_permute2f128_ps(b0, b4, 0x31), r[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
  r[6] = _mm256_permute2f128_ps(b2, b6, 0x31), r[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}
#endif

#if HINM_LANES >= 8
// Mode 0 with 4-input stripes (AVX-512 or AVX2), from three tokens on: one window vector holds a
// stripe's four inputs for L / 4 tokens (lane tt * 4 + q), so that the windows are built with shuffles
// from x8 (below) instead of one scalar gather per token and input. Those gathers took a third of a
// call at T = 8 with V = 32 (benchmarks/RESULTS.md); a lane's index is then its position plus 4 * tt.
constexpr int64_t kWindows4From = L == 16 ? 3 : 4;  // tokens of a chunk from which windows4 pays
inline bool windows4(const Problem& p, int64_t cnt) { return p.m == 4 && cnt >= kWindows4From; }

// Chunks of kX8 tokens that windows4 reads from x8: every full one, the last one only when it has
// kWindows4From tokens or more.
inline int64_t windows4_chunks(const Problem& p) {
  return p.m == 4 ? (p.t + kX8 - kWindows4From) / kX8 : 0;
}

// x8[(c8 * K + k) * 8 + tt] = x[c8 * 8 + tt, k] (zeros past T), inputs k0 .. k1: each chunk of 8
// tokens side by side per input, built once per call (8 x 8 transposes in registers for float32).
template <class X>
void transpose_x8(const Problem& p, int64_t c8, int64_t k0, int64_t k1, float* x8) {
  const auto* x = static_cast<const typename X::T*>(p.x);
  float* out = x8 + c8 * p.k * 8;
  const int64_t rows = std::min<int64_t>(8, p.t - c8 * 8);
  int64_t k = k0;
  if constexpr (std::is_same_v<X, F32>) {
    for (; k + 8 <= k1; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(x + (c8 * 8 + i) * p.k + k) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (k + i) * 8, r[i]);
    }
  }
  for (int tt = 0; tt < 8; ++tt) {
    const typename X::T* row = x + (c8 * 8 + tt) * p.k;
    for (int64_t kk = k; kk < k1; ++kk) out[kk * 8 + tt] = tt < rows ? X::get(row, kk) : 0.0f;
  }
}

// w4[j * 32 + tt * 4 + q] = x[t0 + tt, vidx[b, 4j + q]]: stripe j's inputs for the chunk's tokens
// tt = 0..7, a 4 x 8 transpose of four x8 rows per stripe.
inline void build_windows4(const Problem& p, int64_t b, const float* x8c, float* w4) {
  const int32_t* vi = p.vidx + b * p.kv;
  for (int64_t j = 0; j < p.kv / 4; ++j) {
    auto col = [&](int q) { return _mm256_loadu_ps(x8c + (p.direct ? 4 * j + q : vi[4 * j + q]) * 8); };
    const __m256 r0 = col(0), r1 = col(1), r2 = col(2), r3 = col(3);
    const __m256 a = _mm256_unpacklo_ps(r0, r1), c = _mm256_unpackhi_ps(r0, r1);
    const __m256 d = _mm256_unpacklo_ps(r2, r3), e = _mm256_unpackhi_ps(r2, r3);
    // u_k: token k (inputs q = 0..3) in the low 128 bits, token k + 4 in the high ones
    const __m256 u0 = _mm256_shuffle_ps(a, d, 0x44), u1 = _mm256_shuffle_ps(a, d, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(c, e, 0x44), u3 = _mm256_shuffle_ps(c, e, 0xEE);
#if HINM_LANES == 16
    const __m512 lo = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_permute2f128_ps(u0, u1, 0x20)),
                                         _mm256_permute2f128_ps(u2, u3, 0x20), 1);
    const __m512 hi = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_permute2f128_ps(u0, u1, 0x31)),
                                         _mm256_permute2f128_ps(u2, u3, 0x31), 1);
    _mm512_storeu_ps(w4 + j * 32, lo);
    _mm512_storeu_ps(w4 + j * 32 + 16, hi);
#else
    _mm256_storeu_ps(w4 + j * 32, _mm256_permute2f128_ps(u0, u1, 0x20));       // tokens 0, 1
    _mm256_storeu_ps(w4 + j * 32 + 8, _mm256_permute2f128_ps(u2, u3, 0x20));   // tokens 2, 3
    _mm256_storeu_ps(w4 + j * 32 + 16, _mm256_permute2f128_ps(u0, u1, 0x31));  // tokens 4, 5
    _mm256_storeu_ps(w4 + j * 32 + 24, _mm256_permute2f128_ps(u2, u3, 0x31));  // tokens 6, 7
#endif
  }
}

// One group of 16 packed rows for tokens t0 .. t0+cnt (cnt <= H * L / 4) from build_windows4's windows
// (w4 at the first token's): H window vectors of L / 4 tokens each.
template <class W, class Y, int H>
void group_rows_in_lanes4(const Problem& p, int64_t b, int64_t g, int64_t t0, int64_t cnt, const float* w4) {
  constexpr int TW = L / 4;  // tokens per window vector
  const auto* vals = static_cast<const typename W::T*>(p.vals) + (b * p.groups + g) * p.nnz * kGroup;
  const uint8_t* pos = p.pos + (b * p.groups + g) * p.nnz * kGroup;
  vf acc[H * TW][kSub];
  for (int i = 0; i < H * TW; ++i)
    for (int s = 0; s < kSub; ++s) acc[i][s] = vf{};
  const int64_t stripes = p.kv / 4;
  for (int64_t j = 0; j < stripes; ++j) {
    vf w[H];
    for (int h = 0; h < H; ++h) w[h] = loadf(w4 + j * 32 + h * L);
    for (int64_t q = 0; q < p.n; ++q) {
      const int64_t i = j * p.n + q;
      for (int s = 0; s < kSub; ++s) {
        const vf v = W::load(vals, i, s);
        const vi ps = W::load_pos(pos, i, s);
        for (int tt = 0; tt < TW; ++tt) {
          const vi idx = ps + int32_t(4 * tt);
          for (int h = 0; h < H; ++h) acc[h * TW + tt][s] += v * permute(w[h], idx);
        }
      }
    }
  }
  alignas(64) float out[H * TW][kGroup];
  for (int i = 0; i < H * TW; ++i)
    for (int s = 0; s < kSub; ++s) storef(&out[i][s * L], acc[i][s]);
  put_group<Y>(p, b, g, t0, cnt, &out[0][0]);
}
#endif

// Unit of mode 0: groups [g0, g1) of block b, all tokens.
template <class X, class W, class Y>
void unit_mode0(const Problem& p, int64_t b, int64_t g0, int64_t g1) {
  const int64_t stride = p.kv + L;  // a full vector load at the last stripe stays inside
#if HINM_LANES >= 8
  const int64_t chunk = p.m <= L ? (p.m == 4 ? kX8 : kTokens0) : 16;  // x8's chunks for windows4
#else
  const int64_t chunk = p.m <= L ? kTokens0 : 16;
#endif
  float* win = scratch(size_t(std::max(chunk * stride, 8 * p.kv)));
  for (int64_t t0 = 0; t0 < p.t; t0 += chunk) {
    const int64_t cnt = std::min<int64_t>(chunk, p.t - t0);
#if HINM_LANES >= 8
    if (windows4(p, cnt)) {
      build_windows4(p, b, p.xt + t0 * p.k, win);
      // Passes of two window vectors (AVX-512: the chunk's 8 tokens at once; AVX2: 4 tokens, 8
      // accumulators), one vector when the pass has L / 4 tokens or fewer.
      constexpr int64_t pass = 2 * (L / 4);
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t h0 = 0; h0 < cnt; h0 += pass) {
          const int64_t c = std::min<int64_t>(pass, cnt - h0);
          if (c > L / 4) {
            group_rows_in_lanes4<W, Y, 2>(p, b, g, t0 + h0, c, win + h0 * 4);
          } else {
            group_rows_in_lanes4<W, Y, 1>(p, b, g, t0 + h0, c, win + h0 * 4);
          }
        }
      }
      continue;
    }
#endif
    gather_windows<X>(p, b, t0, cnt, win, stride);
    for (int64_t g = g0; g < g1; ++g) {
      if (p.m <= L) {
        group_rows_in_lanes_n<W, Y>(p, b, g, t0, cnt, win, stride);
      } else {
        group_scalar<W, Y>(p, b, g, t0, cnt, win, stride);
      }
    }
  }
}

// ---- mode 1: tokens in lanes -----------------------------------------------------------------------

#if HINM_LANES == 16
// In-register transpose of a 16 x 16 block of 32-bit elements: r[i] (row i) becomes column i.
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows, 32-bit interleave inside each 128-bit lane
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[4G + c], lane L: column 4L + c of rows 4G .. 4G+3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes across r[c], r[4+c], r[8+c], r[12+c]
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44), v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

#if HINM_LANES >= 8
// In-register transpose of an L x L block: r[i] (row i) becomes column i.
__attribute__((always_inline)) inline void transpose_lanes(vf r[L]) {
#if HINM_LANES == 16
  transpose16(reinterpret_cast<__m512*>(r));
#else
  transpose8(reinterpret_cast<__m256*>(r));
#endif
}
#endif

// xt[tile][k][kTile] = x[tile * kTile + tt, k] for k in [k0, k1), zero past the last token: L tokens x L
// inputs at a time through registers (AVX-512 or AVX2); the inputs past the last multiple of L one by one.
template <class X>
void transpose_tile(const Problem& p, int64_t tile, int64_t k0, int64_t k1) {
  const auto* x = static_cast<const typename X::T*>(p.x);
  float* xt = xt_tile(p, tile);
  const int64_t xs = p.xt_stride;
  int64_t ka = k0;
#if HINM_LANES >= 8
  // L tokens at a time along the whole range of inputs: L rows of x streamed at once, which the
  // hardware prefetchers follow (interleaving the tile's 32 rows instead ran half as fast from memory
  // with AVX-512: 1536 inputs x 2048 tokens, 2.3 against 1.2 ms on one core, benchmarks/RESULTS.md).
  const int64_t kend = k0 + (k1 - k0) / L * L;
  for (int64_t h = 0; h < kTile; h += L) {
    for (ka = k0; ka < kend; ka += L) {
      vf r[L];
      for (int i = 0; i < L; ++i) {
        const int64_t t = tile * kTile + h + i;
        r[i] = t < p.t ? X::load(x + t * p.k + ka) : vf{};
      }
      transpose_lanes(r);
      for (int j = 0; j < L; ++j) storef(xt + (ka + j) * xs + h, r[j]);
    }
  }
  ka = kend;
#endif
  for (int64_t tt = 0; tt < kTile && ka < k1; ++tt) {
    const int64_t t = tile * kTile + tt;
    const typename X::T* row = x + t * p.k;
    for (int64_t k = ka; k < k1; ++k) xt[k * xs + tt] = t < p.t ? X::get(row, k) : 0.0f;
  }
}

// R packed rows (lanes l0 .. l0+R of group g of block b) x S token tiles side by side, stripes [j0, j1):
// the S tiles' rows of input k are S * kTile floats at xt + k * p.xt_stride (two tiles: a pair of xt,
// xt_stride = 2 * kTile); partial sums in acc (R rows x S * kTile). N > 0: the values per stripe known at compile
// time (2, unrolled); 0: p.n. Always inlined into its unit (GCC stops inlining it on its own once the
// unit's epilogue grows).
template <class W, int R, int S, int N>
__attribute__((always_inline)) inline void rows_tokens_in_lanes(const Problem& p, int64_t b, int64_t g, int l0, int64_t j0, int64_t j1,
                                                                const float* xt, float* acc_mem, bool first) {
  constexpr int U = S * kTile / L, PT = S * kTile;
  const int64_t n = N ? N : p.n, stride = S == 1 ? p.xt_stride : PT;
  const auto* vals = static_cast<const typename W::T*>(p.vals) + (b * p.groups + g) * p.nnz * kGroup;
  const uint16_t* in = p.in + (b * p.groups + g) * p.nnz * kGroup;
  vf acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = first ? vf{} : loadf(acc_mem + r * PT + u * L);
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t q = 0; q < n; ++q) {
      const int64_t i = j * n + q;
      for (int r = 0; r < R; ++r) {
        const vf w = splat(W::get(vals, i, l0 + r));
        // Below K: the handler checks every input index of a mode 1 call (a clamp here instead cost
        // 3% of a call with AVX2, benchmarks/RESULTS.md).
        const float* a = xt + int64_t(in[W::off(i, l0 + r)]) * stride;
        for (int u = 0; u < U; ++u) acc[r][u] += w * loadf(a + u * L);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) storef(acc_mem + r * PT + u * L, acc[r][u]);
}

// Accumulator lane of token tt in mode 1 (two vectors per row). The bfloat16 dot schedule's unpack
// order puts tokens 0-3, 8-11, 16-19, 24-27 in the first vector, 4-7, 12-15, ... in the second.
inline int64_t dot_lane(int64_t tt) { return ((tt >> 2) & 1) * L + (tt >> 3) * 4 + (tt & 3); }
template <bool Dot>
inline int64_t lane_token(int64_t lane) {  // the token of a lane: the inverse of the lane order in use
  if (!Dot) return lane;
  const int64_t hi = lane / L, in = lane % L;  // in = (tt >> 3) * 4 + (tt & 3), hi = (tt >> 2) & 1
  return (in / 4) * 8 + hi * 4 + in % 4;
}

// Writes channels c0 .. c0+15 of one token tile (tokens t0 .. t0+cnt): y[t0 + tt, c0 + i] = row(i)[lane
// of tt] + bias[i], activated (bias: nullptr or 16 floats), where row(i) points at channel c0 + i's kTile partial
// sums. The 16 rows are loaded (two vectors of 16 lanes each) and transposed in registers, so that each
// token's 16 outputs are one vector store into y.
#if HINM_LANES == 16
template <class Y, bool Dot, class Row>
inline void put16(const Problem& p, int64_t t0, int64_t cnt, int64_t c0, const float* bias, const Row& row) {
  auto* y = static_cast<typename Y::T*>(p.y);
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int h = 0; h < kTile / 16; ++h) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(row(i) + h * 16);
    transpose16(r);  // r[j]: lane h * 16 + j of the 16 channels
    for (int j = 0; j < 16; ++j) {
      const int64_t tt = lane_token<Dot>(h * 16 + j);
      if (tt >= cnt) continue;
      const __m512 v = (__m512)activate(p, (vf)_mm512_add_ps(r[j], bv));
      if constexpr (std::is_same_v<Y, F32>) {
        float* dst = y + (t0 + tt) * p.o + c0;
        if (p.stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
          _mm512_stream_ps(dst, v);
        } else {
          _mm512_storeu_ps(dst, v);
        }
      } else {
        alignas(64) float buf[16];
        _mm512_store_ps(buf, v);
        for (int i = 0; i < 16; ++i) Y::put(y, (t0 + tt) * p.o + c0 + i, buf[i]);
      }
    }
  }
}
#elif HINM_LANES == 8
// With AVX2: 8 tokens at a time, channels c0 .. c0+7 and c0+8 .. c0+15 as two 8 x 8 transposes, so
// that each token's 16 outputs are two adjacent vector stores (one cache line when aligned).
template <class Y, bool Dot, class Row>
inline void put16(const Problem& p, int64_t t0, int64_t cnt, int64_t c0, const float* bias, const Row& row) {
  static_assert(!Dot, "the BF16 dot schedule is AVX-512 only");
  auto* y = static_cast<typename Y::T*>(p.y);
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int h = 0; h < kTile / 8; ++h) {
    __m256 lo[8], hi[8];
    for (int i = 0; i < 8; ++i) lo[i] = _mm256_loadu_ps(row(i) + h * 8);
    for (int i = 0; i < 8; ++i) hi[i] = _mm256_loadu_ps(row(8 + i) + h * 8);
    transpose8(lo);  // lo[j]: token h * 8 + j of channels c0 .. c0+7
    transpose8(hi);
    for (int j = 0; j < 8; ++j) {
      const int64_t tt = h * 8 + j;
      if (tt >= cnt) break;
      const __m256 v0 = (__m256)activate(p, (vf)_mm256_add_ps(lo[j], b0));
      const __m256 v1 = (__m256)activate(p, (vf)_mm256_add_ps(hi[j], b1));
      if constexpr (std::is_same_v<Y, F32>) {
        float* dst = y + (t0 + tt) * p.o + c0;
        if (p.stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
          _mm256_stream_ps(dst, v0);
          _mm256_stream_ps(dst + 8, v1);
        } else {
          _mm256_storeu_ps(dst, v0);
          _mm256_storeu_ps(dst + 8, v1);
        }
      } else {
        alignas(32) float buf[16];
        _mm256_store_ps(buf, v0);
        _mm256_store_ps(buf + 8, v1);
        for (int i = 0; i < 16; ++i) Y::put(y, (t0 + tt) * p.o + c0 + i, buf[i]);
      }
    }
  }
}
#endif

// Row 0 of a tile of the stage (packed row r's kTile partial sums at + r * xt_stride): tiles stored in
// pairs like xt's, so that units of two tiles accumulate in place.
inline float* stage_tile(const Problem& p, int64_t tile) { return tile_rows(p.stage, tile, p.o, p.xt_stride); }

// Writes tile `tile` of the stage to y: y[t0 + tt, c] = act(stage[tile][inv[c]][lane of tt] + bias), 16
// channels at a time with AVX-512 or AVX2 (put16).
template <class Y, bool Dot>
__attribute__((noinline)) void permute_out(const Problem& p, int64_t tile) {
  const float* st = stage_tile(p, tile);
  const int64_t ss = p.xt_stride;
  const int64_t t0 = tile * kTile, cnt = std::min<int64_t>(kTile, p.t - t0);
  int64_t c0 = 0;
#if HINM_LANES >= 8
  for (; c0 + 16 <= p.o; c0 += 16)
    put16<Y, Dot>(p, t0, cnt, c0, p.bias ? p.bias + c0 : nullptr,
                  [&](int i) { return st + int64_t(p.inv[c0 + i]) * ss; });
#endif
  auto* y = static_cast<typename Y::T*>(p.y);
  for (int64_t c = c0; c < p.o; ++c) {
    const float* row = st + int64_t(p.inv[c]) * ss;
    const float b = p.bias ? p.bias[c] : 0.0f;
    for (int64_t lane = 0; lane < kTile; ++lane) {
      const int64_t tt = lane_token<Dot>(lane);
      if (tt < cnt) Y::put(y, (t0 + tt) * p.o + c, activate(p, row[lane] + b));
    }
  }
}

// Where a unit of mode 1 keeps its partial sums (rows `stride` floats apart): its rows of the stage when
// the outputs are staged (the stage holds exactly the unit's rows when they fill whole register tiles
// and its rows are as far apart), otherwise the scratch buffer.
inline float* unit_acc(const Problem& p, int64_t b, int64_t g0, int64_t rows, int64_t tile, int64_t stride, float* scratch_acc) {
  if (p.stage && rows % kRows == 0 && stride == p.xt_stride) return stage_tile(p, tile) + (b * p.v + g0 * kGroup) * stride;
  return scratch_acc;
}

// Stages a unit's rows (unless it accumulated in place; a row's partial sums are `stride` floats apart
// in acc) and, if the unit completes its tile, writes the tile (kept out of line: the multiply-add
// loop's function stays small).
template <class Y, bool Dot>
__attribute__((noinline)) void stage_unit(const Problem& p, int64_t b, int64_t g0, int64_t rows, int64_t tile, const float* acc,
                                          int64_t stride) {
  const int64_t ss = p.xt_stride;
  float* st = stage_tile(p, tile) + (b * p.v + g0 * kGroup) * ss;
  if (st != acc)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(st + r * ss, acc + r * stride, kTile * sizeof(float));
  if (p.tile_done[tile].fetch_add(1, std::memory_order_acq_rel) + 1 == p.pieces) permute_out<Y, Dot>(p, tile);
}

// A unit's rows of one token tile (packed rows g0 * kGroup .. + rows of block b, partial sums acc[r * stride
// + lane]) into the feed-forward block's h^T: row perm[r] = act(acc + bias), all kTile lanes (lanes past the
// last token hold act(bias); the second layer's outputs of those lanes are not written).
inline void put_ht(const Problem& p, int64_t b, int64_t g0, int64_t rows, int64_t tile, const float* acc, int64_t stride) {
  float* ht = tile_rows(p.ht, xt_slot(p, tile), p.o, p.xt_stride);
  const int32_t* perm = p.perm + b * p.v + g0 * kGroup;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = perm[r];
    const vf bv = splat(p.bias ? p.bias[c] : 0.0f);
    float* dst = ht + c * p.xt_stride;
    for (int u = 0; u < kTile / L; ++u) storef(dst + u * L, activate(p, loadf(acc + r * stride + u * L) + bv));
  }
}

// The end of a unit of mode 1 for one token tile (packed rows g0 * kGroup .. + rows of block b, partial
// sums acc[r * stride + lane]): writes y directly when the rows' channels are consecutive; otherwise
// stages the rows, and the unit that completes the tile writes the whole tile (permute_out). Scattered
// single-channel stores of permuted rows would touch one cache line per value, and units of the same
// tile running on two cores would write into the same lines.
template <class Y, bool Dot>
void finish_unit(const Problem& p, int64_t b, int64_t g0, int64_t rows, int64_t tile, const float* acc, int64_t stride = kTile) {
  if (p.ht) return put_ht(p, b, g0, rows, tile, acc, stride);
  if (!p.stage) {
    const int64_t t0 = tile * kTile, cnt = std::min<int64_t>(kTile, p.t - t0), c0 = p.perm[b * p.v + g0 * kGroup];
    int64_t r0 = 0;
#if HINM_LANES >= 8
    for (; r0 + 16 <= rows; r0 += 16)
      put16<Y, Dot>(p, t0, cnt, c0 + r0, p.bias ? p.bias + c0 + r0 : nullptr,
                    [&](int i) { return acc + (r0 + i) * stride; });
#endif
    // (Skipped when put16 wrote every row: the empty loop over the tokens cost 2-3% of MiniLM-L6's time.)
    if (r0 < rows)
      put_tokens<Y>(p, c0 + r0, rows - r0, t0, cnt,
                    [&](int64_t r, int64_t tt) { return acc[(r0 + r) * stride + (Dot ? dot_lane(tt) : tt)]; });
    return;
  }
  stage_unit<Y, Dot>(p, b, g0, rows, tile, acc, stride);
}

// Unit of mode 1: groups [g0, g1) of block b, token tiles tile .. tile + S - 1 side by side (S = 1, or
// kSpan: a pair of xt). The block's kept rows of xt are walked in chunks of stripes (about kChunkBytes
// of rows): a chunk serves every row of the unit before the next one is touched.
template <class W, class Y, int S>
void unit_mode1(const Problem& p, int64_t b, int64_t g0, int64_t g1, int64_t tile) {
  static_assert(S == 1 || S == kSpan);
  constexpr int64_t PT = S * kTile;  // floats per row of partial sums
  const float* xt = xt_tile(p, tile);
  const int64_t rows = std::min<int64_t>(g1 * kGroup, p.v) - g0 * kGroup;
  const int64_t quads = (rows + kRows - 1) / kRows, stripes = p.kv / p.m;
  const int64_t cs = std::max<int64_t>(1, kChunkBytes / (p.m * PT * int64_t(sizeof(float))));
  float* acc = unit_acc(p, b, g0, rows, tile, PT, scratch(size_t(quads * kRows * PT)));
  for (int64_t j0 = 0; j0 < stripes; j0 += cs) {
    const int64_t j1 = std::min(stripes, j0 + cs);
    for (int64_t qd = 0; qd < quads; ++qd) {
      const int64_t local = g0 * kGroup + qd * kRows;
      if (p.n == 2) {
        rows_tokens_in_lanes<W, kRows, S, 2>(p, b, local / kGroup, int(local % kGroup), j0, j1, xt,
                                             acc + qd * kRows * PT, j0 == 0);
      } else {
        rows_tokens_in_lanes<W, kRows, S, 0>(p, b, local / kGroup, int(local % kGroup), j0, j1, xt,
                                             acc + qd * kRows * PT, j0 == 0);
      }
    }
  }
  for (int s = 0; s < S; ++s) finish_unit<Y, false>(p, b, g0, rows, tile + s, acc + s * kTile, PT);
}

// ---- bfloat16 dot products: bfloat16 activations, pair layout, AVX-512 BF16 ----------------------

// vdpbf16ps adds, in each fp32 lane l, a[2l] * b[2l] + a[2l+1] * b[2l+1] (32 bfloat16 pairs in, 16 fp32
// sums out): one instruction for two multiply-adds a lane. A packed row's two values of a stripe are one
// pair (the pair layout); the other operand holds, in each lane, the two activations at that row's
// positions. Half the instructions and half the activation bytes of the widened fp32 path.
#if HINM_LANES == 16 && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HINM_BF16_DOT 1

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// mode 0: win[tt * stride + jj] = bits of x[t0 + tt, vidx[b, jj]], zero padded to stride.
inline void gather_windows16(const Problem& p, int64_t b, int64_t t0, int64_t cnt, uint16_t* win, int64_t stride) {
  const auto* x = static_cast<const uint16_t*>(p.x);
  const int32_t* vi_b = p.vidx + b * p.kv;
  for (int64_t tt = 0; tt < cnt; ++tt) {
    const uint16_t* row = x + (t0 + tt) * p.k;
    uint16_t* w = win + tt * stride;
    if (p.direct) {
      std::memcpy(w, row, size_t(p.kv) * 2);
    } else {
      for (int64_t jj = 0; jj < p.kv; ++jj) w[jj] = row[vi_b[jj]];
    }
    std::fill(w + p.kv, w + stride, uint16_t(0));
  }
}

// mode 0, one group of 16 rows (lanes), NT tokens: per stripe, the 16 rows' value pairs are one vector,
// a word permute (vpermw) puts each row's two activations of the stripe in its lane, one dot per token.
template <class Y, int NT>
void group_dot_rows(const Problem& p, int64_t b, int64_t g, int64_t t0, const uint16_t* win, int64_t stride) {
  const auto* vals = static_cast<const uint16_t*>(p.vals) + (b * p.groups + g) * p.nnz * kGroup;
  const uint8_t* pos = p.pos + (b * p.groups + g) * p.nnz * kGroup;
  constexpr int A = std::max(1, kChains / NT);
  __m512 acc[A][NT];
  for (int a = 0; a < A; ++a)
    for (int tt = 0; tt < NT; ++tt) acc[a][tt] = _mm512_setzero_ps();
  const int64_t stripes = p.kv / 4;
  auto stripe = [&](int64_t j, __m512 (&part)[NT]) {
    const __m512i w = _mm512_loadu_si512(vals + j * 2 * kGroup);
    const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + j * 2 * kGroup)));
    for (int tt = 0; tt < NT; ++tt) {
      const __m512i stripe_x = _mm512_loadu_si512(win + tt * stride + j * 4);  // stripe j in words 0..3
      part[tt] = dot2(part[tt], _mm512_permutexvar_epi16(idx, stripe_x), w);
    }
  };
  int64_t j = 0;
  for (; j + A <= stripes; j += A)
    for (int a = 0; a < A; ++a) stripe(j + a, acc[a]);
  for (; j < stripes; ++j) stripe(j, acc[0]);
  alignas(64) float out[NT][kGroup];
  for (int tt = 0; tt < NT; ++tt) {
    for (int a = 1; a < A; ++a) acc[0][tt] = _mm512_add_ps(acc[0][tt], acc[a][tt]);
    _mm512_store_ps(out[tt], acc[0][tt]);
  }
  put_group<Y>(p, b, g, t0, NT, &out[0][0]);
}

template <class Y>
void unit_mode0_dot(const Problem& p, int64_t b, int64_t g0, int64_t g1) {
  const int64_t stride = p.kv + 2 * kGroup;  // a 32-word load at the last stripe stays inside
  auto* win = reinterpret_cast<uint16_t*>(scratch(size_t(kTokens0 * stride / 2 + 1)));
  for (int64_t t0 = 0; t0 < p.t; t0 += kTokens0) {
    const int64_t cnt = std::min<int64_t>(kTokens0, p.t - t0);
    gather_windows16(p, b, t0, cnt, win, stride);
    for (int64_t g = g0; g < g1; ++g) {
      switch (cnt) {
#define HINM_CASE(N) \
  case N:            \
    group_dot_rows<Y, N>(p, b, g, t0, win, stride); \
    break;
        HINM_CASE(1) HINM_CASE(2) HINM_CASE(3) HINM_CASE(4) HINM_CASE(5) HINM_CASE(6) HINM_CASE(7) HINM_CASE(8)
#undef HINM_CASE
      }
    }
  }
}

// mode 1: xt[tile][k][kTile] = bits of x[tile * kTile + tt, k] (bfloat16 tiles: half the bytes). 16 tokens x
// 16 input pairs (32-bit words) at a time through registers, then each word split into its two inputs' rows.
inline void transpose_tile16(const Problem& p, int64_t tile, int64_t k0, int64_t k1) {
  const auto* x = static_cast<const uint16_t*>(p.x);
  uint16_t* xt = reinterpret_cast<uint16_t*>(p.xt) + xt_slot(p, tile) * p.k * kTile;
  // 16 tokens at a time along the whole range of inputs, as transpose_tile does.
  const int64_t kend = k0 + (k1 - k0) / 32 * 32;
  int64_t ka = k0;
  for (int64_t h = 0; h < kTile; h += 16) {
    for (ka = k0; ka < kend; ka += 32) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = tile * kTile + h + i;
        r[i] = t < p.t ? _mm512_castsi512_ps(_mm512_loadu_si512(x + t * p.k + ka)) : _mm512_setzero_ps();
      }
      transpose16(r);  // r[j]: inputs ka + 2j (low half) and ka + 2j + 1 (high half) of 16 tokens
      for (int j = 0; j < 16; ++j) {
        const __m512i w = _mm512_castps_si512(r[j]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xt + (ka + 2 * j) * kTile + h), _mm512_cvtepi32_epi16(w));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xt + (ka + 2 * j + 1) * kTile + h),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
      }
    }
  }
  for (int64_t tt = 0; tt < kTile && ka < k1; ++tt) {
    const int64_t t = tile * kTile + tt;
    for (int64_t k = ka; k < k1; ++k) xt[k * kTile + tt] = t < p.t ? x[t * p.k + k] : uint16_t(0);
  }
}

// The panel of mode 1 holds, for each stripe, the 6 pairs (a, b), a < b, of its 4 activation rows, each
// as 2 vectors of 16 tokens x (x_a, x_b) (unpacklo / unpackhi of the two 32-token rows: tokens
// 0-3, 8-11, 16-19, 24-27 in the first vector, 4-7, 12-15, ... in the second).
constexpr int kPairs = 6;
constexpr int64_t kPairWords = 2 * kTile;                // one pair tile, in bfloat16 words
constexpr int64_t kStripeWords = kPairs * kPairWords;    // one stripe of the panel
constexpr int16_t kPairAt[16] = {0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 0, 5, 0, 0, 0, 0};  // by p0 * 4 + p1, p0 < p1

template <int R>
inline void rows_dot_tokens(const Problem& p, int64_t b, int64_t g, int l0, int64_t j0, int64_t j1,
                            const uint16_t* panel, float* acc_mem, bool first) {
  const int64_t base = (b * p.groups + g) * p.nnz * kGroup;
  const auto* w32 = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.vals) + base);
  const auto* pos16 = reinterpret_cast<const uint16_t*>(p.pos + base);
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2; ++u) acc[r][u] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_mem + r * kTile + u * L);
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* stripe = panel + (j - j0) * kStripeWords;
    for (int r = 0; r < R; ++r) {
      const int64_t at = j * kGroup + l0 + r;
      const unsigned pp = pos16[at];  // (p0, p1): low byte, high byte
      const uint16_t* a = stripe + kPairAt[((pp & 0xffu) << 2) | (pp >> 8)] * kPairWords;
      const __m512i w = _mm512_set1_epi32(int(w32[at]));
      acc[r][0] = dot2(acc[r][0], _mm512_loadu_si512(a), w);
      acc[r][1] = dot2(acc[r][1], _mm512_loadu_si512(a + L * 2), w);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2; ++u) _mm512_storeu_ps(acc_mem + r * kTile + u * L, acc[r][u]);
}

template <class Y>
void unit_mode1_dot(const Problem& p, int64_t b, int64_t g0, int64_t g1, int64_t tile) {
  const uint16_t* xt = reinterpret_cast<const uint16_t*>(p.xt) + xt_slot(p, tile) * p.k * kTile;  // xt_stride = kTile
  const int64_t rows = std::min<int64_t>(g1 * kGroup, p.v) - g0 * kGroup;
  const int64_t quads = (rows + kRows - 1) / kRows;
  const int64_t cs = std::max<int64_t>(1, kPanelBytes / (kStripeWords * 2)), stripes = p.kv / 4;
  float* buf = scratch(size_t(quads * kRows * kTile + cs * kStripeWords / 2));
  float* acc = unit_acc(p, b, g0, rows, tile, kTile, buf);
  auto* panel = reinterpret_cast<uint16_t*>(buf + quads * kRows * kTile);
  const int32_t* vi_b = p.vidx + b * p.kv;
  for (int64_t j0 = 0; j0 < stripes; j0 += cs) {
    const int64_t j1 = std::min(stripes, j0 + cs);
    for (int64_t j = j0; j < j1; ++j) {
      __m512i xr[4];
      for (int a = 0; a < 4; ++a) {
        const int64_t jj = j * 4 + a;
        if (!p.direct && jj + kAhead < p.kv) {
          const char* ahead = reinterpret_cast<const char*>(xt + int64_t(vi_b[jj + kAhead]) * kTile);
          __builtin_prefetch(ahead);
        }
        xr[a] = _mm512_loadu_si512(xt + (p.direct ? jj : int64_t(vi_b[jj])) * kTile);
      }
      uint16_t* dst = panel + (j - j0) * kStripeWords;
      for (int a = 0, t = 0; a < 4; ++a)
        for (int c = a + 1; c < 4; ++c, ++t) {
          _mm512_storeu_si512(dst + t * kPairWords, _mm512_unpacklo_epi16(xr[a], xr[c]));
          _mm512_storeu_si512(dst + t * kPairWords + 2 * L, _mm512_unpackhi_epi16(xr[a], xr[c]));
        }
    }
    for (int64_t qd = 0; qd < quads; ++qd) {
      const int64_t local = g0 * kGroup + qd * kRows;
      rows_dot_tokens<kRows>(p, b, local / kGroup, int(local % kGroup), j0, j1, panel, acc + qd * kRows * kTile, j0 == 0);
    }
  }
  finish_unit<Y, true>(p, b, g0, rows, tile, acc);
}
#else
#define HINM_BF16_DOT 0
#endif

// One step of a short busy wait (spins: the steps so far).
inline void spin_pause(int64_t& spins) {
#if defined(__x86_64__) || defined(__i386__)
  if (++spins % 1024) return __builtin_ia32_pause();
#endif
  std::this_thread::yield();  // now and then, in case the awaited thread shares this core
}

// Orders this thread's streaming (non-temporal) stores before what follows (put16, Problem::stream).
inline void fence_streams() {
#if HINM_LANES >= 8
  _mm_sfence();
#endif
}

// ---- work splitting --------------------------------------------------------------------------------

// Runs fn(u) for u in [0, units) on the calling thread and up to threads - 1 pool tasks. Units
// come from an atomic counter; the caller returns once every unit has finished. A task that starts
// after the work is gone touches only the shared counters (kept alive by the shared_ptr).
template <class Pool, class Fn>
void parallel_for(Pool& pool, int64_t threads, int64_t units, const Fn& fn) {
  if (units <= 0) return;
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto sh = std::make_shared<Shared>();
  const int64_t helpers = std::min<int64_t>(threads - 1, units - 1);
  // fn lives on the caller's stack: it is only called for a unit that remains, and the caller waits
  // until every unit is done.
  auto work = [sh, units, fnp = &fn]() {
    for (int64_t u; (u = sh->next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      (*fnp)(u);
      fence_streams();  // a unit's streaming output stores are visible before it counts as done
      if (sh->done.fetch_add(1, std::memory_order_acq_rel) + 1 == units) sh->done.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  for (int64_t d = sh->done.load(std::memory_order_acquire); d < units; d = sh->done.load(std::memory_order_acquire)) {
    sh->done.wait(d, std::memory_order_acquire);
  }
}

// Groups per unit: about 4 units per thread, whole blocks when there are enough of them, and at
// most `cap` groups (mode 1 keeps a unit's partial sums in L1).
inline int64_t groups_per_unit(const Problem& p, int64_t threads, int64_t tiles, int64_t cap) {
  const int64_t want = std::max<int64_t>(1, 4 * threads / std::max<int64_t>(1, tiles));
  int64_t gpu = p.groups;
  if (p.nb < want) {
    const int64_t pieces = (want + p.nb - 1) / p.nb;
    gpu = std::max<int64_t>(1, (p.groups + pieces - 1) / pieces);
  }
  return std::min(gpu, cap);
}

// Below both, the call runs on the calling thread alone: how late the pool's tasks start decides
// where the pool pays, and it differs between machines (benchmarks/RESULTS.md). On a 2-core Zen 4
// they started 10-260 us after they were scheduled (calls alternating with no other work) and calls
// below 2^24 multiply-adds ran up to 2x faster alone; on a 2-core Zen 3 (AVX2), each call after a
// dense dot, the pool made 384x1536 and 1536x384 calls at T = 16-64 1.1-1.5x faster (T = 8:
// 0.92-1.25x) and at T = 1-4 up to 1.5x slower, so the pool now starts at 2^20 (T = 8 there).
// Weights of several MB come from memory, which two cores read faster.
constexpr double kParallelFrom = 1 << 20;       // multiply-adds
constexpr double kParallelBytesFrom = 1 << 22;  // weight bytes (values and positions)

constexpr int64_t kTransposeInputs = 512;  // inputs per work item of x's transposes (both modes)

// The threads a call uses: 1 below both (work: multiply-adds of all its layers, weight_bytes: their
// values and positions), else every thread of the pool.
template <class Pool>
int64_t call_threads(Pool& pool, double work, double weight_bytes) {
  if (work < kParallelFrom && weight_bytes < kParallelBytesFrom) return 1;
  return std::max<int64_t>(1, pool.num_threads());
}

// The layers of one call of mode 1 (run_tokens): up to kMaxLayers products of the same x ("siblings",
// such as an attention layer's query, key and value), or a feed-forward block of two ("chained").
constexpr int kMaxLayers = 4;

// Mode 1 (tokens in lanes) for `count` layers. Siblings (chained = false) all read the one x^T, each
// writing its own output. A chain (count = 2): the first layer's outputs, activated, are the second
// layer's x^T (Problem::ht), written by the first layer's units and read in place by the second's, a group
// of token tiles at a time, so that the intermediate activations are never written to memory as a whole,
// transposed from tokens-in-rows back into tiles, nor staged for a permuted layout. A layer that writes
// y with p.inv set stages its outputs (see finish_unit).
template <class X, class W, class Y, class Pool>
void run_tokens(Problem* ly, int count, bool chained, int64_t threads, Pool& pool) {
  // bfloat16 activations with pair-layout weights take the BF16 dot products where the CPU has them.
  constexpr bool dot = HINM_BF16_DOT && std::is_same_v<X, BF16> && W::pairs;
  constexpr double value_bytes = sizeof(typename W::T) + 1.0;  // a value and its position
  constexpr double indexed_bytes = sizeof(typename W::T) + sizeof(uint16_t);  // a value and its input index
  Problem& first = ly[0];
  auto reads_x = [&](int l) { return !chained || l == 0; };  // reads x^T (not h^T)
  constexpr int64_t kc = kTransposeInputs;
  const int64_t kchunks = (first.k + kc - 1) / kc;
  const int64_t tiles = (first.t + kTile - 1) / kTile;
  // Units of the float32 loop take kSpan token tiles side by side where there are that many.
  const int64_t span = dot || tiles < kSpan ? 1 : kSpan, spans = (tiles + span - 1) / span;
  // Units in super-tiles: a group of pieces (about kSuperBytes of values and positions) times a
  // group of token tiles (about kSuperBytes of x^T, and of h^T in a chain) is finished before the
  // next, so that both stay in the caches while the units that share them run; walking all tiles of a
  // piece, or all pieces of a tile, would stream one of the two from memory again and again at large T.
  // A group of tiles is transposed right before its units, into the x^T ring (xt_slot).
  // Float32 units read a value and its input index, BF16 dot units a value and its position.
  int64_t gpu[kMaxLayers], per_block[kMaxLayers], pieces[kMaxLayers], pg[kMaxLayers], at[kMaxLayers + 1] = {0};
  for (int l = 0; l < count; ++l) {
    gpu[l] = groups_per_unit(ly[l], threads, spans, 4);
    per_block[l] = (ly[l].groups + gpu[l] - 1) / gpu[l];
    pieces[l] = ly[l].nb * per_block[l];
    at[l + 1] = at[l] + pieces[l];  // the layer's units are items at[l] .. at[l + 1] - 1 of a span
    const double piece_bytes = double(gpu[l] * kGroup) * double(ly[l].nnz) * (dot ? value_bytes : indexed_bytes);
    pg[l] = std::clamp<int64_t>(int64_t(kSuperBytes / piece_bytes), 1, pieces[l]);
  }
  const int64_t rows_per_tile = first.k + (chained ? first.o : 0);  // rows of x^T (and h^T) per tile
  const double span_bytes = double(rows_per_tile) * kTile * span * (dot ? 2 : 4);
  const int64_t sg = std::clamp<int64_t>(int64_t(kSuperBytes / span_bytes), 1, spans);
  const int64_t groups = (spans + sg - 1) / sg, group_size = sg * span;  // groups of tiles, tiles per group
  const int64_t ring_tiles = groups > kRing ? group_size : 0;
  // Float32 units of two tiles read both tiles' rows of an input as one row of a pair (xt_tile).
  const int64_t xt_stride = span == kSpan ? 2 * kTile : kTile;
  const int64_t whole = tiles + tiles % 2;  // tiles, a whole number of pairs
  const int64_t slots = ring_tiles ? kRing * ring_tiles : whole;
  int64_t floats = slots * rows_per_tile;  // x^T, then h^T (a chain), then each staged layer's stage
  for (int l = 0; l < count; ++l) floats += ly[l].inv ? whole * ly[l].o : 0;
  const CallBuffer buffer(size_t(floats * kTile));
  float* next = buffer.data() + slots * rows_per_tile * kTile;
  std::unique_ptr<std::atomic<int32_t>[]> done[kMaxLayers];  // staged outputs: units finished per tile
  for (int l = 0; l < count; ++l) {
    Problem& p = ly[l];
    p.ring_tiles = ring_tiles;
    p.xt_stride = xt_stride;
    p.xt = reads_x(l) ? buffer.data() : buffer.data() + slots * first.k * kTile;
    if (chained && l == 0) p.ht = ly[1].xt = buffer.data() + slots * first.k * kTile;
    if (p.inv) {
      p.stage = next;
      next += whole * p.o * kTile;
      done[l].reset(new std::atomic<int32_t>[size_t(tiles)]());
      p.tile_done = done[l].get();
    }
    p.pieces = pieces[l];
  }
  // Per group of tiles: transposes finished; units of each layer finished (finished[l * groups + g]).
  std::unique_ptr<std::atomic<int32_t>[]> ready(new std::atomic<int32_t>[size_t(groups)]());
  std::unique_ptr<std::atomic<int32_t>[]> finished(new std::atomic<int32_t>[size_t(count * groups)]());
  auto group_tiles = [&](int64_t g) { return std::min(tiles, (g + 1) * group_size) - g * group_size; };
  auto group_spans = [&](int64_t g) { return std::min(spans, (g + 1) * sg) - g * sg; };
  // Items: (tile, -1 - k chunk) a transpose; (span, at[l] + piece) a unit of layer l.
  std::vector<std::pair<int32_t, int32_t>> order;
  order.reserve(size_t(at[count] * spans + tiles * kchunks));
  auto transposes = [&](int64_t g) {
    for (int64_t t = g * group_size; t < g * group_size + group_tiles(g); ++t)
      for (int64_t c = 0; c < kchunks; ++c) order.emplace_back(t, -1 - c);
  };
  auto units = [&](int l, int64_t g) {
    const int64_t s0 = g * sg, s1 = s0 + group_spans(g);
    for (int64_t p0 = 0; p0 < pieces[l]; p0 += pg[l])
      for (int64_t sp = s0; sp < s1; ++sp)
        for (int64_t piece = p0; piece < std::min(pieces[l], p0 + pg[l]); ++piece) order.emplace_back(sp, at[l] + piece);
  };
  // A group's transposes come before the units of the group before it, so that a unit seldom
  // waits for its inputs (the last transposes of its group running on the other thread) and a
  // transpose seldom waits for the units of the group kRing before: MiniLM-L6 2-12% faster end to
  // end with AVX2 than transposing each group right before its units with two slots
  // (benchmarks/RESULTS.md). Likewise the second layer of a chain runs a group after the first.
  transposes(0);
  for (int64_t g = 0; g < groups; ++g) {
    if (g + 1 < groups) transposes(g + 1);
    for (int l = 0; l < count; ++l)
      if (reads_x(l)) units(l, g);
    if (chained && g > 0) units(1, g - 1);
  }
  if (chained) units(1, groups - 1);
  auto wait = [&](int l, int64_t g, int64_t need) {
    for (int64_t spins = 0; finished[size_t(l * groups + g)].load(std::memory_order_acquire) < need;) spin_pause(spins);
  };
  // Items are taken in this order, and each waits only for items taken before it: a transpose for the
  // units that read x^T of the group kRing before (whose slots it reuses), a unit that reads x^T for its
  // group's transposes (taken before the units of the group before) and, as the first layer of a chain,
  // for the second layer's units of the group kRing before (whose h^T slots it reuses), the second
  // layer of a chain for the first layer's units of its group.
  parallel_for(pool, threads, int64_t(order.size()), [&](int64_t u) {
    const auto [a, c] = order[size_t(u)];
    if (c < 0) {
      const int64_t g = a / group_size;
      if (ring_tiles && g >= kRing)
        for (int l = 0; l < count; ++l)
          if (reads_x(l)) wait(l, g - kRing, pieces[l] * group_spans(g - kRing));
      const int64_t k0 = (-1 - c) * kc, k1 = std::min(first.k, k0 + kc);
      [&] {
#if HINM_BF16_DOT
        if constexpr (dot) return transpose_tile16(first, a, k0, k1);
#endif
        transpose_tile<X>(first, a, k0, k1);
      }();
      ready[size_t(g)].fetch_add(1, std::memory_order_release);
      return;
    }
    int l = 0;
    while (c >= at[l + 1]) ++l;
    const Problem& p = ly[l];
    const int64_t g = a / sg, piece = c - at[l];
    if (reads_x(l)) {
      const int64_t need = group_tiles(g) * kchunks;
      for (int64_t spins = 0; ready[size_t(g)].load(std::memory_order_acquire) < need;) spin_pause(spins);
      if (chained && ring_tiles && g >= kRing) wait(1, g - kRing, pieces[1] * group_spans(g - kRing));
    } else {
      wait(0, g, pieces[0] * group_spans(g));
    }
    const int64_t b = piece / per_block[l], g0 = (piece % per_block[l]) * gpu[l], g1 = std::min(p.groups, g0 + gpu[l]);
    const int64_t tile = a * span;
    [&] {
#if HINM_BF16_DOT
      if constexpr (dot) return unit_mode1_dot<Y>(p, b, g0, g1, tile);
#endif
      if (span == kSpan && tile + kSpan <= tiles) return unit_mode1<W, Y, kSpan>(p, b, g0, g1, tile);
      for (int64_t t = tile; t < std::min(tiles, tile + span); ++t) unit_mode1<W, Y, 1>(p, b, g0, g1, t);
    }();
    finished[size_t(l * groups + g)].fetch_add(1, std::memory_order_release);
  });
}

// One layer. p.inv set: mode 1 stages the outputs (a permuted layout, see finish_unit).
template <class X, class W, class Y, class Pool>
void run(Problem p, int64_t mode, Pool& pool) {
  constexpr bool dot = HINM_BF16_DOT && std::is_same_v<X, BF16> && W::pairs;
  constexpr double value_bytes = sizeof(typename W::T) + 1.0;  // a value and its position
  if (!dot && !p.in) mode = 0;  // no input indices (K > 65536): the float32 units of mode 1 need them
  const int64_t threads =
      call_threads(pool, double(p.o) * double(p.nnz) * double(p.t), double(p.o) * double(p.nnz) * value_bytes);
  if (mode == 1) return run_tokens<X, W, Y>(&p, 1, false, threads, pool);
  constexpr int64_t kc = kTransposeInputs;
  const int64_t kchunks = (p.k + kc - 1) / kc;
  int64_t chunks = 0;  // x8 chunks for windows4
#if HINM_LANES >= 8
  if (!dot) chunks = windows4_chunks(p);
#endif
  const CallBuffer buffer(size_t(chunks * kX8 * p.k));
  p.xt = buffer.data();
#if HINM_LANES >= 8
  if (chunks) {
    parallel_for(pool, threads, chunks * kchunks, [&](int64_t u) {
      const int64_t k0 = (u % kchunks) * kc;
      transpose_x8<X>(p, u / kchunks, k0, std::min(p.k, k0 + kc), p.xt);
    });
  }
#endif
  const int64_t gpu = groups_per_unit(p, threads, 1, p.groups);
  const int64_t per_block = (p.groups + gpu - 1) / gpu;
  parallel_for(pool, threads, p.nb * per_block, [&](int64_t u) {
    const int64_t b = u / per_block, g0 = (u % per_block) * gpu;
#if HINM_BF16_DOT
    if constexpr (dot) return unit_mode0_dot<Y>(p, b, g0, std::min(p.groups, g0 + gpu));
#endif
    unit_mode0<X, W, Y>(p, b, g0, std::min(p.groups, g0 + gpu));
  });
}

// ---- the handler -----------------------------------------------------------------------------------

// The handler's checks of the index arrays, run on every call, in functions of their own so that they
// vectorize: inside Spmm they compiled to scalar loops through the stack, 12% of the CPU time of
// back-to-back 384x1536 calls at T = 1 (perf; 4% now).

// The largest of a[0..n) as unsigned (a negative entry is above any bound); -1 when n = 0.
template <class T>
__attribute__((noinline)) int64_t largest(const T* a, int64_t n) {
  using U = std::make_unsigned_t<T>;
  U hi = 0;
  for (int64_t i = 0; i < n; ++i) hi = std::max(hi, U(a[i]));
  return n ? int64_t(hi) : -1;
}

// Whether each block's v rows go to consecutive channels (perm's entries checked to be below O first).
__attribute__((noinline)) bool consecutive_blocks(const int32_t* perm, int64_t nb, int64_t v) {
  bool same = true;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 1; r < v; ++r) same &= perm[b * v + r] == perm[b * v] + int32_t(r);
  return same;
}

// One layer's index and value arrays, checked against each other and against the layer's input (t, k)
// and output (t, o) shapes, into p (all but x and y; errors name the handler `who`); inv: the inverse of
// perm (output channel -> packed row), which p.inv points at when mode 1 stages the layer's outputs (it
// writes y, and a block's rows go to non-consecutive channels: see finish_unit). The indices are the
// packer's and were validated there; a damaged layout must still not read or write outside x and y.
ffi::Error prepare(const char* who, Problem& p, int64_t t, int64_t k, int64_t o, ffi::AnyBuffer vals,
                   ffi::Buffer<ffi::U8> pos, ffi::Buffer<ffi::U16> in, ffi::Buffer<ffi::S32> vidx,
                   ffi::Buffer<ffi::S32> perm, ffi::Buffer<ffi::F32> bias, int64_t n, int64_t m, int64_t vector_size,
                   int64_t mode, int64_t activation, bool writes_y, std::vector<int32_t>& inv) {
  auto invalid = [who](const char* what) { return ffi::Error::InvalidArgument(std::string(who) + ": " + what); };
  const auto vd = vals.dimensions(), id = vidx.dimensions();
  if (vd.size() != 4 || id.size() != 2)
    return invalid("expected vals (nb, G, nnz, 16) or pairs (nb, G, nnz / 2, 32), vidx (nb, K_v)");
  const bool pairs = vd[3] == 2 * kGroup;
  p = Problem{};
  p.t = t;
  p.k = k;
  p.o = o;
  p.nb = id[0];
  p.kv = id[1];
  p.v = vector_size;
  p.n = n;
  p.m = m;
  p.groups = vd[1];
  p.nnz = pairs ? 2 * vd[2] : vd[2];
  if (vd[0] != p.nb || (vd[3] != kGroup && !pairs) || n < 1 || m < n || m > 255 || p.kv % m ||
      p.nnz != p.kv / m * n || p.groups * kGroup < p.v || (p.groups - 1) * kGroup >= p.v ||
      pos.element_count() != vals.element_count() ||
      (in.element_count() != 0 && in.element_count() != pos.element_count()) ||
      int64_t(perm.element_count()) != p.nb * p.v || p.nb * p.v != p.o || p.kv > p.k)
    return invalid("inconsistent shapes");
  const auto wt = vals.element_type();
  if (wt != ffi::DataType::F32 && wt != ffi::DataType::BF16)
    return invalid("dtypes must be float32 or bfloat16");
  if (pairs && (n != 2 || m != 4 || wt != ffi::DataType::BF16))
    return invalid("the pair layout holds bfloat16 values of 2:4 stripes");
  if (bias.element_count() != 0 && int64_t(bias.element_count()) != p.o)
    return invalid("bias must have O entries or none");
  if (activation != kNone && activation != kRelu && activation != kGelu)
    return invalid("activation must be 0 (none), 1 (relu) or 2 (gelu)");
  p.vals = vals.untyped_data();
  p.pos = pos.typed_data();
  p.in = in.element_count() ? in.typed_data() : nullptr;
  p.vidx = vidx.typed_data();
  p.perm = perm.typed_data();
  p.bias = bias.element_count() ? bias.typed_data() : nullptr;
  p.act = activation;
  p.stream = t * o * int64_t(sizeof(float)) >= kStreamFrom;  // used by float32 outputs only
  p.xt_stride = kTile;
  if (p.nb == 1 && p.kv == p.k) {
    p.direct = true;
    for (int64_t j = 0; j < p.kv && p.direct; ++j) p.direct = p.vidx[j] == j;
  }
  if (largest(p.vidx, p.nb * p.kv) >= p.k) return invalid("vector index out of range");
  if (largest(p.perm, p.o) >= p.o) return invalid("row permutation out of range");
  // Mode 1's float32 units read x^T at each value's input index unchecked (mode 0 does not read them).
  if (mode == 1 && p.in && largest(p.in, int64_t(in.element_count())) >= p.k)
    return invalid("input index out of range");
  // Every channel comes from exactly one packed row (permute_out reads inv[c] for each).
  inv.assign(size_t(p.o), -1);
  int32_t repeats = 0;
  for (int64_t r = 0; r < p.o; ++r) {
    int32_t& slot = inv[size_t(p.perm[r])];
    repeats |= ~slot;  // nonzero once a slot is written twice (slots start at -1)
    slot = int32_t(r);
  }
  if (repeats) return invalid("row permutation repeats a channel");
  if (mode == 1 && writes_y && !consecutive_blocks(p.perm, p.nb, p.v)) p.inv = inv.data();
  return ffi::Error::Success();
}

ffi::Error Spmm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer vals, ffi::Buffer<ffi::U8> pos,
                ffi::Buffer<ffi::U16> in, ffi::Buffer<ffi::S32> vidx, ffi::Buffer<ffi::S32> perm,
                ffi::Buffer<ffi::F32> bias,
                ffi::Result<ffi::AnyBuffer> y, int64_t n, int64_t m,
                int64_t vector_size, int64_t mode, int64_t activation) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("hinm_spmm_cpu: expected x (T, K), y (T, O)");
  if (mode != 0 && mode != 1) return ffi::Error::InvalidArgument("hinm_spmm_cpu: mode must be 0 or 1");
  Problem p;
  std::vector<int32_t> inv;
  if (auto e = prepare("hinm_spmm_cpu", p, xd[0], xd[1], yd[1], vals, pos, in, vidx, perm, bias, n, m, vector_size, mode,
                       activation, true, inv);
      e.failure())
    return e;
  using ffi::DataType;
  const DataType xt = x.element_type(), wt = vals.element_type(), yt = y->element_type();
  auto ok = [](DataType d) { return d == DataType::F32 || d == DataType::BF16; };
  if (!ok(xt) || !ok(yt)) return ffi::Error::InvalidArgument("hinm_spmm_cpu: dtypes must be float32 or bfloat16");
  if (p.t == 0) return ffi::Error::Success();
  p.x = x.untyped_data();
  p.y = y->untyped_data();
  const bool pairs = vals.dimensions()[3] == 2 * kGroup;
  using WF32 = Wts<F32, false>;
  using WBF16 = Wts<BF16, false>;
  using WBF16Pairs = Wts<BF16, true>;
#define HINM_Y(X, W)                                              \
  if (yt == DataType::F32) return run<X, W, F32>(p, mode, pool), ffi::Error::Success(); \
  return run<X, W, BF16>(p, mode, pool), ffi::Error::Success();
#define HINM_W(X)                          \
  if (wt == DataType::F32) {               \
    HINM_Y(X, WF32)                        \
  } else if (pairs) {                      \
    HINM_Y(X, WBF16Pairs)                  \
  } else {                                 \
    HINM_Y(X, WBF16)                       \
  }
  if (xt == DataType::F32) {
    HINM_W(F32)
  } else {
    HINM_W(BF16)
  }
#undef HINM_W
#undef HINM_Y
}

// Several layers in one call of mode 1 (run_tokens), float32 x and outputs:
//   chained = 0, siblings: y_l = act_l(x W_l + b_l) for each layer l (up to kMaxLayers), one output each;
//   chained = 1, a chain of two: y = act_1(x W_1 + b_1) W_2 + b_2 (act_2 must be none), one output.
// After x, the arguments are each layer's vals, pos, in, vidx, perm and bias in turn (as hinm_spmm_cpu's);
// every weight float32, or every weight bfloat16 in the same layout; every layer with input indices.
ffi::Error Layers(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                  ffi::Span<const int64_t> n, ffi::Span<const int64_t> m, ffi::Span<const int64_t> vector_size,
                  ffi::Span<const int64_t> activation, int64_t chained) {
  const size_t count = n.size();
  auto invalid = [](const char* what) { return ffi::Error::InvalidArgument(std::string("hinm_layers_cpu: ") + what); };
  if (count < 1 || count > size_t(kMaxLayers) || m.size() != count || vector_size.size() != count ||
      activation.size() != count || args.size() != 6 * count || (chained != 0 && chained != 1) ||
      (chained && (count != 2 || activation[1] != kNone)) || rets.size() != (chained ? 1 : count))
    return invalid("expected 6 arguments and an n, m, vector_size and activation per layer; 2 layers and one output "
                   "(no activation after the second layer) when chained, one output per layer otherwise");
  const auto xd = x.dimensions();
  if (xd.size() != 2 || x.element_type() != ffi::DataType::F32) return invalid("x must be float32 (T, K)");
  const int64_t t = xd[0];
  Problem ly[kMaxLayers];
  std::vector<int32_t> inv[kMaxLayers];
  int64_t k = xd[1];
  ffi::DataType wt = ffi::DataType::F32;
  int64_t last_axis = 0;
  double per_token = 0.0;
  for (size_t l = 0; l < count; ++l) {
    const auto vals = args.get<ffi::AnyBuffer>(6 * l);
    const auto pos = args.get<ffi::Buffer<ffi::U8>>(6 * l + 1);
    const auto in = args.get<ffi::Buffer<ffi::U16>>(6 * l + 2);
    const auto vidx = args.get<ffi::Buffer<ffi::S32>>(6 * l + 3);
    const auto perm = args.get<ffi::Buffer<ffi::S32>>(6 * l + 4);
    const auto bias = args.get<ffi::Buffer<ffi::F32>>(6 * l + 5);
    if (!vals.has_value() || !pos.has_value() || !in.has_value() || !vidx.has_value() || !perm.has_value() ||
        !bias.has_value())
      return invalid("a layer's arguments are vals, pos (uint8), in (uint16), vidx, perm (int32), bias (float32)");
    const bool writes_y = !chained || l == 1;
    int64_t o = int64_t(perm->element_count());  // a chain's first layer: the hidden size
    void* y = nullptr;
    if (writes_y) {
      auto out = rets.get<ffi::AnyBuffer>(chained ? 0 : l);
      if (!out.has_value()) return invalid("outputs must be buffers");
      const auto yd = (*out)->dimensions();
      if (yd.size() != 2 || yd[0] != t || (*out)->element_type() != ffi::DataType::F32)
        return invalid("outputs must be float32 (T, O)");
      o = yd[1];
      y = (*out)->untyped_data();
    }
    if (auto e = prepare("hinm_layers_cpu", ly[l], t, k, o, *vals, *pos, *in, *vidx, *perm, *bias, n[l], m[l],
                         vector_size[l], 1, activation[l], writes_y, inv[l]);
        e.failure())
      return e;
    ly[l].y = y;
    if (!ly[l].in) return invalid("every layer needs input indices");
    if (l == 0) wt = vals->element_type(), last_axis = vals->dimensions()[3];
    if (vals->element_type() != wt || vals->dimensions()[3] != last_axis)
      return invalid("every weight must have the same dtype and layout");
    ly[l].x = x.untyped_data();
    per_token += double(ly[l].o) * double(ly[l].nnz);
    if (chained) k = ly[l].o;  // the next layer's inputs
  }
  if (t == 0) return ffi::Error::Success();
  const bool bf16 = wt == ffi::DataType::BF16, pairs = last_axis == 2 * kGroup;
  const int64_t threads = call_threads(pool, per_token * double(t), per_token * (bf16 ? 3.0 : 5.0));
  const int c = int(count);
  if (!bf16) return run_tokens<F32, Wts<F32, false>, F32>(ly, c, chained, threads, pool), ffi::Error::Success();
  if (pairs) return run_tokens<F32, Wts<BF16, true>, F32>(ly, c, chained, threads, pool), ffi::Error::Success();
  return run_tokens<F32, Wts<BF16, false>, F32>(ly, c, chained, threads, pool), ffi::Error::Success();
}

}  // namespace hinm_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(HinmSpmmCpu, hinm_cpu::Spmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x (T, K)
                                  .Arg<ffi::AnyBuffer>()          // vals (nb, G, nnz, 16) or pairs (nb, G, nnz / 2, 32)
                                  .Arg<ffi::Buffer<ffi::U8>>()    // pos, same shape
                                  .Arg<ffi::Buffer<ffi::U16>>()   // in, same shape, or (0,)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // vidx (nb, K_v)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // perm (O,)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias (O,) or (0,)
                                  .Ret<ffi::AnyBuffer>()          // y (T, O)
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("vector_size")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("activation"));  // Act

XLA_FFI_DEFINE_HANDLER_SYMBOL(HinmLayersCpu, hinm_cpu::Layers,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (T, K), float32
                                  .RemainingArgs()        // per layer: vals, pos, in, vidx, perm, bias
                                  .RemainingRets()        // y (T, O) float32: one per layer, or one (chained)
                                  .Attr<ffi::Span<const int64_t>>("n")
                                  .Attr<ffi::Span<const int64_t>>("m")
                                  .Attr<ffi::Span<const int64_t>>("vector_size")
                                  .Attr<ffi::Span<const int64_t>>("activation")  // Act, per layer
                                  .Attr<int64_t>("chained"));

// Host-callable facts about the build (ctypes): the vector width and the instruction set compiled.
extern "C" int hinm_cpu_lanes() { return hinm_cpu::L; }
extern "C" int hinm_cpu_tile_tokens() { return hinm_cpu::kTile; }
extern "C" const char* hinm_cpu_isa() { return hinm_cpu::kIsa; }
extern "C" int hinm_cpu_bf16_dot() { return HINM_BF16_DOT; }
