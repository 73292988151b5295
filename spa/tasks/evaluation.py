"""Evaluation loops: detection (COCO AP) and classification (top-k / mAP), with kept-token ratios on object
and background tokens and the backbone's GMACs, counted during the model's own forward (no second pass).

The metrics themselves live in :mod:`spa.tasks.metrics`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spa.flops import counting_macs
from spa.selection import keep_ratios
from spa.tasks.metrics import (
    COCO_METRICS,
    coco_ground_truth,
    coco_metrics,
    coco_metrics_with_bootstrap,
    mean_average_precision,
    to_coco_results,
    topk_accuracy,
)

__all__ = [
    "COCO_METRICS",
    "coco_ground_truth",
    "coco_metrics",
    "evaluate_classification",
    "evaluate_detection",
    "format_classification_metrics",
    "format_metrics",
    "to_coco_results",
]


def _batches(
    model: nn.Module,
    body: nn.Module,
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    count_gmacs: bool,
    progress: bool,
    exclude: list[nn.Module] | None = None,
) -> Iterator[tuple[Any, Any, Any]]:
    """Yield ``(images, targets, tally)`` batches in eval mode, MACs of ``body`` counted by hooks during the
    model's forward (the caller adds the images it ran to ``tally.images``); ``tally`` is None when not
    counting. Raises ``ValueError`` for an empty set."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    iterator: Any = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", dynamic_ncols=True)
    counting = (
        counting_macs(body, count_images=False, exclude=exclude or ())
        if count_gmacs
        else contextlib.nullcontext()
    )
    seen = 0
    with counting as tally:
        for images, targets in iterator:
            seen += len(images)
            yield images, targets, tally
    if seen == 0:
        raise ValueError("the evaluation set is empty")


def _add(total: dict[int, torch.Tensor], counts: dict[int, torch.Tensor]) -> None:
    for stage, c in counts.items():
        total[stage] = total[stage] + c if stage in total else c


def _gmacs(tally: Any) -> dict[str, float]:
    count = tally.result()
    return {"kept": count.kept, "executed": count.executed}


