"""Block hashes: exact digests, chaining, multi-modal extra keys, partial blocks."""

import os
import subprocess
import sys

import pytest
from omni.cache.block_hash import (
    BlockHash,
    MultiModalPlaceholder,
    block_extra_keys,
    hash_block_tokens,
    request_block_hashes,
)

# Computed once with this implementation; any change to the encoding breaks prefix-cache
# compatibility between processes and versions, and must show up here.
FIRST_BLOCK_HEX = "ff227526c75f3ba476bda34987ff5f50a42bc6abd0dd4dcf3817ca258e88ccc3"
SECOND_BLOCK_HEX = "01943d6721b6297d7a9346d939c0e0512df590eacd1b08bcd9f1ff1b8149e23d"


def test_hash_matches_hard_coded_digest() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4], None)
    assert isinstance(first, bytes) and len(first) == 32
    assert first.hex() == FIRST_BLOCK_HEX
    second = hash_block_tokens(first, [5, 6, 7, 8], (("img-a", -2), "salt"))
    assert second.hex() == SECOND_BLOCK_HEX


def test_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    # String keys are exactly what Python's per-process hash() salting would break.
    code = (
        "from omni.cache.block_hash import hash_block_tokens\n"
        "first = hash_block_tokens(None, [1, 2, 3, 4], None)\n"
        "print(hash_block_tokens(first, [5, 6, 7, 8], (('img-a', -2), 'salt')).hex())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == SECOND_BLOCK_HEX


def test_hash_depends_on_parent_tokens_and_extra_keys() -> None:
    base = hash_block_tokens(None, [1, 2, 3, 4], None)
    variants = {
        base,
        hash_block_tokens(None, [1, 2, 3, 5], None),
        hash_block_tokens(base, [1, 2, 3, 4], None),
        hash_block_tokens(None, [1, 2, 3, 4], (("img-a", 0),)),
        hash_block_tokens(None, [1, 2, 3, 4], (("img-a", 1),)),
        hash_block_tokens(None, [1, 2, 3, 4], (("img-b", 0),)),
        hash_block_tokens(None, [1, 2, 3, 4], ("salt",)),
    }
    assert len(variants) == 7
    assert hash_block_tokens(None, (1, 2, 3, 4), None) == base  # any sequence type


def test_extra_keys_name_overlapping_items_with_block_relative_offsets() -> None:
    items = [
        MultiModalPlaceholder("img-b", offset=10, length=3),  # positions 10..12
        MultiModalPlaceholder("img-a", offset=2, length=5),  # positions 2..6
    ]
    assert block_extra_keys(0, 4, items, None) == (("img-a", 2),)
    # img-a began in the previous block: negative offset.
    assert block_extra_keys(4, 8, items, None) == (("img-a", -2),)
    assert block_extra_keys(8, 12, items, None) == (("img-b", 2),)
    assert block_extra_keys(12, 16, items, None) == (("img-b", -2),)
    assert block_extra_keys(16, 20, items, None) is None
    # Both items in one wide block, ordered by offset whatever the input order.
    assert block_extra_keys(0, 16, items, None) == (("img-a", 2), ("img-b", 10))


def test_cache_salt_goes_into_the_first_block_only() -> None:
    items = [MultiModalPlaceholder("img-a", offset=0, length=6)]
    assert block_extra_keys(0, 4, items, "tenant-1") == (("img-a", 0), "tenant-1")
    assert block_extra_keys(4, 8, items, "tenant-1") == (("img-a", -4),)
    assert block_extra_keys(0, 4, [], "tenant-1") == ("tenant-1",)
    assert block_extra_keys(4, 8, [], "tenant-1") is None
    with pytest.raises(ValueError, match=r"block range \[4, 4\) is empty"):
        block_extra_keys(4, 4, [], None)


def test_chain_hashes_full_blocks_only() -> None:
    tokens = list(range(10))
    chain: list[BlockHash] = []
    result = request_block_hashes(tokens, 4, [], None, chain)
    assert result is chain
    first = hash_block_tokens(None, [0, 1, 2, 3], None)
    second = hash_block_tokens(first, [4, 5, 6, 7], None)
    # 10 tokens, block size 4: the partial third block (8, 9) is not hashed.
    assert chain == [first, second]
    assert request_block_hashes(list(range(3)), 4, [], None, []) == []


def test_chain_extension_hashes_only_new_blocks_and_matches_a_fresh_chain() -> None:
    items = [MultiModalPlaceholder("img-a", offset=3, length=6)]
    tokens = [7, 7, 7, 9, 9, 9, 9, 9, 9, 1, 2, 3, 4, 5]
    chain = request_block_hashes(tokens[:5], 4, items, "s", [])
    assert len(chain) == 1
    first = chain[0]
    request_block_hashes(tokens[:12], 4, items, "s", chain)
    assert chain[0] is first
    assert chain == request_block_hashes(tokens, 4, items, "s", [])
    expected_first = hash_block_tokens(None, [7, 7, 7, 9], (("img-a", 3), "s"))
    expected_second = hash_block_tokens(expected_first, [9, 9, 9, 9], (("img-a", -1),))
    expected_third = hash_block_tokens(expected_second, [9, 1, 2, 3], (("img-a", -5),))
    assert chain == [expected_first, expected_second, expected_third]


def test_chain_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="block_size is 0; it must be >= 1"):
        request_block_hashes([1, 2], 0, [], None, [])
    stale = request_block_hashes([1, 2, 3, 4], 2, [], None, [])
    with pytest.raises(ValueError, match="hash chain has 2 blocks but the 3 tokens fill only 1"):
        request_block_hashes([1, 2, 3], 2, [], None, stale)


def test_placeholder_validation() -> None:
    with pytest.raises(ValueError, match="item_hash must be a non-empty string"):
        MultiModalPlaceholder("", offset=0, length=1)
    with pytest.raises(ValueError, match="'img' has offset -1; it must be >= 0"):
        MultiModalPlaceholder("img", offset=-1, length=1)
    with pytest.raises(ValueError, match="'img' has length 0; it must be >= 1"):
        MultiModalPlaceholder("img", offset=0, length=0)
    assert MultiModalPlaceholder("img", offset=3, length=4).end == 7
