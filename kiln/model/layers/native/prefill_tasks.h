// What the two prefill-attention kernels (prefill_attention.cpp for the pairs layout,
// prefill_attention_rows.cpp for the rows layout) share: their argument checks and how they deal
// out their tasks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace kiln_native {

// Both kernels' inputs as they read them: checked (head_dim a multiple of `dim_multiple`; caches
// bfloat16, or fp8 where `fp8_caches`; blocks of 16 keys, or of any multiple of 16 where
// `block_multiples`), the query and tables contiguous, and the geometry.
struct PrefillInputs {
  at::Tensor q, block_tables, seq_lens, query_starts;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, max_blocks, block_size;
  int64_t q_row_stride;  // elements from one query row to the next (its heads are contiguous)

  // the output: [T, H, D], contiguous
  at::Tensor new_output() const { return at::empty({q.size(0), num_heads, head_dim}, q.options()); }
};

inline PrefillInputs prefill_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                    const at::Tensor& query_starts, int64_t dim_multiple, bool fp8_caches = false,
                                    bool block_multiples = false) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const at::ScalarType cache = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == cache &&
                  (cache == at::kBFloat16 || (fp8_caches && is_fp8(cache))),
              fp8_caches ? "bfloat16 queries over bfloat16 or fp8 caches only" : "bfloat16 only");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_starts.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t head_dim = q.size(2);
  const int64_t block_size = k_cache.size(2);
  TORCH_CHECK((block_multiples ? block_size % 16 == 0 : block_size == 16) && k_cache.size(3) == head_dim &&
                  head_dim % dim_multiple == 0,
              block_multiples ? "blocks of a multiple of 16 keys" : "16-key blocks", " and head_dim a multiple of ",
              dim_multiple);
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must group over the kv heads");
  TORCH_CHECK(block_tables.size(0) == seq_lens.size(0) && query_starts.size(0) == seq_lens.size(0) + 1,
              "one table, length and start per sequence");
  // q is read in place when only its rows are strided (the query heads of the fused q/k rotation's
  // output): a copy of a 2048-token chunk cost ~0.2 ms per layer
  const at::Tensor rows = q.stride(2) == 1 && q.stride(1) == head_dim ? q : q.contiguous();
  return {rows, block_tables.contiguous(), seq_lens.contiguous(), query_starts.contiguous(),
          seq_lens.size(0), q.size(1), k_cache.size(1), head_dim, block_tables.size(1), block_size, rows.stride(0)};
}

// body(thread's state, sequence, first query of the tile, queries in the tile, kv head) for every
// task, a (sequence, `tile` queries, kv head), with make_state() called once per thread. Threads
// take the next task from a shared counter, the costliest first (later query tiles see more
// keys), so that a core slowed by its neighbours on a shared host does not leave the other idle.
template <typename MakeState, typename Body>
void for_each_prefill_task(const int32_t* query_starts, int64_t num_seqs, int64_t num_kv_heads, int64_t tile,
                           MakeState&& make_state, Body&& body) {
  std::vector<int64_t> task_start(num_seqs + 1, 0);  // tasks: (sequence, query tile, kv head), in that order
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = query_starts[s + 1] - query_starts[s];
    task_start[s + 1] = task_start[s] + (query_len + tile - 1) / tile * num_kv_heads;
  }
  const int64_t num_tasks = task_start[num_seqs];
  const int64_t num_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t taken; (taken = next.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      const int64_t task = num_tasks - 1 - taken;
      const int64_t s = std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin() - 1;
      const int64_t local = task - task_start[s];
      const int64_t i0 = local / num_kv_heads * tile, query_len = query_starts[s + 1] - query_starts[s];
      body(state, s, i0, std::min(query_len - i0, tile), local % num_kv_heads);
    }
  });
}

}  // namespace kiln_native
