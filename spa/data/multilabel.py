"""Multi-label classification view of a detection dataset: the set of classes present per image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MultiLabelView", "multi_hot"]


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
