"""Models: the SPA block and the SPT backbone (importing registers the SPT variants with timm)."""

from spa.models.spa_block import SPABlock, WindowGeometry, window_geometry, window_shift
from spa.models.spt import SPT, SPAStage, SPTFeatures, create_model, list_models
from spa.models.swin_weights import LoadResult, load_swin_weights, swin_block_for

__all__ = [
    "SPT",
    "LoadResult",
    "SPABlock",
    "SPAStage",
    "SPTFeatures",
    "WindowGeometry",
    "create_model",
    "list_models",
    "load_swin_weights",
    "swin_block_for",
    "window_geometry",
    "window_shift",
]
