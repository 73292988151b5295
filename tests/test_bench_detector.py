"""``spa bench detector``: record keys and invariants on tiny runs (timings are never asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_spt_detector_checkpoint

from spa.bench import DETECTOR_REQUIRED_KEYS, DetectorHeads, bench_detector, format_detector_table
from spa.bench.detector import synthetic_batch
from spa.bench.timing import device_sync, environment
from spa.cli import main
from spa.engine.checkpoint import save_checkpoint
from spa.errors import ConfigError
from spa.tasks.detection import DetectorConfig

QUICK = DetectorHeads.quick()


def _check(records: list[dict], heads: DetectorHeads = QUICK) -> None:
    for r in records:
        assert set(DETECTOR_REQUIRED_KEYS) <= r.keys(), set(DETECTOR_REQUIRED_KEYS) - r.keys()
        assert r["train_ms"] > 0 and r["infer_ms"] > 0
        assert r["train_ratio_to_dense"] > 0 and r["infer_ratio_to_dense"] > 0
        # a ratio of two timings: positive, but machine noise can push it past 1 (no timing bound asserted)
        assert r["backbone_share_train"] > 0 and r["backbone_share_infer"] > 0
        assert 0 < r["gmacs_kept"] <= r["gmacs_executed"] + 1e-9
        assert r["infer_detections"] == heads.detections_per_img  # equal head work, whatever the weights
        assert r["box_batch_size_per_image"] == heads.box_batch_size_per_image and r["env_device"] == "cpu"
        if r["select"] == "dense":
            assert r["model"].startswith("swin_") and r["kept_ratio_measured"] == 1.0
            assert r["train_ratio_to_dense"] == 1.0 and r["infer_ratio_to_dense"] == 1.0
        else:
            assert r["dense_model"] == r["model"].replace("spt_", "swin_")
    dense = {r["model"]: r for r in records if r["select"] == "dense"}
    for r in records:  # every record carries its dense baseline's backbone shares
        ref = dense[r["dense_model"]]
        assert (r["backbone_share_train"], r["backbone_share_infer"]) == (
            ref["backbone_share_train"],
            ref["backbone_share_infer"],
        )


def test_bench_detector_quick():
    records = bench_detector(
        models=["spt_nano"], detector="faster_rcnn", sizes=[128], batch_sizes=[1], keep_ratios=[1.0, 0.3],
        heads=QUICK, rounds=3, warmup=1,
    )  # fmt: skip
    _check(records)
    assert [(r["model"], r["select"], r["keep_ratio"]) for r in records] == [
        ("swin_nano", "dense", 1.0),
        ("spt_nano", "topk", 1.0),
        ("spt_nano", "topk", 0.3),
    ]
    assert all(r["detector"] == "faster_rcnn" and r["size"] == 128 and r["rounds"] == 3 for r in records)
    full, low = records[1], records[2]
    assert low["gmacs_executed"] < full["gmacs_executed"]
    assert abs(low["kept_ratio_measured"] - 0.3) < 0.15 and full["kept_ratio_measured"] == 1.0
    table = format_detector_table(records)
    assert "| spt_nano | faster_rcnn | 128 | 1 | topk | 0.30 |" in table and "peak MB" not in table


def test_cli_quick_mask_rcnn_with_trained_gate(tmp_path):
    out = tmp_path / "det.json"
    ckpt = write_spt_detector_checkpoint(
        tmp_path / "last.pt"
    )  # a Faster R-CNN checkpoint: only its body (and gate) is used
    argv = ["bench", "detector", "--quick", "--detector", "mask_rcnn", "--keep-ratios", "0.5"]
    assert main([*argv, "--checkpoint", str(ckpt), "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list)
    _check(records)
    assert [(r["model"], r["select"]) for r in records] == [
        ("swin_nano", "dense"),
        ("spt_nano", "topk"),
        ("spt_nano", "gate"),
    ]
    assert records[1]["keep_ratio"] == 0.5
    gate = records[-1]
    assert gate["checkpoint"] == str(ckpt) and gate["keep_ratio"] == gate["kept_ratio_measured"]
    assert all(r["detector"] == "mask_rcnn" and r["fpn_channels"] == QUICK.fpn_channels for r in records)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"models": ["resnet50"]}, "unknown backbone"),
        ({"models": []}, "models"),
        ({"keep_ratios": [0.0]}, "keep ratios"),
        ({"keep_ratios": []}, "keep_ratios"),
        ({"sizes": []}, "sizes"),
        ({"sizes": [16]}, "sizes"),
        ({"batch_sizes": [0]}, "batch sizes"),
        ({"detector": "yolo"}, "unknown detector"),
        ({"rounds": 0}, "rounds"),
        ({"device": "tpu"}, "device"),
        ({"heads": DetectorHeads(detections_per_img=0)}, "head settings"),
        ({"denormals": "sometimes"}, "denormals must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bench_detector(**{"models": ["spt_nano"], "sizes": [128], "batch_sizes": [1], **kwargs})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--models", "resnet50"], "unknown backbone"),
        (["--keep-ratios", "0"], "keep ratios must be in (0, 1]"),
        (["--sizes", ""], "need sizes"),
        (["--sizes", "big"], "--sizes takes a comma list of ints"),
    ],
)
def test_cli_user_errors(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("SPA_DEBUG", raising=False)
    assert main(["bench", "detector", "--quick", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa bench: error:") and message in err


def test_cli_refuses_a_densewrite_spt_detector_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPA_DEBUG", raising=False)
    cfg = DetectorConfig(
        model="swin_nano", num_classes=2, img_size=64, min_size=64, max_size=64, fpn_channels=16
    )
    path = tmp_path / "dense.pt"
    save_checkpoint(path, {"model": {}, "meta": {"task": "detect", "detector": cfg.to_dict()}, "extra": {}})
    assert main(["bench", "detector", "--quick", "--checkpoint", str(path)]) == 2
    assert "a trained SPT gate is needed" in capsys.readouterr().err


def test_synthetic_batch_is_seeded_and_valid():
    heads = DetectorHeads(num_classes=4, boxes_per_image=5)
    images, targets = synthetic_batch(96, 2, "mask_rcnn", heads, seed=3)
    again, targets_again = synthetic_batch(96, 2, "mask_rcnn", heads, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(images, again))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets_again))
    for im, t in zip(images, targets):
        assert im.shape == (3, 96, 96) and im.min() >= 0 and im.max() <= 1
        boxes = t["boxes"]
        assert boxes.shape == (5, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
        assert boxes.min() >= 0 and boxes.max() <= 96
        assert t["labels"].min() >= 1 and t["labels"].max() <= 4
        assert t["masks"].shape == (5, 96, 96) and (t["masks"].flatten(1).sum(1) > 0).all()
    assert "masks" not in synthetic_batch(96, 1, "faster_rcnn", heads)[1][0]


def test_device_helpers_on_cpu():
    assert device_sync("cpu") is None
    env = environment("cpu")
    assert env["device"] == "cpu" and env["device_name"]
