"""Benchmarks: ``spa bench block`` times one SPA block against timm's dense Swin block.

Method: every configuration is warmed up, then all configurations are timed in interleaved rounds (one
call each per round, in a shuffled order), so that machine noise hits them alike. A configuration's
``ms`` is the median over rounds; ``ratio_to_dense`` is the median over rounds of its time divided by the
dense block's time in the same round. Keep ratios are forced with ``select='topk'`` (the gate's top
tokens, the same count in every image).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS

__all__ = ["bench_block", "register"]


def _timeit(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    rounds: int = 7,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time an SPA block (gate, pack, attention, FFN on kept tokens, unpack) against timm's Swin block.

    Returns one record per configuration with ``layout`` (``dense`` for timm), ``keep_ratio``, ``pass``,
    ``ms`` (median), ``ratio_to_dense``, ``padding_fraction`` and ``containers``.
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
                    select="topk", keep_ratio=ratio, layout=layout,
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
                        "containers": packed.num_containers,
                        "run": _step(block, x, backward, True),
                    }
                )
    for i, cfg in enumerate(configs):
        for _ in range(warmup):
            cfg["run"]()
        if progress:
            progress(f"warm-up {i + 1}/{len(configs)}")
    times: list[list[float]] = [[] for _ in configs]
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(range(len(configs)))
        rng.shuffle(order)
        for i in order:
            times[i].append(_timeit(configs[i]["run"]))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    dense_index = {cfg["pass"]: i for i, cfg in enumerate(configs) if cfg["layout"] == "dense"}
    records = []
    for i, cfg in enumerate(configs):
        ref = times[dense_index[cfg["pass"]]]
        ratios = [t / d for t, d in zip(times[i], ref)]
        record = {k: v for k, v in cfg.items() if k != "run"}
        record.update(
            ms=round(statistics.median(times[i]), 3),
            ratio_to_dense=round(statistics.median(ratios), 4),
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


def environment() -> dict:
    """The machine a benchmark ran on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def format_table(records: list[dict]) -> str:
    """Markdown table of ``bench_block`` records."""
    lines = [
        "| pass | layout | keep ratio | ms (median) | ratio to dense | padding | containers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['pass']} | {r['layout']} | {r['keep_ratio']:.2f} | {r['ms']:.1f} | {r['ratio_to_dense']:.3f} "
            f"| {r.get('padding_fraction', 0.0):.3f} | {r.get('containers', '')} |"
        )
    return "\n".join(lines)


def _run_block(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    records = bench_block(
        batch_size=args.batch_size,
        resolution=args.resolution,
        dim=args.dim,
        num_heads=args.heads,
        window_size=args.window,
        shift=args.shift,
        keep_ratios=tuple(float(r) for r in args.keep_ratios.split(",")),
        layouts=tuple(args.layouts.split(",")),
        rounds=args.rounds,
        progress=lambda msg: print(f"[bench block] {msg}", flush=True),
    )
    print(format_table(records))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": environment(), "records": records}, indent=2))
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa bench ...`` to the CLI."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    block = kinds.add_parser("block", help="one SPA block vs timm's dense Swin block (stage-3 shape)")
    block.add_argument("--json", help="write records to this JSON file")
    block.add_argument("--batch-size", type=int, default=16)
    block.add_argument("--resolution", type=int, default=14, help="feature map side (tokens)")
    block.add_argument("--dim", type=int, default=384)
    block.add_argument("--heads", type=int, default=12)
    block.add_argument("--window", type=int, default=7)
    block.add_argument("--shift", action="store_true", help="benchmark a shifted-window block")
    block.add_argument("--keep-ratios", default="1.0,0.5,0.3,0.2")
    block.add_argument("--layouts", default=",".join(LAYOUTS))
    block.add_argument("--rounds", type=int, default=7)
    block.add_argument("--threads", type=int, default=2)
    block.set_defaults(func=_run_block)
