// The tensor-level entry points of the kernels, for C++ callers in this library (decoder_stack.cpp
// chains them without a trip through Python and the dispatcher). Each is also a torch op of the
// same name in `torch.ops.kiln_native`; the .cpp files that define them document their contracts.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <tuple>

namespace kiln_native {

// Whether this build has the AVX512-BF16 kernels (the pair-packed linear, the pairs KV layout and
// the prefill attention that reads it); the build targets the machine it runs on (-march=native).
inline bool avx512_bf16_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Whether this build has the pair-packed linear kernels: AVX512-BF16, or AVX2 with FMA (float32
// arithmetic on the widened bfloat16 weights; see pair_packed_linear.cpp).
inline bool pair_packed_available() {
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
  return true;
#else
  return false;
#endif
}

// Whether a KV cache of this dtype stores fp8 values (rows layout; see kv_layout.py).
inline bool is_fp8(at::ScalarType dtype) { return dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2; }

// f(a value of the cache's element type): c10's fp8 types for fp8 caches, else `Other` (the type a
// kernel reads its same-dtype caches as).
template <typename Other, typename Fn>
inline void with_cache_type(at::ScalarType cache, Fn&& f) {
  if (cache == at::kFloat8_e4m3fn) f(c10::Float8_e4m3fn{});
  else if (cache == at::kFloat8_e5m2) f(c10::Float8_e5m2{});
  else f(Other{});
}

at::Tensor pair_packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                              int64_t out_features);
at::Tensor pair_packed_silu_gate_up(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                    int64_t intermediate_size);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, bool pairs_layout);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, bool pairs_layout);
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_starts, double scale, int64_t sliding_window);
at::Tensor paged_prefill_attention_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& query_starts, double scale, int64_t sliding_window);

}  // namespace kiln_native
