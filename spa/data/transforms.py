"""Box-aware augmentation with ``torchvision.transforms.v2`` (boxes, masks, labels move together), for
detection and for classification."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "UpdateArea", "classification_transforms", "detection_transforms"]


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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def classification_transforms(
    train: bool, size: int, boxes: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> v2.Compose:
    """``torchvision.transforms.v2`` pipeline to a ``size x size`` normalised float image.

    ``boxes=False`` (folders): train = RandomResizedCrop + flip, eval = resize + center crop.
    ``boxes=True`` (multi-label from detection data): the whole image is resized to ``size x size`` (the
    image-level labels stay true), flipped in training; boxes and masks follow (tv_tensors).
    """
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if boxes:
        if train:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.Resize((size, size), antialias=True), v2.ClampBoundingBoxes()]
    elif train:
        steps += [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps += [v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)
