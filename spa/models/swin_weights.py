"""Load Swin Transformer weights into an SPT of the same width (never downloads anything).

Sources: a state dict, a timm ``SwinTransformer`` (or any module with a ``state_dict``), or a path to a
``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file. Accepted
layouts: timm's, the original Microsoft Swin (downsample at the end of a stage, ``head.weight``),
mmdetection's own Swin (``stages.*``, ``attn.w_msa``, ``ffn.layers``, unfold-ordered patch merging), nested
``model``/``state_dict`` entries and ``backbone.``/``module.`` prefixes (detector / DDP checkpoints). Key
conversion from the original layout is timm's ``checkpoint_filter_fn`` (which also resizes relative position
bias tables to the model's window, as timm does).

Extra blocks: SPT stages can have more blocks than the Swin checkpoint (SPT-T has 10 stage-3 blocks,
Swin-T 6). SPT block ``i`` of a stage with ``n_spt`` blocks copies Swin block
``j = round(i * (n_swin - 1) / (n_spt - 1))``; when ``j``'s shift parity (even: unshifted, odd: shifted)
differs from ``i``'s, the nearest block of the right parity is taken instead (ties: the lower one). With
equal depths this is the identity. The SPA gate (``gate.proj``) is not in Swin checkpoints and keeps its
initialisation (reported in ``missing``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

__all__ = ["LoadResult", "load_swin_weights", "swin_block_for"]

_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$")


@dataclass
class LoadResult:
    """What ``load_swin_weights`` did.

    Attributes:
        missing: model keys the checkpoint did not provide (e.g. the SPA gates).
        unexpected: checkpoint keys (after conversion) the model has no place for.
        block_map: per stage, the Swin block each model block was copied from.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    block_map: dict[int, list[int]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"LoadResult(missing={len(self.missing)} keys, unexpected={len(self.unexpected)} keys, "
            f"block_map={self.block_map})"
        )


def swin_block_for(index: int, n_model: int, n_swin: int) -> int:
    """The Swin block that block ``index`` of an ``n_model``-block stage copies (rule in the module doc)."""
    if n_model == 1 or n_swin == 1:
        return 0
    j = round(index * (n_swin - 1) / (n_model - 1))
    if j % 2 == index % 2:
        return j
    candidates = [c for c in (j - 1, j + 1) if 0 <= c < n_swin]
    return (
        min(candidates, key=lambda c: (abs(c - index * (n_swin - 1) / (n_model - 1)), c)) if candidates else j
    )


def _read(source) -> dict:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (load_swin_weights never downloads)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path), device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read weights from {path}: {type(error).__name__}: {error}") from error
    raise TypeError(f"source must be a state dict, an nn.Module or a path, got {type(source).__name__}")


