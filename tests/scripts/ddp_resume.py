"""Run under ``torchrun --nproc_per_node 2``: a toy model with dropout trains 8 steps with DDP (gloo), then
the same run is killed after step 5 and resumed from its step-4 checkpoint; every rank writes its final
weights and one random draw per rank. Usage: ddp_resume.py OUT_DIR."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from spa.engine import TrainConfig, Trainer, init_distributed


class Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return torch.arange(4.0) * (i + 1) / 24, torch.tensor(float(i % 3))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, y):
        return {"loss": ((self.net(x).squeeze(1) - y) ** 2).mean()}


def collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def trainer(out: Path, dist_info) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(
        out_dir=str(out), max_steps=8, batch_size=2, checkpoint_every=4, progress=False, lr=1e-2
    )
    return Trainer(Toy(), Data(), collate, config, {"task": "ddp-resume"}, dist_info)


def main(out_dir: str) -> None:
    dist_info = init_distributed("cpu")
    out = Path(out_dir)
    trainer(out / "full", dist_info).train()
    full = torch.load(out / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]

    killed = trainer(out / "killed", dist_info)
    original = killed.train_step

    def dies_after_step_5(images, targets):
        if killed.step == 5:
            raise KeyboardInterrupt
        return original(images, targets)

    killed.train_step = dies_after_step_5
    with contextlib.suppress(KeyboardInterrupt):
        killed.train()
    torch.distributed.barrier()
    resumed = trainer(out / "killed", dist_info)
    resumed.train(resume=out / "killed" / "checkpoints" / "last.pt")
    torch.save(
        {
            "diff": max(float((full[k] - v).abs().max()) for k, v in resumed.model.state_dict().items()),
            "draw": float(torch.rand(())),
        },
        out / f"rank{dist_info.rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
