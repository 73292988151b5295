"""``spa export``: weights-only safetensors files that ``load_model`` / ``spa eval`` read like checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spa.cli import main
from spa.config import RunConfig
from spa.data import BUILTIN_CLASSES, make_builtin
from spa.engine import CheckpointError, save_checkpoint
from spa.export import export_model, load_export
from spa.tasks import build_detector
from spa.tasks.base import TASKS, checkpoint_meta, load_model
from spa.tasks.classification import build_classifier


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    make_builtin(root, images=2, val_images=2, size=128, coverage=0.2, seed=0)
    return root


def _classes(n: int) -> dict:
    """The built-in set's class names (what the model is evaluated on), with made-up category ids."""
    names = list(BUILTIN_CLASSES[:n]) + [f"c{i}" for i in range(len(BUILTIN_CLASSES), n)]
    return {"names": names, "label_to_cat_id": {i: 10 * i for i in range(1, n + 1)}}


def _checkpoint(path: Path, model: torch.nn.Module, task: str, run_config: RunConfig) -> Path:
    """A ``spa train``-like checkpoint of ``model``, with optimizer state and a big extra entry."""
    return save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}},
            "step": 7,
            "epoch": 1,
            "meta": checkpoint_meta(TASKS[task], model.config),
            "extra": {
                "run_config": asdict(run_config),
                "classes": _classes(model.config.num_classes),
                "histogram": torch.ones(10),  # not JSON: left out
                "note": "small",
            },
        },
    )


@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory, tiny_set) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    model = build_detector(model="spt_nano", num_classes=5, img_size=128, min_size=128, max_size=128)
    run = RunConfig(data=f"builtin:{tiny_set}", img_size=128)
    return _checkpoint(tmp_path_factory.mktemp("det") / "last.pt", model, "detect", run), model.eval()


def test_detector_export_round_trip(detector_checkpoint, tmp_path):
    checkpoint, original = detector_checkpoint
    out = export_model(checkpoint, tmp_path / "sub" / "det.safetensors")
    assert out == tmp_path / "sub" / "det.safetensors"
    assert [p.name for p in out.parent.iterdir()] == ["det.safetensors"]  # no temporary file left
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
        assert "optimizer" not in " ".join(f.keys())
    assert json.loads(metadata["meta"])["task"] == "detect"
    assert set(json.loads(metadata["extra"])) == {"run_config", "classes", "note"}
    assert metadata["spa_version"] and metadata["step"] == "7"

    torch.manual_seed(2)  # another initialisation: the weights must come from the file
    model, state = load_model(out, task="detect")
    assert set(state) >= {"model", "meta", "extra"}
    assert state["extra"]["classes"]["label_to_cat_id"] == _classes(5)["label_to_cat_id"]
    for key, value in original.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        expected, got = original(images)[0], model.eval()(images)[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def test_spa_export_and_eval_of_the_export(detector_checkpoint, tmp_path, capsys):
    checkpoint, _ = detector_checkpoint
    out = tmp_path / "det.safetensors"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    results = {}
    for name, path in (("pt", checkpoint), ("export", out)):
        target = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(path), "--out", str(target), "--quiet"]) == 0
        results[name] = json.loads(target.read_text())
    assert results["export"]["bbox"] == results["pt"]["bbox"]
    assert results["export"]["images"] == 2


def test_classifier_export_round_trip(tmp_path):
    torch.manual_seed(1)
    original = build_classifier(model="spt_nano", task="classify", num_classes=3, img_size=64).eval()
    checkpoint = _checkpoint(tmp_path / "last.pt", original, "classify", RunConfig(task="classify"))
    out = export_model(checkpoint, tmp_path / "cls.safetensors")
    torch.manual_seed(2)
    model, state = load_model(out, task=("classify", "multilabel"))
    assert state["meta"] == load_model(checkpoint)[1]["meta"]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), original(images), atol=0, rtol=0)


def test_bad_inputs_are_refused_and_nothing_is_half_written(detector_checkpoint, tmp_path):
    checkpoint, _ = detector_checkpoint
    with pytest.raises(FileNotFoundError, match="not found"):
        export_model(tmp_path / "missing.pt", tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        export_model(checkpoint, tmp_path / "out.pt")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an spa export"):
        load_model(foreign)

    good = export_model(checkpoint, tmp_path / "good.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_export(corrupt)
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "garbage.safetensors")

    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "no_meta.pt")
    with pytest.raises(CheckpointError, match="no model description"):
        export_model(tmp_path / "no_meta.pt", tmp_path / "no_meta.safetensors")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    before = good.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("safetensors.torch.save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            export_model(checkpoint, good, overwrite=True)
    assert good.read_bytes() == before  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # and no temporary file is left


def test_an_existing_file_is_replaced_only_when_asked(detector_checkpoint, tmp_path, capsys):
    checkpoint, _ = detector_checkpoint
    theirs = tmp_path / "swin.safetensors"  # e.g. a user's own weights
    save_file({"w": torch.ones(3)}, str(theirs))
    before = theirs.read_bytes()
    assert main(["export", str(checkpoint), str(theirs)]) == 2
    err = capsys.readouterr().err
    assert "exists: pass --overwrite to replace it" in err and err.count("\n") == 1
    assert theirs.read_bytes() == before
    assert main(["export", str(checkpoint), str(theirs), "--overwrite"]) == 0
    assert load_model(theirs)[1]["meta"] == load_model(checkpoint)[1]["meta"]
    (tmp_path / "a_folder.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        export_model(checkpoint, tmp_path / "a_folder.safetensors", overwrite=True)
