"""Selection overlays: each image with the tokens its SPA stages kept (matplotlib, Agg).

``draw_selection_overlays(images, selections, out_path)`` draws one row per image: the image (with boxes, if
given), then one panel per SPA stage where tokens the stage dropped are dimmed and a grid marks the stage's
token cells (its stride). A stage has several blocks; a token's brightness is the fraction of the stage's
blocks that kept it (fully bright: kept by every block). ``model_selections(model, images)`` runs an SPT
backbone or an ``SPADetector`` in eval mode and returns the images as the backbone saw them (resized and
padded by the detector's transform) with the selections of that forward.

``spa viz --checkpoint CKPT --images PATHS_OR_DIR --out DIR`` does this for a detection checkpoint, one PNG per
image (detections above ``--score-threshold`` drawn as boxes).

``draw_detections(image, records, out_path, category_names)`` draws one image with its detections given as
COCO result records (boxes, ``name score`` labels, RLE masks), as ``spa predict --draw`` writes them.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spa.engine.checkpoint import atomic_write
from spa.errors import ConfigError
from spa.models import is_spt
from spa.report_figures import save_figure
from spa.selection import Selection
from spa.tasks.detection import SPADetector

__all__ = [
    "IMAGE_SUFFIXES",
    "draw_detections",
    "draw_selection_overlays",
    "model_selections",
    "register",
    "stage_keep_maps",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def stage_keep_maps(selections: Sequence[Selection]) -> list[tuple[int, int, torch.Tensor]]:
    """Per SPA stage: ``(stage, stride, fraction of the stage's blocks that kept each token [B, h, w])``."""
    if not selections:
        raise ValueError("no selections to draw (a dense backbone records none)")
    by_stage: dict[int, list[Selection]] = {}
    for sel in selections:
        if not isinstance(sel, Selection):
            raise TypeError(f"selections must be spa.Selection records, got {type(sel).__name__}")
        by_stage.setdefault(sel.stage, []).append(sel)
    out = []
    for stage, sels in sorted(by_stage.items()):
        frac = torch.stack([s.keep.float().cpu() for s in sels]).mean(0)
        out.append((stage, sels[0].stride, frac))
    return out


def _to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Image ``[3, H, W]`` tensor or ``[H, W, 3]`` array -> float ``[H, W, 3]`` in [0, 1] (min-max if needed)."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensors must be [C, H, W] with C in (1, 3), got {tuple(image.shape)}")
        arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"image arrays must be [H, W, C] with C in (1, 3), got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and 1.0 < hi <= 255.0:
        arr = arr / 255.0  # uint8-range values
    elif lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo)  # normalized images: min-max for display
    return np.clip(arr, 0.0, 1.0)


def _draw_boxes(ax, boxes, color: str | tuple = "lime") -> None:
    from matplotlib.patches import Rectangle

    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    for x0, y0, x1, y1 in boxes.tolist():
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))


