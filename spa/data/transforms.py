"""Box-aware augmentation with ``torchvision.transforms.v2`` (boxes, masks, labels move together)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["UpdateArea", "detection_transforms"]


def _sanitize_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    target = inputs[1] if isinstance(inputs, tuple | list) else inputs
    return tuple(target[k] for k in ("labels", "iscrowd", "area") if k in target)


class UpdateArea(v2.Transform):
    """Recompute ``target["area"]`` after resizing: mask pixels when masks are present, else box area."""

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs if len(inputs) > 1 else inputs[0]
        if "masks" in target and target["masks"].shape[0] == target["boxes"].shape[0]:
            target["area"] = target["masks"].flatten(1).sum(1).float()
        elif "boxes" in target:
            b = target["boxes"].as_subclass(torch.Tensor)
            target["area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float()
        return image, target


def detection_transforms(
    train: bool = True,
    size: int = 256,
    scale_range: tuple[float, float] = (0.5, 1.5),
    flip_p: float = 0.5,
    pure: bool = True,
) -> v2.Compose:
    """Detection transforms on ``(image, target)`` with tv_tensors boxes/masks.

    Train: horizontal flip, scale jitter (resize keeping the aspect ratio so the image fits
    ``size x size`` times a factor drawn from ``scale_range``), then boxes clamped to the image and
    boxes smaller than a pixel dropped with their labels, masks, ``iscrowd`` and ``area``.
    Eval: resize so the longer side is ``size`` (aspect kept). ``area`` is recomputed in both;
    ``pure`` ends with plain tensors (``v2.ToPureTensor``) instead of tv_tensors.
    """
    if train:
        steps: list[v2.Transform] = [
            v2.RandomHorizontalFlip(flip_p),
            v2.ScaleJitter(target_size=(size, size), scale_range=scale_range, antialias=True),
        ]
    else:
        steps = [v2.Resize(size=None, max_size=size, antialias=True)]
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=_sanitize_getter),
        UpdateArea(),
    ]
    if pure:
        steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
