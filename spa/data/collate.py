"""Batching helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_classification", "collate_detection", "pad_images"]


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """``[(image, target), ...] -> ([images], [targets])``: detection images keep their own sizes."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def pad_images(images: Sequence[torch.Tensor], size_divisible: int = 32, fill: float = 0.0) -> torch.Tensor:
    """Stack ``[C, H_i, W_i]`` images top-left into ``[B, C, H, W]``, ``H, W`` rounded up to ``size_divisible``
    (the frame :func:`spa.labels.batch_selection_labels` expects)."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    c = images[0].shape[0]
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h = -(-h // size_divisible) * size_divisible
    w = -(-w // size_divisible) * size_divisible
    out = images[0].new_full((len(images), c, h, w), fill)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def collate_classification(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list]:
    """``[(image, target), ...] -> (images [B, 3, H, W], [targets])`` (images of one size)."""
    images = [torch.as_tensor(b[0]) for b in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"classification images must share one size in a batch, got {sorted(shapes)}")
    return torch.stack(images), [b[1] for b in batch]
