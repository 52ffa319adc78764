"""Typed msgpack messages with out-of-band tensor frames.

A message on the wire is a list of ZeroMQ frames:

    frame 0:   one byte of message kind, then the msgpack-encoded struct
    frame 1..: raw tensor bytes, one frame per tensor too large to inline

A tensor field is encoded as `[dtype_name, shape, data]`, where `data` is either the index of
its raw frame (counted from frame 1) or, below `inline_threshold` bytes, the bytes themselves.
The receiver decodes with a `msgspec` decoder bound to the struct type its kind byte names, so
an unknown kind, a missing field or a value of the wrong type is rejected before any
application code sees it. Nothing here can construct an arbitrary Python object: this is the
project's answer to pickle on the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
import zmq
from omni.transport.tensors import (
    array_bytes_view,
    array_from_buffer,
    numpy_dtype_name,
    tensor_bytes_view,
    tensor_from_buffer,
    torch_dtype_name,
)

Frame = bytes | bytearray | memoryview | zmq.Frame

# Tensors smaller than this ride inside the msgpack header: a separate frame costs more than
# copying a few hundred bytes.
DEFAULT_INLINE_THRESHOLD = 1024
# A message with more raw frames than this is malformed (or hostile); real messages carry a
# handful of tensors.
MAX_FRAMES = 1024


class ProtocolError(ValueError):
    """A frame sequence that does not decode to a declared message type."""


class _FrameState(threading.local):
    """Per-thread frames of the message being encoded or decoded (hooks take no extra args).

    The msgspec encoder and decoders live here too: the hooks call back into Python, where
    another thread may run, so no two threads ever share one mid-message.
    """

    def __init__(self) -> None:
        self.outgoing: list[memoryview] | None = None
        self.incoming: Sequence[memoryview] | None = None
        self.used: set[int] = set()
        self.encoder: msgspec.msgpack.Encoder | None = None
        self.decoders: dict[int, msgspec.msgpack.Decoder[Any]] = {}


def _reject_ext(code: int, data: memoryview) -> Any:
    # Without this hook an `Any` field would hand back msgpack Ext objects; nothing we send
    # uses extension types, so any that arrive are malformed or hostile.
    raise ValueError(f"msgpack extension type {code} is not accepted")


def _frame_buffer(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


class MessageCodec:
    """Encodes and decodes one closed set of `msgspec.Struct` message types.

    `kinds` maps the one-byte message kind to its struct type. Tensor fields may be typed
    `torch.Tensor` or `np.ndarray`; they decode to exactly that type.
    """

    def __init__(
        self,
        kinds: Mapping[int, type[msgspec.Struct]],
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        if not kinds:
            raise ValueError("a codec needs at least one message kind")
        for kind in kinds:
            if not 0 <= kind <= 255:
                raise ValueError(f"message kind {kind} does not fit in one byte")
        if len(set(kinds.values())) != len(kinds):
            raise ValueError("each message type may have only one kind")
        if inline_threshold < 0:
            raise ValueError(f"inline_threshold is {inline_threshold}; it must be >= 0")
        self.inline_threshold = inline_threshold
        self._kind_of: dict[type, int] = {cls: kind for kind, cls in kinds.items()}
        self._types = dict(kinds)
        self._state = _FrameState()

    def _encoder(self) -> msgspec.msgpack.Encoder:
        if self._state.encoder is None:
            self._state.encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        return self._state.encoder

    def _decoder(self, kind: int) -> msgspec.msgpack.Decoder[Any] | None:
        decoder = self._state.decoders.get(kind)
        if decoder is None and kind in self._types:
            decoder = msgspec.msgpack.Decoder(
                self._types[kind], dec_hook=self._dec_hook, ext_hook=_reject_ext
            )
            self._state.decoders[kind] = decoder
        return decoder

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, message: msgspec.Struct) -> list[bytes | bytearray | memoryview]:
        """Frames for `message`; tensor frames are zero-copy views to send with copy=False."""
        kind = self._kind_of.get(type(message))
        if kind is None:
            raise ValueError(f"{type(message).__name__} is not a message type of this codec")
        frames: list[memoryview] = []
        self._state.outgoing = frames
        try:
            header = bytearray(1)
            header[0] = kind
            self._encoder().encode_into(message, header, 1)
        finally:
            self._state.outgoing = None
        return [header, *frames]

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = torch_dtype_name(obj.dtype)
            return self._place(name, list(obj.shape), tensor_bytes_view(obj))
        if isinstance(obj, np.ndarray):
            name = numpy_dtype_name(obj.dtype)
            return self._place(name, list(obj.shape), array_bytes_view(obj))
        raise TypeError(
            f"cannot encode {type(obj).__name__}: only declared fields, tensors and arrays"
        )

    def _place(self, dtype_name: str, shape: list[int], data: memoryview) -> list[Any]:
        frames = self._state.outgoing
        if frames is None or data.nbytes < self.inline_threshold:
            return [dtype_name, shape, data.tobytes()]
        frames.append(data)
        return [dtype_name, shape, len(frames) - 1]

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, frames: Sequence[Frame]) -> msgspec.Struct:
        """The message in `frames`; ProtocolError for anything not a declared message."""
        if not frames:
            raise ProtocolError("empty message")
        if len(frames) - 1 > MAX_FRAMES:
            raise ProtocolError(
                f"message has {len(frames) - 1} tensor frames; the limit is {MAX_FRAMES}"
            )
        header = _frame_buffer(frames[0])
        if header.nbytes == 0:
            raise ProtocolError("message has an empty header frame")
        kind = header[0]
        decoder = self._decoder(kind)
        if decoder is None:
            raise ProtocolError(f"unknown message kind 0x{kind:02x}")
        self._state.incoming = [_frame_buffer(frame) for frame in frames[1:]]
        self._state.used = set()
        try:
            message = decoder.decode(header[1:])
            unused = len(self._state.incoming) - len(self._state.used)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            raise ProtocolError(f"bad {decoder.type.__name__} message: {exc}") from None
        finally:
            self._state.incoming = None
        if unused:
            raise ProtocolError(f"{decoder.type.__name__} message has {unused} unreferenced frames")
        return message

    def _dec_hook(self, expected: type, obj: Any) -> Any:
        if expected is torch.Tensor:
            dtype_name, shape, buffer = self._unpack(obj)
            return tensor_from_buffer(buffer, dtype_name, shape)
        if expected is np.ndarray:
            dtype_name, shape, buffer = self._unpack(obj)
            return array_from_buffer(buffer, dtype_name, shape)
        raise NotImplementedError(f"no decoder for {expected}")

    def _unpack(self, obj: Any) -> tuple[str, list[int], memoryview | bytes]:
        if not (isinstance(obj, list) and len(obj) == 3):
            raise ValueError("a tensor must be [dtype, shape, data]")
        dtype_name, shape, data = obj
        if not isinstance(dtype_name, str) or not isinstance(shape, list):
            raise ValueError("a tensor must be [dtype: str, shape: list, data]")
        if isinstance(data, bytes):
            return dtype_name, shape, data
        frames = self._state.incoming
        if not isinstance(data, int) or isinstance(data, bool) or frames is None:
            raise ValueError("tensor data must be bytes or a frame index")
        if not 0 <= data < len(frames):
            raise ValueError(
                f"tensor frame index {data} is out of range (message has {len(frames)})"
            )
        if data in self._state.used:
            raise ValueError(f"tensor frame {data} is referenced twice")
        self._state.used.add(data)
        return dtype_name, shape, frames[data]
