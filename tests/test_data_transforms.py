"""Box-aware transforms: boxes, masks, labels, iscrowd and area move together."""

from __future__ import annotations

import torch
from torchvision import tv_tensors

from spa.data import detection_transforms


def _sample():
    image = tv_tensors.Image(torch.rand(3, 100, 200))
    masks = torch.zeros(3, 100, 200, dtype=torch.uint8)
    masks[0, 10:30, 20:60] = 1
    masks[1, 50:90, 150:190] = 1
    masks[2, 0:1, 199:200] = 1  # a one-pixel object, lost when shrinking
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            [[20.0, 10, 60, 30], [150, 50, 190, 90], [199, 0, 200, 1]], format="XYXY", canvas_size=(100, 200)
        ),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.tensor([0, 1, 0]),
        "area": torch.tensor([800.0, 1600.0, 1.0]),
        "image_id": 5,
    }
    return image, target


def _tight(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_moves_boxes_and_masks_together():
    image, target = _sample()
    tf = detection_transforms(train=True, size=200, scale_range=(1.0, 1.0), flip_p=1.0)
    out_img, out = tf(image, target)
    assert out_img.shape == (3, 100, 200) and type(out_img) is torch.Tensor  # pure tensors
    assert out["boxes"][0].tolist() == [140, 10, 180, 30]
    for k in range(len(out["labels"])):
        assert out["boxes"][k].tolist() == _tight(out["masks"][k])
    torch.testing.assert_close(out_img, image.flip(-1).as_subclass(torch.Tensor))
    assert out["image_id"] == 5


def test_scale_jitter_resizes_and_sanitizes_all_fields():
    torch.manual_seed(0)
    image, target = _sample()
    tf = detection_transforms(train=True, size=100, scale_range=(0.5, 0.5), flip_p=0.0)
    out_img, out = tf(image, target)
    assert out_img.shape == (3, 25, 50)
    # the 1-pixel object became smaller than a pixel: dropped with its label, iscrowd, area and mask
    assert out["labels"].tolist() == [1, 2] and out["iscrowd"].tolist() == [0, 1]
    assert out["masks"].shape == (2, 25, 50)
    torch.testing.assert_close(out["boxes"][0], torch.tensor([5.0, 2.5, 15.0, 7.5]))
    torch.testing.assert_close(out["area"], out["masks"].flatten(1).sum(1).float())


def test_eval_resize_keeps_aspect():
    image, target = _sample()
    out_img, out = detection_transforms(train=False, size=100)(image, target)
    assert out_img.shape == (3, 50, 100)
    torch.testing.assert_close(out["boxes"][1], torch.tensor([75.0, 25.0, 95.0, 45.0]))
