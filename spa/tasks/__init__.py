"""Task heads on SPT and dense Swin backbones: detection / instance segmentation (and classification)."""

from spa.tasks.backbones import BACKBONES, build_body, dense_baseline_of
from spa.tasks.classification import (
    CLASSIFY_TASKS,
    ClassifierConfig,
    SPAClassifier,
    build_classifier,
    evaluate_classification,
)
from spa.tasks.detection import DETECTORS, DetectorConfig, SPADetector, build_detector

__all__ = [
    "BACKBONES",
    "CLASSIFY_TASKS",
    "DETECTORS",
    "ClassifierConfig",
    "DetectorConfig",
    "SPAClassifier",
    "SPADetector",
    "build_body",
    "build_classifier",
    "build_detector",
    "dense_baseline_of",
    "evaluate_classification",
]
