"""Content hashes of full KV blocks, chained so a hash names a whole prefix.

A block's hash covers its parent's hash, its token ids and its *extra keys*: the multi-modal
items whose placeholder tokens fall inside the block and the request's cache salt. Two
requests may share a KV block only when the whole prefix up to and including that block is
the same in all three, so the same placeholder tokens standing for different images (or the
same image at a different position) never share KV.

Hashes must agree across processes (an encoder replica, the scheduler and a restarted stage
all compute them), so they are blake3 over a msgpack encoding: no Python `hash()`, which is
salted per process, and no pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import blake3
import msgpack

# 32 raw bytes of blake3. A NewType rather than a class keeps hashes cheap dict keys.
BlockHash = NewType("BlockHash", bytes)

# One extra key is either a `(item_hash, offset_of_item_relative_to_block_start)` pair or the
# request's cache salt (a plain string, only in the first block).
ExtraKey = tuple[str, int] | str


@dataclass(frozen=True)
class MultiModalPlaceholder:
    """Where one multi-modal item sits in a prompt.

    The item's placeholder tokens occupy prompt positions `offset .. offset + length - 1`;
    `item_hash` is the item's content hash (the same key as the encoder-output cache).
    """

    item_hash: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        if not self.item_hash:
            raise ValueError("multi-modal placeholder item_hash must be a non-empty string")
        if self.offset < 0:
            raise ValueError(
                f"multi-modal item {self.item_hash!r} has offset {self.offset}; it must be >= 0"
            )
        if self.length < 1:
            raise ValueError(
                f"multi-modal item {self.item_hash!r} has length {self.length}; it must be >= 1"
            )

    @property
    def end(self) -> int:
        """One past the item's last placeholder position."""
        return self.offset + self.length


def hash_block_tokens(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[ExtraKey, ...] | None,
) -> BlockHash:
    """Hash one block given its parent's hash (None for a request's first block).

    msgpack encodes ints, strings, bytes, None and tuples (as arrays) one way only, so the
    digest depends on the values and nothing else.
    """
    payload = msgpack.packb((parent, tuple(token_ids), extra_keys), use_bin_type=True)
    return BlockHash(blake3.blake3(payload).digest())


def block_extra_keys(
    start: int,
    end: int,
    mm_items: Sequence[MultiModalPlaceholder],
    cache_salt: str | None,
) -> tuple[ExtraKey, ...] | None:
    """Extra keys of the block covering token positions `[start, end)`, or None if it has none.

    Each item overlapping the block contributes `(item_hash, item.offset - start)`: the
    relative offset tells apart the same image placed at different positions, and is negative
    when the item began in an earlier block. The cache salt goes into the first block only;
    every later hash chains through it, which is enough to separate the whole request.
    """
    if start < 0 or end <= start:
        raise ValueError(f"block range [{start}, {end}) is empty or negative")
    keys: list[ExtraKey] = [
        (item.item_hash, item.offset - start)
        for item in sorted(mm_items, key=lambda item: item.offset)
        if item.offset < end and item.end > start
    ]
    if start == 0 and cache_salt is not None:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def request_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    mm_items: Sequence[MultiModalPlaceholder],
    cache_salt: str | None,
    existing: list[BlockHash],
) -> list[BlockHash]:
    """Extend a request's hash chain with the blocks of `token_ids` that are now full.

    `existing` holds the hashes already computed for the first `len(existing)` blocks; the
    hashes of the newly full blocks are appended to it in place, and the same list is
    returned. A trailing partial block is never hashed: its tokens may still change meaning
    (more tokens will follow), and only full blocks can be shared.
    """
    if block_size < 1:
        raise ValueError(f"block_size is {block_size}; it must be >= 1")
    num_full_blocks = len(token_ids) // block_size
    if len(existing) > num_full_blocks:
        raise ValueError(
            f"hash chain has {len(existing)} blocks but the {len(token_ids)} tokens fill only "
            f"{num_full_blocks} blocks of {block_size}"
        )
    parent = existing[-1] if existing else None
    for block_index in range(len(existing), num_full_blocks):
        start = block_index * block_size
        end = start + block_size
        extra_keys = (
            block_extra_keys(start, end, mm_items, cache_salt)
            if mm_items or cache_salt is not None
            else None
        )
        parent = hash_block_tokens(parent, token_ids[start:end], extra_keys)
        existing.append(parent)
    return existing