@torch.no_grad()
def evaluate_detection(
    model: Any,
    dataset: Any,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    count_gmacs: bool = True,
    progress: bool = False,
    collate_fn: Callable | None = None,
    return_results: bool = False,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate an :class:`~spa.tasks.SPADetector` on an untransformed detection dataset (COCO json,
    built-in set, VOC, ...).

    Returns ``{"bbox": {...}, "segm": {...} (Mask R-CNN), "keep": {stage: {"object", "background"}},
    "gmacs": {"kept", "executed"}, "images": n}``; with ``return_results``, also ``"results": {"bbox": [...],
    "segm": [...]}``, the COCO result lists that were scored (dataset category ids; ``segm`` empty for
    Faster R-CNN), as they were before pycocotools added its own fields to them. With ``bootstrap`` resamples
    (> 0), also ``"bbox_bootstrap"``: :func:`~spa.tasks.metrics.bootstrap_ap`'s intervals of box AP / AP50 over
    the images (seed ``bootstrap_seed``), from the same pycocotools matching as ``"bbox"``.
    """
    from spa.data import collate_detection

    coco_gt, label_to_cat_id = coco_ground_truth(dataset)
    model.to(device)
    boxes: list[dict] = []
    masks: list[dict] = []
    tokens: dict[int, torch.Tensor] = {}
    seen, tally = 0, None
    batches = _batches(
        model,
        model.backbone.body,
        dataset,
        batch_size,
        collate_fn or collate_detection,
        count_gmacs,
        progress,
    )
    for images, targets, tally in batches:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        out = model.forward_details(images, targets)
        _add(tokens, out.token_counts)
        for prediction, target in zip(out.detections, targets):
            b, m = to_coco_results(prediction, int(target["image_id"]), label_to_cat_id)
            boxes += b
            masks += m
        seen += len(images)
        if tally is not None:
            tally.images += len(images)
    scored = {"bbox": [dict(b) for b in boxes], "segm": [dict(m) for m in masks]} if return_results else None
    result: dict[str, Any] = {"images": seen}
    if bootstrap:
        result["bbox"], result["bbox_bootstrap"] = coco_metrics_with_bootstrap(
            coco_gt, boxes, "bbox", resamples=bootstrap, seed=bootstrap_seed
        )
    else:
        result["bbox"] = coco_metrics(coco_gt, boxes, "bbox")
    if model.config.detector == "mask_rcnn":
        result["segm"] = coco_metrics(coco_gt, masks, "segm")
    result["keep"] = {
        f"stage{stage + 1}": {"object": r["object"], "background": r["background"]}
        for stage, r in keep_ratios(tokens).items()
    }
    if count_gmacs:
        result["gmacs"] = _gmacs(tally)
    if scored is not None:
        result["results"] = scored
    return result


@torch.no_grad()
def evaluate_classification(
    model: Any,
    dataset: Dataset,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    count_gmacs: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate an :class:`~spa.tasks.SPAClassifier` on a classification dataset (items ``(image,
    {"label", ["boxes"]})``).

    Returns ``{"images", "task", "top1"/"top5" or "mAP"/"AP", "keep": {stageN: {"all", "object",
    "background"}}, "keep_mean", "gmacs": {"kept", "executed"}}`` (object/background NaN without boxes;
    ``keep_mean`` averages the SPA stages' kept ratios, 1.0 for a dense model). The backbone's MACs leave
    the classifier head out.
    """
    from spa.data import collate_classification

    model.to(device)
    all_logits, all_labels = [], []
    tokens: dict[int, torch.Tensor] = {}
    seen, tally = 0, None
    batches = _batches(
        model, model.backbone, dataset, batch_size, collate_classification, count_gmacs, progress,
        exclude=[model.backbone.get_classifier()],
    )  # fmt: skip
    for images, targets, tally in batches:
        out = model.forward_details(images.to(device), targets)
        _add(tokens, out.token_counts)
        all_logits.append(out.logits.float().cpu())
        all_labels.append(torch.stack([torch.as_tensor(t["label"]) for t in targets]).cpu())
        seen += len(images)
        if tally is not None:
            tally.images += len(images)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    result: dict[str, Any] = {"images": seen, "task": model.config.task}
    if model.config.task == "classify":
        result.update(topk_accuracy(logits, labels))
    else:
        result.update(mean_average_precision(logits.sigmoid(), labels, model.config.class_names or None))
    result["keep"] = {f"stage{stage + 1}": r for stage, r in keep_ratios(tokens).items()}
    result["keep_mean"] = float(np.mean([v["all"] for v in result["keep"].values()])) if tokens else 1.0
    if count_gmacs:
        result["gmacs"] = _gmacs(tally)
    return result


def _gmacs_line(result: dict[str, Any]) -> list[str]:
    if "gmacs" not in result:
        return []
    g = result["gmacs"]
    return [f"backbone GMACs/image: kept {g['kept']:.4f}, executed {g['executed']:.4f}"]


def format_metrics(result: dict[str, Any]) -> str:
    """A printable table of :func:`evaluate_detection` output."""
    lines = [f"images: {result['images']}"]
    for kind in ("bbox", "segm"):
        if kind in result:
            lines.append(f"{kind:5s} " + "  ".join(f"{k} {v:.4f}" for k, v in result[kind].items()))
    for stage, keep in result.get("keep", {}).items():
        lines.append(
            f"kept {stage}: object tokens {keep['object']:.3f}, background tokens {keep['background']:.3f}"
        )
    return "\n".join(lines + _gmacs_line(result))


def format_classification_metrics(result: dict[str, Any]) -> str:
    """A printable table of :func:`evaluate_classification` output."""
    lines = [f"images: {result['images']} ({result['task']})"]
    if result["task"] == "classify":
        lines.append(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}")
    else:
        lines.append(
            f"mAP {result['mAP']:.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in result["AP"].items())
        )
    for stage, keep in result.get("keep", {}).items():
        line = f"kept {stage}: all tokens {keep['all']:.3f}"
        if not math.isnan(keep["object"]):
            line += f", object tokens {keep['object']:.3f}, background tokens {keep['background']:.3f}"
        lines.append(line)
    return "\n".join(lines + _gmacs_line(result))
