"""Classification / multi-label classification: metrics, the model wrapper, data (folders, label lists,
detection sets viewed as multi-label), ``spa train/eval --task``, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spa.cli import main
from spa.data import (
    BoxedMultiLabelView,
    DatasetError,
    MultiLabelList,
    builtin_dataset,
    check_labeled,
    classification_transforms,
    collate_classification,
    image_folder,
    make_builtin,
)
from spa.engine import CheckpointError
from spa.errors import SpaWarning
from spa.tasks.classification import build_classifier
from spa.tasks.evaluation import evaluate_classification
from spa.tasks.metrics import average_precision, mean_average_precision, topk_accuracy

# -- metrics ---------------------------------------------------------------------------------------


def test_average_precision_hand_computed():
    # ranks 1, 3, 5 are positive: AP = (1/1 + 2/3 + 3/5) / 3
    ap = average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1])
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # tied scores form one threshold: (P=1/2, R=1/2) then (P=2/3, R=1) -> 0.5 * 0.5 + 0.5 * 2/3
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0.1, 0.9], [1, 1]) == pytest.approx(1.0)
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_mean_average_precision_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = mean_average_precision(scores, targets, ["a", "b", "c"])
    assert out["mAP"] == pytest.approx(1.0)
    assert out["classes_without_positives"] == 2
    assert math.isnan(out["AP"]["b"])


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 1, 0])
    out = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["top2"] == pytest.approx(2 / 3)
    assert out["top5"] == pytest.approx(1.0)  # k capped at the number of classes


# -- model -----------------------------------------------------------------------------------------


def _boxed_targets(n: int, k: int = 3) -> list[dict]:
    return [
        {"label": torch.tensor([1.0] + [0.0] * (k - 1)), "boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]])}
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", ["spt_nano", "swin_nano"])
def test_classifier_timm_api_and_losses(name):
    model = build_classifier(model=name, task="multilabel", num_classes=3, img_size=64, selection_alpha=1.0)
    assert model.num_classes == 3 and model.global_pool == "avg"
    images = torch.randn(2, 3, 64, 64)
    model.train()
    losses = model(images, _boxed_targets(2))
    assert set(losses) == {"loss_cls", "loss_select"}
    assert all(torch.isfinite(v) for v in losses.values())
    if name == "spt_nano":
        assert losses["loss_select"] > 0
        stats = model.training_stats()
        assert {"keep_stage3", "keep_obj_stage3", "keep_bg_stage4"} <= set(stats)
        # without boxes the gate is unsupervised
        assert model(images, torch.zeros(2, 3))["loss_select"] == 0
    else:
        assert losses["loss_select"] == 0 and model.training_stats() == {}
    model.eval()
    assert model(images).shape == (2, 3)
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    assert pooled.shape[0] == 2
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.config.num_classes == 7
    assert model(images).shape == (2, 7)


def test_unsupervised_mode_and_single_label():
    model = build_classifier(task="classify", num_classes=4, img_size=64, supervise_gate=False)
    model.train()
    targets = [{"label": torch.tensor(2), "boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]])}] * 2
    losses = model(torch.randn(2, 3, 64, 64), targets)
    assert losses["loss_select"] == 0 and losses["loss_cls"] > 0
    losses["loss_cls"].backward()
    gate = next(p for n, p in model.named_parameters() if ".gate." in n)
    assert gate.grad is not None  # learns through the soft factor alone


def test_bad_config():
    with pytest.raises(ValueError, match="task"):
        build_classifier(task="segment")
    with pytest.raises(ValueError, match="SPT options"):
        build_classifier(model="swin_nano", model_kwargs={"select": "topk"})
    with pytest.raises(ValueError, match="unknown backbone"):
        build_classifier(model="resnet50")


# -- data ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return make_builtin(tmp_path_factory.mktemp("cls") / "builtin", images=6, val_images=4, size=96, seed=3)


def test_boxes_follow_the_resize(tiny_set):
    raw = builtin_dataset(tiny_set, "train")
    view = BoxedMultiLabelView(raw, classification_transforms(False, 48, boxes=True))
    image, target = view[0]
    _, det = raw[0]
    assert image.shape == (3, 48, 48)
    torch.testing.assert_close(target["boxes"], det["boxes"].as_subclass(torch.Tensor) * 0.5)
    assert target["masks"].shape[-2:] == (48, 48)
    assert target["label"].shape == (5,) and target["label"].sum() >= 1
    images, targets = collate_classification([view[0], view[1]])
    assert images.shape == (2, 3, 48, 48) and len(targets) == 2


def test_evaluate_reports_map_keep_and_gmacs(tiny_set):
    view = BoxedMultiLabelView(
        builtin_dataset(tiny_set, "val"), classification_transforms(False, 64, boxes=True)
    )
    model = build_classifier(num_classes=5, img_size=64, class_names=list(view.class_names))
    result = evaluate_classification(model, view, batch_size=2)
    assert result["images"] == 4 and math.isfinite(result["mAP"])
    assert set(result["AP"]) == set(view.class_names)
    assert set(result["keep"]) == {"stage3", "stage4"}
    for keep in result["keep"].values():
        assert 0.0 <= keep["all"] <= 1.0
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in keep.values())  # NaN: no such tokens
    assert result["gmacs"]["kept"] > 0 and result["gmacs"]["executed"] >= result["gmacs"]["kept"] * 0.99


@pytest.mark.parametrize("name", ["spt_nano", "swin_nano"])
def test_evaluation_gmacs_are_the_backbone_features_of_the_same_pass(tiny_set, name):
    """Counted by hooks in the evaluation's own forward: equal to a separate count of ``forward_features``
    on the same images, with the classifier head left out."""
    from spa.flops import count_macs

    view = BoxedMultiLabelView(
        builtin_dataset(tiny_set, "val"), classification_transforms(False, 64, boxes=True)
    )
    model = build_classifier(model=name, num_classes=5, img_size=64, class_names=list(view.class_names))
    result = evaluate_classification(model, view, batch_size=2)

    class Features(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone.forward_features(x)

    images, _ = collate_classification([view[i] for i in range(len(view))])
    counts = [count_macs(Features(model.backbone), images[i : i + 2]) for i in range(0, len(view), 2)]
    kept = sum(c.kept for c in counts) / len(counts)
    executed = sum(c.executed for c in counts) / len(counts)
    assert result["gmacs"]["kept"] == pytest.approx(kept, rel=1e-9)
    assert result["gmacs"]["executed"] == pytest.approx(executed, rel=1e-9)
    head = model.backbone.get_classifier()
    assert isinstance(head, torch.nn.Linear) and kept > 0


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    for split, classes in splits.items():
        for name, n in classes.items():
            for i in range(n):
                _png(root / split / name / f"{i}.png", seed=i)
    return root


def test_image_folder_bad_input(tmp_path):
    root = _folder(tmp_path / "f", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "bird": 1}})
    train = image_folder(root, "train")
    assert train.class_names == ["cat", "dog"]
    with pytest.raises(DatasetError, match=r"unknown class name\(s\) \['bird'\]"):
        image_folder(root, "val", classes=train.class_names)
    # a split with a subset of the classes keeps the training indices
    (root / "val" / "bird" / "0.png").unlink()
    (root / "val" / "bird").rmdir()
    _folder(root, {"val": {"dog": 1}})
    val = image_folder(root, "val", classes=["ant", "cat", "dog"])
    assert sorted(label for _, label in val) == [1, 2]
    _png(root / "train" / "loose.png")
    with pytest.raises(DatasetError, match="without a label"):
        image_folder(root, "train")
    (root / "train" / "loose.png").unlink()
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="without images"):
        image_folder(root, "train")
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        image_folder(tmp_path / "none", "train")
    with pytest.raises(DatasetError, match="no such folder"):
        image_folder(tmp_path / "missing", "train")
    (root / "train" / "empty").rmdir()
    (root / "train" / "cat" / "0.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"cat/0\.png: unreadable image \(not an image PIL can read\)$"):
        image_folder(root, "train")[0]


def _label_list(root: Path, train_lines: list[str], classes: str = "cat\ndog\nbird\n") -> Path:
    for i in range(3):
        _png(root / "images" / f"{i}.png", seed=i)
    (root / "classes.txt").write_text(classes)
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "val.txt").write_text("images/0.png cat\nimages/1.png dog bird\n")
    return root


def test_label_list_and_its_bad_input(tmp_path):
    ok = _label_list(tmp_path / "ok", ["# comment", "images/0.png cat dog", "images/1.png bird", ""])
    data = MultiLabelList(ok, "train")
    assert len(data) == 2 and data.class_names == ["cat", "dog", "bird"]
    assert data.targets().tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    bad = _label_list(tmp_path / "unknown", ["images/0.png cat horse"])
    with pytest.raises(DatasetError, match=r"train.txt:1: class name\(s\) \['horse'\] not in"):
        MultiLabelList(bad, "train")
    bad = _label_list(tmp_path / "nolabel", ["images/0.png cat", "images/1.png"])
    with pytest.raises(DatasetError, match=r"train.txt:2: image images/1.png has no labels"):
        MultiLabelList(bad, "train")
    bad = _label_list(tmp_path / "missing", ["images/9.png cat"])
    with pytest.raises(DatasetError, match="missing"):
        MultiLabelList(bad, "train")
    with pytest.raises(DatasetError, match=r"classes\.txt"):
        MultiLabelList(tmp_path / "nowhere", "train")


def test_images_without_labels(tiny_set, tmp_path):
    ann = json.loads((tiny_set / "train" / "annotations.json").read_text())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 2]
    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    (root / "train" / "images").symlink_to(tiny_set / "train" / "images")
    (root / "train" / "annotations.json").write_text(json.dumps(ann))
    view = BoxedMultiLabelView(builtin_dataset(root, "train"))
    with pytest.raises(DatasetError, match=r"1 image\(s\) without labels .*image id 2"):
        check_labeled(view, "set")
    with pytest.warns(SpaWarning, match="dropped 1"):
        check_labeled(view, "set", "drop")
    assert len(view) == 5 and view.targets().sum(1).min() >= 1


# -- commands --------------------------------------------------------------------------------------


def _args(data: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", data, "--img-size", "64", "--max-steps", "2", "--batch-size", "2",
        "--eval-batch-size", "4", "--out", str(out), "--quiet", "--warmup-steps", "1", *extra,
    ]  # fmt: skip


def test_train_and_eval_multilabel_builtin(tiny_set, tmp_path, capsys):
    run = tmp_path / "ml"
    main([*_args(f"builtin:{tiny_set}", run, "--task", "multilabel", "--selection-alpha", "0.5")])
    result = json.loads((run / "eval.json").read_text())
    assert result["task"] == "multilabel" and math.isfinite(result["mAP"])
    assert math.isfinite(result["keep"]["stage3"]["object"]) and result["gmacs"]["kept"] > 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss_select"] > 0 and "keep_obj_stage3" in log[-1]
    ckpt = str(run / "checkpoints" / "last.pt")
    main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "e.json"), "--quiet"])
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["mAP"] == pytest.approx(result["mAP"])
    assert "mAP" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="'multilabel' checkpoint"):
        main(["--debug", "eval", "--checkpoint", ckpt, "--task", "classify"])
    with pytest.raises(CheckpointError, match="swin_nano"):
        main(["--debug", "eval", "--checkpoint", ckpt, "--model", "swin_nano"])
    other = _label_list(tmp_path / "lst", ["images/0.png cat"])
    with pytest.raises(CheckpointError, match="trained for"):
        main(["--debug", "eval", "--checkpoint", ckpt, "--data", f"labels:{other}"])
    # the wrong kind of data at eval: what the data is for, not a --task that eval does not take
    with pytest.raises(CheckpointError, match="single-label: it trains and evaluates --task classify models"):
        main(["--debug", "eval", "--checkpoint", ckpt, "--data", f"folder:{tmp_path}"])


def test_train_classify_folder_and_unsupervised_label_list(tmp_path):
    root = _folder(tmp_path / "f", {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}})
    run = tmp_path / "cls"
    main([*_args(f"folder:{root}", run, "--task", "classify", "--model", "swin_nano")])
    result = json.loads((run / "eval.json").read_text())
    assert result["images"] == 4 and 0 <= result["top1"] <= result["top5"] == 1.0
    assert result["keep"] == {} and result["keep_mean"] == 1.0
    lst = _label_list(tmp_path / "lst", ["images/0.png cat", "images/1.png dog bird", "images/2.png bird"])
    run = tmp_path / "lst_run"
    main([*_args(f"labels:{lst}", run, "--task", "multilabel")])
    log = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert log["loss_select"] == 0 and "keep_stage3" in log and "keep_obj_stage3" not in log


def test_task_and_data_mismatch(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="it trains and evaluates --task multilabel models"):
        main(["--debug", *_args(f"builtin:{tiny_set}", tmp_path / "x", "--task", "classify")])
    with pytest.raises(ValueError, match="it trains and evaluates --task classify models"):
        main(["--debug", *_args(f"folder:{tmp_path}", tmp_path / "x", "--task", "multilabel")])
    assert main(_args(f"folder:{tmp_path}", tmp_path / "x", "--task", "multilabel")) == 2  # one line
    # classification specs given to a detector (the default task): the task to use, not "unknown spec"
    for spec, task in ((f"folder:{tmp_path}", "classify"), (f"labels:{tmp_path}", "multilabel")):
        with pytest.raises(
            ValueError,
            match=f"is classification data, not detection data: it trains and evaluates --task {task} models$",
        ):
            main(["--debug", *_args(spec, tmp_path / "x")])
    with pytest.raises(SystemExit):
        main(_args(f"builtin:{tiny_set}", tmp_path / "x", "--task", "segment"))


def test_dense_spt_has_no_selection_loss():
    model = build_classifier(num_classes=3, img_size=64, model_kwargs={"select": "all"}, selection_alpha=1.0)
    model.train()
    losses = model(torch.randn(2, 3, 64, 64), _boxed_targets(2))
    assert losses["loss_select"] == 0
    assert model.training_stats()["keep_stage3"] == 1.0


def test_boolean_and_task_flags():
    from spa.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--task", "multilabel", "--supervise-gate", "false"])
    assert args.task == "multilabel" and args.supervise_gate is False
    assert parser.parse_args(["train", "--supervise-gate", "yes"]).supervise_gate is True
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--supervise-gate", "maybe"])
    with pytest.raises(SystemExit):  # the flag's choices come from the config field: refused while parsing
        parser.parse_args(["train", "--empty-images", "ignore", "--task", "multilabel"])
    from spa.config import RunConfig

    with pytest.raises(ValueError, match="empty_images"):  # and a YAML / Python value by the config
        RunConfig(empty_images="ignore", task="multilabel")
    assert parser.parse_args(["train", "--clip-grad", "none"]).clip_grad is not None  # "none" is a value
    from spa.config import resolve_config

    assert (
        resolve_config(
            None, {"clip_grad": parser.parse_args(["train", "--clip-grad", "none"]).clip_grad}
        ).clip_grad
        is None
    )
    assert resolve_config(None, {}).clip_grad == 5.0


def test_grad_checkpointing_flag_reaches_the_backbone(tiny_set, tmp_path):
    from spa.engine.commands import resolve_config, run_training
    from spa.models.spt import SPAStage
    from spa.tasks.backbones import set_grad_checkpointing

    overrides = dict(
        task="multilabel", data=f"builtin:{tiny_set}", img_size=64, max_steps=1, batch_size=2,
        warmup_steps=1, out=str(tmp_path / "gc"), grad_checkpointing=True,
    )  # fmt: skip
    result = run_training(resolve_config(None, overrides), evaluate=False, progress=False, log=False)
    stages = [m for m in result["model"].modules() if isinstance(m, SPAStage)]
    assert stages and all(stage.grad_checkpointing for stage in stages)
    assert result["summary"]["steps"] == 1 and math.isfinite(result["summary"]["last"]["loss"])
    assert set_grad_checkpointing(result["model"], False) == 1
    assert not any(stage.grad_checkpointing for stage in stages)
    with pytest.raises(ValueError, match="no backbone"):
        set_grad_checkpointing(torch.nn.Linear(2, 2))
