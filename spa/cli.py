"""The ``spa`` command. Each sub-command lives next to the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules with a ``register(subparsers)`` function that adds their sub-commands (each sets ``func``).
COMMAND_MODULES = [
    "spa.bench",
    "spa.demo",
    "spa.engine.commands",
    "spa.data.cli",
    "spa.ablate",
    "spa.viz",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa", description="Select and Pack Attention (SPA) toolkit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
