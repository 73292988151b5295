"""COCO and VOC datasets: targets, masks (polygon / RLE), crowd, image modes, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from spa.data import (
    CocoDetection,
    DatasetError,
    MultiLabelView,
    VOCDetection,
    collate_detection,
    multi_hot,
    pad_images,
)
from spa.errors import SpaWarning
from spa.labels import batch_selection_labels, box_grid
from spa.tasks.evaluation import coco_ground_truth, coco_metrics


def _write_image(path: Path, size=(40, 60), mode="RGB") -> None:
    h, w = size
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    if mode == "L":
        im = Image.fromarray(arr[..., 0], "L")
    elif mode == "RGBA":
        arr[..., 3] = 255
        im = Image.fromarray(arr, "RGBA")
    else:
        im = Image.fromarray(arr[..., :3], "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _coco(tmp_path: Path, anns: list[dict], images=None, cats=None, modes=None) -> tuple[Path, dict]:
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 40},
    ]
    cats = cats or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    for k, im in enumerate(images):
        _write_image(tmp_path / im["file_name"], (im["height"], im["width"]), (modes or ["RGB"] * 9)[k])
    data = {"images": images, "annotations": anns, "categories": cats}
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, data


def _ann(i, image_id=1, cat=3, bbox=(10, 5, 20, 10), **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "iscrowd": 0, **kw}


def test_coco_targets_labels_and_mapping(tmp_path):
    poly = [[10, 5, 30, 5, 30, 15, 10, 15]]  # the box itself as a polygon
    ann_file, _ = _coco(tmp_path, [_ann(1, segmentation=poly), _ann(2, cat=7, bbox=(0, 0, 5, 5))])
    ds = CocoDetection(tmp_path, ann_file)
    assert len(ds) == 2 and ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert ds.cat_id_to_label == {3: 1, 7: 2} and ds.label_to_cat_id == {1: 3, 2: 7}
    image, target = ds[0]
    assert (
        image.shape == (3, 40, 60) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    )
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 5, 5]]
    assert target["labels"].tolist() == [1, 2] and target["image_id"] == 1
    assert target["masks"].shape == (2, 40, 60) and target["masks"].dtype == torch.uint8
    # polygon mask lies inside its box; the annotation without segmentation gets its box as mask
    m0 = target["masks"][0].bool()
    assert m0[5:15, 10:30].float().mean() > 0.9 and not m0[:5].any() and not m0[:, 31:].any()
    assert target["masks"][1].sum() == 25
    _, empty = ds[1]
    assert (
        empty["boxes"].shape == (0, 4)
        and empty["labels"].shape == (0,)
        and empty["masks"].shape == (0, 40, 60)
    )
    assert batch_selection_labels([empty], (40, 60), 16).sum() == 0
    assert len(CocoDetection(tmp_path, ann_file, remove_empty=True)) == 1


def test_coco_rle_masks_compressed_and_uncompressed(tmp_path):
    m = np.zeros((40, 60), dtype=np.uint8)
    m[20:30, 40:55] = 1
    m[22, 41] = 0
    rle = mask_utils.encode(np.asfortranarray(m))
    compressed = {"size": [40, 60], "counts": rle["counts"].decode("ascii")}
    # uncompressed RLE: run lengths in column-major order, starting with zeros
    flat = m.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    uncompressed = {"size": [40, 60], "counts": runs}
    anns = [
        _ann(1, bbox=(40, 20, 15, 10), segmentation=compressed),
        _ann(2, bbox=(40, 20, 15, 10), segmentation=uncompressed),
    ]
    ann_file, _ = _coco(tmp_path, anns)
    _, t = CocoDetection(tmp_path, ann_file)[0]
    assert torch.equal(t["masks"][0], torch.from_numpy(m)) and torch.equal(t["masks"][1], torch.from_numpy(m))


def test_compressed_rle_runs_match_pycocotools():
    from spa.data.coco import _compressed_rle_counts

    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 5), (40, 60), (300, 7)):
        for density in (0.0, 0.02, 0.5, 1.0):
            m = (rng.random(shape) < density).astype(np.uint8)
            flat = m.flatten(order="F")
            change = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
            runs = runs if flat[0] == 0 else [0, *runs]
            counts = mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")
            assert _compressed_rle_counts(counts) == runs


def test_coco_evaluation_fills_optional_annotation_fields(tmp_path):
    """Annotations without iscrowd / area / id (or with id 0) load, and evaluate like complete ones."""
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10]},
        {"id": 0, "image_id": 1, "category_id": 7, "bbox": [40, 20, 10, 10]},
    ]
    ann_file, _ = _coco(tmp_path, anns)
    gt, _ = coco_ground_truth(CocoDetection(tmp_path, ann_file))
    assert sorted(gt.getAnnIds()) == [1, 2]  # fresh ids, none of them 0
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "score": 0.9},
        {"image_id": 1, "category_id": 7, "bbox": [40, 20, 10, 10], "score": 0.8},
    ]
    assert coco_metrics(gt, results)["AP50"] == pytest.approx(1.0)


def test_coco_crowd_excluded_by_default_and_marked_when_included(tmp_path):
    anns = [_ann(1), _ann(2, bbox=(0, 0, 50, 30), iscrowd=1)]
    ann_file, _ = _coco(tmp_path, anns)
    _, t = CocoDetection(tmp_path, ann_file)[0]
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]
    _, t = CocoDetection(tmp_path, ann_file, include_crowd=True)[0]
    assert t["iscrowd"].tolist() == [0, 1] and len(t["boxes"]) == 2
    ds = CocoDetection(tmp_path, ann_file)
    assert ds.stats["crowd"] == 1 and len(ds.coco.getAnnIds()) == 2  # evaluation still sees the crowd


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(tmp_path, mode):
    ann_file, _ = _coco(tmp_path, [_ann(1)], modes=[mode, mode])
    image, _ = CocoDetection(tmp_path, ann_file)[0]
    assert image.shape == (3, 40, 60)
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_16_bit_images_keep_their_brightness(tmp_path):
    """Scaled by the 16-bit full scale (65535, as torchvision), not by each image's own maximum."""
    from spa.data.common import load_rgb

    for value, expected in ((32768, 128), (1000, 4)):
        path = tmp_path / f"{value}.png"
        Image.fromarray(np.full((4, 5), value, dtype=np.uint16)).save(path)
        image = load_rgb(path, "test")
        assert image.shape == (3, 4, 5) and torch.all(image == expected / 255.0)


