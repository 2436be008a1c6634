// Writing a step's new keys and values into the paged KV cache (CPU, any dtype).
//
// The torch path is two `index_copy_` calls on the cache viewed as [slots * kv_heads, head_dim],
// after copying k and v out of the fused QKV output (they are strided views of it). On CPU each
// `index_copy_` costs ~40-90 us per layer even for 16-64 tokens, ~6 ms of a 64-sequence decode
// step over 30 layers; this kernel reads the strided rows in place and copies each head's row
// to its slot, a few microseconds per layer. In the pairs layout (kv_layout.py: bfloat16 16-key
// blocks, K tiles [D/2][16][2], V tiles [8][D][2]) a K row lands as D/2 pairs 64 bytes apart and
// a V row in every other bfloat16 of its key pair's run. fp8 caches (rows layout) take each value
// clamped to the format's largest finite one and cast as torch casts it (c10's conversion, or its
// vector twin in simd_math.h, so the bytes are those of the torch path's `to_cache_dtype`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "simd_math.h"

namespace {

void check_source(const at::Tensor& x, const at::Tensor& cache, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [tokens, kv_heads * head_dim] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == cache.scalar_type() || kiln_native::is_fp8(cache.scalar_type()), name,
              " and its cache must have the same dtype (or an fp8 cache)");
  TORCH_CHECK(x.size(1) == cache.size(1) * cache.size(3), name, " width must be kv_heads * head_dim of the cache");
}

// One token's kv head rows into its (block, offset) of a pairs-layout tile (D even).
inline void write_pairs(const uint16_t* k, const uint16_t* v, uint16_t* k_tile, uint16_t* v_tile, int64_t offset,
                        int64_t D) {
  constexpr int64_t kBlock = 16;
  const uint32_t* k_pairs = reinterpret_cast<const uint32_t*>(k);
  uint32_t* k_dst = reinterpret_cast<uint32_t*>(k_tile) + offset;
  for (int64_t p = 0; p < D / 2; ++p) k_dst[p * kBlock] = k_pairs[p];
  uint16_t* v_dst = v_tile + (offset / 2) * 2 * D + (offset % 2);
  for (int64_t d = 0; d < D; ++d) v_dst[2 * d] = v[d];
}

// One row of D source values (S) into an fp8 cache row (F), saturating at F's largest finite value
// (NaN stays NaN). Eight at a time where the CPU has the vector conversion, which gives c10's bytes:
// one by one, the conversions of a 2048-token prefill cost 0.16-0.2 s over 30 layers on the AVX2 host
// (beside a running benchmark), eight at a time 11 ms.
template <typename F, typename S>
void write_fp8_row(const char* source, char* cache_row, int64_t D) {
  const S* x = reinterpret_cast<const S*>(source);
  F* dst = reinterpret_cast<F*>(cache_row);
  const float limit = static_cast<float>(std::numeric_limits<F>::max());
  int64_t d = 0;
#if defined(KILN_FP8_SIMD)
  const __m256 lo = _mm256_set1_ps(-limit), hi = _mm256_set1_ps(limit);
  for (; d + 8 <= D; d += 8) {  // the value second: maxps/minps then hand a NaN through, as std::clamp does
    const __m256 clamped = _mm256_min_ps(hi, _mm256_max_ps(lo, kiln_native::widen8(x + d)));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + d), kiln_native::fp8_bytes8<kiln_native::kFp8Format<F>>(clamped));
  }
#endif
  for (; d < D; ++d) dst[d] = F(std::clamp(static_cast<float>(x[d]), -limit, limit));
}

using Fp8RowWriter = void (*)(const char*, char*, int64_t);

