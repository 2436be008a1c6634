"""Paged attention for CUDA as one Triton kernel: decode rows and prefill chunks over the block
table, flash-style, reading K/V tiles where the cache holds them (no gather, no mask tensors).

The cache layout is the torch backend's rows layout ([num_blocks, kv_heads, block_size, head_dim]).
A program takes one sequence, one kv head and BLOCK_Q query positions of it; its rows are those
positions times the kv head's GQA group (padded to a power of two), so every K/V tile it loads
serves the whole group. Keys are visited in TILE_N-key steps that may span several cache blocks
(each key's block comes from the block table), up to the program's last query position: the
causal bound, so masked tiles are never loaded; a sliding window also moves the first tile up.
Scores and the running softmax are float32; probabilities are rounded to the model dtype before
the product with V, as FlashAttention does. fp8 caches (kv_layout.py) widen to it on load.

Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors, which is how the
tests check it against the direct computation on machines without a GPU. The interpreter's
bfloat16 dot is broken (numpy has no bfloat16), so there the operands are widened to float32
after the same roundings: the products are exact either way, only the summation order differs.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend serves
    triton = None
    tl = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Triton runs kernels on this device: CUDA, or anywhere under the interpreter."""
    return triton is not None and (device.type == "cuda" or _interpreting())


def _paged_attention_body(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_starts_ptr,
    scale, q_stride_t, q_stride_h, out_stride_t, out_stride_h, block_table_stride,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys cached before this step's chunk

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_offset = q_tile * BLOCK_Q + rows // GROUP_PAD  # position inside the chunk
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (q_offset < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = context + q_offset
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_rows = (q_start + q_offset).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)

    first_pos = context + q_tile * BLOCK_Q
    key_end = context + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)  # past the tile's last query position
    if SLIDING_WINDOW > 0:
        key_start = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0) // TILE_N * TILE_N
    else:
        key_start = 0
    table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    for tile_start in range(key_start, key_end, TILE_N):
        keys = tile_start + tl.arange(0, TILE_N)
        key_valid = keys < key_end
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = ((block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + keys % BLOCK_SIZE) * HEAD_DIM
        tile_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + dims[None, :], mask=tile_mask, other=0.0).to(DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (keys[None, :] <= q_pos[:, None]) & key_valid[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (keys[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=tile_mask, other=0.0)
        p_rounded = p.to(out_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p_rounded, v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


@functools.cache
def _kernel(interpreting: bool):
    """The jitted kernel; jitting is deferred so the interpreter switch is read when first used."""
    return triton.jit(_paged_attention_body)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting()):
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_starts: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: int) -> torch.Tensor:
    """q [rows, H, D] of the group's sequences in order (sequence i's rows from query_starts[i]; its
    last row at position seq_lens[i] - 1) over caches [num_blocks, KH, block_size, D] -> [rows, H, D].
    `sliding_window` 0: none."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_pad = _next_power_of_two(group)
    # tl.dot wants at least 16 rows; prefill tiles aim at 64 rows
    block_q = max(1, (16 if max_query_len == 1 else 64) // group_pad)
    out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    grid = (num_seqs, -(-max_query_len // block_q), num_kv_heads)
    dot_dtype = _dot_dtype(q.dtype)
    _kernel(_interpreting())[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_starts,
        scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, _next_power_of_two(head_dim)), BLOCK_SIZE=block_size, BLOCK_Q=block_q, TILE_N=64,
        SLIDING_WINDOW=sliding_window, DOT_DTYPE=dot_dtype,
        PRECISION="ieee" if dot_dtype == tl.float32 else None,  # float32 models: no TF32 rounding
    )
    return out
