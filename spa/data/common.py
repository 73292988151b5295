"""Shared helpers of the datasets: errors, image loading, target assembly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from spa.errors import SpaError, SpaWarning

__all__ = ["DatasetError", "check_image_header", "load_rgb", "make_target", "warn_dropped"]


class DatasetError(SpaError, ValueError):
    """Bad dataset input (corrupt annotation file, unknown id, unreadable image, ...); the message names
    the file and the entry."""


def load_rgb(path: Path, context: str, expect_size: tuple[int, int] | None = None) -> tv_tensors.Image:
    """Read an image file as float ``[3, H, W]`` in ``[0, 1]`` (grayscale, palette, RGBA, CMYK -> RGB).

    ``context`` names the entry (e.g. ``"image id 7 of ann.json"``) in error messages. ``expect_size``
    ``(H, W)`` from the annotations must match the file, otherwise the boxes would be wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file missing ({context})")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" or im.mode == "LA" or (im.mode == "L" and "transparency" in im.info):
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "RGBa"):
                bg = Image.new("RGB", im.size, (0, 0, 0))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            elif im.mode.startswith("I;16") or im.mode == "I":  # 16-bit: full scale is 65535 (as torchvision)
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.round(arr / 65535.0 * 255), 0, 255).astype(np.uint8))
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({context}): {e}") from e
    if expect_size is not None and tuple(rgb.shape[:2]) != tuple(expect_size):
        raise DatasetError(
            f"{path}: image is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but the annotations say "
            f"{expect_size[0]}x{expect_size[1]} ({context})"
        )
    return tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0))


def check_image_header(path: Path, context: str, expect_size: tuple[int, int] | None = None) -> None:
    """Open an image file's header only (no decode): it exists, PIL knows its format, and its size is the
    annotations' ``(H, W)``. Raises what :func:`load_rgb` would for those cases."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file missing ({context})")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({context}): {e}") from e
    if expect_size is not None and (h, w) != tuple(expect_size):
        raise DatasetError(
            f"{path}: image is {h}x{w} (HxW) but the annotations say {expect_size[0]}x{expect_size[1]} ({context})"
        )


def make_target(
    image_id: int,
    size: tuple[int, int],
    boxes: list[list[float]],
    labels: list[int],
    iscrowd: list[int],
    area: list[float],
    masks: np.ndarray | None,
) -> dict:
    """A torchvision-style target: ``boxes`` (``BoundingBoxes`` XYXY), ``labels``, ``masks`` (``Mask``
    ``[M, H, W]`` uint8, only when given), ``image_id``, ``iscrowd``, ``area``."""
    h, w = size
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": int(image_id),
        "iscrowd": torch.tensor(iscrowd, dtype=torch.int64),
        "area": torch.tensor(area, dtype=torch.float32),
    }
    if masks is not None:
        target["masks"] = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks)).reshape(-1, h, w))
    return target


def warn_dropped(source: str, what: str, entries: list[str]) -> None:
    """One warning with the count and the first few entries of dropped/repaired annotations."""
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        warnings.warn(f"{source}: {what}: {len(entries)} ({shown})", SpaWarning, stacklevel=3)
