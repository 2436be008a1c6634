// Decode attention straight from the paged KV cache (CPU).
//
// The torch path gathers every sequence's K/V tiles into a contiguous copy and then runs two
// batched matmuls: three passes over the cache. This kernel reads each (block, kv head) tile once,
// in place (scores, then a float32 softmax per query head, then the weighted sum of V), so decode
// attention runs at about the speed of reading the cache. One task per sequence: a block's tiles of
// all kv heads are one contiguous read, and a GQA group of query heads shares every tile.
//
// bfloat16 caches with 16-key blocks and head_dim a multiple of 32 take the vdpbf16ps path
// (AVX512-BF16): scores of a whole tile at once with no per-key horizontal sum, probabilities
// rounded to bfloat16 (as transformers' eager attention rounds them) and multiplied with V two keys
// per instruction. It computes all 16 rows of a tile and drops those outside the visible range,
// which must therefore hold finite values (the caches are zero-filled; reused blocks hold old keys).
//
// Layout: q [S, H, D]; caches [num_blocks, KH, block_size, D]; block_tables [S, max_blocks] int32;
// seq_lens [S] int32 (keys visible to the sequence's query, its own included); out [S, H, D].
// sliding_window <= 0 means none; otherwise only the last `sliding_window` keys are visible.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd_math.h"

namespace {

// Widening loads that the compiler vectorizes (bfloat16 is the top half of a float32).
template <typename T>
inline void load_floats(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void load_floats(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void load_floats(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = kiln_native::bf16_to_float(bits[i]);
}

#if defined(__AVX512F__)
// 16 cache values widened to float32 lanes, straight from the cache (no staging copy).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) { return kiln_native::load_bf16x16(reinterpret_cast<const uint16_t*>(p)); }
template <typename T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#else
template <typename T>
constexpr bool kVectorized = false;
#endif

// scores[t] = q . k[t] for the tile's rows t0..t1 (k: the cache tile, row-major [t][D]).
template <typename T>
inline void scores_of_tile(const float* q, const T* k, float* scores, int64_t t0, int64_t t1, int64_t D) {
#if defined(__AVX512F__)
  if constexpr (kVectorized<T>) {
    if (D % 16 == 0) {
      for (int64_t t = t0; t < t1; ++t) {
        const T* kr = k + t * D;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), load16(kr));
        for (int64_t d = 16; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(kr + d), a);
        scores[t] = _mm512_reduce_add_ps(a);
      }
      return;
    }
  }
#endif
  for (int64_t t = t0; t < t1; ++t) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[t * D + d]);
    scores[t] = dot;
  }
}

#if defined(__AVX512BF16__)
// Lane i of the result: the sum of the 16 lanes of a[m] with m = the i-th entry of kSum16Order.
// (Four folding rounds of shuffles and adds, instead of 16 horizontal reductions.)
constexpr int kSum16Order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int j = 0; j < 8; ++j)
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[j], b[j + 4], 0x88), _mm512_shuffle_f32x4(b[j], b[j + 4], 0xDD));
  const __m512 d0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  const __m512 d1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(d0, d1, 0x44), _mm512_shuffle_ps(d0, d1, 0xEE));
}

// scores[t] = scale * (q . k[t]) for the rows t0..t1 of a 16-row bfloat16 tile, D a multiple of 32:
// products of bfloat16 pairs (exact in float32) summed in float32 by vdpbf16ps on the cache as it
// lies, all 16 rows at once (the rows outside t0..t1 are computed and dropped: they are finite).
inline void scores_of_tile16_bf16(const c10::BFloat16* q, const c10::BFloat16* k, float* scores, int64_t t0,
                                  int64_t t1, int64_t D, float scale) {
  __m512 partial[16];
  for (int m = 0; m < 16; ++m) {
    const c10::BFloat16* kr = k + kSum16Order[m] * D;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(kr + d));
    partial[m] = a;
  }
  alignas(64) float row[16];
  _mm512_store_ps(row, _mm512_mul_ps(sum16(partial), _mm512_set1_ps(scale)));
  for (int64_t t = t0; t < t1; ++t) scores[t] = row[t];
}