def test_degenerate_boxes_dropped_with_warning_and_count(tmp_path):
    anns = [
        _ann(1),
        _ann(2, bbox=(10, 5, -4, 10)),  # x2 < x1
        _ann(3, bbox=(10, 5, 0, 10)),  # zero width
        _ann(4, bbox=(70, 50, 5, 5)),  # entirely outside the 60x40 image
        _ann(5, bbox=(50, 30, 20, 20)),  # partly outside: clipped
    ]
    ann_file, _ = _coco(tmp_path, anns)
    with pytest.warns(SpaWarning, match=r"ann\.json: dropped degenerate boxes .*: 3 \(ann 2, ann 3, ann 4\)"):
        ds = CocoDetection(tmp_path, ann_file)
    assert ds.stats["dropped_degenerate"] == 3 and ds.stats["clipped"] == 1
    _, t = ds[0]
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [50, 30, 60, 40]]
    with pytest.raises(DatasetError, match=r"ann\.json: annotations\[1\] \(id 2\): degenerate"):
        CocoDetection(tmp_path, ann_file, bad_boxes="error")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["annotations"].append(_ann(9, cat=99)),
            r"annotations\[1\] \(id 9\): unknown category_id 99",
        ),
        (
            lambda d: d["annotations"].append(_ann(9, image_id=42)),
            r"annotations\[1\] \(id 9\): unknown image_id 42",
        ),
        (
            lambda d: d["annotations"].append(_ann(9, bbox=(1, 2, 3))),
            r"annotations\[1\] \(id 9\): bbox must be",
        ),
        (
            lambda d: d["annotations"].append(_ann(9, bbox=(1, 2, float("nan"), 3))),
            r"\(id 9\): non-finite bbox",
        ),
        (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] \(id 1\): missing field"),
        (lambda d: d.pop("categories"), "missing or non-list top-level key 'categories'"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"images\[2\]: duplicate image id 1"),
        (
            lambda d: d["annotations"].append(_ann(9, segmentation={"size": [1, 1], "counts": "x"})),
            "RLE size",
        ),
        (  # runs that cover 110 of the 2400 pixels: pycocotools would decode uninitialised memory
            lambda d: d["annotations"].append(_ann(9, segmentation={"size": [40, 60], "counts": [100, 10]})),
            r"\(id 9\): RLE runs must be >= 0 and cover the 40x60 image",
        ),
        (
            lambda d: d["annotations"].append(_ann(9, segmentation={"size": [40, 60], "counts": "PP1"})),
            r"\(id 9\): RLE runs must be >= 0 and cover",
        ),
        (
            lambda d: d["annotations"].append(_ann(9, segmentation={"size": [4, 6], "counts": [24]})),
            r"\(id 9\): RLE size \[4, 6\] differs",
        ),
        (
            lambda d: d["annotations"].append(_ann(1, bbox=(1, 2, 3, 4))),
            r"\(id 1\): duplicate annotation id 1",
        ),
    ],
)
def test_bad_annotations_name_file_and_entry(tmp_path, mutate, match):
    ann_file, data = _coco(tmp_path, [_ann(1)])
    mutate(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match) as info:
        CocoDetection(tmp_path, ann_file)[0]
    assert str(ann_file) in str(info.value)


