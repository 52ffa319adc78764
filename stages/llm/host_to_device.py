"""Host tensors to the device without waiting for the device.

A CUDA copy from pageable host memory synchronises its stream before it starts: the host waits
for every kernel queued so far. With asynchronous scheduling the host builds step N+1 while
step N runs, so a single such copy per step puts the two back in series (the step's sampling
settings were four of them). A copy from pinned (page-locked) memory is a DMA in stream order,
and the call returns at once.
"""

from __future__ import annotations

import torch


def copy_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, queued without blocking (unchanged when it is there already)."""
    target = torch.device(device)
    if tensor.device.type != "cpu" or target.type != "cuda":
        return tensor.to(target, non_blocking=True)
    return tensor.pin_memory().to(target, non_blocking=True)
