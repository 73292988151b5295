from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from spa.engine import CheckpointError, NonFiniteLossError, TrainConfig, Trainer, load_checkpoint
from spa.engine.checkpoint import load_model_state, save_checkpoint
from spa.engine.distributed import DistInfo
from spa.engine.trainer import epoch_batches

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
META = {"model": "toy", "width": 8}


class NoisyData(torch.utils.data.Dataset):
    """Items with random augmentation, so resume must restore per-sample randomness too."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        x = torch.arange(4.0) * (i + 1) / 20 + 0.1 * torch.randn(4)
        return x, torch.tensor(float(i % 3))


class Toy(nn.Module):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 1))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, x, y):
        self.calls += 1
        pred = self.net(x).squeeze(1)
        loss = ((pred - y) ** 2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss_mse": loss, "loss_l1": 0.1 * (pred - y).abs().mean()}

    def training_stats(self):
        return {"calls": float(self.calls)}


def collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def make(tmp_path, name, model=None, init_seed=123, **overrides):
    cfg = dict(out_dir=str(tmp_path / name), max_steps=12, batch_size=3, warmup_steps=4, lr=1e-2)
    cfg.update(checkpoint_every=3, progress=False)
    cfg.update(overrides)
    torch.manual_seed(init_seed)
    return Trainer(model or Toy(), NoisyData(), collate, TrainConfig(**cfg), META, dist_info=SINGLE)


def kill_after(trainer, steps):
    """Make ``trainer.train()`` die (``KeyboardInterrupt``) once ``steps`` steps are done."""
    original_step = trainer.train_step

    def dies(images, targets):
        if trainer.step == steps:
            raise KeyboardInterrupt("killed")
        return original_step(images, targets)

    trainer.train_step = dies


def losses(run_dir):
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def test_resume_after_a_kill_mid_epoch_repeats_the_uninterrupted_run(tmp_path):
    full = make(tmp_path, "a")
    full.train()

    killed = make(tmp_path, "b")
    kill_after(killed, 10)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["step"] == 9 and state["epoch"] == 1 and state["next_batch"] == 2  # mid-epoch, after warm-up
    assert max(losses(tmp_path / "b")) == 10  # a step was logged after the checkpoint

    resumed = make(tmp_path, "b", init_seed=999)  # other initial weights: resume must restore them
    resumed.train(resume=tmp_path / "b" / "checkpoints" / "last.pt")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 13))
    for step in range(10, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_schedule_and_logs(tmp_path):
    trainer = make(tmp_path, "a", max_steps=None, epochs=2, warmup_steps=3)
    summary = trainer.train()
    assert summary["steps"] == 14 and summary["epoch"] == 2  # 7 batches per epoch
    records = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[-1] < lrs[3]  # warm-up, then cosine decay
    assert {"loss", "loss_mse", "loss_l1", "grad_norm", "calls"} <= records[0].keys()
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["last.pt"]  # by default nothing but what a resume needs, across epochs too
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["step"] == 14


def test_keep_checkpoints_keeps_the_newest_step_files_weights_only(tmp_path):
    make(tmp_path, "a", keep_checkpoints=2).train()  # saves at steps 3, 6, 9, 12
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_000009.pt", "step_000012.pt"]
    snapshot, last = load_checkpoint(folder / "step_000012.pt"), load_checkpoint(folder / "last.pt")
    assert set(snapshot) == {"model", "meta", "extra", "step", "epoch"}
    assert snapshot["step"] == 12 and snapshot["meta"] == META
    assert all(torch.equal(v, last["model"][k]) for k, v in snapshot["model"].items())
    with pytest.raises(CheckpointError, match="weights only"):
        make(tmp_path, "b").resume(folder / "step_000009.pt")


def test_keep_optimizer_step_files_resume_exactly(tmp_path):
    full = make(tmp_path, "a", keep_checkpoints=1, keep_optimizer=True)
    full.train()
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_000012.pt"]
    assert "optimizer" in load_checkpoint(folder / "step_000012.pt")

    killed = make(tmp_path, "b", keep_checkpoints=1, keep_optimizer=True)
    kill_after(killed, 7)  # last.pt and step_000006.pt at step 6, then a step past them
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = make(tmp_path, "b", init_seed=999, keep_checkpoints=1, keep_optimizer=True)
    resumed.train(resume=tmp_path / "b" / "checkpoints" / "step_000006.pt")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["last.pt", "step_000012.pt"]
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def _strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_log_is_strict_json_with_null_for_nan(tmp_path):
    class NanStats(Toy):
        def training_stats(self):
            return {"calls": float(self.calls), "keep": float("nan"), "ratio": float("inf")}

    make(tmp_path, "a", model=NanStats(), max_steps=2).train()
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["keep"] is None and r["ratio"] is None and r["calls"] > 0 for r in records)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make(tmp_path, "a", model=Toy(nan_at=5))
    with pytest.raises(NonFiniteLossError, match="step 5") as err:
        trainer.train()
    assert "left untouched" in str(err.value)
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_finite_loss_with_non_finite_gradients_stops_before_the_step(tmp_path):
    class NanGradient(Toy):
        def forward(self, x, y):
            losses = super().forward(x, y)
            if self.calls == 5:  # adds 0 to the loss, but d/dx sqrt(x) at 0 is inf: the gradient is NaN
                losses["loss_mse"] = losses["loss_mse"] + (self.net[0].weight * 0).abs().sqrt().sum()
            return losses

    trainer = make(tmp_path, "a", model=NanGradient())
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm at step 5") as err:
        trainer.train()
    assert "left untouched" in str(err.value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no step was taken
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_other_batches_is_refused_instead_of_looping(tmp_path):
    make(tmp_path, "a", max_steps=4).train()  # 7 batches of 3 per epoch: saved at batch 4
    checkpoint = tmp_path / "a" / "checkpoints" / "last.pt"
    for overrides, match in (({"batch_size": 5}, "batch_size 3 .checkpoint. vs 5"), ({"seed": 1}, "seed 0")):
        other = make(tmp_path, "b", **overrides)
        with pytest.raises(CheckpointError, match=match):
            other.resume(checkpoint)


def test_resume_drops_a_half_written_log_line(tmp_path):
    make(tmp_path, "a", max_steps=3).train()
    with (tmp_path / "a" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "epoch": 0, "lr": 0.0')  # the process died while writing
    resumed = make(tmp_path, "a", max_steps=5)
    resumed.train(resume=tmp_path / "a" / "checkpoints" / "last.pt")
    assert sorted(losses(tmp_path / "a")) == [1, 2, 3, 4, 5]


def test_two_process_resume_restores_every_ranks_random_state(tmp_path):
    """Under DDP each rank draws its own dropout noise; a resumed run must give each rank back its own
    state (not rank 0's), so that it ends with the uninterrupted run's weights."""
    script = Path(__file__).parent / "scripts" / "ddp_resume.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, str(script), str(tmp_path)], check=True, env=env, timeout=300, capture_output=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["diff"] <= 1e-6 for r in ranks)
    assert ranks[0]["draw"] != ranks[1]["draw"]  # the ranks' streams stayed different


def test_checkpoint_of_another_model_is_refused(tmp_path):
    make(tmp_path, "a", max_steps=3).train()
    other = make(tmp_path, "b")
    other.meta = {"model": "toy", "width": 16}
    with pytest.raises(CheckpointError, match="width"):
        other.resume(tmp_path / "a" / "checkpoints" / "last.pt")


def test_unreadable_checkpoints_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(100)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(truncated)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an spa checkpoint") as foreign:
        load_checkpoint(tmp_path / "foreign.pt")
    # the hint fits every verb that reads checkpoints (eval/predict: --checkpoint), not only train --resume
    assert "spa train --pretrained, not to --resume or --checkpoint" in str(foreign.value)


def test_model_is_never_half_loaded():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    bad["1.weight"] = torch.zeros(3, 8)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model_state(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(3)}, "step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_epoch_batches_shard_and_repeat():
    shards = [epoch_batches(10, 2, seed=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert set(flat) == set(range(10)) and len(flat) == 12  # padded by wrapping, 4 per rank
    assert all(len(s) == 2 for s in shards)
    assert epoch_batches(10, 2, 0, 1) == epoch_batches(10, 2, 0, 1) != epoch_batches(10, 2, 0, 2)
    with pytest.raises(ValueError, match="empty"):
        epoch_batches(0, 2, 0, 0)


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        TrainConfig(keep_checkpoints=-1)
    with pytest.raises(ValueError, match="keep_checkpoints must be an integer"):
        TrainConfig(keep_checkpoints=1.5)


def test_resume_of_another_configuration_names_the_fields_that_differ(tmp_path):
    meta = {**META, "detector": {"model": "spt_nano", "selection_alpha": 0.5, "img_size": 64}}
    first = Trainer(Toy(), NoisyData(), collate, TrainConfig(out_dir=str(tmp_path / "m"), max_steps=3,
                    batch_size=3, progress=False), meta, dist_info=SINGLE)  # fmt: skip
    first.train()
    other_meta = {**META, "detector": {"model": "spt_nano", "selection_alpha": 1.0, "img_size": 64}}
    other = Trainer(Toy(), NoisyData(), collate, TrainConfig(out_dir=str(tmp_path / "n"), max_steps=3,
                    batch_size=3, progress=False), other_meta, dist_info=SINGLE)  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"detector\.selection_alpha: 0\.5 \(checkpoint\) vs 1\.0 \(this run\)$"
    ):
        other.resume(tmp_path / "m" / "checkpoints" / "last.pt")
