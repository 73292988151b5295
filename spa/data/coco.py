"""COCO-json detection dataset (how users bring COCO, BDD100K converted to COCO, or the built-in set).

Handling of imperfect annotations (all tested):

- corrupt/truncated JSON, missing top-level keys or fields, duplicate ids, annotations whose
  ``image_id`` or ``category_id`` is unknown, non-finite boxes: :class:`DatasetError` naming the file
  and the entry;
- boxes partly outside the image are clipped to it; boxes with zero or negative width/height, or with
  nothing left inside the image, are dropped with one warning giving the count and the annotation ids
  (``bad_boxes="error"`` raises instead); the counts are in :attr:`CocoDetection.stats`;
- crowd annotations (``iscrowd=1``) are kept out of the targets by default, as COCO training does
  (evaluation with pycocotools still sees them through :attr:`CocoDetection.coco`); with
  ``include_crowd=True`` they are in the target, marked in ``target["iscrowd"]``;
- images without annotations give empty targets (``remove_empty=True`` skips them);
- an image file missing or unreadable, or whose size differs from the json: an error naming the file
  and the image id.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from spa.data.common import DatasetError, load_rgb, make_target, warn_dropped

__all__ = ["CocoDetection", "load_coco_json"]


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read and structurally check a COCO annotation file; :class:`DatasetError` when it is bad."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file missing")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{ann_file}: corrupt or truncated annotation JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{ann_file}: annotation file is not UTF-8 text: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or non-list top-level key {key!r}")
    return data


def _need(entry: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}")


def _compressed_rle_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the format pycocotools writes: each run in 5-bit groups
    stored as ``chr(48 + group)``, bit 0x20 = more groups follow, bit 0x10 of the last group = negative; from
    the fourth run on, a run is stored as its difference to the run two places before).

    Written here because pycocotools decodes a string whose runs do not cover the image into uninitialised
    memory without an error; the runs are needed to check that they do.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("truncated RLE string")
            group = ord(counts[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"invalid character {counts[pos]!r} in RLE string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and group & 0x10:
                value -= 1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _check_runs(runs: list[int], h: int, w: int, where: str) -> None:
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise DatasetError(
            f"{where}: RLE runs must be >= 0 and cover the {h}x{w} image ({h * w} pixels), "
            f"got {len(runs)} runs summing to {sum(runs)}"
        )


def _segm_to_mask(segm: Any, h: int, w: int, where: str) -> np.ndarray | None:
    """Polygons, uncompressed or compressed RLE -> ``[H, W]`` uint8 (``None`` when there is none)."""
    if segm is None or (isinstance(segm, list) and len(segm) == 0):
        return None
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) >= 6]  # pycocotools needs >= 3 points
            if not polys:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(segm, dict):
            if tuple(segm["size"]) != (h, w):
                raise DatasetError(f"{where}: RLE size {segm['size']} differs from the image's {[h, w]}")
            counts = segm["counts"]
            if isinstance(counts, list):
                _check_runs([int(c) for c in counts], h, w, where)
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
                _check_runs(_compressed_rle_counts(counts), h, w, where)
                rle = {"size": [h, w], "counts": counts.encode("ascii")}
        else:
            raise DatasetError(f"{where}: unsupported segmentation of type {type(segm).__name__}")
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(np.uint8)
    except DatasetError:
        raise
    except Exception as e:  # pycocotools raises assorted types on malformed input
        raise DatasetError(f"{where}: malformed segmentation: {e}") from e


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection/instance-segmentation dataset.

    Returns ``(image, target)``: ``image`` float ``[3, H, W]`` in ``[0, 1]`` (``tv_tensors.Image``),
    ``target`` a dict with ``boxes`` (XYXY ``BoundingBoxes``), ``labels`` (contiguous ``1..K``, 0 is
    background), ``masks`` (``[M, H, W]`` uint8, when ``masks=True`` and the file has segmentations;
    an annotation without one gets its box), ``image_id``, ``iscrowd`` and ``area``.

    Args:
        root: folder the images' ``file_name`` are relative to.
        ann_file: the COCO json.
        transforms: ``callable(image, target) -> (image, target)`` (e.g. :func:`detection_transforms`).
        masks: decode instance masks.
        include_crowd: keep ``iscrowd=1`` annotations in the targets (marked); default drops them.
        bad_boxes: ``"drop"`` (warn with a count) or ``"error"`` for degenerate boxes.
        remove_empty: skip images without (non-crowd) annotations.
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        masks: bool = True,
        include_crowd: bool = False,
        bad_boxes: str = "drop",
        remove_empty: bool = False,
    ) -> None:
        if bad_boxes not in ("drop", "error"):
            raise ValueError(f"bad_boxes must be 'drop' or 'error', got {bad_boxes!r}")
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_crowd = include_crowd
        self.dataset = load_coco_json(self.ann_file)
        src = str(self.ann_file)

        cats = self.dataset["categories"]
        for i, c in enumerate(cats):
            _need(c, ("id", "name"), f"{src}: categories[{i}]")
        cat_ids = sorted(int(c["id"]) for c in cats)
        if len(set(cat_ids)) != len(cat_ids):
            raise DatasetError(f"{src}: duplicate category ids")
        names = {int(c["id"]): str(c["name"]) for c in cats}
        self.cat_ids: list[int] = cat_ids
        self.class_names: list[str] = [names[c] for c in cat_ids]
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i + 1: c for i, c in enumerate(cat_ids)}

        self.images: dict[int, dict] = {}
        for i, im in enumerate(self.dataset["images"]):
            _need(im, ("id", "file_name", "width", "height"), f"{src}: images[{i}]")
            if int(im["id"]) in self.images:
                raise DatasetError(f"{src}: images[{i}]: duplicate image id {im['id']}")
            self.images[int(im["id"])] = im

        self.anns: dict[int, list[dict]] = {i: [] for i in self.images}
        ann_ids: set[int] = set()
        self.stats = {"annotations": 0, "dropped_degenerate": 0, "clipped": 0, "crowd": 0}
        dropped: list[str] = []
        for i, a in enumerate(self.dataset["annotations"]):
            where = f"{src}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
            _need(a, ("image_id", "category_id", "bbox"), where)
            if "id" in a:  # pycocotools indexes annotations by id: a duplicate would replace the first
                if int(a["id"]) in ann_ids:
                    raise DatasetError(f"{where}: duplicate annotation id {a['id']}")
                ann_ids.add(int(a["id"]))
            if int(a["image_id"]) not in self.images:
                raise DatasetError(f"{where}: unknown image_id {a['image_id']}")
            if int(a["category_id"]) not in self.cat_id_to_label:
                raise DatasetError(f"{where}: unknown category_id {a['category_id']}")
            bbox = a["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            try:
                x, y, bw, bh = (float(v) for v in bbox)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"{where}: non-numeric bbox {bbox!r}") from e
            if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                raise DatasetError(f"{where}: non-finite bbox {bbox!r}")
            im = self.images[int(a["image_id"])]
            w, h = float(im["width"]), float(im["height"])
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if bw <= 0 or bh <= 0 or x2 <= x1 or y2 <= y1:
                if bad_boxes == "error":
                    raise DatasetError(f"{where}: degenerate or outside box {bbox!r} in a {w:g}x{h:g} image")
                dropped.append(f"ann {a.get('id', i)}")
                continue
            if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
                self.stats["clipped"] += 1
            crowd = int(a.get("iscrowd", 0))
            self.stats["crowd"] += crowd
            self.stats["annotations"] += 1
            self.anns[int(a["image_id"])].append({**a, "_xyxy": [x1, y1, x2, y2], "_where": where})
        self.has_masks = masks and any(a.get("segmentation") for v in self.anns.values() for a in v)
        self.stats["dropped_degenerate"] = len(dropped)
        warn_dropped(src, "dropped degenerate boxes (zero/negative size or outside the image)", dropped)

        ids = sorted(self.images)
        if remove_empty:
            ids = [i for i in ids if any(self._keep(a) for a in self.anns[i])]
        self.ids: list[int] = ids
        self._coco = None

    def _keep(self, ann: dict) -> bool:
        return self.include_crowd or not int(ann.get("iscrowd", 0))

    @property
    def num_classes(self) -> int:
        """Number of object classes ``K`` (labels are ``1..K``)."""
        return len(self.cat_ids)

    @property
    def coco(self):
        """The annotations as a ``pycocotools.coco.COCO`` object (for evaluation).

        Optional fields pycocotools' evaluation needs get defaults: ``iscrowd`` 0, ``area`` the area of the
        annotation's ``bbox``; an annotation without an id, or with id 0 (COCOeval reads id 0 as "not
        matched"), gets a fresh one above the file's largest.
        """
        if self._coco is None:
            from pycocotools.coco import COCO

            given = [int(a["id"]) for a in self.dataset["annotations"] if "id" in a]
            fresh = iter(range(max(given, default=0) + 1, 2**62))
            annotations = []
            for a in self.dataset["annotations"]:
                _, _, bw, bh = (float(v) for v in a["bbox"])
                ann = {"iscrowd": 0, "area": max(bw, 0.0) * max(bh, 0.0), **a}
                if int(ann.get("id", 0)) <= 0:
                    ann["id"] = next(fresh)
                annotations.append(ann)
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO()
                coco.dataset = {**self.dataset, "annotations": annotations}
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.ids)

    def image_labels(self, index: int) -> list[int]:
        """Contiguous labels of the (non-crowd unless ``include_crowd``) objects of an image, without
        reading it."""
        return [
            self.cat_id_to_label[int(a["category_id"])] for a in self.anns[self.ids[index]] if self._keep(a)
        ]

    def load_target(self, index: int) -> dict:
        """The target of an image (before transforms), without reading the image file."""
        image_id = self.ids[index]
        info = self.images[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in self.anns[image_id] if self._keep(a)]
        masks = None
        if self.has_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for k, a in enumerate(anns):
                m = _segm_to_mask(a.get("segmentation"), h, w, a["_where"])
                if m is None:
                    x1, y1, x2, y2 = a["_xyxy"]
                    masks[k, int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)] = 1
                else:
                    masks[k] = m
        area = []
        for a in anns:
            x1, y1, x2, y2 = a["_xyxy"]
            area.append(float(a.get("area", (x2 - x1) * (y2 - y1))))
        return make_target(
            image_id,
            (h, w),
            [a["_xyxy"] for a in anns],
            [self.cat_id_to_label[int(a["category_id"])] for a in anns],
            [int(a.get("iscrowd", 0)) for a in anns],
            area,
            masks,
        )

    def image_file(self, index: int) -> tuple[Path, tuple[int, int] | None, str]:
        """``(path, (H, W) the annotations give, context for messages)`` of an image, without reading it."""
        image_id = self.ids[index]
        info = self.images[image_id]
        return (
            self.root / info["file_name"],
            (int(info["height"]), int(info["width"])),
            (f"image id {image_id} of {self.ann_file}"),
        )

    def __getitem__(self, index: int):
        path, size, context = self.image_file(index)
        image = load_rgb(path, context, expect_size=size)
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
