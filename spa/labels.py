"""Selection labels: ground-truth foreground maps reduced to a backbone stage's token grid.

Geometry (pixel-area semantics). Pixel ``(r, c)`` is the unit square ``[c, c+1) x [r, r+1)``; a box
``[x1, y1, x2, y2]`` (xyxy, float pixels) is the open rectangle ``(x1, x2) x (y1, y2)``. A box marks
every pixel whose square it overlaps with **positive area**, i.e. columns ``floor(x1) .. ceil(x2)-1``
and rows ``floor(y1) .. ceil(y2)-1``, after clipping to the image. Consequences:

- a sub-pixel box of positive area marks the one (or few) pixels it touches;
- a box whose edge lies exactly on a pixel/cell edge does not spill into the next pixel/cell;
- a box with zero or negative width or height (degenerate, ``x2 <= x1`` or ``y2 <= y1``), or lying
  entirely outside the image, marks **nothing**;
- parts outside the image are clipped away.

A stride-``s`` token grid has ``ceil(H/s) x ceil(W/s)`` cells; cell ``(i, j)`` covers pixels
``[j*s, (j+1)*s) x [i*s, (i+1)*s)`` (the last row/column may reach past the image: that part is
background). A cell is 1 when any foreground pixel lies in it, which is max-pooling of the pixel map
(``ceil_mode``) — so a small object still marks at least one cell. For boxes this is computed
directly on the grid (cells ``floor(x1/s) .. ceil(x2/s)-1``), which equals pooling the pixel map.

With instance masks the masks are used instead of the boxes (the union of all instances); an instance
whose mask is empty (e.g. a thin object lost by resizing) falls back to its box, so no object is lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "batch_selection_labels",
    "box_grid",
    "check_target_frame",
    "foreground_mask",
    "grid_size",
    "mask_grid",
    "selection_labels",
]


def grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Token grid ``(ceil(H/stride), ceil(W/stride))`` of an input of ``size = (H, W)``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    h, w = int(size[0]), int(size[1])
    if h < 0 or w < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    return math.ceil(h / stride), math.ceil(w / stride)


def _as_boxes(boxes: torch.Tensor | None, device: torch.device | str | None = None) -> torch.Tensor:
    if boxes is None:
        return torch.zeros(0, 4, device=device)
    boxes = torch.as_tensor(boxes, device=device)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [M, 4] xyxy, got shape {tuple(boxes.shape)}")
    return boxes.float()


def _check_finite(boxes: torch.Tensor) -> None:
    if boxes.numel() and not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")


def _box_ranges(boxes: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Per box ``[c0, r0, c1, r1)`` cell index ranges on the stride grid (empty when c1<=c0 or r1<=r0)."""
    h, w = int(size[0]), int(size[1])
    b = boxes.double()
    x1, x2 = b[:, 0].clamp(0, w), b[:, 2].clamp(0, w)
    y1, y2 = b[:, 1].clamp(0, h), b[:, 3].clamp(0, h)
    c0 = torch.floor(x1 / stride)
    c1 = torch.ceil(x2 / stride)
    r0 = torch.floor(y1 / stride)
    r1 = torch.ceil(y2 / stride)
    empty = (x2 <= x1) | (y2 <= y1)
    out = torch.stack([c0, r0, c1, r1], dim=1).long()
    return out.masked_fill(empty[:, None], 0)


