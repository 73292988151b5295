"""The ``varlen`` backend's FlexAttention: per-token mask/score mods, the per-plan block mask, CPU forward.

q, k and v are distinct tensors in every call: torch 2.14 fails with a TypeError while explaining a recompile of
eager FlexAttention (it traces the call) for q = k = v after calls with other hooks.

FlexAttention has no backward on CPU and the backend itself asks for CUDA, so these tests call its kernel
path (``_flex``) eagerly on CPU, forward only; the compiled kernel is checked in a slow test.
"""

from __future__ import annotations

import pytest
import torch

import spa.attention as attention
from spa.attention import (
    RegionMask,
    RelativePositionBias,
    _flex,
    _flex_attention_fn,
    _flex_mask_mod,
    _flex_score_mod,
    allowed_pairs,
    packed_attention,
)
from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS, pack

DIM, HEADS = 16, 2


def _block(shift: int, resolution=(14, 14), backend: str = "sdpa") -> SPABlock:
    block = SPABlock(DIM, resolution, HEADS, window_size=7, shift_size=shift, backend=backend).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
    return block


def _plan(block: SPABlock, layout: str, seed: int = 0, B: int = 3):
    """A packed plan of a random selection in ``block``'s window order, with its geometry and pair tables."""
    H, W = block.input_resolution
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H * W, DIM, generator=g)
    keep = torch.rand(B, H * W, generator=g) < 0.45
    geometry = block.geometry(H, W, x.device)
    packed = pack(x, keep, geometry.window[0] * geometry.window[1], layout, geometry.order)
    tables = block._tables(H, W, geometry, x.device)
    return packed, geometry, tables, packed.select(x)


def _hooks(block: SPABlock, backend: str, packed, geometry, tables, rows):
    block.attn.backend = backend
    try:
        return block._pair_hooks(geometry, tables, rows, packed)
    finally:
        block.attn.backend = "sdpa"


