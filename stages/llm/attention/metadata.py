"""The contract between the model runner and the attention backends.

One forward pass runs a flattened batch: the new tokens of every scheduled request laid end to
end (a request in prefill contributes a chunk of its prompt, a request in decode one token).
Each request's new tokens are the *last* `query_len` positions of its context, so token `i` of
request `r` sits at position `seq_lens[r] - query_len_r + i` and attends causally to every
position up to and including its own, reading earlier positions from the paged KV cache.

KV cache layout, one tensor per layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 holds keys, 1 values). Block 0 is the pool's null block: it is never handed to a
request, so padded rows of a CUDA-graph batch may point at it harmlessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # int32 [num_reqs + 1]: cumulative query lengths; request r owns tokens
    # query_start_loc[r] : query_start_loc[r + 1] of the flattened batch.
    query_start_loc: torch.Tensor
    # int32 [num_reqs]: context length of each request *including* its new tokens.
    seq_lens: torch.Tensor
    # int32 [num_reqs, max_blocks_per_req]: physical block ids in logical order; entries past a
    # request's last block are undefined (the runner fills them with 0, the null block).
    block_tables: torch.Tensor
    # int64 [num_tokens]: flat slot (block_id * block_size + offset) where each new token's K/V
    # is written; -1 means "padding, write nothing".
    slot_mapping: torch.Tensor
    # Host-side maxima, so kernels can size their grids without a device sync.
    max_query_len: int
    max_seq_len: int
    # True when every request is in decode (query_len == 1): lets a backend take its
    # decode-only path, which is also the shape captured in CUDA graphs.
    is_decode_only: bool = False

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
