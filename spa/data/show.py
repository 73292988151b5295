"""Draw samples of a COCO-format dataset with their boxes and masks (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["show_samples"]


def show_samples(
    root: str | Path, out: str | Path, n: int = 8, split: str | None = None, cols: int = 4
) -> Path:
    """Save a grid of the first ``n`` images of a COCO-format set with boxes, masks and class names.

    ``root`` is a folder with ``annotations.json`` (and ``images/``), or a built-in set's folder, in
    which case ``split`` (default ``"train"``) picks the sub-folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spa.data.coco import CocoDetection

    root = Path(root)
    if not (root / "annotations.json").is_file():
        splits = (
            sorted(p.name for p in root.iterdir() if (p / "annotations.json").is_file())
            if root.is_dir()
            else []
        )
        if splits and (split or "train") not in splits:
            raise FileNotFoundError(
                f"{root} has no split {split or 'train'!r}; its splits: {', '.join(splits)}"
            )
        root = root / (split or "train")
    ds = CocoDetection(root, root / "annotations.json")
    n = min(n, len(ds))
    if n == 0:
        raise ValueError(f"{root}: no images to show")
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        image, target = ds[i]
        ax = axes.flat[i]
        img = image.permute(1, 2, 0).numpy().copy()
        masks = target.get("masks")
        for k in range(len(target["labels"])):
            color = np.array(colors(int(target["labels"][k]) % 10)[:3])
            if masks is not None:
                m = masks[k].numpy().astype(bool)
                img[m] = 0.55 * img[m] + 0.45 * color
        ax.imshow(np.clip(img, 0, 1))
        for box, lab in zip(target["boxes"].tolist(), target["labels"].tolist()):
            color = colors(int(lab) % 10)
            x1, y1, x2, y2 = box
            ax.add_patch(
                plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.2)
            )
            ax.text(
                x1, y1, ds.class_names[lab - 1], color="white", fontsize=6, backgroundcolor=color, va="bottom"
            )
        ax.set_title(f"image {target['image_id']}: {len(target['labels'])} objects", fontsize=7)
    from spa.report_figures import save_figure

    return save_figure(fig, out)
