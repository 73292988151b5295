"""``spa train`` and ``spa eval``: configuration (:mod:`spa.config`) -> task (:mod:`spa.tasks.base`) ->
data, model -> :class:`~spa.engine.trainer.Trainer` -> evaluation.

``spa train`` writes ``OUT/config.yaml``, checkpoints and ``OUT/eval.json``; the resolved configuration is
stored in every checkpoint, so ``spa eval`` finds the data the model was trained with.
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from spa.config import TASKS, RunConfig, add_config_flags, resolve_config
from spa.engine.checkpoint import (
    CheckpointError,
    check_output_file,
    check_resumable,
    load_checkpoint,
    write_json,
)
from spa.engine.distributed import check_device, init_distributed
from spa.engine.trainer import TrainConfig, Trainer
from spa.errors import SpaError, SpaWarning
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


class RunFolderError(SpaError, ValueError):
    """A run folder that already holds another run (``--resume`` or ``--overwrite`` decide)."""


RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.json", "pretrained.json", "checkpoints", "tb")
_CHECKPOINT_FILE = re.compile(r"(last|step_\d+)\.pt|\.(last|step_\d+)\.pt\..*\.tmp")  # and spa's temp files


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run of ``spa train`` (the ``config.yaml`` every run writes first)."""
    return (folder / "config.yaml").is_file()


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """``RUN`` for a checkpoint ``RUN/checkpoints/last.pt`` (or ``step_N.pt``) of a run folder, else None."""
    path = Path(checkpoint).resolve()
    if path.parent.name != "checkpoints" or not _CHECKPOINT_FILE.fullmatch(path.name):
        return None
    run = path.parent.parent
    return run if is_run_folder(run) else None


def check_run_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``, or resuming into a run folder (nothing is removed)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a run folder")
    if resume is not None and out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        raise RunFolderError(
            f"--out {out} holds other files and no run (no config.yaml): a resume continues in its run folder "
            "or an empty one"
        )
    if resume is not None or overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    last = out / "checkpoints" / "last.pt"
    hint = f"--resume {last} to continue it, " if last.is_file() else ""
    raise RunFolderError(
        f"{out} is not empty (an earlier run?): pass {hint}--overwrite to start over in it, or another --out"
    )


def clear_run_folder(out: Path) -> None:
    """``--overwrite``: remove the earlier run's files from ``out``, only those spa writes (``RUN_FILES``; in
    ``checkpoints/`` only ``last.pt``, ``step_N.pt`` and their temporary files, so that a user's own files
    there stay). Called once the new run's configuration, data and model have been checked."""
    import shutil

    for name in RUN_FILES:
        target = out / name
        for tmp in out.glob(f".{name}.*.tmp"):  # a write that was cut off (atomic_write's temporary file)
            tmp.unlink()
        if name == "checkpoints" and target.is_dir():
            for path in target.iterdir():
                if path.is_file() and _CHECKPOINT_FILE.fullmatch(path.name):
                    path.unlink()
            if not any(target.iterdir()):
                target.rmdir()
        elif target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# what a resumed run may change: how long it runs, its I/O and its evaluation; everything else sets the training
# trajectory and must match the checkpoint's run
RESUME_MAY_CHANGE = frozenset(
    {
        "out", "epochs", "max_steps", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints",
        "keep_optimizer", "eval_batch_size", "check_data", "val_data", "pretrained", "grad_checkpointing",
    }
)  # fmt: skip
_DATA_PATHS = ("data", "data_dir")  # where the data is: may move (warned; the data plan is still checked)
_BUILTIN_OPTIONS = (
    "data_dir",
    "builtin_images",
    "builtin_val_images",
    "coverage",
)  # what plain builtin makes


def stored_run_config(state: dict[str, Any]) -> dict[str, Any] | None:
    """The ``RunConfig`` values a checkpoint of ``spa train`` stored (None for other checkpoints)."""
    stored = (state.get("extra") or {}).get("run_config")
    return dict(stored) if isinstance(stored, dict) else None


