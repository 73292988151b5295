"""``spa train`` and ``spa eval``: a run's configuration (flags and/or YAML), data, model, loop, metrics.

Configuration precedence: built-in defaults < ``--config FILE.yaml`` < command-line flags. The resolved
configuration is written to ``OUT/config.yaml`` and stored in every checkpoint.

Tasks (``--task``): ``detect`` (default; Faster/Mask R-CNN), ``classify`` (single-label) and ``multilabel``.
Each task is a small ``_Task`` helper (datasets, model, collate, evaluation, checkpoint loading); the
commands dispatch on it.

Data specs: ``builtin`` (the generated set, made on first use under ``--data-dir``), ``builtin:DIR``,
``coco:ANNOTATIONS.json:IMAGES_DIR`` and ``voc:ROOT`` (``ImageSets/Main/{train,val}.txt``); for
``multilabel`` these are viewed as multi-label (boxes give the selection labels), plus ``labels:DIR``
(``classes.txt`` + ``{train,val}.txt`` lines ``IMAGE CLASS ...``, no boxes); for ``classify``
``folder:ROOT`` (``torchvision`` ``ImageFolder`` layout ``ROOT/{train,val}/CLASS/IMAGE``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from spa.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from spa.engine.distributed import init_distributed
from spa.engine.trainer import TrainConfig, Trainer

__all__ = [
    "TASKS",
    "RunConfig",
    "build_datasets",
    "load_classifier",
    "load_detector",
    "register",
    "resolve_config",
    "run_training",
]

TASKS = ("detect", "classify", "multilabel")
SPT_OPTIONS = ("select", "keep_threshold", "keep_ratio", "gate_init", "layout", "spa_stages", "ffn")


@dataclass
class RunConfig:
    """Everything one ``spa train`` run needs (see ``spa train --help`` for each field)."""

    task: str = "detect"
    model: str = "spt_nano"
    detector: str = "faster_rcnn"
    data: str = "builtin"
    val_data: str | None = None
    data_dir: str = "data/builtin"
    builtin_images: int = 64
    builtin_val_images: int = 16
    coverage: float = 0.2
    img_size: int = 256
    min_size: int | None = None
    max_size: int | None = None
    select: str | None = None
    keep_threshold: float | None = None
    keep_ratio: float | None = None
    gate_init: float | None = None
    layout: str | None = None
    spa_stages: list[int] | None = None
    ffn: str | None = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    fpn_channels: int = 64
    representation_size: int = 256
    selection_alpha: float = 0.01
    supervise_gate: bool = True
    empty_images: str = "error"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    clip_grad: float | None = 5.0
    gate_lr_scale: float = 10.0
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    eval_batch_size: int = 4
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.empty_images not in ("error", "drop", "keep"):
            raise ValueError(f"empty_images must be 'error', 'drop' or 'keep', got {self.empty_images!r}")

    def train_config(self, progress: bool = True) -> TrainConfig:
        return TrainConfig(
            out_dir=self.out,
            epochs=self.epochs,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            clip_grad=self.clip_grad,
            gate_lr_scale=self.gate_lr_scale,
            seed=self.seed,
            num_workers=self.num_workers,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            progress=progress,
        )

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"drop_path_rate": self.drop_path_rate}
        for name in SPT_OPTIONS:
            value = getattr(self, name)
            if value is not None:
                if not self.model.startswith("spt_"):
                    raise ValueError(
                        f"--{name.replace('_', '-')} is an SPT option; {self.model} is a dense baseline"
                    )
                kwargs[name] = tuple(value) if name == "spa_stages" else value
        return kwargs


def resolve_config(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults < YAML file < explicit overrides (``None`` values in ``overrides`` are ignored)."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(RunConfig)}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"cannot parse config file {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of option: value")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"config file {path}: unknown option(s) {unknown}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    return RunConfig(**values)


# -- data ------------------------------------------------------------------------------------------


def _open_data(spec: str, split: str, cfg: RunConfig, transforms: Any) -> Any:
    from spa.data import CocoDetection, VOCDetection, builtin_dataset, ensure_builtin

    kind, _, rest = spec.partition(":")
    if kind == "builtin":
        root = rest or cfg.data_dir
        if not rest:
            ensure_builtin(
                root,
                images=cfg.builtin_images,
                val_images=cfg.builtin_val_images,
                size=cfg.img_size,
                coverage=cfg.coverage,
                seed=cfg.seed,
            )
        elif not (Path(root) / split / "annotations.json").is_file():
            raise FileNotFoundError(
                f"{root} is not a built-in set (no {split}/annotations.json); make it with spa data make"
            )
        return builtin_dataset(root, split, transforms=transforms)
    if kind == "coco":
        ann, _, images = rest.partition(":")
        if not ann or not images:
            raise ValueError(f"coco data spec must be coco:ANNOTATIONS.json:IMAGES_DIR, got {spec!r}")
        return CocoDetection(images, ann, transforms=transforms)
    if kind == "voc":
        if not rest:
            raise ValueError(f"voc data spec must be voc:ROOT, got {spec!r}")
        return VOCDetection(rest, image_set=split, transforms=transforms)
    raise ValueError(
        f"unknown data spec {spec!r}: use builtin, builtin:DIR, coco:ANN.json:IMAGES or voc:ROOT"
    )


def build_datasets(cfg: RunConfig) -> tuple[Any, Any]:
    """``(train, val)`` datasets of the run's task (see :func:`_detection_datasets`,
    :func:`_classification_datasets`)."""
    return _task(cfg.task).datasets(cfg)


def _detection_datasets(cfg: RunConfig) -> tuple[Any, Any]:
    """``(train, val)``: train with box-aware augmentation, val untransformed (evaluated at full size)."""
    from spa.data import detection_transforms

    train = _open_data(cfg.data, "train", cfg, detection_transforms(train=True, size=cfg.img_size))
    return train, _detection_val_data(cfg)


def _detection_val_data(cfg: RunConfig) -> Any:
    """The evaluation set alone (``spa eval`` does not need a training split)."""
    if cfg.val_data is None and cfg.data.startswith("coco:"):
        warnings.warn(
            f"{cfg.data} has no split: evaluating on the training annotations (pass --val-data for a "
            "held-out set)",
            stacklevel=3,
        )
    return _open_data(cfg.val_data or cfg.data, "val", cfg, None)


def _classification_data(spec: str, split: str, cfg: RunConfig, classes: list[str] | None = None) -> Any:
    from spa.tasks.classification import (
        BoxedMultiLabelView,
        MultiLabelList,
        check_labeled,
        classification_transforms,
        folder_items,
    )

    train = split == "train"
    kind, _, rest = spec.partition(":")
    if kind == "folder":
        if cfg.task != "classify":
            raise ValueError(f"folder data ({spec}) is single-label: use --task classify")
        if not rest:
            raise ValueError(f"folder data spec must be folder:ROOT, got {spec!r}")
        return folder_items(rest, split, classification_transforms(train, cfg.img_size), classes)
    if cfg.task != "multilabel":
        raise ValueError(
            f"{kind} data has a set of classes per image: use --task multilabel (--task classify takes folder:ROOT)"
        )
    if kind == "labels":
        if not rest:
            raise ValueError(f"label-list data spec must be labels:DIR, got {spec!r}")
        data = MultiLabelList(rest, split, classification_transforms(train, cfg.img_size, boxes=True))
    else:
        detection = _open_data(spec, split, cfg, None)
        data = BoxedMultiLabelView(detection, classification_transforms(train, cfg.img_size, boxes=True))
        data = check_labeled(data, f"{spec} ({split})", cfg.empty_images)
    if classes is not None and list(data.class_names) != list(classes):
        unknown = sorted(set(data.class_names) - set(classes))
        raise ValueError(
            f"{spec} ({split}) has classes {list(data.class_names)}, but the model was trained for {list(classes)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return data


def _classification_datasets(cfg: RunConfig, classes: list[str] | None = None) -> tuple[Any, Any]:
    """``(train, val)`` for ``classify`` / ``multilabel``: square ``img_size`` images, boxes follow."""
    train = _classification_data(cfg.data, "train", cfg, classes)
    val = _classification_data(cfg.val_data or cfg.data, "val", cfg, list(train.class_names))
    return train, val


# -- model -----------------------------------------------------------------------------------------


def detector_config(cfg: RunConfig, num_classes: int):
    from spa.tasks.detection import DetectorConfig

    return DetectorConfig(
        model=cfg.model,
        detector=cfg.detector,
        num_classes=num_classes,
        img_size=cfg.img_size,
        min_size=cfg.min_size or cfg.img_size,
        max_size=cfg.max_size or cfg.img_size,
        fpn_channels=cfg.fpn_channels,
        representation_size=cfg.representation_size,
        selection_alpha=cfg.selection_alpha,
        supervise_gate=cfg.supervise_gate,
        model_kwargs=cfg.model_kwargs(),
    )


def _meta(detector_cfg) -> dict[str, Any]:
    config = detector_cfg.to_dict()
    config["model_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in config["model_kwargs"].items()
    }
    return {"task": "detect", "detector": config}


def load_detector(checkpoint: str | Path, expect: dict[str, Any] | None = None):
    """Rebuild the detector a checkpoint was trained as and load its weights (all or nothing).

    ``expect`` (e.g. ``{"model": "spt_tiny"}``) must agree with the checkpoint's configuration.
    """
    from spa.tasks.detection import DetectorConfig, build_detector

    state = load_checkpoint(checkpoint)
    meta = state.get("meta") or {}
    if meta.get("task") != "detect" or "detector" not in meta:
        raise CheckpointError(f"{checkpoint} is not a detection checkpoint (task {meta.get('task')!r})")
    stored = dict(meta["detector"])
    for key, value in (expect or {}).items():
        if value is not None and stored.get(key) != value:
            raise CheckpointError(
                f"{checkpoint} holds a {stored.get('model')} / {stored.get('detector')} model with "
                f"{key}={stored.get(key)!r}, but {key}={value!r} was asked for"
            )
    model = build_detector(DetectorConfig(**stored))
    load_model_state(model, state["model"], source=str(checkpoint))
    return model, state


def set_keep_threshold(model: torch.nn.Module, threshold: float) -> int:
    """Set the inference keep threshold of every token gate; returns how many gates were changed."""
    from spa.gate import TokenGate

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"keep threshold must be in (0, 1), got {threshold}")
    gates = [m for m in model.modules() if isinstance(m, TokenGate)]
    for gate in gates:
        gate.keep_threshold = threshold
    return len(gates)


def classifier_config(cfg: RunConfig, class_names: list[str]):
    from spa.tasks.classification import ClassifierConfig

    return ClassifierConfig(
        model=cfg.model,
        task=cfg.task,
        num_classes=len(class_names),
        img_size=cfg.img_size,
        selection_alpha=cfg.selection_alpha,
        supervise_gate=cfg.supervise_gate,
        class_names=list(class_names),
        model_kwargs=cfg.model_kwargs(),
    )


def load_classifier(checkpoint: str | Path, expect: dict[str, Any] | None = None):
    """Rebuild the classifier a checkpoint was trained as and load its weights (all or nothing)."""
    from spa.tasks.classification import CLASSIFY_TASKS, ClassifierConfig, build_classifier

    state = load_checkpoint(checkpoint)
    meta = state.get("meta") or {}
    if meta.get("task") not in CLASSIFY_TASKS or "classifier" not in meta:
        raise CheckpointError(f"{checkpoint} is not a classification checkpoint (task {meta.get('task')!r})")
    stored = dict(meta["classifier"])
    for key, value in (expect or {}).items():
        if value is not None and stored.get(key) != value:
            raise CheckpointError(
                f"{checkpoint} holds a {stored.get('task')} {stored.get('model')} model with "
                f"{key}={stored.get(key)!r}, but {key}={value!r} was asked for"
            )
    model = build_classifier(ClassifierConfig(**stored))
    load_model_state(model, state["model"], source=str(checkpoint))
    return model, state


class _Task:
    """What a task needs from the commands: data, model + checkpoint meta, batching, evaluation, loading."""

    name = ""

    def datasets(self, cfg: RunConfig) -> tuple[Any, Any]:
        raise NotImplementedError

    def model(self, cfg: RunConfig, train_set: Any) -> tuple[torch.nn.Module, dict[str, Any], str]:
        """``(model, checkpoint meta, description)``."""
        raise NotImplementedError

    collate: Any = None

    def evaluate(self, model, dataset, batch_size: int, device, progress: bool) -> dict[str, Any]:
        raise NotImplementedError

    def format(self, result: dict[str, Any]) -> str:
        raise NotImplementedError

    def load(self, checkpoint: str, args: argparse.Namespace):
        raise NotImplementedError

    def eval_datasets(self, model, run_cfg: RunConfig, checkpoint: str) -> Any:
        raise NotImplementedError


class _DetectTask(_Task):
    name = "detect"

    def datasets(self, cfg):
        return _detection_datasets(cfg)

    def model(self, cfg, train_set):
        from spa.tasks.detection import build_detector

        det_cfg = detector_config(cfg, train_set.num_classes)
        return build_detector(det_cfg), _meta(det_cfg), f"{cfg.model} + {cfg.detector}"

    @property
    def collate(self):
        from spa.data import collate_detection

        return collate_detection

    def evaluate(self, model, dataset, batch_size, device, progress):
        from spa.tasks.evaluation import evaluate_detection

        return evaluate_detection(model, dataset, batch_size=batch_size, device=device, progress=progress)

    def format(self, result):
        from spa.tasks.evaluation import format_metrics

        return format_metrics(result)

    def load(self, checkpoint, args):
        return load_detector(checkpoint, expect={"model": args.model, "detector": args.detector})

    def eval_datasets(self, model, run_cfg, checkpoint):
        val_set = _detection_val_data(run_cfg)
        trained_classes = model.config.num_classes
        if val_set.num_classes != trained_classes:
            raise CheckpointError(
                f"{checkpoint} was trained for {trained_classes} classes but {run_cfg.val_data or run_cfg.data} "
                f"has {val_set.num_classes}"
            )
        return val_set


class _ClassifyTask(_Task):
    def __init__(self, name: str) -> None:
        self.name = name

    def datasets(self, cfg):
        return _classification_datasets(cfg)

    def model(self, cfg, train_set):
        from spa.tasks.classification import build_classifier

        cls_cfg = classifier_config(cfg, list(train_set.class_names))
        meta = {"task": cfg.task, "classifier": cls_cfg.to_dict()}
        return build_classifier(cls_cfg), meta, f"{cfg.model} {cfg.task} ({cls_cfg.num_classes} classes)"

    @property
    def collate(self):
        from spa.tasks.classification import collate_classification

        return collate_classification

    def evaluate(self, model, dataset, batch_size, device, progress):
        from spa.tasks.classification import evaluate_classification

        return evaluate_classification(
            model, dataset, batch_size=batch_size, device=device, progress=progress
        )

    def format(self, result):
        from spa.tasks.classification import format_classification_metrics

        return format_classification_metrics(result)

    def load(self, checkpoint, args):
        return load_classifier(checkpoint, expect={"model": args.model, "task": args.task})

    def eval_datasets(self, model, run_cfg, checkpoint):
        classes = list(model.config.class_names)
        val_spec = run_cfg.val_data or run_cfg.data
        try:
            return _classification_data(val_spec, "val", run_cfg, classes or None)
        except ValueError as err:
            raise CheckpointError(f"{checkpoint}: {err}") from err


_TASKS: dict[str, _Task] = {
    "detect": _DetectTask(),
    "classify": _ClassifyTask("classify"),
    "multilabel": _ClassifyTask("multilabel"),
}


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    return _TASKS[name]


# -- commands --------------------------------------------------------------------------------------


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
    task = _task(cfg.task)
    dist_info = init_distributed(device)
    torch.manual_seed(cfg.seed)
    if dist_info.distributed and not dist_info.is_main:
        torch.distributed.barrier()  # rank 0 first: it may generate the built-in set, others then read it
    train_set, val_set = task.datasets(cfg)
    if dist_info.distributed and dist_info.is_main:
        torch.distributed.barrier()
    model, meta, description = task.model(cfg, train_set)
    if cfg.grad_checkpointing:
        from spa.tasks.backbones import set_grad_checkpointing

        set_grad_checkpointing(model)  # a memory setting of this run, not part of the saved model
    out = Path(cfg.out)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        if log:
            print(f"[spa train] {description} on {cfg.data} -> {out}", flush=True)
    trainer = Trainer(
        model,
        train_set,
        task.collate,
        cfg.train_config(progress=progress),
        meta,
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
    state = load_checkpoint(args.checkpoint)
    stored_task = (state.get("meta") or {}).get("task")
    if args.task is not None and stored_task != args.task:
        raise CheckpointError(
            f"{args.checkpoint} is a {stored_task!r} checkpoint, but --task {args.task} was asked for"
        )
    task = _task(stored_task if stored_task in TASKS else "detect")
    model, state = task.load(args.checkpoint, args)
    if args.keep_threshold is not None:
        set_keep_threshold(model, args.keep_threshold)
    run_cfg = RunConfig(**(state.get("extra") or {}).get("run_config", {}))
    if args.data:
        run_cfg.data, run_cfg.val_data = args.data, None
    val_set = task.eval_datasets(model, run_cfg, args.checkpoint)
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


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(annotation: str) -> Any:
    if "bool" in annotation:
        return _parse_bool
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return str


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field, default None so that YAML values are only overridden when given."""
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "task":
            p.add_argument(flag, choices=TASKS, default=None, help="detect (default), classify or multilabel")
        elif f.name == "spa_stages":
            p.add_argument(
                flag, type=int, nargs="+", default=None, help="SPA stage indices (0-based), e.g. 2 3"
            )
        else:
            p.add_argument(flag, type=_flag_type(str(f.type)), default=None, help=f"(default: {f.default})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa train`` and ``spa eval``."""
    train = subparsers.add_parser(
        "train", help="train a detector or (multi-label) classifier (SPT or dense Swin backbone)"
    )
    train.add_argument("--config", help="YAML file with RunConfig options (flags override it)")
    _add_run_options(train)
    train.add_argument("--resume", help="checkpoint to continue from (same model and configuration)")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_run_train)

    ev = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: COCO AP / top-1 / mAP, kept-token ratios, GMACs"
    )
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--task", choices=TASKS, help="refuse the checkpoint unless it was trained for this task")
    ev.add_argument("--data", help="data spec (default: the validation data the checkpoint was trained with)")
    ev.add_argument("--model", help="refuse the checkpoint unless it holds this backbone")
    ev.add_argument("--detector", help="refuse the checkpoint unless it holds this detector (detect)")
    ev.add_argument("--keep-threshold", type=float, help="override the gates' inference keep threshold")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument("--device", default=None)
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_run_eval)
