"""Task heads on SPT and dense Swin backbones: detection / instance segmentation and (multi-label)
classification; the task interface and checkpoint loader (``spa.tasks.base``), metrics, evaluation."""

from spa.tasks.backbones import BACKBONES, build_body, dense_baseline_of
from spa.tasks.base import TASKS, get_task, load_model
from spa.tasks.classification import (
    CLASSIFY_TASKS,
    ClassificationTask,
    ClassifierConfig,
    ClassifierOutput,
    SPAClassifier,
    build_classifier,
)
from spa.tasks.detection import (
    DETECTORS,
    BackboneWithFPN,
    DetectionTask,
    DetectorConfig,
    DetectorOutput,
    SPADetector,
    build_detector,
    with_selection_loss,
)
from spa.tasks.evaluation import evaluate_classification, evaluate_detection

__all__ = [
    "BACKBONES",
    "CLASSIFY_TASKS",
    "DETECTORS",
    "TASKS",
    "BackboneWithFPN",
    "ClassificationTask",
    "ClassifierConfig",
    "ClassifierOutput",
    "DetectionTask",
    "DetectorConfig",
    "DetectorOutput",
    "SPAClassifier",
    "SPADetector",
    "build_body",
    "build_classifier",
    "build_detector",
    "dense_baseline_of",
    "evaluate_classification",
    "evaluate_detection",
    "get_task",
    "load_model",
    "with_selection_loss",
]
