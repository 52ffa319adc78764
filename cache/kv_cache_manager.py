"""The scheduler-facing KV cache layer: block ids in, block ids out, None means preempt.

The scheduler never touches `KVBlock` internals. For a waiting request it calls
`get_computed_blocks` (the longest cached prefix) and then
`allocate_slots(request, n, computed_blocks, num_computed)`; for a running request
`allocate_slots(request, n)`. Either returns the newly allocated block ids, or None when the
pool cannot cover them, in which case nothing at all has changed and the scheduler may
preempt someone and retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from omni.cache.block_hash import BlockHash, MultiModalPlaceholder, request_block_hashes
from omni.cache.block_pool import BlockPool, KVBlock


class KVCacheRequest(Protocol):
    """What the manager reads from a request (read-only; the scheduler owns the request)."""

    @property
    def request_id(self) -> str: ...

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt plus the tokens generated so far (grows)."""
        ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is already in the request's blocks."""
        ...

    @property
    def mm_placeholders(self) -> Sequence[MultiModalPlaceholder]: ...

    @property
    def cache_salt(self) -> str | None: ...

    @property
    def num_pending_tokens(self) -> int:
        """Placeholder tokens at the tail of all_token_ids (asynchronous scheduling): their
        ids are not known yet, so the blocks holding them cannot be hashed."""
        ...


