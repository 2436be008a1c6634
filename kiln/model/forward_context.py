"""Attention metadata for the forward pass in flight, visible to every attention layer.

The model runner builds one `AttentionMetadata` per step and enters `forward_context(...)`
around the model call; attention layers read it with `get_attn_metadata()`. Contexts never nest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """The flattened batch as attention sees it. Sequence i owns query rows
    query_start_loc[i]:query_start_loc[i+1]; its keys are the first seq_lens[i] slots of its
    block table, the last (query len) of which are written by this very step."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset, where each new K/V goes
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step (computed + scheduled)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # what attention backends derive from the above once per step and share across layers
    plans: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


_current: AttentionMetadata | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _current
    assert _current is None, "forward contexts do not nest"
    _current = metadata
    try:
        yield
    finally:
        _current = None


def get_attn_metadata() -> AttentionMetadata:
    assert _current is not None, "attention ran outside forward_context()"
    return _current
