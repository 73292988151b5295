"""Bootstrap intervals of COCO AP over images (``spa.tasks.metrics.bootstrap_ap``): a hand-computed case, and
resamples with repeated images equal pycocotools on a set in which each repeat is a copy with its own id."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from spa.tasks.metrics import (
    ap_of_images,
    bootstrap_ap,
    bootstrap_indices,
    coco_metrics,
    coco_metrics_with_bootstrap,
    percentile_interval,
    prepare_bootstrap,
)


def _coco(images: list[list[tuple[int, list[float]]]]) -> COCO:
    """A ground truth: ``images[i]`` is a list of ``(category, xywh)`` of image id ``i + 1``."""
    anns = [
        {"id": 0, "image_id": i + 1, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for i, objects in enumerate(images)
        for c, box in objects
    ]
    for k, a in enumerate(anns):
        a["id"] = k + 1
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i + 1, "width": 100, "height": 100} for i in range(len(images))],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _det(image_id: int, category: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score}


def test_hand_computed_two_images():
    # image 1: a perfect detection (score 0.9); image 2: its only detection misses (score 0.8)
    gt = _coco([[(1, [10, 10, 20, 20])], [(1, [50, 50, 20, 20])]])
    dets = [_det(1, 1, [10, 10, 20, 20], 0.9), _det(2, 1, [0, 0, 10, 10], 0.8)]
    # sorted: TP, FP; recall 0.5 then 0.5, precision 1 then 0.5: recall thresholds 0.00..0.50 get precision 1
    expected = 51 / 101
    prepared = prepare_bootstrap(gt, dets)
    assert ap_of_images(prepared, [0, 1]) == pytest.approx((expected, expected))
    assert ap_of_images(prepared, [0, 0]) == pytest.approx((1.0, 1.0))
    assert ap_of_images(prepared, [1, 1]) == pytest.approx((0.0, 0.0))
    metrics = coco_metrics(gt, [dict(d) for d in dets])
    assert metrics["AP"] == pytest.approx(expected) and metrics["AP50"] == pytest.approx(expected)
    result = bootstrap_ap(gt, dets, resamples=300, seed=1)
    assert result["AP"] == pytest.approx(expected)
    lo, hi = result["ci95"]["AP"]
    assert 0.0 <= lo <= expected <= hi <= 1.0 and lo < hi  # resamples reach both [1, 1] (0) and [0, 0] (1)
    assert set(np.round(result["samples"]["AP"], 6)) <= {0.0, round(expected, 6), 1.0}
    assert len(result["samples"]["AP50"]) == 300 and result["images"] == 2


def _random_case(rng: np.random.Generator, n_images: int):
    images, dets = [], []
    for i in range(n_images):
        objects = []
        for _ in range(int(rng.integers(0, 4))):
            x, y, s = (float(v) for v in rng.uniform(0, 60, 3))
            objects.append((int(rng.integers(1, 3)), [x, y, 10 + s / 2, 10 + s / 3]))
        images.append(objects)
        for c, (x, y, w, h) in objects:  # a jittered hit (IoU varies), sometimes with the wrong class
            jitter = rng.normal(0, 3, 4)
            dets.append(_det(i + 1, c if rng.random() < 0.8 else 3 - c, [x + jitter[0], y + jitter[1],
                             max(1, w + jitter[2]), max(1, h + jitter[3])], float(rng.random())))  # fmt: skip
        for _ in range(int(rng.integers(0, 3))):  # false positives
            dets.append(_det(i + 1, int(rng.integers(1, 3)), [*rng.uniform(0, 80, 2).tolist(), 8.0, 8.0],
                             float(rng.random())))  # fmt: skip
    return images, dets


def test_resample_with_repeats_equals_pycocotools_on_copies():
    rng = np.random.default_rng(0)
    images, dets = _random_case(rng, 12)
    gt = _coco(images)
    prepared = prepare_bootstrap(gt, dets)
    full = coco_metrics(gt, [dict(d) for d in dets])
    assert ap_of_images(prepared, range(12)) == pytest.approx((full["AP"], full["AP50"]), abs=1e-12)
    for indices in ([0, 0, 3, 5, 5, 5, 11], sorted(rng.integers(0, 12, 12).tolist())):
        copies = _coco([images[i] for i in indices])  # image k of the copy set is images[indices[k]]
        copied = [
            {**d, "image_id": k + 1} for k, i in enumerate(indices) for d in dets if d["image_id"] == i + 1
        ]
        want = coco_metrics(copies, copied)
        assert ap_of_images(prepared, indices) == pytest.approx((want["AP"], want["AP50"]), abs=1e-12)


def test_bootstrap_is_seeded_and_empty_results_give_zeros():
    images, dets = _random_case(np.random.default_rng(3), 20)
    gt = _coco(images)
    a, b = bootstrap_ap(gt, dets, resamples=50, seed=7), bootstrap_ap(gt, dets, resamples=50, seed=7)
    assert a["samples"] == b["samples"] and a["ci95"] == b["ci95"]
    for key in ("AP", "AP50"):
        lo, hi = a["ci95"][key]
        assert lo <= a[key] <= hi
    assert bootstrap_ap(gt, dets, resamples=50, seed=8)["samples"] != a["samples"]
    empty = bootstrap_ap(gt, [], resamples=5)
    assert empty["AP"] == 0.0 and empty["ci95"]["AP50"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ap(gt, dets, resamples=0)


def test_metrics_with_bootstrap_equal_the_two_calls():
    images, dets = _random_case(np.random.default_rng(5), 15)
    gt = _coco(images)
    metrics, boot = coco_metrics_with_bootstrap(gt, dets, resamples=40, seed=2)
    assert metrics == coco_metrics(gt, [dict(d) for d in dets])
    assert boot == bootstrap_ap(gt, dets, resamples=40, seed=2)
    assert "area" not in dets[0]  # the caller's result dicts are not touched by pycocotools
    metrics, boot = coco_metrics_with_bootstrap(gt, [], resamples=3)
    assert metrics["AP"] == 0.0 and boot["samples"]["AP"] == [0.0] * 3
    with pytest.raises(ValueError, match="resamples"):
        coco_metrics_with_bootstrap(gt, dets, resamples=0)


def test_indices_and_interval():
    rows = bootstrap_indices(5, resamples=4, seed=0)
    assert rows.shape == (5, 5) and rows[0].tolist() == [0, 1, 2, 3, 4] and rows.max() <= 4
    assert percentile_interval(list(range(101))) == pytest.approx([2.5, 97.5])
