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


# verbs that run models without timing them: float32 denormals are flushed to zero while they run (bench and
# demo take ``--denormals`` and check every thread, ``spa.bench.timing``); ``SPA_DENORMALS=keep`` opts out
_FLUSH_DENORMALS = ("train", "eval", "predict", "viz", "ablate")


@contextlib.contextmanager
def _denormals(verb: str) -> Iterator[None]:
    """Flush float32 denormals to zero while ``verb`` runs (``_FLUSH_DENORMALS``), then this thread's previous
    setting back. timm's shifted windows mask with -100, whose softmax gives denormals that x86 computes tens
    of times slower; flushed, Swin-T's CPU inference at batch 1 took 0.68 of the time (README, "Denormals").
    ``SPA_DENORMALS=keep`` keeps torch's default (IEEE denormals); anything but ``keep`` / ``flush`` (or empty)
    is an error for these verbs. Only this thread's setting is restored: torch CPU threads that start while the
    verb runs copy the flush and keep it."""
    if verb not in _FLUSH_DENORMALS:  # bench and demo take --denormals; the others compute nothing timed
        yield
        return
    from spa.bench.timing import DENORMAL_MODES, restored_denormals
    from spa.errors import ConfigError

    mode = os.environ.get("SPA_DENORMALS") or "flush"  # unset or empty: the default
    if mode not in DENORMAL_MODES:
        raise ConfigError(
            f"SPA_DENORMALS must be flush or keep, got {mode!r} (spa bench and spa demo take --denormals instead)"
        )
    if mode == "keep":
        yield
        return
    import torch

    with restored_denormals():
        torch.set_flush_denormal(True)  # torch's CPU threads that start from here on copy it
        yield


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
        with (
            contextlib.nullcontext() if debug else _one_line_warnings(args.command),
            _denormals(args.command),
        ):
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