// The row writer for an fp8 cache written from bfloat16, float16 or float32 values, picked once per call.
Fp8RowWriter fp8_row_writer(at::ScalarType cache, at::ScalarType source) {
  Fp8RowWriter writer = nullptr;
  kiln_native::with_cache_type<c10::Float8_e5m2>(cache, [&](auto fp8) {  // called for fp8 caches only
    using F = decltype(fp8);
    if (source == at::kBFloat16) writer = &write_fp8_row<F, c10::BFloat16>;
    else if (source == at::kHalf) writer = &write_fp8_row<F, c10::Half>;
    else if (source == at::kFloat) writer = &write_fp8_row<F, float>;
  });
  TORCH_CHECK(writer != nullptr, "an fp8 KV cache is written from bfloat16, float16 or float32 values");
  return writer;
}

}  // namespace

namespace kiln_native {

// key/value [T, KH * D] (rows may be strided), caches [blocks, KH, block_size, D] contiguous,
// slot_mapping [T] int64 (block * block_size + offset; a negative slot is a padding token, skipped).
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, bool pairs_layout) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "caches must be contiguous [blocks, kv_heads, block_size, head_dim] of one shape");
  check_source(key, k_cache, "key");
  check_source(value, v_cache, "value");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0) && value.size(0) == key.size(0),
              "slot_mapping must be int64 [tokens] and match key and value");
  const int64_t T = key.size(0), KH = k_cache.size(1), BS = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(!pairs_layout || (k_cache.scalar_type() == at::kBFloat16 && BS == 16 && D % 2 == 0),
              "the pairs layout needs bfloat16 caches with 16-key blocks and an even head_dim");
  const int64_t num_slots = k_cache.size(0) * BS;
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value must share a dtype");
  const bool fp8 = is_fp8(k_cache.scalar_type());
  TORCH_CHECK(!(fp8 && pairs_layout), "fp8 caches keep the rows layout");
  const int64_t elem = key.element_size(), row_bytes = D * elem, cache_row_bytes = D * k_cache.element_size();
  const Fp8RowWriter write_fp8 = fp8 ? fp8_row_writer(k_cache.scalar_type(), key.scalar_type()) : nullptr;
  auto slots = slot_mapping.contiguous();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot_ptr[t] < num_slots, "slot ", slot_ptr[t], " is outside the cache (", num_slots, " slots)");
  }
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * elem, v_stride = value.stride(0) * elem;
  // both threads from 32 tokens on: a pairs-layout K row is D/2 stores 64 bytes apart, each a cache
  // line to fetch for ownership, so a 64-token decode step's writes wait on memory, not on work
  // (30 layers x 64 tokens: 1.2-1.7 ms on one thread, 0.5-0.9 on two)
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_ptr[t];
      if (slot < 0) continue;
      const int64_t block = slot / BS, offset = slot % BS;
      if (pairs_layout) {
        for (int64_t h = 0; h < KH; ++h) {
          const int64_t tile = ((block * KH + h) * BS) * row_bytes;
          write_pairs(reinterpret_cast<const uint16_t*>(kp + t * k_stride + h * row_bytes),
                      reinterpret_cast<const uint16_t*>(vp + t * v_stride + h * row_bytes),
                      reinterpret_cast<uint16_t*>(kc + tile), reinterpret_cast<uint16_t*>(vc + tile), offset, D);
        }
        continue;
      }
      for (int64_t h = 0; h < KH; ++h) {
        const int64_t dst = ((block * KH + h) * BS + offset) * cache_row_bytes;
        const char* k_row = kp + t * k_stride + h * row_bytes;
        const char* v_row = vp + t * v_stride + h * row_bytes;
        if (fp8) {
          write_fp8(k_row, kc + dst, D);
          write_fp8(v_row, vc + dst, D);
        } else {
          std::memcpy(kc + dst, k_row, row_bytes);
          std::memcpy(vc + dst, v_row, row_bytes);
        }
      }
    }
  });
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, bool pairs_layout) -> ()");
  m.impl("write_kv_cache", c10::DispatchKey::CPU, &kiln_native::write_kv_cache);
}