def draw_selection_overlays(
    images: torch.Tensor | Sequence[torch.Tensor | np.ndarray],
    selections: Sequence[Selection],
    out_path: str | Path,
    boxes: Sequence | None = None,
    titles: Sequence[str] | None = None,
    dim: float = 0.25,
) -> Path:
    """Save a PNG with one row per image: the image (+ ``boxes``), then one panel per SPA stage.

    Args:
        images: ``[B, 3, H, W]`` tensor or a list of ``[3, H, W]`` tensors / ``[H, W, 3]`` arrays, in the frame
            the backbone saw (the selections' token ``(r, c)`` covers pixels ``[r*s, (r+1)*s)`` at stride ``s``).
        selections: the SPA blocks' ``Selection`` records of one forward over these images (batch ``B``).
        out_path: PNG to write (parent folders are created).
        boxes: optional per-image ``[N, 4]`` ``xyxy`` boxes in the same pixel frame.
        titles: optional per-image titles.
        dim: brightness of a token no block of the stage kept (kept tokens keep full brightness).
    Returns:
        ``out_path`` as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    images = list(images)
    if not images:
        raise ValueError("no images to draw")
    stages = stage_keep_maps(selections)
    batch = stages[0][2].shape[0]
    if batch != len(images):
        raise ValueError(f"{len(images)} images but the selections cover a batch of {batch}")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"boxes must have one entry per image ({len(images)}), got {len(boxes)}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles must have one entry per image ({len(images)}), got {len(titles)}")
    cols = 1 + len(stages)
    fig, axes = plt.subplots(len(images), cols, figsize=(3.2 * cols, 3.2 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        rgb = _to_hwc(image)
        H, W = rgb.shape[:2]
        ax = axes[i, 0]
        ax.imshow(rgb)
        ax.set_title(titles[i] if titles else "image", fontsize=9)
        if boxes is not None:
            _draw_boxes(ax, boxes[i])
        for j, (stage, stride, frac) in enumerate(stages):
            ax = axes[i, j + 1]
            cells = frac[i].numpy()
            up = np.kron(cells, np.ones((stride, stride), dtype=np.float32))
            canvas = np.zeros((max(H, up.shape[0]), max(W, up.shape[1])), dtype=np.float32)
            canvas[: up.shape[0], : up.shape[1]] = up
            shade = dim + (1.0 - dim) * canvas[:H, :W, None]
            ax.imshow(rgb * shade)
            for x in range(stride, W, stride):
                ax.axvline(x - 0.5, color="white", linewidth=0.4, alpha=0.35)
            for y in range(stride, H, stride):
                ax.axhline(y - 0.5, color="white", linewidth=0.4, alpha=0.35)
            if boxes is not None:
                _draw_boxes(ax, boxes[i])
            h_real, w_real = -(-H // stride), -(-W // stride)
            kept = float(frac[i, :h_real, :w_real].mean())
            ax.set_title(f"stage {stage + 1} (stride {stride}): {kept:.0%} kept", fontsize=9)
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, out_path, dpi=100)


def draw_detections(
    image: torch.Tensor | np.ndarray,
    records: Sequence[dict],
    out_path: str | Path,
    category_names: dict[int, str] | None = None,
    mask_alpha: float = 0.45,
) -> Path:
    """Save a PNG of one image with its detections: boxes, ``name score`` labels and (if present) masks.

    Args:
        image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array, in the frame of the records.
        records: this image's COCO result dicts (``bbox`` xywh, ``category_id``, ``score``, optional
            ``segmentation`` RLE of size ``H x W``), e.g. from ``spa predict``'s ``predictions.json``.
        out_path: PNG to write, atomically (parent folders are created).
        category_names: category id -> name shown (default: the id).
        mask_alpha: opacity of the mask colour.
    Returns:
        ``out_path`` as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pycocotools import mask as mask_utils

    rgb = _to_hwc(image).copy()
    H, W = rgb.shape[:2]
    palette = plt.get_cmap("tab10")
    names = category_names or {}
    records = sorted(records, key=lambda r: float(r["score"]))  # the surest drawn last, on top
    for r in records:
        if "segmentation" in r:
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = mask_utils.decode(r["segmentation"]).astype(bool)
            if mask.shape != (H, W):
                raise ValueError(f"a mask of size {mask.shape} for an image of size {(H, W)}")
            color = np.asarray(palette(int(r["category_id"]) % 10)[:3])
            rgb[mask] = (1.0 - mask_alpha) * rgb[mask] + mask_alpha * color
    scale = max(1.0, 512 / max(H, W))  # small images are shown larger, so that labels stay readable
    fig, ax = plt.subplots(figsize=(W * scale / 100, H * scale / 100))
    ax.imshow(rgb)
    for r in records:
        x, y, w, h = (float(v) for v in r["bbox"])
        color = palette(int(r["category_id"]) % 10)
        _draw_boxes(ax, [[x, y, x + w, y + h]], color=color)
        label = f"{names.get(int(r['category_id']), r['category_id'])} {float(r['score']):.2f}"
        ax.text(
            x, y, label, fontsize=7, color="white", va="bottom", clip_on=True,
            bbox={"facecolor": color, "alpha": 0.75, "pad": 1, "edgecolor": "none"},
        )  # fmt: skip
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.axis("off")
    fig.tight_layout()
    try:
        return atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


