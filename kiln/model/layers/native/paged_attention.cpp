// Decode attention straight from the paged KV cache (CPU).
//
// The torch path gathers every sequence's K/V tiles into a contiguous copy and then runs two
// batched matmuls: three passes over the cache. This kernel reads each (block, kv head) tile once,
// in place (scores, then a float32 softmax per query head, then the weighted sum of V), so decode
// attention runs at about the speed of reading the cache. One task per sequence: a block's tiles of
// all kv heads are one contiguous read, and a GQA group of query heads shares every tile.
//
// Two tile layouts (see kv_layout.py):
// - rows, any dtype and block size: a tile is [block_size][D]; float32 arithmetic on widened values
//   (on AVX2, bfloat16 and fp8 rows widen 16 dims at a time, even and odd dims apart: see Chunk16).
//   fp8 caches (e4m3fn, e5m2) hold K/V for queries of any float dtype; their values widen exactly
//   (e4m3fn's to 1/256 of themselves, the factor put back on the query and the output).
// - pairs, bfloat16 16-key blocks with D a multiple of 32 (AVX512-BF16): a K tile is [D/2][16][2],
//   so the 16 scores of a tile accumulate in the lanes of D/2 vdpbf16ps with no horizontal sums,
//   and a V tile is [8][D][2], two keys per vdpbf16ps weighted by one pair of probabilities. Up to
//   four query heads of a GQA group share each load. Probabilities are rounded to bfloat16 (as
//   transformers' eager attention rounds them). A tile's 16 keys are all computed and those outside
//   the visible range dropped, so caches must hold finite values (zero-filled; reused blocks hold
//   old keys).
//
// Shapes: q [S, H, D]; caches [num_blocks, KH, block_size, D]; block_tables [S, max_blocks] int32;
// seq_lens [S] int32 (keys visible to the sequence's query, its own included); out [S, H, D].
// sliding_window <= 0 means none; otherwise only the last `sliding_window` keys are visible.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd_math.h"

namespace {

using kiln_native::kIsFp8;

#if defined(__AVX512F__)
// 16 cache values widened to float32 lanes, straight from the cache (no staging copy).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) { return kiln_native::load_bf16x16(reinterpret_cast<const uint16_t*>(p)); }
template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline __m512 load16(const T* p) { return kiln_native::load_fp8x16(p); }
template <typename T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || kIsFp8<T>;
#elif defined(KILN_FP8_SIMD)
template <typename T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || kIsFp8<T>;

// 16 cache values as two vectors of float32 lanes, in chunk order (simd_math.h's load_chunk). The
// query and the V sums live in the same order (`chunk_position`).
using kiln_native::Chunk16;
using kiln_native::load_chunk;

// Where dim d of a head's row sits in chunk order (fp8 chunks keep bfloat16's order).
template <typename T>
inline int64_t chunk_position(int64_t d) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || kIsFp8<T>) return kiln_native::bf16_chunk_position(d);
  return d;
}

inline float sum8(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// The lane sums of four vectors as one: 11 single-operation shuffles and adds for four scores,
// where four sum8 take 24.
inline __m128 sum8_of_four(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3 | ...
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                                    _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#else
template <typename T>
constexpr bool kVectorized = false;
#endif

// The rows path's prefetch of the tile it will read kAheadBlocks blocks on (into L2), a few lines
// per unit of work on the current tile, so that the requests interleave with the arithmetic.
// A block's tiles sit at an address unrelated to the previous block's, out of the hardware
// prefetcher's reach. Before, the rows path asked for the whole next block (into L1) in slices,
// one per kv head, and for the one 4 on (into L2); 30 layers of decode attention on the AVX2 host,
// scattered blocks, one process interleaved: 64 seqs x 320 keys 77.6 -> 52.5 ms, 16 x 320 20.8 ->
// 14.1, 1 x 1200 8.8 -> 4.8 (1, 2 and 4 blocks ahead measured alike).
struct TilePrefetch {
  const char* next = nullptr;
  const char* end = nullptr;

  TilePrefetch() = default;
  template <typename T>
  TilePrefetch(const T* tile, int64_t elements)
      : next(reinterpret_cast<const char*>(tile)),
        end(tile == nullptr ? nullptr : next + elements * static_cast<int64_t>(sizeof(T))) {}

  void lines(int64_t count) {
    for (; count > 0 && next < end; --count, next += 64) __builtin_prefetch(next, 0, 2);
  }
  void rest() { lines(std::numeric_limits<int64_t>::max()); }
};

// scores[t] = q . k[t] for the rows t0..t1 of a rows-layout tile ([t][D]).
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
    for (int64_t d = 0; d < D; ++d) dot += q[d] * kiln_native::raw_value(k[t * D + d]);
    scores[t] = dot;
  }
}

