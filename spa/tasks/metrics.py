"""Metrics in one place: COCO box/mask AP (pycocotools), top-k accuracy (timm) and multi-label mAP.

``average_precision`` is written out (sklearn's ``average_precision_score`` definition) because neither
scikit-learn nor torchmetrics is a dependency, and pulling one in for a 15-line function is not worth it;
``tests/test_classification.py`` checks it against hand-computed values.
"""

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
from timm.utils import accuracy

__all__ = [
    "COCO_METRICS",
    "ap_of_images",
    "average_precision",
    "bootstrap_ap",
    "bootstrap_indices",
    "coco_ground_truth",
    "coco_metrics",
    "coco_metrics_with_bootstrap",
    "mean_average_precision",
    "percentile_interval",
    "prepare_bootstrap",
    "to_coco_results",
    "topk_accuracy",
]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _evaluated(coco_gt: Any, results: list[dict], iou_type: str) -> Any:
    """pycocotools' ``COCOeval`` after ``evaluate()`` (per image and category matches), no accumulate."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
    return evaluator


def coco_metrics(coco_gt: Any, results: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP/AP50/AP75/APs/APm/APl of ``results`` (COCO result dicts) against ``coco_gt`` (pycocotools).

    No detections give zeros (pycocotools cannot load an empty result list). As in pycocotools, a
    size range without ground truth (e.g. no large objects) reports ``-1``.
    """
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    return _summary(_evaluated(coco_gt, results, iou_type))


def _summary(evaluator: Any) -> dict[str, float]:
    """The six COCO numbers of an evaluated ``COCOeval`` (``accumulate`` + ``summarize``; the per-image matches
    that :func:`ap_of_images` reads stay as they are)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, evaluator.stats[:6])}


def coco_metrics_with_bootstrap(
    coco_gt: Any,
    results: list[dict],
    iou_type: str = "bbox",
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``(coco_metrics(...), bootstrap_ap(...))`` from one pycocotools matching of ``results`` (the same numbers
    as the two calls, which would each match every detection again)."""
    prepared, boot = _bootstrap(coco_gt, results, iou_type, resamples, seed, level)
    return (dict.fromkeys(COCO_METRICS, 0.0) if prepared is None else _summary(prepared[0])), boot


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


# -- classification ---------------------------------------------------------------------------------


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``: fraction of samples whose label is among the k highest logits
    (timm's ``accuracy``; k is capped at the number of classes; NaN for no samples)."""
    labels = labels.reshape(-1)
    if not labels.numel():
        return {f"top{k}": math.nan for k in ks}
    return {f"top{k}": float(a) / 100.0 for k, a in zip(ks, accuracy(logits, labels, topk=tuple(ks)))}


def average_precision(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """Average precision of one class (sklearn's ``average_precision_score`` definition):
    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, highest first (tied scores form one
    threshold). NaN when there are no positives."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(targets).reshape(-1) > 0.5
    positives = int(y.sum())
    if positives == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of every run of equal scores
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(
    scores: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """``{"mAP": mean over classes with positives, "AP": {class: AP}, "classes_without_positives": n}``."""
    scores, targets = torch.as_tensor(scores).cpu().numpy(), torch.as_tensor(targets).cpu().numpy()
    names = list(class_names) if class_names else [str(i) for i in range(scores.shape[1])]
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    valid = [a for a in aps if not math.isnan(a)]
    return {
        "mAP": float(np.mean(valid)) if valid else math.nan,
        "AP": dict(zip(names, aps)),
        "classes_without_positives": len(aps) - len(valid),
    }


# -- bootstrap intervals of COCO AP over images -------------------------------------------------------


def _per_category(evaluator: Any, max_det: int = 100) -> list[list[dict | None]]:
    """``[category][image]``: the arrays pycocotools accumulates for area range "all" and ``max_det``
    detections (``None`` where an image has neither ground truth nor detections of the category)."""
    p = evaluator.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    out = []
    for k in range(len(p.catIds)):
        per_image = []
        for i in range(n_img):
            e = evaluator.evalImgs[k * n_area * n_img + i]  # area index 0 = "all"
            if e is None:
                per_image.append(None)
                continue
            per_image.append({
                "scores": np.asarray(e["dtScores"][:max_det], dtype=np.float64),
                "matched": np.asarray(e["dtMatches"][:, :max_det]) > 0,
                "ignored": np.asarray(e["dtIgnore"][:, :max_det]).astype(bool),
                "gt": int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)),
            })  # fmt: skip
        out.append(per_image)
    return out


def _precision(
    per_image: list[dict | None], indices: Sequence[int], rec_thrs: np.ndarray
) -> np.ndarray | None:
    """``[T, R]`` interpolated precision of one category over the images ``indices`` (a multiset: a repeated
    index counts its image again), exactly as ``COCOeval.accumulate``; None without ground truth."""
    chosen = [per_image[i] for i in indices if per_image[i] is not None]
    if not chosen:
        return None
    positives = sum(e["gt"] for e in chosen)
    if positives == 0:
        return None
    scores = np.concatenate([e["scores"] for e in chosen])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e["matched"] for e in chosen], axis=1)[:, order]
    ignored = np.concatenate([e["ignored"] for e in chosen], axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
    out = np.zeros((tp.shape[0], len(rec_thrs)))
    if tp.shape[1] == 0:
        return out
    recall = tp / positives
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # pycocotools' envelope
    for t in range(tp.shape[0]):
        at = np.searchsorted(recall[t], rec_thrs, side="left")
        inside = at < tp.shape[1]
        out[t, inside] = precision[t, at[inside]]
    return out


def ap_of_images(prepared: tuple[Any, list], indices: Sequence[int]) -> tuple[float, float]:
    """``(AP, AP50)`` of the images at ``indices`` (positions in ``params.imgIds``; repeats allowed), from
    :func:`prepare_bootstrap`'s evaluation: the numbers pycocotools gives for a set in which each repeated
    image is a copy with its own id."""
    evaluator, per_category = prepared
    rec_thrs = np.asarray(evaluator.params.recThrs)
    grids = [g for g in (_precision(c, indices, rec_thrs) for c in per_category) if g is not None]
    if not grids:
        return -1.0, -1.0
    stack = np.stack(grids)  # [K, T, R]
    return float(stack.mean()), float(stack[:, 0].mean())


def prepare_bootstrap(coco_gt: Any, results: list[dict], iou_type: str = "bbox") -> tuple[Any, list] | None:
    """Evaluate once (pycocotools ``evaluate``) for :func:`ap_of_images`; None when there are no results."""
    if not results:
        return None
    evaluator = _evaluated(coco_gt, [dict(r) for r in results], iou_type)
    return evaluator, _per_category(evaluator, evaluator.params.maxDets[-1])


def bootstrap_indices(n_images: int, resamples: int = 200, seed: int = 0) -> np.ndarray:
    """``[resamples, n_images]`` image positions drawn with replacement (seeded), the first row the identity
    (the full set itself is not a resample: callers skip it)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(n_images)[None], rng.integers(0, n_images, (resamples, n_images))])


