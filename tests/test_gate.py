from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spa.gate import (
    TokenGate,
    enforce_min_keep,
    fuse_logits,
    gumbel_keep,
    random_keep,
    threshold_keep,
    topk_keep,
)
from spa.selection import Selection


def test_fusion_is_elementwise_max():
    own, prev = torch.tensor([[0.0, 2.0, -1.0]]), torch.tensor([[1.0, 1.0, -3.0]])
    assert fuse_logits(own, prev).tolist() == [[1.0, 2.0, -1.0]]
    assert fuse_logits(own, None) is own
    with pytest.raises(ValueError, match="previous logits"):
        fuse_logits(own, torch.zeros(1, 2))


def test_threshold_keep_is_probability_above_threshold():
    logits = torch.tensor([[math.log(0.29 / 0.71), math.log(0.31 / 0.69), 5.0, -5.0]])
    assert threshold_keep(logits, 0.3).tolist() == [[False, True, True, False]]
    valid = torch.tensor([[True, True, False, True]])
    assert threshold_keep(logits, 0.3, valid).tolist() == [[False, True, False, False]]


def test_gumbel_keep_rate_matches_the_logistic_noise_model():
    """P(keep) = P(s + logistic > T * logit(threshold)) = sigmoid(s - T * logit(threshold))."""
    g = torch.Generator().manual_seed(0)
    for s, temperature in ((0.0, 1.0), (1.0, 0.5), (-1.0, 2.0)):
        logits = torch.full((1, 40000), s)
        keep, y = gumbel_keep(logits, 0.3, temperature, generator=g)
        expected = torch.sigmoid(torch.tensor(s - temperature * math.log(0.3 / 0.7))).item()
        assert keep.float().mean().item() == pytest.approx(expected, abs=0.01)
        assert torch.equal(keep, y > 0.3)
    # half-precision logits: noise drawn in float32 (bf16 uniforms have 8 bits and miss the tails: a keep
    # rate 22% low at s = -5), same keep rate as float32
    keep, y = gumbel_keep(torch.full((1, 400000), -5.0, dtype=torch.bfloat16), 0.3, 1.0, generator=g)
    expected = torch.sigmoid(torch.tensor(-5.0 - math.log(0.3 / 0.7))).item()
    assert keep.float().mean().item() == pytest.approx(expected, rel=0.08) and y.dtype == torch.bfloat16
    assert gumbel_keep(torch.full((1, 100), 30.0), 0.3)[0].all()
    assert not gumbel_keep(torch.full((1, 100), -30.0), 0.3)[0].any()


@given(st.integers(1, 4), st.integers(1, 30), st.floats(0.01, 1.0), st.integers(0, 1000))
def test_topk_keeps_the_best_fixed_ratio_of_valid_tokens(B, N, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, generator=g)
    valid = torch.rand(B, N, generator=g) < 0.8
    keep = topk_keep(logits, ratio, valid)
    for b in range(B):
        n_valid = int(valid[b].sum())
        assert int(keep[b].sum()) == min(n_valid, math.ceil(ratio * n_valid - 1e-9))
        assert not (keep[b] & ~valid[b]).any()
        if keep[b].any() and (valid[b] & ~keep[b]).any():
            assert logits[b][keep[b]].min() >= logits[b][valid[b] & ~keep[b]].max()
    rand = random_keep(valid, ratio, generator=g)
    assert torch.equal(rand.sum(1), keep.sum(1)) and not (rand & ~valid).any()


def test_min_keep_forces_best_tokens_but_never_padding():
    logits = torch.tensor([[-9.0, -1.0, -5.0, -2.0], [-9.0, -9.0, -9.0, -9.0]])
    keep = torch.zeros(2, 4, dtype=torch.bool)
    valid = torch.tensor([[True, True, True, True], [True, False, False, False]])
    out = enforce_min_keep(keep, logits, 2, valid)
    assert out.tolist() == [[False, True, False, True], [True, False, False, False]]
    assert enforce_min_keep(keep, logits, 0) is keep
    with pytest.raises(ValueError, match="min_keep"):
        enforce_min_keep(keep, logits, -1)


