// Prefill attention straight from the paged KV cache (CPU, bfloat16, AVX512-BF16).
//
// torch's CPU SDPA with an explicit mask computes every (query, key) pair of the padded batch and
// runs at ~100 GFLOP/s here; this kernel skips the masked tiles (causal, sliding window) and does
// both matrix products with vdpbf16ps on tiles shared by many query rows, flash-attention style
// (one pass over the keys with a running max and sum per row).
//
// A task is (sequence, kv head, 16 query positions): its rows are those positions for every query
// head of the kv head's GQA group. The cache is in the pairs layout (kv_layout.py), the operands of
// vdpbf16ps as they lie: a K tile [D/2][16][2] gives 16 scores from D/2 instructions with no
// horizontal sums, a V tile [8][D][2] two keys per instruction. Probabilities are rounded to
// bfloat16 before the V product, as transformers' eager attention rounds them.
//
// Layout: q [T, H, D], the rows of the sequences one after another (query_starts [S + 1] int32);
// caches [num_blocks, KH, 16, D] (pairs tiles); block_tables [S, max_blocks] int32; seq_lens [S]
// int32 (keys visible to the sequence's last query, itself included; its queries are the last
// positions). sliding_window <= 0 means none; otherwise a query sees its last `sliding_window` keys.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "prefill_tasks.h"
#include "simd_math.h"

namespace {

#if defined(__AVX512BF16__)
using kiln_native::exp16;

constexpr int64_t kTile = 16;    // keys per cache block, and query positions per task
constexpr int64_t kMaxDim = 256;  // head_dim bound of the fixed-size tile buffers

// The running state of one query head's 16 rows (positions) of a task: row max and sum of the
// rounded probabilities as 16 lanes, the unnormalized outputs, and the rows' queries side by side
// (copied once per task: read through 16 row pointers, the score loop spent a third of its
// instructions moving the pointers in and out of vector registers).
struct RowBlock {
  __m512 max, sum;
  alignas(64) float acc[kTile * kMaxDim];
  alignas(64) uint16_t q[kTile * kMaxDim];
};

// The 16 lane sums (Op: add) or maxima (Op: max) of v[0..15] as one vector, lane r from v[r]. It runs
// _mm512_reduce_add_ps's tree (halves of 256, then 128, 64 and 32 bits) on all rows at once, so each
// lane is bitwise that reduction, in 45 instructions where 16 separate reductions took 16 dependent
// chains of 7 and then a store-forwarding stall to read their 16 scalars back as one vector.
template <typename Op>
inline __m512 reduce_rows(const __m512 (&v)[kTile], Op op) {
  // slot s takes row 4 (s % 4) + s / 4: the last stage leaves slot c + 4 j in lane 4 c + j
  const auto slot = [&](int s) { return v[4 * (s % 4) + s / 4]; };
  __m512 halves[8], quarters[4], eighths[2];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {  // lanes 0-7: slot 2k folded 256 bits, 8-15: slot 2k + 1
    const __m512 a = slot(2 * k), b = slot(2 * k + 1);
    halves[k] = op(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)  // 128-bit lane c: slot 4k + c folded to 4 lanes
    quarters[k] = op(_mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0x88),
                     _mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0xDD));
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k)  // 128-bit lane c: slots 8k + c and 8k + 4 + c, two lanes each
    eighths[k] = op(_mm512_shuffle_ps(quarters[2 * k], quarters[2 * k + 1], 0x44),
                    _mm512_shuffle_ps(quarters[2 * k], quarters[2 * k + 1], 0xEE));
  return op(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88), _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
}

