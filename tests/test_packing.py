from __future__ import annotations

import pytest
import torch
from conftest import SyncCounter
from hypothesis import given
from hypothesis import strategies as st

from spa.packing import LAYOUTS, pack


@st.composite
def ragged(draw):
    """Random batch: shapes, a keep mask with ragged counts (empty and full images likely) and an order."""
    B = draw(st.integers(1, 5))
    N = draw(st.integers(1, 30))
    L = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])) for _ in range(B)])
    keep = torch.rand(B, N, generator=g) < probs[:, None]
    order = torch.randperm(N, generator=g) if draw(st.booleans()) else None
    x = torch.randn(B, N, 3, generator=g)
    return x, keep, L, order


def _chunks(packed):
    """{segment id: [(image, position), ...] in slot order} over real slots."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for seg, img, pos in zip(
        packed.segment.flatten().tolist(), packed.image.flatten().tolist(), packed.position.flatten().tolist()
    ):
        if seg >= 0:
            groups.setdefault(seg, []).append((img, pos))
    return groups


@given(ragged(), st.sampled_from(LAYOUTS))
def test_unpack_inverts_pack(case, layout):
    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    out = packed.unpack(packed.tokens, fill=-7.0)
    expected = torch.where(keep[..., None], x, torch.full_like(x, -7.0))
    assert torch.equal(out, expected)
    assert packed.num_kept == int(keep.sum())
    rows = packed.select(x)
    assert torch.equal(packed.scatter_rows(rows, fill=x), x)
    assert torch.equal(packed.from_slots(packed.to_slots(rows)), rows)


@given(ragged(), st.sampled_from(("containers", "padded", "stream")))
def test_every_kept_token_has_one_slot_and_padding_is_zero(case, layout):
    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    B, N, _ = x.shape
    real = packed.image >= 0
    S = packed.image.shape[1]
    assert packed.tokens.shape == (packed.num_containers, S, 3) and S <= L
    if packed.num_containers:  # trimmed: no slot column is padding in every container
        assert real[:, -1].any()
    assert torch.all(packed.tokens[~real] == 0)
    sources = packed.source[real]
    assert sources.numel() == sources.unique().numel() == int(keep.sum())
    assert torch.equal(keep.reshape(-1)[sources], torch.ones_like(sources, dtype=torch.bool))
    assert torch.equal(packed.image[real], sources // N)
    assert torch.equal(packed.tokens[real], x.reshape(B * N, -1)[sources])
    assert torch.all((packed.segment >= 0) == real) and torch.all((packed.position >= 0) == real)


@given(ragged(), st.sampled_from(("containers", "padded", "masked")))
def test_segments_are_consecutive_chunks_of_each_image(case, layout):
    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    seq = torch.arange(x.shape[1]) if order is None else order
    for b in range(x.shape[0]):
        kept_positions = [p for p in range(seq.numel()) if keep[b, seq[p]]]
        expected = [kept_positions[i : i + L] for i in range(0, len(kept_positions), L)]
        got = sorted(
            sorted(p for _, p in members) for members in _chunks(packed).values() if members[0][0] == b
        )
        assert all(
            img == b for members in _chunks(packed).values() if members[0][0] == b for img, _ in members
        )
        assert got == sorted(expected)


@given(ragged())
def test_containers_layout_packs_full_chunks_alone_and_shares_partial_ones(case):
    x, keep, L, order = case
    packed = pack(x, keep, L, "containers", order)
    counts = keep.sum(1).tolist()
    full = sum(c // L for c in counts)
    partial = sum(1 for c in counts if c % L)
    assert full <= packed.num_containers <= full + partial
    for k in range(packed.num_containers):
        segs = {s for s in packed.segment[k].tolist() if s >= 0}
        sizes = [int((packed.segment[k] == s).sum()) for s in segs]
        assert sum(sizes) <= L
        if len(segs) > 1:
            assert all(size < L for size in sizes), "a full chunk must own its container"
    padded = pack(x, keep, L, "padded", order)
    assert packed.num_containers <= padded.num_containers


@given(ragged())
def test_stream_layout_pads_only_the_last_container(case):
    x, keep, L, order = case
    packed = pack(x, keep, L, "stream", order)
    total = int(keep.sum())
    assert packed.num_containers == -(-total // L)
    real = (packed.image >= 0).flatten()
    assert torch.all(real[:total]) and not torch.any(real[total:])


def test_containers_share_partial_chunks_first_fit():
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, :7] = True  # 1 full chunk of 5 + partial of 2
    keep[1, :3] = True  # partial of 3
    keep[2, :12] = True  # 2 full + partial of 2
    packed = pack(torch.randn(3, 20, 2), keep, 5)
    assert packed.num_containers == 3 + 2  # 3 full, partials {3,2} share one, {2} in another
    assert packed.padding_fraction == pytest.approx(1 - 22 / 25)


def test_batch_invariant_chunking_but_stream_is_not():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(4, 40, generator=g) < 0.5
    x = torch.randn(4, 40, 2, generator=g)
    for layout, invariant in (("containers", True), ("stream", False)):
        together = {tuple(m) for m in _chunks(pack(x, keep, 7, layout)).values() if m[0][0] == 3}
        alone = {tuple((3, p) for _, p in m) for m in _chunks(pack(x[3:], keep[3:], 7, layout)).values()}
        assert (together == alone) is invariant


def test_empty_selection_gives_zero_containers():
    x = torch.randn(2, 10, 4, requires_grad=True)
    keep = torch.zeros(2, 10, dtype=torch.bool)
    for layout in ("containers", "stream", "padded"):
        packed = pack(x, keep, 4, layout)
        assert packed.num_containers == 0 and packed.tokens.shape == (0, 4, 4)
        assert packed.padding_fraction == 0.0
        assert torch.equal(packed.unpack(packed.tokens, fill=x), x)


def test_empty_batch_packs_to_an_empty_plan():
    x, keep = torch.randn(0, 10, 4), torch.zeros(0, 10, dtype=torch.bool)
    for layout in ("containers", "stream", "padded", "masked"):
        packed = pack(x, keep, 4, layout)
        assert packed.num_kept == 0 and packed.select(x).shape == (0, 4)
        assert packed.unpack(packed.tokens, fill=0.0).shape == (0, 10, 4)


def test_pack_unpack_is_differentiable():
    x = torch.randn(3, 12, 4, dtype=torch.double, requires_grad=True)
    keep = torch.rand(3, 12) < 0.5
    order = torch.randperm(12)

    def fn(inp):
        packed = pack(inp, keep, 5, "containers", order)
        return packed.unpack(packed.tokens.sin(), fill=inp * 2)

    assert torch.autograd.gradcheck(fn, (x,))


@given(ragged(), st.sampled_from(LAYOUTS))
def test_to_slots_zeroes_padding_and_add_rows_is_a_residual_update(case, layout):
    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    rows = packed.select(x) + 1.0
    slots = packed.to_slots(rows)
    if layout != "masked":
        assert torch.all(slots[packed.image < 0] == 0)
        assert packed.padding_slots.numel() == packed.image.numel() - packed.num_kept
        assert torch.equal(slots[packed.image >= 0], rows)  # rows are in slot order
        assert torch.all(packed.slot_index.diff() > 0)
    out = packed.add_rows(x, rows)
    expected = torch.where(keep[..., None], 2 * x + 1.0, x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~keep], x[~keep])  # unkept tokens bit-identical


def test_add_rows_is_differentiable_and_passes_the_base_gradient_through():
    x = torch.randn(3, 12, 4, dtype=torch.double, requires_grad=True)
    keep = torch.rand(3, 12) < 0.5
    packed = pack(x, keep, 5, "containers", torch.randperm(12))
    rows = packed.select(x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b, r: packed.add_rows(b, r.sin()), (x, rows))
    out = packed.add_rows(x, rows)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(rows.grad, torch.ones_like(rows))
    with pytest.raises(ValueError, match="base must be"):
        packed.add_rows(x[:, :5], rows)


@given(ragged(), st.sampled_from(LAYOUTS))
def test_unchecked_order_packs_the_same(case, layout):
    x, keep, L, order = case
    a = pack(x, keep, L, layout, order)
    b = pack(x, keep, L, layout, order, check_order=False)
    for field in ("image", "position", "segment", "source", "slot_index", "source_index"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_unchecked_bad_order_is_the_documented_caller_error():
    x = torch.arange(4.0).view(1, 4, 1)
    keep = torch.tensor([[True, True, False, False]])
    repeated = pack(x, keep, 4, order=torch.tensor([0, 0, 1, 2]), check_order=False)
    assert repeated.tokens.flatten().tolist() == [0.0, 0.0, 1.0]  # token 0 packed twice
    with pytest.raises(IndexError):
        pack(x, keep, 4, order=torch.tensor([0, 1, 5]), check_order=False)
    with pytest.raises(ValueError, match="must not repeat"):
        pack(x, keep, 4, order=torch.tensor([0, 0, 1, 2]))


def test_masked_layout_does_not_gather():
    x = torch.randn(2, 9, 3)
    keep = torch.rand(2, 9) < 0.5
    packed = pack(x, keep, 4, "masked")
    assert packed.tokens.data_ptr() == x.data_ptr()
    assert packed.num_containers == 2 and packed.image.shape == (2, 9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(2, 3)}, ValueError, "x must be"),
        ({"keep": torch.ones(2, 5)}, TypeError, "keep must be a bool"),
        ({"keep": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "keep must have shape"),
        ({"length": 0}, ValueError, "length"),
        ({"length": 2.0}, ValueError, "length"),
        ({"layout": "dense"}, ValueError, "layout"),
        ({"order": torch.tensor([0, 1, 1, 2, 3])}, ValueError, "repeat"),
        ({"order": torch.tensor([0, 1, 2, 3, 9])}, ValueError, "order must hold"),
        ({"order": torch.tensor([0.0, 1.0])}, TypeError, "order must be"),
        ({"order": torch.tensor([0, 1, 2])}, ValueError, "not in order"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = {"x": torch.randn(2, 5, 3), "keep": torch.ones(2, 5, dtype=torch.bool), "length": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pack(**args)


def test_unpack_checks_shapes():
    packed = pack(torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="y must be"):
        packed.unpack(torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="fill must be"):
        packed.unpack(packed.tokens, fill=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="rows must be"):
        packed.to_slots(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"rows must be \[R, D\] with R = 10"):  # one number per row
        packed.scatter_rows(torch.zeros(packed.num_rows))
    with pytest.raises(ValueError, match=r"rows must be \[R, D\]"):
        packed.add_rows(torch.zeros(2, 5, 3), torch.zeros(packed.num_rows))


# --- what the plan knows on the host (issue #17: no device sync beyond the per-image counts) ---------------


def _first_padding_from_slot_map(packed) -> int:
    padding = (packed.image.reshape(-1) < 0).nonzero().squeeze(1)
    return int(padding[0]) if padding.numel() else packed.image.numel()


@pytest.mark.parametrize("layout", LAYOUTS)
@given(case=ragged())
def test_plan_knows_its_padding_without_reading_the_slot_map(layout, case):
    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    expected = (packed.image.reshape(-1) < 0).nonzero().squeeze(1)
    assert torch.equal(packed.padding_slots, expected)
    if layout != "masked":
        # every layout but masked fills a prefix of each container, so the first padding slot is the plan's
        filled = packed.image >= 0
        assert torch.equal(filled.int(), filled.int().cummin(1).values) if filled.numel() else True
        assert packed.__dict__["_first_padding_slot"] == _first_padding_from_slot_map(packed)
    # a plan built by hand (nothing cached) reads it off the slot map
    from dataclasses import fields

    from spa.packing import Packed

    by_hand = Packed(**{f.name: getattr(packed, f.name) for f in fields(Packed)})
    assert by_hand._first_padding_slot == _first_padding_from_slot_map(packed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_inputs_keeps_the_plan_and_what_it_knows(layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 4, generator=g)
    keep = torch.rand(3, 20, generator=g) < 0.6
    packed = pack(x, keep, 7, layout)
    _ = packed.tokens, packed.padding_slots
    plan = packed.without_inputs()
    assert plan.inputs is None and "tokens" not in plan.__dict__ and packed.inputs is x
    for name in ("image", "position", "segment", "source", "slot_index", "source_index"):
        assert torch.equal(getattr(plan, name), getattr(packed, name))
    assert (plan.layout, plan.batch_size, plan.num_tokens, plan.length) == (layout, 3, 20, 7)
    assert torch.equal(plan.padding_slots, packed.padding_slots)
    assert plan._first_padding_slot == packed._first_padding_slot
    assert torch.equal(plan.gather(x), packed.tokens)
    with pytest.raises(ValueError, match="without its inputs"):
        _ = plan.tokens


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_reads_the_device_once(layout, monkeypatch):
    """The per-image counts are the one value the plan needs from the device; every other size is known."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 49, 4, generator=g)
    keep = torch.rand(4, 49, generator=g) < 0.4
    order = torch.randperm(49, generator=g)
    expected = pack(x, keep, 9, layout, order, check_order=False)
    syncs = SyncCounter(monkeypatch)
    packed = pack(x, keep, 9, layout, order, check_order=False)
    _ = packed.padding_slots
    if layout != "masked":  # masked pads in place (unkept tokens): its rows are its slots, nothing reads this
        _ = packed._first_padding_slot
    assert syncs.calls == ["tolist"]
    for name in ("image", "position", "segment", "source", "slot_index", "source_index"):
        assert torch.equal(getattr(packed, name), getattr(expected, name))


def test_pack_reads_extra_flags_in_the_same_sync(monkeypatch):
    from spa.packing import _pack

    x, keep = torch.randn(2, 10, 3), torch.rand(2, 10) > 0.5
    flags = (torch.tensor(True), torch.tensor(False), torch.tensor(3))
    syncs = SyncCounter(monkeypatch)
    packed, values = _pack(x, keep, 4, sync_with=flags)
    assert values == [1, 0, 3] and syncs.calls == ["tolist"]
    assert packed.num_kept == int(keep.sum())
    # a partial order's check rides along too (and still raises)
    with pytest.raises(ValueError, match="not in order"):
        _pack(x, torch.ones(2, 10, dtype=torch.bool), 4, order=torch.arange(5), sync_with=flags)


@pytest.mark.parametrize("layout", ("containers", "stream", "padded"))
@given(case=ragged())
def test_one_image_plan_equals_the_general_plan(layout, case):
    """One image takes a short path to its plan (its kept tokens fill the slots in visiting order); it must give
    the general plan, field by field, and what the plan knows on the host."""
    import spa.packing

    x, keep, L, order = case
    for b in range(x.shape[0]):
        one = (x[b : b + 1], keep[b : b + 1], L, layout, order)
        fast = pack(*one)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(spa.packing, "_ONE_IMAGE_PLAN", False)
            general = pack(*one)
        for name in ("image", "position", "segment", "source", "slot_index", "source_index"):
            assert torch.equal(getattr(fast, name), getattr(general, name)), name
        assert fast._first_padding_slot == general._first_padding_slot
        assert fast.mixed_containers == general.mixed_containers


@pytest.mark.parametrize("layout", LAYOUTS)
@given(case=ragged())
def test_plan_knows_whether_a_container_holds_two_segments(layout, case):
    """``mixed_containers`` from the plan (host) against the slot map: equal, except that ``stream`` may say True
    where image boundaries happen to fall between containers (it never says False wrongly)."""
    from dataclasses import fields

    from spa.packing import Packed

    x, keep, L, order = case
    packed = pack(x, keep, L, layout, order)
    by_hand = Packed(**{f.name: getattr(packed, f.name) for f in fields(Packed)})
    segments = [
        {s for s in row if s >= 0} for row in packed.segment.tolist()
    ]  # real segment ids of every container
    exact = any(len(ids) > 1 for ids in segments)
    assert by_hand.mixed_containers == exact
    if layout == "stream":
        assert packed.mixed_containers or not exact
    else:
        assert packed.mixed_containers == exact