def _num_known_tokens(request: KVCacheRequest) -> int:
    return len(request.all_token_ids) - request.num_pending_tokens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size is {block_size}; it must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # The same blocks' ids, kept alongside so the scheduler's per-step lookup for every
        # running request costs nothing.
        self._req_block_ids: dict[str, list[int]] = {}
        # Hash chain of each request's full blocks, extended as tokens arrive; dropped on free.
        self._req_hashes: dict[str, list[BlockHash]] = {}
        # How many of a request's leading blocks are registered in the prefix cache.
        self._req_num_cached: dict[str, int] = {}
        # Prefix-cache metrics, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block ids in logical order ([] if it holds none). The manager's own
        list, which grows as blocks are added: read it, do not change it."""
        return self._req_block_ids.get(request_id, [])

    def probe_prefix(
        self,
        token_ids: Sequence[int],
        mm_placeholders: Sequence[MultiModalPlaceholder] = (),
        cache_salt: str | None = None,
    ) -> int:
        """Tokens of a would-be request's prefix that the cache holds right now (the count
        get_computed_blocks would give), touching neither state nor statistics. The orchestrator
        asks this before encoding: an item wholly inside the hit needs no encoder pass."""
        if not self.enable_prefix_caching:
            return 0
        max_hit_tokens = max(len(token_ids) - 1, 0) // self.block_size * self.block_size
        hashes = request_block_hashes(
            list(token_ids[:max_hit_tokens]), self.block_size, mm_placeholders, cache_salt, []
        )
        hits = 0
        for block_hash in hashes:
            if self.pool.get_cached_block(block_hash) is None:
                break
            hits += 1
        return hits * self.block_size

    def get_computed_blocks(self, request: KVCacheRequest) -> tuple[list[KVBlock], int]:
        """Longest prefix of the request's full blocks found in the cache, and its token count.

        The last token is never served from cache: the model must run on it to produce the
        logits for the next token. So at most `(num_tokens - 1) // block_size` blocks hit; for a
        fresh request num_tokens is the prompt length, and for one resumed after preemption it
        includes the tokens generated before, which are as reusable as the prompt.
        """
        if not self.enable_prefix_caching:
            return [], 0
        token_ids = request.all_token_ids
        hashes = self._block_hashes(request, len(token_ids))
        max_hit_blocks = max(len(token_ids) - 1, 0) // self.block_size
        computed: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            computed.append(block)
        num_computed_tokens = len(computed) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_computed_tokens
        return computed, num_computed_tokens

    def allocate_slots(
        self,
        request: KVCacheRequest,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        Returns the ids of the newly allocated blocks (possibly empty), or None, with no state
        changed, when the free pool cannot cover them.
        """
        request_id = request.request_id
        if not new_computed_blocks and self._covered(request, num_new_tokens):
            return []
        computed = new_computed_blocks or []
        self._check_allocation(request, num_new_tokens, computed, num_new_computed_tokens)
        blocks = self._req_blocks.get(request_id, [])

        num_total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_blocks_needed = _cdiv(num_total_tokens, self.block_size)
        num_new_blocks = max(num_blocks_needed - len(blocks) - len(computed), 0)
        # A cached block with no references sits on the free list; reusing it takes it off,
        # so it cannot also serve as one of the fresh blocks.
        num_computed_on_free_list = sum(1 for block in computed if block.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_computed_on_free_list:
            return None

        # Commit: from here on nothing can fail.
        self.pool.touch(computed)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks = self._req_blocks.setdefault(request_id, [])
        if computed:
            self._req_num_cached[request_id] = len(computed)
        blocks.extend(computed)
        blocks.extend(new_blocks)
        self._req_block_ids.setdefault(request_id, []).extend(
            block.block_id for block in (*computed, *new_blocks)
        )

        if self.enable_prefix_caching:
            # Cache every block that is full once this step's tokens are computed; tokens not
            # yet known (beyond all_token_ids) cannot be hashed.
            num_known_tokens = min(num_total_tokens, _num_known_tokens(request))
            num_full_blocks = num_known_tokens // self.block_size
            hashes = self._block_hashes(request, num_known_tokens)
            num_cached = self._req_num_cached.get(request_id, 0)
            if num_full_blocks > num_cached:
                self.pool.cache_full_blocks(blocks, hashes, num_cached, num_full_blocks)
                self._req_num_cached[request_id] = num_full_blocks
        return [block.block_id for block in new_blocks]

    def _covered(self, request: KVCacheRequest, num_new_tokens: int) -> bool:
        """The decode fast path: the request's blocks already hold the new tokens and no block
        becomes full, so there is nothing to allocate or hash. Most decode steps end here, and
        the scheduler asks once per running request per step."""
        blocks = self._req_blocks.get(request.request_id)
        if blocks is None or num_new_tokens < 0:
            return False
        num_total_tokens = request.num_computed_tokens + num_new_tokens
        if num_total_tokens > len(blocks) * self.block_size:
            return False
        if not self.enable_prefix_caching:
            return True
        num_known_tokens = min(num_total_tokens, _num_known_tokens(request))
        return num_known_tokens // self.block_size <= self._req_num_cached.get(
            request.request_id, 0
        )

    def free(self, request: KVCacheRequest) -> None:
        """Release the request's blocks, tail first so its unshared tail is evicted first.

        Also drops the request's hash chain, so call it for a request aborted while waiting
        too. Calling it again (or for a request that never allocated) does nothing.
        """
        request_id = request.request_id
        blocks = self._req_blocks.pop(request_id, [])
        self._req_block_ids.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        self._req_num_cached.pop(request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def _block_hashes(self, request: KVCacheRequest, num_tokens: int) -> list[BlockHash]:
        """The request's hash chain, extended to cover the full blocks of its first tokens."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_tokens // self.block_size:
            request_block_hashes(
                request.all_token_ids[:num_tokens],
                self.block_size,
                request.mm_placeholders,
                request.cache_salt,
                hashes,
            )
        return hashes

    def _check_allocation(
        self,
        request: KVCacheRequest,
        num_new_tokens: int,
        computed: list[KVBlock],
        num_new_computed_tokens: int,
    ) -> None:
        request_id = request.request_id
        if num_new_tokens < 0:
            raise ValueError(
                f"request {request_id}: num_new_tokens is {num_new_tokens}; it must be >= 0"
            )
        if num_new_computed_tokens != len(computed) * self.block_size:
            raise ValueError(
                f"request {request_id}: num_new_computed_tokens is {num_new_computed_tokens} but "
                f"{len(computed)} computed blocks of {self.block_size} hold "
                f"{len(computed) * self.block_size}"
            )
        if not computed:
            return
        if request_id in self._req_blocks or request.num_computed_tokens != 0:
            raise ValueError(
                f"request {request_id}: prefix-cache blocks can only be added to a request "
                "that holds no blocks and has no computed tokens"
            )
        # The blocks must still hold this request's prefix: an allocation between
        # get_computed_blocks and here may have evicted and reused them.
        hashes = self._block_hashes(request, len(request.all_token_ids))
        for index, block in enumerate(computed):
            if index >= len(hashes) or block.block_hash != hashes[index]:
                raise ValueError(
                    f"request {request_id}: computed block {block.block_id} no longer holds "
                    f"prefix block {index}; call get_computed_blocks again"
                )
