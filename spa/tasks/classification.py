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
the backbone (timm conventions).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from spa.data.common import DatasetError, load_rgb
from spa.data.multilabel import MultiLabelView, multi_hot
from spa.flops import counting_macs
from spa.labels import batch_selection_labels
from spa.losses import SELECT_LOSS_NAME, selection_loss
from spa.models.spt import create_model as create_spt
from spa.selection import Selection
from spa.tasks.backbones import SPT_MODELS, SWIN_BASELINES

__all__ = [
    "CLASSIFY_TASKS",
    "BoxedMultiLabelView",
    "ClassifierConfig",
    "MultiLabelList",
    "SPAClassifier",
    "average_precision",
    "build_classifier",
    "classification_transforms",
    "collate_classification",
    "evaluate_classification",
    "format_classification_metrics",
    "image_folder",
    "mean_average_precision",
    "topk_accuracy",
]

CLASSIFY_TASKS = ("classify", "multilabel")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = tuple(tv_datasets.folder.IMG_EXTENSIONS)


# -- model -----------------------------------------------------------------------------------------


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


class SPAClassifier(nn.Module):
    """A timm-style classifier (SPT or timm Swin) with the task loss and the selection loss.

    ``forward(images [B, 3, H, W], targets)``: in training a dict ``{"loss_cls", "loss_select"}``, in eval
    the logits ``[B, num_classes]``. ``targets`` is a list of per-image dicts with ``"label"`` (class index
    for ``classify``, multi-hot ``[K]`` for ``multilabel``) and optionally ``"boxes"`` (xyxy in the input
    frame) / ``"masks"``, or a plain tensor of labels ``[B]`` / ``[B, K]`` (no boxes). Targets may also be
    given in eval: they then feed :meth:`token_counts` (object vs background tokens).
    """

    def __init__(self, backbone: nn.Module, config: ClassifierConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.selections: list[Selection] = []
        self.last_targets: list[dict[str, Any]] | None = None
        self.last_input_size: tuple[int, int] = (0, 0)

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

    @property
    def supervised(self) -> bool:
        """Whether the selection loss applies to the latest forward (SPA blocks that select, boxes,
        supervision on)."""
        t = self.last_targets
        return (
            self.config.supervise_gate
            and self.config.model_kwargs.get("select", "gate") != "all"
            and bool(self.selections)
            and t is not None
            and all("boxes" in x for x in t)
        )

    def forward_with_selections(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Selection]]:
        if hasattr(self.backbone, "forward_with_selections"):
            return self.backbone.forward_with_selections(images)
        return self.backbone(images), []

    def _targets(self, targets: Any, batch: int) -> list[dict[str, Any]] | None:
        if targets is None:
            return None
        if isinstance(targets, torch.Tensor):
            return [{"label": t} for t in targets]
        targets = list(targets)
        if len(targets) != batch or not all(isinstance(t, dict) and "label" in t for t in targets):
            raise ValueError(f"targets must be {batch} dicts with a 'label' (or a tensor of labels)")
        return targets

    def task_loss(self, logits: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor:
        labels = torch.stack([torch.as_tensor(t["label"]) for t in targets]).to(logits.device)
        if self.config.task == "classify":
            return F.cross_entropy(logits.float(), labels.long().reshape(-1))
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label targets {tuple(labels.shape)} do not match logits {tuple(logits.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def selection_labels(self, stride: int) -> torch.Tensor:
        """Labels ``[B, h, w]`` at ``stride`` from the latest forward's boxes/masks."""
        if self.last_targets is None:
            raise RuntimeError("the latest forward had no targets")
        return batch_selection_labels(
            self.last_targets,
            self.last_input_size,
            stride,
            use_masks=self.config.use_masks_for_labels,
            device=self.selections[0].own_logits.device if self.selections else None,
        )

    def forward(self, images: torch.Tensor, targets: Any = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        logits, self.selections = self.forward_with_selections(images)
        self.last_input_size = (int(images.shape[-2]), int(images.shape[-1]))
        self.last_targets = self._targets(targets, images.shape[0])
        if not self.training:
            return logits
        if self.last_targets is None:
            raise ValueError("training needs targets")
        losses = {"loss_cls": self.task_loss(logits, self.last_targets)}
        if self.supervised:
            losses.update(selection_loss(self.selections, self.selection_labels, self.config.selection_alpha))
        else:
            losses[SELECT_LOSS_NAME] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def token_counts(self) -> dict[int, torch.Tensor]:
        """Per SPA stage, summed over its blocks: ``[kept, all, kept object, object, kept background,
        background]`` tokens of the latest forward (object/background only when it had boxes)."""
        out: dict[int, torch.Tensor] = {}
        boxed = self.last_targets is not None and all("boxes" in t for t in self.last_targets)
        for sel in self.selections:
            keep = sel.keep
            counts = [keep.sum(), torch.tensor(keep.numel())]
            if boxed:
                obj = self.selection_labels(sel.stride).to(keep.device) > 0.5
                counts += [(keep & obj).sum(), obj.sum(), (keep & ~obj).sum(), (~obj).sum()]
            else:
                counts += [torch.tensor(0)] * 4
            c = torch.stack([torch.as_tensor(v).to(keep.device) for v in counts]).double().cpu()
            out[sel.stage] = out.get(sel.stage, 0) + c
        return out

    @torch.no_grad()
    def training_stats(self) -> dict[str, float]:
        """Kept-token ratio per SPA stage (all tokens; object/background tokens when there are boxes)."""
        stats: dict[str, float] = {}
        for stage, c in sorted(self.token_counts().items()):
            stats[f"keep_stage{stage + 1}"] = _ratio(c[0], c[1])
            if c[3] + c[5] > 0:
                stats[f"keep_obj_stage{stage + 1}"] = _ratio(c[2], c[3])
                stats[f"keep_bg_stage{stage + 1}"] = _ratio(c[4], c[5])
        return stats


def _ratio(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    return float(a / b) if b else math.nan


def build_backbone(config: ClassifierConfig) -> nn.Module:
    """The classifier backbone: an SPT variant or a timm Swin baseline, with ``num_classes`` outputs."""
    common = dict(num_classes=config.num_classes, global_pool=config.global_pool, img_size=config.img_size)
    if config.model in SPT_MODELS:
        return create_spt(config.model, **common, **config.model_kwargs)
    if config.model in SWIN_BASELINES:
        unknown = set(config.model_kwargs) - {"drop_path_rate"}
        if unknown:
            raise ValueError(
                f"{config.model} is a dense Swin baseline; SPT options {sorted(unknown)} do not apply"
            )
        timm_name, overrides = SWIN_BASELINES[config.model]
        return timm.create_model(
            timm_name, pretrained=False, dynamic_img_size=True, **common, **overrides, **config.model_kwargs
        )
    raise ValueError(f"unknown backbone {config.model!r}; choose from {SPT_MODELS + tuple(SWIN_BASELINES)}")


def build_classifier(config: ClassifierConfig | None = None, **overrides: Any) -> SPAClassifier:
    """Build the classifier a ``ClassifierConfig`` describes (keyword overrides allowed)."""
    if config is None:
        config = ClassifierConfig(**overrides)
    elif overrides:
        config = ClassifierConfig(**{**asdict(config), **overrides})
    return SPAClassifier(build_backbone(config), config)


# -- data ------------------------------------------------------------------------------------------


def classification_transforms(
    train: bool, size: int, boxes: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> v2.Compose:
    """``torchvision.transforms.v2`` pipeline to a ``size x size`` normalised float image.

    ``boxes=False`` (folders): train = RandomResizedCrop + flip, eval = resize + center crop.
    ``boxes=True`` (multi-label from detection data): the whole image is resized to ``size x size`` (the
    image-level labels stay true), flipped in training; boxes and masks follow (tv_tensors).
    """
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if boxes:
        if train:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.Resize((size, size), antialias=True), v2.ClampBoundingBoxes()]
    elif train:
        steps += [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps += [v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder(
    root: str | Path, split: str, transform: Callable | None = None, classes: Sequence[str] | None = None
) -> tv_datasets.ImageFolder:
    """``torchvision.datasets.ImageFolder`` over ``ROOT/split`` with checks and clear errors.

    ``classes``: the class list (training classes) the labels must index; a class folder not in it is an
    error (unknown class name); classes missing from this split are fine. Image files placed directly in
    the split folder (no class folder, so no label) and empty class folders are errors.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: no such folder (folder data needs ROOT/train/CLASS/*.jpg and ROOT/val/...)"
        )
    loose = _image_files(folder)
    if loose:
        raise DatasetError(
            f"{folder}: {len(loose)} image(s) without a label (not inside a class folder), e.g. {loose[0].name}"
        )
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{folder}: no class folders (expected {folder}/CLASS_NAME/IMAGE files)")
    empty = [d for d in dirs if not _image_files(folder / d)]
    if empty:
        raise DatasetError(f"{folder}: class folder(s) without images: {empty}")
    known = list(classes) if classes is not None else dirs
    unknown = sorted(set(dirs) - set(known))
    if unknown:
        raise DatasetError(f"{folder}: unknown class name(s) {unknown}; the classes are {known}")
    index = {c: i for i, c in enumerate(known)}
    data = tv_datasets.ImageFolder(str(folder), transform=transform)
    remap = {i: index[c] for c, i in data.class_to_idx.items()}
    data.target_transform = remap.__getitem__
    data.classes, data.class_to_idx = known, index
    data.num_classes, data.class_names = len(known), known  # type: ignore[attr-defined]
    return data


class _FolderItems(Dataset):
    """``(image, {"label": class index})`` items of an :func:`image_folder` (for the classifier)."""

    def __init__(self, folder: tv_datasets.ImageFolder) -> None:
        self.folder = folder
        self.num_classes, self.class_names = folder.num_classes, folder.class_names

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, label = self.folder[index]
        return image, {"label": torch.tensor(label, dtype=torch.int64)}


def check_labeled(view: MultiLabelView, source: str, empty_images: str = "error") -> MultiLabelView:
    """Refuse (``"error"``) or drop (``"drop"``, with a warning) images without any class; ``"keep"``
    keeps them as all-negative examples."""
    if empty_images not in ("error", "drop", "keep"):
        raise ValueError(f"empty_images must be 'error', 'drop' or 'keep', got {empty_images!r}")
    if empty_images == "keep" or len(view) == 0:
        return view
    targets = view.targets()
    empty = (targets.sum(1) == 0).nonzero().flatten().tolist()
    if empty and empty_images == "error":
        ids = [_image_name(view.dataset, i) for i in empty[:5]]
        raise DatasetError(
            f"{source}: {len(empty)} image(s) without labels (no objects), e.g. {ids}; "
            "use --empty-images drop (or keep, as all-negative examples)"
        )
    if empty:
        warnings.warn(f"{source}: dropped {len(empty)} image(s) without labels", stacklevel=2)
        dropped = set(empty)
        view.indices = [i for i in range(len(view)) if i not in dropped]  # type: ignore[attr-defined]
    return view


def _image_name(dataset: Any, index: int) -> str:
    ids = getattr(dataset, "ids", None)
    return f"image id {ids[index]}" if ids is not None else f"index {index}"


class BoxedMultiLabelView(MultiLabelView):
    """:class:`~spa.data.MultiLabelView` whose items keep the boxes (and masks) for selection labels.

    ``transforms(image, target)`` acts jointly (``torchvision.transforms.v2``: boxes follow the image).
    Items: ``(image, {"label": multi_hot [K], "boxes": [M, 4], "masks": [M, H, W] (if any)})``.
    ``boxes=False`` returns the label only (unsupervised-gate mode).
    """

    def __init__(self, dataset: Any, transforms: Callable | None = None, boxes: bool = True) -> None:
        super().__init__(dataset)
        self.transforms = transforms
        self.boxes = boxes
        self.indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def targets(self) -> torch.Tensor:
        rows = self.indices if self.indices is not None else range(len(self.dataset))
        return torch.stack([multi_hot(self.dataset.image_labels(i), self.num_classes) for i in rows])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.indices is not None:
            index = self.indices[index]
        image, target = self.dataset[index]
        label = multi_hot(target["labels"], self.num_classes)
        keep = {k: target[k] for k in ("boxes", "masks") if k in target} if self.boxes else {}
        if self.transforms is not None:
            image, keep = self.transforms(image, keep)
        out = {"label": label}
        for k, v in keep.items():
            out[k] = torch.as_tensor(v)
        return image, out


class MultiLabelList(Dataset):
    """A multi-label set without boxes: ``DIR/classes.txt`` (one class name a line) and ``DIR/SPLIT.txt``
    lines ``IMAGE_PATH CLASS [CLASS ...]`` (paths relative to ``DIR``; ``#`` starts a comment).

    An unknown class name, a line without classes (an image without labels) or a missing image file is a
    ``DatasetError`` naming the file and line.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        classes_file, list_file = self.root / "classes.txt", self.root / f"{split}.txt"
        for f in (classes_file, list_file):
            if not f.is_file():
                raise DatasetError(f"{f}: missing (a label list needs classes.txt and {split}.txt in {root})")
        names = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise DatasetError(f"{classes_file}: no class names")
        if len(set(names)) != len(names):
            raise DatasetError(f"{classes_file}: duplicate class names")
        self.class_names = names
        self.num_classes = len(names)
        index = {c: i for i, c in enumerate(names)}
        self.items: list[tuple[Path, list[int]]] = []
        for n, line in enumerate(list_file.read_text().splitlines(), start=1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            where = f"{list_file}:{n}"
            if len(parts) == 1:
                raise DatasetError(f"{where}: image {parts[0]} has no labels")
            unknown = [c for c in parts[1:] if c not in index]
            if unknown:
                raise DatasetError(f"{where}: class name(s) {unknown} not in {classes_file} ({names})")
            path = self.root / parts[0]
            if not path.is_file():
                raise DatasetError(f"{where}: image file {path} missing")
            self.items.append((path, sorted({index[c] + 1 for c in parts[1:]})))
        if not self.items:
            raise DatasetError(f"{list_file}: no images listed")

    def __len__(self) -> int:
        return len(self.items)

    def targets(self) -> torch.Tensor:
        return torch.stack([multi_hot(labels, self.num_classes) for _, labels in self.items])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path, labels = self.items[index]
        image = load_rgb(path, f"{self.root}, item {index}")
        if self.transform is not None:
            image = self.transform(image)
        return image, {"label": multi_hot(labels, self.num_classes)}


def collate_classification(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list]:
    """``[(image, target), ...] -> (images [B, 3, H, W], [targets])`` (images of one size)."""
    images = [torch.as_tensor(b[0]) for b in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"classification images must share one size in a batch, got {sorted(shapes)}")
    return torch.stack(images), [b[1] for b in batch]


def folder_items(root: str | Path, split: str, transform: Callable | None, classes=None) -> _FolderItems:
    """:func:`image_folder` items as ``(image, {"label": index})``."""
    return _FolderItems(image_folder(root, split, transform, classes))


# -- metrics ---------------------------------------------------------------------------------------


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``: fraction of samples whose label is among the k highest logits
    (k is capped at the number of classes)."""
    labels = labels.reshape(-1)
    order = logits.argsort(dim=1, descending=True)
    out = {}
    for k in ks:
        hit = (order[:, : min(k, logits.shape[1])] == labels[:, None]).any(1)
        out[f"top{k}"] = float(hit.float().mean()) if labels.numel() else math.nan
    return out


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


@torch.no_grad()
def evaluate_classification(
    model: SPAClassifier,
    dataset: Dataset,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    count_gmacs: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate on a classification dataset (items ``(image, {"label", ["boxes"]})``).

    Returns ``{"images", "task", "top1"/"top5" or "mAP"/"AP", "keep": {stageN: {"all", "object",
    "background"}}, "keep_mean", "gmacs": {"kept", "executed"}}`` (object/background NaN without boxes;
    ``keep_mean`` averages the SPA stages' kept ratios, 1.0 for a dense model).
    """
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_classification)
    iterator: Any = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", dynamic_ncols=True)
    all_logits, all_labels = [], []
    tokens: dict[int, torch.Tensor] = {}
    seen = 0
    # the backbone's MACs (features, not the classifier) are counted by hooks during the model's own forward
    counting = (
        counting_macs(model.backbone, count_images=False, exclude=[model.backbone.get_classifier()])
        if count_gmacs
        else contextlib.nullcontext()
    )
    with counting as tally:
        for images, targets in iterator:
            images = images.to(device)
            logits = model(images, targets)
            for stage, counts in model.token_counts().items():
                tokens[stage] = tokens.get(stage, torch.zeros(6, dtype=torch.float64)) + counts
            all_logits.append(logits.float().cpu())
            all_labels.append(torch.stack([torch.as_tensor(t["label"]) for t in targets]).cpu())
            seen += len(images)
            if tally is not None:
                tally.images += len(images)
    if seen == 0:
        raise ValueError("the evaluation set is empty")
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    result: dict[str, Any] = {"images": seen, "task": model.config.task}
    if model.config.task == "classify":
        result.update(topk_accuracy(logits, labels))
    else:
        result.update(mean_average_precision(logits.sigmoid(), labels, model.config.class_names or None))
    result["keep"] = {
        f"stage{stage + 1}": {
            "all": _ratio(c[0], c[1]),
            "object": _ratio(c[2], c[3]),
            "background": _ratio(c[4], c[5]),
        }
        for stage, c in sorted(tokens.items())
    }
    result["keep_mean"] = float(np.mean([v["all"] for v in result["keep"].values()])) if tokens else 1.0
    if count_gmacs:
        count = tally.result()
        result["gmacs"] = {"kept": count.kept, "executed": count.executed}
    return result


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
    if "gmacs" in result:
        lines.append(
            f"backbone GMACs/image: kept {result['gmacs']['kept']:.4f}, executed {result['gmacs']['executed']:.4f}"
        )
    return "\n".join(lines)
