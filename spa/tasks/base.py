"""The task interface the commands use, the registry of tasks, and the one checkpoint-to-model loader.

A task (``detect``, ``classify``, ``multilabel``) is an object with:

- ``name`` and ``meta_key`` (where its model config sits in a checkpoint's ``meta``);
- ``datasets(run_config) -> (train, val)`` and ``eval_dataset(run_config, model=None)``;
- ``model_config(run_config, train_set)``, ``build(model_config)``, ``config_from_meta(dict)``,
  ``describe(model_config)``;
- ``collate`` (batches for the Trainer), ``evaluate(model, dataset, batch_size, device, progress)`` and
  ``format(result)``.

Each lives in its task module (:class:`spa.tasks.detection.DetectionTask`,
:class:`spa.tasks.classification.ClassificationTask`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from spa.tasks.classification import ClassificationTask
from spa.tasks.detection import DetectionTask

__all__ = ["TASKS", "Task", "checkpoint_meta", "get_task", "load_model"]


class Task(Protocol):
    name: str
    meta_key: str

    def datasets(self, cfg: Any) -> tuple[Any, Any]: ...
    def eval_dataset(self, cfg: Any, model: nn.Module | None = None) -> Any: ...
    def model_config(self, cfg: Any, train_set: Any) -> Any: ...
    def build(self, config: Any) -> nn.Module: ...
    def config_from_meta(self, stored: dict[str, Any]) -> Any: ...
    def describe(self, config: Any) -> str: ...
    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: Any, progress: bool
    ) -> dict: ...
    def format(self, result: dict[str, Any]) -> str: ...


TASKS: dict[str, Task] = {
    "detect": DetectionTask(),
    "classify": ClassificationTask("classify"),
    "multilabel": ClassificationTask("multilabel"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def checkpoint_meta(task: Task, config: Any) -> dict[str, Any]:
    """What a checkpoint stores to rebuild (and to refuse resuming into another) model."""
    return {"task": task.name, task.meta_key: config.to_dict()}


def load_model(
    checkpoint: str | Path, expect: dict[str, Any] | None = None, task: str | tuple[str, ...] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, of any task, and load its weights (all or nothing).

    ``checkpoint`` is a ``.pt`` checkpoint of ``spa train`` or a ``.safetensors`` file of ``spa export``
    (read by :func:`spa.engine.checkpoint.load_checkpoint`; an export's state is ``{"model", "meta",
    "extra", ...}``).
    ``task`` (a name or a tuple of names, if given) must include the checkpoint's task; ``expect`` (e.g. ``{"model": "spt_tiny"}``) must agree
    with its stored model configuration (``None`` values are ignored). Returns ``(model, checkpoint state)``.
    """
    from spa.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state

    state = load_checkpoint(checkpoint)
    meta = state.get("meta") or {}
    stored_task = meta.get("task")
    allowed = (task,) if isinstance(task, str) else task
    if allowed is not None and stored_task not in allowed:
        what = (
            "detection"
            if allowed == ("detect",)
            else "classification"
            if "detect" not in allowed
            else "/".join(allowed)
        )
        raise CheckpointError(f"{checkpoint} is not a {what} checkpoint (task {stored_task!r})")
    if stored_task not in TASKS or TASKS[stored_task].meta_key not in meta:
        raise CheckpointError(f"{checkpoint} is not an spa model checkpoint (task {stored_task!r})")
    owner = TASKS[stored_task]
    stored = dict(meta[owner.meta_key])
    for key, value in (expect or {}).items():
        if value is not None and stored.get(key) != value:
            raise CheckpointError(
                f"{checkpoint} holds a {stored_task} {stored.get('model')} model with "
                f"{key}={stored.get(key)!r}, but {key}={value!r} was asked for"
            )
    model = owner.build(owner.config_from_meta(stored))
    load_model_state(model, state["model"], source=str(checkpoint))
    return model, state
