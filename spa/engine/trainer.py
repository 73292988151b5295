"""The training loop: AdamW, warm-up + cosine schedule, clipping, AMP on CUDA, exact resume, DDP.

Contract: the model's ``forward(images, targets)`` returns a dict of scalar loss tensors in training
mode (torchvision's detection convention); the loop minimises their sum. A model may also define
``training_stats() -> dict[str, float]`` (e.g. kept-token ratios), logged with every step.

Exact resume: data order is a pure function of ``(seed, epoch)``, every sample's augmentation randomness
of ``(seed, epoch, index)``, and checkpoints carry the model, optimizer, scheduler, step, data position and
every RNG state, so a resumed run repeats the uninterrupted run's steps.

Checkpoints (rank 0 writes, atomically): ``OUT/checkpoints/last.pt`` holds the full state a resume needs and
is rewritten every ``checkpoint_every`` steps, at each epoch end and at the end; nothing else is kept by
default. With ``keep_checkpoints=K`` each ``checkpoint_every`` save also writes ``step_NNNNNN.pt`` and only
the K newest of those stay (weights, meta and extra only, unless ``keep_optimizer``).

Logs: ``OUT/metrics.jsonl``, one strict-JSON record per logged step (NaN/inf written as ``null``), and
TensorBoard when it is installed.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spa.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    check_resumable,
    finite_or_none,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from spa.engine.distributed import DistInfo, init_distributed
from spa.errors import ConfigError

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "epoch_batches", "move_to"]


AMP_MODES = ("auto", "off", "bf16", "fp16")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` mode on ``device`` (None: full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN or infinite; the last good checkpoint is left untouched."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one run."""

    out_dir: str = "runs/train"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    clip_grad: float | None = 5.0
    gate_lr_scale: float = 10.0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), off, bf16, fp16 (with loss scaling)
    seed: int = 0
    num_workers: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 0
    keep_optimizer: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # configs written before amp took a mode
            self.amp = "auto" if self.amp else "off"
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int):
            raise ConfigError(f"keep_checkpoints must be an integer, got {self.keep_checkpoints!r}")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0 and warmup_steps >= 0")


def _differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    """``key: checkpoint value vs this run's`` for every differing leaf of two nested dicts (dotted keys)."""
    out = []
    for key in sorted(set(theirs) | set(ours), key=str):
        a, b = theirs.get(key), ours.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {a!r} (checkpoint) vs {b!r} (this run)")
    return out


