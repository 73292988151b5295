"""Training engine: the loop, checkpoints, metrics logs and multi-process (torchrun) support."""

from spa.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from spa.engine.distributed import DistInfo, init_distributed
from spa.engine.trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "CheckpointError",
    "DistInfo",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "init_distributed",
    "load_checkpoint",
    "load_model_state",
    "save_checkpoint",
]
