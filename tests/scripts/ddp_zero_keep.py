"""Run under ``torchrun --nproc_per_node 2``: a detector trains for a few steps with DDP (gloo) while
rank 1's SPA blocks keep zero tokens (its gates' keep threshold is set beyond reach; thresholds are plain
attributes, so DDP's parameter broadcast does not undo it). Usage: ddp_zero_keep.py DATA_DIR OUT_DIR."""

from __future__ import annotations

import json
import sys

import torch

from spa.data import builtin_dataset, collate_detection, detection_transforms
from spa.engine import TrainConfig, Trainer, init_distributed
from spa.gate import set_keep_threshold
from spa.tasks import build_detector


def main(data_dir: str, out_dir: str) -> None:
    dist_info = init_distributed("cpu")
    torch.manual_seed(0)
    train = builtin_dataset(data_dir, "train", transforms=detection_transforms(True, 128))
    model = build_detector(
        model="spt_nano", num_classes=train.num_classes, img_size=128, min_size=128, max_size=128
    )
    if dist_info.rank == 1:
        set_keep_threshold(model, 1 - 1e-7)  # sigmoid(logit) never exceeds it at init: nothing kept
    config = TrainConfig(out_dir=out_dir, max_steps=3, batch_size=2, checkpoint_every=100, progress=False)
    trainer = Trainer(model, train, collate_detection, config, {"task": "ddp-test"}, dist_info)
    kept = []
    original = trainer.train_step

    def step(images, targets):
        record = original(images, targets)
        kept.append([int(s.keep.sum()) for s in model.backbone.body.last_selections])
        return record

    trainer.train_step = step
    summary = trainer.train()
    with open(f"{out_dir}/kept_rank{dist_info.rank}.json", "w") as f:
        json.dump({"kept_per_block": kept, "steps": summary["steps"]}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
