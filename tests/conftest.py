"""Shared test settings (2 threads, fixed seeds, hypothesis profile for a shared, noisy CPU) and data makers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)

settings.register_profile(
    "spa",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("spa")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def write_tiny_coco(
    root: Path,
    sizes: Sequence[tuple[int, int]] = ((64, 80), (48, 64), (72, 56)),
    categories: Sequence[dict] = ({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}),
    name: str = "annotations.json",
    first_id: int = 1,
) -> tuple[Path, Path]:
    """A COCO instances file and its random images under ``root``: per image two large boxes with polygon
    masks, of the first two ``categories`` (non-contiguous ids by default); image ids ``10 * i``.
    Returns ``(annotations.json, images folder)``."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first_id)
    images, annotations = [], []
    for i, (h, w) in enumerate(sizes, first_id):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        images.append({"id": 10 * i, "file_name": f"im{i}.png", "width": w, "height": h})
        for k, (x0, y0, x1, y1) in enumerate([(2, 2, 0.8 * w, 0.7 * h), (0.3 * w, 0.4 * h, w - 1, h - 1)]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 10 * i,
                    "category_id": categories[k]["id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
    ann = root / name
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return ann, root / "images"


class SyncCounter:
    """Counts the calls that make the host wait for the device (on CUDA): ``tolist``, ``item``, ``bool``/``int``
    of a tensor and ``nonzero`` (``nonzero_static`` does not wait)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "nonzero")

    def _wrap(self, monkeypatch, owner, name) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def write_spt_detector_checkpoint(path: Path) -> Path:
    """A Faster R-CNN ``spt_nano`` detection checkpoint (64 px, tiny heads, gate threshold 0.3) as ``spa train``
    writes it (meta + run config); the benchmarks use its body and trained gate."""
    from dataclasses import asdict

    from spa.config import RunConfig
    from spa.engine.checkpoint import save_checkpoint
    from spa.tasks.detection import DetectorConfig, build_detector

    cfg = DetectorConfig(
        model="spt_nano", num_classes=2, img_size=64, min_size=64, max_size=64, fpn_channels=16,
        representation_size=32, model_kwargs={"drop_path_rate": 0.0, "keep_threshold": 0.3},
    )  # fmt: skip
    meta = {"task": "detect", "detector": cfg.to_dict()}
    run = asdict(RunConfig(model="spt_nano", img_size=64, fpn_channels=16, representation_size=32))
    save_checkpoint(
        path, {"model": build_detector(cfg).state_dict(), "meta": meta, "extra": {"run_config": run}}
    )
    return path
