"""The ``spa`` command. Each sub-command lives next to the code it drives and registers itself here.

This module sits outside the ``spa`` package so that ``spa --help`` imports neither the package nor torch
(``import spa`` registers the models with timm, which needs torch); only the module of the verb being run
is imported. ``spa.cli`` re-exports it (``python -m spa.cli`` works too). spa's own errors
(:mod:`spa.errors`: bad data, checkpoints, configuration) and missing files print one line,
``spa VERB: error: ...``, and exit with code 2; user warnings print one line too (``spa VERB: warning: ...``);
``--debug`` or ``SPA_DEBUG=1`` shows the traceback (and warnings as Python prints them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

# verb -> (module with a ``register(subparsers)`` that adds it (and sets ``func``), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("spa.demo", "main job end to end on built-in data: train, evaluate, report"),
    "train": (
        "spa.engine.commands",
        "train a detector or (multi-label) classifier (SPT or dense Swin backbone)",
    ),
    "eval": ("spa.engine.commands", "evaluate a checkpoint: COCO AP / top-1 / mAP, kept-token ratios, GMACs"),
    "predict": (
        "spa.predict",
        "run a checkpoint on unlabelled images: COCO results JSON, top-k classes, pictures",
    ),
    "export": ("spa.export", "write a checkpoint's weights and config as .safetensors"),
    "data": ("spa.data.cli", "built-in dataset: generate and look at it; check any data spec"),
    "bench": ("spa.bench", "benchmarks"),
    "viz": ("spa.viz", "draw the tokens each SPA stage keeps, for a detection checkpoint"),
    "ablate": ("spa.ablate", "selection / SPA-stage ablations on the built-in set"),
}
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def build_parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``spa`` parser with the full options of ``verbs`` (default: every verb); the other verbs are
    listed with their help only, without importing their modules."""
    parser = argparse.ArgumentParser(prog="spa", description="Select and Pack Attention (SPA) toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (also SPA_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if verbs is None else set(verbs) & set(COMMANDS)
    modules = list(dict.fromkeys(COMMANDS[v][0] for v in COMMANDS if v in wanted))
    for module in modules:
        importlib.import_module(module).register(subparsers)
    for verb, (module, help_text) in COMMANDS.items():
        if module not in modules:
            subparsers.add_parser(verb, help=help_text)
    return parser


def _verb(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


@contextlib.contextmanager
def _one_line_warnings(verb: str) -> Iterator[None]:
    """spa's warnings (``SpaWarning``: dropped annotations, evaluating on training data...) as one line each, as
    errors are (``spa VERB: warning: ...``); other libraries' warnings and other classes print as Python prints
    them (a torch or timm warning is not spa's)."""
    from spa.errors import SpaWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SpaWarning):
            print(f"spa {verb}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _verb(argv)
    parser = build_parser([verb] if verb in COMMANDS else [])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("SPA_DEBUG", "") not in ("", "0")
    from spa.errors import SpaError

    try:
        with contextlib.nullcontext() if debug else _one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except (SpaError, FileNotFoundError, NotADirectoryError) as err:
        if debug:
            raise
        print(f"spa {args.command}: error: {err}", file=sys.stderr)
        return 2
    # a value the library refuses (e.g. a keep threshold of 1.5): its message is enough
    except ValueError as err:
        if debug:
            raise
        print(f"spa {args.command}: error: {err} (--debug shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