def test_min_keep_only_tops_up_images_that_keep_too_few():
    logits = torch.tensor([[5.0, 4.0, -1.0, -2.0, -3.0, -4.0], [5.0, 4.0, 3.0, -2.0, -3.0, -4.0]])
    keep = torch.tensor([[False, False, True, True, True, False], [False, False, False, False, True, False]])
    out = enforce_min_keep(keep, logits, 2)
    assert out[0].tolist() == keep[0].tolist()  # already keeps 3 >= 2: unchanged
    assert out[1].tolist() == [True, False, False, False, True, False]  # one missing: the best unkept one
    # the random baseline stays random (and keeps its ratio) when the ratio already exceeds min_keep
    torch.manual_seed(0)
    gate = TokenGate(8, select="random", keep_ratio=0.25, min_keep=5).eval()
    decision = gate(torch.randn(64, 100, 8))
    assert decision.keep.sum(1).tolist() == [25] * 64
    best = decision.own_logits.argmax(1)
    assert decision.keep.gather(1, best[:, None]).float().mean() < 0.6


def test_fixed_ratio_counts_are_not_rounded_up_by_float_error():
    # 0.28 * 25 = 7.000000000000001 and 0.07 * 100 = 7.000000000000001 in floating point
    assert int(topk_keep(torch.randn(1, 25), 0.28).sum()) == 7
    assert int(random_keep(torch.ones(1, 100, dtype=torch.bool), 0.07).sum()) == 7
    assert int(topk_keep(torch.randn(1, 196), 0.2).sum()) == 40  # a real fraction still rounds up


def test_valid_tokens_scored_minus_inf_outrank_invalid_ones():
    logits = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    valid = torch.tensor([[False, True, True]])
    assert topk_keep(logits, 1.0, valid).tolist() == [[False, True, True]]


def test_gate_modes():
    x = torch.randn(3, 20, 8)
    gate = TokenGate(8, select="all").eval()
    decision = gate(x)
    assert decision.keep.all() and decision.soft is None
    for select in ("gate", "topk", "random"):
        gate = TokenGate(8, select=select, keep_ratio=0.25).eval()
        decision = gate(x)
        torch.testing.assert_close(decision.soft, torch.sigmoid(decision.fused_logits))
        if select != "gate":
            assert decision.keep.sum(1).tolist() == [5, 5, 5]


def test_gate_eval_is_deterministic_and_train_is_stochastic():
    gate = TokenGate(8, init_keep_prob=0.4)
    x = torch.randn(4, 50, 8)
    gate.eval()
    assert torch.equal(gate(x).keep, gate(x).keep)
    gate.train()
    assert not torch.equal(gate(x).keep, gate(x).keep)


def test_gate_init_sets_initial_keep_probability():
    gate = TokenGate(16, init_keep_prob=0.8)
    probs = torch.sigmoid(gate.score(torch.randn(2, 100, 16)))
    assert probs.mean().item() == pytest.approx(0.8, abs=0.02)


def test_previous_logits_are_fused():
    gate = TokenGate(4).eval()
    x = torch.randn(1, 6, 4)
    prev = torch.full((1, 6), 10.0)
    decision = gate(x, prev)
    assert torch.equal(decision.fused_logits, prev) and decision.keep.all()


def test_straight_through_keeps_forward_value_and_adds_a_gradient_path():
    x = torch.randn(2, 30, 8)
    plain, st_gate = TokenGate(8), TokenGate(8, straight_through=True)
    st_gate.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    b = st_gate(x)
    torch.testing.assert_close(a.soft, b.soft)
    (a.soft * a.keep).sum().backward()
    (b.soft * b.keep).sum().backward()
    assert not torch.allclose(plain.proj.weight.grad, st_gate.proj.weight.grad)


def test_nan_logits_raise():
    logits = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="NaN"):
        threshold_keep(logits, 0.3)
    with pytest.raises(ValueError, match="NaN"):
        gumbel_keep(logits, 0.3)
    gate = TokenGate(2).eval()
    with pytest.raises(ValueError, match="NaN"):
        gate(torch.full((1, 3, 2), float("nan")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"select": "topK"}, "select"),
        ({"keep_threshold": 1.0}, "keep_threshold"),
        ({"temperature": 0.0}, "temperature"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"min_keep": -1}, "min_keep"),
        ({"init_keep_prob": 1.0}, "init_keep_prob"),
    ],
)
def test_gate_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenGate(4, **kwargs)


def test_bad_logits_and_masks():
    with pytest.raises(TypeError, match="floating"):
        threshold_keep(torch.zeros(1, 3, dtype=torch.long), 0.3)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        threshold_keep(torch.zeros(3), 0.3)
    with pytest.raises(TypeError, match="valid must be a bool"):
        threshold_keep(torch.zeros(1, 3), 0.3, torch.ones(1, 3))
    with pytest.raises(ValueError, match="valid must have shape"):
        threshold_keep(torch.zeros(1, 3), 0.3, torch.ones(1, 2, dtype=torch.bool))


