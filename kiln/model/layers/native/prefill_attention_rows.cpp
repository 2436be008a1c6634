// Prefill attention over rows-layout caches (CPU, bfloat16 queries over bfloat16 or fp8 caches, AVX2
// and FMA): the counterpart of prefill_attention.cpp for CPUs without AVX512-BF16, whose caches keep
// the rows layout, and for fp8 caches everywhere (they widen through float16: simd_math.h).
//
// Before it, such CPUs ran torch's SDPA over gathered, padded tiles with an explicit mask, which
// computes every (query, key) pair of the padded batch (0.44 s of a 4.8 s step of 8 x 256 prompt
// tokens on the AVX2 host, plus ~0.1 s building masks and gathering). This kernel is flash-attention
// style: one pass over the visible key blocks with a running max and sum per row, masked blocks
// skipped.
//
// A task is (sequence, kv head, 16 query positions); its rows are those positions for every query
// head of the kv head's GQA group, position-major. Per key block the K tile is widened and
// transposed once into [D][16] float32, so the scores of 6 rows accumulate in the 16 keys' lanes
// with broadcast FMAs and no horizontal sums; the V tile is read in place, 16 dims per load
// (Chunk16), into row sums kept in chunk order. Probabilities are rounded to bfloat16 before the V
// product, as transformers' eager attention and torch's CPU SDPA round them, and the running sum
// adds the rounded values.
//
// Layout: q [T, H, D], the rows of the sequences one after another (query_starts [S + 1] int32);
// caches [num_blocks, KH, block_size, D] (rows; block_size a multiple of 16, read as tiles of 16
// keys); block_tables [S, max_blocks] int32; seq_lens [S]
// int32 (keys visible to the sequence's last query, itself included; its queries are the last
// positions). sliding_window <= 0 means none; otherwise a query sees its last `sliding_window` keys.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "prefill_tasks.h"
#include "simd_math.h"

