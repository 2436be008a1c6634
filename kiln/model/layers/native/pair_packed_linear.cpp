// y = x W^T (+ b) in bfloat16 for decode-sized batches (CPU with AVX512-BF16, or AVX2 and FMA: see
// the AVX2 section), W packed in pairs.
//
// A decode step multiplies every weight by 1-64 rows. oneDNN's packed products reach only ~55 % of
// this machine's bfloat16 peak at 16 rows and ~75 % at 64 (measured on SmolLM2-135M's layers with
// the weights streamed from memory, as in a step), and only ~20 GB/s of weight streaming at 1 row.
// This kernel is the textbook register-blocked product for `vdpbf16ps`, and it turned out to match
// or beat oneDNN at every row count measured, 1 to 2048 (see cpu_gemm.py), so it serves prefill too:
//
// - W [N, K] is packed once at load into 16-output blocks of key pairs, [N/16][K/2][16 outputs][2]:
//   one 64-byte load gives 16 outputs x 2 consecutive k, the operand `vdpbf16ps` multiplies with a
//   broadcast pair (x[m][k], x[m][k+1]). N and K are zero-padded to multiples of 16 and 2.
// - A panel of kPanel blocks (48 outputs) is computed for up to kTileRows rows at once: 24 float32
//   accumulators, 3 weight loads and 8 broadcasts per key pair for 24 products. More rows reuse
//   the panel from L1/L2 tile by tile, so each weight byte leaves DRAM once per call.
// - Panels are split across threads; a panel's blocks are contiguous, a sequential stream the
//   hardware prefetcher follows.
//
// Sums are float32 in k order per lane pair, the bias is added in float32, and each output is
// rounded to bfloat16 once, as oneDNN does (results agree with it to float32 summation order).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <utility>

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "kernels.h"
#include "simd_math.h"

namespace {

constexpr int64_t kBlock = 16;    // outputs per packed block (one zmm of float32 sums)
constexpr int64_t kPanel = 3;     // blocks per panel
constexpr int64_t kTileRows = 8;  // rows per register tile
// Rows per pass over a thread's panels. One pass over all rows of a prefill chunk streams the whole
// x (2048 x 576 bfloat16: 2.4 MB) through L2 once per 48-column panel, and a panel's output strip
// (96 bytes a row) shares cache lines with the next panel's: passes of 256 rows keep x's rows and
// the strips in L2 while the panels, re-read from L3, take turns.
// 30 layers of SmolLM2's products at 1024-2048 rows, interleaved in one process: 2-9 % faster in an
// hour when the host's L3 was busy (the products at ~68 % of peak), the same on a quiet host (~87 %).
constexpr int64_t kRowChunk = 256;

bool pair_packed_linear_available() { return kiln_native::pair_packed_available(); }

// weight [N, K] bf16 -> [ceil(N/16), ceil(K/2), 32] bf16 (see the header).
at::Tensor pack_weight_pairs(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "weight must be bfloat16 [N, K]");
  auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t blocks = (N + kBlock - 1) / kBlock, pairs = (K + 1) / 2;
  auto packed = at::zeros({blocks, pairs, 2 * kBlock}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t lane = 0; lane < kBlock && b * kBlock + lane < N; ++lane) {
        const uint16_t* row = src + (b * kBlock + lane) * K;
        uint16_t* out = dst + b * pairs * 2 * kBlock + 2 * lane;
        for (int64_t k = 0; k < K; ++k) out[(k / 2) * 2 * kBlock + (k % 2)] = row[k];
      }
    }
  });
  return packed;
}

#if defined(__AVX512BF16__)