// acc += sum_t p[t] * v[t] over the rows t0..t1 of a rows-layout tile, acc 16 lanes at a time.
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
    for (int64_t d = 0; d < D; ++d) acc[d] += p[t] * kiln_native::raw_value(v[t * D + d]);
}

// f(NH as a compile-time constant) for 1 <= nh <= 4 heads handled at once
template <typename F>
inline void with_heads_up_to_four(int64_t nh, F&& f) {
  switch (nh) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

#if defined(KILN_FP8_SIMD) && !defined(__AVX512F__)
#define KILN_SHARED_TILE_LOADS 1

// f(heads at once as a constant, first head) over `nh` heads in chunks of up to four
template <typename F>
inline void for_head_chunks(int64_t nh, F&& f) {
  for (int64_t h = 0; h < nh; h += 4)
    with_heads_up_to_four(std::min<int64_t>(4, nh - h), [&](auto heads) { f(heads, h); });
}

// Scores of keys t..t+KEYS for NH query heads (q in chunk order): NH * KEYS accumulators, each
// key's chunks loaded once for all heads.
template <int NH, int KEYS, typename T>
inline void scores_of_keys(const float* q, const T* k, float* scores, int64_t n, int64_t t, int64_t D) {
  __m256 a[NH][KEYS];
  for (int i = 0; i < NH; ++i)
    for (int j = 0; j < KEYS; ++j) a[i][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    for (int j = 0; j < KEYS; ++j) {
      const Chunk16 c = load_chunk(k + (t + j) * D + d);
      for (int i = 0; i < NH; ++i) {
        a[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * D + d), c.a, a[i][j]);
        a[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * D + d + 8), c.b, a[i][j]);
      }
    }
  }
  for (int i = 0; i < NH; ++i) {
    if constexpr (KEYS == 4) {
      _mm_storeu_ps(scores + i * n + t, sum8_of_four(a[i][0], a[i][1], a[i][2], a[i][3]));
    } else {
      for (int j = 0; j < KEYS; ++j) scores[i * n + t + j] = sum8(a[i][j]);
    }
  }
}

// Rows t0..t1 of a tile for NH heads: four keys at a time (12 or fewer accumulators), then one.
template <int NH, typename T>
inline void shared_scores_of_tile(const float* q, const T* k, float* scores, int64_t n, int64_t t0, int64_t t1,
                                  int64_t D, TilePrefetch& ahead) {
  constexpr int kKeys = NH <= 3 ? 4 : 2;
  const int64_t lines = kKeys * D * static_cast<int64_t>(sizeof(T)) / 64;  // what the keys read
  int64_t t = t0;
  for (; t + kKeys <= t1; t += kKeys) {
    ahead.lines(lines);
    scores_of_keys<NH, kKeys>(q, k, scores, n, t, D);
  }
  for (; t < t1; ++t) scores_of_keys<NH, 1>(q, k, scores, n, t, D);
  ahead.rest();
}

