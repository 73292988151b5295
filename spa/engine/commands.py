"""``spa train`` and ``spa eval``: configuration (:mod:`spa.config`) -> task (:mod:`spa.tasks.base`) ->
data, model -> :class:`~spa.engine.trainer.Trainer` -> evaluation.

``spa train`` writes ``OUT/config.yaml``, checkpoints and ``OUT/eval.json``; the resolved configuration is
stored in every checkpoint, so ``spa eval`` finds the data the model was trained with.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from spa.config import TASKS, RunConfig, add_config_flags, resolve_config
from spa.engine.checkpoint import CheckpointError, load_checkpoint
from spa.engine.distributed import init_distributed
from spa.engine.trainer import TrainConfig, Trainer
from spa.gate import set_keep_threshold

__all__ = [
    "TASKS",
    "RunConfig",
    "build_datasets",
    "load_classifier",
    "load_detector",
    "register",
    "resolve_config",
    "run_training",
    "set_keep_threshold",
]


def build_datasets(cfg: RunConfig) -> tuple[Any, Any]:
    """``(train, val)`` datasets of the run's task."""
    from spa.tasks.base import get_task

    return get_task(cfg.task).datasets(cfg)


def load_detector(checkpoint: str | Path, expect: dict[str, Any] | None = None):
    """:func:`spa.tasks.base.load_model` for a detection checkpoint (kept for existing callers)."""
    from spa.tasks.base import load_model

    return load_model(checkpoint, expect, task="detect")


def load_classifier(checkpoint: str | Path, expect: dict[str, Any] | None = None):
    """:func:`spa.tasks.base.load_model` for a classification checkpoint (kept for existing callers)."""
    from spa.tasks.base import load_model

    return load_model(checkpoint, expect, task=("classify", "multilabel"))


def run_training(
    cfg: RunConfig,
    resume: str | None = None,
    evaluate: bool = True,
    progress: bool = True,
    device: str | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Train (and evaluate) one run of any task; returns ``{"summary", "eval" (main process, when
    ``evaluate``), "model"}``. Writes ``OUT/config.yaml``, checkpoints and ``OUT/eval.json``."""
    from spa.config import config_from
    from spa.models import set_grad_checkpointing
    from spa.tasks.base import checkpoint_meta, get_task

    task = get_task(cfg.task)
    dist_info = init_distributed(device)
    torch.manual_seed(cfg.seed)
    if dist_info.distributed and not dist_info.is_main:
        torch.distributed.barrier()  # rank 0 first: it may generate the built-in set, others then read it
    train_set, val_set = task.datasets(cfg)
    if dist_info.distributed and dist_info.is_main:
        torch.distributed.barrier()
    model_config = task.model_config(cfg, train_set)
    model = task.build(model_config)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model)  # a memory setting of this run, not part of the saved model
    out = Path(cfg.out)
    if dist_info.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        if log:
            print(f"[spa train] {task.describe(model_config)} on {cfg.data} -> {out}", flush=True)
    train_config = config_from(TrainConfig, cfg, out_dir=cfg.out, progress=progress)
    trainer = Trainer(
        model,
        train_set,
        task.collate,
        train_config,
        checkpoint_meta(task, model_config),
        dist_info,
        extra={"run_config": asdict(cfg)},
    )
    summary = trainer.train(resume=resume)
    result: dict[str, Any] = {"summary": summary, "model": model}
    if dist_info.is_main:
        if log:
            print(
                f"[spa train] {summary['steps']} steps done, checkpoint {summary['checkpoint']}", flush=True
            )
        if evaluate:
            metrics = task.evaluate(model, val_set, cfg.eval_batch_size, dist_info.device, progress)
            (out / "eval.json").write_text(json.dumps(metrics, indent=2))
            if log:
                print(task.format(metrics), flush=True)
            result["eval"] = metrics
    if dist_info.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _run_train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(RunConfig)}
    cfg = resolve_config(args.config, overrides)
    run_training(
        cfg, resume=args.resume, evaluate=not args.no_eval, progress=not args.quiet, device=args.device
    )
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from spa.tasks.base import get_task, load_model

    state = load_checkpoint(args.checkpoint)
    stored_task = (state.get("meta") or {}).get("task")
    if args.task is not None and stored_task != args.task:
        raise CheckpointError(
            f"{args.checkpoint} is a {stored_task!r} checkpoint, but --task {args.task} was asked for"
        )
    task_name = stored_task if stored_task in TASKS else "detect"
    task = get_task(task_name)
    expect = (
        {"model": args.model, "detector": args.detector} if task_name == "detect" else {"model": args.model}
    )
    model, state = load_model(args.checkpoint, expect=expect, task=task_name)
    if args.keep_threshold is not None:
        set_keep_threshold(model, args.keep_threshold)
    run_cfg = RunConfig(**(state.get("extra") or {}).get("run_config", {}))
    if args.data:
        run_cfg.data, run_cfg.val_data = args.data, None
    try:
        val_set = task.eval_dataset(run_cfg, model)
    except ValueError as err:
        raise CheckpointError(f"{args.checkpoint}: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = task.evaluate(model, val_set, args.batch_size, device, not args.quiet)
    result["checkpoint"] = str(args.checkpoint)
    result["keep_threshold"] = args.keep_threshold
    print(task.format(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa train`` and ``spa eval``."""
    from spa.data.specs import DATA_SPEC_HELP

    train = subparsers.add_parser(
        "train",
        help="train a detector or (multi-label) classifier (SPT or dense Swin backbone)",
        epilog=f"--data / --val-data: {DATA_SPEC_HELP}",
    )
    train.add_argument("--config", help="YAML file with RunConfig options (flags override it)")
    add_config_flags(train)
    train.add_argument("--resume", help="checkpoint to continue from (same model and configuration)")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_run_train)

    ev = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: COCO AP / top-1 / mAP, kept-token ratios, GMACs"
    )
    ev.add_argument("--checkpoint", required=True, help="a checkpoint written by spa train")
    ev.add_argument("--task", choices=TASKS, help="refuse the checkpoint unless it was trained for this task")
    ev.add_argument("--data", help="data spec (default: the validation data the checkpoint was trained with)")
    ev.add_argument("--model", help="refuse the checkpoint unless it holds this backbone")
    ev.add_argument("--detector", help="refuse the checkpoint unless it holds this detector (detect)")
    ev.add_argument("--keep-threshold", type=float, help="override the gates' inference keep threshold")
    ev.add_argument("--batch-size", type=int, default=4, help="evaluation batch size (default: 4)")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_run_eval)
