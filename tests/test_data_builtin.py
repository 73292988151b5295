"""The built-in generated dataset and the ``spa data`` commands."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from spa.cli import main
from spa.data import BUILTIN_CLASSES, CocoDetection, builtin_dataset, ensure_builtin, make_builtin
from spa.errors import SpaWarning
from spa.labels import batch_selection_labels, box_grid


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "meta.json":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    return make_builtin(out, images=12, val_images=4, size=128, coverage=0.25, seed=3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_layout_classes_and_masks_match_boxes(small_set):
    meta = json.loads((small_set / "meta.json").read_text())
    assert meta["config"]["images"] == 12 and meta["stats"]["train"]["images"] == 12
    data = json.loads((small_set / "train" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(BUILTIN_CLASSES) and len(BUILTIN_CLASSES) >= 4
    assert len(data["images"]) == 12 and all(im["width"] == im["height"] == 128 for im in data["images"])
    assert {a["category_id"] for a in data["annotations"]} >= {1, 2, 3, 4, 5}  # all classes appear
    for a in data["annotations"]:
        m = mask_utils.decode(
            {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        )
        assert m.sum() == a["area"] > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [
            xs.min(),
            ys.min(),
            xs.max() + 1 - xs.min(),
            ys.max() + 1 - ys.min(),
        ]  # tight box


def test_dataset_loads_and_labels_cover_objects(small_set):
    ds = builtin_dataset(small_set, "train")
    val = builtin_dataset(small_set, "val")
    assert len(ds) == 12 and len(val) == 4 and ds.num_classes == len(BUILTIN_CLASSES)
    image, t = ds[0]
    assert image.shape == (3, 128, 128) and len(t["boxes"]) >= 1
    masks = t["masks"].bool()
    assert not (masks.sum(0) > 1).any()  # visible parts never overlap: exact masks
    lab = batch_selection_labels([t], (128, 128), 16)[0].bool()
    assert torch.equal(lab & box_grid(t["boxes"], (128, 128), 16), lab)  # mask grid within box grid
    assert lab.any()


def test_deterministic_and_seed_dependent(tmp_path, small_set):
    again = make_builtin(tmp_path / "a", images=12, val_images=4, size=128, coverage=0.25, seed=3)
    assert _digest(again) == _digest(small_set)
    other = make_builtin(tmp_path / "b", images=12, val_images=4, size=128, coverage=0.25, seed=4)
    assert _digest(other) != _digest(small_set)
    # image i does not depend on how many images are made
    fewer = make_builtin(tmp_path / "c", images=3, val_images=0, size=128, coverage=0.25, seed=3)
    for i in range(3):
        name = f"train/images/{i:06d}.png"
        assert (fewer / name).read_bytes() == (small_set / name).read_bytes()


def test_coverage_knob(tmp_path):
    cov = {}
    for c in (0.05, 0.4):
        out = make_builtin(tmp_path / str(c), images=10, val_images=0, size=128, coverage=c, seed=0)
        cov[c] = json.loads((out / "meta.json").read_text())["stats"]["train"]["mean_coverage"]
    assert 0.02 < cov[0.05] < 0.1
    assert 0.28 < cov[0.4] < 0.55
    with pytest.raises(ValueError, match="coverage"):
        make_builtin(tmp_path / "x", coverage=0.0)


def test_ensure_builtin_reuses(tmp_path):
    out = ensure_builtin(tmp_path / "e", images=2, val_images=1, size=64)
    stamp = (out / "train" / "annotations.json").stat().st_mtime_ns
    ensure_builtin(tmp_path / "e", images=2, val_images=1, size=64)
    assert (out / "train" / "annotations.json").stat().st_mtime_ns == stamp
    with pytest.warns(
        SpaWarning, match=r"regenerating the built-in set with other settings \(images 2 -> 3\)"
    ):
        ensure_builtin(tmp_path / "e", images=3, val_images=1, size=64)
    assert len(CocoDetection(out / "train", out / "train" / "annotations.json")) == 3


def test_an_interrupted_regeneration_is_not_reused(tmp_path, monkeypatch):
    import spa.data.builtin as builtin

    out = ensure_builtin(tmp_path / "e", images=2, val_images=1, size=64)  # set A
    real = builtin._make_split

    def interrupted(out, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(out, split, *args)

    monkeypatch.setattr(builtin, "_make_split", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(SpaWarning, match="regenerating the built-in set"):
        ensure_builtin(out, images=3, val_images=1, size=64)  # train rewritten with 3 images, then stopped
    monkeypatch.setattr(builtin, "_make_split", real)
    assert not (out / "meta.json").exists()
    ensure_builtin(out, images=2, val_images=1, size=64)  # set A again: regenerated, not trusted
    assert len(CocoDetection(out / "train", out / "train" / "annotations.json")) == 2


def test_default_size_set_is_complete(tmp_path):
    root = make_builtin(tmp_path / "d", images=64, val_images=0)  # the default 256 px (no timing asserted)
    train = CocoDetection(root / "train", root / "train" / "annotations.json")
    assert len(train) == 64 and len(list((root / "train" / "images").glob("*.png"))) == 64
    image, target = train[0]
    assert tuple(image.shape[-2:]) == (256, 256) and len(target["boxes"]) > 0


def test_cli_make_and_show(tmp_path, capsys):
    out = tmp_path / "set"
    assert (
        main(["data", "make", "--out", str(out), "--images", "4", "--val-images", "2", "--size", "96"]) == 0
    )
    assert "4 images" in capsys.readouterr().out
    assert len(builtin_dataset(out, "val")) == 2
    png = tmp_path / "show.png"
    assert main(["data", "show", str(out), "--out", str(png), "-n", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    capsys.readouterr()
    assert (
        main(["data", "show", str(out), "--out", str(tmp_path / "noext"), "-n", "1", "--split", "val"]) == 0
    )
    assert (
        capsys.readouterr().out.strip() == str(tmp_path / "noext.png") and (tmp_path / "noext.png").is_file()
    )
    assert main(["data", "show", str(out), "--out", str(tmp_path / "x.png"), "--split", "test"]) == 2
    assert "has no split 'test'; its splits: train, val" in capsys.readouterr().err
    assert main(["data", "show", str(out), "--out", str(tmp_path)]) == 2  # a folder: not overwritten
    assert "is a folder; give the picture's file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "make", "--out", str(tmp_path / "empty"), "--images", "0"])


def test_end_to_end_loader_transforms_labels_loss(small_set):
    from torch.utils.data import DataLoader

    from spa.data import collate_detection, detection_transforms, pad_images
    from spa.losses import selection_loss_from_targets
    from spa.selection import Selection

    torch.manual_seed(0)
    ds = builtin_dataset(small_set, "train", transforms=detection_transforms(train=True, size=96))
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    batch = pad_images(images, size_divisible=32)
    hw = tuple(batch.shape[-2:])
    for im, t in zip(images, targets):
        assert t["masks"].shape[-2:] == im.shape[-2:] and len(t["boxes"]) == len(t["labels"])
        assert (t["boxes"][:, 2] <= im.shape[-1]).all() and (t["boxes"][:, 3] <= im.shape[-2]).all()
    logits = torch.zeros(3, hw[0] // 16, hw[1] // 16, requires_grad=True)
    sel = Selection(logits, logits.detach(), logits.detach() > 0, stage=2, block=0, stride=16)
    loss = selection_loss_from_targets([sel], targets, hw)["loss_select"]
    loss.backward()
    labels = batch_selection_labels(targets, hw, 16)
    assert labels.sum() > 0 and torch.equal(logits.grad < 0, labels > 0)


def test_a_folder_with_other_data_is_never_overwritten(tmp_path):
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    ann = {"info": {"description": "my own labels"}, "images": [], "annotations": [], "categories": []}
    (mine / "train" / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(
        ValueError, match=r"not a built-in set \(train/annotations\.json, described as 'my own labels'\)"
    ):
        ensure_builtin(mine, images=2, val_images=1, size=64)
    assert json.loads((mine / "train" / "annotations.json").read_text()) == ann
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        make_builtin(other, images=2, val_images=1, size=64)
    assert (other / "notes.txt").read_text() == "keep me" and not (other / "train").exists()
    assert main(["data", "make", "--out", str(other), "--images", "2", "--val-images", "1"]) == 2


def test_regenerating_with_other_settings_leaves_no_stale_images(tmp_path):
    root = make_builtin(tmp_path / "set", images=5, val_images=2, size=64, seed=0)
    make_builtin(root, images=2, val_images=1, size=64, seed=1)  # a built-in set: replaced
    assert sorted(p.name for p in (root / "train" / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(list((root / "val" / "images").iterdir())) == 1


def test_the_guard_looks_inside_the_splits_and_ignores_hidden_files(tmp_path):
    classes = tmp_path / "classes"  # an image-folder classification set: no annotations.json anywhere
    for split in ("train", "val"):
        (classes / split / "cat").mkdir(parents=True)
        (classes / split / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="train/cat"):
        make_builtin(classes, images=1, val_images=1, size=64)
    assert not (classes / "train" / "images").exists() and not (classes / "meta.json").exists()
    root = make_builtin(tmp_path / "set", images=2, val_images=1, size=64)
    (root / ".DS_Store").write_bytes(b"")
    (root / "train" / "images" / ".ipynb_checkpoints").mkdir()
    make_builtin(root, images=1, val_images=1, size=64, seed=5)  # still a built-in set
    (root / "val" / "annotations.json").write_text('{"info": {"descr')  # cut off (not written by spa now)
    with pytest.raises(ValueError, match=r"val/annotations\.json, unreadable"):
        make_builtin(root, images=1, val_images=1, size=64)


def test_bad_generation_settings_are_named(tmp_path):
    for kwargs, match in (({"coverage": 0.95}, "coverage"), ({"size": 32}, "size"), ({"images": -1}, "images"),
                          ({"clutter": -1.0}, "clutter")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            make_builtin(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # checked before anything is written
