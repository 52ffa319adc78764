"""Host-to-device copies of a step's inputs must not wait for the device: with asynchronous
scheduling the host builds step N+1 while step N runs, and a copy from pageable memory would
first drain the stream (see omni.stages.llm.host_to_device)."""

from __future__ import annotations

import pytest
import torch
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.host_to_device import copy_to_device
from omni.stages.llm.model_runner import index_tensor
from omni.stages.llm.sampler import SamplingBatch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_on_the_cpu_a_tensor_stays_itself() -> None:
    tensor = torch.arange(6).reshape(2, 3)[:, 1:]
    assert copy_to_device(tensor, "cpu") is tensor
    assert copy_to_device(tensor, torch.device("cpu")) is tensor


@needs_cuda
def test_a_steps_host_inputs_reach_the_device_while_it_is_busy() -> None:
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # about two seconds of one busy kernel
    busy = torch.cuda.Event()
    busy.record()
    params = SamplingParams(
        temperature=0.5, top_k=3, top_p=0.75, min_p=0.25, presence_penalty=0.5, min_tokens=4
    )
    batch = SamplingBatch.from_params(
        [params] * 3,
        [None] * 3,
        "cuda",
        output_token_ids=[[7, 8]] * 3,
        prompt_token_ids=[[9]] * 3,
        eos_token_ids=[{2}] * 3,
    )
    indices = index_tensor([4, 5], torch.device("cuda"))
    rows = copy_to_device(torch.arange(12, dtype=torch.float32).reshape(4, 3)[1:], "cuda")
    # None of it waited for the kernel: it is still running.
    assert not busy.query()
    torch.cuda.synchronize()
    assert batch.temperature.tolist() == [0.5] * 3
    assert batch.top_k.tolist() == [3] * 3
    assert batch.top_p.tolist() == [0.75] * 3
    assert batch.min_p.tolist() == [0.25] * 3
    assert batch.presence_penalty is not None and batch.presence_penalty.tolist() == [0.5] * 3
    assert batch.output_token_ids is not None
    assert batch.output_token_ids.tolist() == [[7, 8]] * 3
    assert batch.banned_token_ids is not None and batch.banned_token_ids.tolist() == [2] * 3
    assert indices.tolist() == [4, 5]
    assert rows.tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
