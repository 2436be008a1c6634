"""Decode CUDA graphs (worker/cuda_graphs.py) on CPU, with the stand-in graph of tests/conftest.py;
the engine end to end through them is in test_tiny_archs.py."""

from __future__ import annotations

import pytest
import torch

from kiln.config import cuda_graph_capture_sizes
from kiln.errors import InvalidRequestError
from kiln.model.forward_context import AttentionMetadata, get_attn_metadata
from kiln.worker import cuda_graphs


def test_capture_sizes_follow_vllms_rule():
    assert cuda_graph_capture_sizes(None, 256) == (1, 2, 4, *range(8, 257, 8))
    assert cuda_graph_capture_sizes(None, 4) == (1, 2, 4)
    assert cuda_graph_capture_sizes([20], 256) == (1, 2, 4, 8, 16)
    assert cuda_graph_capture_sizes([64, 3, 1, 3], 32) == (1, 3)
    with pytest.raises(InvalidRequestError, match="--cuda-graph-sizes"):
        cuda_graph_capture_sizes([0], 256)


class _SeenMetadata(torch.nn.Module):
    """A 'model' whose hidden row i is what attention would see of row i: (slot, seq len, first block)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        md = get_attn_metadata()
        return torch.stack([md.slot_mapping.float(), md.seq_lens.float(), md.block_tables[:, 0].float()], dim=1)


def _decode_metadata(slots: list[int], seq_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    n = len(slots)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=1, max_seq_len=max(seq_lens), query_lens_cpu=[1] * n, seq_lens_cpu=seq_lens,
    )


def test_padding_rows_touch_only_the_spare_block(stand_in_graphs):
    """After a full batch, a smaller one on the same graph: the rows past it must not keep the earlier
    rows' slots (they would write K/V into live requests' blocks)."""
    block_size, pad_block = 4, 9
    graphs = cuda_graphs.DecodeGraphs(_SeenMetadata(), (2, 4), max_blocks_per_seq=3, pad_block=pad_block,
                                      block_size=block_size, device=torch.device("cpu"), new_graph=stand_in_graphs)
    graphs.capture()
    full = _decode_metadata([5, 13, 22, 30], [6, 2, 7, 11], [[1, 0], [3, 0], [5, 6], [7, 8]])
    assert graphs.graph_size(full) == 4
    ids = torch.zeros(4, dtype=torch.int64)
    assert graphs.run(4, ids, ids, full).tolist() == [[5, 6, 1], [13, 2, 3], [22, 7, 5], [30, 11, 7]]
    small = _decode_metadata([6], [7], [[1, 2]])
    assert graphs.graph_size(small) == 2
    three = _decode_metadata([6, 14, 23], [7, 3, 8], [[1, 2], [3, 4], [5, 6]])
    assert graphs.graph_size(three) == 4
    assert graphs.run(4, ids[:3], ids[:3], three).tolist() == [[6, 7, 1], [14, 3, 3], [23, 8, 5]]
    assert graphs.outputs[4][3].tolist() == [pad_block * block_size, 1, pad_block]
    assert graphs.graph_size(_decode_metadata([1] * 5, [2] * 5, [[0]] * 5)) is None  # larger than any graph
    prefill = _decode_metadata([1, 2], [2, 2], [[0], [0]])
    prefill.max_query_len = 2
    assert graphs.graph_size(prefill) is None
