"""The one timer of the benchmarks: interleaved, shuffled rounds.

Method: every configuration is first called ``warmup`` times; then each of ``rounds`` rounds calls every
configuration once, in an order shuffled by ``random.Random(seed)``, so that machine noise (other work, clock
changes, cache state) hits all configurations alike. A configuration's time is the median over rounds; a time
ratio is the median over rounds of (its time / the reference's time in the same round).
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import torch

__all__ = ["device_sync", "environment", "interleaved_rounds", "median_ratio"]

K = TypeVar("K", bound=Hashable)


def interleaved_rounds(
    runs: Mapping[K, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, list[float]]:
    """Time every configuration of ``runs`` in interleaved, shuffled rounds.

    Args:
        runs: configuration key -> a call to time (no arguments, result ignored).
        rounds: timed rounds; each calls every configuration once, in a shuffled order.
        warmup: untimed calls of each configuration before the first round.
        seed: seed of the ``random.Random`` that shuffles the order of each round.
        progress: called with ``"warm-up i/n"`` after each configuration's warm-up, ``"round r/R"`` after
            each round.
        sync: called before each clock reading (e.g. to wait for an accelerator's queued work).
        clock: seconds (``time.perf_counter`` unless a test injects another).

    Returns:
        configuration key -> milliseconds of each round, in round order.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    keys = list(runs)
    for i, key in enumerate(keys):
        for _ in range(warmup):
            runs[key]()
        if progress:
            progress(f"warm-up {i + 1}/{len(keys)}")
    times: dict[K, list[float]] = {key: [] for key in keys}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        for key in order:
            if sync:
                sync()
            start = clock()
            runs[key]()
            if sync:
                sync()
            times[key].append((clock() - start) * 1e3)
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return times


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]`` (both from the same ``interleaved_rounds`` call)."""
    if not times or len(times) != len(reference):
        raise ValueError(f"need two equally long, non-empty lists, got {len(times)} and {len(reference)}")
    return statistics.median(t / d for t, d in zip(times, reference))


def device_sync(device: str | torch.device = "cpu") -> Callable[[], None] | None:
    """The ``sync`` of :func:`interleaved_rounds` for ``device``: waits for CUDA's queued work; None on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def environment(device: str | torch.device = "cpu") -> dict:
    """The machine a benchmark ran on (``device_name``: the GPU's name on CUDA, else the processor)."""
    device = torch.device(device)
    processor = platform.processor() or platform.machine()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor,
        "processor": processor,
        "python": platform.python_version(),
    }
