// The sampler's per-row kernels on CPU (sampling/sampler.py keeps the torch paths, which are also
// the tests' reference): the greedy argmax over bfloat16 logits, the top-k / top-p filter, and the
// draw from the softmax by the inverse CDF. Each row is one task.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"
#include "simd_math.h"

namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// The largest of x[begin..end), -inf if empty or all NaN (NaN never wins), as a reduction the
// compiler vectorizes.
float max_of(const float* x, int64_t begin, int64_t end) {
  float max = kMinusInf;
#pragma omp simd reduction(max : max)
  for (int64_t i = begin; i < end; ++i) max = x[i] > max ? x[i] : max;
  return max;
}

// The k-th largest of row[0..V), duplicates counted (0 < k < V), without NaN.
// The k-th largest of the spans' maxima bounds it from below (those k maxima are k values of the
// row), so only the values at or above that bound, in the few spans whose maximum reaches it, are
// candidates; the k-th largest of the candidates is the row's. Where k is large against the
// number of spans, a min-heap of the k largest seen, each span first compared with the heap's
// minimum as a whole (values above it soon become rare).
float kth_largest(const float* row, int64_t V, int64_t k, std::vector<float>& scratch, std::vector<float>& maxima) {
  constexpr int64_t kSpan = 64;
  const int64_t num_spans = (V + kSpan - 1) / kSpan;
  if (4 * k <= num_spans) {
    maxima.resize(num_spans);
    for (int64_t s = 0; s < num_spans; ++s) maxima[s] = max_of(row, s * kSpan, std::min((s + 1) * kSpan, V));
    scratch.assign(maxima.begin(), maxima.end());
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    const float bound = scratch[k - 1];
    scratch.clear();
    for (int64_t s = 0; s < num_spans; ++s) {
      if (maxima[s] < bound) continue;
      for (int64_t i = s * kSpan; i < std::min((s + 1) * kSpan, V); ++i) {
        if (row[i] >= bound) scratch.push_back(row[i]);
      }
    }
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    return scratch[k - 1];
  }
  std::vector<float>& heap = scratch;
  heap.assign(row, row + k);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t start = k; start < V; start += kSpan) {
    const int64_t end = std::min(start + kSpan, V);
    const float floor = heap.front();
    int above = 0;
#pragma omp simd reduction(| : above)
    for (int64_t i = start; i < end; ++i) above |= row[i] > floor;
    if (!above) continue;
    for (int64_t i = start; i < end; ++i) {
      if (row[i] > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = row[i];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    }
  }
  return heap.front();
}

// Sets row[i] = -inf where keep_from(i) is false, then appends the indices i with keep_from(i) and
// in_list(i) to `out`. Spans of 64 are tested as a whole first (a vector loop), so rows where few
// values qualify cost about one pass of compares.
template <typename Keep, typename List>
void mask_and_list(float* row, int64_t V, Keep keep_from, List in_list, std::vector<int64_t>& out) {
  constexpr int64_t kSpan = 64;
  for (int64_t start = 0; start < V; start += kSpan) {
    const int64_t end = std::min(start + kSpan, V);
    int listed = 0;
#pragma omp simd reduction(| : listed)
    for (int64_t i = start; i < end; ++i) {
      const bool keep = keep_from(i);
      listed |= keep && in_list(i);
      row[i] = keep ? row[i] : kMinusInf;
    }
    if (listed) {
      for (int64_t i = start; i < end; ++i) {
        if (row[i] != kMinusInf && in_list(i)) out.push_back(i);
      }
    }
  }
}

