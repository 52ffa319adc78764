"""The pool of physical KV blocks: ref counts, an LRU free list and the prefix-cache map.

The pool knows nothing about requests. Callers hand it blocks and hashes; it keeps three
invariants:

* a block is on the free list exactly when its ref count is 0;
* a block with a hash is in the hash map under that hash, whether in use or free, so a
  freed block can still be found and reused until it is reallocated (that is the prefix
  cache: free blocks double as cache entries);
* block 0 is the null block: never on the free list, never handed out. The model runner
  points padded rows of a CUDA-graph batch at it.

Eviction is LRU by free-list position: new blocks are popped from the head, freed blocks are
appended to the tail. Callers free a request's blocks in reverse order, so the tail of a
prefix chain (least likely to be shared) reaches the head, and is evicted, first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from omni.cache.block_hash import BlockHash

NULL_BLOCK_ID = 0


class KVBlock:
    """One physical KV block. Mutable bookkeeping owned by the pool."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set while the block is full and registered in the prefix cache.
        self.block_hash: BlockHash | None = None
        # Free-list links; both None while the block is not on the free list.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        block_hash = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, in eviction order (head is evicted first).

    Links live on the blocks themselves, so removing a cached free block that a request is
    about to reuse is O(1), which a deque cannot do. Two sentinel nodes remove the empty-list
    special cases.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        """Take the block at the head (the least recently freed)."""
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free blocks left to pop")
        self.remove(first)
        return first

    def popleft_n(self, n: int) -> list[KVBlock]:
        if n > self._len:
            raise ValueError(f"asked for {n} free blocks; only {self._len} are free")
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVBlock) -> None:
        """Unlink a block from anywhere in the list."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not on the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def append(self, block: KVBlock) -> None:
        """Put a block at the tail (the last to be evicted)."""
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already on the free list")
        last = self._tail.prev_free
        assert last is not None  # the head sentinel at least
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def append_n(self, blocks: Iterable[KVBlock]) -> None:
        for block in blocks:
            self.append(block)


class BlockPool:
    """Fixed set of `num_blocks` KV blocks; block 0 is the reserved null block."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks is {num_blocks}; it must be >= 2 (block 0 is the reserved null block)"
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not: all of them can be (re)allocated."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some request, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks from the LRU head, evicting their old cache entries; ref count 1."""
        if n < 0:
            raise ValueError(f"asked for {n} blocks; the count must be >= 0")
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks; only {self.num_free_blocks} are free")
        blocks = self.free_queue.popleft_n(n)
        for block in blocks:
            self._evict_cached(block)
            block.ref_cnt = 1
        return blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        """The block holding the prefix named by `block_hash`, if still cached."""
        if not self.enable_caching:
            return None
        return self._cached.get(block_hash)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Register `blocks[num_cached_blocks:num_full_blocks]` under the matching hashes.

        `blocks` and `block_hashes` are one sequence's blocks and hash chain, in order; the
        first `num_cached_blocks` are already registered. If another block already holds a
        hash (two requests prefilled the same content at once), the newcomer stays
        unregistered and is simply freed later: the map keeps one block per hash.
        """
        if not self.enable_caching:
            return
        if not 0 <= num_cached_blocks <= num_full_blocks <= len(blocks):
            raise ValueError(
                f"cannot cache blocks [{num_cached_blocks}, {num_full_blocks}) of a sequence "
                f"with {len(blocks)} blocks"
            )
        if num_full_blocks > len(block_hashes):
            raise ValueError(
                f"{num_full_blocks} full blocks to cache but only {len(block_hashes)} hashes"
            )
        for index in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[index], block_hashes[index]
            if block.block_hash is not None or block is self.null_block:
                continue
            if block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the cache; free ones leave the free list."""
        for block in blocks:
            if block is self.null_block:
                raise ValueError("the null block (0) cannot be referenced by a request")
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; those reaching 0 join the free-list tail.

        Pass the blocks in the order they should become evictable: a request's blocks in
        reverse, so its chain tail is evicted first and its shared prefix last.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more times than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use: the cache
        manager remembers which of a running request's blocks are registered, and that record
        would go stale."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    def _evict_cached(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