def _box_cells(boxes: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """``[M, gh, gw]`` bool: the cells each box covers (no Python loop over boxes; on the boxes' device)."""
    gh, gw = grid_size(size, stride)
    r = _box_ranges(boxes, size, stride)
    rows = torch.arange(gh, device=boxes.device)
    cols = torch.arange(gw, device=boxes.device)
    in_rows = (rows >= r[:, 1, None]) & (rows < r[:, 3, None])
    in_cols = (cols >= r[:, 0, None]) & (cols < r[:, 2, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def box_grid(boxes: torch.Tensor | None, size: tuple[int, int], stride: int = 1) -> torch.Tensor:
    """Union of ``boxes`` ([M, 4] xyxy pixels) on the stride grid of an image of ``size = (H, W)``.

    Returns a ``[ceil(H/stride), ceil(W/stride)]`` bool map (stride 1: the pixel map) on the boxes' device.
    See the module docstring for the exact covering rule; degenerate boxes mark nothing.
    """
    gh, gw = grid_size(size, stride)
    boxes = _as_boxes(boxes)
    _check_finite(boxes)
    if boxes.shape[0] == 0 or gh == 0 or gw == 0:
        return torch.zeros(gh, gw, dtype=torch.bool, device=boxes.device)
    return _box_cells(boxes, size, stride).any(0)


def foreground_mask(
    size: tuple[int, int], boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary ``[H, W]`` foreground of one image: union of ``masks`` ([M, h, w]) when given, else of ``boxes``.

    Masks smaller than ``size`` (an unpadded image inside a padded batch) are placed top-left; an
    instance with an empty mask falls back to its box (when boxes are given, one per mask). A mask pixel is
    foreground where it is nonzero (torchvision's uint8 0/1 masks, or bool): a soft mask counts wherever it is
    above 0 (threshold it first, e.g. ``masks > 0.5``), and so does NaN.
    """
    h, w = int(size[0]), int(size[1])
    if masks is None:
        return box_grid(boxes, (h, w), 1)
    masks = torch.as_tensor(masks)
    if masks.dim() != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {tuple(masks.shape)}")
    mh, mw = masks.shape[-2:]
    if mh > h or mw > w:
        raise ValueError(f"masks of size {(mh, mw)} larger than the input size {(h, w)}")
    m = masks.bool()
    out = torch.zeros(h, w, dtype=torch.bool, device=m.device)
    if m.shape[0]:
        out[:mh, :mw] = m.any(0)
    if boxes is not None:
        boxes = _as_boxes(boxes, m.device)
        _check_finite(boxes)
        if boxes.shape[0] != m.shape[0]:
            raise ValueError(f"got {boxes.shape[0]} boxes for {m.shape[0]} masks")
        empty = ~m.flatten(1).any(1) if m.shape[0] else torch.zeros(0, dtype=torch.bool)
        if empty.any():
            out |= box_grid(boxes[empty], (h, w), 1)
    return out


def mask_grid(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Max-pool a ``[..., H, W]`` binary map to ``[..., ceil(H/s), ceil(W/s)]`` (bool)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    mask = torch.as_tensor(mask)
    if stride == 1:
        return mask.bool()
    lead = mask.shape[:-2]
    h, w = mask.shape[-2:]
    gh, gw = grid_size((h, w), stride)
    x = mask.reshape(-1, 1, h, w).float()
    x = F.pad(x, (0, gw * stride - w, 0, gh * stride - h))
    return (F.max_pool2d(x, stride, stride) > 0).reshape(*lead, gh, gw)


def selection_labels(
    size: tuple[int, int],
    stride: int,
    boxes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float ``[ceil(H/s), ceil(W/s)]`` selection label of one image of ``size = (H, W)`` at ``stride``.

    Uses ``masks`` when given (with empty instance masks falling back to their boxes), else ``boxes``.
    """
    if masks is None:
        return box_grid(boxes, size, stride).float()
    return mask_grid(foreground_mask(size, boxes, masks), stride).float()


def batch_selection_labels(
    targets: Sequence[Mapping[str, Any]],
    size: tuple[int, int],
    stride: int,
    use_masks: bool = True,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Labels ``[B, ceil(H/s), ceil(W/s)]`` for torchvision-style targets (``"boxes"``, optional ``"masks"``).

    ``size`` is the (padded) input ``(H, W)`` the backbone sees; each image sits top-left in it and its
    boxes/masks must already be in that frame (after every resize). ``batch_size`` (>= len(targets))
    pads the batch with all-zero labels. Built on ``device`` (default: the device of the first target's
    boxes), with the boxes of the whole batch in one vectorised pass (no loop over boxes).

    ``image_sizes`` (each image's ``(h, w)`` inside the padded batch, as torchvision's ``ImageList`` has
    them) checks the frame: a box reaching more than a pixel past its image, or a mask of another size
    than its image, raises ``ValueError`` (targets in another frame than the images).
    """
    if image_sizes is not None:
        check_target_frame(targets, image_sizes)
    b = len(targets) if batch_size is None else batch_size
    if b < len(targets):
        raise ValueError(f"batch_size {b} smaller than the number of targets {len(targets)}")
    if device is None:
        device = next((t["boxes"].device for t in targets if torch.is_tensor(t.get("boxes"))), "cpu")
    gh, gw = grid_size(size, stride)
    out = torch.zeros(b, gh, gw, device=device)
    box_images, box_sets = [], []
    for i, t in enumerate(targets):
        masks = t.get("masks") if use_masks else None
        if masks is not None:
            out[i] = mask_grid(
                foreground_mask(size, t.get("boxes"), torch.as_tensor(masks, device=device)), stride
            )
        else:
            boxes = _as_boxes(t.get("boxes"), device)
            box_sets.append(boxes)
            box_images.append(torch.full((boxes.shape[0],), i, dtype=torch.long, device=device))
    boxes = torch.cat(box_sets) if box_sets else torch.zeros(0, 4, device=device)
    _check_finite(boxes)
    if boxes.shape[0] and gh and gw:
        cells = _box_cells(boxes, size, stride).flatten(1).float()
        covered = torch.zeros(b, gh * gw, device=device).index_add_(0, torch.cat(box_images), cells)
        out = torch.maximum(out, (covered > 0).float().view(b, gh, gw))
    return out


def check_target_frame(targets: Sequence[Mapping[str, Any]], image_sizes: Sequence[tuple[int, int]]) -> None:
    """Raise ``ValueError`` unless every target lies in its image's frame: boxes within ``(h, w)`` (1 px
    tolerance) and masks of exactly that size."""
    if len(targets) != len(image_sizes):
        raise ValueError(f"{len(targets)} targets for {len(image_sizes)} images")
    limits, boxes = [], []
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        masks = t.get("masks")
        if masks is not None and tuple(masks.shape[-2:]) != (int(h), int(w)):
            raise ValueError(
                f"target {i}: masks of size {tuple(masks.shape[-2:])} for an image of {(int(h), int(w))}: the "
                "targets are not in the frame of the images (resize them with the images)"
            )
        b = _as_boxes(t.get("boxes"))
        boxes.append(b)
        limits.append(torch.tensor([[w, h]], dtype=b.dtype, device=b.device).expand(len(b), 2))
    if not boxes or not sum(len(b) for b in boxes):
        return
    flat, limit = torch.cat(boxes), torch.cat(limits).to(torch.cat(boxes).device)
    beyond = (flat[:, 2:] > limit + 1).any(1) | (flat[:, :2] < -1).any(1)
    if beyond.any():
        first = int(beyond.nonzero()[0, 0])
        image = int(torch.repeat_interleave(torch.tensor([len(b) for b in boxes]))[first])
        raise ValueError(
            f"target {image}: box {flat[first].tolist()} reaches past its image of (h, w) = "
            f"{tuple(int(v) for v in image_sizes[image])}: the targets are not in the frame of the images "
            "(resize them with the images)"
        )
