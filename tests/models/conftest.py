"""Helpers for model tests: paged-attention metadata, a stand-in KV cache, and a one-step runner.

`make_attn_metadata` builds the `AttentionMetadata` the model runner would for given per-sequence
(num_computed, num_new) lengths and block tables. `PagedKVCache` plays worker + KV cache manager:
it binds per-layer caches (filled with a huge finite value, so reading a slot never written shows up) and hands each
sequence blocks from a shuffled free list. `run_step` feeds one flattened batch through a model.
Test modules get them as fixtures of the same names (conftest modules are not meant for import).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kiln.model.forward_context import AttentionMetadata, forward_context
from kiln.model.layers import kv_layout
from kiln.model.layers.attention import Attention


def make_attn_metadata(
    num_computed: Sequence[int], num_new: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int,
    device: str | torch.device = "cpu",
) -> AttentionMetadata:
    """Sequence i already has num_computed[i] tokens cached and runs num_new[i] more this step."""
    slots: list[int] = []
    for computed, new, table in zip(num_computed, num_new, block_tables, strict=True):
        assert len(table) * block_size >= computed + new, "block table too short for the sequence"
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(computed, computed + new))
    seq_lens = [c + n for c, n in zip(num_computed, num_new)]
    width = max(len(t) for t in block_tables)
    padded_tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    query_start_loc = [0]
    for n in num_new:
        query_start_loc.append(query_start_loc[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=device),
        max_query_len=max(num_new), max_seq_len=max(seq_lens),
        query_lens_cpu=list(num_new), seq_lens_cpu=seq_lens,
    )


@dataclass
class StepSeq:
    """One sequence in a step: all its tokens so far, of which the first num_computed are cached."""

    seq_id: Hashable
    token_ids: Sequence[int]
    num_computed: int


StepSeqLike = StepSeq | tuple[Hashable, Sequence[int], int]


class PagedKVCache:
    """Per-layer K/V caches bound to `model`'s Attention layers, and per-sequence block tables."""

    def __init__(self, model: nn.Module, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.block_size = block_size
        dtype = cache_dtype or next(model.parameters()).dtype
        for layer in (m for m in model.modules() if isinstance(m, Attention)):
            shape = (num_blocks, layer.num_kv_heads, block_size, layer.head_dim)
            layer.kv_cache = tuple(kv_layout.to_cache_dtype(torch.full(shape, 1e4), dtype) for _ in range(2))
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: dict[Hashable, list[int]] = {}

    def metadata(self, seqs: Sequence[StepSeq]) -> AttentionMetadata:
        """Metadata for one step, growing each sequence's block table to cover its tokens."""
        tables = []
        for seq in seqs:
            table = self.block_tables.setdefault(seq.seq_id, [])
            while len(table) * self.block_size < len(seq.token_ids):
                table.append(self.free_blocks.pop())
            tables.append(table)
        num_computed = [s.num_computed for s in seqs]
        num_new = [len(s.token_ids) - s.num_computed for s in seqs]
        return make_attn_metadata(num_computed, num_new, tables, self.block_size)


def run_step(model: nn.Module, cache: PagedKVCache, step: Sequence[StepSeqLike]) -> torch.Tensor:
    """Run every sequence's uncached tokens as one flattened batch; logits of all those rows [T, vocab].
    Sequences are StepSeq or (seq_id, token_ids, num_computed) tuples."""
    seqs = [s if isinstance(s, StepSeq) else StepSeq(*s) for s in step]
    input_ids = torch.tensor([t for s in seqs for t in s.token_ids[s.num_computed:]], dtype=torch.int64)
    positions = torch.tensor([p for s in seqs for p in range(s.num_computed, len(s.token_ids))], dtype=torch.int64)
    with torch.inference_mode(), forward_context(cache.metadata(seqs)):
        return model.compute_logits(model(input_ids, positions)).float()


def hf_logits(hf_model: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """transformers' logits for one full sequence, [len, vocab] float32."""
    with torch.inference_mode():
        return hf_model(torch.tensor([list(token_ids)])).logits[0].float()


@pytest.fixture(name="make_attn_metadata")
def _make_attn_metadata_fixture():
    return make_attn_metadata


@pytest.fixture(name="make_kv_cache")
def _paged_kv_cache_fixture():
    return PagedKVCache


@pytest.fixture(name="run_step")
def _run_step_fixture():
    return run_step


@pytest.fixture(name="hf_logits")
def _hf_logits_fixture():
    return hf_logits