// acc (NH rows of D, chunk order) += p[t] * v[t] over rows t0..t1, 16 dims of all heads at a time.
template <int NH, typename T>
inline void shared_accumulate_tile(const float* p, int64_t n, const T* v, float* acc, int64_t t0, int64_t t1,
                                   int64_t D, int64_t block_size, TilePrefetch& ahead) {
  const int64_t lines = block_size * 16 * static_cast<int64_t>(sizeof(T)) / 64;  // a tile's per 16 dims
  for (int64_t d = 0; d < D; d += 16) {
    ahead.lines(lines);
    __m256 a[NH][2];
    for (int i = 0; i < NH; ++i) {
      a[i][0] = _mm256_loadu_ps(acc + i * D + d);
      a[i][1] = _mm256_loadu_ps(acc + i * D + d + 8);
    }
    for (int64_t t = t0; t < t1; ++t) {
      const Chunk16 c = load_chunk(v + t * D + d);
      for (int i = 0; i < NH; ++i) {
        const __m256 pt = _mm256_broadcast_ss(p + i * n + t);
        a[i][0] = _mm256_fmadd_ps(pt, c.a, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(pt, c.b, a[i][1]);
      }
    }
    for (int i = 0; i < NH; ++i) {
      _mm256_storeu_ps(acc + i * D + d, a[i][0]);
      _mm256_storeu_ps(acc + i * D + d + 8, a[i][1]);
    }
  }
}
#endif

// Where dim d of a query row or a V sum sits in the rows path's buffers: chunk order where the
// shared AVX2 tiles run, else d.
template <typename T>
inline int64_t rows_position(int64_t d, int64_t D) {
#if defined(KILN_SHARED_TILE_LOADS)
  if constexpr (kVectorized<T>) {
    if (D % 16 == 0) return chunk_position<T>(d);
  }
#endif
  return d;
}

// The rows path per kv head: its `nh` query heads (q: nh rows of D floats; scores, p: nh rows of
// `n`; acc: nh rows of D) against one tile, and the prefetch of the same kv head's tile
// kAheadBlocks blocks on. On AVX2 all heads share each key's loads (the tile is read and widened
// once, not once per head); elsewhere one head at a time.
template <typename T>
inline void group_scores_of_tile(const float* q, const T* k, float* scores, int64_t n, int64_t nh, int64_t t0,
                                 int64_t t1, int64_t D, TilePrefetch ahead) {
#if defined(KILN_SHARED_TILE_LOADS)
  if constexpr (kVectorized<T>) {
    if (D % 16 == 0) {
      for_head_chunks(nh, [&](auto heads, int64_t h) {
        shared_scores_of_tile<decltype(heads)::value>(q + h * D, k, scores + h * n, n, t0, t1, D, ahead);
      });
      return;
    }
  }
#endif
  ahead.rest();
  for (int64_t h = 0; h < nh; ++h) scores_of_tile(q + h * D, k, scores + h * n, t0, t1, D);
}

template <typename T>
inline void group_accumulate_tile(const float* p, int64_t n, const T* v, float* acc, int64_t nh, int64_t t0,
                                  int64_t t1, int64_t D, int64_t block_size, TilePrefetch ahead) {
#if defined(KILN_SHARED_TILE_LOADS)
  if constexpr (kVectorized<T>) {
    if (D % 16 == 0) {
      for_head_chunks(nh, [&](auto heads, int64_t h) {
        shared_accumulate_tile<decltype(heads)::value>(p + h * n, n, v, acc + h * D, t0, t1, D, block_size, ahead);
      });
      return;
    }
  }
#endif
  ahead.rest();
  for (int64_t h = 0; h < nh; ++h) accumulate_tile(p + h * n, v, acc + h * D, t0, t1, D);
}

constexpr int64_t kPairBlock = 16;  // keys per block in the pairs layout
constexpr int64_t kMaxHeadsAtOnce = 4;  // query heads sharing each tile load (8 score chains, 8 V accumulators)
constexpr int64_t kAheadBlocks = 2;  // how far on the tile loops prefetch: see prefetch_two_lines, TilePrefetch

#if defined(__AVX512BF16__)

// Both tile loops below take `ahead`, the same tile kAheadBlocks blocks on (or null), and ask
// for two of its lines (into L2) per iteration: the tile has D/2 lines and each loop D/4
// iterations. Issued in bursts between tiles, as the rows path once did, the prefetches found the miss
// buffers full and came to nothing (30 layers of 64 x 320 keys, scattered blocks: 41 ms with them,
// 40 without, 26 interleaved 4 blocks ahead, 21 two ahead; the rows kernel took 30-33 alongside).
inline void prefetch_two_lines(const char* ahead, int64_t iteration) {
  if (ahead != nullptr) {
    __builtin_prefetch(ahead + iteration * 128, 0, 2);
    __builtin_prefetch(ahead + iteration * 128 + 64, 0, 2);
  }
}

// Lanes t0..t1 (a block's visible keys) of a 16-lane mask.
inline __mmask16 block_keys(int64_t t0, int64_t t1) {
  return static_cast<__mmask16>(((1u << t1) - 1) & ~((1u << t0) - 1));
}

// Raw scores of a pairs-layout K tile ([D/2][16] uint32) for NH query heads (q: each head's D/2
// bfloat16 pairs): lane t of out[i] = q_i . k[t]. Two chains per head hide vdpbf16ps's latency.
template <int NH>
inline void pair_tile_scores(const uint32_t* const* q, const uint32_t* kt, int64_t pairs, __m512* out,
                             const char* ahead) {
  __m512 even[NH], odd[NH];
  for (int i = 0; i < NH; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p += 2) {
    prefetch_two_lines(ahead, p / 2);
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * kPairBlock);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + (p + 1) * kPairBlock);
    for (int i = 0; i < NH; ++i) {
      even[i] = _mm512_dpbf16_ps(even[i], k0, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(q[i][p])));
      odd[i] = _mm512_dpbf16_ps(odd[i], k1, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(q[i][p + 1])));
    }
  }
  for (int i = 0; i < NH; ++i) out[i] = _mm512_add_ps(even[i], odd[i]);
}

