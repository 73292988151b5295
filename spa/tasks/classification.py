"""Image classification and multi-label classification on SPT or a dense Swin baseline.

- ``classify``: single-label, cross-entropy, top-1 / top-5; data from ``torchvision.datasets.ImageFolder``
  folders (``ROOT/train/CLASS/*.jpg``, ``ROOT/val/CLASS/*.jpg``).
- ``multilabel``: a set of classes per image, BCE-with-logits, mAP over classes; data from the detection
  datasets (COCO json, Pascal VOC, the built-in set) viewed as multi-label, or from a plain label list
  (``DIR/classes.txt`` + ``DIR/{train,val}.txt`` lines ``IMAGE CLASS [CLASS ...]``).

When the data has boxes, the selection labels are made from them (resized with the image by
``torchvision.transforms.v2``, so the boxes follow) and the selection loss joins the loss dict; without
boxes, or with ``supervise_gate=False``, the gate learns from the task loss alone (``loss_select`` is 0).

The model wrapper :class:`SPAClassifier` follows the Trainer's contract: ``forward(images, targets)``
returns ``{"loss_cls", "loss_select"}`` in training and logits in eval; ``training_stats()`` gives
kept-token ratios. ``num_classes``, ``global_pool``, ``forward_head`` and ``reset_classifier`` come from
the backbone (timm conventions). Datasets live in :mod:`spa.data`, metrics in :mod:`spa.tasks.metrics`,
the evaluation loop in :mod:`spa.tasks.evaluation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spa.labels import batch_selection_labels
from spa.losses import SELECT_LOSS_NAME, selection_loss
from spa.models import create_backbone, is_spt
from spa.selection import Selection, keep_ratios, token_counts

__all__ = ["CLASSIFY_TASKS", "ClassifierConfig", "ClassifierOutput", "SPAClassifier", "build_classifier"]

CLASSIFY_TASKS = ("classify", "multilabel")


@dataclass
class ClassifierConfig:
    """Everything that defines a classifier; saved with checkpoints and checked when they are loaded."""

    model: str = "spt_nano"
    task: str = "multilabel"
    num_classes: int = 5
    img_size: int = 128
    global_pool: str = "avg"
    selection_alpha: float = 0.01
    supervise_gate: bool = True
    use_masks_for_labels: bool = True
    class_names: list[str] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in CLASSIFY_TASKS:
            raise ValueError(f"task must be one of {CLASSIFY_TASKS}, got {self.task!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.selection_alpha < 0:
            raise ValueError(f"selection_alpha must be >= 0, got {self.selection_alpha}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs.items()}
        return d


@dataclass
class ClassifierOutput:
    """Everything one classifier forward produced, as locals of that forward.

    Attributes:
        logits: ``[B, num_classes]``.
        losses: ``{"loss_cls", "loss_select"}`` (training; empty in eval).
        selections: the SPA blocks' records (empty for a dense backbone).
        labels: ``stride -> [B, h, w]`` selection labels from the targets' boxes/masks (empty without).
        token_counts: per SPA stage, see :func:`spa.selection.token_counts`.
    """

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    selections: list[Selection]
    labels: dict[int, torch.Tensor]
    token_counts: dict[int, torch.Tensor]


def _as_targets(targets: Any, batch: int) -> list[dict[str, Any]] | None:
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return [{"label": t} for t in targets]
    targets = list(targets)
    if len(targets) != batch or not all(isinstance(t, dict) and "label" in t for t in targets):
        raise ValueError(f"targets must be {batch} dicts with a 'label' (or a tensor of labels)")
    return targets


class SPAClassifier(nn.Module):
    """A timm-style classifier (SPT or timm Swin) with the task loss and the selection loss.

    ``forward(images [B, 3, H, W], targets)``: in training a dict ``{"loss_cls", "loss_select"}``, in eval
    the logits ``[B, num_classes]``. ``targets`` is a list of per-image dicts with ``"label"`` (class index
    for ``classify``, multi-hot ``[K]`` for ``multilabel``) and optionally ``"boxes"`` (xyxy in the input
    frame) / ``"masks"``, or a plain tensor of labels ``[B]`` / ``[B, K]`` (no boxes). Targets may also be
    given in eval: they then feed the object / background token counts. :meth:`forward_details` returns
    everything one forward produced (:class:`ClassifierOutput`); ``last_token_counts`` keeps the counts of
    the latest forward (for :meth:`training_stats`).
    """

    def __init__(self, backbone: nn.Module, config: ClassifierConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.last_token_counts: dict[int, torch.Tensor] = {}

    # timm conventions, from the backbone
    @property
    def num_classes(self) -> int:
        return int(self.backbone.num_classes)

    @property
    def global_pool(self) -> str:
        return self.backbone.global_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier of ``num_classes`` outputs (the config follows; class names are cleared)."""
        self.backbone.reset_classifier(num_classes, global_pool)
        self.config.num_classes = num_classes
        self.config.class_names = []
        if global_pool is not None:
            self.config.global_pool = global_pool

    def forward_with_selections(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Selection]]:
        if is_spt(self.backbone):
            return self.backbone.forward_with_selections(images)
        return self.backbone(images), []

    def task_loss(self, logits: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor:
        labels = torch.stack([torch.as_tensor(t["label"]) for t in targets]).to(logits.device)
        if self.config.task == "classify":
            return F.cross_entropy(logits.float(), labels.long().reshape(-1))
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label targets {tuple(labels.shape)} do not match logits {tuple(logits.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def forward_details(self, images: torch.Tensor, targets: Any = None) -> ClassifierOutput:
        """One forward, everything it produced (see :class:`ClassifierOutput`)."""
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        targets = _as_targets(targets, images.shape[0])
        if self.training and targets is None:
            raise ValueError("training needs targets")
        logits, selections = self.forward_with_selections(images)
        labels: dict[int, torch.Tensor] = {}
        if selections and targets is not None and all("boxes" in t for t in targets):
            size = (int(images.shape[-2]), int(images.shape[-1]))
            labels = {
                s: batch_selection_labels(
                    targets,
                    size,
                    s,
                    use_masks=self.config.use_masks_for_labels,
                    device=selections[0].keep.device,
                )
                for s in sorted({sel.stride for sel in selections})
            }
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            losses["loss_cls"] = self.task_loss(logits, targets)
            supervised = (
                self.config.supervise_gate and self.config.model_kwargs.get("select", "gate") != "all"
            )
            if supervised and labels:
                alpha = self.config.selection_alpha  # labels made above: no check (no device sync)
                losses.update(selection_loss(selections, labels, alpha, check_labels=False))
            else:
                losses[SELECT_LOSS_NAME] = logits.new_zeros(())
        counts = token_counts(selections, labels or None)
        return ClassifierOutput(logits, losses, selections, labels, counts)

    def forward(self, images: torch.Tensor, targets: Any = None) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.forward_details(images, targets)
        self.last_token_counts = out.token_counts
        return out.losses if self.training else out.logits

    @torch.no_grad()
    def training_stats(self) -> dict[str, float]:
        """Kept-token ratio per SPA stage (all tokens; object/background tokens when there are boxes)."""
        stats: dict[str, float] = {}
        for stage, c in sorted(self.last_token_counts.items()):
            ratios = keep_ratios({stage: c})[stage]
            stats[f"keep_stage{stage + 1}"] = ratios["all"]
            if c[3] + c[5] > 0:
                stats[f"keep_obj_stage{stage + 1}"] = ratios["object"]
                stats[f"keep_bg_stage{stage + 1}"] = ratios["background"]
        return stats


def build_classifier(config: ClassifierConfig | None = None, **overrides: Any) -> SPAClassifier:
    """Build the classifier a ``ClassifierConfig`` describes (keyword overrides allowed)."""
    if config is None:
        config = ClassifierConfig(**overrides)
    elif overrides:
        config = ClassifierConfig(**{**asdict(config), **overrides})
    backbone = create_backbone(
        config.model,
        num_classes=config.num_classes,
        global_pool=config.global_pool,
        img_size=config.img_size,
        **config.model_kwargs,
    )
    return SPAClassifier(backbone, config)


class ClassificationTask:
    """``--task classify`` / ``multilabel``: what ``spa train`` / ``spa eval`` need (see
    :mod:`spa.tasks.base`)."""

    meta_key = "classifier"

    def __init__(self, name: str) -> None:
        if name not in CLASSIFY_TASKS:
            raise ValueError(f"task must be one of {CLASSIFY_TASKS}, got {name!r}")
        self.name = name

    def _open(self, cfg: Any, spec: str, split: str, classes: list[str] | None) -> Any:
        from spa.data.specs import open_classification

        return open_classification(
            spec, split, self.name, cfg.img_size, classes, cfg.empty_images, cfg.builtin_options()
        )

    def datasets(self, cfg: Any) -> tuple[Any, Any]:
        """``(train, val)``: square ``img_size`` images, boxes follow."""
        train = self._open(cfg, cfg.data, "train", None)
        return train, self._open(cfg, cfg.val_data or cfg.data, "val", list(train.class_names))

    def eval_dataset(self, cfg: Any, model: SPAClassifier | None = None) -> Any:
        classes = list(model.config.class_names) if model is not None else None
        return self._open(cfg, cfg.val_data or cfg.data, "val", classes or None)

    def model_config(self, cfg: Any, train_set: Any) -> ClassifierConfig:
        from spa.config import config_from

        names = list(train_set.class_names)
        return config_from(
            ClassifierConfig,
            cfg,
            task=self.name,
            num_classes=len(names),
            class_names=names,
            model_kwargs=cfg.model_kwargs(),
        )

    def build(self, config: ClassifierConfig) -> SPAClassifier:
        return build_classifier(config)

    def config_from_meta(self, stored: dict[str, Any]) -> ClassifierConfig:
        return ClassifierConfig(**stored)

    def describe(self, config: ClassifierConfig) -> str:
        return f"{config.model} {config.task} ({config.num_classes} classes)"

    @property
    def collate(self) -> Any:
        from spa.data import collate_classification

        return collate_classification

    def evaluate(
        self, model: SPAClassifier, dataset: Any, batch_size: int, device: Any, progress: bool
    ) -> dict:
        from spa.tasks.evaluation import evaluate_classification

        return evaluate_classification(
            model, dataset, batch_size=batch_size, device=device, progress=progress
        )

    def format(self, result: dict[str, Any]) -> str:
        from spa.tasks.evaluation import format_classification_metrics

        return format_classification_metrics(result)
