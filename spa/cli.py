"""The ``spa`` command (defined in the top-level module ``spa_cli``, which imports no torch for ``--help``)."""

from __future__ import annotations

import sys

from spa_cli import COMMAND_MODULES, COMMANDS, build_parser, main

__all__ = ["COMMANDS", "COMMAND_MODULES", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
