"""Data specs: the one-string names ``spa train --data`` / ``--val-data`` take, opened as datasets.

Detection specs (``--task detect``; ``--task multilabel`` views them as multi-label, boxes give the
selection labels):

- ``builtin``: the generated set, made on first use under ``BuiltinOptions.root``;
- ``builtin:DIR``: a built-in set made before (``spa data make``);
- ``coco:ANNOTATIONS.json:IMAGES_DIR``: a COCO instances file and its images (one split: the same
  file is used for evaluation unless another spec is given for it);
- ``voc:ROOT``: Pascal VOC (``ROOT/ImageSets/Main/{train,val}.txt``).

Classification specs: ``folder:ROOT`` (``--task classify``; torchvision ``ImageFolder`` layout
``ROOT/{train,val}/CLASS/IMAGE``) and ``labels:DIR`` (``--task multilabel`` without boxes:
``DIR/classes.txt`` and ``DIR/{train,val}.txt`` lines ``IMAGE CLASS [CLASS ...]``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa.errors import SpaWarning

__all__ = [
    "DATA_SPEC_HELP",
    "BuiltinOptions",
    "absolute_spec",
    "check_classes",
    "open_classification",
    "open_detection",
    "open_detection_eval",
]

DATA_SPEC_HELP = (
    "data spec: builtin (generated on first use under --data-dir), builtin:DIR, "
    "coco:ANNOTATIONS.json:IMAGES_DIR, voc:ROOT; --task classify takes folder:ROOT "
    "(ROOT/{train,val}/CLASS/IMAGE); --task multilabel also takes labels:DIR "
    "(DIR/classes.txt + DIR/{train,val}.txt lines 'IMAGE CLASS ...')"
)


def absolute_spec(spec: str, base: str | Path) -> str:
    """``spec`` with its paths made absolute against ``base`` (``builtin`` and absolute paths unchanged), so a
    stored spec opens from any working folder."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in ("builtin", "coco", "voc", "folder", "labels"):
        return spec
    parts = rest.split(":", 1) if kind == "coco" else [rest]
    return kind + ":" + ":".join(str((Path(base) / p).resolve()) if p else p for p in parts)


@dataclass(frozen=True)
class BuiltinOptions:
    """How the plain ``builtin`` spec generates its set when ``root`` has none (see ``spa.data.make_builtin``)."""

    root: str = "data/builtin"
    images: int = 64
    val_images: int = 16
    size: int = 256
    coverage: float = 0.2
    seed: int = 0


def open_detection(
    spec: str, split: str, transforms: Callable | None = None, builtin: BuiltinOptions | None = None
) -> Any:
    """The ``split`` (``train``/``val``) of a detection spec, with ``transforms(image, target)``."""
    from spa.data import CocoDetection, VOCDetection, builtin_dataset, ensure_builtin

    builtin = builtin or BuiltinOptions()
    kind, _, rest = spec.partition(":")
    if kind == "builtin":
        root = rest or builtin.root
        if not rest:
            ensure_builtin(
                root,
                images=builtin.images,
                val_images=builtin.val_images,
                size=builtin.size,
                coverage=builtin.coverage,
                seed=builtin.seed,
            )
        elif not (Path(root) / split / "annotations.json").is_file():
            raise FileNotFoundError(
                f"{root} is not a built-in set (no {split}/annotations.json); make it with spa data make"
            )
        return builtin_dataset(root, split, transforms=transforms)
    if kind == "coco":
        ann, _, images = rest.partition(":")
        if not ann or not images:
            raise ValueError(f"coco data spec must be coco:ANNOTATIONS.json:IMAGES_DIR, got {spec!r}")
        return CocoDetection(images, ann, transforms=transforms)
    if kind == "voc":
        if not rest:
            raise ValueError(f"voc data spec must be voc:ROOT, got {spec!r}")
        return VOCDetection(rest, image_set=split, transforms=transforms)
    if kind in ("folder", "labels"):  # classification specs
        task = "classify" if kind == "folder" else "multilabel"
        raise ValueError(
            f"{spec!r} is classification data, not detection data: it trains and evaluates --task {task} models"
        )
    raise ValueError(
        f"unknown data spec {spec!r}: use builtin, builtin:DIR, coco:ANN.json:IMAGES or voc:ROOT"
    )


def open_detection_eval(spec: str, val_spec: str | None = None, builtin: BuiltinOptions | None = None) -> Any:
    """The untransformed evaluation split: ``val_spec`` when given, else the ``val`` split of ``spec`` (a
    COCO file has no split: it warns that it evaluates on the training annotations)."""
    if val_spec is None and spec.startswith("coco:"):
        warnings.warn(
            f"{spec} has no split: evaluating on the training annotations (a held-out set: spa train --val-data "
            "SPEC, spa eval --data SPEC)",
            SpaWarning,
            stacklevel=3,
        )
    return open_detection(val_spec or spec, "val", None, builtin)


def open_classification(
    spec: str,
    split: str,
    task: str,
    img_size: int,
    classes: Sequence[str] | None = None,
    empty_images: str = "error",
    builtin: BuiltinOptions | None = None,
) -> Any:
    """The ``split`` of a classification spec for ``task`` (``classify`` / ``multilabel``), as
    ``(image [3, img_size, img_size], {"label", ["boxes", "masks"]})`` items; ``classes`` (the training
    classes) must match the data's."""
    from spa.data import (
        BoxedMultiLabelView,
        MultiLabelList,
        check_labeled,
        classification_transforms,
        folder_items,
    )

    train = split == "train"
    kind, _, rest = spec.partition(":")
    if kind == "folder":
        if task != "classify":
            raise ValueError(
                f"folder data ({spec}) is single-label: it trains and evaluates --task classify models"
            )
        if not rest:
            raise ValueError(f"folder data spec must be folder:ROOT, got {spec!r}")
        return folder_items(rest, split, classification_transforms(train, img_size), classes)
    if task != "multilabel":
        raise ValueError(
            f"{kind} data has a set of classes per image: it trains and evaluates --task multilabel models "
            "(--task classify models take folder:ROOT)"
        )
    if kind == "labels":
        if not rest:
            raise ValueError(f"label-list data spec must be labels:DIR, got {spec!r}")
        data = MultiLabelList(rest, split, classification_transforms(train, img_size, boxes=True))
    else:
        detection = open_detection(spec, split, None, builtin)
        data = BoxedMultiLabelView(detection, classification_transforms(train, img_size, boxes=True))
        data = check_labeled(data, f"{spec} ({split})", empty_images)
    if classes is not None:
        check_classes(data, classes, f"{spec} ({split})")
    return data


def check_classes(
    data: Any, classes: Sequence[str], source: str, reference: str = "the model was trained for"
) -> None:
    """Raise ``ValueError`` unless ``data.class_names`` is exactly ``classes`` (the model's classes; ``reference``
    says whose they are in the message)."""
    if list(data.class_names) != list(classes):
        unknown = sorted(set(data.class_names) - set(classes))
        reordered = not unknown and sorted(data.class_names) == sorted(classes)
        raise ValueError(
            f"{source} has classes {list(data.class_names)}, but {reference} {list(classes)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (
                " (the same names in another order: labels follow the order of the category ids, so give"
                " each category the id it had in training)"
                if reordered
                else ""
            )
        )
