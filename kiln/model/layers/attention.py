"""Paged attention: write this step's K/V into the block cache, then attend through block tables.

Layout (shared by every backend): per layer, K and V caches [num_blocks, num_kv_heads, block_size,
head_dim]; token slot = block_id * block_size + offset. One (block, kv head) pair is a contiguous
tile of block_size keys (a token-major layout made the gather a strided copy that cost more than
the attention itself). Inside a tile the keys lie as rows ([block_size, head_dim]: gathering a
sequence's tiles yields the operand of a batched matmul directly) or, for bfloat16 CPU caches the
AVX512-BF16 kernels read, as vdpbf16ps operand pairs (kv_layout.py); binding `Attention.kv_cache`
(the worker does after allocating the caches) decides which.

This file holds the portable torch backend (CPU, and the reference on any device). Everything
that depends only on the step's shape (the gather index, the write index, masks, which rows
decode) is built once per step in a `StepPlan` and shared by all layers:

| rows | method |
| --- | --- |
| decode (query len 1), CPU | native kernel (native/paged_attention.cpp): K tiles read in place for the scores, a float32 softmax, V tiles read in place for the sum |
| prefill chunks, CPU: pairs layout, or bfloat16 queries over bfloat16 or fp8 rows | native kernels (native/prefill_attention*.cpp): flash-style over tiles read in place, masked tiles skipped |
| any rows, CUDA with Triton | one Triton kernel (triton_attention.py): flash-style over the block table, tiles read in place |
| decode, elsewhere | gathered tiles, bmm, float32 softmax, bmm: transformers' eager order of operations; GQA groups are the rows of each kv head's matrix |
| prefill chunks, elsewhere | gathered tiles, queries padded to the longest chunk, SDPA with a causal (and sliding-window) mask |

Decode rows are attended apart from prefill rows, so a long prefill chunk never pads a batch of
single-token decodes to its length. Slots past a sequence's length are read and masked, so caches
must hold finite values (allocate them zero-filled): 0 * NaN would poison a row.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.forward_context import AttentionMetadata, get_attn_metadata
from kiln.model.layers import kv_layout, native


@dataclass
class AttentionGroup:
    """Sequences attended together: all decode, or all prefill, in batch order."""

    rows: slice | torch.Tensor | None  # the group's query rows in the flattened batch; None when it is the whole batch
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_lens: list[int]
    num_blocks: int  # blocks of the longest sequence
    num_kv_heads: int
    block_size: int
    query_starts: torch.Tensor  # [num_seqs + 1] int32: each sequence's first row in the group's queries
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # sliding window -> mask
    valid: torch.Tensor | None = None  # prefill: [S, max_query_len] bool, which padded query slots are real

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def key_len(self) -> int:
        """Gathered keys per sequence (the torch path)."""
        return self.num_blocks * self.block_size

    @functools.cached_property
    def tiles(self) -> torch.Tensor:
        """[num_seqs * kv_heads * num_blocks] rows of the cache viewed [blocks * kv_heads, tile], for
        the torch path's gather (built on first use: the native kernels read the block tables)."""
        blocks = self.block_tables[:, :self.num_blocks].long()  # [S, nb]
        heads = torch.arange(self.num_kv_heads, device=blocks.device)
        return (blocks[:, None, :] * self.num_kv_heads + heads[None, :, None]).flatten()  # [S, KH, nb]


@dataclass
class StepPlan:
    slot_mapping: torch.Tensor
    num_kv_heads: int
    block_size: int
    groups: list[AttentionGroup]

    @functools.cached_property
    def write_rows(self) -> torch.Tensor:
        """[num_tokens * kv_heads] rows of the cache viewed [slots * kv_heads, head_dim] where the
        step's keys and values go, for the torch path's index_copy_ (the native write takes slots)."""
        block, offset = self.slot_mapping // self.block_size, self.slot_mapping % self.block_size
        heads = torch.arange(self.num_kv_heads, device=block.device)
        return ((block[:, None] * self.num_kv_heads + heads) * self.block_size + offset[:, None]).flatten()


def step_plan(md: AttentionMetadata, num_kv_heads: int, block_size: int) -> StepPlan:
    key = (num_kv_heads, block_size)
    plan = md.plans.get(key)
    if plan is None:
        plan = md.plans[key] = _build_plan(md, num_kv_heads, block_size)
    return plan


def _build_plan(md: AttentionMetadata, num_kv_heads: int, block_size: int) -> StepPlan:
    device = md.slot_mapping.device
    decode = [i for i, n in enumerate(md.query_lens_cpu) if n == 1]
    if len(decode) in (0, md.num_seqs):
        groups = [_group(md, None, None, num_kv_heads, block_size)]
    else:
        prefill = [i for i, n in enumerate(md.query_lens_cpu) if n > 1]
        starts = [0, *itertools.accumulate(md.query_lens_cpu)]
        groups = [_group(md, seqs, _rows_of(starts, seqs, device), num_kv_heads, block_size)
                  for seqs in (decode, prefill)]
    return StepPlan(md.slot_mapping, num_kv_heads, block_size, groups)


