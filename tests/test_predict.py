"""``spa predict`` (COCO results / top-k classes out of any checkpoint) and ``spa eval --predictions``, on a
tiny COCO set made here with non-contiguous category ids (3 and 7)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import write_tiny_coco
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from spa.cli import main
from spa.data import CocoDetection, DatasetError
from spa.engine.checkpoint import CheckpointError, save_checkpoint
from spa.predict import checkpoint_classes, coco_records
from spa.tasks import build_classifier, build_detector

PNG = b"\x89PNG\r\n\x1a\n"
SIZES = [(64, 80), (48, 64), (72, 56)]  # (H, W); the detectors resize them to 64
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """``(annotations.json, images folder)``: three images, large boxes with polygon masks, cat ids 3 and 7."""
    return write_tiny_coco(tmp_path_factory.mktemp("coco"), SIZES, CATEGORIES)


def _detector_checkpoint(path, detector: str, classes: dict | None):
    model = build_detector(
        model="spt_nano", detector=detector, num_classes=2, img_size=64, min_size=64, max_size=64,
        fpn_channels=16, representation_size=32,
    )  # fmt: skip
    state = {"model": model.state_dict(), "meta": {"task": "detect", "detector": model.config.to_dict()}}
    if classes is not None:
        state["extra"] = {"classes": classes}
    return save_checkpoint(path, state)


@pytest.fixture(scope="module")
def faster(coco, tmp_path_factory):
    """A Faster R-CNN checkpoint that stores the dataset's classes (as ``spa train`` does)."""
    data = CocoDetection(coco[1], coco[0])
    classes = {"names": data.class_names, "label_to_cat_id": data.label_to_cat_id}
    return _detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "faster.pt", "faster_rcnn", classes)


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    """A Mask R-CNN checkpoint without stored classes (older checkpoints): category id = label."""
    return _detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "mask.pt", "mask_rcnn", None)


def _classifier_checkpoint(path, task: str):
    model = build_classifier(
        model="spt_nano", task=task, num_classes=3, img_size=64, class_names=["cat", "dog", "bird"]
    )
    meta = {"task": task, "classifier": model.config.to_dict()}
    return save_checkpoint(path, {"model": model.state_dict(), "meta": meta})


def _read(out, name="predictions.json"):
    return json.loads((out / name).read_text())


