"""BlockPool and FreeBlockQueue: exact block ids, LRU order, ref counts, hash-map eviction."""

import pytest
from omni.cache.block_hash import BlockHash
from omni.cache.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVBlock


def fake_hash(n: int) -> BlockHash:
    return BlockHash(bytes([n]) * 32)


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def test_free_queue_append_remove_popleft() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks[:3])
    assert [b.block_id for b in queue] == [0, 1, 2]
    queue.remove(blocks[1])  # from the middle
    assert [b.block_id for b in queue] == [0, 2]
    assert blocks[1].prev_free is None and blocks[1].next_free is None
    queue.append(blocks[1])
    queue.append_n([blocks[4], blocks[3]])
    assert [b.block_id for b in queue] == [0, 2, 1, 4, 3]
    assert len(queue) == 5
    assert queue.popleft().block_id == 0
    assert [b.block_id for b in queue.popleft_n(2)] == [2, 1]
    queue.remove(blocks[3])  # the tail
    assert [b.block_id for b in queue] == [4]
    assert queue.popleft().block_id == 4
    assert len(queue) == 0
    assert list(queue) == []


def test_free_queue_rejects_misuse() -> None:
    queue = FreeBlockQueue()
    block = KVBlock(7)
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()
    with pytest.raises(ValueError, match="block 7 is not on the free list"):
        queue.remove(block)
    queue.append(block)
    with pytest.raises(ValueError, match="block 7 is already on the free list"):
        queue.append(block)
    with pytest.raises(ValueError, match="asked for 2 free blocks; only 1"):
        queue.popleft_n(2)
    assert [b.block_id for b in queue] == [7]


def test_new_blocks_start_at_one_and_null_block_is_never_handed_out() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.0
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [1, 2, 3]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    assert pool.usage == 0.75
    assert [b.block_id for b in pool.get_new_blocks(1)] == [4]
    assert pool.usage == 1.0
    with pytest.raises(ValueError, match="asked for 1 blocks; only 0 are free"):
        pool.get_new_blocks(1)
    assert pool.null_block.block_id == NULL_BLOCK_ID
    assert pool.null_block.ref_cnt == 0
    with pytest.raises(ValueError, match="null block"):
        pool.touch([pool.null_block])


def test_rejects_pool_without_room_beyond_the_null_block() -> None:
    with pytest.raises(ValueError, match="num_blocks is 1; it must be >= 2"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_failed_get_new_blocks_changes_nothing() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    with pytest.raises(ValueError, match="asked for 4 blocks; only 3 are free"):
        pool.get_new_blocks(4)
    assert free_ids(pool) == [1, 2, 3]


def test_reverse_freed_chain_evicts_its_tail_first() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    chain = pool.get_new_blocks(4)  # ids 1..4; 5 stays free
    hashes = [fake_hash(i) for i in range(4)]
    pool.cache_full_blocks(chain, hashes, num_cached_blocks=0, num_full_blocks=4)
    pool.free_blocks(reversed(chain))
    assert free_ids(pool) == [5, 4, 3, 2, 1]
    assert [b.ref_cnt for b in chain] == [0, 0, 0, 0]

    # Every freed block is still a cache entry until it is reallocated.
    assert [pool.get_cached_block(h) for h in hashes] == chain

    taken = pool.get_new_blocks(2)
    assert [b.block_id for b in taken] == [5, 4]
    # Block 4 held the chain's tail: reallocating it dropped it from the hash map.
    assert pool.get_cached_block(hashes[3]) is None
    assert chain[3].block_hash is None
    assert pool.get_cached_block(hashes[2]) is chain[2]


def test_touching_a_cached_free_block_takes_it_off_the_free_list() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks, [fake_hash(i) for i in range(4)], 0, 4)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 3, 2, 1]

    hit = pool.get_cached_block(fake_hash(2))
    assert hit is blocks[2]
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert free_ids(pool) == [4, 2, 1]
    pool.touch([hit])  # a second sharer: already off the list, just one more reference
    assert hit.ref_cnt == 2
    assert pool.num_free_blocks == 3

    pool.free_blocks([hit])
    assert free_ids(pool) == [4, 2, 1]
    pool.free_blocks([hit])
    # Back at the tail: now the most recently used, evicted last.
    assert free_ids(pool) == [4, 2, 1, 3]
    assert hit.block_hash == fake_hash(2)


def test_freeing_more_than_referenced_is_an_error() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="block 1 freed more times than referenced"):
        pool.free_blocks([block])
    assert free_ids(pool) == [2, 1]


def test_cache_full_blocks_registers_only_the_new_range_and_keeps_first_duplicate() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    first = pool.get_new_blocks(3)
    pool.cache_full_blocks(first, [fake_hash(1), fake_hash(2)], 0, 2)
    assert [b.block_hash for b in first] == [fake_hash(1), fake_hash(2), None]

    # A second sequence computed the same first block concurrently: the map keeps block 1.
    second = pool.get_new_blocks(2)
    pool.cache_full_blocks(second, [fake_hash(1), fake_hash(9)], 0, 2)
    assert pool.get_cached_block(fake_hash(1)) is first[0]
    assert second[0].block_hash is None
    assert pool.get_cached_block(fake_hash(9)) is second[1]

    with pytest.raises(ValueError, match="cannot cache blocks"):
        pool.cache_full_blocks(first, [fake_hash(1)] * 4, 0, 4)
    with pytest.raises(ValueError, match="3 full blocks to cache but only 2 hashes"):
        pool.cache_full_blocks(first, [fake_hash(1), fake_hash(2)], 2, 3)


def test_reset_prefix_cache_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [fake_hash(1), fake_hash(2)], 0, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(fake_hash(1)) is blocks[0]

    pool.free_blocks(reversed(blocks))
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(fake_hash(1)) is None
    assert pool.get_cached_block(fake_hash(2)) is None
    assert [b.block_hash for b in blocks] == [None, None]
    assert free_ids(pool) == [3, 2, 1]


def test_caching_disabled_never_registers_or_finds_hashes() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [fake_hash(1), fake_hash(2)], 0, 2)
    assert [b.block_hash for b in blocks] == [None, None]
    assert pool.get_cached_block(fake_hash(1)) is None
