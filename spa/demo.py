"""``spa demo``: the main job end to end on built-in data.

For now (until the detection demo lands) it runs a short version of the SPA block micro-benchmark and
writes ``runs/demo/block.json``; the full demo (train SPT and a dense Swin detector, evaluate, report)
replaces it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spa.bench import bench_block, environment, format_table

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("spa demo: SPA block vs timm's Swin block at stage-3 shape (16 x 14x14 tokens, C=384)", flush=True)
    records = bench_block(
        keep_ratios=(1.0, 0.5, 0.3),
        layouts=("containers", "stream", "masked"),
        rounds=args.rounds,
        progress=lambda msg: print(f"[demo] {msg}", flush=True),
    )
    print(format_table(records))
    (out / "block.json").write_text(json.dumps({"environment": environment(), "records": records}, indent=2))
    print(f"wrote {out / 'block.json'}")
    print("note: the detection demo (train, evaluate, report) is not built yet; this is the block benchmark.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa demo`` to the CLI."""
    demo = subparsers.add_parser("demo", help="main job end to end on built-in data")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(func=_run)
