"""One factory for every spa backbone: the SPT variants and their dense Swin baselines, all from timm's registry.

``create_backbone("spt_tiny", features_only=True)`` and ``create_backbone("swin_tiny", features_only=True)``
give the same feature contract: NCHW maps at strides 4/8/16/32, ``output_fmt == "NCHW"``, ``feature_info``.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from spa.models import spt, swin_baselines
from spa.models._timm import FeatureGetterNet
from spa.models.spt import SPT, SPT_OPTIONS, SPTFeatures

__all__ = [
    "SPT_OPTIONS",
    "create_backbone",
    "dense_baseline_of",
    "is_spt",
    "is_spt_name",
    "list_backbones",
    "set_grad_checkpointing",
]


def list_backbones() -> list[str]:
    """Every backbone ``create_backbone`` builds: the SPT variants, then the dense Swin baselines."""
    return spt.list_models() + swin_baselines.list_models()


def is_spt_name(name: str) -> bool:
    """Whether ``name`` is an SPT variant: its timm entrypoint is one of ``spa.models.spt``'s (False for any
    other name, known or not)."""
    return name in spt.list_models()


def is_spt(model: nn.Module) -> bool:
    """Whether ``model`` is an SPT backbone (with selections) rather than a dense one: an ``SPT``, its
    ``features_only`` wrapper (any ``FeatureGetterNet`` around an SPT), or any module exposing
    ``forward_with_selections``."""
    if isinstance(model, (SPT, SPTFeatures)):
        return True
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), SPT):
        return True
    return callable(getattr(model, "forward_with_selections", None))


def dense_baseline_of(name: str) -> str:
    """The dense Swin baseline of a backbone: ``spt_tiny`` -> ``swin_tiny``; a dense baseline is its own."""
    if name in swin_baselines.list_models():
        return name
    if is_spt_name(name):
        if name not in swin_baselines.DENSE_BASELINES:
            raise ValueError(f"no dense Swin baseline is registered for {name!r}")
        return swin_baselines.DENSE_BASELINES[name]
    raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}")


def create_backbone(name: str, *, features_only: bool = False, **kwargs: Any) -> nn.Module:
    """Build a backbone by name with ``timm.create_model(name, pretrained=False, ...)``.

    Args:
        name: an SPT variant (``spt_nano`` ... ``spt_base``) or a dense Swin baseline (``swin_nano`` ...
            ``swin_base``); ``list_backbones()`` lists them.
        features_only: the ``features_only`` wrapper (NCHW maps at ``out_indices``, default strides 4/8/16/32,
            ``output_fmt == "NCHW"``) instead of the classifier.
        kwargs: model options (``img_size``, ``num_classes``, ``global_pool``, ``drop_path_rate``, ``out_indices``,
            ...); SPT options (``SPT_OPTIONS``: ``select``, ``keep_threshold``, ``layout``, ...) for SPT only.

    Raises:
        ValueError: an unknown name, SPT options for a dense baseline, or ``pretrained=True`` (nothing is
            downloaded; load Swin weights with ``spa.load_swin_weights``).
        TypeError: an option the model does not have.
    """
    choices = list_backbones()
    if name not in choices:
        raise ValueError(f"unknown backbone {name!r}; choose from {choices}")
    if not is_spt_name(name):
        spt_only = sorted(set(kwargs) & set(SPT_OPTIONS))
        if spt_only:
            raise ValueError(f"{name} is a dense Swin baseline; SPT options {spt_only} do not apply")
    pretrained = kwargs.pop(
        "pretrained", False
    )  # True raises in the entrypoint, with the way to load weights
    return timm.create_model(name, pretrained=pretrained, features_only=features_only, **kwargs)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Turn gradient checkpointing on (or off) in every timm-style backbone inside ``model`` (an SPT, a timm
    Swin or a task model holding one): its blocks' activations are recomputed in backward instead of kept.

    Returns how many backbones were set; raises ``ValueError`` when ``model`` holds none.
    """
    backbones = [m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))]
    if not backbones:
        raise ValueError(f"{type(model).__name__} holds no backbone with gradient checkpointing")
    for backbone in backbones:
        backbone.set_grad_checkpointing(enable)
    return len(backbones)
