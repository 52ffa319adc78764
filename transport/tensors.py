"""Tensors and arrays as raw bytes plus (dtype, shape) metadata.

The wire never carries a pickled tensor: a tensor travels as its contiguous bytes and a dtype
*name* from the closed table below, so a receiver can only ever build one of these dtypes.
bfloat16 has no numpy equivalent, which is why the bytes are taken through a uint8 view of the
torch tensor rather than through `tensor.numpy()`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

# name -> torch dtype. The names are the wire format; keep them stable.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
TORCH_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# numpy arrays share the names; bfloat16 is absent because numpy has no such dtype.
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in TORCH_DTYPES if name != "bfloat16"
}

# Dimensions beyond this are certainly a corrupt header, not a real tensor.
MAX_NDIM = 16


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; ValueError for dtypes the wire does not carry."""
    try:
        return TORCH_DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"tensor dtype {dtype} cannot be sent; supported: {sorted(TORCH_DTYPES)}"
        ) from None


def numpy_dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in NUMPY_DTYPES:
        raise ValueError(f"array dtype {name} cannot be sent; supported: {sorted(NUMPY_DTYPES)}")
    return name


def tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (a contiguous copy first if it is strided).

    The returned memoryview keeps the (possibly copied) tensor alive, so it is safe to hand to
    ZeroMQ with `copy=False`.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def array_bytes_view(array: np.ndarray) -> memoryview:
    contiguous = np.ascontiguousarray(array)
    return memoryview(contiguous.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def check_shape(shape: Sequence[int], itemsize: int, nbytes: int, what: str) -> tuple[int, ...]:
    """Validate a received shape against the bytes that came with it."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{what} has {len(shape)} dimensions; the limit is {MAX_NDIM}")
    if any((not isinstance(dim, int)) or dim < 0 for dim in shape):
        raise ValueError(f"{what} has an invalid shape {list(shape)}")
    expected = math.prod(shape) * itemsize
    if expected != nbytes:
        raise ValueError(f"{what} has shape {list(shape)} ({expected} bytes) but {nbytes} bytes")
    return tuple(shape)


def tensor_from_buffer(
    buffer: memoryview | bytes, dtype_name: str, shape: Sequence[int]
) -> torch.Tensor:
    """Build a tensor over `buffer` without copying when the buffer is writable.

    Read-only buffers (for example `bytes` from an inline msgpack field, which are small by
    construction) are copied once, because torch requires writable memory.
    """
    dtype = TORCH_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {dtype_name!r}")
    view = memoryview(buffer).cast("B")
    dims = check_shape(shape, dtype.itemsize, view.nbytes, "tensor")
    if view.nbytes == 0:
        return torch.empty(dims, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))
    with warnings.catch_warnings():
        # torch warns about non-writable buffers even for writable memoryviews of ZeroMQ frames
        # on some versions; the memory is ours alone once received.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(view, dtype=torch.uint8)
    return raw.view(dtype).view(dims)


def array_from_buffer(
    buffer: memoryview | bytes, dtype_name: str, shape: Sequence[int]
) -> np.ndarray:
    dtype = NUMPY_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"unknown array dtype {dtype_name!r}")
    view = memoryview(buffer).cast("B")
    dims = check_shape(shape, dtype.itemsize, view.nbytes, "array")
    return np.frombuffer(view, dtype=dtype).reshape(dims)
