"""Check a dataset before training: every annotation read, every image opened, all problems at once.

``quick``: the annotations of every item are parsed (the datasets' own checks) and every image file's
header is opened (exists, readable format, the annotated size). ``full``: every item is loaded with the
data loader's own code (``dataset[i]``: full decode, targets, transforms). ``spa data check SPEC`` runs it
on a data spec; ``spa train`` runs it before step 1 (``--check-data``; ``--bad-images skip`` trains without
the training items it found bad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from spa.data.common import DatasetError, check_image_header

__all__ = ["CHECK_MODES", "DataReport", "SkipItems", "check_dataset"]

CHECK_MODES = ("full", "quick", "off")
_PROBLEMS = (DatasetError, FileNotFoundError, OSError, ValueError, KeyError, IndexError)


@dataclass
class DataReport:
    """What :func:`check_dataset` found: the items checked and, per bad item, its index and message; how many
    detection items have no boxes (None when the items carry no boxes); and notes, e.g. what opening the data
    repaired (dropped degenerate boxes), which are not problems."""

    source: str
    items: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    without_boxes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bad_indices(self) -> list[int]:
        return [i for i, _ in self.problems]

    def summary(self, limit: int = 20) -> str:
        if not self.items:
            return f"{self.source}: no items (an empty split: nothing to train or evaluate on)"
        if not self.problems:
            lines = [f"{self.source}: {self.items} items, no problems"]
        else:
            lines = [f"{self.source}: {len(self.problems)} of {self.items} items have problems:"]
            lines += [f"  item {i}: {message}" for i, message in self.problems[:limit]]
            if len(self.problems) > limit:
                lines.append(f"  ... and {len(self.problems) - limit} more")
        if self.without_boxes:
            lines.append(
                f"  note: {self.without_boxes} item(s) without boxes (a detector trains on them as negatives)"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _quick_item(dataset: Any, index: int) -> Any:
    """Check one item cheaply; returns its target when that was read (else None)."""
    image_file = getattr(dataset, "image_file", None)
    if image_file is None:  # a dataset without a way to name its files: load the item
        return _target_of(dataset[index])
    path, size, context = image_file(index)
    check_image_header(path, context, size)
    load_target = getattr(dataset, "load_target", None)
    if load_target is not None:  # the annotations (masks decoded) without the image
        return load_target(index)
    return None


def _target_of(item: Any) -> Any:
    return item[1] if isinstance(item, tuple) and len(item) == 2 else None


def _has_no_boxes(target: Any) -> bool | None:
    """Whether a detection target holds no boxes (None: not a detection target)."""
    boxes = target.get("boxes") if isinstance(target, dict) else None
    return None if boxes is None else len(boxes) == 0


def check_dataset(
    dataset: Dataset,
    mode: str = "quick",
    source: str = "data",
    progress: Callable[[int, int], None] | None = None,
) -> DataReport:
    """Check every item of ``dataset`` (``mode`` ``quick`` or ``full``, see the module docstring)."""
    if mode not in ("full", "quick"):
        raise ValueError(f"check mode must be 'full' or 'quick', got {mode!r}")
    report = DataReport(source, items=len(dataset))  # type: ignore[arg-type]
    for index in range(report.items):
        try:
            target = _target_of(dataset[index]) if mode == "full" else _quick_item(dataset, index)
        except _PROBLEMS as err:
            report.problems.append((index, str(err).strip("'\"")))
            target = None
        empty = _has_no_boxes(target)
        if empty is not None:
            report.without_boxes = (report.without_boxes or 0) + int(empty)
        if progress is not None:
            progress(index + 1, report.items)
    return report


class SkipItems(Dataset):
    """``dataset`` without the items at ``skip``; other attributes (``num_classes``, ``class_names``...) pass
    through."""

    def __init__(self, dataset: Dataset, skip: list[int]) -> None:
        self.dataset = dataset
        dropped = set(skip)
        self.keep = [i for i in range(len(dataset)) if i not in dropped]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.keep[index]]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "keep"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
