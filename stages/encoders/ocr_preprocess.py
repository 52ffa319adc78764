"""PP-OCR's detector input computed as rapidocr computes it, to the bit, in one pass.

rapidocr's `DetPreProcess` normalises a page as `(img.astype("float32") * (1/255) - mean) / std`
with `mean` and `std` float64 arrays, so every pixel goes through float64 and several
full-size temporaries (24 MB each for an 864x1088 page) before the cast back to float32. In
the OCR stage that was 15% of a page's time, more than recognising its text (py-spy, 8 pages
in flight, AMD EPYC; docs/benchmarks.md, perception). A pixel channel takes one of 256 values,
so the result is a 256-entry table per channel, computed by rapidocr's own `normalize` (the
same elementwise IEEE operations, so the same bits), and a page is one lookup per channel,
written straight into the detector's [1, C, H, W] layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_TABLE = "_omni_table"


def lookup_table(pre: Any) -> np.ndarray:
    """[256, C] float32: what `pre.normalize` then the cast to float32 make of each value."""
    channels = len(pre.mean)
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], channels, axis=2)
    return np.asarray(pre.normalize(values), dtype=np.float32).reshape(256, channels)


def normalized_chw(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[1, C, H, W] float32 with out[0, c] = table[img[..., c], c]."""
    height, width, channels = img.shape
    out = np.empty((1, channels, height, width), dtype=np.float32)
    for channel in range(channels):
        np.take(table[:, channel], img[:, :, channel], out=out[0, channel], mode="clip")
    return out


def use_table_lookup() -> None:
    """Make rapidocr's detector pre-processing look pixels up (once per process); images that
    are not uint8 with one value per `mean` channel keep rapidocr's own path."""
    try:
        from rapidocr.ch_ppocr_det.utils import DetPreProcess
    except ImportError:
        return
    original = DetPreProcess.__call__
    if getattr(original, "_omni", False):
        return

    def call(self: Any, img: np.ndarray) -> np.ndarray | None:
        resized = self.resize(img)
        if resized is None:
            return None
        if resized.dtype != np.uint8 or resized.ndim != 3 or resized.shape[2] != len(self.mean):
            return original(self, img)
        table = self.__dict__.get(_TABLE)
        if table is None:
            table = self.__dict__[_TABLE] = lookup_table(self)
        return normalized_chw(resized, table)

    call._omni = True  # type: ignore[attr-defined]
    call._rapidocr = original  # type: ignore[attr-defined]  # rapidocr's own, for comparison
    DetPreProcess.__call__ = call  # type: ignore[method-assign]
