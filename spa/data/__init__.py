"""Datasets (COCO json, Pascal VOC, the built-in generated set, image folders, label lists, multi-label views),
box-aware transforms, batching, and the data specs ``spa train --data`` reads."""

from __future__ import annotations

from spa.data.builtin import BUILTIN_CLASSES, builtin_dataset, ensure_builtin, make_builtin
from spa.data.coco import CocoDetection, load_coco_json
from spa.data.collate import collate_classification, collate_detection, pad_images
from spa.data.common import DatasetError
from spa.data.folder import folder_items, image_folder
from spa.data.multilabel import BoxedMultiLabelView, MultiLabelList, MultiLabelView, check_labeled, multi_hot
from spa.data.transforms import UpdateArea, classification_transforms, detection_transforms
from spa.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "BUILTIN_CLASSES",
    "VOC_CLASSES",
    "BoxedMultiLabelView",
    "CocoDetection",
    "DatasetError",
    "MultiLabelList",
    "MultiLabelView",
    "UpdateArea",
    "VOCDetection",
    "builtin_dataset",
    "check_labeled",
    "classification_transforms",
    "collate_classification",
    "collate_detection",
    "detection_transforms",
    "ensure_builtin",
    "folder_items",
    "image_folder",
    "load_coco_json",
    "make_builtin",
    "multi_hot",
    "pad_images",
]