// Sorts `order` (indices of row) most probable first, equal logits by lower index, then walks it
// with each token's probability `prob(i)`, starting from the mass `above` of the tokens before
// them: keeps a token while the mass of the more probable ones is under `target`, and sets the
// rest to -inf.
template <typename Prob>
void cut_in_order(float* row, std::vector<int64_t>& order, double above, double target, Prob prob) {
  std::sort(order.begin(), order.end(), [row](int64_t a, int64_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
  for (const int64_t i : order) {
    if (above < target) above += prob(i);
    else row[i] = kMinusInf;
  }
}

// p[i] = exp(x[i] - max), 0 at -inf and NaN; returns their sum. In explicit vectors: GCC leaves
// fast_exp's loop scalar (top-p on 64 x 49k rows: 20 ms of the AVX2 host's time in it).
double exps_shifted(const float* x, int64_t V, float max, float* p) {
  double total = 0.0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vmax = _mm512_set1_ps(max), minus_inf = _mm512_set1_ps(kMinusInf);
  for (; i + 64 <= V; i += 64) {  // float32 lanes per 64 values, then one float64 add
    __m512 lanes = _mm512_setzero_ps();
    for (int64_t j = i; j < i + 64; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, minus_inf, _CMP_GT_OQ),
                                           kiln_native::exp16(_mm512_sub_ps(v, vmax)));
      _mm512_storeu_ps(p + j, e);
      lanes = _mm512_add_ps(lanes, e);
    }
    total += _mm512_reduce_add_ps(lanes);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vmax = _mm256_set1_ps(max), minus_inf = _mm256_set1_ps(kMinusInf);
  for (; i + 64 <= V; i += 64) {
    __m256 lanes = _mm256_setzero_ps();
    for (int64_t j = i; j < i + 64; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      const __m256 e = _mm256_and_ps(_mm256_cmp_ps(v, minus_inf, _CMP_GT_OQ), kiln_native::exp8(_mm256_sub_ps(v, vmax)));
      _mm256_storeu_ps(p + j, e);
      lanes = _mm256_add_ps(lanes, e);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, lanes);
    for (const float sum : sums) total += sum;
  }
#endif
  for (; i < V; ++i) {
    p[i] = x[i] > kMinusInf ? kiln_native::fast_exp(x[i] - max) : 0.f;
    total += p[i];
  }
  return total;
}

// Top-p over the softmax of the whole row (tokens at -inf have probability 0): keeps each token
// whose more probable tokens hold less than top_p of the mass, as the torch path's ascending
// cumsum test (cum <= 1 - top_p is cut) does, without sorting the row:
// - Tokens below (1 - top_p) x total / V are cut outright: all of them together hold less than
//   1 - top_p of the mass, so each has at least top_p of it above. For a language model's logits
//   that leaves a few hundred candidates at most, which are sorted and walked.
// - Past kMaxSorted candidates (a nearly flat row), a radix select over the candidates'
//   probabilities as float32 bit patterns (non-negative floats order as integers), 8 bits at a
//   time with float64 mass per digit, finds the probability at which the mass from the top crosses
//   top_p; only tokens of exactly that probability are sorted.
constexpr size_t kMaxSorted = 4096;

void top_p_row(float* row, int64_t V, double top_p, std::vector<float>& probs, std::vector<int64_t>& candidates) {
  const float max = max_of(row, 0, V);
  if (max == kMinusInf) return;
  probs.resize(V);
  float* p = probs.data();
  const double total = exps_shifted(row, V, max, p);
  const double target = top_p * total;
  const float floor = static_cast<float>((1.0 - top_p) * total / static_cast<double>(V));
  candidates.clear();
  mask_and_list(row, V, [&](int64_t i) { return p[i] >= floor; }, [](int64_t) { return true; }, candidates);
  const auto prob = [p](int64_t i) { return static_cast<double>(p[i]); };
  if (candidates.size() <= kMaxSorted) {
    cut_in_order(row, candidates, 0.0, target, prob);
    return;
  }
  const auto bits_of = [p](int64_t i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof(bits));
    return bits;
  };
  uint32_t crossing = 0;  // the bit pattern found so far, digit by digit from the top
  double above = 0.0;  // the mass of the candidates whose bits are above `crossing`
  std::vector<int64_t> tied = candidates;  // the candidates that share crossing's digits so far
  for (int shift = 24; shift >= 0; shift -= 8) {
    double digit_mass[256] = {};
    for (const int64_t i : tied) digit_mass[(bits_of(i) >> shift) & 255] += prob(i);
    int digit = 255;
    for (; digit > 0 && above + digit_mass[digit] < target; --digit) above += digit_mass[digit];
    crossing |= static_cast<uint32_t>(digit) << shift;
    const uint32_t mask = ~0u << shift;
    tied.erase(std::remove_if(tied.begin(), tied.end(), [&](int64_t i) { return (bits_of(i) & mask) != crossing; }),
               tied.end());
  }
  for (const int64_t i : candidates) {
    if (bits_of(i) < crossing) row[i] = kMinusInf;
  }
  cut_in_order(row, tied, above, target, prob);
}

