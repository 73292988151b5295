"""Checkpoints: written atomically, read with ``weights_only=True``, refused when they do not match.

:func:`load_checkpoint` also reads a ``.safetensors`` file written by ``spa export`` (:mod:`spa.export`), as
the weights-only state ``{"model", "meta", "extra", ...}``.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spa.errors import ConfigError, SpaError

__all__ = [
    "CheckpointError",
    "atomic_write",
    "capture_rng",
    "check_resumable",
    "finite_or_none",
    "load_checkpoint",
    "load_model_state",
    "restore_rng",
    "save_checkpoint",
    "write_json",
]


class CheckpointError(SpaError, RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another model or configuration."""


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(binary file)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A crash mid-write never leaves a truncated file under ``path`` (the previous file stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/inf float (in nested dicts/lists) replaced by ``None``: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse, before any work, an output file ``path`` that cannot be written: an existing folder, or a path
    under a file (``ConfigError``, naming ``flag``). None: no output asked for."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'out.json'})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output folder ``path`` that is an existing file or lies under one
    (``ConfigError``, naming ``flag``)."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == path else f"is under the file {blocker}"
        raise ConfigError(f"{flag} {path} {where}; give a folder")


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """Strict JSON (NaN / inf written as null), written atomically (:func:`atomic_write`)."""
    text = json.dumps(finite_or_none(value), indent=indent, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` with ``torch.save``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)`` (or an ``spa export`` ``.safetensors``
    file); clear errors for missing/unreadable."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from spa.export import load_export  # spa.export builds on this module

        return load_export(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with unsafe globals, not a checkpoint at all...
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(err)}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(
            f"{path} is not an spa checkpoint (no 'model' entry); to start a run from Swin (or other "
            "backbone) weights, pass them to spa train --pretrained, not to --resume or --checkpoint"
        )
    return state


def _why_unreadable(err: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file (never PyTorch's advice to unpickle
    it with ``weights_only=False``: spa does not run code from files)."""
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds Python objects other than tensors and plain data (spa never unpickles code)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a PyTorch checkpoint or truncated ({type(err).__name__}: {first})"


def check_resumable(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` unless ``state`` (read from ``path``) is a full spa training state."""
    if not isinstance(state.get("meta"), dict):
        raise CheckpointError(
            f"{path} is not an spa training checkpoint; to start a run from Swin (or other backbone) weights, "
            "pass it as spa train --pretrained instead of --resume"
        )
    if "optimizer" not in state:
        raise CheckpointError(
            f"{path} holds weights only (no optimizer, scheduler or data position): resume from "
            "checkpoints/last.pt, or keep step checkpoints with --keep-optimizer true"
        )


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load a state dict only if every key and shape matches: the model is never half-loaded."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(details))
    model.load_state_dict(state_dict)


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training step can touch, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
