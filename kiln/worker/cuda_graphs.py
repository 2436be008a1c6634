"""Decode steps replayed from CUDA graphs: one graph per batch size, captured at startup.

A decode step of a small model is a few hundred short kernels; launching them one by one from
Python costs more than running them. A CUDA graph records the launches once and replays them
with one call, so every replay runs the very kernels of the capture, with the same arguments,
on the same memory. Hence:

- inputs live in static buffers (token ids, positions, slot mapping, sequence lengths, block
  tables sized for `max_model_len`); a step copies its batch into their first rows and replays the
  graph of the smallest captured size that holds it;
- rows past the batch are padding: each replay points them at a spare KV block that no request
  owns (the worker allocates it past the pool), with one key, so they write and read only that
  block (rows left from a larger earlier batch would otherwise write into live requests' slots);
- nothing may depend on host-side values of the step: the attention metadata a graph sees is the
  one built at capture time. Only the Triton attention kernel qualifies (it reads lengths and
  block tables from the tensors), so graphs need it; prefill and mixed steps, and batches larger
  than the largest graph, run eagerly.

Graphs share one memory pool and are captured largest first, so the smaller ones reuse its
memory. `new_graph` is a parameter so that the tests can run the same code on CPU with a graph
stand-in that replays by running the function again with the capture-time metadata.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from kiln.model.forward_context import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record `fn`; return its output tensor, which every `replay` rewrites in place."""

    def replay(self) -> None: ...


class CudaGraph:
    """A `torch.cuda.CUDAGraph` in a pool shared by all graphs of the runner."""

    def __init__(self, pool: object) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph, pool=self.pool):
            output = fn()
        return output

    def replay(self) -> None:
        self.graph.replay()


def graph_factory() -> Callable[[], Graph]:
    """New graphs of one shared memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


def supported(device: torch.device) -> bool:
    """Graphs need CUDA and the Triton attention kernel (the torch fallback reads host-side lengths)."""
    if device.type != "cuda":
        return False
    from kiln.model.layers import triton_attention  # Triton: imported on CUDA only

    return triton_attention.available(device)


class DecodeGraphs:
    """Captured decode forwards, `model(input_ids, positions)` -> hidden [rows, hidden_size]."""

    def __init__(self, model: torch.nn.Module, sizes: tuple[int, ...], max_blocks_per_seq: int, pad_block: int,
                 block_size: int, device: torch.device, new_graph: Callable[[], Graph]) -> None:
        self.model = model
        self.sizes = tuple(sorted(sizes))  # ascending: graph_size takes the first that holds a batch
        self.pad_block, self.block_size = pad_block, block_size
        rows = max(sizes)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), pad_block * block_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((rows, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self.new_graph = new_graph
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        for size in reversed(self.sizes):
            forward = self._forward_fn(size)
            forward()  # warm up: Triton compiles and cuBLAS picks its kernels outside the capture
            graph = self.new_graph()
            self.outputs[size] = graph.capture(forward)
            self.graphs[size] = graph
        logger.info("Captured %d CUDA graphs for decode batches of %d-%d rows in %.1f s",
                    len(self.sizes), min(self.sizes), max(self.sizes), time.perf_counter() - start)

    def _forward_fn(self, size: int) -> Callable[[], torch.Tensor]:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size, query_lens_cpu=[1] * size,
            seq_lens_cpu=[1] * size,
        )

        def forward() -> torch.Tensor:
            metadata.plans.clear()  # what attention derives per step is recorded, not cached across steps
            with forward_context(metadata):
                return self.model(self.input_ids[:size], self.positions[:size])

        return forward

    def graph_size(self, metadata: AttentionMetadata) -> int | None:
        """The captured size for this step, or None when it must run eagerly (not all decode, too big)."""
        num_seqs = metadata.num_seqs
        if num_seqs > self.sizes[-1] or metadata.max_query_len != 1:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    @torch.inference_mode()
    def run(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of `size` on this step's batch; hidden [num_rows, hidden_size], a view of
        the graph's output that the next replay overwrites."""
        n, width = metadata.num_seqs, metadata.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        if n < size:
            self.slot_mapping[n:size].fill_(self.pad_block * self.block_size)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size, 0].fill_(self.pad_block)
        self.graphs[size].replay()
        return self.outputs[size][:n]
