// y = x W^T (+ b) for a few rows of x, bfloat16 (CPU with AVX512-BF16).
//
// With 1-4 rows (decode at low concurrency; the kernel takes up to 16, but oneDNN wins past ~6) a linear layer is a pass over its weight; oneDNN
// reaches only 12-16 GB/s there on small matrices (per-call setup and a layout meant for larger
// products), this kernel ~25 GB/s: each weight row is loaded once and dotted with every input row
// by `vdpbf16ps` (bfloat16 pairs multiplied and summed into float32 lanes). Rows of W are split
// across threads. Results are rounded to bfloat16 once, at the end, like oneDNN's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 16;

bool small_batch_linear_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(small_batch_linear_available(), "small_batch_linear needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K] and weight [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " rows");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto xc = x.contiguous();
  auto out = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t tail = K % 32;
  const __mmask32 tail_mask = tail ? (__mmask32)((1ull << tail) - 1) : 0;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* wr = wp + n * K;
      __m512 acc[kMaxRows];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wr + k);
        for (int64_t m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_loadu_si512(xp + m * K + k));
      }
      if (tail) {
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, wr + k);
        for (int64_t m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, xp + m * K + k));
      }
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(acc[m])).x;
    }
  });
#endif
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("small_batch_linear_available() -> bool");
  m.impl("small_batch_linear_available", c10::DispatchKey::CatchAll, &small_batch_linear_available);
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("small_batch_linear", c10::DispatchKey::CPU, &small_batch_linear);
}