def _grid(K: int, H: int, S: int):
    """Broadcastable ``b, h, q_idx, kv_idx`` index tensors over ``[K, H, S, S]``."""
    return (
        torch.arange(K).view(K, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(S).view(1, 1, S, 1),
        torch.arange(S).view(1, 1, 1, S),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("with_tables", [True, False])
def test_mods_match_the_dense_mask_and_bias_they_replace(layout, shift, with_tables):
    """Evaluated over every ``(container, head, query, key)``, the ``mask_mod`` is ``allowed_pairs`` of the dense
    region mask and the ``score_mod`` adds exactly the dense relative position bias."""
    block = _block(shift)
    packed, geometry, tables, rows = _plan(block, layout, seed=shift + len(layout))
    tables = tables if with_tables else None
    bias_hook, mask_hook = _hooks(block, "varlen", packed, geometry, tables, rows)
    assert isinstance(bias_hook, RelativePositionBias)
    assert (mask_hook is None) == (shift == 0)
    if shift:
        assert isinstance(mask_hook, RegionMask)
    # the dense hooks the other backends get (the per-call computation from the coordinates)
    dense_bias_hook, dense_mask_hook = _hooks(block, "sdpa", packed, geometry, None, rows)
    position = packed.position
    K, S = packed.image.shape
    b, h, q_idx, kv_idx = _grid(K, HEADS, S)

    expected_allowed = allowed_pairs(
        packed.segment, None if dense_mask_hook is None else dense_mask_hook(position)
    )
    allowed = _flex_mask_mod(packed, mask_hook)(b, h, q_idx, kv_idx)
    assert allowed.shape == (K, 1, S, S)
    assert torch.equal(allowed[:, 0], expected_allowed)

    with torch.no_grad():
        expected_bias = dense_bias_hook(position).dense()
        score = _flex_score_mod(packed, bias_hook, None)(torch.zeros(K, HEADS, S, S), b, h, q_idx, kv_idx)
    assert torch.equal(score, expected_bias)
    # called as a hook, the per-token objects give what the other backends' hooks give
    assert torch.equal(bias_hook(position).dense(), expected_bias)
    if shift:
        assert torch.equal(mask_hook(position), dense_mask_hook(position))


def test_relative_position_bias_hook_with_and_without_pair_lookups():
    block = _block(3, resolution=(10, 12))
    packed, geometry, tables, _ = _plan(block, "containers")
    table = block.attn.relative_position_bias_table
    lookup = RelativePositionBias(table, geometry.coords, block.attn.window, tables.entry)
    computed = RelativePositionBias(table, geometry.coords, block.attn.window)
    expected = block.attn.relative_position_bias(geometry.coords[packed.position.clamp(min=0)])
    assert torch.equal(lookup(packed.position).index, expected.index)
    assert torch.equal(computed(packed.position).index, expected.index)
    region = RegionMask(geometry.region)
    assert torch.equal(
        region(packed.position), RegionMask(geometry.region, tables.same_region)(packed.position)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shift", [0, 3])
def test_flex_forward_with_token_hooks_matches_sdpa(layout, shift):
    block = _block(shift)
    packed, geometry, tables, rows = _plan(block, layout, seed=7 + shift)
    bias_hook, mask_hook = _hooks(block, "varlen", packed, geometry, tables, rows)
    dense_bias_hook, dense_mask_hook = _hooks(block, "sdpa", packed, geometry, tables, rows)
    K, S = packed.image.shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(K, HEADS, S, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        flex = _flex(q, k, v, packed, bias_hook, mask_hook, None)
        sdpa = packed_attention(q, k, v, packed, dense_bias_hook, dense_mask_hook, backend="sdpa")
    real = (packed.image >= 0)[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_block_mask_is_built_once_per_plan_and_shared_by_heads(monkeypatch):
    from torch.nn.attention import flex_attention as flex_module

    block = _block(3)
    packed, geometry, tables, rows = _plan(block, "containers")
    bias_hook, mask_hook = _hooks(block, "varlen", packed, geometry, tables, rows)
    built = []
    create = flex_module.create_block_mask

    def counting(*args, **kwargs):
        built.append(args[2])  # the heads argument
        return create(*args, **kwargs)

    monkeypatch.setattr(flex_module, "create_block_mask", counting)
    K, S = packed.image.shape
    q, k, v = (torch.randn(K, HEADS, S, 8) for _ in range(3))
    with torch.no_grad():
        first = _flex(q, k, v, packed, bias_hook, mask_hook, None)
        # new hook objects (a block makes them per call) over the same geometry: the plan's mask is reused
        bias_again, mask_again = _hooks(block, "varlen", packed, geometry, tables, rows)
        again = _flex(q, k, v, packed, bias_again, mask_again, None)
    assert built == [None]  # one mask for all heads, built once
    assert torch.equal(first, again)
    (block_mask,) = (v[1] for k, v in packed.__dict__["_flex_cache"].items() if k == ("block_mask",))
    assert block_mask.shape[:2] == (K, 1)
    # another plan (or another mask over this plan) builds its own
    other, *_ = _plan(block, "containers", seed=1)
    q_other = [torch.randn(other.num_containers, HEADS, other.image.shape[1], 8) for _ in range(3)]
    with torch.no_grad():
        _flex(*q_other, other, None, None, None)
        _flex(q, k, v, packed, bias_hook, None, None)
    assert built == [None, None, None]
    assert packed.__dict__["_flex_cache"][("block_mask",)][0] == (packed.segment,)


def test_generic_hooks_still_work_through_dense_mods():
    """Hooks that are plain callables (not the per-token classes) are evaluated densely, as before."""
    x = torch.randn(3, 20, 8)
    packed = pack(x, torch.rand(3, 20) < 0.6, 7)
    bias = torch.randn(HEADS, 6, 6)

    def pair_bias(position):
        p = position.clamp(min=0) % 6
        return bias[:, p[:, :, None], p[:, None, :]].permute(1, 0, 2, 3)

    def pair_mask(position):
        region = position.clamp(min=0) % 3 == 0
        return region[:, :, None] == region[:, None, :]

    q, k, v = (torch.randn(packed.num_containers, HEADS, 7, 4) for _ in range(3))
    flex = _flex(q, k, v, packed, pair_bias, pair_mask, None)
    sdpa = packed_attention(q, k, v, packed, pair_bias, pair_mask, backend="sdpa")
    real = (packed.image >= 0)[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_flex_is_not_compiled_on_cpu(monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    assert _flex_attention_fn(False) is flex_attention
    compiled = []
    compile_ = torch.compile

    def recording(fn=None, **kwargs):
        compiled.append(fn)
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(attention, "_COMPILED_FLEX", [])
    packed = pack(torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), 2)
    q, k, v = (torch.randn(2, HEADS, 2, 4) for _ in range(3))
    _flex(q, k, v, packed, None, None, None)  # eager on CPU by default
    assert flex_attention not in compiled and attention._COMPILED_FLEX == []


@pytest.mark.parametrize("shift", [0, 3])
def test_spa_block_forward_on_varlen_matches_sdpa(shift, monkeypatch):
    """A whole SPA block on ``varlen`` (its CUDA check bypassed: FlexAttention eagerly on CPU, forward only)."""

    def varlen_anywhere(q, k, v, packed, pair_bias, pair_mask, dropout_p, scale):
        assert isinstance(pair_bias, RelativePositionBias)
        assert isinstance(pair_mask, RegionMask) == bool(shift)
        return _flex(q, k, v, packed, pair_bias, pair_mask, scale)

    monkeypatch.setitem(attention._BACKEND_FNS, "varlen", varlen_anywhere)
    ref = _block(shift, backend="sdpa")
    flex = _block(shift, backend="varlen")
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 14, 14, DIM, generator=torch.Generator().manual_seed(5))
    keep = torch.rand(2, 14, 14, generator=torch.Generator().manual_seed(6)) < 0.4
    with torch.no_grad():
        expected, _ = ref(x, keep=keep)
        out, _ = flex(x, keep=keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_varlen_still_asks_for_cuda_and_refuses_dropout():
    block = _block(0, backend="varlen")
    with pytest.raises(RuntimeError, match="needs a CUDA device"), torch.no_grad():
        block(torch.randn(1, 14, 14, DIM))
    packed = pack(torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), 2)
    q = torch.randn(2, HEADS, 2, 4)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        packed_attention(q, q, q, packed, backend="varlen", dropout_p=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [0, 3])
def test_compiled_flex_on_cpu_matches_sdpa(shift):
    """The compiled FlexAttention kernel (what CUDA runs), here through Inductor's CPU template (forward)."""
    block = _block(shift)
    packed, geometry, tables, rows = _plan(block, "containers", seed=11)
    bias_hook, mask_hook = _hooks(block, "varlen", packed, geometry, tables, rows)
    dense_bias_hook, dense_mask_hook = _hooks(block, "sdpa", packed, geometry, tables, rows)
    K, S = packed.image.shape
    q, k, v = (torch.randn(K, HEADS, S, 8) for _ in range(3))
    with torch.no_grad():
        flex = _flex(q, k, v, packed, bias_hook, mask_hook, None, compiled=True)
        sdpa = packed_attention(q, k, v, packed, dense_bias_hook, dense_mask_hook, backend="sdpa")
    real = (packed.image >= 0)[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-4, rtol=1e-4)
