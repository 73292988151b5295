"""Benchmarks: ``spa bench block`` (one SPA block vs timm's Swin block, ``spa.bench.block``), ``spa bench
backbone`` (whole SPT backbones vs their dense Swin baselines, ``spa.bench.backbone``) and ``spa bench
detector`` (whole Faster / Mask R-CNN detectors on either, ``spa.bench.detector``), all timed with the
interleaved, shuffled rounds of ``spa.bench.timing``; ``spa.bench.cli`` adds them to the ``spa`` command."""

from spa.bench.backbone import REQUIRED_KEYS, SPT_KEEP_RATIOS, bench_backbone, format_backbone_table
from spa.bench.block import bench_block, format_table
from spa.bench.cli import register
from spa.bench.detector import (
    DETECTOR_KEEP_RATIOS,
    DETECTOR_REQUIRED_KEYS,
    DetectorHeads,
    bench_detector,
    format_detector_table,
)
from spa.bench.timing import (
    AMP_MODES,
    DEVICES,
    BenchDevice,
    device_sync,
    environment,
    interleaved_rounds,
    median_ratio,
    pass_fields,
    peak_memory,
)

__all__ = [
    "AMP_MODES",
    "DETECTOR_KEEP_RATIOS",
    "DETECTOR_REQUIRED_KEYS",
    "DEVICES",
    "REQUIRED_KEYS",
    "SPT_KEEP_RATIOS",
    "BenchDevice",
    "DetectorHeads",
    "bench_backbone",
    "bench_block",
    "bench_detector",
    "device_sync",
    "environment",
    "format_backbone_table",
    "format_detector_table",
    "format_table",
    "interleaved_rounds",
    "median_ratio",
    "pass_fields",
    "peak_memory",
    "register",
]
