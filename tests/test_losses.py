"""Selection loss on the blocks' own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spa.losses import selection_loss, selection_loss_from_targets
from spa.selection import Selection


def _sel(logits: torch.Tensor, stride: int, stage: int = 2, block: int = 0) -> Selection:
    fused = logits.detach() + 1.0  # the loss must use own_logits, never fused
    return Selection(logits, fused, logits.detach() > 0, stage=stage, block=block, stride=stride)


def test_value_matches_bce_sum_times_alpha_and_grads_flow():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 4, requires_grad=True)
    b = torch.randn(2, 4, 4, requires_grad=True)
    c = torch.randn(2, 2, 2, requires_grad=True)
    lab16 = (torch.rand(2, 4, 4) > 0.5).float()
    lab32 = (torch.rand(2, 2, 2) > 0.5).float()
    sels = [_sel(a, 16, block=0), _sel(b, 16, block=1), _sel(c, 32, stage=3)]
    out = selection_loss(sels, {16: lab16, 32: lab32}, alpha=0.5)
    assert set(out) == {"loss_select"}
    ref = 0.5 * (
        F.binary_cross_entropy_with_logits(a, lab16)
        + F.binary_cross_entropy_with_logits(b, lab16)
        + F.binary_cross_entropy_with_logits(c, lab32)
    )
    torch.testing.assert_close(out["loss_select"], ref)
    out["loss_select"].backward()
    for t in (a, b, c):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # gradient pushes logits up where the label is 1
    assert (a.grad[lab16 == 1] < 0).all() and (a.grad[lab16 == 0] > 0).all()


def test_default_alpha_and_callable_labels_called_once_per_stride():
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    calls = []

    def labels(stride):
        calls.append(stride)
        return torch.ones(1, 2, 2)

    out = selection_loss([_sel(logits, 16), _sel(logits, 16, block=1)], labels)
    torch.testing.assert_close(out["loss_select"], torch.tensor(0.01 * 2 * 0.6931471805599453))
    assert calls == [16]


def test_shape_mismatch_is_a_clear_error():
    sels = [_sel(torch.zeros(2, 4, 4), 16)]
    with pytest.raises(ValueError, match=r"stride 16.*\(2, 3, 3\).*own_logits \(2, 4, 4\)"):
        selection_loss(sels, {16: torch.zeros(2, 3, 3)})


def test_labels_that_are_not_bce_targets_or_miss_a_stride_are_refused():
    sels = [_sel(torch.zeros(1, 2, 2), 16), _sel(torch.zeros(1, 1, 1), 32, stage=3)]
    ok = {16: torch.ones(1, 2, 2), 32: torch.zeros(1, 1, 1)}
    loss = selection_loss(sels, ok)["loss_select"]
    assert loss > 0
    as_bool = selection_loss(sels, {16: torch.ones(1, 2, 2, dtype=torch.bool), 32: torch.zeros(1, 1, 1)})
    torch.testing.assert_close(as_bool["loss_select"], loss)  # a bool mask is the same 0/1 labels
    for bad, match in ((255.0, r"in \[0, 1\].*got values in \[0, 255\]"), (-1.0, r"\[-1, 0\]"),
                       (float("nan"), "and NaN")):  # fmt: skip
        labels = {16: torch.zeros(1, 2, 2), 32: torch.zeros(1, 1, 1)}
        labels[16][0, 0, 0] = bad
        with pytest.raises(ValueError, match=match):
            selection_loss(sels, labels)
    with pytest.raises(ValueError, match=r"no selection labels at stride 32 .*strides \[16\]"):
        selection_loss(sels, {16: torch.ones(1, 2, 2)})


def test_from_targets_needs_one_target_per_image():
    sels = [_sel(torch.zeros(2, 4, 4), 16)]
    one = [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]])}]
    with pytest.raises(ValueError, match="1 targets for a batch of 2 images"):
        selection_loss_from_targets(sels, one, (64, 64))
    with pytest.raises(ValueError, match="3 targets for a batch of 2 images"):
        selection_loss_from_targets(sels, one * 3, (64, 64))


def test_empty_selections_give_zero():
    out = selection_loss([], {}, alpha=0.01)
    assert out["loss_select"].item() == 0.0


def test_from_targets_builds_labels_on_padded_grid():
    logits = torch.full((2, 4, 3), -20.0, requires_grad=True)
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]])}, {"boxes": torch.zeros(0, 4)}]
    out = selection_loss_from_targets([_sel(logits, 16)], targets, (64, 48), alpha=1.0)
    # only the one positive cell (image 0, cell 0,0) is wrong: loss ~ 20 / 24 tokens
    assert abs(out["loss_select"].item() - 20.0 / 24) < 1e-3
    out["loss_select"].backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[1].abs().max() < 1e-6
    with pytest.raises(ValueError, match="own_logits"):
        selection_loss_from_targets([_sel(logits, 16)], targets, (80, 48))
