"""KV block pool, prefix-cache block hashing with multi-modal keys, and the KV cache manager."""

from omni.cache.block_hash import (
    BlockHash,
    MultiModalPlaceholder,
    block_extra_keys,
    hash_block_tokens,
    request_block_hashes,
)
from omni.cache.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVBlock
from omni.cache.kv_cache_manager import KVCacheManager, KVCacheRequest

__all__ = [
    "NULL_BLOCK_ID",
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "KVCacheRequest",
    "MultiModalPlaceholder",
    "block_extra_keys",
    "hash_block_tokens",
    "request_block_hashes",
]
