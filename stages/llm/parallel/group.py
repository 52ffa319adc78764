"""One tensor-parallel group: this process's rank among the N processes of an LLM replica,
and the collectives the sharded layers and the step plan need.

Two process groups per replica, built directly from a file store (no `init_process_group`,
so nothing process-global: an offline `LLM` and a test may each own a group):

* `device`: the layers' collectives (all-reduce after a row-parallel linear and the
  vocab-parallel embedding, the gather of vocab-sharded logits). NCCL on CUDA, gloo on the CPU.
* `host`: gloo on CPU tensors, for what the ranks agree on at start (the KV block count).
  The step plans do not use it: a follower waits for the next plan in a read of its stdin
  pipe (`plan.PlanSender`), which needs no timeout however long the replica idles and ends
  when rank 0 does.

A rank that dies closes its sockets, which fails the others' pending gloo calls at once
("Connection closed by peer").

Gloo binds 127.0.0.1 only: the ranks of a replica share a host, and nothing else may join.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.distributed as dist

# Collectives happen at start-up (the host group) and inside a step, which takes
# milliseconds; a rank that lags by more than this is hung.
_HOST_TIMEOUT = _DEVICE_TIMEOUT = datetime.timedelta(minutes=10)


class Communicator(Protocol):
    """What this module uses of a c10d backend (`ProcessGroupGloo`, `ProcessGroupNCCL`)."""

    def allreduce(
        self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions = ...
    ) -> dist.Work: ...

    def broadcast(
        self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions = ...
    ) -> dist.Work: ...

    def gather(
        self,
        output_tensors: list[list[torch.Tensor]],
        input_tensors: list[torch.Tensor],
        opts: dist.GatherOptions = ...,
    ) -> dist.Work: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Shard:
    """The slice [start, start + size) of a dimension of `full` that this rank holds."""

    start: int
    size: int
    full: int


class TensorParallel:
    """This process's place in its replica's tensor-parallel group. `SINGLE` is the group of
    one (every collective a no-op), which is what every model is built with unless a runner
    builds it inside `building_with(group)`."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        device_group: Communicator | None = None,
        host_group: Communicator | None = None,
        expert_parallel: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device_group = device_group
        self.host_group = host_group
        # Mixture-of-experts layers place whole experts on ranks instead of sharding each.
        self.expert_parallel = expert_parallel

    @classmethod
    def layout(cls, rank: int, world_size: int, expert_parallel: bool = False) -> TensorParallel:
        """A rank of a group that nobody joined: it shapes sharded layers (to check that a
        model shards, or to load one rank's slices) but has no collectives to run."""
        return cls(rank, world_size, expert_parallel=expert_parallel)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def split(self, size: int, what: str) -> Shard:
        """This rank's even share of a dimension of `size`; ValueError naming `what` when
        `size` does not divide by the group size."""
        if size % self.world_size:
            raise ValueError(
                f"{what} is {size}, which tensor_parallel_size {self.world_size} does not divide"
            )
        share = size // self.world_size
        return Shard(self.rank * share, share, size)

    def split_padded(self, size: int) -> Shard:
        """This rank's share of a dimension padded up to a multiple of the group size (the
        vocabulary): `size` is how many of its rows are real, at most the share."""
        share = -(-size // self.world_size)
        start = self.rank * share
        return Shard(start, max(0, min(share, size - start)), size)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place; returns it."""
        if self.world_size > 1:
            assert self.device_group is not None
            self.device_group.allreduce([tensor]).wait()
        return tensor

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all), on rank 0 in rank order; None elsewhere."""
        if self.world_size == 1:
            return [tensor]
        assert self.device_group is not None
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.is_first:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self.device_group.gather([parts], [tensor], options).wait()
            return parts
        self.device_group.gather([], [tensor], options).wait()
        return None

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's `tensor` (in place)."""
        if self.world_size > 1:
            assert self.device_group is not None
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self.device_group.broadcast([tensor], options).wait()
        return tensor

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (a KV block count that fits every rank)."""
        if self.world_size == 1:
            return value
        assert self.host_group is not None
        tensor = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
        self.host_group.allreduce([tensor], options).wait()
        return int(tensor.item())


SINGLE = TensorParallel()
_building: list[TensorParallel] = []


def current_group() -> TensorParallel:
    """The group the model being built shards over (`SINGLE` outside `building_with`)."""
    return _building[-1] if _building else SINGLE


@contextlib.contextmanager
def building_with(group: TensorParallel) -> Iterator[None]:
    """Models constructed inside shard their layers over `group`. Layers read it once, at
    construction, so model constructors keep their `(config, dtype)` signature."""
    _building.append(group)
    try:
        yield
    finally:
        _building.pop()


def join_group(
    rank: int,
    world_size: int,
    store_path: str,
    device: torch.device,
    expert_parallel: bool = False,
) -> TensorParallel:
    """Joins the replica's group through the file store at `store_path` (every rank passes
    the same path); returns once all `world_size` ranks have joined."""
    if world_size == 1:
        return TensorParallel(expert_parallel=expert_parallel)
    store = dist.FileStore(store_path, world_size)
    host = _gloo(dist.PrefixStore("host", store), rank, world_size, _HOST_TIMEOUT)
    if device.type == "cuda":
        # NVLink multicast (NVLS) stays off: NCCL reads this when the communicator starts.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        # NCCL's bootstrap sockets on loopback: the ranks share this host (their data moves
        # over NVLink or PCIe), and nothing else should be able to reach them.
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        torch.cuda.set_device(device)  # the communicator belongs to this rank's device
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _DEVICE_TIMEOUT
        device_group = cast(
            Communicator,
            dist.ProcessGroupNCCL(dist.PrefixStore("device", store), rank, world_size, options),
        )
    else:
        device_group = _gloo(dist.PrefixStore("device", store), rank, world_size, _DEVICE_TIMEOUT)
    group = TensorParallel(rank, world_size, device_group, host, expert_parallel)
    # One collective on each group now, so that a rank that cannot reach the others fails
    # here; NCCL also starts its communicator at the first one (it would at the first step).
    group.min_over_ranks(0)
    group.all_reduce(torch.zeros(1, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return group


def _gloo(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta
) -> Communicator:
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timeout
    return cast(Communicator, dist.ProcessGroupGloo(store, rank, world_size, options))
