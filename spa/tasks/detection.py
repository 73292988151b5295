"""Detection and instance segmentation: torchvision Faster / Mask R-CNN on an FPN over SPT or Swin.

The selection labels are built *inside* the model from the targets after the detector's own transform
(resize + batching), i.e. from the boxes/masks exactly as the backbone sees them, and the selection loss
joins the detector's loss dict as ``loss_select``.
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
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from spa.labels import batch_selection_labels, grid_size
from spa.losses import SELECT_LOSS_NAME, selection_loss
from spa.selection import Selection
from spa.tasks.backbones import build_body

__all__ = ["DETECTORS", "BackboneWithFPN", "DetectorConfig", "SPADetector", "build_detector"]

DETECTORS = ("faster_rcnn", "mask_rcnn")


class BackboneWithFPN(nn.Module):
    """A ``features_only`` backbone (SPT or timm Swin) followed by torchvision's FPN (+ max-pool level).

    torchvision's own ``BackboneWithFPN`` expects a body whose named children give the features
    (``IntermediateLayerGetter``); timm feature extractors return a list, so this small wrapper feeds
    that list to the same ``FeaturePyramidNetwork``. ``selections`` holds the SPA records of the latest
    forward (empty for a dense backbone).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        self.selections: list[Selection] = []

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if hasattr(self.body, "forward_with_selections"):
            features, self.selections = self.body.forward_with_selections(x)
        else:
            features, self.selections = self.body(x), []
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


class _RecordingTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform, remembering the batched input size and the resized targets."""

    def forward(self, images, targets=None):
        image_list, targets = super().forward(images, targets)
        self.last_input_size = tuple(image_list.tensors.shape[-2:])
        self.last_image_sizes = list(image_list.image_sizes)
        self.last_targets = targets
        return image_list, targets


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
        return d


class SPADetector(nn.Module):
    """A torchvision two-stage detector whose training loss includes the selection loss.

    ``forward(images, targets)`` follows torchvision: a loss dict in training, detections in eval
    (``targets`` may also be given in eval; they are then resized like the images so that
    ``object_masks()`` can tell object tokens from background tokens).
    """

    def __init__(self, detector: nn.Module, config: DetectorConfig) -> None:
        super().__init__()
        self.detector = detector
        self.config = config

    @property
    def backbone(self) -> BackboneWithFPN:
        return self.detector.backbone

    @property
    def selections(self) -> list[Selection]:
        """SPA records of the latest forward (empty for a dense backbone)."""
        return self.backbone.selections

    def selection_labels(self, stride: int) -> torch.Tensor:
        """Labels ``[B, h, w]`` at ``stride`` from the latest forward's resized targets."""
        transform = self.detector.transform
        if transform.last_targets is None:
            raise RuntimeError("the latest forward had no targets")
        return batch_selection_labels(
            transform.last_targets,
            transform.last_input_size,
            stride,
            use_masks=self.config.use_masks_for_labels,
            device=self.selections[0].own_logits.device if self.selections else None,
        )

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        self.detector.transform.last_targets = None
        out = self.detector(images, targets)
        if self.training and self.selections:
            if self.config.supervise_gate:
                out.update(
                    selection_loss(self.selections, self.selection_labels, alpha=self.config.selection_alpha)
                )
            else:  # the gate learns from the detection losses alone; the term stays in the logs as 0
                out[SELECT_LOSS_NAME] = self.selections[0].own_logits.new_zeros(())
        return out

    @torch.no_grad()
    def token_counts(self) -> dict[int, torch.Tensor]:
        """Per SPA stage, summed over its blocks: ``[kept object, object, kept background, background]``
        tokens of the latest forward (which must have had targets), over the real image area only."""
        out: dict[int, torch.Tensor] = {}
        sizes = self.detector.transform.last_image_sizes
        for sel in self.selections:
            labels = self.selection_labels(sel.stride).to(sel.keep.device) > 0.5
            valid = torch.zeros_like(labels)
            for i, size in enumerate(sizes):
                h, w = grid_size(size, sel.stride)
                valid[i, :h, :w] = True
            obj, bg = labels & valid, ~labels & valid
            counts = torch.stack([(sel.keep & obj).sum(), obj.sum(), (sel.keep & bg).sum(), bg.sum()])
            out[sel.stage] = out.get(sel.stage, 0) + counts.double().cpu()
        return out

    @torch.no_grad()
    def training_stats(self) -> dict[str, float]:
        """Kept-token ratio per SPA stage on object and on background tokens in the latest forward."""
        stats: dict[str, float] = {}
        if not self.selections or self.detector.transform.last_targets is None:
            return stats
        for stage, c in sorted(self.token_counts().items()):
            stats[f"keep_obj_stage{stage + 1}"] = float(c[0] / c[1]) if c[1] else float("nan")
            stats[f"keep_bg_stage{stage + 1}"] = float(c[2] / c[3]) if c[3] else float("nan")
        return stats


def build_detector(config: DetectorConfig | None = None, **overrides: Any) -> SPADetector:
    """Build the detector a ``DetectorConfig`` describes (keyword overrides allowed)."""
    if config is None:
        config = DetectorConfig(**overrides)
    elif overrides:
        config = DetectorConfig(**{**asdict(config), **overrides})
    body = build_body(config.model, config.img_size, **config.model_kwargs)
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
    old = detector.transform
    detector.transform = _RecordingTransform(old.min_size, old.max_size, old.image_mean, old.image_std)
    detector.transform.last_targets = None
    return SPADetector(detector, config)