// The products of rows [0, R) of x with blocks [0, NB) of the panel starting at `w`, into acc.
// Meanwhile prefetches `ahead_lines` cache lines from `ahead` (the next panel) into L2.
template <int R, int NB>
inline void tile_products(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t pairs, __m512 (&acc)[R][NB],
                          const uint16_t* ahead, int64_t ahead_lines) {
  const int64_t lines_per_pair = (ahead_lines + pairs - 1) / pairs;
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int64_t block_stride = pairs * 2 * kBlock;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NB];
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * block_stride + p * 2 * kBlock);
    for (int64_t line = p * lines_per_pair; line < std::min((p + 1) * lines_per_pair, ahead_lines); ++line)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + line * 2 * kBlock), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * x_stride + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], wv[b], xv);
    }
  }
}

// A block's float32 sums plus its bias (none: nullptr), the lanes outside `mask` read as zero.
inline __m512 with_bias(__m512 sum, const float* bias, __mmask16 mask = 0xFFFF) {
  return bias != nullptr ? _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, bias)) : sum;
}

// Rows [0, R) of x times blocks [0, NB) of the panel starting at `w`; writes out[m][0, width).
template <int R, int NB>
inline void panel_tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t pairs, const float* bias,
                       uint16_t* out, int64_t out_stride, int64_t width, const uint16_t* ahead, int64_t ahead_lines) {
  __m512 acc[R][NB];
  tile_products<R, NB>(x, x_stride, w, pairs, acc, ahead, ahead_lines);
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) {
      const int64_t col = b * kBlock;
      if (col >= width) break;
      const int64_t n = std::min<int64_t>(kBlock, width - col);
      const __mmask16 mask = n == kBlock ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
      const __m512 sum = with_bias(acc[m][b], bias != nullptr ? bias + col : nullptr, mask);
      _mm256_mask_storeu_epi16(out + m * out_stride + col, mask, (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}

// The bfloat16 value a product's output holds (the rounding panel_tile stores), widened back.
inline __m512 stored_bf16(__m512 sum) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(sum)), 16));
}

// silu(x Wg^T + bg) * (x Wu^T + bu) for rows [0, R) over NB full blocks of the gate panel at `wg` and
// the up panel at `wu`. Each product is rounded to bfloat16 as panel_tile stores it, then combined
// exactly as silu_and_mul (elementwise.cpp) combines them, so the result is bitwise the unfused one.
template <int R, int NB>
inline void gated_tile(const uint16_t* x, int64_t x_stride, const uint16_t* wg, const uint16_t* wu, int64_t pairs,
                       const float* bg, const float* bu, uint16_t* out, int64_t out_stride, const uint16_t* ahead_g,
                       const uint16_t* ahead_u, int64_t ahead_lines) {
  alignas(64) float gate[R][NB][kBlock];
  {
    __m512 acc[R][NB];
    tile_products<R, NB>(x, x_stride, wg, pairs, acc, ahead_g, ahead_lines);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 3
      for (int b = 0; b < NB; ++b)
        _mm512_store_ps(gate[m][b], stored_bf16(with_bias(acc[m][b], bg != nullptr ? bg + b * kBlock : nullptr)));
  }
  __m512 acc[R][NB];
  tile_products<R, NB>(x, x_stride, wu, pairs, acc, ahead_u, ahead_lines);
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) {
      const __m512 up = stored_bf16(with_bias(acc[m][b], bu != nullptr ? bu + b * kBlock : nullptr));
      const __m512 g = _mm512_load_ps(gate[m][b]);
      const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.f), kiln_native::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
      const __m512 silu = kiln_native::round_bf16x16(_mm512_div_ps(g, denominator));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * out_stride + b * kBlock),
                          kiln_native::to_bf16x16(_mm512_mul_ps(silu, up)));
    }
  }
}

// Which lines of the next panel a panel's row tile prefetches: every tile an equal share, so that
// the next panel streams in over the whole panel's time. With the whole panel asked for by the
// last tile alone (as this once did), a tile's ~1 us at 64 rows was far too short for its
// 55-147 KB to arrive, and the next panel's first tile waited on memory.
struct PrefetchShare {
  int64_t per_tile, total;
  PrefetchShare(int64_t rows, int64_t ahead_lines) : total(ahead_lines) {
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
    per_tile = (ahead_lines + tiles - 1) / tiles;
  }
  // tile `t`'s lines: `count` of them from `ahead` on (64-byte lines of 32 bfloat16)
  const uint16_t* from(const uint16_t* ahead, int64_t t) const { return ahead + std::min(t * per_tile, total) * 2 * kBlock; }
  int64_t count(int64_t t) const { return std::max<int64_t>(0, std::min(per_tile, total - t * per_tile)); }
};

