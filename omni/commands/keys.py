"""`omni keys generate DIR`: CURVE keys for a server and the stages that join it over TCP."""

from __future__ import annotations

import sys
from typing import Any

from omni.transport.key_folder import generate_key_folder


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="make CURVE keys for stages that join a server over TCP",
        description="Keys for `omni serve --stage-endpoint tcp://... --stage-keys DIR` and the "
        "`omni stage ... --server-key DIR/server.key --client-key DIR/clients/NAME.key_secret` "
        "processes that join it.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    generate = actions.add_parser(
        "generate",
        help="write a server key pair (if DIR has none) and a key pair per client",
        description="Writes DIR/server.key (public: copy to every stage host), "
        "DIR/server.key_secret (stays on the server host), and per client "
        "DIR/clients/NAME.key (public: the server's allow-list) and "
        "DIR/clients/NAME.key_secret (copy to the host that runs that stage). Run it again "
        "with new --client names to admit more stage hosts (restart the server to load them).",
    )
    generate.add_argument("directory", help="folder to write the keys into")
    generate.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="a client key pair to make (repeatable; default: one named 'stage')",
    )
    generate.set_defaults(func=run_generate)


def run_generate(args: Any) -> int:
    try:
        written = generate_key_folder(args.directory, args.client or ["stage"])
    except (ValueError, OSError) as exc:
        print(f"omni keys: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
