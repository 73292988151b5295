"""Task heads on SPT and dense Swin backbones: detection / instance segmentation (and classification)."""

from spa.tasks.backbones import BACKBONES, build_body, dense_baseline_of
from spa.tasks.detection import DETECTORS, DetectorConfig, SPADetector, build_detector

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "DetectorConfig",
    "SPADetector",
    "build_body",
    "build_detector",
    "dense_baseline_of",
]