// acc += sum_t p[t] * v[t] over the rows t0..t1 of a 16-row bfloat16 tile, D a multiple of 32, with p
// already bfloat16 values (held as float32). vdpbf16ps takes two keys at a time: the rows t and t + 1
// interleaved element by element, times the pair (p[t], p[t + 1]). acc is kept in the interleaved
// order (see kiln_native::pair_interleaved_pos); rows outside t0..t1 get weight 0.
inline void accumulate_tile16_bf16(const float* p, const c10::BFloat16* v, float* acc, int64_t t0, int64_t t1,
                                   int64_t D) {
  alignas(64) float weights[16];
  for (int t = 0; t < 16; ++t) weights[t] = (t >= t0 && t < t1) ? p[t] : 0.f;
  alignas(32) uint32_t pairs[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(weights)));
  for (int64_t d = 0; d < D; d += 32) {
    __m512 lo = _mm512_loadu_ps(acc + d), hi = _mm512_loadu_ps(acc + d + 16);
    for (int j = 0; j < 8; ++j) {
      const __m512i r0 = _mm512_loadu_si512(v + (2 * j) * D + d), r1 = _mm512_loadu_si512(v + (2 * j + 1) * D + d);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pairs[j]));
      lo = _mm512_dpbf16_ps(lo, w, (__m512bh)_mm512_unpacklo_epi16(r0, r1));
      hi = _mm512_dpbf16_ps(hi, w, (__m512bh)_mm512_unpackhi_epi16(r0, r1));
    }
    _mm512_storeu_ps(acc + d, lo);
    _mm512_storeu_ps(acc + d + 16, hi);
  }
}

#endif

// acc += sum_t p[t] * v[t] over the tile's rows, acc held in registers 16 lanes at a time.
template <typename T>
inline void accumulate_tile(const float* p, const T* v, float* acc, int64_t t0, int64_t t1, int64_t D) {
#if defined(__AVX512F__)
  if constexpr (kVectorized<T>) {
    if (D % 16 == 0) {
      for (int64_t d = 0; d < D; d += 16) {
        __m512 a = _mm512_loadu_ps(acc + d);
        for (int64_t t = t0; t < t1; ++t) a = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), load16(v + t * D + d), a);
        _mm512_storeu_ps(acc + d, a);
      }
      return;
    }
  }
#endif
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t d = 0; d < D; ++d) acc[d] += p[t] * static_cast<float>(v[t * D + d]);
}

