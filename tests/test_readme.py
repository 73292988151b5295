"""The README's code examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    assert "padded" in capsys.readouterr().out


def test_readme_fine_tune_commands_run(tmp_path, monkeypatch, capsys):
    """README's "Fine-tune on your COCO data" commands, as written, at tiny scale: spt_nano for spt_tiny, a
    random Swin file of its width, 64 px, 2 steps; the data has category ids 3 and 7."""
    import json
    import shlex

    import timm
    import torch
    from conftest import write_tiny_coco

    from spa.cli import main

    text = README.read_text()
    section = text[text.index("### Fine-tune on your COCO data") :]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert [c.split()[1] for c in commands] == ["train", "eval", "predict", "export", "predict"]
    tiny = {"spt_tiny": "spt_nano", "--img-size 800": "--img-size 64", "--fpn-channels 256": "--fpn-channels 16",
            "--representation-size 1024": "--representation-size 32", "--max-steps 20000": "--max-steps 2"}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    write_tiny_coco(tmp_path / "data", name="train.json", sizes=[(64, 64)] * 4)
    write_tiny_coco(tmp_path / "data", name="val.json", sizes=[(64, 64)] * 2, first_id=5)
    (tmp_path / "data" / "new_images").mkdir()
    for name in ("im1.png", "im5.png"):
        (tmp_path / "data" / "new_images" / name).write_bytes(
            (tmp_path / "data" / "images" / name).read_bytes()
        )
    torch.save(timm.create_model("swin_nano").state_dict(), tmp_path / "swin_tiny_patch4_window7_224.pth")
    for command in commands:
        for big, small in tiny.items():
            command = command.replace(big, small)
        argv = shlex.split(command)[1:]
        assert main([*argv, "--quiet"] if argv[0] in ("train", "eval") else argv) == 0, command
    run = tmp_path / "runs" / "mycoco"
    assert json.loads((run / "pretrained.json").read_text())["loaded"] > 0
    detections = json.loads((run / "val_detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {3, 7}
    for folder in ("predict", "predict_export"):
        assert {d["category_id"] for d in json.loads((run / folder / "predictions.json").read_text())} <= {
            3,
            7,
        }
    assert len(json.loads((run / "predict" / "images.json").read_text())) == 2
    assert list((run / "predict").glob("*.png"))
    assert (run / "spt_nano_mycoco.safetensors").is_file()
