"""Feature extractors for the task heads: SPT variants and their dense Swin baselines (timm).

A dense baseline has the SPT's width and Swin's depths (no extra stage-3 blocks), e.g. ``spt_tiny``
(2-2-10-2) vs ``swin_tiny`` (timm's ``swin_tiny_patch4_window7_224``, 2-2-6-2).
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

import spa.models.spt  # noqa: F401  (registers the SPT variants with timm)
from spa.models.spt import create_model as create_spt

__all__ = ["BACKBONES", "build_body", "dense_baseline_of", "set_grad_checkpointing"]

# Dense Swin baselines: timm model name and overrides (same width as the SPT, Swin depths).
SWIN_BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_nano": (
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    ),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small": ("swin_small_patch4_window7_224", {}),
    "swin_base": ("swin_base_patch4_window7_224", {}),
}
SPT_MODELS = ("spt_nano", "spt_tiny", "spt_small", "spt_base")
BACKBONES = SPT_MODELS + tuple(SWIN_BASELINES)


def dense_baseline_of(name: str) -> str:
    """The dense Swin baseline of an SPT variant (``spt_tiny`` -> ``swin_tiny``)."""
    if name not in SPT_MODELS:
        raise ValueError(f"{name!r} is not an SPT variant; choose from {SPT_MODELS}")
    return name.replace("spt_", "swin_")


def build_body(name: str, img_size: int | tuple[int, int], **kwargs: Any) -> nn.Module:
    """A ``features_only`` backbone with maps at strides 4/8/16/32 (timm's Swin gives NHWC, SPT NCHW:
    check ``output_fmt``).

    SPT options (``select``, ``keep_threshold``, ``layout``, ...) go to SPT; the dense baselines accept
    ``drop_path_rate`` only.
    """
    if name in SPT_MODELS:
        return create_spt(name, features_only=True, img_size=img_size, **kwargs)
    if name in SWIN_BASELINES:
        unknown = set(kwargs) - {"drop_path_rate"}
        if unknown:
            raise ValueError(f"{name} is a dense Swin baseline; SPT options {sorted(unknown)} do not apply")
        timm_name, overrides = SWIN_BASELINES[name]
        return timm.create_model(
            timm_name,
            pretrained=False,
            features_only=True,
            img_size=img_size,
            dynamic_img_size=True,  # any input size (masks built per forward)
            **overrides,
            **kwargs,
        )
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")


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