def percentile_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """``[lo, hi]``: the percentile bootstrap interval of ``values`` at ``level``."""
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ap(
    coco_gt: Any,
    results: list[dict],
    iou_type: str = "bbox",
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """COCO AP and AP50 with percentile bootstrap intervals over the evaluated images.

    pycocotools matches detections to ground truth once per image (``evaluate``); each resample draws the
    images with replacement and accumulates their matches as pycocotools would for a set in which a repeated
    image is a copy with its own id. Returns ``{"AP", "AP50", "ci95": {"AP": [lo, hi], "AP50": [lo, hi]},
    "resamples", "images", "samples": {"AP": [...], "AP50": [...]}}``; ``AP``/``AP50`` are the full set's
    (equal to :func:`coco_metrics`). No detections: every number 0.
    """
    return _bootstrap(coco_gt, results, iou_type, resamples, seed, level)[1]


def _bootstrap(
    coco_gt: Any, results: list[dict], iou_type: str, resamples: int, seed: int, level: float
) -> tuple[tuple[Any, list] | None, dict[str, Any]]:
    """``(prepare_bootstrap(...), bootstrap_ap(...))``: the one pycocotools matching (None without detections)
    and the intervals resampled from it."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n_images = len(coco_gt.getImgIds())
    prepared = prepare_bootstrap(coco_gt, results, iou_type)
    if prepared is None:
        zeros = [0.0] * resamples
        return None, {"AP": 0.0, "AP50": 0.0, "ci95": {"AP": [0.0, 0.0], "AP50": [0.0, 0.0]},
                      "resamples": resamples, "images": n_images, "samples": {"AP": zeros, "AP50": zeros}}  # fmt: skip
    rows = bootstrap_indices(len(prepared[0].params.imgIds), resamples, seed)
    values = np.array([ap_of_images(prepared, r) for r in rows])
    samples = values[1:]
    return prepared, {
        "AP": float(values[0, 0]),
        "AP50": float(values[0, 1]),
        "ci95": {
            "AP": percentile_interval(samples[:, 0], level),
            "AP50": percentile_interval(samples[:, 1], level),
        },
        "resamples": resamples,
        "images": n_images,
        "samples": {"AP": samples[:, 0].tolist(), "AP50": samples[:, 1].tolist()},
    }