// A block's tiles (all kv heads, contiguous) sit at an address unrelated to the previous block's,
// out of reach of the hardware prefetcher: ask for the next block (into L1) while this one is
// computed on, and for the one kFarBlocks ahead into L2, so that more of DRAM's latency overlaps
// (30 layers of decode attention over 64 x 320 keys, medians of interleaved runs: 37.1 -> 30.4 ms
// with scattered blocks, 29.6 -> 26.8 with consecutive ones; 2, 3, 4 and 6 ahead measured alike).
constexpr int64_t kFarBlocks = 4;
template <typename T>
inline void prefetch_bytes(const T* start, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t i = 0; i < elements * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(bytes + i);
}

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                      const int32_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim;
  const int64_t tile = block_size * D, block = num_kv_heads * tile;
  // One task per sequence: its blocks are read whole (every kv head's tile, contiguous), so each
  // block is one contiguous read rather than num_kv_heads scattered ones. With fewer sequences than
  // threads, one task per (sequence, kv head) keeps every thread busy.
  const int64_t parts = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
  const int64_t kv_per_task = num_kv_heads / parts, heads_per_task = kv_per_task * group;
  const int64_t span = kv_per_task * tile;  // a task's part of a block, contiguous
  const int64_t span_lines = (span * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  const int64_t lines_per_head = (span_lines + heads_per_task - 1) / heads_per_task;
#if defined(__AVX512BF16__)
  const bool bf16_tiles = std::is_same_v<T, c10::BFloat16> && block_size == 16 && D % 32 == 0;
#else
  const bool bf16_tiles = false;
#endif
  at::parallel_for(0, num_seqs * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * D), acc(num_heads * D), probs, sums(num_heads);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / parts, h0 = (task % parts) * heads_per_task, h1 = h0 + heads_per_task;
      const int64_t span_start = (h0 / group) * tile;
      const int64_t len = seq_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;  // visible keys
      const int32_t* table = block_tables + s * max_blocks;
      const T* qs = q + s * num_heads * D;
      probs.resize(num_heads * n);
      if (!bf16_tiles) {  // the float32 tile loops read a scaled float32 copy of q
        load_floats(qs + h0 * D, qf.data() + h0 * D, heads_per_task * D);
        for (int64_t i = h0 * D; i < h1 * D; ++i) qf[i] *= scale;
      }
      // body(head h, its kv head's tile, offset of the tile's first key among the visible ones,
      // first and end row inside the tile) for the task's query heads and every visible block.
      auto for_each_tile = [&](const T* cache, auto&& body) {
        for (int64_t b = first / block_size; b * block_size < len; ++b) {
          const int64_t t0 = std::max<int64_t>(first - b * block_size, 0);
          const int64_t t1 = std::min<int64_t>(block_size, len - b * block_size);
          const T* tiles = cache + table[b] * block;
          const bool more = (b + 1) * block_size < len;
          const char* next = more ? reinterpret_cast<const char*>(cache + table[b + 1] * block + span_start) : nullptr;
          const char* far = (b + kFarBlocks) * block_size < len
                                ? reinterpret_cast<const char*>(cache + table[b + kFarBlocks] * block + span_start)
                                : nullptr;
          for (int64_t h = h0; h < h1; ++h) {
            // a share of the next block's lines per head, so that the prefetches interleave with
            // the arithmetic instead of queueing up behind a full miss buffer
            const int64_t l0 = (h - h0) * lines_per_head, l1 = std::min(span_lines, (h - h0 + 1) * lines_per_head);
            if (next != nullptr)
              for (int64_t line = l0; line < l1; ++line) __builtin_prefetch(next + line * 64);
            if (far != nullptr)
              for (int64_t line = l0; line < l1; ++line) __builtin_prefetch(far + line * 64, 0, 2);
            body(h, tiles + (h / group) * tile, b * block_size - first, t0, t1);
          }
        }
      };
      // pass 1: every visible key's score, one block of K at a time
      for_each_tile(k_cache, [&](int64_t h, const T* k, int64_t offset, int64_t t0, int64_t t1) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (bf16_tiles) {
            scores_of_tile16_bf16(qs + h * D, k, probs.data() + h * n + offset, t0, t1, D, scale);
            return;
          }
        }
#endif
        scores_of_tile(qf.data() + h * D, k, probs.data() + h * n + offset, t0, t1, D);
      });
      // the V pass's first block arrives while the softmax is computed
      prefetch_bytes(v_cache + table[first / block_size] * block + span_start, span);
      // pass 2: softmax of each query head's row, in place (the bfloat16 tile path rounds the
      // probabilities to bfloat16, as transformers' eager attention does, and sums the rounded ones)
      for (int64_t h = h0; h < h1; ++h) {
        float* row = probs.data() + h * n;
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) row_max = std::max(row_max, row[i]);
        float sum = 0.f;
        if (bf16_tiles) {
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < n; ++i) {
            row[i] = kiln_native::round_bf16(kiln_native::fast_exp(row[i] - row_max));
            sum += row[i];
          }
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < n; ++i) {
            row[i] = kiln_native::fast_exp(row[i] - row_max);
            sum += row[i];
          }
        }
        sums[h] = sum;
      }
      // pass 3: probabilities times V, one block at a time; meanwhile the next sequence's first K block
      if (parts == 1 && s + 1 < end) {
        const int64_t next_len = seq_lens[s + 1];
        const int64_t next_first = window > 0 ? std::max<int64_t>(0, next_len - window) : 0;
        prefetch_bytes(k_cache + block_tables[(s + 1) * max_blocks + next_first / block_size] * block, block);
      }
      std::fill(acc.begin() + h0 * D, acc.begin() + h1 * D, 0.f);
      for_each_tile(v_cache, [&](int64_t h, const T* v, int64_t offset, int64_t t0, int64_t t1) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (bf16_tiles) {
            accumulate_tile16_bf16(probs.data() + h * n + offset, v, acc.data() + h * D, t0, t1, D);
            return;
          }
        }
#endif
        accumulate_tile(probs.data() + h * n + offset, v, acc.data() + h * D, t0, t1, D);
      });
      T* os = out + s * num_heads * D;
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const float value = acc[h * D + (bf16_tiles ? kiln_native::pair_interleaved_pos(d) : d)];
          os[h * D + d] = static_cast<T>(value / sums[h]);
        }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = at::empty_like(qc);
  const int64_t num_seqs = qc.size(0), num_heads = qc.size(1), head_dim = qc.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(tables.size(0) == num_seqs && lens.size(0) == num_seqs, "one block table and length per sequence");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                               tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                               num_seqs, num_heads, num_kv_heads, head_dim, block_size, tables.size(1),
                               static_cast<float>(scale), sliding_window);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kiln_native, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int sliding_window) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
