"""Detection end to end: detectors, selection labels inside the model, COCO evaluation, CLI, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spa.cli import main
from spa.data import builtin_dataset, collate_detection, detection_transforms, make_builtin
from spa.engine import CheckpointError, load_checkpoint
from spa.engine.commands import load_detector
from spa.errors import SpaWarning
from spa.labels import batch_selection_labels
from spa.tasks import build_detector
from spa.tasks.evaluation import coco_ground_truth, coco_metrics, evaluate_detection, to_coco_results

SMALL = dict(img_size=128, min_size=128, max_size=128)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    make_builtin(root, images=8, val_images=4, size=128, coverage=0.2, seed=0)
    return root


def _batch(root, n=2, augment=True):
    ds = builtin_dataset(root, "train", transforms=detection_transforms(True, 128) if augment else None)
    return ds, collate_detection([ds[i] for i in range(n)])


@pytest.mark.parametrize(
    ("model", "detector"),
    [("spt_nano", "faster_rcnn"), ("spt_nano", "mask_rcnn"), ("swin_nano", "faster_rcnn")],
)
def test_detectors_train_and_predict(tiny_set, model, detector):
    ds, (images, targets) = _batch(tiny_set)
    det = build_detector(model=model, detector=detector, num_classes=ds.num_classes, **SMALL)
    losses = det.train()(images, targets)
    assert ("loss_select" in losses) == model.startswith("spt")
    assert ("loss_mask" in losses) == (detector == "mask_rcnn")
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        out = det.eval()(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= out[0].keys()


def test_unsupervised_gate_gets_no_selection_loss(tiny_set):
    """``supervise_gate=False`` (``spa train --supervise-gate false``): the gate learns from the detection
    losses alone; ``loss_select`` stays in the logs as 0."""
    ds, (images, targets) = _batch(tiny_set)
    det = build_detector(model="spt_nano", num_classes=ds.num_classes, supervise_gate=False, **SMALL)
    losses = det.train()(images, targets)
    assert float(losses["loss_select"]) == 0.0
    sum(losses.values()).backward()  # still trains end to end
    supervised = build_detector(model="spt_nano", num_classes=ds.num_classes, **SMALL)
    assert float(supervised.train()(images, targets)["loss_select"].detach()) > 0


def test_selection_labels_use_boxes_as_the_backbone_sees_them(tiny_set):
    """The detector resizes 128 px images to 64 px: labels must come from the resized boxes."""
    ds, (images, targets) = _batch(tiny_set, augment=False)
    assert all(im.shape[-2:] == (128, 128) for im in images)
    det = build_detector(model="spt_nano", num_classes=ds.num_classes, img_size=64, min_size=64, max_size=64)
    out = det.train().forward_details(images, targets)
    for sel in out.selections:
        labels = out.labels[sel.stride]
        assert labels.shape == sel.own_logits.shape
    resized = [{"boxes": t["boxes"] * 0.5, "masks": t["masks"][:, ::2, ::2]} for t in targets]
    expected = batch_selection_labels(resized, (64, 64), 16)
    torch.testing.assert_close(out.labels[16], expected)
    unscaled = batch_selection_labels(targets, (64, 64), 16, use_masks=False)  # boxes as loaded: wrong frame
    assert not torch.equal(unscaled, expected)


def test_coco_evaluation_cross_check(tiny_set):
    """Ground-truth boxes as predictions score AP 1 with pycocotools' COCOeval; shifted ones AP50 0."""
    val = builtin_dataset(tiny_set, "val")
    coco_gt, label_to_cat = coco_ground_truth(val)
    perfect, shifted = [], []
    for i in range(len(val)):
        _, t = val[i]
        n = len(t["labels"])
        pred = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n)}
        perfect += to_coco_results(pred, int(t["image_id"]), label_to_cat)[0]
        far = t["boxes"] + torch.tensor([200.0, 200.0, 200.0, 200.0])
        shifted += to_coco_results({**pred, "boxes": far}, int(t["image_id"]), label_to_cat)[0]
    assert coco_metrics(coco_gt, perfect)["AP"] == pytest.approx(1.0)
    assert coco_metrics(coco_gt, shifted)["AP50"] == 0.0
    assert coco_metrics(coco_gt, [])["AP"] == 0.0


