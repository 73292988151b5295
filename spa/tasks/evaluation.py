"""Detection evaluation: COCO metrics (pycocotools), kept-token ratios on object/background tokens, GMACs."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from spa.flops import counting_macs
from spa.tasks.detection import SPADetector

__all__ = [
    "COCO_METRICS",
    "coco_ground_truth",
    "coco_metrics",
    "evaluate_detection",
    "format_metrics",
    "to_coco_results",
]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_metrics(coco_gt: Any, results: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP/AP50/AP75/APs/APm/APl of ``results`` (COCO result dicts) against ``coco_gt`` (pycocotools).

    No detections give zeros (pycocotools cannot load an empty result list). As in pycocotools, a
    size range without ground truth (e.g. no large objects) reports ``-1``.
    """
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, evaluator.stats[:6])}


def coco_ground_truth(dataset: Any) -> tuple[Any, dict[int, int]]:
    """``(pycocotools COCO, label -> category id)`` of a dataset: its own ``coco`` when it has one (COCO json,
    built-in set), else one built from its untransformed targets (e.g. Pascal VOC; labels are the ids).

    A dataset that leaves VOC ``difficult`` objects out of its targets is read with them included (as
    ``iscrowd=1``), so that detections of difficult objects are ignored, as VOC evaluation does, instead of
    counted as false positives.
    """
    if hasattr(dataset, "coco") and hasattr(dataset, "label_to_cat_id"):
        return dataset.coco, dataset.label_to_cat_id
    from pycocotools.coco import COCO

    if getattr(dataset, "include_difficult", True) is False:
        dataset = copy.copy(dataset)
        dataset.include_difficult = True

    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": int(image.shape[-2]), "width": int(image.shape[-1])})
        crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.long))
        for box, label, is_crowd in zip(target["boxes"].tolist(), target["labels"].tolist(), crowd.tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(is_crowd),
                }
            )
    names = getattr(dataset, "class_names", None) or [str(i) for i in range(1, dataset.num_classes + 1)]
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, {i + 1: i + 1 for i in range(len(names))}


def to_coco_results(
    prediction: dict[str, torch.Tensor], image_id: int, label_to_cat_id: dict[int, int]
) -> tuple[list[dict], list[dict]]:
    """Box and (if present) mask results of one image in COCO result format."""
    boxes = prediction["boxes"].detach().cpu()
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    box_results, mask_results = [], []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        base = {"image_id": image_id, "category_id": label_to_cat_id[int(label)], "score": float(score)}
        box_results.append({**base, "bbox": [round(v, 3) for v in box]})
        if "masks" in prediction:
            binary = (prediction["masks"][i, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(binary))
            rle["counts"] = rle["counts"].decode("ascii")
            mask_results.append({**base, "segmentation": rle})
    return box_results, mask_results


@torch.no_grad()
def evaluate_detection(
    model: SPADetector,
    dataset: Any,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    count_gmacs: bool = True,
    progress: bool = False,
    collate_fn: Any = None,
) -> dict[str, Any]:
    """Evaluate on an untransformed detection dataset (COCO json, built-in set, VOC, ...).

    Returns ``{"bbox": {...}, "segm": {...} (Mask R-CNN), "keep": {stage: {"object", "background"}},
    "gmacs": {"kept", "executed"}, "images": n}``.
    """
    from spa.data import collate_detection

    coco_gt, label_to_cat_id = coco_ground_truth(dataset)
    model.eval().to(device)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or collate_detection
    )
    boxes: list[dict] = []
    masks: list[dict] = []
    tokens: dict[int, torch.Tensor] = {}
    seen = 0
    iterator: Sequence = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", dynamic_ncols=True)
    # the backbone's MACs are counted by hooks during the detector's own forward (no second pass)
    counting = (
        counting_macs(model.backbone.body, count_images=False) if count_gmacs else contextlib.nullcontext()
    )
    with counting as tally:
        for images, targets in iterator:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            predictions = model(images, targets)
            for stage, counts in model.token_counts().items():
                tokens[stage] = tokens.get(stage, torch.zeros(4, dtype=torch.float64)) + counts
            for prediction, target in zip(predictions, targets):
                b, m = to_coco_results(prediction, int(target["image_id"]), label_to_cat_id)
                boxes += b
                masks += m
            seen += len(images)
            if tally is not None:
                tally.images += len(images)
    if seen == 0:
        raise ValueError("the evaluation set is empty")
    result: dict[str, Any] = {"images": seen, "bbox": coco_metrics(coco_gt, boxes, "bbox")}
    if model.config.detector == "mask_rcnn":
        result["segm"] = coco_metrics(coco_gt, masks, "segm")
    result["keep"] = {
        f"stage{stage + 1}": {
            "object": float(c[0] / c[1]) if c[1] else math.nan,
            "background": float(c[2] / c[3]) if c[3] else math.nan,
        }
        for stage, c in sorted(tokens.items())
    }
    if count_gmacs:
        count = tally.result()
        result["gmacs"] = {"kept": count.kept, "executed": count.executed}
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """A printable table of ``evaluate_detection`` output."""
    lines = [f"images: {result['images']}"]
    for kind in ("bbox", "segm"):
        if kind in result:
            lines.append(f"{kind:5s} " + "  ".join(f"{k} {v:.4f}" for k, v in result[kind].items()))
    for stage, keep in result.get("keep", {}).items():
        lines.append(
            f"kept {stage}: object tokens {keep['object']:.3f}, background tokens {keep['background']:.3f}"
        )
    if "gmacs" in result:
        lines.append(
            f"backbone GMACs/image: kept {result['gmacs']['kept']:.4f}, executed {result['gmacs']['executed']:.4f}"
        )
    return "\n".join(lines)