// body(first row, rows, panel, the panel to prefetch meanwhile or -1) for every pass of up to
// kRowChunk rows over every panel, the panels split into a contiguous range per thread. A thread's
// last panel of a pass prefetches its first one for the next pass.
template <typename Body>
void for_each_pass_and_panel(int64_t M, int64_t panels, Body&& body) {
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row0 = 0; row0 < M; row0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, M - row0);
      for (int64_t panel = begin; panel < end; ++panel)
        body(row0, rows, panel, panel + 1 < end ? panel + 1 : row0 + rows < M ? begin : -1);
    }
  });
}

// Panel `panel` (-1: none) of packed weights with `blocks` blocks: its first element and its
// length in 64-byte lines, what a tile loop prefetches.
inline std::pair<const uint16_t*, int64_t> panel_lines(const uint16_t* weights, int64_t block_elems, int64_t pairs,
                                                       int64_t blocks, int64_t panel) {
  if (panel < 0) return {weights, 0};
  const int64_t b0 = panel * kPanel;
  return {weights + b0 * block_elems, std::min(kPanel, blocks - b0) * pairs};
}

// All rows against one panel. The first tile reads the panel from memory, later ones from cache;
// meanwhile the tiles prefetch the next panel (`ahead_lines` lines at `ahead`) into L2, so that
// the memory stream overlaps computing instead of stalling it.
template <int NB>
void panel_rows(int64_t rows, const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t pairs, const float* bias,
                uint16_t* out, int64_t out_stride, int64_t width, const uint16_t* ahead, int64_t ahead_lines) {
  const PrefetchShare share(rows, ahead_lines);
  int64_t m = 0, t = 0;
  for (; m + kTileRows <= rows; m += kTileRows, ++t) {
    panel_tile<kTileRows, NB>(x + m * x_stride, x_stride, w, pairs, bias, out + m * out_stride, out_stride, width,
                              share.from(ahead, t), share.count(t));
  }
  const uint16_t* xs = x + m * x_stride;
  uint16_t* os = out + m * out_stride;
  const uint16_t* a = share.from(ahead, t);
  const int64_t n = share.count(t);
  switch (rows - m) {
    case 7: panel_tile<7, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 6: panel_tile<6, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 5: panel_tile<5, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 4: panel_tile<4, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 3: panel_tile<3, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 2: panel_tile<2, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    case 1: panel_tile<1, NB>(xs, x_stride, w, pairs, bias, os, out_stride, width, a, n); break;
    default: break;
  }
}

// All rows against one gate panel and its up panel (see panel_rows).
template <int NB>
void gated_rows(int64_t rows, const uint16_t* x, int64_t x_stride, const uint16_t* wg, const uint16_t* wu,
                int64_t pairs, const float* bg, const float* bu, uint16_t* out, int64_t out_stride,
                const uint16_t* ahead_g, const uint16_t* ahead_u, int64_t ahead_lines) {
  const PrefetchShare share(rows, ahead_lines);
  int64_t m = 0, t = 0;
  for (; m + kTileRows <= rows; m += kTileRows, ++t) {
    gated_tile<kTileRows, NB>(x + m * x_stride, x_stride, wg, wu, pairs, bg, bu, out + m * out_stride, out_stride,
                              share.from(ahead_g, t), share.from(ahead_u, t), share.count(t));
  }
  const uint16_t* xs = x + m * x_stride;
  uint16_t* os = out + m * out_stride;
#define KILN_GATED_TILE(R) gated_tile<R, NB>(xs, x_stride, wg, wu, pairs, bg, bu, os, out_stride, share.from(ahead_g, t), \
                                             share.from(ahead_u, t), share.count(t))
  switch (rows - m) {
    case 7: KILN_GATED_TILE(7); break;
    case 6: KILN_GATED_TILE(6); break;
    case 5: KILN_GATED_TILE(5); break;
    case 4: KILN_GATED_TILE(4); break;
    case 3: KILN_GATED_TILE(3); break;
    case 2: KILN_GATED_TILE(2); break;
    case 1: KILN_GATED_TILE(1); break;
    default: break;
  }
