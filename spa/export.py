"""``spa export CKPT OUT.safetensors``: a checkpoint's model weights alone, in the safetensors format.

The file holds the model's state dict (contiguous CPU tensors) and, in its string-to-string metadata,
what rebuilds the model: ``meta`` (JSON: the task and model configuration), ``extra`` (JSON: the run
configuration and class names when the checkpoint has them, plus any other small entry), ``step``,
``epoch`` and ``spa_version``. :func:`load_export` reads it back as a weights-only checkpoint state, and
:func:`spa.engine.checkpoint.load_checkpoint` (hence :func:`spa.tasks.base.load_model`, ``spa eval``)
accepts it wherever a ``.pt`` checkpoint is accepted.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from spa.engine.checkpoint import CheckpointError, atomic_write, check_output_file, load_checkpoint
from spa.errors import ConfigError

__all__ = ["FORMAT", "export_model", "load_export", "register"]

FORMAT = "spa-export/1"  # the ``format`` metadata entry that marks a file as an spa export
_ALWAYS_KEPT = ("run_config", "classes")  # extra entries an export keeps whatever their size
_SMALL = 4096  # other extra entries are kept when their JSON is at most this many characters


def _to_json(value: Any, what: str, source: Any) -> str:
    """Strict JSON of ``value``; a ``CheckpointError`` naming ``what`` when it cannot be encoded."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: its {what} cannot be stored as JSON ({err})") from err


def _is_small(value: Any) -> bool:
    """Whether ``value`` encodes as strict JSON of at most ``_SMALL`` characters."""
    try:
        return len(json.dumps(value, allow_nan=False)) <= _SMALL
    except (TypeError, ValueError):  # tensors and the like: not what rebuilds the model
        return False


def _metadata(state: dict[str, Any], source: Any) -> dict[str, str]:
    """The export's safetensors metadata (string to string)."""
    from spa import __version__

    meta = state.get("meta")
    if not isinstance(meta, dict) or not meta:
        raise CheckpointError(f"{source} has no model description ('meta'): nothing could rebuild the model")
    extra = {k: v for k, v in (state.get("extra") or {}).items() if k in _ALWAYS_KEPT or _is_small(v)}
    return {
        "format": FORMAT,
        "spa_version": __version__,
        "meta": _to_json(meta, "meta", source),
        "extra": _to_json(extra, "extra", source),
        "step": str(int(state.get("step") or 0)),
        "epoch": str(int(state.get("epoch") or 0)),
    }


def _weights(state_dict: dict[str, Any], source: Any) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the model's tensors (copies: safetensors refuses shared storage)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: its 'model' entry is not a state dict")
    foreign = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if foreign:
        raise CheckpointError(f"{source}: model entries that are not tensors: {foreign[:3]}")
    return {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()
    }


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model weights of ``checkpoint`` (a ``spa train`` checkpoint, or an export) to ``out``
    (``.safetensors``), with the metadata that rebuilds the model; atomically. An existing ``out`` is
    replaced only with ``overwrite``. Returns ``out``."""
    from safetensors.torch import save

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"the export must be a .safetensors file, got {str(out)!r}")
    check_output_file(out, "the export")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or give another file name")
    state = load_checkpoint(checkpoint)
    metadata = _metadata(state, checkpoint)
    tensors = _weights(state["model"], checkpoint)
    return atomic_write(out, lambda f: f.write(save(tensors, metadata=metadata)))


def _int_keys(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with ``classes["label_to_cat_id"]``'s keys as ints again (JSON made them strings)."""
    classes = extra.get("classes")
    mapping = classes.get("label_to_cat_id") if isinstance(classes, dict) else None
    if isinstance(mapping, dict):
        classes["label_to_cat_id"] = {int(k): v for k, v in mapping.items()}
    return extra


def _parse_metadata(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """``meta``, ``extra``, ``step``, ``epoch`` and ``spa_version`` of an export's metadata."""
    try:
        return {
            "meta": json.loads(metadata["meta"]),
            "extra": _int_keys(json.loads(metadata["extra"])),
            "step": int(metadata["step"]),
            "epoch": int(metadata["epoch"]),
            "spa_version": metadata["spa_version"],
        }
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged spa export metadata ({type(err).__name__}: {err})") from err


def load_export(path: str | os.PathLike) -> dict[str, Any]:
    """Read an ``spa export`` file as a weights-only checkpoint state: ``{"model", "meta", "extra",
    "step", "epoch", "spa_version"}``. ``CheckpointError`` for a corrupt or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not an spa export (no spa metadata)")
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except CheckpointError:
        raise
    except Exception as err:  # truncated header, bad offsets, not safetensors at all...
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    return {"model": tensors, **_parse_metadata(metadata, path)}


def _run_export(args: argparse.Namespace) -> int:
    out = export_model(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa export``."""
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's model weights as .safetensors (readable by spa eval)",
        description="Write the model weights of a spa train checkpoint to a .safetensors file, with the "
        "task, model and run configuration in its metadata (no optimizer state).",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by spa train (e.g. OUT/checkpoints/last.pt)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_run_export)
