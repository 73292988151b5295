"""``spa data check`` and ``spa train --check-data``: bad data is found before training, all at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spa.cli import main
from spa.config import RunConfig
from spa.data import CocoDetection, DatasetError, make_builtin
from spa.data.check import check_dataset
from spa.engine.commands import run_training


@pytest.fixture
def broken(tmp_path_factory) -> Path:
    """A built-in set (COCO layout) whose train split has a truncated image and a missing one."""
    root = make_builtin(tmp_path_factory.mktemp("chk") / "builtin", images=6, val_images=2, size=64, seed=2)
    ann = json.loads((root / "train" / "annotations.json").read_text())
    files = [root / "train" / im["file_name"] for im in ann["images"]]
    files[1].write_bytes(files[1].read_bytes()[:40])  # truncated: the header may parse, the decode fails
    files[3].write_bytes(b"not an image at all")
    files[4].unlink()
    return root


def _train_set(root: Path) -> CocoDetection:
    return CocoDetection(root / "train", root / "train" / "annotations.json")


def test_check_reports_every_bad_image_at_once(broken):
    full = check_dataset(_train_set(broken), "full", "train")
    assert full.bad_indices == [1, 3, 4] and full.items == 6
    assert "missing" in full.problems[2][1] and "unreadable" in full.problems[1][1]
    quick = check_dataset(_train_set(broken), "quick", "train")
    assert {3, 4} <= set(quick.bad_indices)  # headers: the garbage and the missing file at least
    with pytest.raises(ValueError, match="mode"):
        check_dataset(_train_set(broken), "everything")


def test_spa_data_check_command(broken, capsys):
    assert main(["data", "check", f"builtin:{broken}"]) == 1
    out = capsys.readouterr().out
    assert "3 of 6 items have problems" in out and "(val): 2 items, no problems" in out
    names = [
        im["file_name"] for im in json.loads((broken / "train" / "annotations.json").read_text())["images"]
    ]
    assert all(names[i] in out for i in (1, 3, 4))
    clean = broken.parent / "clean"
    make_builtin(clean, images=2, val_images=2, size=64, seed=3)
    assert main(["data", "check", f"builtin:{clean}", "--mode", "quick"]) == 0


def test_train_checks_the_data_before_step_one(broken, tmp_path):
    cfg = dict(data=f"builtin:{broken}", img_size=64, max_steps=2, batch_size=2, fpn_channels=16,
               representation_size=32)  # fmt: skip
    with pytest.raises(DatasetError, match="--bad-images skip") as err:
        run_training(RunConfig(**cfg, check_data="full", out=str(tmp_path / "a")), progress=False, log=False)
    assert "3 of 6" in str(err.value)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # no step was taken
    result = run_training(
        RunConfig(**cfg, check_data="full", bad_images="skip", out=str(tmp_path / "b")),
        evaluate=False, progress=False, log=False,
    )  # fmt: skip
    assert result["summary"]["steps"] == 2
    shutil.rmtree(broken / "val")
    shutil.copytree(broken / "train", broken / "val")  # bad evaluation images are never skipped
    with pytest.raises(DatasetError, match="val"):
        run_training(RunConfig(**cfg, bad_images="skip", out=str(tmp_path / "c")), progress=False, log=False)


def test_an_empty_split_is_a_problem(tmp_path, capsys):
    root = make_builtin(tmp_path / "no_val", images=2, val_images=0, size=64, seed=4)
    assert main(["data", "check", f"builtin:{root}"]) == 1
    out = capsys.readouterr().out
    assert "(train): 2 items, no problems" in out and "(val): no items (an empty split" in out


def test_check_notes_dropped_boxes_and_images_without_boxes(tmp_path, capsys):
    root = make_builtin(tmp_path / "set", images=3, val_images=1, size=64, seed=5)
    ann_file = root / "train" / "annotations.json"
    ann = json.loads(ann_file.read_text())
    first = ann["images"][0]["id"]
    kept = [a for a in ann["annotations"] if a["image_id"] != first]  # image 1 loses all its boxes
    bad = {**kept[0], "id": 10_000, "bbox": [5, 5, 0, 9]}  # zero width: dropped while reading
    ann["annotations"] = [*kept, bad]
    ann_file.write_text(json.dumps(ann))
    spec = f"coco:{ann_file}:{root / 'train'}"
    assert main(["data", "check", spec]) == 0  # notes are not problems
    captured = capsys.readouterr()
    assert "(train): 3 items, no problems" in captured.out
    assert "note: 1 item(s) without boxes (a detector trains on them as negatives)" in captured.out
    assert (
        "note: " in captured.out
        and "dropped degenerate boxes" in captured.out
        and "ann 10000" in captured.out
    )
    assert "no split: evaluating on the training annotations" in captured.out
    assert "Warning" not in captured.err and "warnings.warn" not in captured.err  # no raw Python warnings


def test_check_of_the_plain_builtin_spec_makes_no_data(tmp_path, capsys):
    target = tmp_path / "nothing_here"
    assert main(["data", "check", "builtin", "--data-dir", str(target)]) == 2
    assert "no built-in set under" in capsys.readouterr().err and not target.exists()
    make_builtin(target, images=2, val_images=1, size=64, seed=1)  # not the built-in spec's defaults
    stamp = (target / "meta.json").read_bytes()
    assert main(["data", "check", "builtin", "--data-dir", str(target)]) == 0
    assert "(train): 2 items, no problems" in capsys.readouterr().out
    assert (target / "meta.json").read_bytes() == stamp  # checked as it is, not regenerated
