import pytest

from services.scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block


def test_free_queue_append_pop_and_remove_from_middle():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    assert q.block_ids() == [0, 1, 3, 4] and len(q) == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 2, 0]
    q.remove(blocks[0])  # the tail
    q.remove(blocks[1])  # the head
    assert q.block_ids() == [3, 4, 2] and len(q) == 3
    with pytest.raises(ValueError):
        q.remove(blocks[1])  # not in the queue any more
    for _ in range(3):
        q.popleft()
    with pytest.raises(IndexError):
        q.popleft()
    assert len(q) == 0 and q.block_ids() == []


def test_allocation_order_is_by_id_and_no_block_is_reserved():
    pool = BlockPool(4)
    assert [b.block_id for b in pool.get_new_blocks(4)] == [0, 1, 2, 3]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_free_appends_in_given_order_and_lru_block_is_reused_first():
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # 0 1 2
    b = pool.get_new_blocks(2)  # 3 4
    assert pool.free_queue.block_ids() == [5]
    pool.free_blocks(reversed(a))
    assert pool.free_queue.block_ids() == [5, 2, 1, 0]
    pool.free_blocks(reversed(b))
    assert pool.free_queue.block_ids() == [5, 2, 1, 0, 4, 3]
    assert [blk.block_id for blk in pool.get_new_blocks(2)] == [5, 2]
    assert pool.usage == pytest.approx(2 / 6)


def test_ref_counts_and_double_free():
    pool = BlockPool(3)
    [blk] = pool.get_new_blocks(1)
    pool.touch([blk])
    assert blk.ref_cnt == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 1 and pool.num_free_blocks == 2  # still in use
    pool.free_blocks([blk])
    assert blk.ref_cnt == 0 and pool.free_queue.block_ids() == [1, 2, 0]
    with pytest.raises(ValueError, match="double free"):
        pool.free_blocks([blk])


def test_touch_pulls_a_cached_free_block_out_of_the_middle():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    h = hash_block(None, [1, 2])
    pool.cache_block(blocks[1], h)
    pool.free_blocks(reversed(blocks))
    assert pool.free_queue.block_ids() == [3, 2, 1, 0]
    hit = pool.get_cached_block(h)
    assert hit is blocks[1]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.free_queue.block_ids() == [3, 2, 0]
    assert pool.usage == pytest.approx(1 / 4)


def test_lazy_eviction_drops_the_hash_only_when_the_block_is_reused():
    pool = BlockPool(2)
    x, y = pool.get_new_blocks(2)
    hx, hy = hash_block(None, [1]), hash_block(None, [2])
    pool.cache_block(x, hx)
    pool.cache_block(y, hy)
    pool.free_blocks([x])  # x freed first: least recently freed
    pool.free_blocks([y])
    assert pool.get_cached_block(hx) is x and pool.get_cached_block(hy) is y  # still cached while free
    [reused] = pool.get_new_blocks(1)
    assert reused is x and x.block_hash is None and x.ref_cnt == 1
    assert pool.get_cached_block(hx) is None
    assert pool.get_cached_block(hy) is y


def test_a_hash_already_cached_keeps_its_first_block():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = hash_block(None, [7, 7])
    pool.cache_block(a, h)
    pool.cache_block(b, h)  # same content computed twice in one step
    assert pool.get_cached_block(h) is a and b.block_hash is None
    pool.free_blocks([a, b])
    pool.get_new_blocks(1)  # evicts a
    assert pool.get_cached_block(h) is None


def test_chained_hash_depends_on_parent_tokens_and_extra_keys():
    h0 = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == h0
    assert hash_block(h0, [3, 4]) == hash_block(hash_block(None, [1, 2]), (3, 4))
    assert hash_block(h0, [3, 4]) != hash_block(hash_block(None, [1, 9]), [3, 4])
    assert hash_block(None, [1, 2], extra_keys=("lora", 1)) != h0


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    [a] = pool.get_new_blocks(1)
    h = hash_block(None, [1])
    pool.cache_block(a, h)
    assert a.block_hash is None and pool.get_cached_block(h) is None


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2)
    [a] = pool.get_new_blocks(1)
    pool.cache_block(a, hash_block(None, [1]))
    assert not pool.reset_prefix_cache()
    pool.free_blocks([a])
    assert pool.reset_prefix_cache()
    assert pool.cached == {} and a.block_hash is None