_MMDET_KEYS = (  # mmdetection's own Swin names -> the original Microsoft names, in this order
    (re.compile(r"^stages\."), "layers."),
    (re.compile(r"\.attn\.w_msa\."), ".attn."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
)
_UNFOLD_ORDER = [0, 2, 1, 3]  # mmdetection's PatchMerging (nn.Unfold) orders the 2x2 neighbours 0, 2, 1, 3


def _from_unfold_order(value: torch.Tensor) -> torch.Tensor:
    """Undo mmdetection's channel order of a PatchMerging input: channel ``c * 4 + u`` (``u`` the unfold
    position) back to the original ``g * C + c`` (``g`` the concatenated neighbour, ``u -> g`` by
    ``_UNFOLD_ORDER``). Works on the reduction weight ``[out, 4C]`` and on the norm's ``[4C]``."""
    flat = value.reshape(-1, value.shape[-1] // 4, 4).transpose(1, 2)[:, _UNFOLD_ORDER]
    return flat.reshape(value.shape)


def _from_mmdet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdetection's native Swin keys (``stages.*``, ``attn.w_msa``, ``ffn.layers``, ``projection``, unfold
    channel order in ``downsample``) -> the original layout; other layouts are returned unchanged.

    mmdetection's per-output norms (``norm0``..``norm3``) have no place in the model and are reported as
    unexpected."""
    if not any(k.startswith("stages.") or ".attn.w_msa." in k for k in state):
        return state
    out = {}
    for key, value in state.items():
        for pattern, replacement in _MMDET_KEYS:
            key = pattern.sub(replacement, key)
        if re.search(r"\.downsample\.(reduction\.weight|norm\.(weight|bias))$", key):
            value = _from_unfold_order(value)
        out[key] = value
    return out


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state", "module"):
        while isinstance(state.get(key), dict):
            state = state[key]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors (expected a Swin state dict)")
    for prefix in ("module.", "backbone.", "model.", "encoder."):
        if any(k.startswith(prefix) for k in tensors):
            # keep only that sub-model (mmdetection checkpoints also hold neck/head weights)
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


class _FilterProxy:
    """Stand-in for the model that ``checkpoint_filter_fn`` inspects (patch embed and bias tables)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.patch_embed = model.patch_embed

    def get_submodule(self, name: str) -> nn.Module:
        match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.attn$", name)
        if match and int(match.group(1)) < len(self.model.layers):
            return self.model.layers[int(match.group(1))].blocks[0].attn  # one window per stage
        raise KeyError(name)


def _target(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)  # features_only wrapper
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


def load_swin_weights(model: nn.Module, source, strict_shapes: bool = True) -> LoadResult:
    """Copy Swin weights from ``source`` into the SPT ``model`` (in place); returns a ``LoadResult``.

    Args:
        model: an ``SPT`` (or its ``features_only`` wrapper) of the checkpoint's width.
        source: state dict, module, or path to ``.pth``/``.pt``/``.bin``/``.safetensors``.
        strict_shapes: raise on a shape mismatch (default). With False, mismatching keys are skipped and
            reported as unexpected. A classifier (``head.*``) of another size is always skipped and reported.

    Raises:
        ValueError: a tensor's shape differs from the model's (the key is named), the file is unreadable, or
            no tensor of it fits the model (nothing would be loaded). A partial load is not an error: see
            ``LoadResult.missing``.
    """
    target = _target(model)
    if not hasattr(target, "layers") or not hasattr(target, "patch_embed"):
        raise TypeError(f"model must be an SPT (or Swin-like) backbone, got {type(model).__name__}")
    state = _from_mmdet(_unwrap(_read(source)))
    own = target.state_dict()
    # check head counts of bias tables before timm resizes them (resizing would hide a width mismatch)
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            match = _BLOCK_KEY.match(key)
            if match and int(match.group(1)) < len(target.layers):
                heads = (
                    target.layers[int(match.group(1))].blocks[0].attn.relative_position_bias_table.shape[-1]
                )
                if value.dim() != 2 or value.shape[-1] != heads:
                    raise ValueError(
                        f"shape mismatch for {key}: checkpoint {tuple(value.shape)} has "
                        f"{value.shape[-1] if value.dim() == 2 else '?'} heads, the model has {heads}"
                    )
    patch_key = "patch_embed.proj.weight"
    if patch_key in state and state[patch_key].shape[:2] != own[patch_key].shape[:2]:
        raise ValueError(
            f"shape mismatch for {patch_key}: checkpoint {tuple(state[patch_key].shape)}, model "
            f"{tuple(own[patch_key].shape)} (embed_dim or in_chans differ)"
        )
    beyond = [
        k
        for k in state
        if k.endswith("relative_position_bias_table")
        and (m := _BLOCK_KEY.match(k)) is not None
        and int(m.group(1)) >= len(target.layers)
    ]
    state = checkpoint_filter_fn({k: v for k, v in state.items() if k not in beyond}, _FilterProxy(target))

    # stage depths in the checkpoint, then map model blocks onto checkpoint blocks
    swin_depth: dict[int, int] = {}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            swin_depth[stage] = max(swin_depth.get(stage, 0), block + 1)
    converted: dict[str, torch.Tensor] = {k: v for k, v in state.items() if not _BLOCK_KEY.match(k)}
    used: set[str] = set(converted)
    result = LoadResult()
    for stage, layer in enumerate(target.layers):
        n_model, n_swin = len(layer.blocks), swin_depth.get(stage, 0)
        if n_swin == 0:
            continue
        mapping = [swin_block_for(i, n_model, n_swin) for i in range(n_model)]
        result.block_map[stage] = mapping
        for i, j in enumerate(mapping):
            prefix = f"layers.{stage}.blocks.{j}."
            for key, value in state.items():
                if key.startswith(prefix):
                    converted[f"layers.{stage}.blocks.{i}.{key[len(prefix) :]}"] = value
                    used.add(key)
    unexpected = [k for k in state if k not in used] + beyond

    loadable: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key not in own:
            unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if strict_shapes and not key.startswith("head."):  # a classifier of another size is skipped
                raise ValueError(
                    f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}; "
                    "load weights of a Swin of the same width (embed_dim / num_heads)"
                )
            unexpected.append(key)
            continue
        loadable[key] = value
    if not loadable:  # a readable file of something else (a ResNet, a detector's head): never a silent no-op
        shown = ", ".join(sorted(set(unexpected))[:3]) or "none"
        raise ValueError(
            f"no tensor of the checkpoint fits the model (keys such as {shown}): is it a Swin checkpoint?"
        )
    outcome = target.load_state_dict(loadable, strict=False)
    result.missing = sorted(outcome.missing_keys)
    result.unexpected = sorted(set(unexpected))
    return result
