"""KV cache blocks: a fixed pool, an LRU free queue, ref counts and the prefix-cache map.

Pure bookkeeping (no torch): a block is an index into the executors' KV tensors.

All `num_blocks` blocks are usable; block ids are 0..num_blocks-1 and no block is
reserved as a null block (the executors pad with whatever they like, never by writing
into a block the scheduler handed out).

Free queue (doubly linked, so a cached free block that gets a hit is unlinked in O(1)):

    head ⇄ [least recently freed] ⇄ ... ⇄ [most recently freed] ⇄ tail
            ▲ popped for new allocations     ▲ freed blocks appended here

NOTE: a freed block keeps its hash and stays in the hash map until it is popped for a
new allocation (lazy eviction), so a later request can still hit it. A request frees
its blocks tail first, so the tail of a hash chain is evicted before its head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


class BlockHash(NamedTuple):
    """Key of one full block in the prefix cache.

    `value` chains the parent block: hash((parent.value, token_ids, extra_keys)).
    The tokens ride along so that two blocks only match when their tokens are equal,
    not merely their 64-bit hashes (a collision needs equal tokens *and* a colliding
    parent chain). `extra_keys` is a slot for what else changes the KV (LoRA id,
    multimodal inputs); None for now.
    """

    value: int
    token_ids: tuple[int, ...]
    extra_keys: Any = None


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: Any = None) -> BlockHash:
    tokens = tuple(token_ids)
    parent_value = None if parent is None else parent.value
    return BlockHash(hash((parent_value, tokens, extra_keys)), tokens, extra_keys)


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full, computed and cached
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels; every operation is O(1)."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self._len

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def block_ids(self) -> list[int]:
        """Ids from head (next to be evicted) to tail; O(n), for tests and debugging."""
        out = []
        b = self._head.next_free
        while b is not None and b is not self._tail:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        # Prefix cache counters, in tokens (vLLM's prefix_cache_queries / _hits).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached or not: all of them can be handed out."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_cnt > 0)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks from the free queue's head (LRU), evicting their cached hashes."""
        if n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each, in the given order (callers pass a request's tail first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash.

        If another block already holds this hash (two requests computed the same
        content in one step, neither hitting), the first one stays the cached copy and
        this one is simply freed uncached later.
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        block.block_hash = None
        if self.cached.get(h) is block:
            del self.cached[h]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