// Top-k, then top-p over the k survivors (ties at the k-th value survive too): the survivors are
// listed while the rest are masked, then sorted and walked; no pass over the row's probabilities.
void top_k_then_top_p_row(float* row, int64_t V, float kth, double top_p, std::vector<int64_t>& survivors) {
  survivors.clear();
  mask_and_list(row, V, [&](int64_t i) { return row[i] >= kth; }, [](int64_t) { return true; }, survivors);
  float max = kMinusInf;
  for (const int64_t i : survivors) max = std::max(max, row[i]);
  double total = 0.0;
  for (const int64_t i : survivors) total += kiln_native::fast_exp(row[i] - max);
  cut_in_order(row, survivors, 0.0, top_p * total,
               [row, max](int64_t i) { return static_cast<double>(kiln_native::fast_exp(row[i] - max)); });
}

// Logits read as float32 lanes, from bfloat16 bits or float32 values.
float lane_value(uint16_t bits) { return kiln_native::bf16_to_float(bits); }
float lane_value(float value) { return value; }
#if defined(__AVX512F__)
__m512 load16(const uint16_t* p) { return kiln_native::load_bf16x16(p); }
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#elif defined(__AVX2__) && defined(__FMA__)
__m256 load8(const uint16_t* p) { return kiln_native::load_bf16x8(p); }
__m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif

// torch.argmax's answer for one row (the first maximum; a NaN counts as the maximum, the first
// one wins): a vector max, then a vector search for its first occurrence.
template <typename T>
int64_t argmax_row(const T* row, int64_t V) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  bool has_nan = false;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan_lanes = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load16(row + i);
    nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  has_nan = nan_lanes != 0;
  best = _mm512_reduce_max_ps(vmax);
#elif defined(__AVX2__) && defined(__FMA__)
  // four independent maxima: one chain of max_ps waits ~4 cycles per 8 values
  __m256 vmax[4], nan_lanes = _mm256_setzero_ps();
  for (auto& m : vmax) m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (; i + 32 <= V; i += 32) {
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load8(row + i + 8 * u);
      nan_lanes = _mm256_or_ps(nan_lanes, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmax[u] = _mm256_max_ps(vmax[u], v);
    }
  }
  has_nan = _mm256_movemask_ps(nan_lanes) != 0;
  const __m256 m = _mm256_max_ps(_mm256_max_ps(vmax[0], vmax[1]), _mm256_max_ps(vmax[2], vmax[3]));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  for (const float lane : lanes) best = best > lane ? best : lane;
#endif
  // the tail (and the whole row without AVX2): reductions the compiler vectorizes, as
  // std::max's NaN order would stay scalar
  int nan_seen = has_nan;
#pragma omp simd reduction(max : best) reduction(| : nan_seen)
  for (int64_t k = i; k < V; ++k) {
    const float v = lane_value(row[k]);
    nan_seen |= v != v;
    best = best > v ? best : v;
  }
  has_nan = nan_seen;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(best);
  for (; j + 16 <= V; j += 16) {
    const __m512 v = load16(row + j);
    const __mmask16 hit =
        has_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
    if (hit) break;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 target = _mm256_set1_ps(best);
  for (; j + 32 <= V; j += 32) {
    __m256 hits = _mm256_setzero_ps();
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load8(row + j + 8 * u);
      hits = _mm256_or_ps(hits, has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    }
    if (_mm256_movemask_ps(hits)) break;
  }
#else
  constexpr int64_t kSpan = 64;  // searched as a whole, then element by element where it hits
  for (; j + kSpan <= V; j += kSpan) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t k = j; k < j + kSpan; ++k) {
      const float v = lane_value(row[k]);
      hit |= has_nan ? v != v : v == best;
    }
    if (hit) break;
  }
#endif
  for (; j < V; ++j) {
    const float v = lane_value(row[j]);
    if (has_nan ? v != v : v == best) return j;
  }
  return 0;
}

}  // namespace

namespace kiln_native {

// [B, V] bfloat16 or float32 -> [B] int64: torch.argmax's answer, one row per task. torch's CPU
// argmax reads a bfloat16 row at ~1 element per ns and a float32 one little faster (a 64 x 49k
// float32 batch: 4.4 ms on the AVX2 host).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must be [B, V] with V > 0");
  auto xc = x.contiguous();
  const int64_t B = xc.size(0), V = xc.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const bool is_bf16 = xc.scalar_type() == at::kBFloat16;
  const void* xp = xc.data_ptr();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      op[b] = is_bf16 ? argmax_row(static_cast<const uint16_t*>(xp) + b * V, V)
                      : argmax_row(static_cast<const float*>(xp) + b * V, V);
    }
  });
  return out;
}

namespace {

constexpr int64_t kDrawSpan = 64;

// The token where the running sum of softmax(x) crosses u times its total (u in [0, 1)), working
// in a scratch row that stays in cache: exp(x - max) and each span's mass in one pass, then the
// spans' masses walked to the span holding the crossing, which alone is walked token by token.
// Tokens at -inf or NaN weigh 0 and are never drawn, nor are spans they fill (a top-k filter's
// row is mostly such spans), which cost one compare pass. Where rounding leaves u * total at or
// past the last sum, the last token of nonzero weight is drawn.
int64_t softmax_draw_index(const float* x, int64_t V, double u, std::vector<float>& weights,
                           std::vector<double>& span_mass) {
  const float max = max_of(x, 0, V);
  if (max == kMinusInf) return 0;  // nothing to weigh
  if (max == std::numeric_limits<float>::infinity()) return std::find(x, x + V, max) - x;  // it outweighs all
  const int64_t num_spans = (V + kDrawSpan - 1) / kDrawSpan;
  weights.resize(V);
  span_mass.resize(num_spans);
  float* w = weights.data();
  double total = 0.0;
  for (int64_t s = 0; s < num_spans; ++s) {
    const int64_t begin = s * kDrawSpan, end = std::min(begin + kDrawSpan, V);
    int live = 0;
#pragma omp simd reduction(| : live)
    for (int64_t i = begin; i < end; ++i) live |= x[i] > kMinusInf;
    // a span's mass is summed in float32 lanes (the walk below tolerates its rounding against
    // the token-by-token float64 sums)
    const double mass = live ? exps_shifted(x + begin, end - begin, max, w + begin) : 0.0;
    span_mass[s] = mass;
    total += mass;
  }
  const double target = u * total;
  double above = 0.0;
  for (int64_t s = 0; s < num_spans; ++s) {
    if (above + span_mass[s] <= target) {
      above += span_mass[s];
      continue;
    }
    for (int64_t i = s * kDrawSpan; i < std::min((s + 1) * kDrawSpan, V); ++i) {
      if (w[i] == 0.f) continue;
      above += w[i];
      if (above > target) return i;
    }
  }
  int64_t s = num_spans - 1;
  while (span_mass[s] == 0.0) --s;  // the max's span weighs at least 1
  for (int64_t i = std::min((s + 1) * kDrawSpan, V) - 1;; --i) {
    if (w[i] > 0.f) return i;
  }
}

}  // namespace

// logits [B, V] float32 (after temperature and filters), uniform [B] float64 in [0, 1) -> [B]
// int64: per row, a draw from softmax(logits) by the inverse CDF at u. The same distribution as
// the sampler's torch path (softmax, then float64 cumsum and searchsorted) up to float rounding,
// not bitwise: exp is kiln's own and the sums go by spans. It spares the [B, V] probabilities,
// their pass through memory, and a serial float64 sum over the whole row (64 x 49k rows on a
// 2-core AVX2 host: torch's softmax, then a native float64 draw, ~7 ms; this 2.2-3.1, 0.8-1.0 after
// a top-k filter).
at::Tensor softmax_draw_rows(const at::Tensor& logits, const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.scalar_type() == at::kFloat,
              "logits must be float32 [B, V] with V > 0");
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == logits.size(0) && uniform.scalar_type() == at::kDouble,
              "uniform must be float64 [B]");
  auto lc = logits.contiguous();
  auto uc = uniform.contiguous();
  const int64_t B = lc.size(0), V = lc.size(1);
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = lc.data_ptr<float>();
  const double* up = uc.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights;
    std::vector<double> span_mass;
    for (int64_t b = begin; b < end; ++b) op[b] = softmax_draw_index(lp + b * V, V, up[b], weights, span_mass);
  });
  return out;
}