// Dimensions [d0, d0 + 16 C) of pair_tile_accumulate: NH x C accumulators, each V load and each
// probability broadcast shared by C or NH products.
template <int NH, int C>
inline void pair_tile_accumulate_dims(const uint32_t (*w)[kPairBlock / 2], const uint32_t* vt, float* acc,
                                      int64_t D, int64_t d0, const char* ahead) {
  __m512 sums[NH][C];
  for (int i = 0; i < NH; ++i)
    for (int c = 0; c < C; ++c) sums[i][c] = _mm512_loadu_ps(acc + i * D + d0 + 16 * c);
  for (int64_t j = 0; j < kPairBlock / 2; ++j) {
    prefetch_two_lines(ahead, d0 / 4 + j);
    if (C == 4) prefetch_two_lines(ahead, d0 / 4 + 8 + j);
    __m512bh v[C];
    for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vt + j * D + d0 + 16 * c);
    for (int i = 0; i < NH; ++i) {
      const __m512bh weight = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w[i][j]));
      for (int c = 0; c < C; ++c) sums[i][c] = _mm512_dpbf16_ps(sums[i][c], v[c], weight);
    }
  }
  for (int i = 0; i < NH; ++i)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + i * D + d0 + 16 * c, sums[i][c]);
}

// acc_i += sum_t p_i[t] * v[t] over a pairs-layout V tile ([8][D] uint32) for NH query heads
// (w[i]: head i's 16 probabilities as 8 bfloat16 pairs; acc: NH rows of D floats, natural order).
// 64 dimensions at a time: 4 V loads and NH broadcasts per 4 NH products (32 dimensions at a time
// took 2 + NH per 2 NH, and the loads, not the products, set the pace).
template <int NH>
inline void pair_tile_accumulate(const uint32_t (*w)[kPairBlock / 2], const uint32_t* vt, float* acc, int64_t D,
                                 const char* ahead) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pair_tile_accumulate_dims<NH, 4>(w, vt, acc, D, d0, ahead);
  if (d0 < D) pair_tile_accumulate_dims<NH, 2>(w, vt, acc, D, d0, ahead);  // D is a multiple of 32
}

