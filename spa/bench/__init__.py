"""Benchmarks: ``spa bench block`` (one SPA block vs timm's Swin block, ``spa.bench.block``) and ``spa bench
backbone`` (whole SPT backbones vs their dense Swin baselines, ``spa.bench.backbone``), both timed with the
interleaved, shuffled rounds of ``spa.bench.timing``; ``spa.bench.cli`` adds them to the ``spa`` command."""

from spa.bench.backbone import REQUIRED_KEYS, SPT_KEEP_RATIOS, bench_backbone, format_backbone_table
from spa.bench.block import bench_block, format_table
from spa.bench.cli import register
from spa.bench.timing import environment, interleaved_rounds, median_ratio

__all__ = [
    "REQUIRED_KEYS",
    "SPT_KEEP_RATIOS",
    "bench_backbone",
    "bench_block",
    "environment",
    "format_backbone_table",
    "format_table",
    "interleaved_rounds",
    "median_ratio",
    "register",
]
