// Decode attention straight from the paged KV cache (CPU).
//
// The torch path gathers every sequence's K/V tiles into a contiguous copy and then runs two
// batched matmuls: three passes over the cache. This kernel reads each (block, kv head) tile once,
// in place (scores, then a float32 softmax per query head, then the weighted sum of V), so decode
// attention runs at about the speed of reading the cache. One task per (sequence, kv head); the
// task's GQA group of query heads shares every tile it loads.
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
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
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

// Tiles sit at unrelated addresses, out of reach of the hardware prefetcher: ask for the next one
// while this one is computed on.
template <typename T>
inline void prefetch_tile(const T* tile, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(tile);
  for (int64_t i = 0; i < elements * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(bytes + i);
}

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                      const int32_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), probs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, kh = task % num_kv_heads;
      const int64_t len = seq_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;  // visible keys
      const int32_t* table = block_tables + s * max_blocks;
      probs.resize(group * n);
      load_floats(q + (s * num_heads + kh * group) * D, qf.data(), group * D);
      for (int64_t i = 0; i < group * D; ++i) qf[i] *= scale;
      // Visits the sequence's tiles of `cache` for this kv head: body(tile, offset of the tile's first
      // key among the visible ones, first and end row inside the tile).
      auto for_each_tile = [&](const T* cache, auto&& body) {
        for (int64_t b = first / block_size; b * block_size < len; ++b) {
          const int64_t t0 = std::max<int64_t>(first - b * block_size, 0);
          const int64_t t1 = std::min<int64_t>(block_size, len - b * block_size);
          if ((b + 1) * block_size < len)
            prefetch_tile(cache + (table[b + 1] * num_kv_heads + kh) * block_size * D, block_size * D);
          body(cache + (table[b] * num_kv_heads + kh) * block_size * D, b * block_size - first, t0, t1);
        }
      };
      // pass 1: every visible key's score, one tile of K at a time
      for_each_tile(k_cache, [&](const T* tile, int64_t offset, int64_t t0, int64_t t1) {
        for (int64_t g = 0; g < group; ++g)
          scores_of_tile(qf.data() + g * D, tile, probs.data() + g * n + offset, t0, t1, D);
      });
      // pass 2: softmax of each query head's row, in place
      std::vector<float> sums(group);
      for (int64_t g = 0; g < group; ++g) {
        float* row = probs.data() + g * n;
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) row_max = std::max(row_max, row[i]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          row[i] = kiln_native::fast_exp(row[i] - row_max);
          sum += row[i];
        }
        sums[g] = sum;
      }
      // pass 3: probabilities times V, one tile at a time
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_tile(v_cache, [&](const T* tile, int64_t offset, int64_t t0, int64_t t1) {
        for (int64_t g = 0; g < group; ++g)
          accumulate_tile(probs.data() + g * n + offset, tile, acc.data() + g * D, t0, t1, D);
      });
      T* os = out + (s * num_heads + kh * group) * D;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d) os[g * D + d] = static_cast<T>(acc[g * D + d] / sums[g]);
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
