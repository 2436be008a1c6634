"""Which KV blocks each request holds: prefix-cache lookup, allocation, caching, freeing.

Owns the request -> blocks tables and the prefix cache statistics; the `BlockPool` below it
owns the blocks. The scheduler is its only caller. A block's hash enters the cache only after
every one of its tokens has been computed (`cache_computed_blocks`), never at allocation, so a
preempted or aborted request cannot leave hashes of blocks whose KV was never written.
Pure Python: must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.core.block_hash import get_hash_fn, update_block_hashes
from kiln.core.block_pool import BlockPool, KVCacheBlock
from kiln.core.stats import PrefixCacheStats

if TYPE_CHECKING:
    from kiln.core.request import Request


class KVCacheManager:
    """Block tables of all live requests over one `BlockPool`.

    Invariant: the blocks of `req_to_blocks[id]` cover at least the request's computed tokens,
    and its first `num_cached_blocks[id]` blocks are in the prefix cache (or were skipped as
    duplicates).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, hash_algo: str = "builtin") -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_fn = get_hash_fn(hash_algo)
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def update_block_hashes(self, request: Request) -> None:
        """Hash the request's newly full blocks (no-op without prefix caching)."""
        if self.enable_caching:
            update_block_hashes(request, self.block_size, self.hash_fn)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached blocks matching the request's leading full blocks.

        Returns (blocks, num_hit_tokens). Never covers every token: the last one is always
        recomputed to produce logits. No hits when caching is off or the request wants prompt
        logprobs (every prompt position must then go through the model).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self.update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hit_blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hit_blocks.append(block)
        num_hit_tokens = len(hit_blocks) * self.block_size
        stats = self.prefix_cache_stats
        stats.requests += 1
        stats.queries += request.num_tokens
        stats.hits += num_hit_tokens
        return hit_blocks, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Make the request's table cover started (computed or in flight) + new-computed + `num_new_tokens` tokens.

        `new_computed_blocks` are prefix hits from `get_computed_blocks` (only at admission).
        Returns the ids of the blocks appended to the table by this call (hits first, then fresh
        blocks; possibly []), or None, changing nothing, when too few blocks are free.
        """
        if not new_computed_blocks:
            req_blocks = self.req_to_blocks.get(request.request_id)
            if req_blocks and request.num_started_tokens + num_new_tokens <= len(req_blocks) * self.block_size:
                return []  # most decode steps: the last block still has room
        new_computed_blocks = new_computed_blocks or []
        assert num_new_computed_tokens == len(new_computed_blocks) * self.block_size, "hits must be full blocks"
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        assert not new_computed_blocks or not req_blocks, "prefix hits are only taken at admission"
        num_tokens = request.num_started_tokens + num_new_computed_tokens + num_new_tokens
        num_required_blocks = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(req_blocks) - len(new_computed_blocks))
        # Hits on free blocks leave the free queue too, so they count against what is free.
        num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            if not req_blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.block_pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        if new_computed_blocks:
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        return [block.block_id for block in new_computed_blocks + new_blocks]

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's blocks whose tokens are now all computed in the prefix cache.

        The scheduler calls this after a step advanced `num_computed_tokens`.
        """
        if not self.enable_caching:
            return
        self.update_block_hashes(request)
        req_id = request.request_id
        num_full_blocks = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        num_cached = self.num_cached_blocks.get(req_id, 0)
        if num_full_blocks <= num_cached:
            return
        self.block_pool.cache_full_blocks(self.req_to_blocks[req_id], request.block_hashes, num_cached, num_full_blocks)
        self.num_cached_blocks[req_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Drop the request's references; its cached blocks stay reusable until evicted (tail first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request.request_id, [])]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after weights change)."""
        self.block_pool.reset_prefix_cache()