def test_corrupt_and_truncated_json(tmp_path):
    ann_file, data = _coco(tmp_path, [_ann(1)])
    text = json.dumps(data)
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"ann\.json: corrupt or truncated annotation JSON.*line 1"):
        CocoDetection(tmp_path, ann_file)
    ann_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"ann\.json"):
        CocoDetection(tmp_path, ann_file)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_missing_unreadable_and_wrong_size_images(tmp_path):
    ann_file, _ = _coco(tmp_path, [_ann(1)])
    ds = CocoDetection(tmp_path, ann_file)
    (tmp_path / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.png: image file missing \(image id 1 of .*ann\.json\)"):
        ds[0]
    (tmp_path / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"a\.png: unreadable image \(image id 1"):
        ds[0]
    _write_image(tmp_path / "a.png", (40, 61))
    with pytest.raises(DatasetError, match=r"a\.png: image is 40x61 .* say 40x60"):
        ds[0]
    _write_image(tmp_path / "a.png", (40, 60))
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(raw[: len(raw) // 2])  # truncated file
    with pytest.raises(DatasetError, match="unreadable image"):
        ds[0]


def test_multilabel_view_and_collate(tmp_path):
    anns = [_ann(1), _ann(2), _ann(3, image_id=2, cat=7), _ann(4, image_id=2, cat=3, iscrowd=1)]
    ann_file, _ = _coco(tmp_path, anns)
    ds = CocoDetection(tmp_path, ann_file)
    view = MultiLabelView(ds)
    assert view.targets().tolist() == [[1.0, 0.0], [0.0, 1.0]]  # the crowd 'cat' does not count
    image, y = view[1]
    assert image.shape == (3, 40, 60) and y.tolist() == [0.0, 1.0]
    assert multi_hot([0, 2, 2], 3).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="labels must be"):
        multi_hot([4], 3)
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["image_id"] == 2
    batch = pad_images([torch.ones(3, 40, 60), torch.ones(3, 20, 70)], size_divisible=32)
    assert batch.shape == (2, 3, 64, 96) and batch[1, :, 20:].sum() == 0 and batch[1, :, :20, :70].min() == 1


def _voc(tmp_path: Path, objects: str, size=True) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    _write_image(root / "JPEGImages" / "x1.jpg", (40, 60))
    size_xml = "<size><width>60</width><height>40</height><depth>3</depth></size>" if size else ""
    (root / "Annotations" / "x1.xml").write_text(
        f"<annotation><filename>x1.jpg</filename>{size_xml}{objects}</annotation>"
    )
    (root / "ImageSets" / "Main" / "train.txt").write_text("x1\n")
    return root


def _obj(name, box, difficult=0):
    b = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{b}</bndbox></object>"


def test_voc_boxes_labels_and_difficult(tmp_path):
    root = _voc(tmp_path, _obj("dog", (1, 1, 10, 20)) + _obj("cat", (5, 5, 80, 30), difficult=1))
    ds = VOCDetection(root, "train")
    image, t = ds[0]
    assert image.shape == (3, 40, 60) and ds.num_classes == 20
    assert t["boxes"].tolist() == [[0, 0, 10, 20]]  # 1-based inclusive -> continuous xyxy
    assert t["labels"].tolist() == [1 + ds.class_names.index("dog")]
    _, t = VOCDetection(root, "train", include_difficult=True)[0]
    assert t["iscrowd"].tolist() == [0, 1] and t["boxes"][1].tolist() == [4, 4, 60, 30]  # clipped
    assert box_grid(t["boxes"], (40, 60), 16).sum() == 8


def test_voc_evaluation_ignores_difficult_objects(tmp_path):
    """A detection of a difficult object is neither a hit nor a false positive (VOC's rule)."""
    root = _voc(tmp_path, _obj("dog", (2, 2, 20, 20)) + _obj("dog", (32, 12, 60, 40), difficult=1))
    ds = VOCDetection(root, "train")  # difficult objects out of the targets (the default)
    gt, _ = coco_ground_truth(ds)
    dog = 1 + ds.class_names.index("dog")
    results = [
        {"image_id": 0, "category_id": dog, "bbox": [31, 11, 29, 29], "score": 0.9},  # the difficult one
        {"image_id": 0, "category_id": dog, "bbox": [1, 1, 19, 19], "score": 0.8},
    ]
    assert coco_metrics(gt, results)["AP50"] == pytest.approx(1.0)
    assert not ds.include_difficult and ds[0][1]["boxes"].shape == (1, 4)  # the dataset itself unchanged


def test_voc_bad_input(tmp_path):
    root = _voc(tmp_path, _obj("unicorn", (1, 1, 10, 10)))
    with pytest.raises(DatasetError, match=r"x1\.xml: object 0: unknown class name 'unicorn'"):
        VOCDetection(root, "train")[0]
    (root / "Annotations" / "x1.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"x1\.xml: corrupt or truncated"):
        VOCDetection(root, "train")[0]
    (root / "Annotations" / "x1.xml").write_text(f"<annotation>{_obj('dog', (10, 1, 5, 10))}</annotation>")
    with pytest.warns(SpaWarning, match=r"x1\.xml: dropped degenerate boxes: 1 \(object 0\)"):
        _, t = VOCDetection(root, "train")[0]
    assert t["boxes"].shape == (0, 4)
    with pytest.raises(DatasetError, match="degenerate"):
        VOCDetection(root, "train", bad_boxes="error")[0]
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        VOCDetection(root, "val")
    (root / "Annotations" / "x1.xml").write_text(
        f"<annotation>{_obj('dog', (1, 1, 10, 10), difficult='yes')}</annotation>"
    )
    with pytest.raises(DatasetError, match=r"x1\.xml: object 0: <difficult> must be 0 or 1, got 'yes'"):
        VOCDetection(root, "train")[0]
    (root / "Annotations" / "x1.xml").write_text(
        f"<annotation>{_obj('dog', (1, 1, 10, 10), difficult='1.0')}</annotation>"
    )
    assert VOCDetection(root, "train", include_difficult=True)[0][1]["iscrowd"].tolist() == [1]
