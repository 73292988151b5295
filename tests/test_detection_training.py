"""The supervised gate learns and the detector learns: short run (default suite) and longer run (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from spa.data import builtin_dataset, collate_detection, detection_transforms, make_builtin
from spa.engine import TrainConfig, Trainer
from spa.engine.distributed import DistInfo
from spa.tasks import build_detector
from spa.tasks.evaluation import evaluate_detection

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _gap(result: dict, stage: str = "stage3") -> float:
    keep = result["keep"][stage]
    return keep["object"] - keep["background"]


def _train_and_measure(root, tmp_path, size: int, steps: int, eval_images: bool = True):
    train = builtin_dataset(root, "train", transforms=detection_transforms(True, size))
    val = builtin_dataset(root, "val")
    torch.manual_seed(0)
    model = build_detector(
        model="spt_nano", num_classes=train.num_classes, img_size=size, min_size=size, max_size=size,
        selection_alpha=1.0,
    )  # fmt: skip
    before = evaluate_detection(model, val, batch_size=4, count_gmacs=False)
    config = TrainConfig(out_dir=str(tmp_path), max_steps=steps, batch_size=4, lr=5e-4, warmup_steps=20)
    config.checkpoint_every, config.progress = 10_000, False
    Trainer(model, train, collate_detection, config, {"task": "test"}, SINGLE).train()
    after = evaluate_detection(model, val, batch_size=4, count_gmacs=False)
    return before, after


def test_gate_starts_learning_in_a_short_run(tmp_path):
    root = tmp_path / "data"
    make_builtin(root, images=32, val_images=8, size=128, coverage=0.2, seed=0)
    before, after = _train_and_measure(root, tmp_path / "run", size=128, steps=120)
    print(f"object-background kept gap, stage 3: step 0 {_gap(before):.3f} -> step 120 {_gap(after):.3f}")
    assert _gap(after) > _gap(before) + 0.05


@pytest.mark.slow
def test_detector_and_gate_learn_on_the_builtin_set(tmp_path):
    """AP50 >= 0.10, and the kept-ratio gap (object - background) >= 0.3 and above its step-0 value."""
    root = tmp_path / "data"
    make_builtin(root, images=64, val_images=16, size=256, coverage=0.2, seed=0)
    before, after = _train_and_measure(root, tmp_path / "run", size=256, steps=300)
    report = {"gap_step0": _gap(before), "gap_trained": _gap(after), "AP50": after["bbox"]["AP50"]}
    print(json.dumps(report))
    assert after["bbox"]["AP50"] >= 0.10
    assert _gap(after) >= 0.3 and _gap(after) > _gap(before)
