"""The `omni` command line: one subcommand per module in `omni.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry names a module in omni.commands that defines `add_parser(subparsers)`, which
# registers its subcommand and sets `func` on the parsed namespace. Modules are imported lazily
# per entry so that `omni --help` stays fast and one broken extra cannot take down the rest.
SUBCOMMANDS = ("bench", "generate", "keys", "serve", "stage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni", description="omni: multi-modal pipeline inference"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"omni.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"omni.commands.{name}":
                raise
            continue  # subcommand not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
