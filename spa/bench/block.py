"""``spa bench block``: one SPA block against timm's Swin block.

Method: every configuration is warmed up, then all configurations are timed in interleaved rounds (one call
each per round, in a shuffled order; ``spa.bench.timing``), so that machine noise hits them alike. A
configuration's ``ms`` is the median over rounds; ``ratio_to_dense`` is the median over rounds of its time
divided by the dense block's time in the same round. Keep ratios are forced with ``select='topk'`` (the gate's
top tokens, the same count in every image).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from spa.bench.timing import interleaved_rounds, median_ratio
from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS

__all__ = ["bench_block", "format_table"]


def _step(block: nn.Module, x: torch.Tensor, backward: bool, spa: bool) -> Callable[[], None]:
    def run() -> None:
        if backward:
            block.zero_grad(set_to_none=True)
            xi = x.detach().requires_grad_(True)
            out = block(xi)
            out = out[0] if spa else out
            out.float().sum().backward()
        else:
            with torch.inference_mode():
                out = block(x)

    return run


def bench_block(
    batch_size: int = 16,
    resolution: int = 14,
    dim: int = 384,
    num_heads: int = 12,
    window_size: int = 7,
    shift: bool = False,
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2),
    layouts: tuple[str, ...] = LAYOUTS,
    backend: str = "auto",
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    rounds: int = 7,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time an SPA block (gate, pack, attention, FFN on kept tokens, unpack) against timm's Swin block.

    Returns one record per configuration with ``layout`` (``dense`` for timm), ``keep_ratio``, ``pass``,
    ``ms`` (median), ``ratio_to_dense``, ``padding_fraction``, ``containers``, ``kept_fraction`` (tokens
    actually kept: ``select='topk'`` keeps ``ceil(keep_ratio * H * W)`` per image) and the attention
    ``backend`` (SPA blocks).
    """
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(seed)
    shift_size = window_size // 2 if shift else 0
    res = (resolution, resolution)
    dense = SwinTransformerBlock(dim, res, num_heads, window_size=window_size, shift_size=shift_size)
    x = torch.randn(batch_size, resolution, resolution, dim)
    configs: list[dict] = []
    for pass_name in passes:
        backward = pass_name == "fwd+bwd"
        dense.train(backward)
        configs.append(
            {"layout": "dense", "keep_ratio": 1.0, "pass": pass_name, "run": _step(dense, x, backward, False)}
        )
        for layout in layouts:
            for ratio in keep_ratios:
                block = SPABlock(
                    dim, res, num_heads, window_size=window_size, shift_size=shift_size,
                    select="topk", keep_ratio=ratio, layout=layout, backend=backend,
                )  # fmt: skip
                block.load_state_dict(dense.state_dict(), strict=False)
                block.train(backward)
                with torch.no_grad():
                    block(x)
                packed = block.last_packed
                configs.append(
                    {
                        "layout": layout,
                        "keep_ratio": ratio,
                        "pass": pass_name,
                        "padding_fraction": round(packed.padding_fraction, 4),
                        "kept_fraction": round(packed.num_kept / (batch_size * resolution**2), 4),
                        "containers": packed.num_containers,
                        "backend": backend,
                        "run": _step(block, x, backward, True),
                    }
                )
    runs = {i: cfg["run"] for i, cfg in enumerate(configs)}
    times = interleaved_rounds(runs, rounds, warmup=warmup, seed=seed, progress=progress)
    dense_index = {cfg["pass"]: i for i, cfg in enumerate(configs) if cfg["layout"] == "dense"}
    records = []
    for i, cfg in enumerate(configs):
        record = {k: v for k, v in cfg.items() if k != "run"}
        record.update(
            ms=round(statistics.median(times[i]), 3),
            ratio_to_dense=round(median_ratio(times[i], times[dense_index[cfg["pass"]]]), 4),
            batch_size=batch_size,
            resolution=resolution,
            dim=dim,
            num_heads=num_heads,
            window_size=window_size,
            shift=shift,
            rounds=rounds,
        )
        records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    """Markdown table of ``bench_block`` records."""
    lines = [
        "| pass | layout | keep ratio | kept | ms (median) | ratio to dense | padding | containers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['pass']} | {r['layout']} | {r['keep_ratio']:.2f} | {r.get('kept_fraction', 1.0):.3f} "
            f"| {r['ms']:.1f} | {r['ratio_to_dense']:.3f} | {r.get('padding_fraction', 0.0):.3f} "
            f"| {r.get('containers', '')} |"
        )
    return "\n".join(lines)