#undef KILN_GATED_TILE
}

#elif defined(__AVX2__) && defined(__FMA__)

// AVX2 (no bfloat16 arithmetic): the same packed weights, widened to float32 in registers and
// multiplied by x widened once per call, with float32 FMAs. A 64-byte line of a block is two ymm:
// outputs 0-7 and 8-15, each lane holding the pair (k, k+1) as the low and high half of 32 bits, so
// a shift gives the even-k weights as float32 and a mask the odd-k ones: two operations per eight
// lanes of two products. Torch's own bfloat16 product has no fast path on such CPUs (~14 GFLOP/s
// here against ~90 for float32; see cpu_gemm.py). The tiles serve every row count: once they fit
// the 16 ymm registers without spills, they matched or beat MKL's sgemm over a float32 copy of the
// weights from 1 to 2048 rows (all layers of SmolLM2-135M at 128 rows: 316 against 535 ms).

constexpr int64_t kAvx2TileRows = 6;  // 12 accumulators, 2 widened weights, a broadcast and the mask: 16 ymm
constexpr int64_t kAvx2ChunkRows = 64;  // rows per pass over the weight: their float32 x stays in L2

// x [M, K] bfloat16 -> [M, 2 * pairs] float32 (the padded column zero).
at::Tensor widened_rows(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K, int64_t pairs) {
  auto xf = at::empty({M, 2 * pairs}, at::kFloat);
  float* dst = xf.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k = 0; k < K; ++k) dst[m * 2 * pairs + k] = kiln_native::bf16_to_float(x[m * x_stride + k]);
      if (K % 2) dst[m * 2 * pairs + K] = 0.f;
    }
  });
  return xf;
}

// The 16 weights of one parity of pair `p` (even k: the low halves shifted up; odd k: the high
// halves masked) as two ymm of float32, outputs 0-7 and 8-15. The loads take `w` through an empty
// asm, so that the compiler reloads the line from L1 for the odd phase instead of keeping both
// raw halves live across the even phase: with them, the tile needs 18 registers and spills.
inline void even_weights(const uint16_t* w, __m256& lo, __m256& hi) {
  asm volatile("" : "+r"(w));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)), 16));
}

inline void odd_weights(const uint16_t* w, __m256i mask, __m256& lo, __m256& hi) {
  asm volatile("" : "+r"(w));
  lo = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), mask));
  hi = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)), mask));
}