def _spt_defaults() -> dict[str, Any]:
    """What an unset (None) SPT option of ``RunConfig`` means: the ``SPT`` constructor's default."""
    import inspect

    from spa.models.spt import SPT

    params = inspect.signature(SPT.__init__).parameters
    names = ("select", "keep_threshold", "keep_ratio", "gate_init", "layout", "ffn", "spa_stages")
    return {n: (list(v) if isinstance(v := params[n].default, tuple) else v) for n in names}


def check_resume_config(path: str | Path, stored: dict[str, Any] | None, cfg: RunConfig) -> None:
    """Refuse a resume whose configuration differs from the checkpoint's run in anything but
    ``RESUME_MAY_CHANGE`` (data, model, optimiser and schedule settings), naming each difference. Unset SPT
    options equal their defaults; the built-in set's options count only for the plain ``builtin`` spec; a
    data path that changed (the same kind of spec) is a warning, since the data plan is still checked."""
    if stored is None:  # not written by spa train: the trainer's model and data-plan checks still apply
        return
    ours, defaults = asdict(cfg), _spt_defaults()

    def effective(name: str, value: Any) -> Any:
        return defaults[name] if value is None and name in defaults else value

    skip = set(RESUME_MAY_CHANGE)
    if stored.get("data") != "builtin" and ours["data"] != "builtin":
        skip |= set(_BUILTIN_OPTIONS)
    moved = []
    for name in _DATA_PATHS:
        theirs, mine = str(stored.get(name)), str(ours[name])
        if name in stored and theirs != mine and theirs.partition(":")[0] == mine.partition(":")[0]:
            moved.append(f"--{name.replace('_', '-')} {theirs} -> {mine}")
            skip.add(name)
    diff = [
        f"--{name.replace('_', '-')} {stored[name]!r} (checkpoint) vs {ours[name]!r} (this run)"
        for name in ours
        if name in stored
        and name not in skip
        and effective(name, stored[name]) != effective(name, ours[name])
    ]
    if diff:
        raise CheckpointError(
            f"{path} was trained with other settings: {'; '.join(diff)}. A resumed run continues the stored "
            "configuration: leave these out (flags or --config), or start a new run"
        )
    if moved:
        warnings.warn(
            f"resuming on data at another path ({'; '.join(moved)}): only its size and batches are checked "
            "against the checkpoint's run",
            SpaWarning,
            stacklevel=2,
        )


def check_run_data(cfg: RunConfig, train_set: Any, val_set: Any, log: bool) -> Any:
    """``--check-data`` before step 1: every problem of both splits at once (``DatasetError``), or, with
    ``--bad-images skip``, the training set without its bad items (evaluation data must be clean)."""
    from spa.data import DatasetError
    from spa.data.check import SkipItems, check_dataset

    if cfg.check_data == "off":
        return train_set
    train = check_dataset(train_set, cfg.check_data, f"{cfg.data} (train)")
    val = check_dataset(val_set, cfg.check_data, f"{cfg.val_data or cfg.data} (val)")
    if val.problems or (train.problems and cfg.bad_images == "error"):
        found = [r.summary() for r in (train, val) if r.problems]
        hint = "; --bad-images skip trains without the bad training images" if train.problems else ""
        raise DatasetError("\n".join(found) + f"\n(found by --check-data {cfg.check_data}{hint})")
    if train.problems:
        if log:
            print(
                f"[spa train] skipping {len(train.problems)} bad training images:\n{train.summary()}",
                flush=True,
            )
        return SkipItems(train_set, train.bad_indices)
    return train_set


def dataset_classes(dataset: Any) -> dict[str, Any]:
    """Class names and (detection) the dataset's category id of each label, kept with the checkpoints so
    that predictions use the dataset's own ids."""
    names = [str(n) for n in getattr(dataset, "class_names", [])]
    mapping = getattr(dataset, "label_to_cat_id", None) or {i: i for i in range(1, len(names) + 1)}
    return {"names": names, "label_to_cat_id": {int(k): int(v) for k, v in mapping.items()}}