def test_evaluate_reports_every_metric(tiny_set):
    val = builtin_dataset(tiny_set, "val")
    det = build_detector(model="spt_nano", detector="mask_rcnn", num_classes=val.num_classes, **SMALL)
    result = evaluate_detection(det, val, batch_size=2, bootstrap=20, bootstrap_seed=1)
    assert result["images"] == 4
    boot = result.pop("bbox_bootstrap")  # from the same matching as "bbox"
    assert boot["AP"] == pytest.approx(result["bbox"]["AP"]) and boot["AP50"] == pytest.approx(
        result["bbox"]["AP50"]
    )
    assert boot["images"] == 4 and len(boot["samples"]["AP"]) == 20
    for kind in ("bbox", "segm"):
        assert set(result[kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(result["keep"]) == {"stage3", "stage4"}
    assert 0 < result["gmacs"]["kept"] <= result["gmacs"]["executed"]
    values = [v for k in ("bbox", "segm") for v in result[k].values()] + list(result["gmacs"].values())
    values += [v for stage in result["keep"].values() for v in stage.values()]
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in values)


def test_evaluation_gmacs_of_a_dense_backbone_match_count_macs(tiny_set):
    """The hooks count every image once (a detector calls its body through ``forward``)."""
    from spa.flops import count_macs

    val = builtin_dataset(tiny_set, "val")
    det = build_detector(model="swin_nano", detector="faster_rcnn", num_classes=val.num_classes, **SMALL)
    result = evaluate_detection(det, val, batch_size=2)
    expected = count_macs(det.backbone.body.eval(), torch.randn(1, 3, 128, 128))
    assert result["gmacs"]["executed"] == pytest.approx(expected.executed, rel=1e-9)
    assert result["gmacs"]["kept"] == pytest.approx(expected.kept, rel=1e-9)


def _train(args, out, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "spa.cli", "train", *args, "--out", str(out), "--quiet"],
        check=True, capture_output=True, text=True, env=ENV, **kwargs,
    )  # fmt: skip


def _losses(run):
    return {r["step"]: r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())}


def test_cli_train_then_eval(tiny_set, tmp_path):
    run = tmp_path / "run"
    args = ["--data", f"builtin:{tiny_set}", "--img-size", "128", "--max-steps", "3", "--batch-size", "2"]
    _train([*args, "--eval-batch-size", "2"], run)
    assert (run / "config.yaml").is_file()
    records = _losses(run)
    assert sorted(records) == [1, 2, 3]
    for r in records.values():
        for key in (
            "loss",
            "loss_classifier",
            "loss_box_reg",
            "loss_objectness",
            "loss_rpn_box_reg",
            "loss_select",
        ):
            assert torch.isfinite(torch.tensor(r[key]))
    trained = json.loads((run / "eval.json").read_text())
    assert trained["images"] == 4
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(out), "--quiet"])
        == 0
    )
    again = json.loads(out.read_text())
    assert again["bbox"] == trained["bbox"] and again["gmacs"] == trained["gmacs"]
    with pytest.raises(CheckpointError, match="swin_nano"):
        main(
            ["--debug", "eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--model", "swin_nano"]
        )