// Rows [0, R) of xf times NB consecutive 16-output blocks at `w` (block_elems apart): float32 sums
// in k order per output, whatever R and NB. Per key pair, the even k of every (block, row), then
// the odd k (each row's broadcast feeds both halves of a block), so that R * NB * 2 accumulators,
// 2 weights, one broadcast and the mask fit the 16 ymm registers (R * NB <= 6).
template <int R, int NB>
__attribute__((noinline)) void block_products(const float* xf, int64_t xf_stride, const uint16_t* w,
                                              int64_t block_elems, int64_t pairs, float (&sums)[NB][R][kBlock]) {
  static_assert(R * NB <= 6, "the accumulators must leave four registers");
  // With several rows, the compiler would keep each row's broadcast live across the blocks (R more
  // registers, and spills); reloading x per block costs a load each instead.
  const auto reloaded = [](const float* x) {
    if constexpr (R > 1 && NB > 1) asm volatile("" : "+r"(x));
    return x;
  };
  __m256 acc[NB][R][2];
#pragma GCC unroll 6
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 6
    for (int m = 0; m < R; ++m) acc[j][m][0] = acc[j][m][1] = _mm256_setzero_ps();
  const __m256i odd = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) {
      __m256 lo, hi;
      even_weights(w + j * block_elems + p * 2 * kBlock, lo, hi);
      const float* x = reloaded(xf);
#pragma GCC unroll 6
      for (int m = 0; m < R; ++m) {
        const __m256 b = _mm256_broadcast_ss(x + m * xf_stride + 2 * p);
        acc[j][m][0] = _mm256_fmadd_ps(b, lo, acc[j][m][0]);
        acc[j][m][1] = _mm256_fmadd_ps(b, hi, acc[j][m][1]);
      }
    }
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) {
      __m256 lo, hi;
      odd_weights(w + j * block_elems + p * 2 * kBlock, odd, lo, hi);
      const float* x = reloaded(xf);
#pragma GCC unroll 6
      for (int m = 0; m < R; ++m) {
        const __m256 b = _mm256_broadcast_ss(x + m * xf_stride + 2 * p + 1);
        acc[j][m][0] = _mm256_fmadd_ps(b, lo, acc[j][m][0]);
        acc[j][m][1] = _mm256_fmadd_ps(b, hi, acc[j][m][1]);
      }
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 6
    for (int m = 0; m < R; ++m) {
      _mm256_storeu_ps(sums[j][m], acc[j][m][0]);
      _mm256_storeu_ps(sums[j][m] + 8, acc[j][m][1]);
    }
}

// Blocks handled at once for the `rest` rows left after the 6-row tiles. A 1-row product has one
// FMA chain per 8 outputs, so one block's two chains (each FMA waiting on the last) cap a thread at
// ~8 bytes of weights per cycle (~22 GB/s with the weights in cache, near DRAM's rate); four blocks
// give eight chains. All products of SmolLM2-135M's 30 layers plus the vocabulary projection,
// streamed from memory, one process, interleaved: 1 row 21.8 -> 17.3 ms, 2 rows 24.1 -> 22.8 ms.
// With 2 or 3 rows, 3 and 2 blocks spilled accumulators even with x reloaded per block.
constexpr int64_t blocks_at_once(int64_t rest) { return rest == 1 ? 4 : rest == 2 ? 2 : 1; }
constexpr int64_t kMaxGroup = 4;  // the most blocks_at_once gives

template <int R, int NB>
inline void group_products(const float* xf, int64_t xf_stride, const uint16_t* w, int64_t block_elems,
                           int64_t pairs, float* sums) {
  block_products<R, NB>(xf, xf_stride, w, block_elems, pairs, *reinterpret_cast<float(*)[NB][R][kBlock]>(sums));
}

// Rows [row0, row1) against the nb blocks from `w` (nb <= blocks_at_once(rows left after the
// tiles)): 6-row tiles block by block, then the rest across the blocks at once.
// `epilogue(m, j, sums)` stores row m's 16 sums of the group's block j.
template <typename Epilogue>
inline void group_rows(int64_t row0, int64_t row1, const float* xf, int64_t xf_stride, const uint16_t* w,
                       int64_t block_elems, int64_t pairs, int64_t nb, Epilogue&& epilogue) {
  alignas(32) float sums[kAvx2TileRows * kBlock];
  int64_t m = row0;
  for (; m + kAvx2TileRows <= row1; m += kAvx2TileRows)
    for (int64_t j = 0; j < nb; ++j) {
      group_products<kAvx2TileRows, 1>(xf + m * xf_stride, xf_stride, w + j * block_elems, block_elems, pairs, sums);
      for (int r = 0; r < kAvx2TileRows; ++r) epilogue(m + r, j, sums + r * kBlock);
    }
  const int64_t rest = row1 - m;
  if (rest == 0) return;
  const float* xs = xf + m * xf_stride;
  switch (rest * 8 + nb) {
#define KILN_GROUP(R, NB) \
  case R * 8 + NB: group_products<R, NB>(xs, xf_stride, w, block_elems, pairs, sums); break;
    KILN_GROUP(1, 1) KILN_GROUP(1, 2) KILN_GROUP(1, 3) KILN_GROUP(1, 4)
    KILN_GROUP(2, 1) KILN_GROUP(2, 2) KILN_GROUP(3, 1) KILN_GROUP(4, 1) KILN_GROUP(5, 1)
#undef KILN_GROUP
    default: TORCH_CHECK(false, "no product tile for ", rest, " rows x ", nb, " blocks");
  }
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t r = 0; r < rest; ++r) epilogue(m + r, j, sums + (j * rest + r) * kBlock);
}

