"""Block pool and block hashing: LRU free queue, ref counts, eviction, chained hashes (no torch)."""

from __future__ import annotations

import pytest

from kiln.core.block_hash import BlockHash, get_hash_fn, hash_block_tokens, update_block_hashes
from kiln.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock
from kiln.core.request import Request, RequestStatus


class _Params:
    min_tokens = 0
    ignore_eos = False
    stop_token_ids: list[int] = []
    prompt_logprobs = None


def _ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def _fake_hash(i: int) -> BlockHash:
    return BlockHash(i, (i,))


def test_free_queue_order_and_middle_removal() -> None:
    """The queue pops head first, removes from the middle by relinking neighbours, and counts."""
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert queue.num_free_blocks == 5
    queue.remove(blocks[2])
    assert blocks[1].next_free_block is blocks[3] and blocks[3].prev_free_block is blocks[1]
    assert blocks[2].prev_free_block is None and blocks[2].next_free_block is None
    assert _ids(queue.get_all_free_blocks()) == [0, 1, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    queue.appendleft(blocks[0])
    assert _ids(queue.get_all_free_blocks()) == [0, 1, 3, 4, 2]
    assert queue.num_free_blocks == 5
    for expected in (0, 1, 3, 4, 2):
        assert queue.popleft().block_id == expected
    with pytest.raises(ValueError):
        queue.popleft()


def test_new_blocks_are_referenced_and_pool_refuses_overdraw() -> None:
    """get_new_blocks hands out ref_cnt=1 blocks from the head; asking for more than free raises."""
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert _ids(blocks) == [0, 1, 2] and all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1 and pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    pool.free_blocks(reversed(blocks))
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_eviction_takes_lru_unreferenced_blocks_only() -> None:
    """Reusing a free cached block drops its hash; referenced blocks are never handed out."""
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks, [_fake_hash(i) for i in range(4)], 0, 4)
    pool.free_blocks([blocks[1]])  # 1 is the least recently freed
    pool.free_blocks([blocks[3]])
    # Blocks 0 and 2 are still referenced: only 1 then 3 may be reused, in that order.
    (first,) = pool.get_new_blocks(1)
    assert first is blocks[1] and first.block_hash is None
    assert pool.get_cached_block(_fake_hash(1)) is None
    assert pool.get_cached_block(_fake_hash(3)) is blocks[3]
    assert pool.get_new_blocks(1) == [blocks[3]]
    assert pool.num_evicted_blocks == 2
    assert pool.get_cached_block(_fake_hash(0)) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 4


def test_touch_revives_free_cached_block() -> None:
    """A hit on a free cached block takes it out of the free queue (O(1)) and references it."""
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [_fake_hash(i) for i in range(3)], 0, 3)
    pool.free_blocks(reversed(blocks))
    assert pool.num_free_blocks == 3
    pool.touch([blocks[1]])
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 2 and pool.num_free_blocks == 2
    assert blocks[1] not in pool.free_block_queue.get_all_free_blocks()
    pool.free_blocks([blocks[1]])
    assert pool.num_free_blocks == 2
    pool.free_blocks([blocks[1]])
    assert pool.num_free_blocks == 3 and pool.get_cached_block(_fake_hash(1)) is blocks[1]


def test_reverse_free_order_evicts_tail_first_and_uncached_blocks_before_cached() -> None:
    """Freed in reverse table order, a sequence's tail is evicted before its prefix; blocks with
    no cached hash are reused before any cached block."""
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.get_new_blocks(5)
    pool.cache_full_blocks(blocks, [_fake_hash(i) for i in range(4)], 0, 3)  # 3 and 4 stay uncached
    pool.free_blocks(reversed(blocks))
    order = _ids(pool.free_block_queue.get_all_free_blocks())
    assert set(order[:2]) == {3, 4}
    assert order[2:] == [2, 1, 0]


