"""Deprecated: the backbone factory lives in ``spa.models`` (``create_backbone``, ``list_backbones``,
``dense_baseline_of``, ``is_spt``, ``set_grad_checkpointing``).

Kept as thin aliases. ``SWIN_BASELINES`` is the former description of the dense baselines (timm model name and
overrides); ``timm.create_model(name, ...)`` of a registered baseline (``spa.models.swin_baselines``) builds the
same module.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from spa.models import spt, swin_baselines
from spa.models.factory import create_backbone, dense_baseline_of, set_grad_checkpointing

__all__ = [
    "BACKBONES",
    "SPT_MODELS",
    "SWIN_BASELINES",
    "build_body",
    "dense_baseline_of",
    "set_grad_checkpointing",
]

# Deprecated: timm model name and overrides of each dense baseline (same width as the SPT, Swin depths).
SWIN_BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_nano": (
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    ),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small": ("swin_small_patch4_window7_224", {}),
    "swin_base": ("swin_base_patch4_window7_224", {}),
}
# Deprecated: ``spa.models.list_models()`` / ``spa.models.list_backbones()``.
SPT_MODELS: tuple[str, ...] = tuple(spt.list_models())
BACKBONES: tuple[str, ...] = SPT_MODELS + tuple(swin_baselines.list_models())


def build_body(name: str, img_size: int | tuple[int, int], **kwargs: Any) -> nn.Module:
    """Deprecated: ``spa.models.create_backbone(name, features_only=True, img_size=img_size, **kwargs)``."""
    warnings.warn(
        "spa.tasks.backbones.build_body is deprecated; use "
        "spa.models.create_backbone(name, features_only=True, img_size=img_size, ...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return create_backbone(name, features_only=True, img_size=img_size, **kwargs)