def test_resume_after_kill_matches_uninterrupted_run(tiny_set, tmp_path):
    args = ["--data", f"builtin:{tiny_set}", "--img-size", "128", "--max-steps", "12", "--batch-size", "2"]
    args += ["--checkpoint-every", "3", "--warmup-steps", "2", "--no-eval", "--lr", "1e-3"]
    _train(args, tmp_path / "full")

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spa.cli", "train", *args, "--out", str(killed), "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # step 5: mid-epoch (4 batches/epoch)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert 3 <= state["step"] <= 9 and state["step"] >= 2  # after warm-up started, >= 3 steps left
    _train([*args, "--resume", str(killed / "checkpoints" / "last.pt")], killed)

    full, resumed = _losses(tmp_path / "full"), _losses(killed)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(state["step"] + 1, 13):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6, rel=0)
    a, _ = load_detector(tmp_path / "full" / "checkpoints" / "last.pt")
    b, _ = load_detector(killed / "checkpoints" / "last.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_resume_keeps_the_stored_configuration_and_a_refusal_writes_nothing(
    tiny_set, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    args = ["--data", f"builtin:{tiny_set}", "--img-size", "64", "--batch-size", "2", "--lr", "1e-3"]
    assert main(["train", *args, "--max-steps", "2", "--no-eval", "--quiet", "--out", str(run)]) == 0
    ckpt = run / "checkpoints" / "last.pt"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    # a setting of the training trajectory changed: refused before any data is read, nothing rewritten
    for flags, named in ((["--lr", "0.01"], "--lr 0.001 (checkpoint) vs 0.01 (this run)"),
                         (["--seed", "3"], "--seed 0 (checkpoint) vs 3 (this run)"),
                         (["--task", "multilabel"], "--task 'detect' (checkpoint) vs 'multilabel'")):  # fmt: skip
        assert main(["train", "--resume", str(ckpt), *flags, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert named in err and "leave these out (flags or --config)" in err and err.count("\n") == 1
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # no flags: the stored configuration, in the checkpoint's run folder; a longer run may be asked for
    import gc
    import weakref

    import spa.engine.commands as commands
    from spa.engine.trainer import Trainer

    reads, tensors, alive = [], [], []

    def read(path):
        reads.append(path)
        state = load_checkpoint(path)
        tensors.append(weakref.ref(next(iter(state["model"].values()))))
        return state

    def train(self):
        gc.collect()
        alive.extend(ref() is not None for ref in tensors)
        return real_train(self)

    real_train = Trainer.train
    monkeypatch.setattr(commands, "load_checkpoint", read)
    monkeypatch.setattr(Trainer, "train", train)
    assert main(["train", "--resume", str(ckpt), "--max-steps", "3", "--no-eval", "--quiet"]) == 0
    assert reads == [str(ckpt)]  # the checkpoint is read once (configuration, checks and trainer)
    assert alive == [False]  # and nothing holds its tensors while training runs
    monkeypatch.undo()
    assert "resumed at step 2" in capsys.readouterr().out
    assert load_checkpoint(ckpt)["step"] == 3 and sorted(_losses(run)) == [1, 2, 3]
    stored = (run / "config.yaml").read_text()
    assert "max_steps: 3" in stored and "lr: 0.001" in stored and str(tiny_set) in stored


def test_resume_needs_a_run_folder_and_tolerates_moved_data_and_spelled_out_defaults(
    tiny_set, tmp_path, capsys
):
    import shutil

    run = tmp_path / "run"
    args = ["--data", f"builtin:{tiny_set}", "--img-size", "64", "--batch-size", "2", "--no-eval", "--quiet"]
    assert main(["train", *args, "--max-steps", "2", "--out", str(run)]) == 0
    # a copy outside a run folder: where to continue must be said; a folder of other files is refused
    shelf = tmp_path / "shelf" / "checkpoints"
    shelf.mkdir(parents=True)
    copy = shelf / "spt_run1.pt"
    shutil.copy(run / "checkpoints" / "last.pt", copy)
    (shelf.parent / "metrics.jsonl").write_text("my notes\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--max-steps", "3", "--quiet"]) == 2
    assert "pass --out RUN" in capsys.readouterr().err
    assert (
        main(["train", "--resume", str(copy), "--max-steps", "3", "--quiet", "--out", str(shelf.parent)]) == 2
    )
    assert "holds other files and no run" in capsys.readouterr().err
    assert (shelf.parent / "metrics.jsonl").read_text() == "my notes\n"
    # the data moved (same kind of spec, same items): a warning; an unset SPT option spelled out: the same run
    moved = tmp_path / "moved_set"
    shutil.copytree(tiny_set, moved)
    flags = [
        "--data",
        f"builtin:{moved}",
        "--select",
        "gate",
        "--layout",
        "containers",
        "--spa-stages",
        "2",
        "3",
    ]
    assert main(["train", "--resume", str(run / "checkpoints" / "last.pt"), *flags, "--max-steps", "3",
                 "--quiet", "--no-eval"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: resuming on data at another path (--data builtin:" in err and str(moved) in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_two_process_gloo_training_with_a_rank_that_keeps_nothing(tiny_set, tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_zero_keep.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, str(script), str(tiny_set), str(tmp_path)], check=True, env=ENV, timeout=600,
                   capture_output=True)  # fmt: skip
    rank0 = json.loads((tmp_path / "kept_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "kept_rank1.json").read_text())
    assert rank0["steps"] == rank1["steps"] == 3
    assert all(k == 0 for step in rank1["kept_per_block"] for k in step)
    assert any(k > 0 for step in rank0["kept_per_block"] for k in step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # written once, by rank 0 (4 images per rank, batch 2: the epoch ends at step 2)
    assert names == ["last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_evaluation_data_needs_no_training_split_and_a_coco_file_warns(tiny_set, tmp_path):
    from PIL import Image

    from spa.config import RunConfig
    from spa.tasks.detection import DetectionTask

    task = DetectionTask()

    voc = tmp_path / "voc"  # a VOC root with a val split only
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(voc / "JPEGImages" / "v1.jpg")
    box = "<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
    (voc / "Annotations" / "v1.xml").write_text(
        f"<annotation><filename>v1.jpg</filename><object><name>dog</name>{box}</object></annotation>"
    )
    (voc / "ImageSets" / "Main" / "val.txt").write_text("v1\n")
    assert len(task.eval_dataset(RunConfig(data=f"voc:{voc}"))) == 1
    train = tiny_set / "train"
    with pytest.warns(SpaWarning, match="evaluating on the training annotations"):
        _, val = task.datasets(RunConfig(data=f"coco:{train / 'annotations.json'}:{train}"))
    assert len(val) == 8


def test_unreadable_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_detector(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "meta": {"task": "classify"}}, foreign)
    with pytest.raises(CheckpointError, match="not a detection checkpoint"):
        load_detector(foreign)


def test_your_own_torchvision_detector_gets_the_selection_loss(tiny_set):
    """A detector built with torchvision's own classes around spa's BackboneWithFPN: training losses include
    the selection loss, with labels in the frame the backbone saw; targets in another frame raise."""
    from torchvision.models.detection import FasterRCNN

    from spa.labels import check_target_frame
    from spa.models import create_backbone
    from spa.tasks import BackboneWithFPN, with_selection_loss

    ds, (images, targets) = _batch(tiny_set, augment=False)
    body = create_backbone("spt_nano", features_only=True, img_size=64)
    detector = FasterRCNN(BackboneWithFPN(body, 16), num_classes=ds.num_classes + 1, min_size=64, max_size=64)
    model = with_selection_loss(detector, selection_alpha=1.0)
    out = model.train().forward_details(images, targets)
    assert out.losses["loss_select"] > 0 and "loss_classifier" in out.losses
    resized = [{"boxes": t["boxes"] * 0.5, "masks": t["masks"][:, ::2, ::2]} for t in targets]
    torch.testing.assert_close(out.labels[16], batch_selection_labels(resized, (64, 64), 16))
    # the 128 px targets as loaded do not fit the 64 px images the backbone saw
    with pytest.raises(ValueError, match="not in the frame"):
        batch_selection_labels(targets, (64, 64), 16, image_sizes=out.image_sizes)
    with pytest.raises(ValueError, match="not in the frame"):
        check_target_frame([{"boxes": targets[0]["boxes"]}], [(64, 64)])
    with pytest.raises(TypeError, match="BackboneWithFPN"):
        with_selection_loss(torch.nn.Linear(2, 2))
