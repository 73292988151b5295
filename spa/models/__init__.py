"""Models: the SPA block, the SPT backbone and its dense Swin baselines.

Importing registers the SPT variants (``spt_*``) and the dense Swin baselines (``swin_nano`` ... ``swin_base``)
with timm; ``create_backbone`` builds any of them.
"""

from spa.models.factory import (
    SPT_OPTIONS,
    create_backbone,
    dense_baseline_of,
    is_spt,
    is_spt_name,
    list_backbones,
    set_grad_checkpointing,
)
from spa.models.spa_block import SPABlock, WindowGeometry, window_geometry, window_shift
from spa.models.spt import SPT, SPAStage, SPTFeatures, create_model, list_models
from spa.models.swin_baselines import DENSE_BASELINES, SwinFeatures
from spa.models.swin_weights import LoadResult, load_swin_weights, swin_block_for

__all__ = [
    "DENSE_BASELINES",
    "SPT",
    "SPT_OPTIONS",
    "LoadResult",
    "SPABlock",
    "SPAStage",
    "SPTFeatures",
    "SwinFeatures",
    "WindowGeometry",
    "create_backbone",
    "create_model",
    "dense_baseline_of",
    "is_spt",
    "is_spt_name",
    "list_backbones",
    "list_models",
    "load_swin_weights",
    "set_grad_checkpointing",
    "swin_block_for",
    "window_geometry",
    "window_shift",
]
