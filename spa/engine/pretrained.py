"""``spa train --pretrained PATH``: start a task model's backbone from a Swin (or spa) checkpoint.

Accepted files: everything :func:`spa.load_swin_weights` reads (timm, Microsoft, mmdetection Swin files,
``.safetensors``, nested ``model`` / ``state_dict``) and spa checkpoints or exports (their backbone: the
detector's ``detector.backbone.body.*`` or the classifier's ``backbone.*`` weights). The file is read and
checked before any data is opened; the load report is printed and kept with the run.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spa.errors import SpaError, SpaWarning

__all__ = ["PretrainedError", "PretrainedReport", "file_sha256", "load_pretrained", "read_pretrained"]

# where a task model keeps its backbone, in an spa checkpoint's state dict
_SPA_BACKBONE_PREFIXES = ("detector.backbone.body.model.", "detector.backbone.body.", "backbone.")
_SWIN_KEYS = ("patch_embed.", "layers.", "stages.")


class PretrainedError(SpaError, ValueError):
    """A ``--pretrained`` file that is missing, unreadable or holds no backbone weights."""


@dataclass
class PretrainedReport:
    """What ``--pretrained`` loaded: the file, its sha256, and :class:`spa.LoadResult`'s lists."""

    path: str
    sha256: str
    source: str  # "swin" (a Swin checkpoint) or "spa" (an spa checkpoint's backbone)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    block_map: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_map"] = {str(k): v for k, v in self.block_map.items()}
        return d

    def summary(self) -> str:
        gates = sum(".gate." in k for k in self.missing)
        return (
            f"pretrained {self.path} (sha256 {self.sha256[:12]}, {self.source}): loaded {self.loaded} tensors, "
            f"{len(self.missing)} new ({gates} gate), {len(self.unexpected)} unexpected"
            + (f" (e.g. {self.unexpected[:3]})" if self.unexpected else "")
            + f"; SPT block map {self.block_map}"
        )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _spa_backbone(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The backbone weights of an spa checkpoint (``meta.task`` set) or of a detector's weights (export),
    or None for other files."""
    is_checkpoint = isinstance(state.get("meta"), dict) and "task" in state["meta"]
    weights = state.get("model") or {} if is_checkpoint else state
    for prefix in _SPA_BACKBONE_PREFIXES[:2] if not is_checkpoint else _SPA_BACKBONE_PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if picked:
            return picked
    return {} if is_checkpoint else None


def read_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], PretrainedReport]:
    """Read and check a ``--pretrained`` file: ``(backbone state dict, report without load results)``.

    Raises :class:`PretrainedError` naming the file when it does not exist, cannot be read, or holds no
    backbone weights (no ``patch_embed`` / ``layers`` / ``stages`` keys).
    """
    from spa.models.swin_weights import _read, _unwrap

    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {path}: no such file")
    try:
        raw = _read(path)
    except Exception as err:
        raise PretrainedError(f"--pretrained {path}: cannot read it ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise PretrainedError(f"--pretrained {path}: holds a {type(raw).__name__}, not a state dict")
    spa_weights = _spa_backbone(raw)
    source = "spa" if spa_weights is not None else "swin"
    try:
        state = spa_weights if spa_weights is not None else _unwrap(raw)
    except ValueError as err:
        raise PretrainedError(f"--pretrained {path}: {err}") from err
    if not any(k.startswith(_SWIN_KEYS) for k in state):
        raise PretrainedError(
            f"--pretrained {path}: no backbone weights in it (no patch_embed.* / layers.* / stages.* keys; "
            f"first keys: {sorted(state)[:3]})"
        )
    return state, PretrainedReport(path=str(path.resolve()), sha256=file_sha256(path), source=source)


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone inside a task model (a detector's FPN body, a classifier's backbone) or the model."""
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "body", backbone)


def load_pretrained(
    model: nn.Module, path: str | Path, read: tuple[dict[str, torch.Tensor], PretrainedReport] | None = None
) -> PretrainedReport:
    """Load a ``--pretrained`` file into ``model``'s backbone (SPT or dense Swin baseline) in place.

    ``read`` (what :func:`read_pretrained` returned) avoids reading the file twice. A file whose tensors fit
    none of the backbone's weights raises :class:`PretrainedError`; a shape mismatch raises it naming the key.
    """
    from spa.models.swin_weights import load_swin_weights

    state, report = read or read_pretrained(path)
    body = backbone_of(model)
    try:
        result = load_swin_weights(body, state)
    except (ValueError, TypeError) as err:
        raise PretrainedError(f"--pretrained {path}: {err}") from err
    own = len(body.state_dict())
    report.loaded = own - len(result.missing)
    report.missing, report.unexpected, report.block_map = result.missing, result.unexpected, result.block_map
    if report.loaded == 0:
        raise PretrainedError(
            f"--pretrained {path}: none of its tensors fit the {type(body).__name__} backbone"
        )
    backbone = own - sum(".gate." in k for k in result.missing)  # the gates always start fresh
    if report.loaded < backbone / 2:
        warnings.warn(
            f"--pretrained {path}: only {report.loaded} of the backbone's {backbone} tensors came from it, the "
            "others start random: is it a checkpoint of this backbone?",
            SpaWarning,
            stacklevel=2,
        )
    return report
