"""``spa train --pretrained``: a Swin file or an spa checkpoint starts the backbone; bad files fail before any
data is read; seeded init; run folders (non-empty --out, --overwrite, absolute stored paths)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml

from spa.cli import main
from spa.config import RunConfig
from spa.data import make_builtin
from spa.engine import load_checkpoint
from spa.engine.commands import RunFolderError, run_training
from spa.engine.pretrained import PretrainedError, read_pretrained
from spa.errors import SpaWarning

RUN = dict(
    img_size=64, max_steps=2, batch_size=2, fpn_channels=16, representation_size=32, checkpoint_every=10
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_builtin(tmp_path_factory.mktemp("pre") / "builtin", images=4, val_images=2, size=64, seed=5)


@pytest.fixture(scope="module")
def swin_file(tmp_path_factory) -> Path:
    """A random Swin of the nano width in timm's layout, saved as a user's weight file."""
    torch.manual_seed(123)
    swin = timm.create_model("swin_nano", num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "swin_nano.pth"
    torch.save({"model": swin.state_dict()}, path)
    return path


def _cfg(data: Path, out: Path, **kw) -> RunConfig:
    return RunConfig(data=f"builtin:{data}", out=str(out), **{**RUN, **kw})


@pytest.mark.parametrize("model", ["spt_nano", "swin_nano"])
def test_pretrained_swin_file_starts_the_backbone(data, swin_file, tmp_path, model):
    source = torch.load(swin_file, weights_only=True)["model"]
    result = run_training(_cfg(data, tmp_path / "run", model=model, pretrained=str(swin_file), max_steps=1,
                               lr=1e-12, warmup_steps=0), evaluate=False, progress=False, log=False)  # fmt: skip
    report = result["pretrained"]
    assert report.sha256 and report.loaded > 0 and report.source == "swin"
    body = result["model"].backbone.body.model
    # stage-1 weights came from the file (lr ~ 0: one step does not move them measurably)
    torch.testing.assert_close(
        body.patch_embed.proj.weight, source["patch_embed.proj.weight"], atol=1e-6, rtol=0
    )
    if model == "spt_nano":
        assert any(".gate." in k for k in report.missing)  # the gates start fresh
        assert report.block_map[2] == [0, 1, 0]  # 3 SPT stage-3 blocks from 2 Swin blocks (shift parity kept)
    stored = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["extra"]["pretrained"]
    assert stored["sha256"] == report.sha256 and stored["path"] == str(swin_file.resolve())
    assert json.loads((tmp_path / "run" / "pretrained.json").read_text())["loaded"] == report.loaded
    if model == "spt_nano":  # a resume that names another file: told that it is not read
        other = tmp_path / "other.pth"
        other.write_bytes(swin_file.read_bytes())
        cfg = _cfg(data, tmp_path / "run", model=model, pretrained=str(other), max_steps=2, lr=1e-12,
                   warmup_steps=0)  # fmt: skip
        with pytest.warns(SpaWarning, match=r"--pretrained .*other\.pth is not read on resume"):
            run_training(cfg, resume=str(tmp_path / "run" / "checkpoints" / "last.pt"), evaluate=False,
                         progress=False, log=False)  # fmt: skip


def test_pretrained_from_an_spa_checkpoint_and_yaml_key(data, swin_file, tmp_path):
    first = run_training(_cfg(data, tmp_path / "a", max_steps=1), evaluate=False, progress=False, log=False)
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"pretrained": os.path.relpath(ckpt, tmp_path), "task": "multilabel"}))
    cfg_args = ["--config", str(config), "--data", f"builtin:{data}", "--img-size", "64", "--max-steps", "1",
                "--batch-size", "2", "--out", str(tmp_path / "b"), "--quiet", "--no-eval", "--lr", "1e-12"]  # fmt: skip
    assert (
        main(["train", *cfg_args]) == 0
    )  # a detector's backbone into a classifier; path relative to the YAML
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["extra"]["pretrained"]["source"] == "spa"
    assert state["extra"]["run_config"]["pretrained"] == str(ckpt.resolve())
    a = first["model"].backbone.body.model.state_dict()
    key = "layers.2.blocks.0.gate.proj.weight"  # SPT -> SPT: the trained gate comes along
    torch.testing.assert_close(state["model"][f"backbone.{key}"], a[key], atol=1e-6, rtol=0)


def test_bad_pretrained_files_fail_before_any_data_is_read(tmp_path):
    missing_data = "coco:/no/such/annotations.json:/no/such/images"  # reading it would fail differently
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    for path, message in ((tmp_path / "none.pth", "no such file"), (garbage, "cannot read"),
                          (foreign, "no backbone weights")):  # fmt: skip
        with pytest.raises(PretrainedError, match=message):
            run_training(
                RunConfig(data=missing_data, pretrained=str(path), out=str(tmp_path / "o")), log=False
            )
        with pytest.raises(PretrainedError, match=str(path.name)):
            read_pretrained(path)
    wide = tmp_path / "swin_tiny.pth"
    torch.save(timm.create_model("swin_tiny").state_dict(), wide)
    with pytest.raises(PretrainedError, match="shape mismatch"):  # Swin-T into a nano backbone
        from spa.engine.pretrained import load_pretrained
        from spa.tasks import build_detector

        load_pretrained(build_detector(model="spt_nano", num_classes=2, img_size=64), wide)


def test_a_file_that_fits_few_backbone_tensors_warns(swin_file, tmp_path):
    from spa.engine.pretrained import load_pretrained
    from spa.tasks import build_detector

    state = torch.load(swin_file, weights_only=True)["model"]
    few = tmp_path / "few.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("patch_embed.")}, few)
    with pytest.warns(SpaWarning, match=r"only \d+ of the backbone's \d+ tensors came from it"):
        report = load_pretrained(build_detector(model="spt_nano", num_classes=2, img_size=64), few)
    assert 0 < report.loaded < 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained(build_detector(model="spt_nano", num_classes=2, img_size=64), swin_file)
    assert not [w for w in caught if "tensors came from it" in str(w.message)]  # the whole file: no warning


def test_identical_runs_give_identical_losses_and_the_out_folder_is_guarded(data, tmp_path):
    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    torch.manual_seed(999)  # the global RNG state before the call must not matter: the run's seed decides
    run_training(_cfg(data, tmp_path / "x"), evaluate=False, progress=False, log=False)
    torch.manual_seed(1)
    run_training(_cfg(data, tmp_path / "y"), evaluate=False, progress=False, log=False)
    assert losses(tmp_path / "x") == losses(tmp_path / "y")
    with pytest.raises(RunFolderError, match="--overwrite"):
        run_training(_cfg(data, tmp_path / "x"), evaluate=False, progress=False, log=False)
    run_training(_cfg(data, tmp_path / "x"), evaluate=False, progress=False, log=False, overwrite=True)
    assert losses(tmp_path / "x") == losses(tmp_path / "y")  # replaced, not appended
    (tmp_path / "x" / "notes.txt").write_text("mine")
    (tmp_path / "x" / "checkpoints" / "mine.pt").write_text("my own file")
    run_training(_cfg(data, tmp_path / "x"), evaluate=False, progress=False, log=False, overwrite=True)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"  # only spa's own files are removed
    assert (tmp_path / "x" / "checkpoints" / "mine.pt").read_text() == "my own file"
    # a run that fails its checks removes nothing: the earlier run's checkpoint is still there
    last = tmp_path / "x" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    for bad in ({"batch_size": 0}, {"data": "builtin:" + str(tmp_path / "nothing_here" / "sub")}):
        cfg = _cfg(data, tmp_path / "x")
        for key, value in bad.items():
            setattr(cfg, key, value)
        with pytest.raises((ValueError, OSError)):  # a ConfigError / a missing data folder
            run_training(cfg, evaluate=False, progress=False, log=False, overwrite=True)
        assert last.read_bytes() == before and (tmp_path / "x" / "metrics.jsonl").is_file()


def test_a_refused_folder_suggests_resume_only_when_there_is_a_checkpoint(tmp_path):
    from spa.engine.commands import check_run_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("a failed run")
    with pytest.raises(RunFolderError) as err:
        check_run_folder(out, None, False)
    assert "--resume" not in str(err.value) and "--overwrite" in str(err.value)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=r"--resume .*last\.pt"):
        check_run_folder(out, None, False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a run folder"):
        check_run_folder(tmp_path / "a_file", None, True)


def test_overwrite_removes_spa_temp_files_and_leaves_the_rest(tmp_path):
    from spa.engine.commands import clear_run_folder

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    spa_files = ["config.yaml", ".eval.json.ab12cd34.tmp", "checkpoints/last.pt", "checkpoints/step_000050.pt",
                 "checkpoints/.last.pt.x1y2z3w4.tmp"]  # fmt: skip
    mine = ["notes.txt", "checkpoints/best.pt", ".my_hidden_note"]
    for name in spa_files + mine:
        (out / name).write_text(name)
    clear_run_folder(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(mine)


def test_stored_data_paths_are_absolute_so_eval_runs_from_anywhere(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    run_training(
        RunConfig(data=f"builtin:{data.name}", out=str(tmp_path / "r"), **RUN), progress=False, log=False
    )
    stored = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert stored["data"] == f"builtin:{data.resolve()}"
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "r" / "checkpoints" / "last.pt"), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["images"] == 2
    text = (tmp_path / "r" / "eval.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_resume_from_a_swin_file_points_to_pretrained(data, swin_file, tmp_path, capsys):
    argv = ["train", "--data", f"builtin:{data}", "--img-size", "64", "--resume", str(swin_file), "--out",
            str(tmp_path / "r"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert "--pretrained instead of --resume" in capsys.readouterr().err
