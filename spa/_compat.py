"""Shims for the oldest dependency versions ``pyproject.toml`` allows (``make test-min`` runs the suite on them).

Import the names from here, not from the dependency, where a version inside the allowed range lacks them:

- ``calculate_drop_path_rates``: in ``timm.layers`` since timm 1.0.21; the same function for older timm.
"""

from __future__ import annotations

import torch

__all__ = ["calculate_drop_path_rates"]

try:
    from timm.layers import calculate_drop_path_rates
except ImportError:  # timm < 1.0.21

    def calculate_drop_path_rates(
        drop_path_rate: float, depths: int | list[int], stagewise: bool = False
    ) -> list[float] | list[list[float]]:
        """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over all blocks (timm >= 1.0.21's
        ``timm.layers.calculate_drop_path_rates``): ``depths`` an int -> one rate per block; a list of stage depths
        with ``stagewise=True`` -> one list of rates per stage, with ``stagewise=False`` -> one flat list."""
        if isinstance(depths, int):
            if stagewise:
                raise ValueError("stagewise=True requires depths to be a list of stage depths")
            return [x.item() for x in torch.linspace(0, drop_path_rate, depths, device="cpu")]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu")
        if stagewise:
            return [x.tolist() for x in rates.split(list(depths))]
        return [x.item() for x in rates]