def epoch_batches(
    num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch``: a seeded permutation, sharded like
    ``DistributedSampler`` (padded by wrapping so every rank gets the same number of batches)."""
    if num_items < 1:
        raise ValueError("the training set is empty")
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = math.ceil(num_items / world_size)
    perm = (perm * math.ceil(per_rank * world_size / num_items))[: per_rank * world_size]
    mine = perm[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


_STEP_FILE = re.compile(r"step_(\d+)\.pt")


def _step_files(folder: Path) -> dict[int, Path]:
    """``step -> path`` of the ``step_NNNNNN.pt`` files in ``folder``."""
    if not folder.is_dir():
        return {}
    found = ((_STEP_FILE.fullmatch(p.name), p) for p in folder.iterdir())
    return {int(m.group(1)): p for m, p in found if m}


def _logged_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line (None for a half-written or foreign line)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _SeededItems(Dataset):
    """``dataset[index]`` under RNG seeded from ``(seed, epoch, index)``: augmentation is reproducible."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        item_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def move_to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested lists/tuples/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def _param_groups(model: nn.Module, lr: float, weight_decay: float, gate_lr_scale: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and bias tables; token gates (``*.gate.*``) at
    ``lr * gate_lr_scale`` (they start from scratch on a pretrained backbone and are scored by a small
    auxiliary loss, so at the backbone's rate they barely move in a short run)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith("relative_position_bias_table")
        is_gate = ".gate." in f".{name}"
        groups.setdefault((no_decay, is_gate), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (gate_lr_scale if is_gate else 1.0),
        }
        for (no_decay, is_gate), params in sorted(groups.items())
    ]


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class Trainer:
    """Runs the training loop for ``model`` on ``dataset``.

    Args:
        model: returns a dict of losses from ``model(images, targets)`` in training mode.
        dataset: items are ``(image, target)``; batches are built with ``collate_fn``.
        collate_fn: turns a list of items into ``(images, targets)``.
        config: a ``TrainConfig``.
        meta: what the checkpoint must match to be resumed or evaluated (model name, options, task).
        dist_info: process group info (default: from the torchrun environment).
        extra: more to store in every checkpoint (e.g. the run's full configuration).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list], tuple[Any, Any]],
        config: TrainConfig,
        meta: dict[str, Any],
        dist_info: DistInfo | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.extra = extra or {}
        self.meta = meta
        self.dist = dist_info or init_distributed()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            # An SPA block can keep zero tokens on one rank: its parameters then get no gradient there.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batches_per_epoch = len(
            epoch_batches(
                len(dataset), config.batch_size, config.seed, 0, self.dist.rank, self.dist.world_size
            )
        )
        self.total_steps = config.max_steps or config.epochs * self.batches_per_epoch
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, config.lr, config.weight_decay, config.gate_lr_scale), lr=config.lr
        )
        # loss scaling for fp16 only (bf16 has fp32's range); disabled, it passes everything through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self._lr_factor = _lr_lambda(config.warmup_steps, self.total_steps, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.next_batch = 0
        self._saved_step: int | None = None  # the step last.pt was last written at
        self._resumed = False  # resume() ran: train() continues from the restored state
        self._writer = None

    # -- checkpoints -------------------------------------------------------------------------------
    def data_plan(self) -> dict[str, int]:
        """What fixes the order and sharding of the batches; a resumed run must match it."""
        return {
            "num_items": len(self.dataset),
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "world_size": self.dist.world_size,
        }

    def _rng_per_rank(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (a collective under DDP: every rank must call it)."""
        state = capture_rng()
        if not self.dist.distributed:
            return [state]
        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, state)
        return states

    def state(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "rng_per_rank": rng_per_rank or [capture_rng()],
            "data_plan": self.data_plan(),
            "config": asdict(self.config),
            "meta": self.meta,
            "extra": self.extra,
        }

    def weights_state(self) -> dict[str, Any]:
        """What evaluating or exporting the model needs (no optimizer, scheduler or RNG states)."""
        return {
            "model": self.model.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "meta": self.meta,
            "extra": self.extra,
        }

    def save(self, name: str = "last.pt", keep_step: bool = False) -> Path | None:
        """Write the full state to ``checkpoints/name``; with ``keep_step`` (and ``keep_checkpoints``) also
        ``step_NNNNNN.pt``, then drop the older step files. Every rank calls it (each rank's RNG states are
        gathered); rank 0 writes and deletes. Returns the path written (``None`` on other ranks)."""
        rng_per_rank = self._rng_per_rank()
        if name == "last.pt":
            self._saved_step = self.step
        if not self.dist.is_main:
            return None
        state = self.state(rng_per_rank)
        path = save_checkpoint(self.checkpoint_dir / name, state)
        if keep_step and self.config.keep_checkpoints:
            snapshot = state if self.config.keep_optimizer else self.weights_state()
            save_checkpoint(self.checkpoint_dir / f"step_{self.step:06d}.pt", snapshot)
            self._prune_step_files()
        return path

    def _prune_step_files(self) -> None:
        """Keep the ``keep_checkpoints`` newest step files up to this step (later ones, left by a run that
        went further before this one resumed from an earlier checkpoint, are not this run's to delete)."""
        files = _step_files(self.checkpoint_dir)
        older = sorted(step for step in files if step <= self.step)
        for step in older[: -self.config.keep_checkpoints]:
            files[step].unlink(missing_ok=True)

    def resume(self, path: str | Path, state: dict[str, Any] | None = None) -> None:
        """Continue exactly from a checkpoint of this model, configuration and data plan (``state``: what
        ``load_checkpoint(path)`` returned, if the caller read it already)."""
        state = load_checkpoint(path) if state is None else state
        check_resumable(path, state)
        theirs = state.get("meta") or {}
        if theirs.get("task", self.meta.get("task")) != self.meta.get("task"):
            raise CheckpointError(
                f"{path} is a {theirs.get('task')!r} checkpoint; this run trains a {self.meta.get('task')!r} model"
            )
        if state.get("meta") != self.meta:
            diff = _differences(theirs, self.meta)
            raise CheckpointError(
                f"{path} was written for another model or configuration: {'; '.join(diff[:8])}"
                + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            )
        config = state.get("config") or {}
        plan = state.get("data_plan") or {k: config.get(k) for k in ("batch_size", "seed")}  # older files
        ours = self.data_plan()
        diff = [f"{k} {plan[k]} (checkpoint) vs {ours[k]} (this run)" for k in plan if plan[k] != ours[k]]
        if diff or not 0 <= state["next_batch"] < self.batches_per_epoch:
            raise CheckpointError(
                f"{path}: this run's batches differ from the checkpoint's ({'; '.join(diff) or 'data position'}): "
                "an exact resume needs the same training set, batch size, seed and number of processes"
            )
        load_model_state(self.model, state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.next_batch = state["step"], state["epoch"], state["next_batch"]
        self._resumed = True
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            restore_rng(per_rank[self.dist.rank])
        else:  # a checkpoint without every rank's states: the one it has, then a per-rank reseed under DDP
            restore_rng(per_rank[0] if per_rank else state["rng"])  # files before rng_per_rank: "rng"
            if self.dist.distributed:
                _seed_everything(self.config.seed + 1_000_003 * self.step + self.dist.rank)
        self._truncate_log(self.step)

    def _final_save(self) -> Path | None:
        """``last.pt`` at the end of training, unless it was just written at this step; under DDP every
        rank returns only once it is on disk (other ranks may read it next)."""
        if self._saved_step != self.step:  # every rank tracks it: all take the same branch (a collective)
            self.save()
        if self.dist.distributed:
            dist.barrier()
        return self.checkpoint_dir / "last.pt" if self.dist.is_main else None

    # -- logging -----------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written by an interrupted run after its last checkpoint)."""
        if not self.dist.is_main or not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines()
        kept = [ln for ln in lines if (logged := _logged_step(ln)) is not None and logged <= step]
        self.log_path.write_text("".join(ln + "\n" for ln in kept))  # half-written lines are dropped too

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self._writer = False
        if self._writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])

    # -- the loop ----------------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> Iterator:
        batches = epoch_batches(
            len(self.dataset),
            self.config.batch_size,
            self.config.seed,
            epoch,
            self.dist.rank,
            self.dist.world_size,
        )
        keyed = [[(epoch, i) for i in batch] for batch in batches[start:]]
        return iter(
            DataLoader(
                _SeededItems(self.dataset, self.config.seed),
                batch_sampler=keyed,
                collate_fn=self.collate_fn,
                num_workers=self.config.num_workers,
                # its own generator: creating the iterator must not draw from the global RNG
                generator=torch.Generator().manual_seed(self.config.seed + epoch),
            )
        )

    def _all_finite(self, value: torch.Tensor) -> bool:
        finite = torch.isfinite(value.detach()).float()
        if self.dist.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def _stop(self, what: str, values: dict[str, float]) -> NonFiniteLossError:
        last = self.checkpoint_dir / "last.pt"
        return NonFiniteLossError(
            f"non-finite {what} at step {self.step + 1} (epoch {self.epoch}, batch {self.next_batch}): "
            f"{values}; training stopped before the optimizer step"
            + (f", last good checkpoint {last} left untouched" if last.exists() else "")
        )

    def train_step(self, images: Any, targets: Any) -> dict[str, float]:
        """One optimizer step; returns the logged values."""
        self.train_model.train()
        dtype = autocast_dtype(self.config.amp, self.device)
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = self.train_model(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError("in training mode the model must return a non-empty dict of losses")
        loss = sum(losses.values())
        if not self._all_finite(loss):
            raise self._stop("loss", {k: float(v.detach()) for k, v in losses.items()})
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # the total gradient norm, always: a finite loss can still give NaN/inf gradients (clipping with an
        # infinite bound only measures). With fp16 loss scaling an overflow is expected now and then: the
        # scaler skips that step and lowers its scale instead of stopping the run.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad or math.inf)
        if not self.scaler.is_enabled() and not self._all_finite(grad_norm):
            raise self._stop("gradient norm", {"grad_norm": float(grad_norm)})
        lr = self.config.lr * self._lr_factor(self.scheduler.last_epoch)  # the base rate this step used
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        record = {"lr": lr, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        record["grad_norm"] = float(grad_norm)
        stats = getattr(self.model, "training_stats", None)
        if callable(stats):
            record.update(stats())
        return record

    def train(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train until ``max_steps`` or the last epoch; returns a summary with the last checkpoint path."""
        if resume is not None:
            self.resume(resume)
        elif not self._resumed:  # per-rank streams: ranks draw different Gumbel noise / drop-path masks
            _seed_everything(self.config.seed + self.dist.rank)
        progress = None
        if self.config.progress and self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last_record: dict[str, Any] = {}
        start_time = time.perf_counter()
        while self.step < self.total_steps:  # max_steps, when given, overrides epochs
            for images, targets in self._loader(self.epoch, self.next_batch):
                record = self.train_step(move_to(images, self.device), move_to(targets, self.device))
                self.step += 1
                self.next_batch += 1
                if self.next_batch == self.batches_per_epoch:
                    self.epoch, self.next_batch = self.epoch + 1, 0
                record = {"step": self.step, "epoch": self.epoch, **record}
                record["time_s"] = round(time.perf_counter() - start_time, 3)
                last_record = record
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    self._log(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                periodic = self.step % self.config.checkpoint_every == 0
                if periodic or self.next_batch == 0:
                    self.save(keep_step=periodic)
                if self.step >= self.total_steps or self.next_batch == 0:
                    break
        if progress is not None:
            progress.close()
        path = self._final_save()
        return {"steps": self.step, "epoch": self.epoch, "last": last_record, "checkpoint": str(path)}
