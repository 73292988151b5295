"""Datasets (COCO json, Pascal VOC, the built-in generated set), box-aware transforms, batching."""

from __future__ import annotations

from spa.data.builtin import BUILTIN_CLASSES, builtin_dataset, ensure_builtin, make_builtin
from spa.data.coco import CocoDetection, load_coco_json
from spa.data.collate import collate_detection, pad_images
from spa.data.common import DatasetError
from spa.data.multilabel import MultiLabelView, multi_hot
from spa.data.transforms import UpdateArea, detection_transforms
from spa.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "BUILTIN_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "DatasetError",
    "MultiLabelView",
    "UpdateArea",
    "VOCDetection",
    "builtin_dataset",
    "collate_detection",
    "detection_transforms",
    "ensure_builtin",
    "load_coco_json",
    "make_builtin",
    "multi_hot",
    "pad_images",
]
