"""``spa predict``: run any spa checkpoint on image files and write what it found.

- detection (Faster / Mask R-CNN): ``OUT/predictions.json``, a COCO results list (``image_id``,
  ``category_id`` = the training dataset's own ids, ``score``, ``bbox`` xywh in the original image frame and,
  for Mask R-CNN, ``segmentation`` as compressed RLE of the original size; one record per detection) that
  pycocotools' ``COCO.loadRes`` reads; ``--draw`` adds ``OUT/IMAGE_pred.png`` per image;
- classification / multi-label: ``OUT/predictions.json`` as ``[{"image_id", "file_name", "topk": [{"class",
  "label", "score"}, ...]}]`` (softmax scores for ``classify``, sigmoid for ``multilabel``);
- both: ``OUT/images.json``, ``[{"id", "file_name", "width", "height"}]`` (ids 1..N in sorted path order,
  file names relative to the images' common folder).

Class names and category ids come from the checkpoint's ``extra["classes"]`` (``{"names", "label_to_cat_id"}``,
written by ``spa train``); without it a detector's category id is its label and its names ``class_1``...,
a classifier's names are its ``config.class_names``. Every image is read before anything is written, and each
file is written under a temporary name in OUT, then renamed: a failed run leaves nothing half-written.

With ``--draw`` each ``images.json`` entry also names its picture (``"picture"``). An earlier ``spa predict``
output in OUT is replaced: the pictures its ``images.json`` names that this run does not draw again are
removed once this run's predictions are made (never one of this run's input images), so OUT never mixes two
runs. Other files in OUT are left alone; an ``images.json`` that is not spa's is refused up front.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spa.data.common import load_rgb
from spa.engine.checkpoint import CheckpointError, write_json
from spa.errors import ConfigError
from spa.tasks.metrics import to_coco_results
from spa.viz import _image_paths

__all__ = [
    "checkpoint_classes",
    "classify_images",
    "coco_records",
    "detect_images",
    "predict",
    "register",
]

DETECT_SCORE_THRESHOLD = 0.05  # torchvision's ``box_score_thresh`` default
CLASSIFY_TOPK = 5


def checkpoint_classes(model: nn.Module, state: dict[str, Any]) -> tuple[dict[int, str], dict[int, int]]:
    """``(label -> class name, label -> dataset category id)`` of a model loaded from ``state``.

    Labels are ``1..K`` for a detector (0 is background) and ``0..K-1`` for a classifier. Read from
    ``state["extra"]["classes"]`` when the checkpoint has it, else ``class_1``... and ``category_id = label``
    (detector) or the classifier's ``config.class_names``.
    """
    from spa.tasks.detection import SPADetector

    num = int(model.config.num_classes)
    labels = list(range(1, num + 1)) if isinstance(model, SPADetector) else list(range(num))
    stored = (state.get("extra") or {}).get("classes") or {}
    names = list(stored.get("names") or getattr(model.config, "class_names", None) or [])
    names = names or [f"class_{label}" for label in labels]
    if len(names) != num:
        raise CheckpointError(f"the checkpoint stores {len(names)} class names for a {num}-class model")
    cat_ids = {label: label for label in labels}
    if isinstance(model, SPADetector) and stored.get("label_to_cat_id"):
        cat_ids = {int(k): int(v) for k, v in stored["label_to_cat_id"].items()}
        missing = [label for label in labels if label not in cat_ids]
        if missing:
            raise CheckpointError(f"the checkpoint's label_to_cat_id has no category id for labels {missing}")
    return dict(zip(labels, map(str, names))), cat_ids


def coco_records(boxes: list[dict], masks: list[dict]) -> list[dict]:
    """One COCO result record per detection: the box results of :func:`~spa.tasks.metrics.to_coco_results`
    with each mask's ``segmentation`` merged into its box record (``masks`` empty: the boxes as they are).

    pycocotools' ``loadRes`` takes a merged record's ``area`` from its box, so re-scored ``segm`` AP, AP50 and
    AP75 are ``spa eval``'s, while APs / APm / APl may sort a few masks into another size range.
    """
    if not masks:
        return list(boxes)
    if len(masks) != len(boxes):
        raise ValueError(f"{len(masks)} mask results for {len(boxes)} box results")
    return [{**b, "segmentation": m["segmentation"]} for b, m in zip(boxes, masks)]


@torch.no_grad()
def detect_images(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    image_ids: Sequence[int],
    label_to_cat_id: dict[int, int],
) -> list[dict]:
    """COCO result records (:func:`coco_records`) of an ``SPADetector`` on ``images`` (``[3, H, W]`` in
    ``[0, 1]``, any sizes), in each image's original frame."""
    model.eval()
    device = next(model.parameters()).device
    detections = model([image.to(device) for image in images])
    records: list[dict] = []
    for prediction, image_id in zip(detections, image_ids):
        records += coco_records(*to_coco_results(prediction, int(image_id), label_to_cat_id))
    return records


