"""The selection record every SPA block fills and the backbone returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Selection"]


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
