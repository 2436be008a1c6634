// A whole stack of Llama-style decoder layers in one call (bfloat16, CPU with AVX512-BF16 or AVX2;
// prefill groups need 16-key blocks: the pairs layout's kernel, or the rows layout's on AVX2).
//
// A batch-1 decode step runs ~10 kernels per layer, 300 for SmolLM2's 30 layers, and in eager
// Python each one costs a module call, a dispatcher trip and a few tensor views on top of its work:
// a 12.3 ms forward took 8.1 ms as this one call (same process, interleaved). This op chains the
// same kernels from C++, layer after layer, so a step pays Python once. The kernels, their order
// and their arguments are exactly those of the module path (model/common.py), so the two give
// bitwise the same results; the module path stays the general one (mixed batches whose groups are
// not contiguous rows, other layer kinds, dtypes and devices).
//
// Per layer (`weights`: six per layer in this order; `biases`: four per layer, each may be None;
// `qk_norms`: none, or two per layer):
//   x, residual = add_rms_norm(hidden, residual, input_norm)
//   qkv = x @ Wqkv + bqkv
//   without q/k norms: q|k = rotary(qkv[:, :q+k])  (one rotation for both, as the modules do)
//   with them (Qwen3): q = rotary(rms_norm(q heads, q_norm)), k = rotary(rms_norm(k heads, k_norm))
//   v = qkv[:, q+k:]; write k, v to the layer's caches at slot_mapping; attend (decode rows, prefill rows)
//   hidden = attn @ Wo + bo;  x, residual = add_rms_norm(hidden, residual, post_norm)
//   hidden = silu_and_mul(x @ Wgate_up + bgate_up) @ Wdown + bdown  (one fused kernel up to the down product)

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace {

constexpr int64_t kWeightsPerLayer = 6;
constexpr int64_t kBiasesPerLayer = 4;

// One group of sequences attended by one kernel: rows [begin, end) of the flattened batch.
struct AttentionGroup {
  int64_t begin, end;
  const c10::optional<at::Tensor>& block_tables;
  const c10::optional<at::Tensor>& seq_lens;
  const c10::optional<at::Tensor>& query_starts;  // prefill only

  bool empty() const { return begin == end; }
};

at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const AttentionGroup& group, bool decode, double scale, int64_t window, bool pairs_layout) {
  const at::Tensor rows = q.narrow(0, group.begin, group.end - group.begin);
  if (decode) {
    return kiln_native::paged_decode_attention(rows, k_cache, v_cache, *group.block_tables, *group.seq_lens, scale,
                                               window, pairs_layout);
  }
  return pairs_layout ? kiln_native::paged_prefill_attention(rows, k_cache, v_cache, *group.block_tables,
                                                             *group.seq_lens, *group.query_starts, scale, window)
                      : kiln_native::paged_prefill_attention_rows(rows, k_cache, v_cache, *group.block_tables,
                                                                  *group.seq_lens, *group.query_starts, scale, window);
}

}  // namespace

