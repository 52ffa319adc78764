"""`omni stage ROLE --connect ADDR`: run one stage replica that joins a running server."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from typing import Any

from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.process import EXIT_BAD_CONFIG, bind_device, run_stage_process
from omni.stages.runtime.worker import StageWorker, WorkerOptions, create_worker
from omni.transport.key_folder import load_stage_keys
from omni.transport.shm import DEFAULT_PREFIX
from omni.transport.sockets import CurveKeys, SocketOptions


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stage",
        help="run one stage replica that joins a running server",
        description="Run one stage replica (encoder, LLM core, generator) and join the server "
        "at --connect; the server routes to it after its HELLO and stops when it leaves.",
    )
    parser.add_argument("role", help="stage role, for example vision, audio, llm, image, speech")
    parser.add_argument(
        "--connect", required=True, help="server endpoint: ipc://PATH or tcp://HOST:PORT"
    )
    parser.add_argument(
        "--also-connect",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="another API process's endpoint to join too (omni serve --api-server-count)",
    )
    parser.add_argument("--model", default="", help="model path or name the stage serves")
    parser.add_argument(
        "--device",
        default="cpu",
        help="device, for example cpu or cuda:1; with --tensor-parallel-size N, each rank's "
        "(cuda:0,cuda:1) or the first of N consecutive ones (cuda:2)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="llm: shard the model over this many processes, one device each",
    )
    parser.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        default=None,
        help="llm: split mixture-of-experts layers' experts across the tensor-parallel ranks",
    )
    parser.add_argument("--capacity", type=int, default=8, help="requests served at once")
    parser.add_argument("--replica-id", default="", help="stable name of this replica")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=1.0, help="seconds until WELCOME"
    )
    parser.add_argument(
        "--server-timeout", type=float, default=10.0, help="re-HELLO after this silence"
    )
    parser.add_argument("--shm-threshold-bytes", type=int, default=1024 * 1024)
    parser.add_argument("--shm-prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--max-message-bytes", type=int, default=SocketOptions.max_message_bytes)
    parser.add_argument(
        "--worker-module",
        action="append",
        default=[],
        help="module to import that registers the worker",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="worker option"
    )
    parser.add_argument(
        "--server-key",
        "--curve-server-key",
        dest="server_key",
        default="",
        help="the server's public CURVE key: DIR/server.key from `omni keys generate DIR`, or "
        "its 40 Z85 characters",
    )
    parser.add_argument(
        "--client-key",
        "--curve-keys-file",
        dest="client_key",
        default="",
        help="this stage's CURVE key pair: DIR/clients/NAME.key_secret, whose public half the "
        "server lists",
    )
    parser.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        help="share no /dev/shm with the server even on its host: tensors travel as frames, "
        "as for a stage on another host",
    )
    parser.add_argument(
        "--colocate",
        default="",
        metavar="ROLE",
        help="also run a replica of ROLE in this process, on the same device (an encoder beside "
        "the LLM on one GPU: one process runs both replicas' kernels side by side, two "
        "processes take turns on the GPU)",
    )
    parser.add_argument("--colocate-model", default="", help="its model (default: --model)")
    parser.add_argument("--colocate-replica-id", default="", help="its replica id")
    parser.add_argument("--colocate-capacity", type=int, default=8, help="its capacity")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(func=run)


def _options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r} must be KEY=VALUE")
        options[key] = value
    return options


def _curve(args: argparse.Namespace) -> CurveKeys | None:
    if not args.server_key and not args.client_key:
        return None
    if not (args.server_key and args.client_key):
        raise ValueError("CURVE needs both --server-key and --client-key")
    return load_stage_keys(args.server_key, args.client_key)


def run(args: argparse.Namespace) -> int:
    """Serve until told to stop; 2 with a one-line message for a bad flag or unknown role."""
    try:
        config, worker = _build(args)
        colocated = [_colocated(args, config)] if args.colocate else []
    except ValueError as exc:
        print(f"omni stage: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run_stage_process(config, worker, colocated)


def _colocated(args: argparse.Namespace, host: StageConfig) -> tuple[StageConfig, StageWorker]:
    """The `--colocate` replica: its own role, model, id and capacity; the host's links,
    device and settings."""
    if args.colocate == args.role:
        raise ValueError(f"--colocate {args.colocate} is this stage's own role")
    model = args.colocate_model or args.model
    config = dataclasses.replace(
        host,
        role=args.colocate,
        model=model,
        replica_id=args.colocate_replica_id,
        capacity=args.colocate_capacity,
    )
    # A tensor-parallel host's guest runs beside rank 0, on its device.
    device = args.device.split(",")[0].strip()
    config = dataclasses.replace(config, device=device)
    options = WorkerOptions(model=model, device=device)
    return config, create_worker(args.colocate, options)


def _build(args: argparse.Namespace) -> tuple[StageConfig, StageWorker]:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for module in args.worker_module:
        importlib.import_module(module)
    config = StageConfig(
        role=args.role,
        connect=args.connect,
        also_connect=tuple(args.also_connect),
        model=args.model,
        device=args.device,
        capacity=args.capacity,
        replica_id=args.replica_id,
        heartbeat_interval_s=args.heartbeat_interval,
        server_timeout_s=max(args.server_timeout, 2 * args.heartbeat_interval),
        shm_threshold_bytes=args.shm_threshold_bytes,
        shm_prefix=args.shm_prefix,
        sockets=SocketOptions(max_message_bytes=args.max_message_bytes),
        curve=_curve(args),
        shared_memory=args.shared_memory,
        parent_pid=args.parent_pid,
    )
    bind_device(config.device)
    options = WorkerOptions(
        model=args.model, device=args.device, extra=_options(args.option) | _llm_flags(args)
    )
    return config, create_worker(args.role, options)


def _llm_flags(args: argparse.Namespace) -> dict[str, str]:
    """The LLM engine's own flags, as the engine options they stand for."""
    flags = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
    }
    given = {name: str(value).lower() for name, value in flags.items() if value is not None}
    if given and args.role != "llm":
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{names} applies to the llm role only, not {args.role!r}")
    return given