inline __m512 add16(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 max16(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }

// One key tile against the 16 rows of one query head: every step below works on all rows at once
// (16 independent dependency chains, so the core's pipelines stay full). The row loops have a
// fixed trip count so that the per-row vectors stay in registers; rows past the end of a short
// query tile repeat a real row and see no keys. kFixedD: the head dim as a constant (0: `head_dim`
// at run time), so that every row's offsets are immediates.
template <int64_t kFixedD>
inline void attend_tile(RowBlock& st, const uint32_t* kt, const uint32_t* vt, const __mmask16* visible,
                        int64_t pair_lo, int64_t pair_hi, int64_t head_dim, float scale) {
  const int64_t D = kFixedD > 0 ? kFixedD : head_dim;
  const int64_t pairs = D / 2;
  __m512 scores[kTile];
  for (int64_t r = 0; r < kTile; ++r) scores[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh keys = (__m512bh)_mm512_loadu_si512(kt + p * kTile);
#pragma GCC unroll 16
    for (int64_t r = 0; r < kTile; ++r) {
      const uint32_t pair = reinterpret_cast<const uint32_t*>(st.q + r * D)[p];
      scores[r] = _mm512_dpbf16_ps(scores[r], (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair)), keys);
    }
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < kTile; ++r)
    scores[r] = _mm512_mask_mov_ps(neg_inf, visible[r], _mm512_mul_ps(scores[r], _mm512_set1_ps(scale)));
  const __m512 new_max = _mm512_max_ps(st.max, reduce_rows(scores, max16));  // -inf: rows that see nothing yet
  const __mmask16 empty = _mm512_cmp_ps_mask(new_max, neg_inf, _CMP_EQ_OQ);
  // exp(old - new): 0 on a row's first visible tile; 1 while a row has seen nothing yet
  const __m512 correction = _mm512_mask_mov_ps(exp16(_mm512_sub_ps(st.max, new_max)), empty, _mm512_set1_ps(1.f));
  st.max = new_max;
  alignas(64) float row_max[kTile], row_corr[kTile];
  _mm512_store_ps(row_max, new_max);
  _mm512_store_ps(row_corr, correction);
  alignas(32) uint32_t weights[kTile][kTile / 2];  // per row: bfloat16 probabilities, key pairs
  __m512 rounded_probs[kTile];
  for (int64_t r = 0; r < kTile; ++r) {
    const __m512 probs = _mm512_maskz_mov_ps(visible[r], exp16(_mm512_sub_ps(scores[r], _mm512_set1_ps(row_max[r]))));
    const __m256bh rounded = _mm512_cvtneps_pbh(probs);
    _mm256_store_si256(reinterpret_cast<__m256i*>(weights[r]), (__m256i)rounded);
    rounded_probs[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)rounded), 16));
  }
  st.sum = _mm512_add_ps(_mm512_mul_ps(st.sum, correction), reduce_rows(rounded_probs, add16));
  for (int64_t d = 0; d < D; d += 16) {
    __m512 acc[kTile];
#pragma GCC unroll 16
    for (int64_t r = 0; r < kTile; ++r) acc[r] = _mm512_mul_ps(_mm512_load_ps(st.acc + r * D + d), _mm512_set1_ps(row_corr[r]));
    for (int64_t j2 = pair_lo; j2 <= pair_hi; ++j2) {
      const __m512bh values = (__m512bh)_mm512_loadu_si512(vt + j2 * D + d);
#pragma GCC unroll 16
      for (int64_t r = 0; r < kTile; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(weights[r][j2])), values);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < kTile; ++r) _mm512_store_ps(st.acc + r * D + d, acc[r]);
  }
}

