"""M-RoPE positions of a Qwen2-VL / Qwen2.5-VL prompt: three rows (temporal, height, width).

Text tokens get one running position, the same in all three rows. An image's placeholder run
(`grid_t * grid_h * grid_w / merge**2` tokens, row-major over the merged grid) gets the running
position plus its temporal, row and column index in the three rows; the text after it resumes
at the running position plus the image's larger merged side. So a prompt ends at a position
that differs from its length by `mrope_position_delta` (negative once images are in it), and
a token decoded at text position `p` (its index in the sequence) uses `p + delta` in all rows.

This reproduces transformers' `Qwen2_5_VLModel.get_rope_index` for images (tests compare the
two); it locates images by their placeholders rather than by scanning token types, so two
adjacent images can never be merged into one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholder tokens sit and the image's patch grid (before merging)."""

    offset: int
    grid_thw: tuple[int, int, int]

    def num_tokens(self, spatial_merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * (h // spatial_merge_size) * (w // spatial_merge_size)


def mrope_positions(
    num_tokens: int, images: Sequence[ImageSpan], spatial_merge_size: int
) -> tuple[torch.Tensor, int]:
    """(positions int64 [3, num_tokens], mrope_position_delta) for a prompt of `num_tokens`
    tokens whose image placeholder runs are `images` (in any order, not overlapping)."""
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size is {spatial_merge_size}; it must be >= 1")
    positions = torch.empty(3, num_tokens, dtype=torch.int64)
    cursor, current = 0, 0
    for span in sorted(images, key=lambda s: s.offset):
        t, h, w = span.grid_thw
        if h % spatial_merge_size or w % spatial_merge_size or min(t, h, w) < 1:
            raise ValueError(
                f"image grid {span.grid_thw} is not a positive multiple of the merge size "
                f"{spatial_merge_size} in height and width"
            )
        length = span.num_tokens(spatial_merge_size)
        if span.offset < cursor or span.offset + length > num_tokens:
            raise ValueError(
                f"image placeholder at {span.offset} (length {length}) overlaps another or "
                f"runs past the prompt's {num_tokens} tokens"
            )
        text_len = span.offset - cursor
        positions[:, cursor : span.offset] = torch.arange(current, current + text_len)
        current += text_len
        llm_h, llm_w = h // spatial_merge_size, w // spatial_merge_size
        grid = torch.meshgrid(
            torch.arange(t), torch.arange(llm_h), torch.arange(llm_w), indexing="ij"
        )
        end = span.offset + length
        for row, index in enumerate(grid):
            positions[row, span.offset : end] = index.reshape(-1) + current
        current += max(llm_h, llm_w)
        cursor = end
    positions[:, cursor:] = torch.arange(current, current + num_tokens - cursor)
    delta = (int(positions.max()) + 1 - num_tokens) if num_tokens else 0
    return positions, delta


def decode_mrope_positions(start: int, count: int, mrope_position_delta: int) -> torch.Tensor:
    """int64 [3, count] positions of text tokens at sequence indices start .. start+count-1
    after the prompt (generated tokens): index + delta, the same in all three rows."""
    if start < 0 or count < 0:
        raise ValueError(f"start {start} and count {count} must be >= 0")
    row = torch.arange(start, start + count, dtype=torch.int64) + mrope_position_delta
    return row.unsqueeze(0).expand(3, -1).contiguous()
