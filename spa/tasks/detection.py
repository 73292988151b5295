"""Detection and instance segmentation: torchvision Faster / Mask R-CNN on an FPN over SPT or Swin.

The selection labels are built inside the model's forward from the targets after the detector's own
transform (resize + batching), i.e. from the boxes/masks exactly as the backbone sees them, and the
selection loss joins the detector's loss dict as ``loss_select``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from spa.labels import batch_selection_labels, check_target_frame
from spa.losses import SELECT_LOSS_NAME, selection_loss
from spa.models import create_backbone, is_spt
from spa.selection import Selection, keep_ratios, token_counts

__all__ = [
    "DETECTORS",
    "BackboneWithFPN",
    "DetectionTask",
    "DetectorConfig",
    "DetectorOutput",
    "SPADetector",
    "build_detector",
    "with_selection_loss",
]

DETECTORS = ("faster_rcnn", "mask_rcnn")


class BackboneWithFPN(nn.Module):
    """A ``features_only`` backbone (SPT or a dense Swin baseline) followed by torchvision's FPN (+ max-pool
    level).

    torchvision's own ``BackboneWithFPN`` expects a body whose named children give the features
    (``IntermediateLayerGetter``); timm feature extractors return a list, so this small wrapper feeds that
    list to the same ``FeaturePyramidNetwork``. Every body spa builds emits NCHW maps (timm's feature
    contract, ``output_fmt == "NCHW"``); a body that says otherwise is refused.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        fmt = getattr(body, "output_fmt", "NCHW")
        if fmt != "NCHW" and getattr(fmt, "value", None) != "NCHW":  # a string or timm's ``Format`` enum
            raise ValueError(
                f"the FPN needs NCHW feature maps; {type(body).__name__} says output_fmt={fmt!r}"
            )
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward_with_selections(
        self, x: torch.Tensor
    ) -> tuple[OrderedDict[str, torch.Tensor], list[Selection]]:
        """Images ``[B, 3, H, W]`` -> (FPN maps ``"0".."3"``, ``"pool"``; the SPA blocks' selections)."""
        if is_spt(self.body):
            features, selections = self.body.forward_with_selections(x)
        else:
            features, selections = self.body(x), []
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))), selections

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.forward_with_selections(x)[0]


