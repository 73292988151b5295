"""Single-label image folders (``torchvision.datasets.ImageFolder`` layout ``ROOT/{train,val}/CLASS/IMAGE``)
with checks and clear errors, as ``(image, {"label": index})`` items for the classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from spa.data.common import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "folder_items", "image_folder"]

IMAGE_EXTENSIONS = tuple(tv_datasets.folder.IMG_EXTENSIONS)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder(
    root: str | Path, split: str, transform: Callable | None = None, classes: Sequence[str] | None = None
) -> tv_datasets.ImageFolder:
    """``torchvision.datasets.ImageFolder`` over ``ROOT/split`` with checks and clear errors.

    ``classes``: the class list (training classes) the labels must index; a class folder not in it is an
    error (unknown class name); classes missing from this split are fine. Image files placed directly in
    the split folder (no class folder, so no label) and empty class folders are errors.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: no such folder (folder data needs ROOT/train/CLASS/*.jpg and ROOT/val/...)"
        )
    loose = _image_files(folder)
    if loose:
        raise DatasetError(
            f"{folder}: {len(loose)} image(s) without a label (not inside a class folder), e.g. {loose[0].name}"
        )
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{folder}: no class folders (expected {folder}/CLASS_NAME/IMAGE files)")
    empty = [d for d in dirs if not _image_files(folder / d)]
    if empty:
        raise DatasetError(f"{folder}: class folder(s) without images: {empty}")
    known = list(classes) if classes is not None else dirs
    unknown = sorted(set(dirs) - set(known))
    if unknown:
        raise DatasetError(f"{folder}: unknown class name(s) {unknown}; the classes are {known}")
    index = {c: i for i, c in enumerate(known)}
    data = tv_datasets.ImageFolder(str(folder), transform=transform, loader=_rgb_image)
    remap = {i: index[c] for c, i in data.class_to_idx.items()}
    data.target_transform = remap.__getitem__
    data.classes, data.class_to_idx = known, index
    data.num_classes, data.class_names = len(known), known  # type: ignore[attr-defined]
    return data


def _rgb_image(path: str):
    """torchvision's ``pil_loader`` (an RGB ``PIL.Image``), with an unreadable file a ``DatasetError`` that
    names it (PIL names the open file object instead)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DatasetError(f"{path}: unreadable image ({reason})") from err


class _FolderItems(Dataset):
    """``(image, {"label": class index})`` items of an :func:`image_folder` (for the classifier)."""

    def __init__(self, folder: tv_datasets.ImageFolder) -> None:
        self.folder = folder
        self.num_classes, self.class_names = folder.num_classes, folder.class_names

    def __len__(self) -> int:
        return len(self.folder)

    def image_file(self, index: int) -> tuple[Path, None, str]:
        """``(path, None, context)`` of an image, without reading it."""
        return Path(self.folder.samples[index][0]), None, f"{self.folder.root}, item {index}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, label = self.folder[index]
        return image, {"label": torch.tensor(label, dtype=torch.int64)}


def folder_items(root: str | Path, split: str, transform: Callable | None, classes=None) -> _FolderItems:
    """:func:`image_folder` items as ``(image, {"label": index})``."""
    return _FolderItems(image_folder(root, split, transform, classes))