// `body(first block, blocks, row0, row1)` over every chunk of kAvx2ChunkRows rows and group of
// blocks (up to blocks_at_once(the chunk's rows left after its tiles)), chunk by chunk. Threads
// take the next group from a shared counter instead of a fixed share of the blocks: on a shared
// host one core often runs slower than the other, and with fixed shares the fast one waited at
// every chunk's end (libgomp spun ~8 % of a prefill step). Each output is computed the same way
// whichever thread takes it.
template <typename Body>
inline void for_each_chunk_group(int64_t M, int64_t blocks, Body&& body) {
  const int64_t chunks = (M + kAvx2ChunkRows - 1) / kAvx2ChunkRows;
  const int64_t groups_per_chunk = (blocks + kMaxGroup - 1) / kMaxGroup;  // slots; short groups skip some
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < chunks * groups_per_chunk;) {
      const int64_t row0 = item / groups_per_chunk * kAvx2ChunkRows, row1 = std::min(M, row0 + kAvx2ChunkRows);
      const int64_t group = blocks_at_once((row1 - row0) % kAvx2TileRows);
      const int64_t b0 = item % groups_per_chunk * kMaxGroup;
      for (int64_t b = b0; b < std::min(blocks, b0 + kMaxGroup); b += group)
        body(b, std::min(group, blocks - b), row0, row1);
    }
  });
}

#endif

// x and the bias as the tiles read them: rows with unit stride and an even width (odd K: the packed
// weight's last pair has a zero second half, but x must not be read past its row), bias in float32.
struct TileInputs {
  at::Tensor x, bias;
  const uint16_t* x_bits = nullptr;
  const float* bias_f32 = nullptr;
  int64_t x_stride = 0;
};

TileInputs tile_inputs(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK(pair_packed_linear_available(), "pair_packed_linear needs a CPU with AVX512-BF16, or AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kBlock && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_weight_pairs");
  const int64_t K = x.size(1), pairs = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(pairs == (K + 1) / 2, "x has ", K, " features, the packed weight ", 2 * pairs);
  TORCH_CHECK(out_features > (blocks - 1) * kBlock && out_features <= blocks * kBlock, "out_features ",
              out_features, " does not match the packed weight");
  TileInputs in;
  in.x = x.stride(1) == 1 ? x : x.contiguous();
  if (K % 2) in.x = at::constant_pad_nd(in.x, {0, 1});
  in.x_bits = reinterpret_cast<const uint16_t*>(in.x.data_ptr());
  in.x_stride = in.x.stride(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == out_features, "bias must have out_features elements");
    in.bias = bias->to(at::kFloat).contiguous();
    in.bias_f32 = in.bias.data_ptr<float>();
  }
  return in;
}

}  // namespace