def _rows_of(starts: list[int], seqs: list[int], device: torch.device) -> slice | torch.Tensor:
    """The flattened batch's query rows of `seqs` (`starts`: each sequence's first row, then the
    total): a slice when the sequences are consecutive (the scheduler puts running requests first,
    so decodes usually are), which makes gathering the group's queries a view and scattering its
    outputs a plain copy."""
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return slice(starts[seqs[0]], starts[seqs[-1] + 1])
    return torch.tensor([r for i in seqs for r in range(starts[i], starts[i + 1])], device=device)


def _group(md: AttentionMetadata, seqs: list[int] | None, rows: slice | torch.Tensor | None, num_kv_heads: int,
           block_size: int) -> AttentionGroup:
    query_lens = md.query_lens_cpu if seqs is None else [md.query_lens_cpu[i] for i in seqs]
    seq_lens_cpu = md.seq_lens_cpu if seqs is None else [md.seq_lens_cpu[i] for i in seqs]
    block_tables, seq_lens = md.block_tables, md.seq_lens
    if seqs is not None:
        index = torch.tensor(seqs, device=block_tables.device)
        block_tables, seq_lens = block_tables[index], seq_lens[index]
    query_starts = md.query_start_loc if seqs is None else torch.tensor(
        [0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=md.query_start_loc.device)
    return AttentionGroup(rows, block_tables.contiguous(), seq_lens.int(), query_lens, -(-max(seq_lens_cpu) // block_size),
                  num_kv_heads, block_size, query_starts)


def _cache_writer(k_cache: torch.Tensor) -> Callable[..., None] | None:
    return native.write_kv_cache() if k_cache.device.type == "cpu" else None


def _decode_kernel(device: torch.device) -> Callable[..., torch.Tensor] | None:
    return native.paged_decode_attention() if device.type == "cpu" else None


def prefill_kernel(k_cache: torch.Tensor, pairs_layout: bool, q_dtype: torch.dtype) -> Callable[..., torch.Tensor] | None:
    """The native prefill kernel for the cache's layout: pairs (AVX512-BF16), or rows (AVX2) where
    bfloat16 queries attend over a bfloat16 or fp8 cache on CPU with blocks of a multiple of 16 keys
    and head_dim a multiple of 16."""
    if pairs_layout:
        return native.paged_prefill_attention()
    if (k_cache.device.type != "cpu" or q_dtype != torch.bfloat16 or k_cache.shape[2] % 16 or k_cache.shape[3] % 16
            or not (k_cache.dtype == torch.bfloat16 or kv_layout.is_fp8(k_cache))):
        return None
    return native.paged_prefill_attention_rows()


def _triton_kernel(k_cache: torch.Tensor, pairs_layout: bool) -> Callable[..., torch.Tensor] | None:
    """The Triton kernel on CUDA (rows layout); the tests also run it on CPU under Triton's interpreter."""
    if pairs_layout or k_cache.device.type != "cuda":
        return None
    from kiln.model.layers import triton_attention  # Triton: imported on CUDA only

    return triton_attention.paged_attention if triton_attention.available(k_cache.device) else None


class Attention(nn.Module):
    """q [T, H*D], k/v [T, KH*D] -> [T, H*D] for a flattened batch described by the forward context."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, f"{num_heads} query heads do not group over {num_kv_heads} kv heads"
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self._kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pairs_layout = False

    @property
    def kv_cache(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, caches: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Bind this layer's (K, V) caches; their dtype, block size and device decide the tile layout."""
        self._kv_cache = caches
        self.pairs_layout = caches is not None and kv_layout.uses_pairs_layout(caches[0])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound: the worker must allocate KV caches before a forward.")
        k_cache, v_cache = self.kv_cache
        md = get_attn_metadata()
        plan = step_plan(md, self.num_kv_heads, k_cache.shape[2])
        num_tokens = q.shape[0]
        # write first, so this step's own keys are visible to its queries
        if (writer := _cache_writer(k_cache)) is not None:
            writer(k, v, k_cache, v_cache, md.slot_mapping, self.pairs_layout)
        elif self.pairs_layout:
            kv_layout.write_pairs(k_cache, v_cache, k, v, md.slot_mapping)
        else:
            for cache, x in ((k_cache, k), (v_cache, v)):
                x = kv_layout.to_cache_dtype(x.reshape(-1, self.head_dim), cache.dtype)
                if kv_layout.is_fp8(cache):  # index_copy_ has no fp8 kernels: copy the bytes
                    cache, x = cache.view(torch.uint8), x.view(torch.uint8)
                cache.view(-1, self.head_dim).index_copy_(0, plan.write_rows, x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if len(plan.groups) == 1:
            return self._attend(q, plan.groups[0]).reshape(num_tokens, -1)
        out = torch.empty_like(q)
        for group in plan.groups:
            out[group.rows] = self._attend(q[group.rows], group)
        return out.reshape(num_tokens, -1)

    def _attend(self, q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """q [rows, H, D] of the group's sequences in batch order -> [rows, H, D]."""
        k_cache, v_cache = self.kv_cache  # type: ignore[misc]
        if group.max_query_len == 1 and (kernel := _decode_kernel(q.device)) is not None:
            return kernel(q, k_cache, v_cache, group.block_tables, group.seq_lens, self.scale,
                          self.sliding_window or 0, self.pairs_layout)
        if group.max_query_len > 1 and (kernel := prefill_kernel(k_cache, self.pairs_layout, q.dtype)) is not None:
            return kernel(q, k_cache, v_cache, group.block_tables, group.seq_lens, group.query_starts, self.scale,
                          self.sliding_window or 0)
        if (kernel := _triton_kernel(k_cache, self.pairs_layout)) is not None:
            return kernel(q, k_cache, v_cache, group.block_tables, group.seq_lens, group.query_starts,
                          group.max_query_len, self.scale, self.sliding_window or 0)
        keys, values = self._gather(k_cache, group), self._gather(v_cache, group)
        if self.pairs_layout:
            keys = kv_layout.pairs_keys_as_rows(keys, self.head_dim)
            values = kv_layout.pairs_values_as_rows(values, self.head_dim)
        shape = (group.num_seqs, self.num_kv_heads, group.key_len, self.head_dim)
        keys, values = keys.view(shape).to(q.dtype), values.view(shape).to(q.dtype)  # fp8 caches widen exactly
        if group.max_query_len == 1:
            return self._decode(q, keys, values, group)
        return self._prefill(q, keys, values, group)

    def _gather(self, cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """The group's tiles, [num_seqs, kv_heads, blocks, block_size * head_dim] (the torch path)."""
        tiles = cache.view(-1, cache.shape[2] * self.head_dim).index_select(0, group.tiles)
        return tiles.view(group.num_seqs, self.num_kv_heads, group.num_blocks, -1)

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        num_seqs, key_len = group.num_seqs, group.key_len
        bias = group.masks.get(self.sliding_window)
        if bias is None:
            key_pos = torch.arange(key_len, device=q.device)
            last = (group.seq_lens.long() - 1)[:, None]
            visible = key_pos[None, :] <= last
            if self.sliding_window is not None:
                visible &= key_pos[None, :] > last - self.sliding_window
            zero = torch.zeros((), device=q.device)
            bias = torch.where(visible, zero, float("-inf"))[:, None, None, :]  # [S, 1, 1, L]
            group.masks[self.sliding_window] = bias
        flat = num_seqs * self.num_kv_heads
        scores = torch.bmm(q.reshape(flat, self.group, self.head_dim), keys.view(flat, key_len, -1).transpose(1, 2))
        scores = scores.view(num_seqs, self.num_kv_heads, self.group, key_len).float() * self.scale + bias
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(flat, self.group, key_len)
        return torch.bmm(probs, values.view(flat, key_len, -1)).view(num_seqs, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        num_seqs, max_query_len, group_size = group.num_seqs, group.max_query_len, self.group
        valid = _valid_rows(group)
        padded = q.new_zeros(num_seqs, max_query_len, self.num_heads, self.head_dim)
        padded[valid] = q
        # rows are (group member, query position) of each kv head
        queries = padded.view(num_seqs, max_query_len, self.num_kv_heads, group_size, self.head_dim)
        queries = queries.permute(0, 2, 3, 1, 4).reshape(num_seqs, self.num_kv_heads, group_size * max_query_len, -1)
        mask = group.masks.get(self.sliding_window)
        if mask is None:
            mask = group.masks[self.sliding_window] = self._prefill_mask(group, q.device)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(num_seqs, self.num_kv_heads, group_size, max_query_len, -1).permute(0, 3, 1, 2, 4)
        return out.reshape(num_seqs, max_query_len, self.num_heads, self.head_dim)[valid]

    def _prefill_mask(self, group: AttentionGroup, device: torch.device) -> torch.Tensor:
        """[S, 1, group * Q, L]: key pos <= query pos (and inside the window); padding rows act as the
        last real row, so no row is fully masked."""
        query_lens = torch.tensor(group.query_lens, device=device)
        max_query_len = group.max_query_len
        seq_lens = group.seq_lens.long()
        query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_query_len, device=device)  # [S, Q]
        query_pos = torch.minimum(query_pos, (seq_lens - 1)[:, None])
        key_pos = torch.arange(group.key_len, device=device)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [S, Q, L]
        if self.sliding_window is not None:
            mask &= key_pos[None, None, :] > query_pos[:, :, None] - self.sliding_window
        mask = mask[:, None].expand(-1, self.group, -1, -1).reshape(group.num_seqs, self.group * max_query_len, -1)
        return mask[:, None]

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, scale={self.scale:g}"


def _valid_rows(group: AttentionGroup) -> torch.Tensor:
    if group.valid is None:
        lens = torch.tensor(group.query_lens, device=group.seq_lens.device)
        group.valid = torch.arange(group.max_query_len, device=lens.device)[None, :] < lens[:, None]
    return group.valid
