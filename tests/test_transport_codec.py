"""Round trips of every stage message type and rejection of anything undeclared."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from omni.transport.codec import MessageCodec, ProtocolError
from omni.transport.messages import (
    MESSAGE_KINDS,
    Abort,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    PeerRequest,
    Shutdown,
    StageError,
    StageReplies,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from omni.transport.shm import SharedTensorHandle

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) - 7
    if dtype == torch.bool:
        return values.remainder(3) == 0
    if dtype == torch.uint8:
        return values.abs().to(dtype)
    return values.to(dtype)


def _roundtrip(message: msgspec.Struct, codec: MessageCodec | None = None) -> msgspec.Struct:
    codec = codec or stage_codec()
    frames = codec.encode(message)
    # Copy into fresh bytearrays, as a socket would deliver them.
    return codec.decode([bytearray(memoryview(frame)) for frame in frames])


HANDLE = SharedTensorHandle(
    segment="omni_123_abcdef", generation=3, dtype="bfloat16", shape=[2, 4], nbytes=16
)

PLAIN_MESSAGES = [
    Hello(
        replica_id="vision-0",
        role="vision",
        model="m",
        capacity=4,
        device="cuda:1",
        pid=42,
        host_id="h",
    ),
    Welcome(
        replica_id="vision-0", heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0, shared_memory=True
    ),
    Heartbeat(replica_id="vision-0", load=3, stats=b"\x81\xa1q\x02"),
    HelloRequired(reason="unknown replica"),
    StageRequest(request_id="r", shm_inputs={"page": HANDLE}, body=b"\x81\xa1n\x03"),
    StageReply(request_id="r", shm_outputs={"emb": HANDLE}, body=b"\x91\x07", finished=True),
    StageReplies(
        replies=[
            StageReply(request_id="a", body=b"\x01"),
            StageReply(request_id="b", shm_outputs={"emb": HANDLE}, finished=True),
        ]
    ),
    PeerRequest(request_id="p", role="vision", body=b"\x80"),
    StageError(request_id="r", message="boom", code="replica_lost"),
    Abort(request_id="r"),
    Goodbye(replica_id="vision-0", reason="SIGTERM"),
    Shutdown(reason="server stopping"),
]


def test_every_kind_is_covered() -> None:
    assert {type(message) for message in PLAIN_MESSAGES} == set(MESSAGE_KINDS.values())


@pytest.mark.parametrize("message", PLAIN_MESSAGES, ids=lambda m: type(m).__name__)
def test_plain_message_roundtrip(message: msgspec.Struct) -> None:
    frames = stage_codec().encode(message)
    assert len(frames) == 1
    kind = {cls: kind for kind, cls in MESSAGE_KINDS.items()}[type(message)]
    assert bytes(frames[0])[0] == kind
    assert _roundtrip(message) == message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (64, 33)], ids=str)
def test_tensor_roundtrip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _tensor(dtype, shape)
    decoded = _roundtrip(StageRequest(request_id="t", inputs={"x": tensor}))
    assert isinstance(decoded, StageRequest)
    out = decoded.inputs["x"]
    assert out.dtype == dtype
    assert tuple(out.shape) == shape
    assert torch.equal(out, tensor)


def test_large_tensors_travel_as_separate_frames_and_small_inline() -> None:
    big = _tensor(torch.bfloat16, (40, 100))  # 8000 bytes
    small = _tensor(torch.int64, (4,))  # 32 bytes
    codec = stage_codec()
    frames = codec.encode(StageReply(request_id="r", outputs={"big": big, "small": small}))
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == 8000
    # The big frame is a view of the tensor's own memory, not a copy.
    assert np.shares_memory(np.asarray(frames[1]), big.view(torch.int16).numpy())
    decoded = codec.decode(frames)
    assert isinstance(decoded, StageReply)
    assert torch.equal(decoded.outputs["big"], big)
    assert decoded.outputs["small"].tolist() == [-7, -6, -5, -4]


def test_non_contiguous_tensors() -> None:
    base = _tensor(torch.float32, (8, 300))
    transposed = base.t()
    strided = base[::2, 1::3]
    decoded = _roundtrip(StageRequest(request_id="r", inputs={"t": transposed, "s": strided}))
    assert isinstance(decoded, StageRequest)
    assert torch.equal(decoded.inputs["t"], transposed)
    assert torch.equal(decoded.inputs["s"], strided)
    assert decoded.inputs["t"].is_contiguous()


class ArrayMessage(msgspec.Struct, frozen=True):
    array: np.ndarray
    tensor: torch.Tensor


def test_numpy_arrays_roundtrip() -> None:
    codec = MessageCodec({7: ArrayMessage})
    array = np.arange(600, dtype=np.int32).reshape(20, 30)[:, ::2]
    tensor = torch.tensor([1.5, -2.0], dtype=torch.float16)
    decoded = _roundtrip(ArrayMessage(array=array, tensor=tensor), codec)
    assert isinstance(decoded, ArrayMessage)
    assert decoded.array.dtype == np.int32
    assert np.array_equal(decoded.array, array)
    assert decoded.tensor.tolist() == [1.5, -2.0]


def _bad_frames() -> list[tuple[str, list[bytes], str]]:
    codec = stage_codec()
    good = codec.encode(StageReply(request_id="r", outputs={"x": torch.zeros(300)}))
    header = bytes(good[0])
    raw = bytes(memoryview(good[1]))
    request_kind = bytes([0x10])
    enc = msgspec.msgpack.encode
    return [
        ("empty", [], "empty message"),
        ("unknown kind", [b"\x7f" + enc({})], "unknown message kind 0x7f"),
        ("garbage", [b"\x10\xc1\xc1"], "bad StageRequest"),
        ("missing field", [request_kind + enc({"inputs": {}})], "request_id"),
        ("wrong type", [b"\x03" + enc({"replica_id": "a", "load": "high"})], "load"),
        (
            "stats over the bound",
            [b"\x03" + enc({"replica_id": "a", "stats": b"x" * (64 * 1024 + 1)})],
            "stats",
        ),
        ("extra field", [b"\x13" + enc({"request_id": "r", "evil": 1})], "evil"),
        ("frame index out of range", [header], "out of range"),
        ("extra frame", [header, raw, raw], "unreferenced"),
        ("short frame", [header, raw[:-4]], "bytes"),
        (
            "object dtype",
            [request_kind + enc({"request_id": "r", "inputs": {"x": ["object", [1], b"\0"]}})],
            "dtype",
        ),
        (
            "pickle ext",
            [request_kind + enc({"request_id": "r", "body": msgspec.msgpack.Ext(1, b"x")})],
            "bad StageRequest",
        ),
        (
            "path in shm handle",
            [
                request_kind
                + enc(
                    {
                        "request_id": "r",
                        "shm_inputs": {
                            "x": {
                                "segment": "../etc/passwd",
                                "generation": 1,
                                "dtype": "uint8",
                                "shape": [1],
                                "nbytes": 1,
                            }
                        },
                    }
                )
            ],
            "segment",
        ),
    ]


@pytest.mark.parametrize(
    "name,frames,needle", _bad_frames(), ids=[case[0] for case in _bad_frames()]
)
def test_undeclared_frames_are_rejected(name: str, frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        stage_codec().decode(frames)


def test_encoding_an_undeclared_type_fails() -> None:
    with pytest.raises(ValueError, match="ArrayMessage is not a message type"):
        stage_codec().encode(ArrayMessage(array=np.zeros(1), tensor=torch.zeros(1)))
    with pytest.raises(TypeError):
        stage_codec().encode(StageReply(request_id="r", body=object()))