namespace kiln_native {

// x [M, K] bf16 (rows may be strided), packed from pack_weight_pairs of a [N, K] weight -> [M, N].
at::Tensor pair_packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                              int64_t out_features) {
  const TileInputs in = tile_inputs(x, packed, bias, out_features);
  const int64_t M = x.size(0), pairs = packed.size(1), blocks = packed.size(0);
  auto out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
#if defined(__AVX512BF16__)
  const uint16_t* xp = in.x_bits;
  const float* bp = in.bias_f32;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t x_stride = in.x_stride, block_elems = pairs * 2 * kBlock;
  const int64_t panels = (blocks + kPanel - 1) / kPanel;
  for_each_pass_and_panel(M, panels, [&](int64_t row0, int64_t rows, int64_t panel, int64_t next) {
    const int64_t b0 = panel * kPanel, nb = std::min(kPanel, blocks - b0), col = b0 * kBlock;
    const int64_t width = std::min(nb * kBlock, out_features - col);
    const uint16_t* w = wp + b0 * block_elems;
    const uint16_t* x_rows = xp + row0 * x_stride;
    const float* pb = bp != nullptr ? bp + col : nullptr;
    uint16_t* o = op + row0 * out_features + col;
    const auto [ahead, ahead_lines] = panel_lines(wp, block_elems, pairs, blocks, next);
    if (nb == 3) panel_rows<3>(rows, x_rows, x_stride, w, pairs, pb, o, out_features, width, ahead, ahead_lines);
    else if (nb == 2) panel_rows<2>(rows, x_rows, x_stride, w, pairs, pb, o, out_features, width, ahead, ahead_lines);
    else panel_rows<1>(rows, x_rows, x_stride, w, pairs, pb, o, out_features, width, ahead, ahead_lines);
  });
#elif defined(__AVX2__) && defined(__FMA__)
  const at::Tensor xf = widened_rows(in.x_bits, in.x_stride, M, x.size(1), pairs);
  const float* xfp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bp = in.bias_f32;
  const int64_t block_elems = pairs * 2 * kBlock;
  for_each_chunk_group(M, blocks, [&](int64_t b0, int64_t nb, int64_t row0, int64_t row1) {
    group_rows(row0, row1, xfp, 2 * pairs, wp + b0 * block_elems, block_elems, pairs, nb,
               [&](int64_t m, int64_t j, const float* sums) {
                 const int64_t col = (b0 + j) * kBlock, width = std::min(kBlock, out_features - col);
                 for (int64_t c = 0; c < width; ++c)
                   op[m * out_features + col + c] =
                       kiln_native::float_to_bf16(bp != nullptr ? sums[c] + bp[col + c] : sums[c]);
               });
  });
#endif
  return out;
}

// silu(x Wg^T + bg) * (x Wu^T + bu) -> [M, I] from the packed [2I, K] gate | up weight (I a multiple
// of 16, so that gate and up blocks do not share a block): bitwise silu_and_mul(pair_packed_linear),
// without writing the [M, 2I] products to memory and reading them back.
at::Tensor pair_packed_silu_gate_up(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                    int64_t intermediate_size) {
  TORCH_CHECK(intermediate_size > 0 && intermediate_size % kBlock == 0, "intermediate_size must be a multiple of 16");
  const TileInputs in = tile_inputs(x, packed, bias, 2 * intermediate_size);
  const int64_t M = x.size(0), pairs = packed.size(1), gate_blocks = intermediate_size / kBlock;
  auto out = at::empty({M, intermediate_size}, x.options());
  if (M == 0) return out;
#if defined(__AVX512BF16__)
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t block_elems = pairs * 2 * kBlock, up_offset = gate_blocks * block_elems;
  const int64_t panels = (gate_blocks + kPanel - 1) / kPanel;
  for_each_pass_and_panel(M, panels, [&](int64_t row0, int64_t rows, int64_t panel, int64_t next) {
    const int64_t b0 = panel * kPanel, nb = std::min(kPanel, gate_blocks - b0), col = b0 * kBlock;
    const uint16_t* wg = wp + b0 * block_elems;
    const uint16_t* x_rows = in.x_bits + row0 * in.x_stride;
    const float* bg = in.bias_f32 != nullptr ? in.bias_f32 + col : nullptr;
    const float* bu = in.bias_f32 != nullptr ? in.bias_f32 + intermediate_size + col : nullptr;
    uint16_t* o = op + row0 * intermediate_size + col;
    const auto [ahead_g, ahead_lines] = panel_lines(wp, block_elems, pairs, gate_blocks, next);
#define KILN_GATED_ROWS(NB) gated_rows<NB>(rows, x_rows, in.x_stride, wg, wg + up_offset, pairs, bg, bu, o, \
                                           intermediate_size, ahead_g, ahead_g + up_offset, ahead_lines)
    if (nb == 3) KILN_GATED_ROWS(3);
    else if (nb == 2) KILN_GATED_ROWS(2);
    else KILN_GATED_ROWS(1);
#undef KILN_GATED_ROWS
  });
