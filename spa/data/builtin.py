"""The built-in detection dataset: real object crops with exact masks pasted on crops of real photos.

Nothing is downloaded: everything comes from images inside scikit-image (see
``shared/docs/offline-data.md``). Classes (labels ``1..5``):

- ``coin``: the 24 real coins of ``skimage.data.coins()``, segmented once (watershed on the Sobel map),
  tinted copper/silver/gold;
- ``face``: the 100 real face crops of ``skimage.data.lfw_subset()`` under an elliptical mask;
- ``horse``: the real horse silhouette of ``skimage.data.horse()``, aspect-jittered, filled with a
  tinted photo texture;
- ``triangle`` and ``star``: random polygons drawn with ``skimage.draw``, filled with textured colour.

Distractors that are **not** objects: the 100 non-face crops of ``lfw_subset`` (same look as faces),
textured rectangles and irregular blobs, plus whatever the photos contain (the astronaut, the cat).
Objects are pasted at several scales without overlapping each other (so every mask is exact and
fully visible) until the image's object area reaches its coverage target (the ``coverage`` knob,
jittered x0.5..1.5 per image). Everything is drawn from ``numpy.random.default_rng([seed, split,
index])``, so a set is reproducible and image ``i`` does not depend on how many images are made.

Output (COCO format): ``OUT/{train,val}/images/*.png``, ``OUT/{train,val}/annotations.json`` (boxes,
compressed-RLE masks, areas, categories) and ``OUT/meta.json`` (parameters and achieved coverage).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from spa.errors import SpaWarning

__all__ = ["BUILTIN_CLASSES", "BuiltinConfig", "builtin_dataset", "ensure_builtin", "make_builtin"]

BUILTIN_CLASSES = ("coin", "face", "horse", "triangle", "star")
_VERSION = 1


@dataclass(frozen=True)
class BuiltinConfig:
    """Parameters of a built-in set (stored in ``meta.json``)."""

    images: int = 64
    val_images: int = 16
    size: int = 256
    coverage: float = 0.2
    seed: int = 0
    clutter: float = 3.0  # mean number of distractors per image
    version: int = _VERSION


# ----------------------------------------------------------------------------- assets (cached, loaded once)


@functools.lru_cache(maxsize=1)
def _backgrounds() -> list[np.ndarray]:
    import skimage.data as d

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    names += ["brick", "grass", "gravel", "camera", "moon", "cell", "clock", "page"]
    out = []
    for n in names:
        im = getattr(d, n)()
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(im[..., :3]))
    return out


@functools.lru_cache(maxsize=1)
def _coins() -> list[tuple[np.ndarray, np.ndarray]]:
    import skimage.data as d
    from scipy import ndimage as ndi
    from skimage import filters, measure, segmentation

    img = d.coins()
    markers = np.zeros_like(img)
    markers[img < 30] = 1
    markers[img > 150] = 2
    seg = ndi.binary_fill_holes(segmentation.watershed(filters.sobel(img), markers) == 2)
    out = []
    for p in measure.regionprops(measure.label(seg)):
        if p.area < 500:
            continue
        r0, c0, r1, c1 = p.bbox
        gray = img[r0:r1, c0:c1].astype(np.float32) / 255.0
        out.append((np.repeat(gray[..., None], 3, axis=2), p.image.copy()))
    return out


@functools.lru_cache(maxsize=1)
def _lfw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import skimage.data as d

    crops = d.lfw_subset().astype(np.float32)  # 100 faces then 100 non-faces, 25x25 in [0, 1]
    yy, xx = np.mgrid[:25, :25]
    ellipse = ((xx - 12) / 10.5) ** 2 + ((yy - 12.5) / 12.5) ** 2 <= 1.0
    return crops[:100], crops[100:], ellipse


@functools.lru_cache(maxsize=1)
def _horse() -> np.ndarray:
    import skimage.data as d

    fg = ~d.horse()
    rows, cols = np.nonzero(fg)
    return fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


# ----------------------------------------------------------------------------- rendering helpers


def _resize_rgb(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.BILINEAR)) >= 128


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A tinted patch of a photo: ``[h, w, 3]`` in [0, 1]."""
    bg = _backgrounds()[rng.integers(len(_backgrounds()))]
    side = int(rng.integers(32, min(bg.shape[:2])))
    y, x = rng.integers(0, bg.shape[0] - side + 1), rng.integers(0, bg.shape[1] - side + 1)
    patch = _resize_rgb(bg[y : y + side, x : x + side].astype(np.float32) / 255.0, h, w)
    gray = patch.mean(2, keepdims=True)
    color = rng.uniform(0.1, 1.0, size=3).astype(np.float32)
    return np.clip(0.45 * gray * color * 2 + 0.55 * color, 0, 1)


