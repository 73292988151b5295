"""The selection record every SPA block fills and the backbone returns, and the kept-token counts made from it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Selection", "keep_ratios", "token_counts", "valid_token_mask"]


@dataclass(frozen=True)
class Selection:
    """What one SPA block decided, on its feature map of ``H x W`` tokens.

    All tensors are ``[B, H, W]`` in the image frame (never the rolled frame of shifted blocks) and
    cover only real tokens: the padding a block adds to reach a multiple of the window is not included.

    Attributes:
        own_logits: the block's own gate logits, before fusion (the selection loss uses these).
        fused_logits: ``max(own_logits, previous block's fused logits)``; ``sigmoid`` of it is the soft
            factor on the attention branch of kept tokens.
        keep: bool mask of the tokens the block kept (attended to and updated).
        stage: index of the backbone stage (0-based) the block belongs to.
        block: index of the block within its stage (0-based).
        stride: the feature map's stride in input pixels (16 for stage 3 of a Swin/SPT, 32 for stage 4).
    """

    own_logits: torch.Tensor
    fused_logits: torch.Tensor
    keep: torch.Tensor
    stage: int
    block: int
    stride: int

    def __post_init__(self) -> None:
        shapes = {self.own_logits.shape, self.fused_logits.shape, self.keep.shape}
        if len(shapes) != 1 or self.keep.dim() != 3:
            raise ValueError(
                "Selection tensors must all be [B, H, W]; got own_logits "
                f"{tuple(self.own_logits.shape)}, fused_logits {tuple(self.fused_logits.shape)}, "
                f"keep {tuple(self.keep.shape)}"
            )
        if self.keep.dtype != torch.bool:
            raise TypeError(f"Selection.keep must be a bool tensor, got {self.keep.dtype}")

    @property
    def keep_ratio(self) -> torch.Tensor:
        """Fraction of tokens kept, per image: ``[B]`` float."""
        return self.keep.flatten(1).float().mean(1)

    @property
    def num_kept(self) -> torch.Tensor:
        """Number of tokens kept, per image: ``[B]`` long."""
        return self.keep.flatten(1).sum(1)


def valid_token_mask(
    image_sizes: Sequence[tuple[int, int]],
    grid: tuple[int, int],
    stride: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``[B, gh, gw]`` bool: the tokens of a padded batch's stride grid that lie on each image's real area
    (image ``i`` of ``image_sizes[i] = (h, w)`` pixels sits top-left and covers ``ceil(h/s) x ceil(w/s)``)."""
    sizes = torch.tensor(
        [[math.ceil(h / stride), math.ceil(w / stride)] for h, w in image_sizes], device=device
    )
    rows = torch.arange(grid[0], device=device)
    cols = torch.arange(grid[1], device=device)
    return (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])


def token_counts(
    selections: Sequence[Selection],
    labels: Mapping[int, torch.Tensor] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> dict[int, torch.Tensor]:
    """Per SPA stage, summed over its blocks: float64 ``[kept, all, kept object, object, kept background,
    background]`` token counts (on the selections' device, no host sync).

    ``labels``: ``stride -> [B, h, w]`` selection labels (object = label > 0.5); without them the object and
    background entries are 0. ``image_sizes``: each image's real ``(h, w)`` in pixels inside a padded batch;
    tokens on the padding are then left out of every count.
    """
    out: dict[int, torch.Tensor] = {}
    valid_at: dict[int, torch.Tensor] = {}
    for sel in selections:
        keep = sel.keep
        if sel.stride not in valid_at:
            valid_at[sel.stride] = (
                valid_token_mask(image_sizes, tuple(keep.shape[-2:]), sel.stride, keep.device)
                if image_sizes is not None
                else torch.ones_like(keep)
            )
        valid = valid_at[sel.stride]
        kept = keep & valid
        counts = [kept.sum(), valid.sum()]
        if labels is not None and sel.stride in labels:
            obj = (labels[sel.stride].to(keep.device) > 0.5) & valid
            bg = valid & ~obj
            counts += [(kept & obj).sum(), obj.sum(), (kept & bg).sum(), bg.sum()]
        else:
            counts += [keep.new_zeros((), dtype=torch.long)] * 4
        c = torch.stack(counts).double()
        out[sel.stage] = out[sel.stage] + c if sel.stage in out else c
    return out


def keep_ratios(counts: Mapping[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """``stage -> {"all", "object", "background"}`` kept ratios of :func:`token_counts` (NaN where a kind
    of token is absent)."""
    out = {}
    for stage, c in sorted(counts.items()):
        c = c.cpu()
        out[stage] = {
            "all": _ratio(c[0], c[1]),
            "object": _ratio(c[2], c[3]),
            "background": _ratio(c[4], c[5]),
        }
    return out


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a / b) if b else math.nan
