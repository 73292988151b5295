"""Models: the SPA block and (later) the SPT backbone."""

from spa.models.spa_block import SPABlock, WindowGeometry, window_geometry, window_shift

__all__ = ["SPABlock", "WindowGeometry", "window_geometry", "window_shift"]
