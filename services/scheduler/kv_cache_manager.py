"""Per-request block tables and prefix caching, on top of the BlockPool.

The scheduler talks to this class only; it never touches the pool's internals.

    request tokens:  | blk 0 full | blk 1 full | blk 2 full | blk 3 partial |
    block hashes:      h0=H(-,b0)   h1=H(h0,b1)  h2=H(h1,b2)   (none: not full)

A lookup walks h0, h1, ... in the hash map and stops at the first miss. It never
covers the last known token: that token must be computed to produce logits, so a
request of exactly N full blocks hits at most N-1 of them.

NOTE: blocks are cached (hashed) by `cache_blocks`, which the scheduler calls once a
step has *returned*, so no request can hit a block whose KV is still being written
by the step in flight, and a failed step never leaves bad blocks in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.block_pool import BlockPool, KVBlock, hash_block
from services.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # How many of a request's leading blocks are already registered in the cache.
        self.num_cached_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self.pool.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.pool.prefix_cache_hits

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks: (blocks, num_computed_tokens). No side effects."""
        if not self.enable_caching or request.num_computed_tokens > 0:
            return [], 0
        # Cap so the last known token is always computed (its logits are needed).
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hits: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` after the request's computed tokens.

        `new_computed_blocks` are prefix-cache hits from `get_computed_blocks`, given on
        a request's first allocation only. `num_lookahead_tokens` more slots are reserved
        beyond them (a speculative draft model writes its drafts' KV there after the step).
        Returns the ids of the blocks appended to the request's table (hits first, then
        fresh ones), or None if there are not enough free blocks, in which case nothing
        changed.
        """
        bs = self.block_size
        held = self.req_to_blocks.get(request.req_id)
        num_held = len(held) if held else 0
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * bs
        num_needed = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, bs)
        num_fresh = max(0, num_needed - num_held - len(new_computed_blocks))
        # A hit on a free (cached) block takes it out of the free queue too.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_fresh + num_evictable_hits > self.pool.num_free_blocks:
            return None

        if held is None:
            held = self.req_to_blocks[request.req_id] = []
            self.num_cached_blocks[request.req_id] = 0
            if self.enable_caching:
                self.pool.prefix_cache_queries += request.num_tokens
                self.pool.prefix_cache_hits += len(new_computed_blocks) * bs
        # Touch the hits before popping fresh blocks so a hit is never evicted for them.
        self.pool.touch(new_computed_blocks)
        held.extend(new_computed_blocks)
        self.num_cached_blocks[request.req_id] += len(new_computed_blocks)
        fresh = self.pool.get_new_blocks(num_fresh)
        held.extend(fresh)
        return [b.block_id for b in new_computed_blocks] + [b.block_id for b in fresh]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks made full by `num_computed_tokens` computed tokens."""
        if not self.enable_caching:
            return
        blocks = self.req_to_blocks.get(request.req_id)
        if blocks is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self.num_cached_blocks[request.req_id]
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.req_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks tail first, so a chain's tail is evicted before its head."""
        blocks = self.req_to_blocks.pop(request.req_id, None)
        self.num_cached_blocks.pop(request.req_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def _block_hashes(self, request: Request, num_blocks: int) -> list:
        """The request's chained block hashes, extended to at least `num_blocks` full blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        num_blocks = min(num_blocks, request.num_tokens // bs)
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes
