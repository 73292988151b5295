from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spa.attention import (
    PackedAttention,
    TableBias,
    _RowsMathAttention,
    allowed_pairs,
    packed_attention,
)
from spa.packing import pack

HEADS, DIM = 2, 8
BIAS = torch.randn(HEADS, 6, 6)


def pair_bias(position):
    p = position.clamp(min=0) % 6
    return BIAS[:, p[:, :, None], p[:, None, :]].permute(1, 0, 2, 3)


def pair_mask(position):
    region = position.clamp(min=0) % 3 == 0
    return region[:, :, None] == region[:, None, :]


TABLE = torch.nn.Parameter(torch.randn(HEADS, 11))


def table_bias(position):
    """A relative-position-style lookup: the entry of a pair is its clipped position offset."""
    p = position.clamp(min=0)
    return TableBias(TABLE, (p[:, :, None] - p[:, None, :]).clamp(-5, 5) + 5)


def run(module, x, keep, L, layout, order, backend, hooks=True, rows=True, backward=True):
    """Unpacked attention output ``[B, N, C]`` (0 for unkept) and the gradients of a fixed loss (of ``x``,
    the module's parameters and, with ``hooks='table'``, the bias table).

    ``hooks``: False (none), True (a dense bias and a pair mask) or ``'table'`` (a ``TableBias`` and the mask).
    """
    module.backend = backend
    module.zero_grad()
    TABLE.grad = None
    x = x.detach().requires_grad_(True)
    packed = pack(x, keep, L, layout, order)
    hook_args = {"pair_bias": table_bias if hooks == "table" else pair_bias, "pair_mask": pair_mask}
    hook_args = hook_args if hooks else {}
    if rows:
        out = packed.scatter_rows(module(packed.select(x), packed, **hook_args), fill=0.0)
    else:
        out = packed.unpack(module(packed.tokens, packed, **hook_args), fill=0.0)
    if not backward:
        return out.detach(), [], packed
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    tensors = [x, *module.parameters(), TABLE]
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]
    return out.detach(), grads, packed


@st.composite
def cases(draw):
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, 24))
    L = draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    probs = torch.tensor([draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])) for _ in range(B)])
    keep = torch.rand(B, N, generator=g) < probs[:, None]
    order = torch.randperm(N, generator=g) if draw(st.booleans()) else None
    return torch.randn(B, N, DIM, generator=g), keep, L, order, draw(st.booleans())


def assert_close_on_kept(a, b, keep):
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@given(case=cases(), layout=st.sampled_from(("containers", "padded", "masked", "stream")))
def test_fast_backends_match_reference_outputs_and_gradients(backend, case, layout):
    x, keep, L, order, hooks = case
    module = PackedAttention(DIM, HEADS)
    fast, fast_grads, _ = run(module, x, keep, L, layout, order, backend, hooks)
    ref, ref_grads, _ = run(module, x, keep, L, layout, order, "reference", hooks)
    assert_close_on_kept(fast, ref, keep)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@given(case=cases(), layout=st.sampled_from(("containers", "padded", "masked", "stream")))
def test_math_rows_path_with_table_bias_matches_reference(case, layout):
    """Rows through ``_RowsMathAttention`` (slots placed by a prefix copy and an index, hand-written
    backward): outputs and gradients of ``x``, the weights and the bias table match the reference."""
    x, keep, L, order, _ = case
    module = PackedAttention(DIM, HEADS)
    fast, fast_grads, _ = run(module, x, keep, L, layout, order, "math", "table")
    ref, ref_grads, _ = run(module, x, keep, L, layout, order, "reference", "table")
    assert_close_on_kept(fast, ref, keep)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_math_rows_path_is_taken_and_falls_back_when_it_cannot_apply():
    """The rows path runs for the math backend (also under autocast, not under dropout) and agrees with slots
    input."""
    x = torch.randn(3, 20, DIM)
    keep = torch.arange(20) < torch.tensor([7, 9, 4])[:, None]  # chunks of 6: partial ones share with padding
    module = PackedAttention(DIM, HEADS, backend="math")
    packed = pack(x, keep, 6, "containers")
    assert packed.padding_fraction > 0 and int(packed.padding_slots[0]) < packed.num_kept  # padding mid-rows
    calls = []
    original = _RowsMathAttention.apply
    _RowsMathAttention.apply = lambda *args: calls.append(1) or original(*args)
    try:
        rows, rows_grads, _ = run(module, x, keep, 6, "containers", None, "math", "table", rows=True)
        assert len(calls) == 1 and rows_grads[-1].abs().sum() > 0  # the bias table gets a gradient
        slots, slots_grads, _ = run(module, x, keep, 6, "containers", None, "math", "table", rows=False)
        assert len(calls) == 1  # [K, S, C] input takes the q/k/v path
        torch.testing.assert_close(rows, slots, atol=1e-6, rtol=1e-6)
        for a, b in zip(rows_grads, slots_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        module.attn_drop.p = 0.5
        module.train()
        run(module, x, keep, 6, "containers", None, "math", "table", backward=False)
        assert len(calls) == 1  # attention dropout: the q/k/v path
        module.attn_drop.p = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(module, x, keep, 6, "containers", None, "math", "table", backward=False)
        assert len(calls) == 2  # autocast: the rows path too, in bf16 (tests/test_amp.py)
    finally:
        _RowsMathAttention.apply = original


@given(cases())
def test_layouts_agree_with_each_other(case):
    x, keep, L, order, hooks = case
    module = PackedAttention(DIM, HEADS)
    base, base_grads, _ = run(module, x, keep, L, "containers", order, "sdpa", hooks)
    for layout in ("padded", "masked"):
        out, grads, _ = run(module, x, keep, L, layout, order, "sdpa", hooks)
        assert_close_on_kept(out, base, keep)
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rows_and_slots_inputs_agree():
    x = torch.randn(3, 20, DIM)
    keep = torch.rand(3, 20) < 0.6
    module = PackedAttention(DIM, HEADS)
    a, ga, _ = run(module, x, keep, 6, "containers", None, "sdpa", rows=True)
    b, gb, _ = run(module, x, keep, 6, "containers", None, "sdpa", rows=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_edge_cases_match_reference():
    module = PackedAttention(DIM, HEADS)
    cases = {
        "batch of one": (torch.randn(1, 10, DIM), torch.rand(1, 10) < 0.5),
        "one token": (torch.randn(1, 1, DIM), torch.ones(1, 1, dtype=torch.bool)),
        "all kept": (torch.randn(2, 10, DIM), torch.ones(2, 10, dtype=torch.bool)),
        "one image empty": (torch.randn(2, 10, DIM), torch.tensor([[True] * 10, [False] * 10])),
    }
    for name, (x, keep) in cases.items():
        for layout in ("containers", "padded", "masked", "stream"):
            ref, _, _ = run(module, x, keep, 4, layout, None, "reference")
            for backend in ("math", "sdpa"):
                fast, _, _ = run(module, x, keep, 4, layout, None, backend)
                assert torch.isfinite(fast).all(), (name, backend)
                assert_close_on_kept(fast, ref, keep)


def test_nothing_kept_skips_attention_and_keeps_gradients_defined():
    module = PackedAttention(DIM, HEADS)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    packed = pack(x, torch.zeros(2, 6, dtype=torch.bool), 3)
    out = packed.scatter_rows(module(packed.select(x), packed), fill=x)
    out.sum().backward()
    assert torch.equal(out, x) and torch.equal(x.grad, torch.ones_like(x))


def test_batch_invariance_with_shared_containers():
    """An image's outputs are the same alone and in batches where it shares containers with others."""
    g = torch.Generator().manual_seed(3)
    module = PackedAttention(DIM, HEADS).eval()
    x = torch.randn(6, 30, DIM, generator=g)
    keep = torch.rand(6, 30, generator=g) < torch.tensor([0.2, 0.5, 0.9, 0.3, 0.1, 0.6])[:, None]
    order = torch.randperm(30, generator=g)
    batch, _, packed = run(module, x, keep, 7, "containers", order, "sdpa", backward=False)
    shared = [
        k for k in range(packed.num_containers) if packed.image[k][packed.image[k] >= 0].unique().numel() > 1
    ]
    assert shared, "the test batch must share containers between images"
    for b in range(6):
        alone, _, _ = run(
            module, x[b : b + 1], keep[b : b + 1], 7, "containers", order, "sdpa", backward=False
        )
        torch.testing.assert_close(alone[0][keep[b]], batch[b][keep[b]], atol=1e-5, rtol=1e-5)


def test_auto_backend_is_math_on_cpu_and_bias_layout_does_not_change_results():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, HEADS, 4, 4, generator=g) for _ in range(3))
    packed = pack(torch.zeros(2, 6, 1), torch.rand(2, 6, generator=g) < 0.7, 4)
    q, k, v = (t[: packed.num_containers] for t in (q, k, v))
    auto = packed_attention(q, k, v, packed, pair_bias, pair_mask)
    math = packed_attention(q, k, v, packed, pair_bias, pair_mask, backend="math")
    assert torch.equal(auto, math)

    def head_major_bias(position):  # the same bias as a transposed view, as SPA blocks return it
        return pair_bias(position).transpose(0, 1).contiguous().transpose(0, 1)

    other = packed_attention(q, k, v, packed, head_major_bias, pair_mask, backend="math")
    torch.testing.assert_close(other, math, atol=1e-6, rtol=1e-6)
    ref = packed_attention(q, k, v, packed, pair_bias, pair_mask, backend="reference")
    real = (packed.image >= 0)[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(other[real], ref[real], atol=1e-5, rtol=1e-5)


def test_table_bias_matches_its_dense_form_in_every_backend_and_precision():
    g = torch.Generator().manual_seed(6)
    packed = pack(torch.zeros(3, 10, 1), torch.rand(3, 10, generator=g) < 0.6, 4)
    K, S = packed.image.shape
    table = torch.randn(HEADS, 7, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (K, S, S), generator=g)

    def table_bias(position):
        return TableBias(table, index[: position.shape[0], : position.shape[1], : position.shape[1]])

    def dense_bias(position):
        return table_bias(position).dense()

    q, k, v = (torch.randn(K, HEADS, S, 4, generator=g) for _ in range(3))
    real = (packed.image >= 0)[:, None, :, None].expand_as(q)
    for backend in ("math", "sdpa"):
        a = packed_attention(q, k, v, packed, table_bias, pair_mask, backend=backend)
        b = packed_attention(q, k, v, packed, dense_bias, pair_mask, backend=backend)
        torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=1e-6)
        (grad_a,) = torch.autograd.grad(a[real].sum(), table)
        (grad_b,) = torch.autograd.grad(b[real].sum(), table)
        torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-5)
    double = packed_attention(
        q.double(), k.double(), v.double(), packed, table_bias, pair_mask, backend="math"
    )
    assert double.dtype == torch.float64
    torch.testing.assert_close(double[real].float(), a[real], atol=1e-5, rtol=1e-5)


def test_allowed_pairs_never_sees_padding_or_other_segments():
    segment = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2]])
    allowed = allowed_pairs(segment)
    assert allowed[0].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],  # padding row sees only itself (never empty)
    ]
    assert allowed[1].all()


def test_varlen_on_cpu_says_it_needs_cuda():
    x = torch.randn(1, 4, DIM)
    packed = pack(x, torch.ones(1, 4, dtype=torch.bool), 2)
    module = PackedAttention(DIM, HEADS, backend="varlen")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        module(packed.select(x), packed)


def test_bad_backend_and_shapes():
    with pytest.raises(ValueError, match="backend"):
        PackedAttention(DIM, HEADS, backend="flash")
    packed = pack(torch.randn(1, 4, DIM), torch.ones(1, 4, dtype=torch.bool), 2)
    q = torch.randn(3, HEADS, 2, 4)
    with pytest.raises(ValueError, match="q must be"):
        packed_attention(q, q, q, packed)
    with pytest.raises(ValueError, match="backend"):
        packed_attention(q[:2], q[:2], q[:2], packed, backend="nope")
    with pytest.raises(ValueError, match="rows"):
        PackedAttention(DIM, HEADS)(torch.randn(5, DIM), packed)
    q = q[:2]
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        packed_attention(q, q[:, :, :1], q, packed)
    with pytest.raises(ValueError, match=r"v must have q's shape"):
        packed_attention(q, q, torch.randn(2, HEADS, 2, 3), packed)
    with pytest.raises(TypeError, match="a pair mask must be bool"):
        packed_attention(q, q, q, packed, pair_mask=lambda position: torch.ones(2, 2, 2), backend="math")


