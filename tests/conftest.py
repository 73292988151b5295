"""Shared test settings: 2 threads, fixed seeds, hypothesis profile for a shared, noisy CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)

settings.register_profile(
    "spa",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("spa")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