def test_detection_predictions_are_coco_results_with_the_datasets_ids(coco, faster, tmp_path):
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(faster), "--images", str(coco[1]), "--out", str(out)]
    assert main([*argv, "--score-threshold", "0", "--topk", "5", "--batch-size", "2"]) == 0
    images = _read(out, "images.json")
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in images] == [
        (i, f"im{i}.png", h, w) for i, (h, w) in enumerate(SIZES, 1)
    ]
    records = _read(out)
    assert records and {r["category_id"] for r in records} <= {3, 7}
    size = {im["id"]: (im["width"], im["height"]) for im in images}
    for r in records:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and 0.0 <= r["score"] <= 1.0
        x, y, w, h = r["bbox"]
        W, H = size[r["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= W + 1e-3 and y + h <= H + 1e-3
    per_image = [sum(r["image_id"] == i for r in records) for i in size]
    assert all(1 <= n <= 5 for n in per_image)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reads them against images.json
        gt = COCO()
        gt.dataset = {"images": images, "annotations": [], "categories": CATEGORIES}
        gt.createIndex()
        assert len(gt.loadRes(str(out / "predictions.json")).getAnnIds()) == len(records)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
def test_mask_rcnn_masks_decode_to_the_original_size_and_draw(coco, mask, tmp_path):
    out = tmp_path / "out"
    files = [str(coco[1] / "im2.png"), str(coco[1] / "im1.png"), str(coco[1] / "im2.png")]  # sorted, once
    argv = ["predict", "--checkpoint", str(mask), "--images", *files, "--out", str(out), "--draw"]
    assert main([*argv, "--score-threshold", "0", "--topk", "3", "--draw-threshold", "0"]) == 0
    images = _read(out, "images.json")
    assert [im["file_name"] for im in images] == ["im1.png", "im2.png"]
    records = _read(out)
    assert records and {r["category_id"] for r in records} <= {1, 2}  # no stored classes: the labels
    for r in records:
        decoded = mask_utils.decode(r["segmentation"])
        im = images[r["image_id"] - 1]
        assert decoded.shape == (im["height"], im["width"]) and decoded.dtype == np.uint8
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["im1_pred.png", "im2_pred.png"]
    assert all((out / p).read_bytes()[:8] == PNG for p in pngs)


def test_a_second_run_replaces_the_earlier_output_and_leaves_other_files(coco, faster, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["predict", "--checkpoint", str(faster), "--out", str(out), "--draw-threshold", "0"]
    images = [str(coco[1] / n) for n in ("im1.png", "im2.png", "im3.png")]
    assert main([*base, "--images", *images, "--draw"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mine_pred.png").write_bytes(PNG)  # a user's picture with spa's suffix, not listed by spa
    drawn = ["im1_pred.png", "im2_pred.png", "im3_pred.png"]
    assert sorted(p.name for p in out.glob("im*_pred.png")) == drawn
    # fewer images, drawn: the picture of the image left out goes; without --draw: every earlier picture goes
    assert main([*base, "--images", *images[:2], "--draw"]) == 0
    assert sorted(p.name for p in out.glob("im*_pred.png")) == drawn[:2]
    assert [im["file_name"] for im in _read(out, "images.json")] == ["im1.png", "im2.png"]
    assert main([*base, "--images", images[2]]) == 0
    assert not list(out.glob("im*_pred.png"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine_pred.png").is_file()
    # only pictures an earlier run drew are removed: never a user's file of the same name, never an input
    other = tmp_path / "other"
    other.mkdir()
    (other / "im1_pred.png").write_bytes(PNG)
    for _ in range(2):
        assert main([*base[:-2], "--out", str(other), "--images", images[0]]) == 0  # no --draw
    assert (other / "im1_pred.png").is_file()
    assert main([*base, "--images", images[0], "--draw"]) == 0
    drawn_input = out / "im1_pred.png"
    assert main([*base, "--images", str(drawn_input), "--draw"]) == 0  # draws im1_pred_pred.png from it
    assert drawn_input.is_file() and (out / "im1_pred_pred.png").is_file()
    assert [im.get("picture") for im in _read(out, "images.json")] == ["im1_pred_pred.png"]
    # an images.json that is not spa's: refused before any work, nothing removed
    (out / "images.json").write_text('{"not": "a list"}')
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main([*base, "--images", *images]) == 2
    err = capsys.readouterr().err
    assert "images.json was not written by spa predict" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("task", ["classify", "multilabel"])
def test_classifier_predictions_are_topk_classes(coco, task, tmp_path):
    ckpt = _classifier_checkpoint(tmp_path / f"{task}.pt", task)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(ckpt), "--images", str(coco[1]), "--out", str(out)]
    assert main([*argv, "--topk", "2"]) == 0
    records = _read(out)
    assert [(r["image_id"], r["file_name"]) for r in records] == [(i, f"im{i}.png") for i in (1, 2, 3)]
    for r in records:
        scores = [t["score"] for t in r["topk"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert all(t["class"] == ["cat", "dog", "bird"][t["label"]] for t in r["topk"])
    assert main([*argv, "--topk", "9"]) == 0  # capped at the 3 classes
    totals = [sum(t["score"] for t in r["topk"]) for r in _read(out)]
    assert all(len(r["topk"]) == 3 for r in _read(out))
    if task == "classify":  # softmax: the scores of all classes sum to 1
        assert totals == pytest.approx([1.0] * 3, abs=1e-5)


def test_checkpoint_classes_fall_back_without_stored_classes(coco, faster, mask):
    from spa.tasks.base import load_model

    names, cat_ids = checkpoint_classes(*load_model(faster))
    assert names == {1: "cat", 2: "dog"} and cat_ids == {1: 3, 2: 7}
    names, cat_ids = checkpoint_classes(*load_model(mask))
    assert names == {1: "class_1", 2: "class_2"} and cat_ids == {1: 1, 2: 2}
    classifier = build_classifier(model="spt_nano", task="classify", num_classes=2, img_size=64)
    assert checkpoint_classes(classifier, {}) == ({0: "class_0", 1: "class_1"}, {0: 0, 1: 1})
    with pytest.raises(CheckpointError, match="no category id for labels \\[2\\]"):
        checkpoint_classes(load_model(faster)[0], {"extra": {"classes": {"label_to_cat_id": {"1": 3}}}})
    assert coco_records([{"bbox": [0, 0, 1, 1]}], [{"segmentation": "rle"}]) == [
        {"bbox": [0, 0, 1, 1], "segmentation": "rle"}
    ]


def test_bad_input_is_one_clear_error_and_leaves_nothing_half_written(coco, faster, tmp_path):
    out = tmp_path / "out"

    def run(checkpoint, *images, batch="4"):
        argv = [
            "--debug",
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--images",
            *map(str, images),
            "--out",
            str(out),
        ]
        return main([*argv, "--batch-size", batch])

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        run(faster, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        run(faster, tmp_path / "missing.png")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        run(not_a_checkpoint, coco[1])
    foreign = save_checkpoint(tmp_path / "foreign.pt", {"model": {"w": torch.ones(2)}, "meta": {"epoch": 3}})
    with pytest.raises(CheckpointError, match="not an spa model checkpoint"):
        run(foreign, coco[1])
    assert not out.exists()

    assert run(faster, coco[1]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("a.png", "c.png"):
        (mixed / name).write_bytes((coco[1] / "im1.png").read_bytes())
    (mixed / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"b\.png: unreadable image"):
        run(faster, mixed, batch="1")  # a.png ran before b.png failed: nothing was written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="draw needs a detection checkpoint"):
        main(["--debug", "predict", "--checkpoint", str(_classifier_checkpoint(tmp_path / "c.pt", "classify")),
              "--images", str(coco[1]), "--out", str(out), "--draw"])  # fmt: skip


def test_eval_predictions_rescored_by_pycocotools_give_the_same_bbox_ap(coco, faster, tmp_path):
    ann, images = coco
    preds, metrics = tmp_path / "eval" / "detections.json", tmp_path / "eval" / "metrics.json"
    argv = ["eval", "--checkpoint", str(faster), "--data", f"coco:{ann}:{images}", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a COCO file has no split: evaluated on itself
        assert main([*argv, "--predictions", str(preds), "--out", str(metrics)]) == 0
    records = json.loads(preds.read_text())
    assert records and {r["category_id"] for r in records} <= {3, 7}
    assert {r["image_id"] for r in records} <= {10, 20, 30}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        evaluator = COCOeval(gt, gt.loadRes(str(preds)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    bbox = json.loads(metrics.read_text())["bbox"]
    assert list(bbox.values()) == [float(v) for v in evaluator.stats[:6]]
    assert bbox["AP50"] > 0  # a real check: some detections do match


def test_eval_predictions_needs_a_detection_checkpoint(tmp_path):
    ckpt = _classifier_checkpoint(tmp_path / "c.pt", "classify")
    with pytest.raises(CheckpointError, match="--predictions writes COCO detections"):
        main(["--debug", "eval", "--checkpoint", str(ckpt), "--predictions", str(tmp_path / "p.json")])


@pytest.mark.parametrize("verb", ["predict", "eval"])
def test_compile_flag_compiles_the_loaded_model_before_the_first_batch(
    verb, coco, faster, tmp_path, monkeypatch
):
    """``--compile`` hands the loaded model to ``spa.compile_model`` before anything runs (torch.compile itself
    is too slow for the default suite: it is in the slow tests of ``tests/test_compile.py``); without the flag
    nothing is compiled."""
    import spa.compile

    seen: list[torch.nn.Module] = []

    def record(model, **kwargs):
        assert not seen, "compiled twice"
        seen.append(model)
        return model

    monkeypatch.setattr(spa.compile, "compile_model", record)
    ann, images = coco
    if verb == "predict":
        argv = ["predict", "--checkpoint", str(faster), "--images", str(images), "--out", str(tmp_path / "p")]
    else:
        argv = ["eval", "--checkpoint", str(faster), "--data", f"coco:{ann}:{images}", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
        assert seen == []
        assert main([*argv, "--compile"]) == 0
    assert len(seen) == 1 and type(seen[0]).__name__ == "SPADetector"


def test_eval_refuses_a_set_whose_category_ids_order_the_classes_differently(coco, faster, tmp_path):
    ann, images = coco
    data = json.loads(ann.read_text())
    swapped = {3: 7, 7: 3}  # the same names, the ids swapped: label 1 would silently mean "dog"
    for c in data["categories"]:
        c["id"] = swapped[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = swapped[a["category_id"]]
    permuted = tmp_path / "permuted.json"
    permuted.write_text(json.dumps(data))
    argv = ["--debug", "eval", "--checkpoint", str(faster), "--data", f"coco:{permuted}:{images}", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(CheckpointError, match="same names in another order"):
            main(argv)
        renamed = json.loads(ann.read_text())
        renamed["categories"][0]["name"] = "cow"
        (tmp_path / "renamed.json").write_text(json.dumps(renamed))
        argv[5] = f"coco:{tmp_path / 'renamed.json'}:{images}"
        with pytest.raises(CheckpointError, match=r"unknown: \['cow'\]"):
            main(argv)


@pytest.mark.parametrize("where", ["out", "predictions"])
def test_eval_output_paths_are_checked_before_evaluating(coco, faster, tmp_path, where, capsys):
    ann, images = coco
    folder = tmp_path / "a_folder"
    folder.mkdir()
    argv = ["eval", "--checkpoint", str(faster), "--data", f"coco:{ann}:{images}", f"--{where}", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr()
    assert f"--{where} {folder} is a folder" in err.err and "AP" not in err.out  # nothing was evaluated


def test_training_refuses_a_validation_set_with_other_classes(coco, tmp_path):
    from spa.config import RunConfig
    from spa.tasks.base import get_task

    ann, images = coco
    data = json.loads(ann.read_text())
    data["categories"][1]["name"] = "bird"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    cfg = RunConfig(data=f"coco:{ann}:{images}", val_data=f"coco:{other}:{images}", img_size=64)
    with pytest.raises(ValueError, match=r"\(val\) has classes \['cat', 'bird'\].*unknown: \['bird'\]"):
        get_task("detect").datasets(cfg)
    cfg.val_data = cfg.data
    train, val = get_task("detect").datasets(cfg)
    assert list(val.class_names) == list(train.class_names) == ["cat", "dog"]