#elif defined(__AVX2__) && defined(__FMA__)
  // the tiles: each product rounded to bfloat16 and combined by silu_and_mul's own 8-lane step:
  // bitwise the unfused result
  const at::Tensor xf = widened_rows(in.x_bits, in.x_stride, M, x.size(1), pairs);
  const float* xfp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bias_f32 = in.bias_f32;
  const int64_t block_elems = pairs * 2 * kBlock, up_offset = gate_blocks * block_elems;
  const int64_t chunk = std::min<int64_t>(M, kAvx2ChunkRows);
  at::Tensor gates = at::empty({at::get_num_threads(), chunk, kMaxGroup, kBlock}, at::kFloat);
  for_each_chunk_group(M, gate_blocks, [&](int64_t b0, int64_t nb, int64_t row0, int64_t row1) {
    float* gate = gates.data_ptr<float>() + at::get_thread_num() * chunk * kMaxGroup * kBlock;
    auto bias_of = [&](int64_t offset, int64_t col) { return bias_f32 != nullptr ? bias_f32[offset + col] : 0.f; };
    group_rows(row0, row1, xfp, 2 * pairs, wp + b0 * block_elems, block_elems, pairs, nb,
               [&](int64_t m, int64_t j, const float* sums) {
                 float* g = gate + ((m - row0) * kMaxGroup + j) * kBlock;
                 for (int64_t c = 0; c < kBlock; ++c) g[c] = sums[c] + bias_of(0, (b0 + j) * kBlock + c);
               });
    group_rows(row0, row1, xfp, 2 * pairs, wp + up_offset + b0 * block_elems, block_elems, pairs, nb,
               [&](int64_t m, int64_t j, const float* sums) {
                 const float* g = gate + ((m - row0) * kMaxGroup + j) * kBlock;
                 const int64_t col = (b0 + j) * kBlock;
                 for (int64_t c = 0; c < kBlock; c += 8) {
                   __m256 up = _mm256_loadu_ps(sums + c);
                   if (bias_f32 != nullptr) up = _mm256_add_ps(up, _mm256_loadu_ps(bias_f32 + intermediate_size + col + c));
                   _mm_storeu_si128(reinterpret_cast<__m128i*>(op + m * intermediate_size + col + c),
                                    kiln_native::silu_times_up8(kiln_native::round_bf16x8(_mm256_loadu_ps(g + c)),
                                                                kiln_native::round_bf16x8(up)));
                 }
               });
  });
#endif
  return out;
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("pair_packed_linear_available() -> bool");
  m.impl("pair_packed_linear_available", c10::DispatchKey::CatchAll, &pair_packed_linear_available);
  m.def("pack_weight_pairs(Tensor weight) -> Tensor");
  m.impl("pack_weight_pairs", c10::DispatchKey::CPU, &pack_weight_pairs);
  m.def("pair_packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.impl("pair_packed_linear", c10::DispatchKey::CPU, &kiln_native::pair_packed_linear);
  m.def("pair_packed_silu_gate_up(Tensor x, Tensor packed, Tensor? bias, int intermediate_size) -> Tensor");
  m.impl("pair_packed_silu_gate_up", c10::DispatchKey::CPU, &kiln_native::pair_packed_silu_gate_up);
}