def test_selection_record_validates_and_summarises():
    keep = torch.tensor([[[True, False], [False, False]]])
    sel = Selection(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), keep, stage=2, block=0, stride=16)
    assert sel.keep_ratio.tolist() == [0.25] and sel.num_kept.tolist() == [1]
    with pytest.raises(ValueError, match="Selection tensors"):
        Selection(torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), keep, 2, 0, 16)
    with pytest.raises(TypeError, match="bool"):
        Selection(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), keep.float(), 2, 0, 16)
    with pytest.raises(AttributeError):
        sel.stage = 3  # frozen


# --- the gate's decisions without a valid mask take shorter paths: the same decisions ---------------------


def _gate(select: str, **kwargs) -> TokenGate:
    torch.manual_seed(0)
    gate = TokenGate(8, select=select, **kwargs)
    with torch.no_grad():
        gate.proj.weight.normal_(0, 0.5)
    return gate


@pytest.mark.parametrize("select", ["gate", "topk", "random", "all"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("min_keep", [0, 30])
def test_no_valid_mask_decides_as_an_all_true_mask(select, train, min_keep):
    gate = _gate(select, keep_ratio=0.3, keep_threshold=0.5, min_keep=min_keep).train(train)
    x = torch.randn(3, 50, 8)
    x[1, 10:20] = x[1, 0]  # ties: broken by position in both
    prev = torch.randn(3, 50)
    torch.manual_seed(5)
    plain = gate(x, prev)
    torch.manual_seed(5)
    masked = gate(x, prev, valid=torch.ones(3, 50, dtype=torch.bool))
    assert torch.equal(plain.keep, masked.keep) and plain.keep.dtype == torch.bool
    for a, b in ((plain.own_logits, masked.own_logits), (plain.fused_logits, masked.fused_logits)):
        assert torch.equal(a, b)
    assert (plain.soft is None) == (masked.soft is None)
    if plain.soft is not None:
        assert torch.equal(plain.soft, masked.soft)


def test_topk_without_valid_mask_keeps_the_top_ratio_with_ties_by_position():
    gate = _gate("topk", keep_ratio=0.28).eval()
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0] * 4 + [0.5] * 7])
    keep = gate(torch.zeros(1, 35, 8), logits).keep  # own logits tie at the bias: the previous ones decide
    assert torch.equal(keep, topk_keep(logits, 0.28, torch.ones(1, 35, dtype=torch.bool)))
    assert int(keep.sum()) == 10  # ceil(0.28 * 35) = ceil(9.8)


def test_host_ratio_count_is_the_tensor_one():
    from spa.gate import _ratio_count, _ratio_counts

    for n in range(0, 300):
        for ratio in (0.28, 0.3, 1 / 3, 0.5, 0.1, 0.7, 1.0, 1e-6):
            assert _ratio_count(n, ratio) == int(_ratio_counts(torch.ones(1, n, dtype=torch.bool), ratio)[0])
    with pytest.raises(ValueError, match="keep_ratio"):
        _ratio_count(10, 1.5)


@pytest.mark.parametrize("select", ["gate", "topk", "random"])
@pytest.mark.parametrize("train", [False, True])
def test_nan_checks_are_deferred_only_when_asked_never_skipped(select, train):
    from spa.gate import _deferred_nan_checks

    gate = _gate(select).train(train)
    x = torch.randn(2, 6, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gate(x)
    with _deferred_nan_checks() as pending:
        gate(x)  # collected, not run
    assert [name for _, name in pending] == ["logits"] and bool(pending[0][0])
    with _deferred_nan_checks() as pending:
        gate(torch.randn(2, 6, 8))
    assert len(pending) == 1 and not bool(pending[0][0])
    with pytest.raises(ValueError, match="NaN"):  # and the checks are back after the block
        gate(x)


def test_straight_through_in_eval_keeps_its_gradient():
    """Eval with the straight-through estimator: the soft factor is ``s * (1 + s' - s')`` with two sigmoid
    nodes (the gradient of the fused logits sums both branches)."""
    gate = _gate("gate", straight_through=True, keep_threshold=0.5).eval()
    x = torch.randn(2, 6, 8)
    decision = gate(x)
    decision.soft.sum().backward()
    s = torch.sigmoid(gate.score(x)).detach()
    expected = torch.einsum("bn,bnc->c", s * (1 - s) + s * (1 - s) * s, x)  # d/dw of s + s * (s' - s')
    torch.testing.assert_close(gate.proj.weight.grad[0], expected)
    assert torch.equal(decision.keep, threshold_keep(gate.score(x), 0.5))