#endif

// One task's share of the work: a sequence, or (with fewer sequences than threads) a range of its
// kv heads with their query heads.
template <typename T>
struct Pass {  // one pass over a sequence's visible blocks [first_block, end_block) of one cache
  const T* cache = nullptr;
  const int32_t* table = nullptr;
  int64_t first_block = 0, end_block = 0;
};

struct Task {
  int64_t seq, kv0, kv1, first, len;
  int64_t visible() const { return len - first; }

  template <typename T>
  Pass<T> pass(const T* cache, const int32_t* table, int64_t block_size) const {
    return {cache, table, first / block_size, (len + block_size - 1) / block_size};
  }

  // body(block index, its tiles, first and end row inside the block, the tiles `ahead` blocks on
  // (past the end, those of the pass `then` that follows, or null)) per visible block
  template <typename T, typename Body>
  void for_each_block(const T* cache, const int32_t* table, int64_t block_size, int64_t block, int64_t ahead,
                      Body&& body, const Pass<T>& then = {}) const {
    const Pass<T> now = pass(cache, table, block_size);
    auto tiles_ahead = [&](int64_t b) -> const T* {
      const int64_t a = b + ahead;
      if (a < now.end_block) return cache + table[a] * block;
      const int64_t c = then.first_block + (a - now.end_block);
      return then.cache != nullptr && c < then.end_block ? then.cache + then.table[c] * block : nullptr;
    };
    for (int64_t b = first / block_size; b * block_size < len; ++b) {
      const int64_t t0 = std::max<int64_t>(first - b * block_size, 0);
      const int64_t t1 = std::min<int64_t>(block_size, len - b * block_size);
      body(b, cache + table[b] * block, t0, t1, tiles_ahead(b));
    }
  }
};

