"""Read a CTranslate2 `model.bin` into named numpy arrays, without CTranslate2 itself.

The file (binary version 6, written by `ModelSpec._serialize` in CTranslate2's Python package)
is a flat, little-endian list of named arrays:

    u32 binary_version, string spec_name, u32 spec_revision,
    u32 num_variables, then per variable:
        string name, u8 rank, u32 dims[rank], u8 dtype_id, u32 num_bytes, bytes data
    u32 num_aliases, then per alias: string alias, string target

where a `string` is a u16 length (counting a trailing NUL) followed by that many bytes. Aliases
name one array under a second name (CTranslate2 stores equal arrays once). Reading it needs no
code execution at all, unlike a pickle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Index = CTranslate2's DataType enum (include/ctranslate2/types.h), the order its writer uses.
_DTYPES: tuple[np.dtype, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),  # bfloat16: raw bits, widened to float32 by `_bfloat16_to_float32`
)
_BFLOAT16_ID = 5
# Versions whose layout is the one described above (5 added no fields the reader needs).
SUPPORTED_BINARY_VERSIONS = (5, 6)


@dataclass(frozen=True)
class CTranslate2Model:
    """The contents of one `model.bin`: spec name and revision, arrays by name (aliases resolved
    to the same array object)."""

    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]


def read_ctranslate2_model(path: str | Path) -> CTranslate2Model:
    """Parse `path` (a CTranslate2 `model.bin`); ValueError naming the problem if malformed."""
    path = Path(path)
    with path.open("rb") as stream:
        return _read(stream, str(path))


def _read(stream: BinaryIO, where: str) -> CTranslate2Model:
    reader = _Reader(stream, where)
    version = reader.u32()
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{where}: CTranslate2 binary version {version} is not supported "
            f"(supported: {list(SUPPORTED_BINARY_VERSIONS)})"
        )
    spec_name = reader.string()
    spec_revision = reader.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.u32()):
        name = reader.string()
        rank = reader.u8()
        shape = tuple(reader.u32() for _ in range(rank))
        dtype_id = reader.u8()
        if dtype_id >= len(_DTYPES):
            raise ValueError(f"{where}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        num_bytes = reader.u32()
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if num_bytes != expected:
            raise ValueError(
                f"{where}: variable {name!r} of shape {shape} and dtype {dtype} declares "
                f"{num_bytes} bytes; {expected} expected"
            )
        array = np.frombuffer(reader.exact(num_bytes), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16_ID:
            array = _bfloat16_to_float32(array)
        variables[name] = array
    for _ in range(reader.u32()):
        alias, target = reader.string(), reader.string()
        if target not in variables:
            raise ValueError(f"{where}: alias {alias!r} names unknown variable {target!r}")
        variables[alias] = variables[target]
    if reader.remaining():
        raise ValueError(f"{where}: unexpected bytes after the alias table")
    return CTranslate2Model(spec_name, spec_revision, variables)


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32, so shifting the bits up is exact.
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Reader:
    """Little-endian primitives over a stream, with a clear error on truncation."""

    def __init__(self, stream: BinaryIO, where: str) -> None:
        self._stream = stream
        self._where = where

    def exact(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise ValueError(f"{self._where}: file ends early (wanted {size} more bytes)")
        return data

    def u8(self) -> int:
        return int(self.exact(1)[0])

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.exact(4))[0]
        return value

    def string(self) -> str:
        (length,) = struct.unpack("<H", self.exact(2))
        raw = self.exact(length)
        if not raw or raw[-1] != 0:
            raise ValueError(f"{self._where}: string {raw[:40]!r} is not NUL-terminated")
        return raw[:-1].decode("utf-8")

    def remaining(self) -> bool:
        return bool(self._stream.read(1))