// logits [B, V] float32, after temperature, filtered in place: per row, top-k keeps the values
// at or above the k-th largest (ties included), then top-p keeps the smallest set of most probable
// survivors holding top_p of their renormalized mass; NaN logits of a filtered row become -inf.
// top_k [B] int64 (k >= V: off) and top_p [B] float32 (1: off) are each optional. The torch path
// sorts every row for top-p: 64 x 49k logits took 150 ms on a 2-core AVX2 host, this a few ms.
void top_k_top_p_rows(at::Tensor& logits, const c10::optional<at::Tensor>& top_k,
                      const c10::optional<at::Tensor>& top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous float32 [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor ks, ps;
  if (top_k.has_value()) {
    ks = top_k->contiguous();
    TORCH_CHECK(ks.scalar_type() == at::kLong && ks.numel() == B, "top_k must be int64 [B]");
  }
  if (top_p.has_value()) {
    ps = top_p->contiguous();
    TORCH_CHECK(ps.scalar_type() == at::kFloat && ps.numel() == B, "top_p must be float32 [B]");
  }
  float* lp = logits.data_ptr<float>();
  const int64_t* kp = ks.defined() ? ks.data_ptr<int64_t>() : nullptr;
  const float* pp = ps.defined() ? ps.data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch, maxima;
    std::vector<int64_t> tokens;
    for (int64_t b = begin; b < end; ++b) {
      float* row = lp + b * V;
      const bool k_on = kp != nullptr && kp[b] > 0 && kp[b] < V, p_on = pp != nullptr && pp[b] < 1.f;
      if (k_on || p_on) {  // NaN logits (a broken model) are cut: sorting and heaps need an order
        int has_nan = 0;  // looked for first: rewriting every row would cost a pass of stores
#pragma omp simd reduction(| : has_nan)
        for (int64_t i = 0; i < V; ++i) has_nan |= row[i] != row[i];
        if (has_nan) {
#pragma omp simd
          for (int64_t i = 0; i < V; ++i) row[i] = row[i] != row[i] ? kMinusInf : row[i];
        }
      }
      if (k_on) {
        const float kth = kth_largest(row, V, kp[b], scratch, maxima);
        if (p_on) {
          top_k_then_top_p_row(row, V, kth, pp[b], tokens);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < V; ++i) row[i] = row[i] < kth ? kMinusInf : row[i];
        }
      } else if (p_on) {
        top_p_row(row, V, pp[b], scratch, tokens);
      }
    }
  });
}

// logits [B, V] contiguous float32, filtered in place; min_p [B] float32 in [0, 1]: per row, the
// tokens whose probability is below min_p times the top one's, i.e. x < max + log(min_p), become
// -inf (min_p 0: none). Two passes and no [B, V] temporaries: torch's amax, compare and
// masked_fill took ~5-8 ms of 64 x 49k rows on the 2-core AVX2 host.
void min_p_rows(at::Tensor& logits, const at::Tensor& min_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous float32 [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto mc = min_p.contiguous();
  TORCH_CHECK(mc.scalar_type() == at::kFloat && mc.numel() == B, "min_p must be float32 [B]");
  float* lp = logits.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (!(mp[b] > 0.f)) continue;
      float* row = lp + b * V;
      const float threshold = max_of(row, 0, V) + std::log(mp[b]);
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) row[i] = row[i] < threshold ? kMinusInf : row[i];
    }
  });
}