def _polygon_mask(points: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.draw import polygon

    m = np.zeros((h, w), dtype=bool)
    rr, cc = polygon(points[:, 1], points[:, 0], shape=(h, w))
    m[rr, cc] = True
    return m


def _shape_points(kind: str, rng: np.random.Generator, side: int) -> np.ndarray:
    c = (side - 1) / 2.0
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "triangle":
        angles = rot + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        radii = np.full(3, c)
    else:  # star
        k = int(rng.integers(5, 7))
        angles = rot + np.arange(2 * k) * math.pi / k
        radii = np.where(np.arange(2 * k) % 2 == 0, c, c * rng.uniform(0.38, 0.55))
    return np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], 1)


def _render_object(cls: str, rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """An object of class ``cls`` whose longer side is about ``side`` px: (rgb ``[h,w,3]``, mask)."""
    if cls == "coin":
        coins = _coins()
        rgb, m = coins[rng.integers(len(coins))]
        tint = np.array(
            [(1.0, 0.72, 0.45), (0.92, 0.92, 0.95), (1.0, 0.85, 0.35)][rng.integers(3)], np.float32
        )
        rgb = np.clip(rgb * tint * rng.uniform(0.8, 1.2), 0, 1)
    elif cls == "face":
        faces, _, ellipse = _lfw()
        rgb = np.repeat(faces[rng.integers(len(faces))][..., None], 3, axis=2)
        rgb = np.clip(rgb * rng.uniform(0.8, 1.1, size=3).astype(np.float32), 0, 1)
        m = ellipse
    elif cls == "horse":
        m = _horse()
        if rng.random() < 0.5:
            m = m[:, ::-1]
        aspect = rng.uniform(0.75, 1.3)
        h0, w0 = m.shape
        scale = side / max(h0 * aspect, w0)
        hh, ww = max(2, round(h0 * aspect * scale)), max(2, round(w0 * scale))
        return _texture(rng, hh, ww), _resize_mask(m, hh, ww)
    else:
        m = _polygon_mask(_shape_points(cls, rng, side), side, side)
        rows, cols = np.nonzero(m)
        m = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        return _texture(rng, *m.shape), m
    h0, w0 = m.shape
    scale = side / max(h0, w0)
    hh, ww = max(2, round(h0 * scale)), max(2, round(w0 * scale))
    return _resize_rgb(rgb, hh, ww), _resize_mask(m, hh, ww)


def _render_distractor(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    kind = rng.integers(3)
    if kind == 0:  # a non-face crop of a real photo, like the faces
        _, nonfaces, ellipse = _lfw()
        rgb = np.repeat(nonfaces[rng.integers(len(nonfaces))][..., None], 3, axis=2)
        m = ellipse if rng.random() < 0.5 else np.ones_like(ellipse)
        return _resize_rgb(rgb, side, side), _resize_mask(m, side, side)
    if kind == 1:  # textured rectangle
        h, w = side, max(4, int(side * rng.uniform(0.3, 1.0)))
        return _texture(rng, h, w), np.ones((h, w), dtype=bool)
    # irregular blob: a random many-sided polygon
    k = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = (side - 1) / 2.0 * rng.uniform(0.5, 1.0, k)
    c = (side - 1) / 2.0
    m = _polygon_mask(np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], 1), side, side)
    return _texture(rng, side, side), m


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    bgs = _backgrounds()
    bg = bgs[rng.integers(len(bgs))]
    short = min(bg.shape[:2])
    side = int(rng.integers(int(0.35 * short), short + 1))
    y, x = rng.integers(0, bg.shape[0] - side + 1), rng.integers(0, bg.shape[1] - side + 1)
    out = _resize_rgb(bg[y : y + side, x : x + side].astype(np.float32) / 255.0, size, size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.clip(out * rng.uniform(0.7, 1.2, size=3).astype(np.float32), 0, 1)


def _paste(canvas: np.ndarray, rgb: np.ndarray, m: np.ndarray, y: int, x: int) -> None:
    h, w = m.shape
    region = canvas[y : y + h, x : x + w]
    region[m] = rgb[m]


def render_image(
    rng: np.random.Generator,
    size: int,
    coverage: float,
    clutter: float,
    max_objects: int = 16,
    max_occlusion: float = 0.3,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: ``uint8 [size, size, 3]`` and a list of ``(class index, full-size bool mask)``.

    Objects may partly occlude earlier ones; a mask is the object's visible part. No object loses more
    than ``max_occlusion`` of its area, and a new object may lie over others with at most that fraction.
    """
    canvas = _background(rng, size)
    for _ in range(int(rng.poisson(clutter))):
        rgb, m = _render_distractor(rng, int(rng.integers(max(8, size // 16), max(9, size // 4))))
        y, x = rng.integers(0, size - m.shape[0] + 1), rng.integers(0, size - m.shape[1] + 1)
        _paste(canvas, rgb, m, y, x)
    target = float(np.clip(coverage * rng.uniform(0.5, 1.5), 0.0, 0.9)) * size * size
    owner = np.full((size, size), -1, dtype=np.int32)  # which object is visible at each pixel
    areas: list[int] = []  # full (unoccluded) area of each object
    classes: list[int] = []
    min_side, max_side = max(10, size // 24), int(0.7 * size)
    covered = 0
    for _ in range(40):
        if covered >= 0.85 * target or len(classes) >= max_objects:
            break
        remaining = target - covered
        hi = min(max_side, max(min_side, int(math.sqrt(remaining / 0.45) * 1.3)))
        lo = max(min_side, hi // 3)
        side = round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
        cls = int(rng.integers(len(BUILTIN_CLASSES)))
        rgb, m = _render_object(BUILTIN_CLASSES[cls], rng, side)
        h, w = m.shape
        area = int(m.sum())
        if h > size or w > size or area == 0:
            continue
        for _ in range(8):  # a few positions for this object
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            under = owner[y : y + h, x : x + w][m]
            hidden = under[under >= 0]
            if hidden.size > max_occlusion * area:
                continue
            if hidden.size:  # each object it covers must stay mostly visible
                k, n = np.unique(hidden, return_counts=True)
                visible = np.bincount(owner[owner >= 0], minlength=len(areas))
                if any(visible[i] - c < (1 - max_occlusion) * areas[i] for i, c in zip(k, n)):
                    continue
            _paste(canvas, rgb, m, y, x)
            owner[y : y + h, x : x + w][m] = len(areas)
            areas.append(area)
            classes.append(cls)
            covered = int((owner >= 0).sum())
            break
    objects = [(c, owner == i) for i, c in enumerate(classes)]
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), objects


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cls + 1,
        "bbox": [x, y, w, h],
        "area": float(mask_utils.area(rle)),
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "iscrowd": 0,
    }


def _make_split(out: Path, split: str, split_idx: int, n: int, cfg: BuiltinConfig) -> dict:
    img_dir = out / split / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, covered = [], [], []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, split_idx, i])
        img, objects = render_image(rng, cfg.size, cfg.coverage, cfg.clutter)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(img_dir / name, compress_level=1)
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"images/{name}", "width": cfg.size, "height": cfg.size})
        for cls, m in objects:
            anns.append(_annotation(len(anns) + 1, image_id, cls, m))
        covered.append(sum(float(m.sum()) for _, m in objects) / cfg.size**2)
    coco = {
        "info": {"description": f"spa built-in dataset ({split})", "version": str(cfg.version)},
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(BUILTIN_CLASSES)
        ],
    }
    # atomically: a run killed while writing leaves no truncated file (which would look like someone else's data);
    # by hand, as spa.data does not depend on spa.engine (whose atomic_write does the same)
    tmp = out / split / ".annotations.json.tmp"
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, out / split / "annotations.json")
    return {"images": n, "objects": len(anns), "mean_coverage": float(np.mean(covered)) if covered else 0.0}


def make_builtin(
    out: str | Path,
    images: int = 64,
    val_images: int = 16,
    size: int = 256,
    coverage: float = 0.2,
    seed: int = 0,
    clutter: float = 3.0,
) -> Path:
    """Generate the built-in set under ``out`` (train and val splits, COCO format); returns ``out``."""
    if not 0.0 < coverage <= 0.9:
        raise ValueError(f"coverage must be in (0, 0.9], got {coverage}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    if images < 0 or val_images < 0:
        raise ValueError("images and val_images must be >= 0")
    if not clutter >= 0:  # (NaN too)
        raise ValueError(f"clutter (mean distractor shapes per image) must be >= 0, got {clutter}")
    cfg = BuiltinConfig(images, val_images, size, coverage, seed, clutter)
    out = Path(out)
    _check_replaceable(out)
    out.mkdir(parents=True, exist_ok=True)
    # written last: an interrupted run leaves no meta.json, so ensure_builtin never trusts a half-written set
    (out / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):  # the images of an earlier set with other settings
        image_dir = out / split / "images"
        for stale in _visible(image_dir) if image_dir.is_dir() else ():
            if _IMAGE_NAME.fullmatch(stale.name):
                stale.unlink()
    stats = {
        split: _make_split(out, split, k, n, cfg)
        for k, (split, n) in enumerate((("train", images), ("val", val_images)))
    }
    (out / "meta.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats}, indent=2))
    return out


_BUILTIN_ENTRIES = {"train", "val", "meta.json"}
_SPLIT_ENTRIES = {"images", "annotations.json"}
_IMAGE_NAME = re.compile(r"\d{6}\.png")


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]  # .DS_Store, .ipynb_checkpoints...


def _check_replaceable(out: Path) -> None:
    """Refuse to generate into a folder that holds anything but a built-in set, whole or half-written
    (``ValueError``): a user's own data must never be overwritten or added to."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder for the built-in set")
    foreign = [p.name for p in _visible(out) if p.name not in _BUILTIN_ENTRIES]
    for split in ("train", "val"):
        folder = out / split
        if not folder.is_dir():
            continue
        foreign += [f"{split}/{p.name}" for p in _visible(folder) if p.name not in _SPLIT_ENTRIES]
        if (folder / "images").is_dir():
            names = [p.name for p in _visible(folder / "images")]
            foreign += [f"{split}/images/{n}" for n in names if not _IMAGE_NAME.fullmatch(n)]
        annotations = folder / "annotations.json"
        if annotations.is_file():
            try:
                description = str(json.loads(annotations.read_text()).get("info", {}).get("description", ""))
                what = f"described as {description!r}"
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                description, what = "", "unreadable"
            if not description.startswith("spa built-in dataset"):
                foreign.append(f"{split}/annotations.json, {what}")
    if foreign:
        raise ValueError(
            f"{out} holds data that is not a built-in set ({', '.join(sorted(foreign)[:5])}): not overwritten; "
            "pass an empty or new folder (--data-dir / --out) for the built-in set"
        )


def ensure_builtin(out: str | Path, **kwargs) -> Path:
    """:func:`make_builtin` unless ``out/meta.json`` already records the same parameters."""
    out = Path(out)
    cfg = asdict(BuiltinConfig(**kwargs))
    meta = out / "meta.json"
    if meta.is_file():
        try:
            before = json.loads(meta.read_text()).get("config")
        except json.JSONDecodeError:
            before = None
        if before == cfg:
            return out
        if isinstance(before, dict):  # another run's data changes under it: say so
            changed = ", ".join(
                f"{k} {before.get(k)!r} -> {v!r}" for k, v in cfg.items() if before.get(k) != v
            )
            warnings.warn(
                f"{out}: regenerating the built-in set with other settings ({changed}); runs that used the "
                "earlier set there now see different data (give each setting its own --data-dir)",
                SpaWarning,
                stacklevel=2,
            )
    kwargs = {k: v for k, v in cfg.items() if k != "version"}
    return make_builtin(out, **kwargs)


def builtin_dataset(out: str | Path, split: str = "train", **kwargs):
    """A :class:`~spa.data.coco.CocoDetection` over split ``split`` of the built-in set at ``out``
    (``kwargs`` go to the dataset, e.g. ``transforms``)."""
    from spa.data.coco import CocoDetection

    root = Path(out) / split
    return CocoDetection(root, root / "annotations.json", **kwargs)
