import pytest

from services.scheduler.kv_cache_manager import KVCacheManager
from services.scheduler.request import Request
from shared.sampling_params import SamplingParams


def req(req_id: str, tokens) -> Request:
    return Request(req_id, list(tokens), SamplingParams())


def run_step(kv: KVCacheManager, r: Request, n: int, hits=()) -> list[int]:
    """Allocate `n` tokens, pretend the step ran, and cache what it made full (as the scheduler does)."""
    ids = kv.allocate_slots(r, n, hits)
    assert ids is not None
    r.num_computed_tokens += len(hits) * kv.block_size + n
    kv.cache_blocks(r, r.num_computed_tokens)
    return ids


def free_ids(kv: KVCacheManager) -> list[int]:
    return kv.pool.free_queue.block_ids()


def test_allocate_and_free_tail_first():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", range(10))
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.usage == pytest.approx(0.3)
    b = req("b", range(100, 104))
    assert kv.allocate_slots(b, 4) == [3]
    kv.free(a)
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 2, 1, 0]
    kv.free(b)
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 2, 1, 0, 3]
    assert kv.usage == 0.0 and kv.block_ids("a") == []


def test_decode_grows_one_block_at_a_boundary():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", range(7))
    assert run_step(kv, a, 7) == [0, 1]
    a.output_token_ids.append(50)  # 8 tokens: the 8th fits block 1
    assert run_step(kv, a, 1) == []
    a.output_token_ids.append(51)  # 9th token needs a new block
    assert run_step(kv, a, 1) == [2]
    assert kv.block_ids("a") == [0, 1, 2]


def test_prefix_hit_shares_block_ids_and_ref_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", range(10))
    assert run_step(kv, a, 10) == [0, 1, 2]  # blocks 0 and 1 are full: cached
    b = req("b", [*range(8), 100, 101, 102])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert run_step(kv, b, 3, hits) == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 11 and kv.prefix_cache_hits == 8
    assert kv.usage == pytest.approx(0.4)

    kv.free(a)  # shared blocks stay in use; only a's own tail is freed
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 2]
    kv.free(b)
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert kv.usage == 0.0


def test_a_hit_never_covers_the_last_prompt_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    run_step(kv, req("a", range(8)), 8)  # exactly 2 full blocks, both cached
    hits, n = kv.get_computed_blocks(req("b", range(8)))
    assert [h.block_id for h in hits] == [0] and n == 4
    hits, n = kv.get_computed_blocks(req("c", range(9)))
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    hits, n = kv.get_computed_blocks(req("d", range(4)))  # one full block: nothing to hit
    assert hits == [] and n == 0


def test_hit_on_freed_blocks_and_lru_eviction_drops_the_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", range(12))
    assert run_step(kv, a, 12) == [0, 1, 2]  # all three full and cached
    kv.free(a)
    assert free_ids(kv) == [3, 4, 5, 2, 1, 0]
    c = req("c", range(100, 112))
    assert kv.allocate_slots(c, 12) == [3, 4, 5]
    # d gets block 2, the least recently freed: a's tail, whose hash goes with it.
    assert kv.allocate_slots(req("d", range(200, 204)), 4) == [2]
    assert kv.pool.blocks[2].block_hash is None and len(kv.pool.cached) == 2
    kv.free(c)
    assert free_ids(kv) == [1, 0, 5, 4, 3]
    b = req("b", range(13))
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    # The hits sit at the head of the free queue: they are taken before fresh blocks are popped.
    assert kv.allocate_slots(b, 5, hits) == [0, 1, 5, 4]
    assert free_ids(kv) == [3]


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", range(9))
    assert run_step(kv, a, 9) == [0, 1, 2]
    kv.free(a)
    assert free_ids(kv) == [2, 1, 0]
    assert kv.allocate_slots(req("c", range(50, 54)), 4) == [2]
    b = req("b", [*range(8), 60, 61, 62, 63])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    # 2 evictable hits + 1 fresh block needed, but only 2 blocks are free.
    assert kv.allocate_slots(b, 4, hits) is None
    assert free_ids(kv) == [1, 0] and kv.block_ids("b") == []
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [0, 0, 1]
    assert kv.pool.get_cached_block(b.block_hashes[0]) is kv.pool.blocks[0]
    assert kv.prefix_cache_queries == 9 + 4  # a failed admission is not counted


def test_output_tokens_are_cached_and_hit_after_preemption():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", range(6))
    run_step(kv, a, 6)
    a.output_token_ids += [40, 41, 42]  # 9 tokens; 40, 41 written by decode steps
    run_step(kv, a, 1)
    run_step(kv, a, 1)
    assert a.num_computed_tokens == 8 and kv.block_ids("a") == [0, 1]
    kv.free(a)  # preempted
    a.num_computed_tokens = 0
    hits, n = kv.get_computed_blocks(a)
    assert [h.block_id for h in hits] == [0, 1] and n == 8


def test_caching_disabled():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=False)
    run_step(kv, req("a", range(9)), 9)
    assert kv.get_computed_blocks(req("b", range(9))) == ([], 0)
    assert kv.prefix_cache_queries == 0 and kv.prefix_cache_hits == 0