// Softmax of each query head's row of scores in place (rounded to bfloat16 when `round`, the sum
// taken over the rounded values); sums[h] gets the row's sum, left for the final division.
inline void softmax_rows(float* probs, int64_t n, int64_t h0, int64_t h1, float* sums, bool round) {
  for (int64_t h = h0; h < h1; ++h) {
    float* row = probs + h * n;
    float row_max = -std::numeric_limits<float>::infinity();
    // (a max reduction, which std::max's NaN order would keep scalar: 64 % of the softmax's time)
#pragma omp simd reduction(max : row_max)
    for (int64_t i = 0; i < n; ++i) row_max = row_max > row[i] ? row_max : row[i];
    float sum = 0.f;
    if (round) {
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
}

template <typename T, typename C>
void decode_attention(const T* q, const C* k_cache, const C* v_cache, const int32_t* block_tables,
                      const int32_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale, int64_t window,
                      bool pairs_layout) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim;
  const int64_t tile = block_size * D, block = num_kv_heads * tile;
  // the caches are read as raw values (simd_math.h): their factor goes on the query and the output
  const float k_scale = scale * kiln_native::kRawScale<C>, v_scale = kiln_native::kRawScale<C>;
  // With fewer sequences than threads, one task per (sequence, kv head) keeps every thread busy.
  const int64_t parts = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
  const int64_t kv_per_task = num_kv_heads / parts;
  at::parallel_for(0, num_seqs * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * D), acc(num_heads * D), probs, sums(num_heads);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t s = index / parts, kv0 = (index % parts) * kv_per_task;
      const int64_t len = seq_lens[s];
      const Task task{s, kv0, kv0 + kv_per_task, window > 0 ? std::max<int64_t>(0, len - window) : 0, len};
      const int64_t h0 = task.kv0 * group, h1 = task.kv1 * group, n = task.visible();
      const int32_t* table = block_tables + s * max_blocks;
      const T* qs = q + s * num_heads * D;
      probs.resize(num_heads * n);
      std::fill(acc.begin() + h0 * D, acc.begin() + h1 * D, 0.f);
      // the K pass of the sequence this thread takes next, when it is a whole sequence
      Pass<C> next_k_pass;
      if (parts == 1 && index + 1 < end) {
        const int64_t next_len = seq_lens[s + 1];
        const int64_t next_first = window > 0 ? std::max<int64_t>(0, next_len - window) : 0;
        next_k_pass = {k_cache, block_tables + (s + 1) * max_blocks, next_first / block_size,
                       (next_len + block_size - 1) / block_size};
      }
      if (pairs_layout) {
#if defined(__AVX512BF16__)
        const int64_t pairs = D / 2;
        const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qs);
        // body(the kv head's tile as bfloat16 pairs, first query head, heads at once, the same tile
        // kAheadBlocks on to prefetch or null) per chunk of up to four heads of each kv head's
        // group; only a tile's first chunk prefetches
        auto for_each_head_chunk = [&](const C* tiles, const C* ahead, auto&& body) {
          for (int64_t kh = task.kv0; kh < task.kv1; ++kh)
            for (int64_t g0 = 0; g0 < group; g0 += kMaxHeadsAtOnce) {
              const char* tile_ahead = g0 == 0 && ahead != nullptr ? reinterpret_cast<const char*>(ahead + kh * tile)
                                                                  : nullptr;
              body(reinterpret_cast<const uint32_t*>(tiles + kh * tile), kh * group + g0,
                   std::min<int64_t>(kMaxHeadsAtOnce, group - g0), tile_ahead);
            }
        };
        // pass 1: every visible key's score, each K tile loaded once per (up to) four query heads
        task.for_each_block(k_cache, table, block_size, block, kAheadBlocks, [&](int64_t b, const C* tiles,
                                                                                      int64_t t0, int64_t t1,
                                                                                      const C* ahead) {
          for_each_head_chunk(tiles, ahead, [&](const uint32_t* kt, int64_t h, int64_t nh, const char* tile_ahead) {
            const uint32_t* heads[kMaxHeadsAtOnce];
            for (int64_t i = 0; i < nh; ++i) heads[i] = q32 + (h + i) * pairs;
            __m512 scores[kMaxHeadsAtOnce];
            with_heads_up_to_four(nh, [&](auto nh_const) {
              pair_tile_scores<decltype(nh_const)::value>(heads, kt, pairs, scores, tile_ahead);
            });
            // keys t0..t1 of the block, stored at their places in each head's row (the lanes
            // outside the mask are neither written nor read: the base may lie before the row)
            const __mmask16 keys = block_keys(t0, t1);
            for (int64_t i = 0; i < nh; ++i)
              _mm512_mask_storeu_ps(probs.data() + (h + i) * n + b * kPairBlock - task.first, keys,
                                    _mm512_mul_ps(scores[i], _mm512_set1_ps(scale)));
          });
        }, task.pass(v_cache, table, block_size));  // the V pass's first tiles arrive during the last K ones
        softmax_rows(probs.data(), n, h0, h1, sums.data(), true);
        // pass 3: probabilities times V, each V tile loaded once per (up to) four query heads
        task.for_each_block(v_cache, table, block_size, block, kAheadBlocks, [&](int64_t b, const C* tiles,
                                                                                      int64_t t0, int64_t t1,
                                                                                      const C* ahead) {
          for_each_head_chunk(tiles, ahead, [&](const uint32_t* vt, int64_t h, int64_t nh, const char* tile_ahead) {
            alignas(32) uint32_t weights[kMaxHeadsAtOnce][kPairBlock / 2];
            const __mmask16 keys = block_keys(t0, t1);  // keys outside t0..t1 weigh 0
            for (int64_t i = 0; i < nh; ++i) {
              const __m512 p = _mm512_maskz_loadu_ps(keys, probs.data() + (h + i) * n + b * kPairBlock - task.first);
              _mm256_store_si256(reinterpret_cast<__m256i*>(weights[i]), (__m256i)_mm512_cvtneps_pbh(p));
            }
            with_heads_up_to_four(nh, [&](auto nh_const) {
              pair_tile_accumulate<decltype(nh_const)::value>(weights, vt, acc.data() + h * D, D, tile_ahead);
            });
          });
        }, next_k_pass);
#endif
      } else {
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t d = 0; d < D; ++d) qf[h * D + rows_position<C>(d, D)] = static_cast<float>(qs[h * D + d]) * k_scale;
        const auto kv_tile = [&](const C* tiles, int64_t kh) { return tiles == nullptr ? nullptr : tiles + kh * tile; };
        task.for_each_block(k_cache, table, block_size, block, kAheadBlocks, [&](int64_t b, const C* tiles,
                                                                                     int64_t t0, int64_t t1,
                                                                                     const C* ahead) {
          for (int64_t kh = task.kv0; kh < task.kv1; ++kh)
            group_scores_of_tile(qf.data() + kh * group * D, tiles + kh * tile,
                                 probs.data() + kh * group * n + b * block_size - task.first, n, group, t0, t1, D,
                                 TilePrefetch(kv_tile(ahead, kh), tile));
        }, task.pass(v_cache, table, block_size));  // the V pass's first tiles arrive during the last K ones
        softmax_rows(probs.data(), n, h0, h1, sums.data(), false);
        task.for_each_block(v_cache, table, block_size, block, kAheadBlocks, [&](int64_t b, const C* tiles,
                                                                                     int64_t t0, int64_t t1,
                                                                                     const C* ahead) {
          for (int64_t kh = task.kv0; kh < task.kv1; ++kh)
            group_accumulate_tile(probs.data() + kh * group * n + b * block_size - task.first, n, tiles + kh * tile,
                                  acc.data() + kh * group * D, group, t0, t1, D, block_size,
                                  TilePrefetch(kv_tile(ahead, kh), tile));
        }, next_k_pass);
      }
      T* os = out + s * num_heads * D;
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t d = 0; d < D; ++d)
          os[h * D + d] = static_cast<T>(acc[h * D + (pairs_layout ? d : rows_position<C>(d, D))] * v_scale / sums[h]);
    }
  });
}