def test_new_blocks_come_in_ascending_ids_whatever_the_queue_order() -> None:
    """A finished prompt's cached blocks return tail first (queue order 3, 2, 1, 0); the next
    request takes those very blocks, in ascending order, so its table is one forward run."""
    pool = BlockPool(8, enable_caching=True)
    first = pool.get_new_blocks(4)
    pool.cache_full_blocks(first, [_fake_hash(i) for i in range(4)], 0, 4)
    pool.free_blocks(reversed(first))
    pool.get_new_blocks(4)  # the never-used blocks 4-7 sit at the head
    assert _ids(pool.free_block_queue.get_all_free_blocks()) == [3, 2, 1, 0]
    assert _ids(pool.get_new_blocks(3)) == [1, 2, 3]
    assert _ids(pool.free_block_queue.get_all_free_blocks()) == [0]


def test_duplicate_hash_keeps_first_block() -> None:
    """Two blocks computed with the same content: the map keeps one; the other stays uncached."""
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [_fake_hash(7)], 0, 1)
    pool.cache_full_blocks([b], [_fake_hash(7)], 0, 1)
    assert pool.get_cached_block(_fake_hash(7)) is a and b.block_hash is None
    pool.free_blocks([a, b])
    assert pool.num_free_blocks == 2


def test_caching_disabled_registers_nothing_and_reset_clears() -> None:
    """With caching off nothing is cached; reset_prefix_cache forgets every hash."""
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [_fake_hash(0), _fake_hash(1)], 0, 2)
    assert pool.get_cached_block(_fake_hash(0)) is None
    pool.free_blocks(blocks)
    pool = BlockPool(2, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [_fake_hash(0), _fake_hash(1)], 0, 2)
    pool.reset_prefix_cache()
    assert pool.get_cached_block(_fake_hash(0)) is None and all(b.block_hash is None for b in blocks)
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 2


@pytest.mark.parametrize("algo", ["builtin", "sha256"])
def test_hash_chaining_and_determinism(algo: str) -> None:
    """Equal tokens after a different parent (or extra keys) hash differently; equal inputs equally."""
    hash_fn = get_hash_fn(algo)
    root_a = hash_block_tokens(hash_fn, None, [1, 2])
    root_b = hash_block_tokens(hash_fn, None, [3, 4])
    assert root_a == hash_block_tokens(hash_fn, None, [1, 2])
    child_a = hash_block_tokens(hash_fn, root_a, [5, 6])
    child_b = hash_block_tokens(hash_fn, root_b, [5, 6])
    assert child_a.token_ids == child_b.token_ids and child_a.hash_value != child_b.hash_value
    assert child_a != child_b
    assert hash_block_tokens(hash_fn, root_a, [5, 6], ("lora", 1)) != child_a
    assert isinstance(child_a.hash_value, bytes if algo == "sha256" else int)


@pytest.mark.parametrize("algo", ["builtin", "sha256"])
def test_update_block_hashes_covers_only_full_blocks_incrementally(algo: str) -> None:
    """Hashes exist for full blocks only, grow with output tokens and match a fresh computation."""
    hash_fn = get_hash_fn(algo)
    request = Request("r", list(range(10)), _Params(), eos_token_id=None)
    update_block_hashes(request, 4, hash_fn)
    assert len(request.block_hashes) == 2
    first = list(request.block_hashes)
    request.append_output_token_ids([10, 11])
    update_block_hashes(request, 4, hash_fn)
    assert len(request.block_hashes) == 3 and request.block_hashes[:2] == first
    fresh = Request("s", list(range(12)), _Params(), eos_token_id=None)
    update_block_hashes(fresh, 4, hash_fn)
    assert fresh.block_hashes == request.block_hashes


def test_request_status_helpers() -> None:
    """Finished statuses map to OpenAI finish reasons; the others are not finished."""
    assert not RequestStatus.is_finished(RequestStatus.PREEMPTED)
    assert RequestStatus.finish_reason(RequestStatus.FINISHED_STOPPED) == "stop"
    assert RequestStatus.finish_reason(RequestStatus.FINISHED_LENGTH_CAPPED) == "length"
    assert RequestStatus.finish_reason(RequestStatus.FINISHED_ABORTED) == "abort"
    assert RequestStatus.finish_reason(RequestStatus.RUNNING) is None
    request = Request("r", [1, 2], _Params(), eos_token_id=None)
    request.append_output_token_ids(3)
    assert (request.num_tokens, request.num_output_tokens, request.all_token_ids) == (3, 1, [1, 2, 3])
    assert request.num_cached_tokens == -1 and not request.is_finished