namespace kiln_native {

// hidden [T, H] (the embeddings), cos/sin [T, head_dim] -> (hidden, residual) after the last layer,
// ready for the final add + norm. Decode rows [decode_begin, decode_end) and prefill rows
// [prefill_begin, prefill_end) must together be all T rows; either group may be empty.
std::tuple<at::Tensor, at::Tensor> decoder_stack(
    const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, at::TensorList qk_norms, at::TensorList k_caches,
    at::TensorList v_caches, at::IntArrayRef sliding_windows, const at::Tensor& slot_mapping,
    int64_t decode_begin, int64_t decode_end, const c10::optional<at::Tensor>& decode_block_tables,
    const c10::optional<at::Tensor>& decode_seq_lens, int64_t prefill_begin, int64_t prefill_end,
    const c10::optional<at::Tensor>& prefill_block_tables, const c10::optional<at::Tensor>& prefill_seq_lens,
    const c10::optional<at::Tensor>& prefill_query_starts, int64_t num_heads, int64_t num_kv_heads,
    int64_t intermediate_size, double eps, double scale, bool pairs_layout) {
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(num_layers > 0 && static_cast<int64_t>(weights.size()) == kWeightsPerLayer * num_layers &&
                  static_cast<int64_t>(v_caches.size()) == num_layers &&
                  static_cast<int64_t>(sliding_windows.size()) == num_layers,
              "decoder_stack needs six weights, two caches and a sliding window per layer");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == kBiasesPerLayer * num_layers,
              "decoder_stack needs four (optional) biases per layer");
  const bool qk_norm = !qk_norms.empty();
  TORCH_CHECK(!qk_norm || static_cast<int64_t>(qk_norms.size()) == 2 * num_layers,
              "q/k norms come two per layer, or not at all");
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kBFloat16, "hidden must be bfloat16 [T, H]");
  const int64_t T = hidden.size(0), H = hidden.size(1), D = k_caches[0].size(3);
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;
  const c10::optional<at::Tensor> none;
  const AttentionGroup decode{decode_begin, decode_end, decode_block_tables, decode_seq_lens, none};
  const AttentionGroup prefill{prefill_begin, prefill_end, prefill_block_tables, prefill_seq_lens,
                               prefill_query_starts};
  TORCH_CHECK((decode.end - decode.begin) + (prefill.end - prefill.begin) == T, "the groups must cover the batch");
  TORCH_CHECK(decode.empty() || (decode.block_tables.has_value() && decode.seq_lens.has_value()),
              "the decode group needs block tables and lengths");
  TORCH_CHECK(prefill.empty() || (prefill.block_tables.has_value() && prefill.seq_lens.has_value() &&
                                  prefill.query_starts.has_value()),
              "the prefill group needs block tables, lengths and query starts");
  at::Tensor x = hidden, residual;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const at::Tensor* w = weights.data() + layer * kWeightsPerLayer;
    const auto bias = [&](int64_t i) { return biases.get(layer * kBiasesPerLayer + i); };
    at::Tensor k_cache = k_caches[layer], v_cache = v_caches[layer];
    const int64_t window = sliding_windows[layer];
    at::Tensor normed;
    std::tie(normed, residual) =
        add_rms_norm(x, layer == 0 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(residual), w[0], eps);
    const at::Tensor qkv = pair_packed_linear(normed, w[1], bias(0), q_size + 2 * kv_size);
    at::Tensor q, k;
    if (qk_norm) {
      const at::Tensor q_heads = qkv.narrow(1, 0, q_size).view({T, num_heads, D});
      const at::Tensor k_heads = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, D});
      q = rotary(std::get<0>(add_rms_norm(q_heads, none, qk_norms[2 * layer], eps)), cos, sin);
      k = rotary(std::get<0>(add_rms_norm(k_heads, none, qk_norms[2 * layer + 1], eps)), cos, sin);
    } else {
      const at::Tensor qk =
          rotary(qkv.narrow(1, 0, q_size + kv_size).view({T, num_heads + num_kv_heads, D}), cos, sin);
      q = qk.narrow(1, 0, num_heads);
      k = qk.narrow(1, num_heads, num_kv_heads);
    }
    write_kv_cache(k.flatten(1), qkv.narrow(1, q_size + kv_size, kv_size), k_cache, v_cache, slot_mapping,
                   pairs_layout);
    at::Tensor attn;
    if (prefill.empty() || decode.empty()) {
      attn = attend(q, k_cache, v_cache, decode.empty() ? prefill : decode, !decode.empty(), scale, window,
                    pairs_layout);
    } else {
      attn = at::empty({T, num_heads, D}, hidden.options());
      attn.narrow(0, decode.begin, decode.end - decode.begin)
          .copy_(attend(q, k_cache, v_cache, decode, true, scale, window, pairs_layout));
      attn.narrow(0, prefill.begin, prefill.end - prefill.begin)
          .copy_(attend(q, k_cache, v_cache, prefill, false, scale, window, pairs_layout));
    }
    const at::Tensor projected = pair_packed_linear(attn.view({T, q_size}), w[2], bias(1), H);
    std::tie(normed, residual) = add_rms_norm(projected, residual, w[3], eps);
    const at::Tensor gated = intermediate_size % 16 == 0  // as GatedMLP.forward chooses
                                 ? pair_packed_silu_gate_up(normed, w[4], bias(2), intermediate_size)
                                 : silu_and_mul(pair_packed_linear(normed, w[4], bias(2), 2 * intermediate_size));
    x = pair_packed_linear(gated, w[5], bias(3), H);
  }
  return {x, residual};
}

}  // namespace kiln_native

TORCH_LIBRARY_FRAGMENT(kiln_native, m) {
  m.def("decoder_stack(Tensor hidden, Tensor cos, Tensor sin, Tensor[] weights, Tensor?[] biases, "
        "Tensor[] qk_norms, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, int[] sliding_windows, Tensor slot_mapping, int decode_begin, int decode_end, "
        "Tensor? decode_block_tables, Tensor? decode_seq_lens, int prefill_begin, int prefill_end, "
        "Tensor? prefill_block_tables, Tensor? prefill_seq_lens, Tensor? prefill_query_starts, int num_heads, "
        "int num_kv_heads, int intermediate_size, float eps, float scale, bool pairs_layout) -> (Tensor, Tensor)");
  m.impl("decoder_stack", c10::DispatchKey::CPU, &kiln_native::decoder_stack);
}