@dataclass
class DetectorConfig:
    """Everything that defines a detector; saved with checkpoints and checked when they are loaded."""

    model: str = "spt_nano"
    detector: str = "faster_rcnn"
    num_classes: int = 5
    img_size: int = 256
    min_size: int = 256
    max_size: int = 256
    fpn_channels: int = 64
    representation_size: int = 256
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    selection_alpha: float = 0.01
    supervise_gate: bool = True
    use_masks_for_labels: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {self.anchor_sizes}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes)
        d["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs.items()}
        return d


@dataclass
class DetectorOutput:
    """Everything one detector forward produced, as locals of that forward (nothing is kept on the model).

    Attributes:
        losses: torchvision's loss terms, then ``loss_select`` (training; empty in eval).
        detections: per image ``{"boxes", "labels", "scores"[, "masks"]}`` in the original frame (eval).
        selections: the SPA blocks' records (empty for a dense backbone).
        labels: ``stride -> [B, h, w]`` selection labels built from the targets in the frame the backbone saw
            (empty without targets or SPA blocks).
        image_sizes: each image's ``(h, w)`` after the detector's resize, before batch padding.
        input_size: the padded batch's ``(H, W)``.
        token_counts: per SPA stage, see :func:`spa.selection.token_counts` (empty without labels).
    """

    losses: dict[str, torch.Tensor]
    detections: list[dict[str, torch.Tensor]]
    selections: list[Selection]
    labels: dict[int, torch.Tensor]
    image_sizes: list[tuple[int, int]]
    input_size: tuple[int, int]
    token_counts: dict[int, torch.Tensor]


def _check_targets(targets: list[dict[str, torch.Tensor]], batch: int) -> None:
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for {batch} images")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise ValueError(f"target {i}: 'boxes' must be a [N, 4] tensor (xyxy), got {shape}")


def _check_boxes_positive(targets: list[dict[str, torch.Tensor]]) -> None:
    """torchvision's rule for detection targets: every box has a positive width and height (one check for
    the whole batch)."""
    boxes = [t["boxes"] for t in targets]
    flat = torch.cat(boxes) if boxes else torch.zeros(0, 4)
    bad = (flat[:, 2:] <= flat[:, :2]).any(1)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        image = torch.repeat_interleave(torch.tensor([len(b) for b in boxes]))[first]
        raise ValueError(
            f"every box needs a positive height and width; target {int(image)} has {flat[first].tolist()} (xyxy)"
        )


class SPADetector(nn.Module):
    """A torchvision two-stage detector whose training loss includes the selection loss.

    ``forward(images, targets)`` follows torchvision: a loss dict in training, detections in eval. It runs
    the detector's transform, backbone (+ FPN), RPN and ROI heads itself (as ``GeneralizedRCNN.forward``
    does), so the resized targets, the image sizes and the selections are locals of one forward; the
    selection labels are built once, from the targets exactly as the backbone sees them, and serve the
    loss and the kept-token counts. :meth:`forward_details` returns all of it (:class:`DetectorOutput`).
    ``last_token_counts`` keeps the counts of the latest forward (for :meth:`training_stats`).
    """

    def __init__(self, detector: GeneralizedRCNN, config: DetectorConfig) -> None:
        super().__init__()
        self.detector = detector
        self.config = config
        self.last_token_counts: dict[int, torch.Tensor] = {}

    @property
    def backbone(self) -> BackboneWithFPN:
        return self.detector.backbone

    def forward_details(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> DetectorOutput:
        """One forward, everything it produced (see :class:`DetectorOutput`)."""
        det = self.detector
        if self.training and targets is None:
            raise ValueError("training needs targets")
        if targets is not None:
            _check_targets(targets, len(images))
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = det.transform(images, targets)
        if targets is not None:
            _check_boxes_positive(targets)
        features, selections = self.backbone.forward_with_selections(image_list.tensors)
        proposals, proposal_losses = det.rpn(image_list, features, targets)
        detections, detector_losses = det.roi_heads(features, proposals, image_list.image_sizes, targets)
        input_size = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        labels: dict[int, torch.Tensor] = {}
        if targets is not None and selections:
            check_target_frame(targets, image_sizes)  # boxes / masks in the frame the backbone sees
            labels = {
                s: batch_selection_labels(
                    targets, input_size, s, use_masks=self.config.use_masks_for_labels,
                    batch_size=len(images), device=selections[0].keep.device,
                )
                for s in sorted({sel.stride for sel in selections})
            }  # fmt: skip
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            losses.update(detector_losses)
            losses.update(proposal_losses)
            if selections and self.config.supervise_gate:
                alpha = self.config.selection_alpha  # labels made above: no check (no device sync)
                losses.update(selection_loss(selections, labels, alpha=alpha, check_labels=False))
            elif selections:  # the gate learns from the detection losses alone; the term logs as 0
                losses[SELECT_LOSS_NAME] = selections[0].own_logits.new_zeros(())
            detections = []
        else:
            detections = det.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        counts = token_counts(selections, labels, image_sizes) if labels else {}
        return DetectorOutput(losses, detections, selections, labels, image_sizes, input_size, counts)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        out = self.forward_details(images, targets)
        self.last_token_counts = out.token_counts
        return out.losses if self.training else out.detections

    @torch.no_grad()
    def training_stats(self) -> dict[str, float]:
        """Kept-token ratio per SPA stage on object and on background tokens in the latest forward."""
        stats: dict[str, float] = {}
        for stage, ratios in keep_ratios(self.last_token_counts).items():
            stats[f"keep_obj_stage{stage + 1}"] = ratios["object"]
            stats[f"keep_bg_stage{stage + 1}"] = ratios["background"]
        return stats


def build_detector(config: DetectorConfig | None = None, **overrides: Any) -> SPADetector:
    """Build the detector a ``DetectorConfig`` describes (keyword overrides allowed)."""
    if config is None:
        config = DetectorConfig(**overrides)
    elif overrides:
        config = DetectorConfig(**{**asdict(config), **overrides})
    body = create_backbone(config.model, features_only=True, img_size=config.img_size, **config.model_kwargs)
    backbone = BackboneWithFPN(body, config.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in config.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    rep, ch, classes = config.representation_size, config.fpn_channels, config.num_classes + 1
    common = dict(
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_head=TwoMLPHead(ch * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, classes),
    )
    if config.detector == "mask_rcnn":
        detector = MaskRCNN(
            backbone,
            mask_head=MaskRCNNHeads(ch, (ch, ch), 1),
            mask_predictor=MaskRCNNPredictor(ch, ch, classes),
            **common,
        )
    else:
        detector = FasterRCNN(backbone, **common)
    return SPADetector(detector, config)


def with_selection_loss(
    detector: GeneralizedRCNN,
    selection_alpha: float = 0.01,
    supervise_gate: bool = True,
    use_masks_for_labels: bool = True,
) -> SPADetector:
    """Your own torchvision two-stage detector (Faster / Mask / Keypoint R-CNN, any heads or anchors) whose
    backbone is :class:`BackboneWithFPN` over an SPT body, as an :class:`SPADetector`: its training losses
    include ``loss_select``, with labels built from the targets in the frame the backbone saw (targets in
    another frame raise). torchvision's own ``BackboneWithFPN`` expects ``IntermediateLayerGetter`` features
    and cannot wrap a timm feature extractor: build the backbone with ``spa.tasks.BackboneWithFPN(body, C)``.
    """
    backbone = getattr(detector, "backbone", None)
    if not isinstance(detector, GeneralizedRCNN) or not hasattr(backbone, "forward_with_selections"):
        raise TypeError(
            "expected a torchvision GeneralizedRCNN whose backbone is spa.tasks.BackboneWithFPN(body, "
            f"out_channels); got {type(detector).__name__} with backbone {type(backbone).__name__}"
        )
    body = backbone.body
    name = str((getattr(body, "pretrained_cfg", None) or {}).get("architecture", type(body).__name__))
    predictor = getattr(detector.roi_heads, "box_predictor", None)
    classes = int(getattr(getattr(predictor, "cls_score", None), "out_features", 2)) - 1
    transform = detector.transform
    config = DetectorConfig(  # describes the detector (evaluation, logs); build_detector cannot rebuild it
        model=name,
        detector="mask_rcnn" if detector.roi_heads.has_mask() else "faster_rcnn",
        num_classes=max(classes, 1),
        img_size=int(transform.min_size[0]),
        min_size=int(transform.min_size[0]),
        max_size=int(transform.max_size),
        fpn_channels=int(backbone.out_channels),
        selection_alpha=selection_alpha,
        supervise_gate=supervise_gate,
        use_masks_for_labels=use_masks_for_labels,
    )
    return SPADetector(detector, config)


class DetectionTask:
    """``--task detect``: what ``spa train`` / ``spa eval`` need from detection (see :mod:`spa.tasks.base`)."""

    name = "detect"
    meta_key = "detector"

    def datasets(self, cfg: Any) -> tuple[Any, Any]:
        """``(train, val)``: train with box-aware augmentation, val untransformed (evaluated at full size)."""
        from spa.data import detection_transforms
        from spa.data.specs import check_classes, open_detection

        transforms = detection_transforms(train=True, size=cfg.img_size)
        train = open_detection(cfg.data, "train", transforms, cfg.builtin_options())
        val = self.eval_dataset(cfg)
        names = getattr(train, "class_names", None)
        if names and getattr(val, "class_names", None):  # a label means the same class in both splits
            check_classes(val, names, f"{cfg.val_data or cfg.data} (val)", "the training set has")
        return train, val

    def eval_dataset(self, cfg: Any, model: SPADetector | None = None) -> Any:
        """The evaluation set alone (no training split needed); checked against ``model``'s classes."""
        from spa.data.specs import open_detection_eval

        val = open_detection_eval(cfg.data, cfg.val_data, cfg.builtin_options())
        if model is not None and val.num_classes != model.config.num_classes:
            raise ValueError(
                f"the model was trained for {model.config.num_classes} classes but "
                f"{cfg.val_data or cfg.data} has {val.num_classes}"
            )
        return val

    def model_config(self, cfg: Any, train_set: Any) -> DetectorConfig:
        from spa.config import config_from

        return config_from(
            DetectorConfig,
            cfg,
            num_classes=train_set.num_classes,
            min_size=cfg.min_size or cfg.img_size,
            max_size=cfg.max_size or cfg.img_size,
            model_kwargs=cfg.model_kwargs(),
        )

    def build(self, config: DetectorConfig) -> SPADetector:
        return build_detector(config)

    def config_from_meta(self, stored: dict[str, Any]) -> DetectorConfig:
        return DetectorConfig(**stored)

    def describe(self, config: DetectorConfig) -> str:
        return f"{config.model} + {config.detector}"

    @property
    def collate(self) -> Any:
        from spa.data import collate_detection

        return collate_detection

    def evaluate(
        self, model: SPADetector, dataset: Any, batch_size: int, device: Any, progress: bool
    ) -> dict:
        from spa.tasks.evaluation import evaluate_detection

        return evaluate_detection(model, dataset, batch_size=batch_size, device=device, progress=progress)

    def format(self, result: dict[str, Any]) -> str:
        from spa.tasks.evaluation import format_metrics

        return format_metrics(result)