@torch.no_grad()
def classify_images(
    model: nn.Module, images: torch.Tensor, names: dict[int, str], topk: int = CLASSIFY_TOPK,
    score_threshold: float = 0.0,
) -> list[list[dict]]:  # fmt: skip
    """Per image, the ``topk`` best classes ``[{"class", "label", "score"}]`` (best first, scores below
    ``score_threshold`` left out) of an ``SPAClassifier`` on preprocessed ``images [B, 3, S, S]``: softmax
    scores for ``classify``, sigmoid for ``multilabel``."""
    model.eval()
    logits = model(images.to(next(model.parameters()).device)).float().cpu()
    scores = logits.softmax(-1) if model.config.task == "classify" else logits.sigmoid()
    values, labels = scores.topk(min(topk, scores.shape[1]), dim=1)
    return [
        [
            {"class": names[label], "label": label, "score": score}
            for score, label in zip(vs.tolist(), ls.tolist())
            if score >= score_threshold
        ]
        for vs, ls in zip(values, labels)
    ]


def _file_names(paths: Sequence[Path]) -> list[str]:
    """Each path relative to the folder all the images are in (POSIX separators)."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(root).as_posix() for p in absolute]


def _png_names(file_names: Sequence[str], suffix: str = "pred") -> list[str]:
    """``DIR/NAME.jpg`` -> ``DIR_NAME_pred.png`` (``suffix``), made unique (``NAME_ID_pred.png``) when two images
    share a stem."""
    taken: set[str] = set()
    out = []
    for i, name in enumerate(file_names, 1):
        stem = name.rsplit(".", 1)[0].replace("/", "_")
        png = f"{stem}_{suffix}.png" if f"{stem}_{suffix}.png" not in taken else f"{stem}_{i}_{suffix}.png"
        taken.add(png)
        out.append(png)
    return out


def _earlier_pictures(out: Path) -> list[Path]:
    """The pictures an earlier ``spa predict --draw`` wrote into ``out`` that are still there (the ``"picture"``
    names of its ``images.json``; none without one). Raises ``ConfigError`` for an ``images.json`` that is not
    spa's (or names a picture outside ``out``)."""
    import json

    listing = out / "images.json"
    if not listing.is_file():
        return []
    try:
        infos = json.loads(listing.read_text(encoding="utf-8"))
        if not isinstance(infos, list) or not all(isinstance(i, dict) and "file_name" in i for i in infos):
            raise TypeError("not a list of images")
        names = [info["picture"] for info in infos if "picture" in info]
        if not all(isinstance(n, str) and n and Path(n).name == n and not n.startswith(".") for n in names):
            raise TypeError("a picture that is not a file name in the folder")
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"{listing} was not written by spa predict ({err}): pick another --out, or remove it"
        ) from None
    return [path for path in (out / name for name in names) if path.is_file()]