namespace {

// One row's logprobs output: the chosen token's then the top k's (largest logit first, equal
// logits by lower index), and the chosen token's rank: the tokens whose logit is at least its own
// (the torch path compares the rounded logprobs, which can also tie two logits an ulp apart).
// Returns false for a row with NaN or +inf (left to the torch path).
bool logprobs_row(const float* x, int64_t V, int64_t k, int64_t token, int64_t* ids, float* lps, int64_t* rank,
                  std::vector<float>& scratch, std::vector<float>& maxima, std::vector<int64_t>& top) {
  float max = kMinusInf;
  int bad = 0;
#pragma omp simd reduction(max : max) reduction(| : bad)
  for (int64_t i = 0; i < V; ++i) {
    bad |= !(x[i] < std::numeric_limits<float>::infinity());  // NaN or +inf
    max = x[i] > max ? x[i] : max;
  }
  if (bad || max == kMinusInf) return false;
  // one subtraction: this file's flags let the compiler reassociate (x - max) - log_sum
  scratch.resize(V);
  const float log_normalizer = max + static_cast<float>(std::log(exps_shifted(x, V, max, scratch.data())));
  const auto logprob = [log_normalizer](float v) { return v - log_normalizer; };
  const float chosen = x[token];
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < V; ++i) count += x[i] >= chosen;
  *rank = count;
  ids[0] = token;
  lps[0] = logprob(chosen);
  if (k == 0) return true;
  top.clear();
  if (k < V) {
    constexpr int64_t kSpan = 64;  // kth_largest's spans: where it kept their maxima, skip the rest
    const int64_t num_spans = (V + kSpan - 1) / kSpan;
    maxima.clear();
    const float kth = kth_largest(x, V, k, scratch, maxima);
    const bool have_maxima = static_cast<int64_t>(maxima.size()) == num_spans;
    for (int64_t span = 0; span < num_spans; ++span) {
      if (have_maxima && maxima[span] < kth) continue;
      for (int64_t i = span * kSpan; i < std::min((span + 1) * kSpan, V); ++i) {
        if (x[i] >= kth) top.push_back(i);
      }
    }
  } else {
    for (int64_t i = 0; i < V; ++i) top.push_back(i);
  }
  std::partial_sort(top.begin(), top.begin() + k, top.end(),
                    [x](int64_t a, int64_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  for (int64_t j = 0; j < k; ++j) {
    ids[1 + j] = top[j];
    lps[1 + j] = logprob(x[top[j]]);
  }
  return true;
}

}  // namespace

// logits [B, V] float32 or bfloat16 (raw), k >= 0 (k <= V), token_ids [B] int64 -> ids [B, k + 1]
// int64, logprobs [B, k + 1] float32, ranks [B] int64: what gather_logprobs gives on the
// log-softmax of the logits (the chosen token first, then the top k; its rank, 1 = most likely),
// without the [B, V] log-softmax: a max, a sum of exps and a count pass per row, and a top-k among
// the few spans that reach the k-th largest (64 x 49k rows, k = 5, on the 2-core AVX2 host: the
// torch path's log-softmax, topk and rank took ~15 ms). A row with NaN or +inf gets rank 0: the
// caller computes it the torch way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_rows(const at::Tensor& logits, int64_t k,
                                                             const at::Tensor& token_ids) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be [B, V] with V > 0");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 0 && k <= V, "k must be in [0, V]");
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.size(0) == B && token_ids.scalar_type() == at::kLong,
              "token_ids must be int64 [B]");
  auto lc = logits.contiguous();
  auto tc = token_ids.contiguous();
  auto ids = at::empty({B, k + 1}, logits.options().dtype(at::kLong));
  auto lps = at::empty({B, k + 1}, logits.options().dtype(at::kFloat));
  auto ranks = at::empty({B}, logits.options().dtype(at::kLong));
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(tp[b] >= 0 && tp[b] < V, "token id out of range");
  const bool is_bf16 = lc.scalar_type() == at::kBFloat16;
  const void* xp = lc.data_ptr();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* lp = lps.data_ptr<float>();
  int64_t* rp = ranks.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> widened, scratch, maxima;
    std::vector<int64_t> top;
    for (int64_t b = begin; b < end; ++b) {
      const float* x = static_cast<const float*>(xp) + b * V;
      if (is_bf16) {
        widened.resize(V);
        const uint16_t* row = static_cast<const uint16_t*>(xp) + b * V;
        for (int64_t i = 0; i < V; ++i) widened[i] = kiln_native::bf16_to_float(row[i]);
        x = widened.data();
      }
      if (!logprobs_row(x, V, k, tp[b], ip + b * (k + 1), lp + b * (k + 1), rp + b, scratch, maxima, top)) {
        rp[b] = 0;
      }
    }
  });
  return {ids, lps, ranks};
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("min_p_rows(Tensor(a!) logits, Tensor min_p) -> ()");
  m.impl("min_p_rows", c10::DispatchKey::CPU, &kiln_native::min_p_rows);
  m.def("logprobs_rows(Tensor logits, int k, Tensor token_ids) -> (Tensor, Tensor, Tensor)");
  m.impl("logprobs_rows", c10::DispatchKey::CPU, &kiln_native::logprobs_rows);
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, &kiln_native::argmax_rows);
  m.def("softmax_draw_rows(Tensor logits, Tensor uniform) -> Tensor");
  m.impl("softmax_draw_rows", c10::DispatchKey::CPU, &kiln_native::softmax_draw_rows);
  m.def("top_k_top_p_rows(Tensor(a!) logits, Tensor? top_k, Tensor? top_p) -> ()");
  m.impl("top_k_top_p_rows", c10::DispatchKey::CPU, &kiln_native::top_k_top_p_rows);
}
