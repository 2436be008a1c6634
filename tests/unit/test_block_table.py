"""BlockTables against the padded table built from Python lists, through adds, appends, removals
(rows reused) and growth past the initial rows and columns."""

from __future__ import annotations

import random

import numpy as np

from kiln.worker.block_table import BlockTables


def padded(lists: list[list[int]]) -> np.ndarray:
    width = max(max((len(ids) for ids in lists), default=1), 1)
    table = np.zeros((len(lists), width), dtype=np.int32)
    for i, ids in enumerate(lists):
        table[i, :len(ids)] = ids
    return table


def test_gather_matches_the_padded_lists_through_a_random_history():
    rng = random.Random(0)
    tables = BlockTables(num_rows=3, max_blocks_per_row=2)
    oracle: dict[str, list[int]] = {}
    next_block = 1
    for step in range(400):
        action = rng.random()
        if action < 0.3 or not oracle:
            req_id = f"r{step}"
            ids = list(range(next_block, next_block + rng.randint(0, 5)))
            next_block += len(ids)
            tables.add(req_id, ids)
            oracle[req_id] = ids
        elif action < 0.8:
            req_id = rng.choice(sorted(oracle))
            ids = list(range(next_block, next_block + rng.randint(0, 3)))
            next_block += len(ids)
            tables.append(req_id, ids)
            oracle[req_id] += ids
        else:
            req_id = rng.choice(sorted(oracle))
            tables.remove(req_id)
            del oracle[req_id]
        if oracle:
            order = rng.sample(sorted(oracle), len(oracle))
            gathered = tables.gather(tables.rows(order))
            assert np.array_equal(gathered, padded([oracle[r] for r in order])), step
            assert all(tables.block_ids(r) == oracle[r] for r in order)
    assert tables.table.shape[0] > 3 and tables.table.shape[1] > 2  # it grew both ways


def test_a_request_added_again_replaces_its_row():
    tables = BlockTables(num_rows=2, max_blocks_per_row=4)
    tables.add("a", [1, 2, 3])
    tables.add("a", [7])  # resumed after preemption
    assert tables.gather(tables.rows(["a"])).tolist() == [[7]]
    tables.add("b", [5])
    assert len(tables.row_of) == 2 and tables.table.shape[0] == 2  # no row leaked
