"""A run's configuration, defined once: ``RunConfig`` fields give the YAML keys, the ``spa train`` flags
(type, help and choices from each field) and, by field name, the task and training configs.

Precedence: built-in defaults < ``--config FILE.yaml`` < command-line flags. Optional values take
``none`` on the command line (``--clip-grad none``) and ``null`` in YAML.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union

from spa.errors import ConfigError

__all__ = [
    "PATH_FIELDS",
    "TASKS",
    "RunConfig",
    "absolute_paths",
    "add_config_flags",
    "config_from",
    "resolve_config",
]

TASKS = ("detect", "classify", "multilabel")
_DETECTION_ONLY = ("detector", "fpn_channels", "representation_size", "min_size", "max_size")
EMPTY_IMAGES = ("error", "drop", "keep")
T = TypeVar("T")


def _choices(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """Choices read from a registry when the parser is built (not when this module is imported)."""

    def get() -> tuple[str, ...]:
        import importlib

        value = getattr(importlib.import_module(module), name)
        return tuple(value() if callable(value) else value)

    return get


def _opt(default: Any, help: str, choices: Any = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything one ``spa train`` run needs (``spa train --help`` shows each field's help)."""

    task: str = _opt("detect", "what to train: a detector or a (multi-label) classifier", TASKS)
    model: str = _opt(
        "spt_nano",
        "backbone: an SPT variant or its dense Swin baseline",
        _choices("spa.models", "list_backbones"),
    )
    detector: str = _opt(
        "faster_rcnn", "detection head (--task detect)", _choices("spa.tasks.detection", "DETECTORS")
    )
    data: str = _opt("builtin", "training data spec (see below)")
    val_data: str | None = _opt(None, "evaluation data spec (default: the val split of --data)")
    data_dir: str = _opt("data/builtin", "where the plain 'builtin' spec generates its set")
    builtin_images: int = _opt(64, "training images of a generated built-in set")
    builtin_val_images: int = _opt(16, "validation images of a generated built-in set")
    coverage: float = _opt(0.2, "fraction of a generated built-in image covered by objects")
    img_size: int = _opt(256, "input side in pixels (the backbone's nominal size)")
    min_size: int | None = _opt(None, "detector resize: shorter side (default: --img-size)")
    max_size: int | None = _opt(None, "detector resize: longer side at most (default: --img-size)")
    select: str | None = _opt(
        None, "SPT token selection (default gate)", _choices("spa.gate", "SELECT_MODES")
    )
    keep_threshold: float | None = _opt(
        None, "SPT gate: keep tokens whose keep probability exceeds this (SPT default 0.3)"
    )
    keep_ratio: float | None = _opt(None, "SPT: kept fraction for --select topk/random (SPT default 0.5)")
    gate_init: float | None = _opt(
        None, "SPT gate: initial keep probability of every token (SPT default 0.5)"
    )
    layout: str | None = _opt(
        None, "SPT packing layout (default containers)", _choices("spa.packing", "LAYOUTS")
    )
    spa_stages: list[int] | None = _opt(None, "SPT: indices (0-based) of the SPA stages, e.g. 2 3 (default)")  # noqa: RUF009
    ffn: str | None = _opt(
        None,
        "SPT: FFN on kept tokens only or all (default kept)",
        _choices("spa.models.spa_block", "FFN_MODES"),
    )
    pretrained: str | None = _opt(
        None,
        "start the backbone from this file: a timm / Microsoft / mmdetection Swin checkpoint (.pth, .pt, "
        ".safetensors; the gates start fresh) or an spa checkpoint or export (its backbone, gates included)",
    )
    drop_path_rate: float = _opt(0.0, "stochastic depth rate of the backbone")
    grad_checkpointing: bool = _opt(False, "recompute backbone blocks in backward to save memory")
    fpn_channels: int = _opt(64, "FPN width (--task detect)")
    representation_size: int = _opt(256, "box head MLP width (--task detect)")
    selection_alpha: float = _opt(0.01, "weight of the selection loss")
    supervise_gate: bool = _opt(True, "supervise the gate with selection labels from boxes/masks")
    empty_images: str = _opt(
        "error",
        "classification / multi-label images without labels: refuse, drop or keep (a detector trains on "
        "images without boxes as negatives)",
        EMPTY_IMAGES,
    )
    check_data: str = _opt(
        "quick",
        "check the data before step 1: quick (annotations + image headers), full (decode all) or off",
        ("full", "quick", "off"),
    )
    bad_images: str = _opt(
        "error", "training images the check finds bad: stop, or skip them", ("error", "skip")
    )
    epochs: int = _opt(1, "epochs (--max-steps overrides)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps")
    batch_size: int = _opt(4, "images per step (per process)")
    lr: float = _opt(2e-4, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, bias tables)")
    warmup_steps: int = _opt(20, "linear warm-up steps before the cosine decay")
    clip_grad: float | None = _opt(5.0, "clip the gradient norm to this (none: no clipping)")
    gate_lr_scale: float = _opt(10.0, "learning-rate factor of the token gates")
    amp: str = _opt(
        "auto",
        "mixed precision: auto (bf16 on CUDA, off on CPU), off, bf16, fp16 (with loss scaling)",
        ("auto", "off", "bf16", "fp16"),
    )
    seed: int = _opt(0, "seed of model init, data order, augmentation and Gumbel noise")
    num_workers: int = _opt(0, "data loader worker processes")
    checkpoint_every: int = _opt(50, "write checkpoints/last.pt every this many steps")
    keep_checkpoints: int = _opt(
        0, "also keep the K most recent periodic checkpoints/step_N.pt (0: only last.pt)"
    )
    keep_optimizer: bool = _opt(False, "periodic step_N.pt files also hold the optimizer state (resumable)")
    log_every: int = _opt(1, "write a metrics.jsonl line every this many steps")
    eval_batch_size: int = _opt(4, "batch size of the evaluation after training")
    out: str = _opt("runs/train", "run folder: config.yaml, metrics.jsonl, checkpoints/, eval.json")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.empty_images not in EMPTY_IMAGES:
            raise ConfigError(f"empty_images must be 'error', 'drop' or 'keep', got {self.empty_images!r}")
        numbers = (self.img_size, self.selection_alpha, self.min_size, self.max_size)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers if v is not None):
            return  # a wrong type is reported where the value is used
        if self.img_size < 32:  # the backbone downsamples by 32
            raise ConfigError(f"img_size must be >= 32, got {self.img_size}")
        if self.selection_alpha < 0:
            raise ConfigError(f"selection_alpha must be >= 0, got {self.selection_alpha}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ConfigError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")

    def check_options(self) -> None:
        """Refuse an option that this run never reads: ``--keep-threshold`` is the gate's, ``--keep-ratio``
        is ``topk`` / ``random``'s, the detector options are ``--task detect``'s, ``--empty-images`` is the
        classifiers'. Such a run would silently train something else than asked. ``spa train`` checks this for
        new runs (stored configurations of earlier runs still load)."""
        select = self.select or "gate"
        if self.keep_threshold is not None and select != "gate":
            raise ConfigError(f"--keep-threshold is used by --select gate only; --select {select} ignores it")
        if self.keep_ratio is not None and select not in ("topk", "random"):
            raise ConfigError(
                f"--keep-ratio is used by --select topk / random only; --select {select} ignores it"
            )
        defaults = {f.name: f.default for f in fields(self)}
        only = _DETECTION_ONLY if self.task != "detect" else ("empty_images",)
        given = [name for name in only if getattr(self, name) != defaults[name]]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            owner = "detection" if self.task != "detect" else "classification / multi-label"
            raise ConfigError(f"{flags}: {owner} option(s); --task {self.task} ignores them")

    def model_kwargs(self) -> dict[str, Any]:
        """The backbone options this run sets (SPT options only when given; the factory refuses them for a
        dense baseline)."""
        kwargs: dict[str, Any] = {"drop_path_rate": self.drop_path_rate}
        for name in ("select", "keep_threshold", "keep_ratio", "gate_init", "layout", "spa_stages", "ffn"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = tuple(value) if name == "spa_stages" else value
        return kwargs

    def builtin_options(self):
        """How the plain ``builtin`` data spec generates its set."""
        from spa.data.specs import BuiltinOptions

        return BuiltinOptions(
            root=self.data_dir,
            images=self.builtin_images,
            val_images=self.builtin_val_images,
            size=self.img_size,
            coverage=self.coverage,
            seed=self.seed,
        )


PATH_FIELDS = ("data", "val_data", "data_dir", "pretrained")


def absolute_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """``values`` with the paths of ``PATH_FIELDS`` (data specs included) made absolute against ``base``."""
    from spa.data.specs import absolute_spec

    out = dict(values)
    for name in PATH_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and value:
            out[name] = (
                absolute_spec(value, base) if name in ("data", "val_data") else str((base / value).resolve())
            )
    return out


def config_from(cls: type[T], source: Any, **values: Any) -> T:
    """An instance of the dataclass ``cls``: each field from ``values``, else from ``source``'s attribute of
    the same name, else its default (no field is copied by hand)."""
    kwargs = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
    kwargs.update(values)
    return cls(**kwargs)


def resolve_config(
    config_file: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults < ``base`` (e.g. a resumed run's stored configuration; unknown keys ignored) < YAML file <
    explicit overrides (``None`` values in ``overrides`` are ignored)."""
    import yaml

    names = {f.name for f in fields(RunConfig)}
    values: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in names}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of option: value")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"config file {path}: unknown option(s) {unknown}")
        loaded = {k: _yaml_value(k, v, path) for k, v in loaded.items()}
        values.update(absolute_paths(loaded, path.resolve().parent))  # a file's paths are relative to it
    values.update({k: v for k, v in overrides.items() if k in names and v is not None})
    # "none" for an optional option; for a list option (--spa-stages none) it arrives as the only item
    values = {
        k: (None if v is NONE or (isinstance(v, list) and v == [NONE]) else v) for k, v in values.items()
    }
    return RunConfig(**values)


def _yaml_value(name: str, value: Any, path: Path) -> Any:
    """A YAML value read as the option's flag would read it, or a ``ConfigError`` naming the option.

    Numbers: PyYAML leaves ``1e-3`` a string (YAML 1.1 wants ``1.0e-3``), so number strings are read as
    numbers; booleans take what the flags take (``true`` / ``"no"`` / ``1``...); text options must be text
    and one of their choices; lists (``spa_stages``) must be lists of their item type. ``null`` (and
    ``"none"`` for an optional number, as on the command line) is accepted only where the option allows it.
    """
    kind, optional, is_list = _field_kind(typing.get_type_hints(RunConfig)[name])
    option = next(f for f in fields(RunConfig) if f.name == name)
    where = f"config file {path}: {name}"
    if value is None or (optional and _is_none_text(value)):  # as the flags take "none"
        if optional or option.default is None:
            return None
        raise ConfigError(f"{where} must be set (it has no 'none'), got null")
    if is_list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # one item, as --spa-stages 3 takes it
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, e.g. {name}: [2, 3], got {value!r}")
        return [_yaml_scalar(kind, item, where + " item") for item in value]
    choices = option.metadata.get("choices")
    choices = choices() if callable(choices) else choices
    if kind is str and isinstance(value, bool) and choices and "off" in choices:
        # YAML 1.1 reads an unquoted off / on / no / yes as a boolean: amp: off, check_data: off
        value = "off" if not value else next((c for c in ("on", "auto") if c in choices), value)
    value = _yaml_scalar(kind, value, where)
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {tuple(choices)}, got {value!r}")
    return value


def _is_none_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("none", "null")


def _yaml_scalar(kind: type, value: Any, where: str) -> Any:
    """One YAML scalar as ``kind`` (``where`` names it in the error)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                return parse_bool(str(value))
            except argparse.ArgumentTypeError:
                pass
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be text, got {value!r}")
        return value
    what = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
        if not math.isfinite(value):
            what = "a finite number"
    else:
        number = math.nan  # a bool, list or mapping
    if not math.isfinite(number) or (kind is int and not float(number).is_integer()):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return int(number) if kind is int else number


class _None:
    """The value of an optional flag given as ``none`` (kept apart from "flag not given")."""

    def __repr__(self) -> str:
        return "none"


NONE: Any = _None()


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (e.g. ``--threads``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(kind: type, optional: bool) -> Callable[[str], Any]:
    base: Callable[[str], Any] = parse_bool if kind is bool else kind

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return NONE
        try:
            return base(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from err

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def _field_kind(hint: Any) -> tuple[type, bool, bool]:
    """``(scalar type, optional, is_list)`` of a field's type hint (``int | None``, ``list[int] | None``...)."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field (default None, so that YAML values are only overridden when given)."""
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        kind, optional, is_list = _field_kind(hints[f.name])
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata["help"]
        if default is not None:
            help_text += f" (default: {default}" + ("; none: off)" if optional else ")")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_converter(kind, optional),
            nargs="+" if is_list else None,
            choices=choices,
            default=None,
            help=help_text,
            metavar=kind.__name__.upper() if choices is None else None,
        )