def predict(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path = "predictions",
    score_threshold: float | None = None,
    batch_size: int = 4,
    draw: bool = False,
    device: str | torch.device | None = None,
    topk: int | None = None,
    draw_threshold: float = 0.5,
    log: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Run a checkpoint of any task on image files / folders; write ``OUT/predictions.json`` and
    ``OUT/images.json`` (see the module docstring) and, with ``draw`` (detection), one PNG per image.

    ``score_threshold``: detections (default 0.05) or classes (default 0) below it are left out; ``topk``: the
    classes kept per image (default 5), or at most this many detections per image (default: the detector's
    100); ``draw_threshold``: the detections drawn; ``compile``: run the blocks through
    ``spa.compile_model`` (regional ``torch.compile``: a slow first batch, then faster ones). Returns ``{"task", "images", "predictions", "files"}``.
    """
    from spa.data import classification_transforms
    from spa.tasks.base import load_model

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if topk is not None and topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    paths = sorted(dict.fromkeys(_image_paths([str(i) for i in images])))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output folder {out} is a file")
    stale = _earlier_pictures(out)  # refused before any work if OUT/images.json is not spa's
    model, state = load_model(checkpoint)
    task = state["meta"]["task"]
    if draw and task != "detect":
        raise ConfigError(f"draw needs a detection checkpoint; {checkpoint} is a {task} checkpoint")
    names, cat_ids = checkpoint_classes(model, state)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if compile:
        from spa.compile import compile_model

        compile_model(model)
    if task == "detect":
        heads = model.detector.roi_heads
        heads.score_thresh = DETECT_SCORE_THRESHOLD if score_threshold is None else score_threshold
        heads.detections_per_img = topk or heads.detections_per_img
    else:
        transform = classification_transforms(False, model.config.img_size, boxes=task == "multilabel")
    file_names = _file_names(paths)
    infos: list[dict] = []
    predictions: list[dict] = []
    for start in range(0, len(paths), batch_size):
        batch = [load_rgb(p, "spa predict --images") for p in paths[start : start + batch_size]]
        ids = list(range(start + 1, start + 1 + len(batch)))
        infos += [
            {"id": i, "file_name": file_names[i - 1], "width": int(im.shape[-1]), "height": int(im.shape[-2])}
            for i, im in zip(ids, batch)
        ]
        if task == "detect":
            predictions += detect_images(model, batch, ids, cat_ids)
        else:
            found = classify_images(
                model, torch.stack([transform(im) for im in batch]), names, topk or CLASSIFY_TOPK,
                score_threshold or 0.0,
            )  # fmt: skip
            predictions += [
                {"image_id": i, "file_name": file_names[i - 1], "topk": t} for i, t in zip(ids, found)
            ]
    pngs = _png_names(file_names) if draw else []
    if draw:
        for info, png in zip(infos, pngs):
            info["picture"] = png
    keep = {Path(os.path.abspath(p)) for p in [*(out / png for png in pngs), *paths]}
    for path in stale:  # the earlier run's pictures this run does not write again (never an input image)
        if Path(os.path.abspath(path)) not in keep:
            path.unlink(missing_ok=True)
    files = [
        write_json(out / "predictions.json", predictions, indent=None),
        write_json(out / "images.json", infos),
    ]
    if draw:
        from spa.viz import draw_detections

        by_image: dict[int, list[dict]] = {info["id"]: [] for info in infos}
        for r in predictions:
            if r["score"] >= draw_threshold:
                by_image[r["image_id"]].append(r)
        shown = {cat_ids[label]: name for label, name in names.items()}
        for path, info, png in zip(paths, infos, pngs):
            image = load_rgb(path, "spa predict --images")
            files.append(draw_detections(image, by_image[info["id"]], out / png, shown))
    if log:
        found = f"{len(predictions)} detections" if task == "detect" else "top classes of each"
        print(f"[spa predict] {len(paths)} images, {found} -> {out}", flush=True)
    return {"task": task, "images": infos, "predictions": predictions, "files": files}


def _run_predict(args: argparse.Namespace) -> int:
    predict(
        args.checkpoint,
        args.images,
        out=args.out,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        draw=args.draw,
        device=args.device,
        topk=args.topk,
        draw_threshold=args.draw_threshold,
        compile=args.compile,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa predict``."""
    p = subparsers.add_parser(
        "predict",
        help="run a checkpoint on images: COCO results (detection) or top-k classes (classification)",
        description=(
            "Writes OUT/predictions.json (detection: a COCO results list with the dataset's category ids, "
            "boxes xywh in the original image frame, RLE masks for Mask R-CNN; classification: "
            "[{image_id, file_name, topk: [{class, label, score}]}]) and OUT/images.json "
            "([{id, file_name, width, height}, and picture with --draw], ids 1..N in sorted path order). An "
            "earlier spa predict output in OUT is replaced (the pictures its images.json names that this run "
            "does not draw again are removed); other files stay."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="a checkpoint written by spa train (any task), or its spa export",
    )
    p.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders of images"
    )
    p.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    p.add_argument(
        "--score-threshold",
        type=float,
        metavar="T",
        help="leave out detections (default 0.05) or classes (default 0) scoring below this",
    )
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward (default: 4)")
    p.add_argument(
        "--topk",
        type=int,
        metavar="K",
        help="classes per image (default 5); detections per image (default 100)",
    )
    p.add_argument("--draw", action="store_true", help="detection: also write OUT/IMAGE_pred.png per image")
    p.add_argument(
        "--draw-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="draw detections at least this sure (default: 0.5)",
    )
    p.add_argument("--device", default=None, metavar="D", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the backbone's blocks through spa.compile_model (torch.compile: slow start, faster batches)",
    )
    p.set_defaults(func=_run_predict)
