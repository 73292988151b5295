"""Pascal VOC (xml) detection dataset.

VOC boxes are 1-based inclusive pixel indices; they become continuous xyxy ``[xmin-1, ymin-1, xmax,
ymax]`` (pixel-area semantics, see :mod:`spa.labels`). ``difficult`` objects are treated like COCO
crowd: out of the targets by default (VOC evaluation ignores them), marked ``iscrowd=1`` with
``include_difficult=True``. Malformed xml, missing fields or unknown class names raise
:class:`DatasetError` naming the file and the object; degenerate boxes are dropped with a warning
(``bad_boxes="error"`` raises); boxes partly outside the image are clipped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from spa.data.common import DatasetError, load_rgb, make_target, warn_dropped

__all__ = ["VOC_CLASSES", "VOCDetection"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _text(node: ET.Element, path: str, where: str) -> str:
    found = node.find(path)
    if found is None or found.text is None:
        raise DatasetError(f"{where}: missing <{path}>")
    return found.text.strip()


class VOCDetection(torch.utils.data.Dataset):
    """Pascal VOC layout: ``root/Annotations/<id>.xml``, ``root/JPEGImages/<file>``,
    ``root/ImageSets/Main/<image_set>.txt`` (or pass ``ids``). Returns ``(image, target)`` like
    :class:`~spa.data.coco.CocoDetection` (no masks); labels are ``1 + classes.index(name)``."""

    def __init__(
        self,
        root: str | Path,
        image_set: str = "trainval",
        classes: Sequence[str] = VOC_CLASSES,
        transforms: Callable | None = None,
        include_difficult: bool = False,
        ids: Sequence[str] | None = None,
        bad_boxes: str = "drop",
    ) -> None:
        if bad_boxes not in ("drop", "error"):
            raise ValueError(f"bad_boxes must be 'drop' or 'error', got {bad_boxes!r}")
        self.root = Path(root)
        self.class_names = list(classes)
        self.transforms = transforms
        self.include_difficult = include_difficult
        self.bad_boxes = bad_boxes
        if ids is None:
            split = self.root / "ImageSets" / "Main" / f"{image_set}.txt"
            if not split.is_file():
                raise FileNotFoundError(f"{split}: image set file missing")
            ids = [line.split()[0] for line in split.read_text().splitlines() if line.strip()]
        self.ids = list(ids)
        self._parsed: dict[int, tuple] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def _parse(self, index: int) -> tuple:
        if index in self._parsed:
            return self._parsed[index]
        xml_path = self.root / "Annotations" / f"{self.ids[index]}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"{xml_path}: annotation file missing (image id {self.ids[index]})")
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise DatasetError(f"{xml_path}: corrupt or truncated annotation xml: {e}") from e
        where = str(xml_path)
        file_name = root.findtext("filename", default=f"{self.ids[index]}.jpg").strip()
        size = None
        if root.find("size") is not None:
            try:
                size = (int(_text(root, "size/height", where)), int(_text(root, "size/width", where)))
            except ValueError as e:
                raise DatasetError(f"{where}: non-integer <size>: {e}") from e
        objs, dropped = [], []
        for k, obj in enumerate(root.findall("object")):
            owhere = f"{where}: object {k}"
            name = _text(obj, "name", owhere)
            if name not in self.class_names:
                raise DatasetError(f"{owhere}: unknown class name {name!r}")
            try:
                x1, y1, x2, y2 = (
                    float(_text(obj, f"bndbox/{t}", owhere)) for t in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError as e:
                raise DatasetError(f"{owhere}: non-numeric bndbox: {e}") from e
            x1, y1 = x1 - 1.0, y1 - 1.0
            if size is not None:
                x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, size[1]), min(y2, size[0])
            if x2 <= x1 or y2 <= y1:
                if self.bad_boxes == "error":
                    raise DatasetError(f"{owhere}: degenerate or outside box {[x1 + 1, y1 + 1, x2, y2]}")
                dropped.append(f"object {k}")
                continue
            flag = obj.findtext("difficult", default="0").strip() or "0"
            try:
                difficult = int(float(flag))
            except ValueError as e:
                raise DatasetError(f"{owhere}: <difficult> must be 0 or 1, got {flag!r}") from e
            objs.append(([x1, y1, x2, y2], 1 + self.class_names.index(name), difficult))
        warn_dropped(where, "dropped degenerate boxes", dropped)
        self._parsed[index] = (file_name, size, objs)
        return self._parsed[index]

    def image_labels(self, index: int) -> list[int]:
        """Labels of an image's objects (difficult ones only with ``include_difficult``)."""
        return [lab for _, lab, d in self._parse(index)[2] if self.include_difficult or not d]

    def image_file(self, index: int) -> tuple[Path, tuple[int, int] | None, str]:
        """``(path, (H, W) from the xml or None, context for messages)``; parses (checks) the annotation."""
        file_name, size, _ = self._parse(index)
        return (
            self.root / "JPEGImages" / file_name,
            size,
            f"image id {self.ids[index]} of {self.root / 'Annotations'}",
        )

    def __getitem__(self, index: int):
        path, size, context = self.image_file(index)
        _, _, objs = self._parse(index)
        image = load_rgb(path, context, expect_size=size)
        h, w = image.shape[-2:]
        objs = [o for o in objs if self.include_difficult or not o[2]]
        if size is None:  # no <size> in the xml: clip to the file's size, drop what is left empty
            clipped = [([max(b[0], 0.0), max(b[1], 0.0), min(b[2], w), min(b[3], h)], *o) for b, *o in objs]
            warn_dropped(
                str(self.root / "Annotations" / f"{self.ids[index]}.xml"),
                "dropped boxes outside the image",
                [f"object {k}" for k, (b, *_) in enumerate(clipped) if b[2] <= b[0] or b[3] <= b[1]],
            )
            objs = [(b, *o) for b, *o in clipped if b[2] > b[0] and b[3] > b[1]]
        boxes = [b for b, _, _ in objs]
        target = make_target(
            index,
            (h, w),
            boxes,
            [lab for _, lab, _ in objs],
            [d for _, _, d in objs],
            [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes],
            None,
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
