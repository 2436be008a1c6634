"""The runner's block tables: every running request's KV block ids in a row of one array that
lives as long as the runner.

The scheduler sends each request's block ids once, then only the blocks it appends. Keeping
them in place lets a step gather its rows with one indexing operation instead of rebuilding a
padded table from Python lists every step (the persistent-batch idea of vLLM's model runner).
"""

from __future__ import annotations

import numpy as np


class BlockTables:
    """Rows of block ids, one per request; a row's entries past its length are 0."""

    def __init__(self, num_rows: int, max_blocks_per_row: int) -> None:
        self.table = np.zeros((max(num_rows, 1), max(max_blocks_per_row, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(self.table.shape[0], dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(self.table.shape[0] - 1, -1, -1))

    def add(self, req_id: str, block_ids: list[int]) -> None:
        """A new (or resumed) request's table; one the runner held before is replaced."""
        self.remove(req_id)
        if not self._free_rows:
            self._grow(rows=self.table.shape[0])
        row = self._free_rows.pop()
        self.row_of[req_id] = row
        self.num_blocks[row] = 0
        self.append(req_id, block_ids)

    def append(self, req_id: str, block_ids: list[int]) -> None:
        if not block_ids:
            return
        row = self.row_of[req_id]
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            self._grow(columns=max(end, 2 * self.table.shape[1]) - self.table.shape[1])
        self.table[row, start:end] = block_ids
        self.num_blocks[row] = end

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        self.table[row, : self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
        self._free_rows.append(row)

    def rows(self, req_ids: list[str]) -> np.ndarray:
        return np.fromiter((self.row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), the longest of them] int32: those requests' tables, zero-padded."""
        width = max(int(self.num_blocks[rows].max()), 1) if len(rows) else 1
        return self.table[rows, :width]

    def block_ids(self, req_id: str) -> list[int]:
        row = self.row_of[req_id]
        return self.table[row, : self.num_blocks[row]].tolist()

    def _grow(self, rows: int = 0, columns: int = 0) -> None:
        self.table = np.pad(self.table, ((0, rows), (0, columns)))
        if rows:
            old = self.num_blocks.shape[0]
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros(rows, dtype=np.int64)])
            self._free_rows.extend(range(old + rows - 1, old - 1, -1))
