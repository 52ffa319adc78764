"""KVCacheManager: exact block ids, prefix sharing, multi-modal isolation, None-means-preempt."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from omni.cache.block_hash import MultiModalPlaceholder, request_block_hashes
from omni.cache.kv_cache_manager import KVCacheManager

BLOCK_SIZE = 4


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    mm_placeholders: Sequence[MultiModalPlaceholder] = ()
    cache_salt: str | None = None
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.all_token_ids)


def admit(manager: KVCacheManager, request: FakeRequest) -> list[int] | None:
    """What the scheduler does for a waiting request: whole prompt in one step."""
    computed, num_computed = manager.get_computed_blocks(request)
    num_new = len(request.all_token_ids) - num_computed
    new_ids = manager.allocate_slots(request, num_new, computed, num_computed)
    if new_ids is not None:
        request.num_computed_tokens = num_computed
    return new_ids


def finish_step(request: FakeRequest, num_new: int, sampled: int | None = None) -> None:
    """What the engine does after a forward pass: the tokens are computed, maybe one sampled."""
    request.num_computed_tokens += num_new
    if sampled is not None:
        request.all_token_ids.append(sampled)


def pool_ref_counts(manager: KVCacheManager) -> list[int]:
    return [block.ref_cnt for block in manager.pool.blocks]


def test_fresh_request_gets_blocks_from_one_and_free_returns_them() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(10)))
    assert manager.get_computed_blocks(request) == ([], 0)
    assert manager.allocate_slots(request, 10) == [1, 2, 3]
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.num_free_blocks == 6
    assert manager.usage == pytest.approx(3 / 9)

    manager.free(request)
    assert manager.get_block_ids("a") == []
    assert manager.num_free_blocks == 9
    assert manager.usage == 0.0
    manager.free(request)  # idempotent
    manager.free(FakeRequest("never-allocated", [1]))
    assert manager.num_free_blocks == 9
    # Freed in reverse: the partial tail block 3 is evicted first.
    assert [b.block_id for b in manager.pool.free_queue] == [4, 5, 6, 7, 8, 9, 3, 2, 1]


def test_two_requests_share_a_prefix_with_ref_counts() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefix = list(range(100, 116))  # four full blocks
    first = FakeRequest("a", [*prefix, 1])
    second = FakeRequest("b", [*prefix, 2, 3])
    assert admit(manager, first) == [1, 2, 3, 4, 5]

    computed, num_computed = manager.get_computed_blocks(second)
    assert [b.block_id for b in computed] == [1, 2, 3, 4]
    assert num_computed == 16
    assert manager.allocate_slots(second, 2, computed, num_computed) == [6]
    assert manager.get_block_ids("b") == [1, 2, 3, 4, 6]
    assert pool_ref_counts(manager)[:7] == [0, 2, 2, 2, 2, 1, 1]
    assert manager.num_free_blocks == 3

    manager.free(first)
    assert pool_ref_counts(manager)[:7] == [0, 1, 1, 1, 1, 0, 1]
    assert manager.num_free_blocks == 4
    manager.free(second)
    assert pool_ref_counts(manager) == [0] * 10
    assert manager.num_free_blocks == 9
    assert manager.prefix_cache_queries == 17 + 18
    assert manager.prefix_cache_hits == 16


def test_last_prompt_token_is_always_recomputed() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    prompt = list(range(12))  # exactly three blocks
    assert admit(manager, FakeRequest("a", list(prompt))) == [1, 2, 3]
    # All three blocks are full and cached ...
    assert all(manager.pool.blocks[i].block_hash is not None for i in (1, 2, 3))
    # ... but an identical prompt hits only two: the model must run on token 11.
    again = FakeRequest("b", list(prompt))
    computed, num_computed = manager.get_computed_blocks(again)
    assert [b.block_id for b in computed] == [1, 2]
    assert num_computed == 8
    assert manager.allocate_slots(again, 4, computed, num_computed) == [4]
    assert manager.get_block_ids("b") == [1, 2, 4]
    assert manager.prefix_cache_queries == 24
    assert manager.prefix_cache_hits == 8
    # A one-token prompt can never hit.
    assert manager.get_computed_blocks(FakeRequest("c", [0])) == ([], 0)


def _hits(manager: KVCacheManager, request: FakeRequest) -> list[int]:
    return [b.block_id for b in manager.get_computed_blocks(request)[0]]


PLACEHOLDER = 99
MM_TOKENS = [1, 2, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER, 3, 4, 5]


def _mm_request(
    request_id: str, item_hash: str = "img-a", offset: int = 2, salt: str | None = None
) -> FakeRequest:
    return FakeRequest(
        request_id,
        list(MM_TOKENS),
        mm_placeholders=[MultiModalPlaceholder(item_hash, offset=offset, length=4)],
        cache_salt=salt,
    )


def test_same_tokens_and_same_item_share_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    assert admit(manager, _mm_request("a")) == [1, 2, 3]
    assert _hits(manager, _mm_request("b")) == [1, 2]


@pytest.mark.parametrize(
    "other",
    [
        _mm_request("b", item_hash="img-b"),  # another image behind the same placeholders
        _mm_request("b", offset=3),  # the item starts one position later
        _mm_request("b", salt="tenant-2"),  # another tenant
    ],
    ids=["item-hash", "offset", "cache-salt"],
)
def test_different_mm_item_or_salt_never_shares_a_block(other: FakeRequest) -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    assert admit(manager, _mm_request("a")) == [1, 2, 3]
    assert _hits(manager, other) == []
    assert admit(manager, other) == [4, 5, 6]
    assert pool_ref_counts(manager)[:7] == [0, 1, 1, 1, 1, 1, 1]


def test_salted_requests_share_only_with_the_same_salt() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    tokens = list(range(9))
    assert admit(manager, FakeRequest("a", list(tokens), cache_salt="t1")) == [1, 2, 3]
    assert _hits(manager, FakeRequest("b", list(tokens), cache_salt="t1")) == [1, 2]
    assert _hits(manager, FakeRequest("c", list(tokens))) == []


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    first = FakeRequest("a", list(range(9)))
    assert admit(manager, first) == [1, 2, 3]
    manager.free(first)
    free_order = [b.block_id for b in manager.pool.free_queue]
    assert free_order == [4, 3, 2, 1]

    # 17 tokens need 5 blocks: 2 are cache hits (blocks 1 and 2, free but cached), so 3 fresh
    # ones are needed. Four blocks are free, but two of them are the hits themselves.
    big = FakeRequest("b", [*range(8), *range(50, 59)])
    computed, num_computed = manager.get_computed_blocks(big)
    assert [b.block_id for b in computed] == [1, 2]
    hashes_before = [b.block_hash for b in manager.pool.blocks]
    assert manager.allocate_slots(big, 9, computed, num_computed) is None
    assert [b.block_id for b in manager.pool.free_queue] == free_order
    assert pool_ref_counts(manager) == [0] * 5
    assert [b.block_hash for b in manager.pool.blocks] == hashes_before
    assert manager.get_block_ids("b") == []

    # 16 tokens need 4 blocks: the 2 hits plus 2 fresh ones, which fits exactly.
    fits = FakeRequest("c", [*range(8), *range(50, 58)])
    computed, num_computed = manager.get_computed_blocks(fits)
    assert manager.allocate_slots(fits, 8, computed, num_computed) == [4, 3]
    assert manager.get_block_ids("c") == [1, 2, 4, 3]
    assert manager.num_free_blocks == 0
    assert manager.allocate_slots(FakeRequest("d", [1]), 1) is None


def test_running_request_grows_and_generated_blocks_are_cached() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(7)))
    assert admit(manager, request) == [1, 2]
    # Partial blocks are never hashed: block 2 holds only 3 of 4 tokens.
    assert manager.pool.blocks[1].block_hash is not None
    assert manager.pool.blocks[2].block_hash is None
    finish_step(request, 7, sampled=70)

    # Decode: token 70 fills block 2, no new block needed, and block 2 is now cached.
    assert manager.allocate_slots(request, 1) == []
    expected = request_block_hashes(request.all_token_ids, BLOCK_SIZE, [], None, [])
    assert [manager.pool.blocks[i].block_hash for i in (1, 2)] == expected
    finish_step(request, 1, sampled=71)
    assert manager.allocate_slots(request, 1) == [3]
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.pool.blocks[3].block_hash is None

    # The generated token's block serves a later request whose prompt repeats it.
    follower = FakeRequest("b", [*range(7), 70, 5])
    assert _hits(manager, follower) == [1, 2]


def test_chunked_prefill_caches_each_chunk_s_full_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(10)))
    assert manager.allocate_slots(request, 5) == [1, 2]
    assert [manager.pool.blocks[i].block_hash is not None for i in (1, 2)] == [True, False]
    finish_step(request, 5)
    assert manager.allocate_slots(request, 5) == [3]
    assert [manager.pool.blocks[i].block_hash is not None for i in (1, 2, 3)] == [
        True,
        True,
        False,
    ]


def test_reallocated_cached_block_is_no_longer_a_hit() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = FakeRequest("a", list(range(9)))
    assert admit(manager, first) == [1, 2, 3]
    manager.free(first)
    # Free order [3, 2, 1]: another request takes two blocks, evicting the chain tail (2)
    # and the uncached partial block (3).
    assert admit(manager, FakeRequest("b", list(range(50, 56)))) == [3, 2]
    assert _hits(manager, FakeRequest("c", list(range(9)))) == [1]


def test_stale_computed_blocks_are_rejected() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = FakeRequest("a", list(range(9)))
    admit(manager, first)
    manager.free(first)
    late = FakeRequest("c", list(range(9)))
    computed, num_computed = manager.get_computed_blocks(late)
    assert [b.block_id for b in computed] == [1, 2]
    # Something else allocates in between and evicts block 2.
    admit(manager, FakeRequest("b", list(range(50, 56))))
    with pytest.raises(ValueError, match="computed block 2 no longer holds prefix block 1"):
        manager.allocate_slots(late, 1, computed, num_computed)
    assert manager.get_block_ids("c") == []


def test_allocate_slots_rejects_inconsistent_arguments() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = FakeRequest("a", list(range(9)))
    admit(manager, first)
    other = FakeRequest("b", list(range(9)))
    computed, num_computed = manager.get_computed_blocks(other)
    with pytest.raises(ValueError, match="num_new_tokens is -1; it must be >= 0"):
        manager.allocate_slots(other, -1)
    with pytest.raises(ValueError, match="num_new_computed_tokens is 4 but 2 computed blocks"):
        manager.allocate_slots(other, 1, computed, 4)
    with pytest.raises(ValueError, match="only be added to a request that holds no blocks"):
        manager.allocate_slots(first, 1, computed, num_computed)
    with pytest.raises(ValueError, match="block_size is 0"):
        KVCacheManager(num_blocks=10, block_size=0)
    assert pool_ref_counts(manager)[:4] == [0, 1, 1, 1]


def test_prefix_caching_disabled_never_shares() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    assert admit(manager, FakeRequest("a", list(range(9)))) == [1, 2, 3]
    assert all(block.block_hash is None for block in manager.pool.blocks)
    assert manager.get_computed_blocks(FakeRequest("b", list(range(9)))) == ([], 0)
    assert admit(manager, FakeRequest("b", list(range(9)))) == [4, 5, 6]
    assert manager.prefix_cache_queries == 0


def test_reset_prefix_cache_only_when_idle() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(9)))
    admit(manager, request)
    assert manager.reset_prefix_cache() is False
    manager.free(request)
    assert manager.reset_prefix_cache() is True
    assert _hits(manager, FakeRequest("b", list(range(9)))) == []


def test_preempted_request_resumes_from_its_cached_prompt_and_output() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(7)))
    assert admit(manager, request) == [1, 2]
    finish_step(request, 7, sampled=70)
    assert manager.allocate_slots(request, 1) == []
    finish_step(request, 1, sampled=71)

    # Recompute preemption: blocks freed, progress reset, 9 tokens now (7 prompt + 2 output).
    manager.free(request)
    request.num_computed_tokens = 0
    assert manager.num_free_blocks == 9
    computed, num_computed = manager.get_computed_blocks(request)
    # Both full blocks hit, including the one completed by generated token 70; only the
    # last token (71) is left to compute.
    assert [b.block_id for b in computed] == [1, 2]
    assert num_computed == 8
    assert manager.allocate_slots(request, 1, computed, num_computed) == [3]
    assert manager.get_block_ids("a") == [1, 2, 3]


def test_a_pending_tail_token_is_never_hashed() -> None:
    # Asynchronous scheduling: the token a launched step samples is a placeholder at the tail
    # until it is read back, so the block it completes stays unhashed until then.
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = FakeRequest("r", list(range(1, 8)))  # 7 prompt tokens
    admit(manager, request)
    request.num_computed_tokens = 7
    request.all_token_ids.append(-1)
    request.num_pending_tokens = 1
    assert manager.allocate_slots(request, 1) == []
    probe = FakeRequest("probe", [*range(1, 8), 42, 99])
    assert manager.get_computed_blocks(probe)[1] == 4  # only the first, all-known block
    request.all_token_ids[-1] = 42
    request.num_pending_tokens = 0
    request.num_computed_tokens = 8
    request.all_token_ids.append(-1)
    request.num_pending_tokens = 1
    manager.allocate_slots(request, 1)  # now block 2 (tokens 5..8) is known and hashed
    assert manager.get_computed_blocks(probe)[1] == 8