void prefill_attention(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* block_tables,
                       const int32_t* seq_lens, const int32_t* query_starts, uint16_t* out, int64_t num_seqs,
                       int64_t num_heads, int64_t num_kv_heads, int64_t D, int64_t max_blocks, float scale,
                       int64_t window, int64_t q_row_stride) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tile = kTile * D, block = num_kv_heads * tile;
  const auto make_state = [&] { return std::vector<RowBlock>(group); };
  kiln_native::for_each_prefill_task(query_starts, num_seqs, num_kv_heads, kTile, make_state,
                                     [&](std::vector<RowBlock>& blocks, int64_t s, int64_t i0, int64_t num_rows,
                                         int64_t kh) {
    const int64_t query_len = query_starts[s + 1] - query_starts[s];
    const int64_t context = seq_lens[s] - query_len;  // position of query 0
    const int64_t last_key = context + i0 + num_rows - 1;
    const int64_t first_key = window > 0 ? std::max<int64_t>(0, context + i0 - window + 1) : 0;
    const int32_t* table = block_tables + s * max_blocks;
    for (int64_t g = 0; g < group; ++g) {
      blocks[g].max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      blocks[g].sum = _mm512_setzero_ps();
      std::fill(blocks[g].acc, blocks[g].acc + kTile * D, 0.f);
      for (int64_t r = 0; r < kTile; ++r)
        std::memcpy(blocks[g].q + r * D, q + (query_starts[s] + i0 + std::min(r, num_rows - 1)) * q_row_stride + (kh * group + g) * D,
                    D * sizeof(uint16_t));
    }
    for (int64_t b = first_key / kTile; b <= last_key / kTile; ++b) {
      const uint32_t* kt = reinterpret_cast<const uint32_t*>(k_cache + table[b] * block + kh * tile);
      const uint32_t* vt = reinterpret_cast<const uint32_t*>(v_cache + table[b] * block + kh * tile);
      const int64_t key0 = b * kTile;
      __mmask16 visible[kTile] = {};
      int64_t lo_all = kTile, hi_all = -1;
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t pos = context + i0 + r;
        const int64_t lo = std::max<int64_t>(window > 0 ? pos - window + 1 : 0, key0) - key0;
        const int64_t hi = std::min<int64_t>(pos, key0 + kTile - 1) - key0;  // inclusive
        if (lo > hi) continue;
        visible[r] = static_cast<__mmask16>(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
        lo_all = std::min(lo_all, lo);
        hi_all = std::max(hi_all, hi);
      }
      if (hi_all < 0) continue;
      for (int64_t g = 0; g < group; ++g) {
        if (D == 64) attend_tile<64>(blocks[g], kt, vt, visible, lo_all >> 1, hi_all >> 1, D, scale);
        else if (D == 128) attend_tile<128>(blocks[g], kt, vt, visible, lo_all >> 1, hi_all >> 1, D, scale);
        else attend_tile<0>(blocks[g], kt, vt, visible, lo_all >> 1, hi_all >> 1, D, scale);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      alignas(64) float sums[kTile];
      _mm512_store_ps(sums, blocks[g].sum);
      for (int64_t r = 0; r < num_rows; ++r) {
        uint16_t* o = out + ((query_starts[s] + i0 + r) * num_heads + kh * group + g) * D;
        const float inv = 1.f / sums[r];
        for (int64_t d = 0; d < D; ++d) {
          o[d] = kiln_native::float_to_bf16(blocks[g].acc[r * D + d] * inv);
        }
      }
    }
  });
}
#endif

bool paged_prefill_attention_available() { return kiln_native::avx512_bf16_available(); }

}  // namespace

namespace kiln_native {

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_starts, double scale, int64_t sliding_window) {
  TORCH_CHECK(paged_prefill_attention_available(), "paged_prefill_attention needs AVX512-BF16");
  const kiln_native::PrefillInputs in =
      kiln_native::prefill_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_starts, 32);
  TORCH_CHECK(q.size(2) <= 256, "head_dim at most 256 (the size of the tile buffers)");
  auto out = in.new_output();
#if defined(__AVX512BF16__)
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
  prefill_attention(u16(in.q), u16(k_cache), u16(v_cache), in.block_tables.data_ptr<int32_t>(),
      in.seq_lens.data_ptr<int32_t>(), in.query_starts.data_ptr<int32_t>(),
      reinterpret_cast<uint16_t*>(out.data_ptr()), in.num_seqs, in.num_heads, in.num_kv_heads, in.head_dim,
      in.max_blocks, static_cast<float>(scale), sliding_window, in.q_row_stride);
#endif
  return out;
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("paged_prefill_attention_available() -> bool");
  m.impl("paged_prefill_attention_available", c10::DispatchKey::CompositeExplicitAutograd,
         &paged_prefill_attention_available);
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_starts, float scale, int sliding_window) -> Tensor");
  m.impl("paged_prefill_attention", c10::DispatchKey::CPU, &kiln_native::paged_prefill_attention);
}