namespace {

bool rows_prefill_available() {
#if defined(KILN_FP8_SIMD)
  return true;
#else
  return false;
#endif
}

#if defined(KILN_FP8_SIMD)
using kiln_native::bf16_to_float;
using kiln_native::load_chunk;  // a tile's values as bfloat16 bits or fp8 (simd_math.h)
using kiln_native::widen8;

constexpr int64_t kKeys = 16;       // keys per tile (a cache block holds one or more tiles)
constexpr int64_t kSpanBlocks = 4;  // tiles per step of the running softmax (see TaskRows)
constexpr int64_t kSpan = kSpanBlocks * kKeys;
constexpr int64_t kPositions = 16;  // query positions per task
constexpr int64_t kRowTile = 6;     // rows per register tile: 12 accumulators

// round_bf16 on the bits, to nearest even (a NaN stays a NaN): vectorizes to 4 integer operations,
// where narrowing to 16 bits and widening back took 8.
inline float rounded_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// kt [D][16] float32 = the K tile [16][D] widened and transposed, 8 keys x 8 dims at a time in
// registers (widen, 24 shuffles, 8 stores): element by element, the transposes took a third of
// the kernel's time.
template <typename C>
inline void transpose_tile(const C* k, int64_t D, float* kt) {
  for (int64_t t0 = 0; t0 < kKeys; t0 += 8) {
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = widen8(k + (t0 + i) * D + d0);
      __m256 u[8], v[8];
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        v[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
        v[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
        v[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(kt + (d0 + j) * kKeys + t0, _mm256_permute2f128_ps(v[j], v[j + 4], 0x20));
        _mm256_storeu_ps(kt + (d0 + j + 4) * kKeys + t0, _mm256_permute2f128_ps(v[j], v[j + 4], 0x31));
      }
    }
  }
}

// scores[r][16 g + t] = q_r . k_t for rows [0, R) against the transposed K tiles kt [groups][D][16].
template <int R>
inline void tile_scores(const float* q, int64_t D, const float* kt, int64_t groups, float (*scores)[kSpan]) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* ktg = kt + g * D * kKeys;
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(ktg + d * kKeys), k1 = _mm256_loadu_ps(ktg + d * kKeys + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(q + r * D + d);
        a[r][0] = _mm256_fmadd_ps(b, k0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(b, k1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(scores[r] + g * kKeys, a[r][0]);
      _mm256_storeu_ps(scores[r] + g * kKeys + 8, a[r][1]);
    }
  }
}

// acc_r (chunk order) += sum over span keys [t0, t1) of p[r][t] * v_t for rows [0, R); key t is row
// t % 16 of the V tile vt[t / 16] ([16][D]).
template <int R, typename C>
inline void tile_accumulate(const float (*p)[kSpan], const C* const* vt, float* acc, int64_t D, int64_t t0,
                            int64_t t1) {
  for (int64_t d = 0; d < D; d += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_loadu_ps(acc + r * D + d);
      a[r][1] = _mm256_loadu_ps(acc + r * D + d + 8);
    }
    for (int64_t g = t0 / kKeys; g * kKeys < t1; ++g) {
      const int64_t g0 = g * kKeys, lo = std::max(t0, g0), hi = std::min(t1, g0 + kKeys);
      const C* v = vt[g] + d - g0 * D;
      for (int64_t t = lo; t < hi; ++t) {
        const kiln_native::Chunk16 c = load_chunk(v + t * D);
        for (int r = 0; r < R; ++r) {
          const __m256 pt = _mm256_broadcast_ss(p[r] + t);
          a[r][0] = _mm256_fmadd_ps(pt, c.a, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(pt, c.b, a[r][1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc + r * D + d, a[r][0]);
      _mm256_storeu_ps(acc + r * D + d + 8, a[r][1]);
    }
  }
}

// f(R as a compile-time constant, first row) over `rows` rows in register tiles of up to kRowTile
template <typename F>
inline void for_row_tiles(int64_t rows, F&& f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    switch (std::min(kRowTile, rows - r0)) {
      case 6: f(std::integral_constant<int, 6>{}, r0); break;
      case 5: f(std::integral_constant<int, 5>{}, r0); break;
      case 4: f(std::integral_constant<int, 4>{}, r0); break;
      case 3: f(std::integral_constant<int, 3>{}, r0); break;
      case 2: f(std::integral_constant<int, 2>{}, r0); break;
      default: f(std::integral_constant<int, 1>{}, r0); break;
    }
  }
}

// One task's rows: queries (scaled, natural order), running max and sum, sums of V (chunk order),
// and the scratch of one span of keys. The running softmax steps a span of 4 tiles at a time:
// its per-row work (max, rescaling the sums, bookkeeping) is paid once per 64 keys, not per 16.
struct TaskRows {
  std::vector<float> q, acc, max, sum, kt, score_rows;

  TaskRows(int64_t max_rows, int64_t D)
      : q(max_rows * D), acc(max_rows * D), max(max_rows), sum(max_rows), kt(kSpanBlocks * D * kKeys),
        score_rows(max_rows * kSpan) {}
  float (*scores())[kSpan] { return reinterpret_cast<float(*)[kSpan]>(score_rows.data()); }
};

template <typename C>
void prefill_attention_rows(const uint16_t* q, const C* k_cache, const C* v_cache,
                            const int32_t* block_tables, const int32_t* seq_lens, const int32_t* query_starts,
                            uint16_t* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t D,
                            int64_t max_blocks, int64_t block_size, float scale, int64_t window,
                            int64_t q_row_stride) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tiles_per_block = block_size / kKeys;
  const float k_scale = scale * kiln_native::kRawScale<C>;  // fp8 tiles widen raw (simd_math.h)
  const auto make_state = [&] { return TaskRows(kPositions * group, D); };
  kiln_native::for_each_prefill_task(query_starts, num_seqs, num_kv_heads, kPositions, make_state,
                                     [&](TaskRows& st, int64_t s, int64_t i0, int64_t positions, int64_t kh) {
    const int64_t query_len = query_starts[s + 1] - query_starts[s];
    const int64_t context = seq_lens[s] - query_len;  // position of query 0
    const int64_t last_key = context + i0 + positions - 1;
    const int64_t first_key = window > 0 ? std::max<int64_t>(0, context + i0 - window + 1) : 0;
    const int32_t* table = block_tables + s * max_blocks;
    const int64_t rows = positions * group;
    // tile t of kv head kh: its block's rows of that head, t's 16 of them
    auto tile_at = [&](const C* cache, int64_t t) {
      return cache + ((table[t / tiles_per_block] * num_kv_heads + kh) * block_size + t % tiles_per_block * kKeys) * D;
    };
    // row r = (position r / group, head kh * group + r % group), in q and in the output
    auto q_row = [&](int64_t r) { return (query_starts[s] + i0 + r / group) * q_row_stride + (kh * group + r % group) * D; };
    auto out_row = [&](int64_t r) { return ((query_starts[s] + i0 + r / group) * num_heads + kh * group + r % group) * D; };
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* src = q + q_row(r);
      for (int64_t d = 0; d < D; ++d) st.q[r * D + d] = bf16_to_float(src[d]) * k_scale;
    }
    std::fill(st.acc.begin(), st.acc.begin() + rows * D, 0.f);
    std::fill(st.max.begin(), st.max.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(st.sum.begin(), st.sum.begin() + rows, 0.f);
    for (int64_t b0 = first_key / kKeys; b0 <= last_key / kKeys; b0 += kSpanBlocks) {
      const int64_t blocks = std::min(kSpanBlocks, last_key / kKeys + 1 - b0), key0 = b0 * kKeys;
      const C* vt[kSpanBlocks];
      for (int64_t g = 0; g < blocks; ++g) {
        transpose_tile(tile_at(k_cache, b0 + g), D, st.kt.data() + g * D * kKeys);
        vt[g] = tile_at(v_cache, b0 + g);
      }
      for_row_tiles(rows, [&](auto R, int64_t r0) {
        tile_scores<decltype(R)::value>(st.q.data() + r0 * D, D, st.kt.data(), blocks, st.scores() + r0);
      });
      int64_t lo_all = kSpan, hi_all = -1;  // the keys any row sees: the V product's range
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = context + i0 + r / group;
        const int64_t lo = std::max<int64_t>(window > 0 ? pos - window + 1 : 0, key0) - key0;
        const int64_t hi = std::min<int64_t>(pos, key0 + blocks * kKeys - 1) - key0;  // inclusive
        float* p = st.scores()[r];
        if (lo > hi) {  // nothing visible to this row here
          std::fill(p, p + kSpan, 0.f);
          continue;
        }
        lo_all = std::min(lo_all, lo);
        hi_all = std::max(hi_all, hi);
        const int32_t lo32 = static_cast<int32_t>(lo), hi32 = static_cast<int32_t>(hi);  // 32-bit lanes
        float span_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : span_max)
        for (int32_t t = 0; t < kSpan; ++t) {
          const float v = t >= lo32 && t <= hi32 ? p[t] : -std::numeric_limits<float>::infinity();
          span_max = span_max > v ? span_max : v;
        }
        const float new_max = std::max(st.max[r], span_max);
        const float correction = kiln_native::fast_exp(st.max[r] - new_max);  // ~0 on the first visible span
        float span_sum = 0.f;
#pragma omp simd reduction(+ : span_sum)
        for (int32_t t = 0; t < kSpan; ++t) {
          const float e = t >= lo32 && t <= hi32 ? rounded_bf16(kiln_native::fast_exp(p[t] - new_max)) : 0.f;
          p[t] = e;
          span_sum += e;
        }
        st.sum[r] = st.sum[r] * correction + span_sum;
        st.max[r] = new_max;
        if (correction != 1.f)
          for (int64_t d = 0; d < D; ++d) st.acc[r * D + d] *= correction;
      }
      if (hi_all < 0) continue;
      for_row_tiles(rows, [&](auto R, int64_t r0) {
        tile_accumulate<decltype(R)::value>(st.scores() + r0, vt, st.acc.data() + r0 * D, D, lo_all, hi_all + 1);
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* o = out + out_row(r);
      const __m256 inv = _mm256_set1_ps(kiln_native::kRawScale<C> / st.sum[r]);
      for (int64_t d = 0; d < D; d += 16) {  // chunk order (even dims, odd dims) back to natural
        const __m256 even = _mm256_mul_ps(_mm256_loadu_ps(st.acc.data() + r * D + d), inv);
        const __m256 odd = _mm256_mul_ps(_mm256_loadu_ps(st.acc.data() + r * D + d + 8), inv);
        const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
        alignas(32) float natural[16];
        _mm256_store_ps(natural, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_store_ps(natural + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        for (int64_t i = 0; i < 16; ++i) o[d + i] = kiln_native::float_to_bf16(natural[i]);
      }
    }
  });
}
#endif

}  // namespace

namespace kiln_native {

at::Tensor paged_prefill_attention_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& query_starts, double scale, int64_t sliding_window) {
  TORCH_CHECK(rows_prefill_available(), "paged_prefill_attention_rows needs AVX2, FMA and F16C");
  const kiln_native::PrefillInputs in =
      kiln_native::prefill_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_starts, 16, true, true);
  auto out = in.new_output();
#if defined(KILN_FP8_SIMD)
  kiln_native::with_cache_type<uint16_t>(k_cache.scalar_type(), [&](auto cache_type) {  // bfloat16 as bits
    using C = decltype(cache_type);
    prefill_attention_rows(reinterpret_cast<const uint16_t*>(in.q.data_ptr()),
        reinterpret_cast<const C*>(k_cache.data_ptr()), reinterpret_cast<const C*>(v_cache.data_ptr()),
        in.block_tables.data_ptr<int32_t>(), in.seq_lens.data_ptr<int32_t>(), in.query_starts.data_ptr<int32_t>(),
        reinterpret_cast<uint16_t*>(out.data_ptr()), in.num_seqs, in.num_heads, in.num_kv_heads, in.head_dim,
        in.max_blocks, in.block_size, static_cast<float>(scale), sliding_window, in.q_row_stride);
  });
#endif
  return out;
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("paged_prefill_attention_rows_available() -> bool");
  m.impl("paged_prefill_attention_rows_available", c10::DispatchKey::CompositeExplicitAutograd,
         &rows_prefill_available);
  m.def("paged_prefill_attention_rows(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_starts, float scale, int sliding_window) -> Tensor");
  m.impl("paged_prefill_attention_rows", c10::DispatchKey::CPU, &kiln_native::paged_prefill_attention_rows);
}
