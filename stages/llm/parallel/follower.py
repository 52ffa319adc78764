"""A follower rank (1..N-1) of a tensor-parallel replica: `python -m
omni.stages.llm.parallel.follower ...`, started by rank 0 (`ranks.FollowerRanks`).

It loads its shard, sizes and allocates its KV cache and captures its CUDA graphs in lockstep
with rank 0, then replays the step plans rank 0 writes to its stdin until a Shutdown plan
(exit 0) or until rank 0 is gone (exit 1: the pipe ends, or the parent pid changes): no rank
outlives its replica.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

# How often a follower looks whether rank 0, its parent, is still there.
_PARENT_POLL_S = 0.1


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent (rank 0) is gone: a thread watches the parent pid, which
    changes when the parent process dies (the orphan is re-parented). Not PR_SET_PDEATHSIG:
    that signal follows the parent *thread*, and an offline `LLM` may be built on a thread
    that ends long before the engine does."""
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before this process got here

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--config", required=True, help="the rank's EngineConfig as JSON")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {args.rank}: %(message)s"
    )

    import torch
    import torch.distributed as dist
    from omni.stages.llm.config import EngineConfig
    from omni.stages.llm.model_runner import ModelRunner, resolve_device
    from omni.stages.llm.parallel.group import join_group
    from omni.stages.llm.parallel.plan import PlanReceiver

    config = EngineConfig(**json.loads(args.config))
    device = resolve_device(config.device)
    if device.type == "cpu":
        # The ranks share the host's cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = dist.FileStore(args.store, args.world_size)
    store.set(f"started/{args.rank}", "1")
    group = join_group(
        args.rank, args.world_size, args.store, device, config.enable_expert_parallel
    )
    runner = ModelRunner(config, args.model_path, group)
    try:
        reason = runner.follow(PlanReceiver(sys.stdin.fileno()))
    except Exception as exc:  # rank 0 left without a Shutdown plan (it died or was killed)
        logging.getLogger(__name__).info("leaving: %s", exc)
        return 1
    logging.getLogger(__name__).info("stopped: %s", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
