"""Embeddings for the media items of the LLM stage's requests, fetched only when needed.

A request's item needs no embedding when its placeholder run lies inside the prefix-cache hit
(its KV is cached); otherwise the embedding comes with the request, from this stage's
encoder-output cache (keyed by the item's content hash), or from an encoder stage, asked
through a peer call that carries the item's encoder request as the orchestrator wrote it.

    fetcher = ItemFetcher(cache, new_call_id)
    fetcher.admit(request_id, items, tensors, needed)   # -> embeddings now, or None: wait
    calls, withdrawn = fetcher.take_calls()             # PeerCalls to send, and to abort
    fetcher.on_reply(reply)                             # answers, as they come
    ready, failed = fetcher.take_finished()             # -> the engine, or errors

One encoder pass serves every request waiting for the same item (by hash), and an item whose
encoder replica died or left is asked again, up to `MAX_ATTEMPTS` times in all. The fetcher
owns no engine: the worker asks it for items at admission and again for a request whose
skipped items turned out to be needed after all (its blocks were evicted before it ran).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from omni.cache.encoder_cache import EncoderCache
from omni.stages.contracts.encoder import EMBEDDINGS
from omni.stages.contracts.llm import MediaItem, item_tensors_of
from omni.stages.runtime.worker import PeerCall, PeerReply

# Embeddings by item index.
Embeddings = dict[int, torch.Tensor]
# Encoder calls per item before its requests fail: the first, and two more after replicas
# that were lost while encoding it.
MAX_ATTEMPTS = 3


@dataclass
class _Waiting:
    """A request that waits for some of its items."""

    embeddings: dict[int, torch.Tensor]
    missing: set[int]


@dataclass
class _Encoding:
    """One item being encoded, and every (request, item index) waiting for it."""

    item: MediaItem
    tensors: Mapping[str, torch.Tensor]
    call_id: str
    attempts: int = 1
    waiters: set[tuple[str, int]] = field(default_factory=set)


class ItemFetcher:
    """See the module docstring. Single-threaded: the LLM stage's busy loop calls it."""

    def __init__(self, cache: EncoderCache | None, call_ids: Callable[[], str]) -> None:
        self.cache = cache
        self._call_ids = call_ids
        self._waiting: dict[str, _Waiting] = {}
        self._encoding: dict[str, _Encoding] = {}  # by item hash
        self._by_call: dict[str, str] = {}  # call id -> item hash
        self._calls: list[PeerCall] = []
        self._withdrawn: list[str] = []
        self._ready: list[tuple[str, dict[int, torch.Tensor]]] = []
        self._failed: list[tuple[str, str]] = []
        # Counters for the stage's stats.
        self.items_encoded = 0
        self.items_from_cache = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_finished(self) -> bool:
        """Whether `take_finished` has anything to report."""
        return bool(self._ready or self._failed)

    def admit(
        self,
        request_id: str,
        items: Sequence[MediaItem],
        tensors: Mapping[str, torch.Tensor],
        needed: Sequence[int],
    ) -> Embeddings | None:
        """Embeddings of the `needed` items of a request. Returns them at once when the cache
        holds them all; otherwise asks encoders and returns None: the request is then reported
        by `take_finished` when the last one arrives (or fails). ValueError for an item that
        has neither embeddings nor an encoder to ask."""
        found: dict[int, torch.Tensor] = {}
        missing: list[int] = []
        for index in needed:
            item = items[index]
            cached = self.cache.get(item.item_hash) if self.cache is not None else None
            if cached is not None:
                self.items_from_cache += 1
                found[index] = cached
            elif not item.encoder_role:
                raise ValueError(
                    f"media item {index} came without embeddings and without an encoder request"
                )
            else:
                missing.append(index)
        if not missing:
            return found
        self._waiting[request_id] = _Waiting(found, set(missing))
        for index in missing:
            self._ask(request_id, index, items[index], item_tensors_of(index, tensors))
        return None

    def forget(self, request_id: str) -> None:
        """The request ended (aborted or failed): its items are no longer wanted by it, and an
        encoder call no request waits for is withdrawn."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is None:
            return
        for item_hash, encoding in list(self._encoding.items()):
            encoding.waiters = {w for w in encoding.waiters if w[0] != request_id}
            if not encoding.waiters:
                del self._encoding[item_hash]
                del self._by_call[encoding.call_id]
                self._withdrawn.append(encoding.call_id)

    def take_calls(self) -> tuple[list[PeerCall], list[str]]:
        calls, self._calls = self._calls, []
        withdrawn, self._withdrawn = self._withdrawn, []
        return calls, withdrawn

    def take_finished(
        self,
    ) -> tuple[list[tuple[str, dict[int, torch.Tensor]]], list[tuple[str, str]]]:
        """(request id, embeddings by item index) of requests whose items all arrived, and
        (request id, error) of those whose items could not be had."""
        ready, self._ready = self._ready, []
        failed, self._failed = self._failed, []
        return ready, failed

    def on_reply(self, reply: PeerReply) -> None:
        item_hash = self._by_call.pop(reply.request_id, None)
        if item_hash is None:
            return
        encoding = self._encoding[item_hash]
        if reply.error is not None:
            if reply.lost and encoding.attempts < MAX_ATTEMPTS:
                encoding.attempts += 1
                self._call(item_hash, encoding)
                return
            del self._encoding[item_hash]
            for request_id in {w[0] for w in encoding.waiters}:
                self._fail(request_id, reply.error)
            return
        embeddings = reply.tensors.get(EMBEDDINGS)
        del self._encoding[item_hash]
        if embeddings is None or embeddings.shape[0] != encoding.item.length:
            got = "no embeddings" if embeddings is None else f"{embeddings.shape[0]} rows"
            error = (
                f"the {encoding.item.encoder_role} stage answered {got} for an item of "
                f"{encoding.item.length} placeholder tokens"
            )
            for request_id in {w[0] for w in encoding.waiters}:
                self._fail(request_id, error)
            return
        if self.cache is not None:
            footprint = self.cache.storage.footprint(embeddings)
            if self.cache.can_put(footprint):
                self.cache.put(item_hash, embeddings)
        for request_id, index in encoding.waiters:
            waiting = self._waiting.get(request_id)
            if waiting is None:
                continue
            waiting.embeddings[index] = embeddings
            waiting.missing.discard(index)
            if not waiting.missing:
                del self._waiting[request_id]
                self._ready.append((request_id, waiting.embeddings))

    # ---- internals ------------------------------------------------------------------------

    def _ask(
        self, request_id: str, index: int, item: MediaItem, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        encoding = self._encoding.get(item.item_hash)
        if encoding is None:
            encoding = _Encoding(item, tensors, call_id="")
            self._encoding[item.item_hash] = encoding
            self._call(item.item_hash, encoding)
        encoding.waiters.add((request_id, index))

    def _call(self, item_hash: str, encoding: _Encoding) -> None:
        encoding.call_id = self._call_ids()
        self._by_call[encoding.call_id] = item_hash
        self.items_encoded += 1
        self._calls.append(
            PeerCall(
                request_id=encoding.call_id,
                role=encoding.item.encoder_role,
                tensors=encoding.tensors,
                body=encoding.item.encoder_body,
            )
        )

    def _fail(self, request_id: str, error: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            self._failed.append((request_id, error))


def call_id_counter(prefix: str) -> Callable[[], str]:
    """Unique peer-call ids for one replica: `prefix` and a counter."""
    counter = itertools.count()
    return lambda: f"{prefix}/{next(counter)}"