def test_table_bias_checks_its_fields():
    with pytest.raises(ValueError, match="table must be"):
        TableBias(torch.zeros(3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="index must be a long"):
        TableBias(torch.zeros(2, 3), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="index must be"):
        TableBias(torch.zeros(2, 3), torch.zeros(1, 2, 3, dtype=torch.long))
    # entry E is what the math backend reads as -inf: one past the end must not silently mask a pair
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"index entries must be in \[0, 3\)"):
            TableBias(torch.zeros(2, 3), torch.full((1, 2, 2), bad, dtype=torch.long))


def test_rows_path_refuses_double_backward_with_a_clear_error():
    module = PackedAttention(DIM, HEADS)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    packed = pack(x, torch.ones(2, 6, dtype=torch.bool), 4)
    out = module(packed.select(x), packed, pair_bias=table_bias)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_a_dense_bias_broadcast_over_heads_works_in_every_backend():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 4, 3) for _ in range(3))
    packed = pack(torch.zeros(1, 8, 1), torch.ones(1, 8, dtype=torch.bool), 4)

    def one_head(position):  # [K, 1, S, S]
        return pair_bias(position)[:, :1]

    def every_head(position):
        return one_head(position).expand(-1, HEADS, -1, -1)

    expected = packed_attention(q, k, v, packed, every_head, backend="reference")
    for backend in ("math", "sdpa", "reference"):
        got = packed_attention(q, k, v, packed, one_head, backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- the shorter paths (issue #17): the same masks, entries and outputs ---------------------------------


@given(seed=st.integers(0, 2**16), with_mask=st.booleans())
def test_allowed_pairs_is_the_spec_formula(seed, with_mask):
    g = torch.Generator().manual_seed(seed)
    K, S = 3, 7
    segment = torch.randint(-1, 3, (K, S), generator=g)
    mask = torch.rand(K, S, S, generator=g) > 0.3 if with_mask else None
    real = segment >= 0
    expected = (segment[:, :, None] == segment[:, None, :]) & real[:, :, None]
    if mask is not None:
        expected = expected & mask
    expected = expected | (torch.eye(S, dtype=torch.bool) & ~real[:, :, None])
    allowed = allowed_pairs(segment, mask)
    assert torch.equal(allowed, expected)
    allowed.fill_(True)  # a fresh tensor: writing to it changes nothing the next call sees (a cached eye)
    assert torch.equal(allowed_pairs(segment, mask), expected)


def test_table_bias_masked_index_and_lookup_bias():
    from spa.attention import _LookupBias

    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 5, generator=g)
    index = torch.randint(0, 5, (2, 4, 4), generator=g)
    allowed = torch.rand(2, 4, 4, generator=g) > 0.4
    plain = TableBias(table, index)
    assert torch.equal(plain.masked_index(allowed), index.masked_fill(~allowed, 5))
    # a looked-up index is not checked again; masked entries (E) read -inf, like masked_index
    lookup = _LookupBias(table, index.masked_fill(~allowed, 5), premasked=True)
    expected = plain.dense().masked_fill(~allowed[:, None], float("-inf"))
    assert torch.equal(lookup.dense(), expected)
    assert torch.equal(lookup.masked(torch.ones_like(allowed)), plain.masked(allowed))
    assert torch.equal(_LookupBias(table, index).dense(), plain.dense())
    with pytest.raises(ValueError, match="entries"):
        TableBias(table, index.masked_fill(~allowed, 5))  # the public one still checks


@pytest.mark.parametrize("layout", ["containers", "stream", "padded", "masked"])
def test_rows_math_without_autograd_is_the_same_computation(layout):
    torch.manual_seed(0)
    attn = PackedAttention(DIM, HEADS, backend="math")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, DIM, generator=g)
    keep = torch.rand(3, 20, generator=g) < 0.6
    packed = pack(x, keep, 6, layout)
    table = torch.randn(HEADS, 7, generator=g, requires_grad=True)
    index = torch.randint(0, 7, packed.image.shape + packed.image.shape[1:], generator=g)

    def bias(position):
        return TableBias(table, index)

    rows = packed.select(x)
    with_grad = attn(rows, packed, pair_bias=bias, pair_mask=pair_mask)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = attn(rows, packed, pair_bias=bias, pair_mask=pair_mask)
    with torch.inference_mode():
        inference = attn(rows, packed, pair_bias=bias, pair_mask=pair_mask)
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, inference)
