"""Multi-label classification view of a detection dataset: the set of classes present per image."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from spa.data.common import DatasetError, load_rgb
from spa.errors import SpaWarning

__all__ = ["BoxedMultiLabelView", "MultiLabelList", "MultiLabelView", "check_labeled", "multi_hot"]


def multi_hot(labels: torch.Tensor | list[int], num_classes: int) -> torch.Tensor:
    """Detection labels ``1..K`` (0 = background, ignored) -> float multi-hot ``[K]``."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"labels must be in 0..{num_classes}, got {labels.tolist()}")
    out = torch.zeros(num_classes + 1)
    out[labels] = 1.0
    return out[1:]


class MultiLabelView(torch.utils.data.Dataset):
    """Wrap a detection dataset (:class:`CocoDetection`, :class:`VOCDetection`, ...) to return
    ``(image, multi_hot [K])``; ``transform`` acts on the image only. Crowd/difficult objects follow
    the wrapped dataset's setting."""

    def __init__(self, dataset: Any, transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.num_classes = int(dataset.num_classes)
        self.class_names = list(dataset.class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def targets(self) -> torch.Tensor:
        """All multi-hot targets ``[N, K]``, from the annotations only (no image is read)."""
        return torch.stack(
            [multi_hot(self.dataset.image_labels(i), self.num_classes) for i in range(len(self))]
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.dataset[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, multi_hot(target["labels"], self.num_classes)


def check_labeled(view: MultiLabelView, source: str, empty_images: str = "error") -> MultiLabelView:
    """Refuse (``"error"``) or drop (``"drop"``, with a warning) images without any class; ``"keep"``
    keeps them as all-negative examples."""
    if empty_images not in ("error", "drop", "keep"):
        raise ValueError(f"empty_images must be 'error', 'drop' or 'keep', got {empty_images!r}")
    if empty_images == "keep" or len(view) == 0:
        return view
    targets = view.targets()
    empty = (targets.sum(1) == 0).nonzero().flatten().tolist()
    if empty and empty_images == "error":
        ids = [_image_name(view.dataset, i) for i in empty[:5]]
        raise DatasetError(
            f"{source}: {len(empty)} image(s) without labels (no objects), e.g. {ids}; "
            "use --empty-images drop (or keep, as all-negative examples)"
        )
    if empty:
        warnings.warn(f"{source}: dropped {len(empty)} image(s) without labels", SpaWarning, stacklevel=2)
        dropped = set(empty)
        view.indices = [i for i in range(len(view)) if i not in dropped]  # type: ignore[attr-defined]
    return view


def _image_name(dataset: Any, index: int) -> str:
    ids = getattr(dataset, "ids", None)
    return f"image id {ids[index]}" if ids is not None else f"index {index}"


class BoxedMultiLabelView(MultiLabelView):
    """:class:`~spa.data.MultiLabelView` whose items keep the boxes (and masks) for selection labels.

    ``transforms(image, target)`` acts jointly (``torchvision.transforms.v2``: boxes follow the image).
    Items: ``(image, {"label": multi_hot [K], "boxes": [M, 4], "masks": [M, H, W] (if any)})``.
    ``boxes=False`` returns the label only (unsupervised-gate mode).
    """

    def __init__(self, dataset: Any, transforms: Callable | None = None, boxes: bool = True) -> None:
        super().__init__(dataset)
        self.transforms = transforms
        self.boxes = boxes
        self.indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def targets(self) -> torch.Tensor:
        rows = self.indices if self.indices is not None else range(len(self.dataset))
        return torch.stack([multi_hot(self.dataset.image_labels(i), self.num_classes) for i in rows])

    def image_file(self, index: int) -> tuple[Path, tuple[int, int] | None, str]:
        """The wrapped dataset's ``image_file`` of an item."""
        return self.dataset.image_file(self.indices[index] if self.indices is not None else index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.indices is not None:
            index = self.indices[index]
        image, target = self.dataset[index]
        label = multi_hot(target["labels"], self.num_classes)
        keep = {k: target[k] for k in ("boxes", "masks") if k in target} if self.boxes else {}
        if self.transforms is not None:
            image, keep = self.transforms(image, keep)
        out = {"label": label}
        for k, v in keep.items():
            out[k] = torch.as_tensor(v)
        return image, out


class MultiLabelList(Dataset):
    """A multi-label set without boxes: ``DIR/classes.txt`` (one class name a line) and ``DIR/SPLIT.txt``
    lines ``IMAGE_PATH CLASS [CLASS ...]`` (paths relative to ``DIR``; ``#`` starts a comment).

    An unknown class name, a line without classes (an image without labels) or a missing image file is a
    ``DatasetError`` naming the file and line.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        classes_file, list_file = self.root / "classes.txt", self.root / f"{split}.txt"
        for f in (classes_file, list_file):
            if not f.is_file():
                raise DatasetError(f"{f}: missing (a label list needs classes.txt and {split}.txt in {root})")
        names = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise DatasetError(f"{classes_file}: no class names")
        if len(set(names)) != len(names):
            raise DatasetError(f"{classes_file}: duplicate class names")
        self.class_names = names
        self.num_classes = len(names)
        index = {c: i for i, c in enumerate(names)}
        self.items: list[tuple[Path, list[int]]] = []
        for n, line in enumerate(list_file.read_text().splitlines(), start=1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            where = f"{list_file}:{n}"
            if len(parts) == 1:
                raise DatasetError(f"{where}: image {parts[0]} has no labels")
            unknown = [c for c in parts[1:] if c not in index]
            if unknown:
                raise DatasetError(f"{where}: class name(s) {unknown} not in {classes_file} ({names})")
            path = self.root / parts[0]
            if not path.is_file():
                raise DatasetError(f"{where}: image file {path} missing")
            self.items.append((path, sorted({index[c] + 1 for c in parts[1:]})))
        if not self.items:
            raise DatasetError(f"{list_file}: no images listed")

    def __len__(self) -> int:
        return len(self.items)

    def targets(self) -> torch.Tensor:
        return torch.stack([multi_hot(labels, self.num_classes) for _, labels in self.items])

    def image_file(self, index: int) -> tuple[Path, None, str]:
        """``(path, None, context)`` of an item's image, without reading it."""
        return self.items[index][0], None, f"{self.root}, item {index}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path, labels = self.items[index]
        image = load_rgb(path, f"{self.root}, item {index}")
        if self.transform is not None:
            image = self.transform(image)
        return image, {"label": multi_hot(labels, self.num_classes)}
