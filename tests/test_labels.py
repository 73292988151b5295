"""Selection labels: pixel-area box semantics, max-pooling to token grids, batching."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa.labels import (
    batch_selection_labels,
    box_grid,
    foreground_mask,
    grid_size,
    mask_grid,
    selection_labels,
)


def _naive_box_pixels(box: list[float], h: int, w: int) -> torch.Tensor:
    """Reference: pixel (r, c) is marked iff the box overlaps [c, c+1) x [r, r+1) with positive area."""
    x1, y1, x2, y2 = box
    out = torch.zeros(h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            ow = min(x2, c + 1) - max(x1, c)
            oh = min(y2, r + 1) - max(y1, r)
            out[r, c] = ow > 0 and oh > 0
    return out


coord = st.floats(min_value=-8.0, max_value=40.0, allow_nan=False, width=32)


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.tuples(coord, coord, coord, coord), min_size=0, max_size=4),
    st.integers(1, 33),
    st.integers(1, 33),
    st.sampled_from([1, 2, 3, 4, 8, 16]),
)
def test_box_grid_equals_maxpool_of_pixel_reference(raw, h, w, stride):
    boxes = torch.tensor(raw, dtype=torch.float32).reshape(-1, 4)
    ref = torch.zeros(h, w, dtype=torch.bool)
    for b in boxes.tolist():
        ref |= _naive_box_pixels(b, h, w)
    assert torch.equal(box_grid(boxes, (h, w), 1), ref)
    grid = box_grid(boxes, (h, w), stride)
    assert grid.shape == (math.ceil(h / stride), math.ceil(w / stride))
    assert torch.equal(grid, mask_grid(ref, stride))
    # every box with positive area inside the image marks at least one cell, and only cells it touches
    for b in boxes.tolist():
        x1, y1, x2, y2 = max(b[0], 0), max(b[1], 0), min(b[2], w), min(b[3], h)
        if x2 > x1 and y2 > y1:
            assert box_grid(torch.tensor([b]), (h, w), stride).any()


def test_box_on_cell_edge_does_not_spill():
    g = box_grid(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), (64, 64), 16)
    assert g.sum() == 1 and g[0, 0]
    g = box_grid(torch.tensor([[16.0, 16.0, 32.0, 32.0]]), (64, 64), 16)
    assert g.sum() == 1 and g[1, 1]
    # one pixel past the edge marks the neighbour
    g = box_grid(torch.tensor([[0.0, 0.0, 16.5, 16.0]]), (64, 64), 16)
    assert g.sum() == 2 and g[0, 1]


def test_tiny_box_marks_its_cell():
    g = box_grid(torch.tensor([[40.2, 17.1, 40.3, 17.15]]), (64, 64), 16)
    assert g.sum() == 1 and g[1, 2]
    g = selection_labels((64, 64), 32, boxes=torch.tensor([[63.9, 63.9, 64.0, 64.0]]))
    assert g.tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_box_partly_outside_is_clipped_and_outside_marks_nothing():
    g = box_grid(torch.tensor([[-10.0, -10.0, 5.0, 100.0]]), (32, 48), 16)
    assert g.tolist() == [[True, False, False], [True, False, False]]
    g = box_grid(torch.tensor([[50.0, 0.0, 60.0, 10.0], [-5.0, -5.0, 0.0, 0.0]]), (32, 48), 16)
    assert not g.any()


def test_degenerate_and_no_boxes_mark_nothing():
    assert not box_grid(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), (32, 32), 8).any()  # zero width
    assert not box_grid(torch.tensor([[9.0, 5.0, 5.0, 9.0]]), (32, 32), 8).any()  # x2 < x1
    assert not box_grid(torch.zeros(0, 4), (32, 32), 8).any()
    assert not box_grid(None, (32, 32), 8).any()
    assert selection_labels((30, 30), 16).shape == (2, 2)


def test_ceil_grid_and_last_partial_cell():
    assert grid_size((224, 224), 16) == (14, 14)
    assert grid_size((225, 200), 32) == (8, 7)
    g = box_grid(torch.tensor([[199.0, 224.5, 200.0, 225.0]]), (225, 200), 32)
    assert g.shape == (8, 7) and g[7, 6] and g.sum() == 1


def test_bad_boxes_raise():
    with pytest.raises(ValueError, match="xyxy"):
        box_grid(torch.zeros(3, 5), (8, 8), 1)
    with pytest.raises(ValueError, match="NaN"):
        box_grid(torch.tensor([[0.0, 0.0, float("nan"), 2.0]]), (8, 8), 1)
    with pytest.raises(ValueError, match="stride"):
        box_grid(torch.zeros(0, 4), (8, 8), 0)


def test_masks_are_used_and_empty_mask_falls_back_to_box():
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 20, 3] = 1  # one pixel
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [17.0, 17.0, 18.0, 18.0]])  # box 0 is much larger
    lab = selection_labels((32, 32), 16, boxes=boxes, masks=masks)
    # mask 0 -> cell (1, 0); mask 1 empty -> its box -> cell (1, 1)
    assert lab.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    fg = foreground_mask((32, 32), boxes, masks)
    assert fg.sum() == 2
    with pytest.raises(ValueError, match="boxes for"):
        foreground_mask((32, 32), boxes[:1], masks)


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([2, 4, 16, 32]), st.integers(0, 2**31 - 1))
def test_mask_grid_is_any_over_cell(h, w, stride, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(h, w, generator=g) > 0.97
    grid = mask_grid(m, stride)
    gh, gw = grid_size((h, w), stride)
    assert grid.shape == (gh, gw)
    for i in range(gh):
        for j in range(gw):
            assert bool(grid[i, j]) == bool(
                m[i * stride : (i + 1) * stride, j * stride : (j + 1) * stride].any()
            )


def test_batch_labels_padded_input_and_batch():
    t0 = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}
    t1 = {"boxes": torch.zeros(0, 4)}
    masks = torch.zeros(1, 40, 20, dtype=torch.uint8)
    masks[0, 39, 19] = 1
    t2 = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 40.0]]), "masks": masks}  # unpadded 40x20 image
    lab = batch_selection_labels([t0, t1, t2], (64, 48), 16, batch_size=4)
    assert lab.shape == (4, 4, 3) and lab.dtype == torch.float32
    assert lab[0].sum() == 1 and lab[0, 0, 0] == 1
    assert lab[1].sum() == 0 and lab[3].sum() == 0
    assert lab[2].sum() == 1 and lab[2, 2, 1] == 1
    no_masks = batch_selection_labels([t2], (64, 48), 16, use_masks=False)
    assert no_masks[0].sum() == 6
    with pytest.raises(ValueError, match="batch_size"):
        batch_selection_labels([t0, t1], (64, 48), 16, batch_size=1)


def _loop_box_grid(boxes: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """The covering rule written out box by box, cell by cell (reference for the vectorised version)."""
    gh, gw = grid_size(size, stride)
    out = torch.zeros(gh, gw, dtype=torch.bool)
    h, w = size
    for x1, y1, x2, y2 in boxes.tolist():
        x1, x2, y1, y2 = min(max(x1, 0), w), min(max(x2, 0), w), min(max(y1, 0), h), min(max(y2, 0), h)
        if x2 <= x1 or y2 <= y1:
            continue
        for i in range(gh):
            for j in range(gw):
                # the cell [j*s, (j+1)*s) x [i*s, (i+1)*s) overlaps the open box with positive area
                if j * stride < x2 and (j + 1) * stride > x1 and i * stride < y2 and (i + 1) * stride > y1:
                    out[i, j] = True
    return out


@settings(deadline=None, max_examples=40)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.sampled_from([4, 16, 32]),
    st.integers(0, 2**31 - 1),
)
def test_batch_labels_equal_a_box_by_box_loop(counts, stride, seed):
    """The vectorised batch labels (one pass over every box of the batch) equal the rule applied box by box."""
    g = torch.Generator().manual_seed(seed)
    size = (int(torch.randint(8, 90, (1,), generator=g)), int(torch.randint(8, 90, (1,), generator=g)))
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1], size[0]]) * 1.2 - 5
        wh = torch.rand(n, 2, generator=g) * 40 - 3  # some degenerate (negative size) boxes
        targets.append({"boxes": torch.cat([xy, xy + wh], 1)})
    labels = batch_selection_labels(targets, size, stride)
    for i, t in enumerate(targets):
        assert torch.equal(labels[i].bool(), _loop_box_grid(t["boxes"], size, stride))
