"""Selection overlays (``spa.viz``) and the ``spa viz`` CLI on a tiny detection checkpoint."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import spa
from spa.cli import main
from spa.engine.checkpoint import save_checkpoint
from spa.engine.commands import RunConfig
from spa.tasks.detection import DetectorConfig, build_detector
from spa.viz import draw_selection_overlays, model_selections, stage_keep_maps

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny_spt():
    return spa.create_model("spt_nano", img_size=64, select="topk", keep_ratio=0.5, num_classes=0).eval()


def test_overlays_from_spt_forward(tmp_path):
    model = _tiny_spt()
    images = torch.rand(2, 3, 64, 64)
    shown, selections, detections = model_selections(model, images)
    assert detections is None and len(shown) == 2
    maps = stage_keep_maps(selections)
    assert [(stage, stride) for stage, stride, _ in maps] == [(2, 16), (3, 32)]
    assert maps[0][2].shape == (2, 4, 4) and 0.0 < float(maps[0][2].mean()) < 1.0
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    out = draw_selection_overlays(shown, selections, tmp_path / "sub" / "overlay.png", boxes=boxes)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 1000


def test_overlays_accept_arrays_and_reject_bad_input(tmp_path):
    model = _tiny_spt()
    _, selections = model.forward_with_selections(torch.rand(1, 3, 64, 64))
    array = (np.random.rand(64, 64, 3) * 255).astype(np.uint8)
    assert draw_selection_overlays([array], selections, tmp_path / "a.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no selections"):
        draw_selection_overlays([array], [], tmp_path / "b.png")
    with pytest.raises(ValueError, match="batch of 1"):
        draw_selection_overlays([array, array], selections, tmp_path / "c.png")
    with pytest.raises(ValueError, match="no images"):
        draw_selection_overlays([], selections, tmp_path / "d.png")
    with pytest.raises(ValueError, match="C, H, W"):
        draw_selection_overlays([torch.rand(64, 64)], selections, tmp_path / "e.png")


def _tiny_checkpoint(path, model: str = "spt_nano"):
    kwargs = {"drop_path_rate": 0.0}
    if model.startswith("spt_"):
        kwargs.update(keep_threshold=0.3)
    cfg = DetectorConfig(
        model=model, num_classes=2, img_size=64, min_size=64, max_size=64, fpn_channels=16,
        representation_size=32, model_kwargs=kwargs,
    )  # fmt: skip
    detector = build_detector(cfg)
    config = cfg.to_dict()
    config["model_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in config["model_kwargs"].items()
    }
    run = RunConfig(model=model, img_size=64, fpn_channels=16, representation_size=32)
    state = {"model": detector.state_dict(), "meta": {"task": "detect", "detector": config}}
    state["extra"] = {"run_config": asdict(run)}
    save_checkpoint(path, state)
    return path


def test_viz_cli_on_detection_checkpoint(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "last.pt")
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(80, 64), (48, 96)]):  # the detector resizes them to 64
        rgb = (np.random.rand(size[0], size[1], 3) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(images / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "viz"
    argv = ["viz", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--keep-threshold", "0.4", "--score-threshold", "0.0"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["im0_selection.png", "im1_selection.png"]
    assert all((out / p).read_bytes()[:8] == PNG for p in pngs)
    # two images of the same name in two folders: two pictures, neither overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "im0.png").write_bytes((images / "im1.png").read_bytes())
    out2 = tmp_path / "viz2"
    assert main(["viz", "--checkpoint", str(ckpt), "--images", str(images / "im0.png"), str(other / "im0.png"),
                 "--out", str(out2)]) == 0  # fmt: skip
    assert sorted(p.name for p in out2.glob("*.png")) == [
        "images_im0_selection.png",
        "other_im0_selection.png",
    ]


def test_viz_cli_errors(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "dense.pt", model="swin_nano")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="dense"):
        main(
            [
                "--debug",
                "viz",
                "--checkpoint",
                str(ckpt),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    spt = _tiny_checkpoint(tmp_path / "spt.pt")
    with pytest.raises(ValueError, match="no images"):
        main(
            [
                "--debug",
                "viz",
                "--checkpoint",
                str(spt),
                "--images",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(FileNotFoundError):
        main(
            [
                "--debug",
                "viz",
                "--checkpoint",
                str(spt),
                "--images",
                str(tmp_path / "missing.png"),
                "--out",
                "x",
            ]
        )
    broken = tmp_path / "broken" / "a.png"
    broken.parent.mkdir()
    broken.write_text("not an image")
    argv = ["viz", "--checkpoint", str(spt), "--images", str(broken), "--out", str(tmp_path / "o2")]
    assert main(argv) == 2
    assert not (tmp_path / "o2").exists()  # nothing drawn: no empty output folder left behind


def test_image_folders_are_searched_with_their_sub_folders(tmp_path):
    from spa.viz import _image_paths

    rgb = (np.random.rand(8, 8, 3) * 255).astype(np.uint8)
    for rel in ("cat/a.png", "dog/b.tif", "dog/deeper/c.JPG", ".hidden/d.png", "e.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / rel, format="TIFF" if rel.endswith(".tif") else "PNG")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in _image_paths([str(tmp_path)])]
    assert found == ["cat/a.png", "dog/b.tif", "dog/deeper/c.JPG", "e.png"]


def test_eval_keep_threshold_on_a_dense_checkpoint_is_refused(tmp_path):
    from spa.engine.checkpoint import CheckpointError

    dense = _tiny_checkpoint(tmp_path / "dense.pt", model="swin_nano")
    with pytest.raises(CheckpointError, match=r"dense model \(no token gate"):
        main(["--debug", "eval", "--checkpoint", str(dense), "--keep-threshold", "0.4"])