bool pairs_layout_available() { return kiln_native::avx512_bf16_available(); }

}  // namespace

namespace kiln_native {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, bool pairs_layout) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const bool fp8 = kiln_native::is_fp8(k_cache.scalar_type());
  TORCH_CHECK((q.scalar_type() == k_cache.scalar_type() || fp8) && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype (or the caches hold fp8)");
  TORCH_CHECK(!(fp8 && pairs_layout), "fp8 caches keep the rows layout");
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
  TORCH_CHECK(!pairs_layout || (pairs_layout_available() && qc.scalar_type() == at::kBFloat16 && block_size == 16 &&
                                head_dim % 32 == 0),
              "the pairs layout needs AVX512-BF16, bfloat16, 16-key blocks and head_dim a multiple of 32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    kiln_native::with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto cache_type) {
      using C = decltype(cache_type);
      decode_attention<scalar_t, C>(qc.data_ptr<scalar_t>(), reinterpret_cast<const C*>(k_cache.data_ptr()),
                                    reinterpret_cast<const C*>(v_cache.data_ptr()), tables.data_ptr<int32_t>(),
                                    lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), num_seqs, num_heads,
                                    num_kv_heads, head_dim, block_size, tables.size(1), static_cast<float>(scale),
                                    sliding_window, pairs_layout);
    });
  });
  return out;
}

}  // namespace kiln_native

TORCH_LIBRARY(kiln_native, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int sliding_window, bool pairs_layout) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &kiln_native::paged_decode_attention);
}