@torch.no_grad()
def model_selections(
    model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[Selection], list[dict] | None]:
    """Run ``model`` in eval mode on ``images``; return (images as the backbone saw them, selections, detections).

    ``model``: an ``SPADetector`` (images: list of ``[3, H, W]`` in [0, 1]; they are shown resized and padded
    like the detector's transform does, detections rescaled to that frame) or an SPT backbone
    (``forward_with_selections``; images ``[B, 3, H, W]``; detections ``None``).
    """
    model.eval()
    if isinstance(model, SPADetector):
        images = list(images)
        out = model.forward_details(images)
        shown, scaled = [], []
        for image, size, det in zip(images, out.image_sizes, out.detections):
            canvas = torch.zeros(3, *out.input_size)
            canvas[:, : size[0], : size[1]] = F.interpolate(
                image[None].float(), size=tuple(size), mode="bilinear", align_corners=False
            )[0].clamp(0, 1)
            shown.append(canvas)
            sy, sx = size[0] / image.shape[-2], size[1] / image.shape[-1]
            boxes = det["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
            scaled.append({**{k: v.cpu() for k, v in det.items()}, "boxes": boxes})
        return shown, list(out.selections), scaled
    if not is_spt(model):
        raise TypeError(f"{type(model).__name__} is neither an SPT backbone nor an SPADetector")
    batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    _, selections = model.forward_with_selections(batch)
    return list(batch), list(selections), None


def _image_paths(items: Sequence[str]) -> list[Path]:
    """The image files of ``items``: files as given, folders searched with their sub-folders (an ImageFolder
    layout, ``ROOT/CLASS/*.jpg``, included) for ``IMAGE_SUFFIXES``, hidden ones skipped."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = (q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            paths.extend(
                sorted(q for q in found if not any(part.startswith(".") for part in q.relative_to(p).parts))
            )
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {list(items)}")
    return paths


def _load_image(path: Path, context: str = "--images") -> torch.Tensor:
    """An image file as float ``[3, H, W]`` in ``[0, 1]`` (``load_rgb``: one-line errors for unreadable files)."""
    from spa.data.common import load_rgb

    return load_rgb(path, context).as_subclass(torch.Tensor)


def _run_viz(args: argparse.Namespace) -> int:
    from spa.engine.checkpoint import check_output_folder
    from spa.gate import set_keep_threshold
    from spa.tasks.base import load_model

    check_output_folder(args.out, "--out")  # before the model is read
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint, task="detect")
    if not is_spt(model.backbone.body):
        raise ConfigError(f"{args.checkpoint} holds a dense {model.config.model}; it selects no tokens")
    if args.keep_threshold is not None:
        set_keep_threshold(model, args.keep_threshold)
    from spa.predict import _file_names, _png_names

    paths = _image_paths(args.images)[: args.max_images]
    out = Path(args.out)
    # DIR_NAME_selection.png, unique when two images share a name (as spa predict's drawings)
    for path, png in zip(paths, _png_names(_file_names(paths), suffix="selection")):
        shown, selections, detections = model_selections(model, [_load_image(path)])
        out.mkdir(parents=True, exist_ok=True)  # once an image was read: a bad first image leaves no folder
        det = detections[0]
        boxes = [det["boxes"][det["scores"] >= args.score_threshold]]
        target = out / png
        draw_selection_overlays(shown, selections, target, boxes=boxes, titles=[path.name])
        print(f"[spa viz] {path} -> {target}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa viz``."""
    from spa.config import positive_int

    viz = subparsers.add_parser(
        "viz", help="draw the tokens each SPA stage keeps, for a detection checkpoint"
    )
    viz.add_argument("--checkpoint", required=True, help="detection checkpoint with an SPT backbone")
    viz.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    viz.add_argument("--out", required=True, help="folder for the PNGs (IMAGE_selection.png)")
    viz.add_argument("--keep-threshold", type=float, help="override the gates' inference keep threshold")
    viz.add_argument("--score-threshold", type=float, default=0.5, help="draw detections at least this sure")
    viz.add_argument(
        "--max-images", type=positive_int, default=16, help="draw at most this many images (default 16)"
    )
    viz.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    viz.set_defaults(func=_run_viz)