def run_training(
    cfg: RunConfig,
    resume: str | None = None,
    evaluate: bool = True,
    progress: bool = True,
    device: str | None = None,
    log: bool = True,
    overwrite: bool = False,
    resume_state: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train (and evaluate) one run of any task; returns ``{"summary", "eval" (main process, when
    ``evaluate``), "model", "pretrained" (the load report, if any)}``. Writes ``OUT/config.yaml``,
    checkpoints and ``OUT/eval.json``. ``resume_state``: ``[load_checkpoint(resume)]``, if the caller has
    already read it (it is not read again). The list is emptied: a state passed as a plain argument would stay
    referenced by the caller's frame for the whole run on some Pythons (3.10), and its tensors with it.

    Paths in ``cfg`` (data specs, ``data_dir``, ``pretrained``) are made absolute first, so the stored
    configuration opens from any folder. A ``--pretrained`` file is read and checked before any data is
    opened; the model's initialisation is seeded by ``cfg.seed`` (two identical runs give identical losses).
    """
    from spa.config import absolute_paths, config_from
    from spa.engine.pretrained import load_pretrained, read_pretrained
    from spa.models import set_grad_checkpointing
    from spa.tasks.base import checkpoint_meta, get_task

    cfg = RunConfig(**absolute_paths(asdict(cfg), Path.cwd()))
    task = get_task(cfg.task)
    out = Path(cfg.out)
    dist_info = init_distributed(device)
    # refused now, on every rank (read-only; a refusal on rank 0 alone would leave the others at a barrier); an
    # --overwrite clears the folder only once the run is checked
    check_run_folder(out, resume, overwrite)
    state = None  # a resumed run's checkpoint, read once: checked here, loaded by the trainer
    resumed_pretrained = None  # a resumed run takes its weights from its checkpoint, not from --pretrained
    if resume is None:
        cfg.check_options()
    else:  # before any data is read
        state = resume_state.pop() if resume_state else load_checkpoint(resume)
        check_resumable(resume, state)
        stored = stored_run_config(state)
        check_resume_config(resume, stored, cfg)
        resumed_pretrained = (state.get("extra") or {}).get("pretrained")
        if stored is not None:  # what the run started from, not a file this resume would ignore
            if cfg.pretrained and cfg.pretrained != stored.get("pretrained"):
                warnings.warn(
                    f"--pretrained {cfg.pretrained} is not read on resume: the weights come from {resume} "
                    f"(the run started from {stored.get('pretrained') or 'a random init'})",
                    SpaWarning,
                    stacklevel=2,
                )
            cfg.pretrained = stored.get("pretrained")
            for name in _spt_defaults():  # checked equal above: the stored spelling (None or the default)
                if name in stored:
                    setattr(cfg, name, stored[name])
    pretrained = read_pretrained(cfg.pretrained) if cfg.pretrained and resume is None else None
    if dist_info.distributed and not dist_info.is_main:
        torch.distributed.barrier()  # rank 0 first: it may generate the built-in set, others then read it
    train_set, val_set = task.datasets(cfg)
    if dist_info.distributed and dist_info.is_main:
        torch.distributed.barrier()
    if len(train_set) == 0 or (evaluate and len(val_set) == 0):
        from spa.data import DatasetError

        split, spec = (
            ("training", cfg.data) if len(train_set) == 0 else ("validation", cfg.val_data or cfg.data)
        )
        raise DatasetError(
            f"the {split} set of {spec} is empty"
            + (" (--no-eval skips the evaluation)" if split == "validation" else "")
        )
    train_set = check_run_data(cfg, train_set, val_set, log and dist_info.is_main)
    model_config = task.model_config(cfg, train_set)
    torch.manual_seed(cfg.seed)
    model = task.build(model_config)
    report = load_pretrained(model, cfg.pretrained, pretrained) if pretrained else None
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model)  # a memory setting of this run, not part of the saved model
    extra: dict[str, Any] = {"run_config": asdict(cfg), "classes": dataset_classes(train_set)}
    if report is not None:
        extra["pretrained"] = report.to_dict()
    elif resumed_pretrained is not None:  # what the run started from, carried on in its new checkpoints
        extra["pretrained"] = resumed_pretrained
    train_config = config_from(TrainConfig, cfg, out_dir=cfg.out, progress=progress)  # checks its values
    trainer = Trainer(
        model,
        train_set,
        task.collate,
        train_config,
        checkpoint_meta(task, model_config),
        dist_info,
        extra=extra,
    )
    if resume is not None:
        trainer.resume(resume, state)  # every check first: a refused resume leaves the run folder as it was
        del state  # nothing holds the checkpoint's tensors through training
    if dist_info.is_main:
        import yaml

        if overwrite and resume is None and out.is_dir():
            clear_run_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        if report is not None:
            write_json(out / "pretrained.json", report.to_dict())
        if log:
            what = f"resumed at step {trainer.step}" if resume is not None else "->"
            print(f"[spa train] {task.describe(model_config)} on {cfg.data} {what} {out}", flush=True)
            if report is not None:
                print(f"[spa train] {report.summary()}", flush=True)
    summary = trainer.train()
    result: dict[str, Any] = {"summary": summary, "model": model, "pretrained": report}
    if dist_info.is_main:
        if log:
            print(
                f"[spa train] {summary['steps']} steps done, checkpoint {summary['checkpoint']}", flush=True
            )
        if evaluate:
            metrics = task.evaluate(model, val_set, cfg.eval_batch_size, dist_info.device, progress)
            write_json(out / "eval.json", metrics)
            if log:
                print(task.format(metrics), flush=True)
            result["eval"] = metrics
    if dist_info.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _yaml_sets(config_file: str | None, name: str) -> bool:
    """Whether the YAML file ``config_file`` (if any, and readable) sets option ``name``."""
    if not config_file or not Path(config_file).is_file():
        return False
    import yaml

    try:
        loaded = yaml.safe_load(Path(config_file).read_text())
    except yaml.YAMLError:
        return False  # resolve_config reports it
    return isinstance(loaded, dict) and name in loaded


def _run_train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(RunConfig)}
    base = None
    read: list[dict[str, Any]] = []  # the checkpoint, read once; handed over to run_training, not kept here
    if args.resume is not None:  # the stored configuration, under the YAML file and the flags given
        read.append(load_checkpoint(args.resume))
        base = stored_run_config(read[0]) or {}
        base.pop("out", None)  # stored as given (maybe relative to another folder): never trusted
        run = run_folder_of(args.resume)
        if run is not None:  # continue in the run folder the checkpoint is in
            base["out"] = str(run)
        elif args.out is None and not _yaml_sets(args.config, "out"):
            raise RunFolderError(
                f"{args.resume} is not RUN/checkpoints/last.pt (or step_N.pt) of a run folder: pass --out RUN, "
                "the folder to continue the run in"
            )
    cfg = resolve_config(args.config, overrides, base=base)
    run_training(
        cfg,
        resume=args.resume,
        evaluate=not args.no_eval,
        progress=not args.quiet,
        device=args.device,
        overwrite=args.overwrite,
        resume_state=read,  # emptied there
    )
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from spa.config import absolute_paths
    from spa.data.specs import DATA_SPEC_HELP, absolute_spec
    from spa.tasks.base import get_task, load_model

    device = check_device(args.device)
    check_output_file(args.out, "--out")  # before the evaluation, not after it
    check_output_file(args.predictions, "--predictions")
    state = load_checkpoint(args.checkpoint)
    stored_task = (state.get("meta") or {}).get("task")
    if args.task is not None and stored_task != args.task:
        raise CheckpointError(
            f"{args.checkpoint} is a {stored_task!r} checkpoint, but --task {args.task} was asked for"
        )
    task_name = stored_task if stored_task in TASKS else "detect"
    task = get_task(task_name)
    if args.predictions and task_name != "detect":
        raise CheckpointError(
            f"--predictions writes COCO detections; {args.checkpoint} is a {stored_task!r} checkpoint"
        )
    expect = (
        {"model": args.model, "detector": args.detector} if task_name == "detect" else {"model": args.model}
    )
    model, state = load_model(args.checkpoint, expect=expect, task=task_name)
    if args.keep_threshold is not None and not set_keep_threshold(model, args.keep_threshold):
        raise CheckpointError(
            f"--keep-threshold: {args.checkpoint} holds a dense model (no token gate to set)"
        )
    if args.compile:
        from spa.compile import compile_model

        compile_model(model)
    stored = (state.get("extra") or {}).get("run_config")
    if stored is None and not args.data:  # never fall back to generating the built-in set
        raise CheckpointError(
            f"{args.checkpoint} does not record its data: pass --data SPEC ({DATA_SPEC_HELP})"
        )
    run_cfg = RunConfig(**absolute_paths(stored or {"task": task_name}, Path.cwd()))
    if args.data:
        run_cfg.data, run_cfg.val_data = absolute_spec(args.data, Path.cwd()), None
    try:
        val_set = task.eval_dataset(run_cfg, model)
        names = ((state.get("extra") or {}).get("classes") or {}).get("names")
        if task_name == "detect" and names and getattr(val_set, "class_names", None):
            from spa.data.specs import check_classes

            check_classes(val_set, names, run_cfg.val_data or run_cfg.data)  # labels are matched by name
    except ValueError as err:  # about the data given, or about the data the checkpoint records
        raise CheckpointError(f"{'--data ' + args.data if args.data else args.checkpoint}: {err}") from err
    if args.predictions:  # the same pass, with the COCO results it scored
        from spa.predict import coco_records
        from spa.tasks.evaluation import evaluate_detection

        result = evaluate_detection(
            model, val_set, args.batch_size, device, progress=not args.quiet, return_results=True
        )
        scored = result.pop("results")
        records = coco_records(scored["bbox"], scored["segm"])
        print(f"wrote {write_json(args.predictions, records, indent=None)} ({len(records)} detections)")
    else:
        result = task.evaluate(model, val_set, args.batch_size, device, not args.quiet)
    result["checkpoint"] = str(args.checkpoint)
    result["keep_threshold"] = args.keep_threshold
    print(task.format(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa train`` and ``spa eval``."""
    from spa.data.specs import DATA_SPEC_HELP

    train = subparsers.add_parser(
        "train",
        help="train a detector or (multi-label) classifier (SPT or dense Swin backbone)",
        epilog=f"--data / --val-data: {DATA_SPEC_HELP}",
    )
    train.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of run options, keyed by the flag names with underscores (img_size: 128, "
        "spa_stages: [2, 3]); its data paths are relative to it; flags override it",
    )
    add_config_flags(train)
    train.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue the run of CKPT (e.g. RUN/checkpoints/last.pt) with its stored configuration, in its run "
        "folder (elsewhere: give --out); flags may change only how long it runs (--max-steps, --epochs), its "
        "logging and evaluation, and where the data is",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --out (removes the earlier run's files)",
    )
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_run_train)

    ev = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: COCO AP / top-1 / mAP, kept-token ratios, GMACs"
    )
    ev.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint written by spa train, or its spa export (.safetensors)",
    )
    ev.add_argument("--task", choices=TASKS, help="refuse the checkpoint unless it was trained for this task")
    ev.add_argument("--data", help="data spec (default: the validation data the checkpoint was trained with)")
    ev.add_argument("--model", help="refuse the checkpoint unless it holds this backbone")
    ev.add_argument("--detector", help="refuse the checkpoint unless it holds this detector (detect)")
    ev.add_argument("--keep-threshold", type=float, help="override the gates' inference keep threshold")
    ev.add_argument("--batch-size", type=int, default=4, help="evaluation batch size (default: 4)")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument(
        "--predictions",
        metavar="FILE",
        help="detect: also write the evaluated set's detections here, as COCO results (pycocotools loadRes)",
    )
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument(
        "--compile",
        action="store_true",
        help="run the backbone's blocks through spa.compile_model (torch.compile: slow start, faster batches)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_run_eval)
