"""SPA block against a slow reference written from the spec (neighbourhood, region mask, bias rules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SyncCounter

from spa.models.spa_block import SPABlock


def _window_shift(H: int, W: int, M: int, shift: int) -> tuple[int, int, int, int]:
    """timm's size rule, restated: window shrinks to a smaller map, no shift where the map fits."""
    wh, ww = min(H, M), min(W, M)
    sh = 0 if H <= M else shift
    sw = 0 if W <= M else shift
    return wh, ww, sh, sw


def _region(index: int, padded: int, window: int, shift: int) -> int:
    """Swin's shifted-window region label along one axis (slices (0,-M), (-M,-s), (-s,None) of the padded map)."""
    if shift == 0 or index < padded - window:
        return 0
    return 1 if index < padded - shift else 2


def reference_block(
    block: SPABlock, x: torch.Tensor, keep: torch.Tensor, stream: bool = False
) -> torch.Tensor:
    """Loops over images, chunks and token pairs; the block's weights, the spec's rules. ``stream``: the paper's
    one stream, image after image, cut into chunks that may straddle two images (tokens attend only within
    their own image); else each image's kept tokens are cut into chunks by themselves (spec step 5)."""
    B, H, W, _ = x.shape
    M = block.target_window[0]
    wh, ww, sh, sw = _window_shift(H, W, M, block.target_shift[0])
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    L = wh * ww
    heads = block.attn.num_heads
    hd = block.attn.head_dim
    table = block.attn.relative_position_bias_table
    table_w = 2 * block.window_size[1] - 1
    th, tw = block.window_size
    own = block.gate.proj(x).squeeze(-1)
    soft = None if block.gate.select == "all" else torch.sigmoid(own)
    out = x.clone()
    sequences = []  # per image: (image, rolled row, rolled col, image row, image col) of kept tokens, window order
    for b in range(B):
        sequence = []
        for wr in range(hp // wh):
            for wc in range(wp // ww):
                for i in range(wh):
                    for j in range(ww):
                        r, c = wr * wh + i, wc * ww + j
                        if r < H and c < W:
                            ir, ic = (r + sh) % H, (c + sw) % W
                            if keep[b, ir, ic]:
                                sequence.append((b, r, c, ir, ic))
        sequences.append(sequence)
    if stream:
        sequences = [[token for sequence in sequences for token in sequence]]
    for sequence in sequences:
        for start in range(0, len(sequence), L):
            chunk = sequence[start : start + L]
            tokens = torch.stack([x[b, ir, ic] for b, _, _, ir, ic in chunk])
            qkv = F.linear(block.norm1(tokens), block.attn.qkv.weight, block.attn.qkv.bias)
            q, k, v = qkv.view(len(chunk), 3, heads, hd).unbind(1)
            attended = []
            for i, (bi, ri, ci, _, _) in enumerate(chunk):
                logits, values = [], []
                for j, (bj, rj, cj, _, _) in enumerate(chunk):
                    same_region = _region(ri, hp, wh, sh) == _region(rj, hp, wh, sh) and _region(
                        ci, wp, ww, sw
                    ) == _region(cj, wp, ww, sw)
                    if bi != bj or not same_region:
                        continue
                    dh = max(-(th - 1), min(th - 1, ri - rj)) + th - 1
                    dw = max(-(tw - 1), min(tw - 1, ci - cj)) + tw - 1
                    bias = table[dh * table_w + dw]  # [heads]
                    logits.append((q[i] * k[j]).sum(-1) * hd**-0.5 + bias)
                    values.append(v[j])
                weights = torch.stack(logits).softmax(0)  # [n, heads]
                attended.append((weights[:, :, None] * torch.stack(values)).sum(0).reshape(-1))
            update = block.attn.proj(torch.stack(attended))
            for i, (b, _, _, ir, ic) in enumerate(chunk):
                factor = 1.0 if soft is None else soft[b, ir, ic]
                y = x[b, ir, ic] + factor * update[i]
                out[b, ir, ic] = y + block.mlp(block.norm2(y))
    return out


def _mixed_keep(B: int, H: int, W: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """Per window of the image grid: empty, full or a random partial selection."""
    keep = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        for r in range(0, H, window):
            for c in range(0, W, window):
                mode = (b + r // window * 3 + c // window) % 3
                cell = keep[b, r : r + window, c : c + window]
                if mode == 1:
                    cell.fill_(True)
                elif mode == 2:
                    cell.copy_(torch.rand(cell.shape, generator=generator) < 0.5)
    return keep


def _block(resolution, shift: int, **kwargs) -> SPABlock:
    block = SPABlock(16, resolution, num_heads=2, window_size=7, shift_size=shift, **kwargs).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        block.gate.proj.weight.normal_(0, 0.5)
    return block


CASES = [((14, 14), 0), ((14, 14), 3), ((10, 12), 3), ((6, 9), 3), ((5, 5), 3), ((9, 8), 0)]


@pytest.mark.parametrize(("resolution", "shift"), CASES)
def test_partial_keep_matches_reference(resolution, shift) -> None:
    H, W = resolution
    generator = torch.Generator().manual_seed(H * 31 + W + shift)
    block = _block(resolution, shift)
    x = torch.randn(3, H, W, 16, generator=generator)
    keep = _mixed_keep(3, H, W, 7, generator)
    with torch.no_grad():
        out, selection = block(x, keep=keep)
        expected = reference_block(block, x, keep)
    assert torch.equal(selection.keep, keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert torch.equal(out[~keep], x[~keep])  # unselected tokens pass through bit-identical


def test_select_all_matches_reference_and_counts_windows() -> None:
    block = _block((14, 14), 3, select="all")
    x = torch.randn(2, 14, 14, 16)
    keep = torch.ones(2, 14, 14, dtype=torch.bool)
    with torch.no_grad():
        out, selection = block(x)
        expected = reference_block(block, x, keep)
    assert selection.keep.all()
    assert block.last_packed.num_containers == 2 * 4  # one container per window
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [0, 3])
def test_layouts_agree(shift: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, 12, 16, generator=generator)
    keep = _mixed_keep(4, 10, 12, 7, generator)
    keep[1] = False  # an image with nothing kept
    outputs = {}
    for layout in ("containers", "padded", "masked", "stream"):
        torch.manual_seed(0)
        block = _block((10, 12), shift, layout=layout)
        with torch.no_grad():
            outputs[layout] = block(x, keep=keep)[0]
    for layout in ("padded", "masked"):
        torch.testing.assert_close(outputs[layout], outputs["containers"], atol=1e-5, rtol=0)
    # the paper's one stream: chunks straddle images, so its outputs differ, and match the stream reference
    torch.manual_seed(0)
    block = _block((10, 12), shift, layout="stream")
    with torch.no_grad():
        expected = reference_block(block, x, keep, stream=True)
    torch.testing.assert_close(outputs["stream"], expected, atol=1e-5, rtol=0)
    assert (outputs["stream"] - outputs["containers"]).abs().max() > 1e-3
    assert torch.equal(outputs["stream"][~keep], x[~keep])


def test_ffn_all_updates_unkept_tokens() -> None:
    block = _block((7, 7), 0, ffn="all")
    x = torch.randn(2, 7, 7, 16)
    keep = torch.rand(2, 7, 7) < 0.5
    with torch.no_grad():
        out, _ = block(x, keep=keep)
        rest = x[~keep]
        torch.testing.assert_close(out[~keep], rest + block.mlp(block.norm2(rest)), atol=1e-6, rtol=0)


def test_zero_kept_and_previous_logits() -> None:
    block = _block((7, 7), 0)
    x = torch.randn(2, 7, 7, 16)
    previous = torch.full((2, 7, 7), 3.0)
    with torch.no_grad():
        out, selection = block(x, previous_logits=previous, keep=torch.zeros(2, 7, 7, dtype=torch.bool))
    assert torch.equal(out, x) and block.last_packed.num_containers == 0
    assert torch.all(selection.fused_logits >= 3.0)
    torch.testing.assert_close(selection.fused_logits, torch.maximum(selection.own_logits, previous))


def test_drop_path_is_per_image_and_train_mode_runs() -> None:
    block = _block((7, 7), 0, drop_path=0.5, ffn="all").train()
    x = torch.randn(8, 7, 7, 16, requires_grad=True)
    out, selection = block(x)
    out.sum().backward()
    assert x.grad is not None and block.gate.proj.weight.grad is not None
    changed = (out - x).detach().abs().amax(-1).flatten(1) > 0  # [B, N]
    # draws per image (never per container): with ffn='all' an image has every token updated (MLP branch on),
    # only its kept tokens (attention branch alone) or none
    kept = selection.keep.flatten(1)
    assert all(
        changed[b].all() or not changed[b].any() or torch.equal(changed[b], kept[b]) for b in range(len(x))
    )
    assert changed.all(1).any() and (~changed).all(1).any()
    assert selection.keep.any()


def test_drop_path_draws_the_two_branches_independently_as_timm() -> None:
    """An image is left unchanged only when both branches are dropped: 1/4 of images at rate 0.5 with
    independent draws (timm's Swin block), 1/2 if one draw scaled both."""
    torch.manual_seed(0)
    block = _block((7, 7), 0, drop_path=0.5, select="all").train()
    x = torch.randn(256, 7, 7, 16)
    with torch.no_grad():
        out, _ = block(x)
    unchanged = ((out - x).abs().amax(-1).flatten(1) == 0).all(1).float().mean().item()
    assert 0.15 < unchanged < 0.35


def test_bad_keep_override() -> None:
    block = _block((7, 7), 0)
    x = torch.randn(1, 7, 7, 16)
    with pytest.raises(TypeError, match="keep"):
        block(x, keep=torch.ones(1, 7, 7))
    with pytest.raises(ValueError, match="keep"):
        block(x, keep=torch.ones(1, 6, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="previous_logits"):
        block(x, previous_logits=torch.zeros(1, 49))
    with pytest.raises(ValueError, match="SPABlock expects"):
        block(torch.randn(1, 7, 7, 8))
    with pytest.raises(ValueError, match="at least 1 x 1 tokens"):
        block(torch.randn(1, 0, 7, 16))
    with pytest.raises(TypeError, match="previous_logits must be floating point"):
        block(x, previous_logits=torch.ones(1, 7, 7, dtype=torch.bool))
    for kwargs, match in (({"window_size": 0}, "window_size must be an integer >= 1"),
                          ({"window_size": 7, "shift_size": 7}, r"shift_size must be an integer in \[0, window_size=7\)"),
                          ({"window_size": 7, "shift_size": -1}, "shift_size")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            SPABlock(16, (7, 7), 2, **kwargs)


def test_maps_of_other_sizes_than_built() -> None:
    block = _block((14, 14), 3)
    with torch.no_grad():
        out, _ = block(torch.randn(1, 5, 6, 16))
    assert out.shape == (1, 5, 6, 16)
    small = _block((4, 4), 0)  # bias table of a 4x4 window: larger offsets are clipped to it
    x = torch.randn(1, 14, 14, 16)
    keep = _mixed_keep(1, 14, 14, 7, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, _ = small(x, keep=keep)
        assert small.last_packed.length == 49
        torch.testing.assert_close(out, reference_block(small, x, keep), atol=1e-5, rtol=0)


def test_block_keeps_the_plan_but_not_its_input() -> None:
    """``last_packed`` is for inspection: it must not hold on to the block's input between steps."""
    import gc
    import weakref

    block = SPABlock(16, (14, 14), 2, select="topk", keep_ratio=0.5)
    x = torch.randn(2, 14, 14, 16, requires_grad=True)
    out, selection = block(x)
    out.sum().backward()
    plan = block.last_packed
    assert plan.inputs is None and plan.num_kept == 2 * 98
    with pytest.raises(ValueError, match="without its inputs"):
        _ = plan.tokens
    alive = weakref.ref(x)
    del x, out, selection  # the selection's logits lead back to x through autograd
    gc.collect()
    assert alive() is None


# --- fixed per-block cost (issue #17): shared geometry and pair tables, one device sync -------------------


def _spread_gate(block: SPABlock) -> SPABlock:
    with torch.no_grad():
        block.gate.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return block


@pytest.mark.parametrize("layout", ["containers", "stream", "padded", "masked"])
@pytest.mark.parametrize("select", ["gate", "topk", "random"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("ffn", ["kept", "all"])
def test_block_forward_reads_the_device_once(layout, select, train, ffn, monkeypatch):
    """The packing counts are the one read: the gate's NaN check rides along with them, every other size is
    known on the host (CPU here; the same calls would wait for a GPU)."""
    torch.manual_seed(0)
    block = _spread_gate(
        SPABlock(16, (14, 14), 2, shift_size=3, select=select, keep_threshold=0.5, layout=layout, ffn=ffn)
    ).train(train)
    x = torch.randn(2, 14, 14, 16, requires_grad=train)
    block(x)  # the first call builds the shared geometry and pair tables
    syncs = SyncCounter(monkeypatch)
    with torch.inference_mode(not train):
        out, selection = block(x, torch.randn(2, 14, 14))
    assert syncs.calls == ["tolist"]
    assert 0 < int(selection.keep.sum()) < 2 * 196
    if train:
        out.sum().backward()


@pytest.mark.parametrize("select", ["gate", "topk", "random"])
@pytest.mark.parametrize("train", [False, True])
def test_nan_logits_still_raise_in_the_block(select, train):
    torch.manual_seed(0)
    block = SPABlock(16, (14, 14), 2, select=select).train(train)
    x = torch.randn(2, 14, 14, 16)
    bad = x.clone()
    bad[1, 3, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        block(bad)
    with pytest.raises(ValueError, match="logits contain NaN"):
        block(x, torch.full((2, 14, 14), float("nan")))
    with pytest.raises(
        ValueError, match="logits contain NaN"
    ):  # a forced keep: the gate checks first, as before
        block(bad, keep=torch.ones(2, 14, 14, dtype=torch.bool))
    with pytest.raises(ValueError, match="logits contain NaN"):
        block(bad, keep=torch.ones(2, 14, 14))  # and before the keep's own checks
    out, _ = block(x)  # the block is usable afterwards (the gate checks again when called on its own)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="NaN"):
        block.gate(bad.reshape(2, 196, 16))
    # inf in a token: a finite-looking decision, but attention over that token would NaN its whole window
    for value in (float("inf"), float("-inf")):
        worse = x.clone()
        worse[1, 3, 4, 0] = value
        with pytest.raises(ValueError, match="logits contain NaN or inf"):
            block(worse)
        with pytest.raises(ValueError, match="logits contain NaN or inf"):
            block(worse, torch.zeros(2, 14, 14))  # fused with finite previous logits too
    never = torch.full((2, 14, 14), float("-inf"))  # -inf previous logits ("never keep" from before): allowed
    out, _ = block(x, never)
    assert torch.isfinite(out).all()


def test_select_all_ignores_nan_logits_as_before() -> None:
    block = SPABlock(16, (14, 14), 2, select="all").eval()
    x = torch.randn(1, 14, 14, 16)
    with torch.no_grad():
        block.gate.proj.bias.fill_(float("nan"))  # 'all' does not read the gate's logits
    out, selection = block(x)
    assert selection.keep.all() and torch.isfinite(out).all()


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("backend", ["math", "math+dropout", "sdpa", "reference"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_pair_tables_give_what_the_per_call_hooks_give(shift, backend, train, batch, monkeypatch):
    """Maps up to ``_PAIR_TABLE_MAX_TOKENS`` look bias entries and region masks up in shared tables; larger ones
    compute them per call from the coordinates. Both must give bit-identical outputs and gradients (attention
    dropout in training: the slot path of the ``math`` backend). With tables the ``math`` rows path reads
    padding and regions off one padded table, and masks segments only where a container holds two (batch 2);
    one image (batch 1) has a plan of its own (``spa.packing._pack_one_image``)."""
    import copy

    import spa.models.spa_block as spa_block

    torch.manual_seed(0)
    drop = 0.2 if backend == "math+dropout" else 0.0
    block = SPABlock(
        16, (14, 14), 2, shift_size=shift, keep_threshold=0.5, backend=backend.split("+")[0], attn_drop=drop
    )
    block = _spread_gate(block)
    per_call = copy.deepcopy(block)
    monkeypatch.setattr(spa_block, "_PAIR_TABLE_MAX_TOKENS", 0)
    results = []
    for b in (per_call, block):
        if b is block:
            monkeypatch.setattr(spa_block, "_PAIR_TABLE_MAX_TOKENS", 1024)
        b.train(train)
        x = torch.randn(batch, 14, 14, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(2)
        out, selection = b(x)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        results.append((out, selection.keep, x.grad, [p.grad for p in b.parameters()]))
        if batch == 2 and b is block and backend == "math" and not train:
            assert b.last_packed.mixed_containers  # the segment mask is exercised
    assert per_call._tables(14, 14, per_call.geometry(14, 14, "cpu"), torch.device("cpu")) is None
    assert block._tables(14, 14, block.geometry(14, 14, "cpu"), torch.device("cpu")) is not None
    (out_a, keep_a, gx_a, gp_a), (out_b, keep_b, gx_b, gp_b) = results
    assert 0 < int(keep_a.sum()) < keep_a.numel()
    assert torch.equal(out_a, out_b) and torch.equal(keep_a, keep_b) and torch.equal(gx_a, gx_b)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(gp_a, gp_b))


def test_blocks_share_geometry_and_pair_tables() -> None:
    a = SPABlock(16, (14, 14), 2, shift_size=3)
    b = SPABlock(32, (14, 14), 4, shift_size=3)  # other width and heads: the same geometry
    c = SPABlock(16, (14, 14), 2, shift_size=0)
    cpu = torch.device("cpu")
    assert a.geometry(14, 14, cpu) is b.geometry(14, 14, "cpu") is a.geometry(14, 14, cpu)
    assert a.geometry(14, 14, cpu) is not c.geometry(14, 14, cpu)
    geometry = a.geometry(14, 14, cpu)
    assert a._tables(14, 14, geometry, cpu) is b._tables(14, 14, geometry, cpu)
    # tables built in inference mode serve training too (they are plain tensors)
    d = SPABlock(16, (15, 15), 2, shift_size=3)
    with torch.inference_mode():
        d(torch.randn(1, 15, 15, 16))
    out, _ = d(torch.randn(1, 15, 15, 16, requires_grad=True))
    out.sum().backward()
    assert not d._tables(15, 15, d.geometry(15, 15, cpu), cpu).entry.is_inference()


def test_shared_tables_are_bounded_and_rebuilt_alike(monkeypatch) -> None:
    import spa.models.spa_block as spa_block

    monkeypatch.setattr(spa_block, "_SHARED_CACHE_BYTES", 3 * 2**20)  # about one 21 x 21 pair table set
    monkeypatch.setattr(spa_block, "_PAIR_TABLES", spa_block.OrderedDict())
    block = SPABlock(16, (14, 14), 2, shift_size=3, select="topk", keep_ratio=0.5).eval()
    outputs = {}
    for size in (14, 21, 28, 21, 14):
        x = torch.randn(1, size, size, 16, generator=torch.Generator().manual_seed(size))
        out, _ = block(x)
        if size in outputs:  # rebuilt after eviction, or reused: the same result
            assert torch.equal(out, outputs[size])
        outputs[size] = out
        tables = spa_block._PAIR_TABLES
        assert sum(spa_block._nbytes(v) for v in tables.values()) <= 3 * 2**20 or len(tables) == 1
    assert len(spa_block._PAIR_TABLES) < 3


def test_copies_and_pickles_of_a_block_leave_the_caches_behind() -> None:
    import copy
    import io

    torch.manual_seed(0)
    block = SPABlock(16, (14, 14), 2, shift_size=3, select="topk", keep_ratio=0.4).eval()
    x = torch.randn(2, 14, 14, 16)
    out, _ = block(x)
    assert block._geometry_cache and block._last_pair_tables is not None
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(block), torch.load(buffer, weights_only=False)):
        assert other._geometry_cache == {} and other._last_pair_tables is None
        again, _ = other(x)
        assert torch.equal(again, out)
        assert other.geometry(14, 14, "cpu") is block.geometry(14, 14, "cpu")  # the shared one again


def _timm_block_without_padding_keys(swin, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SwinTransformerBlock`` forward, from its own modules and helpers, with one change: the zero
    padding that timm appends to a map that is not a multiple of the window is masked out of the keys."""
    from timm.models.swin_transformer import window_partition, window_reverse

    _, H, W, C = x.shape
    (wh, ww), (sh, sw) = swin.window_size, swin.shift_size
    h = swin.norm1(x)
    if sh or sw:
        h = torch.roll(h, shifts=(-sh, -sw), dims=(1, 2))
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = h.shape[1:3]
    real = F.pad(torch.ones(1, H, W, 1), (0, 0, 0, pad_w, 0, pad_h))
    real = window_partition(real, (wh, ww)).reshape(-1, wh * ww)  # [windows, N]
    mask = torch.zeros(real.shape[0], wh * ww, wh * ww) if swin.attn_mask is None else swin.attn_mask.clone()
    mask = mask.masked_fill(real[:, None, :] == 0, float("-inf"))
    windows = swin.attn(window_partition(h, (wh, ww)).reshape(-1, wh * ww, C), mask=mask)
    out = window_reverse(windows.reshape(-1, wh, ww, C), (wh, ww), Hp, Wp)[:, :H, :W]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    y = x + out
    return y + swin.mlp(swin.norm2(y))


@pytest.mark.parametrize("shift", [0, 3])
def test_select_all_where_the_map_is_not_a_multiple_of_the_window(shift: int) -> None:
    """Border windows are partial there, and (spec step 5) the kept tokens, in window order, are cut into chunks
    of 49 that can span them: ``select='all'`` follows that rule (the reference), so it is not timm's block
    there, neither timm as it is (it attends over zero padding) nor timm with the padding masked out (its
    windows are not the chunks). Where the partial windows fill chunks by themselves it is the latter."""
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    for size, chunks_are_windows in (((10, 10), False), ((7, 16), True)):
        swin = SwinTransformerBlock(16, size, 2, window_size=7, shift_size=shift).eval()
        block = SPABlock(16, size, 2, window_size=7, shift_size=shift, select="all").eval()
        result = block.load_state_dict(swin.state_dict(), strict=False)
        assert sorted(result.missing_keys) == ["gate.proj.bias", "gate.proj.weight"]
        x = torch.randn(2, *size, 16)
        keep = torch.ones(2, *size, dtype=torch.bool)
        with torch.no_grad():
            out, _ = block(x)
            without_padding = _timm_block_without_padding_keys(swin, x)
            plain = swin(x)
            torch.testing.assert_close(out, reference_block(block, x, keep), atol=1e-5, rtol=0)
        # per image two full chunks of 49 (and a tail of 2 or 14 tokens): the two tails share one container
        assert block.last_packed.num_containers == 5
        assert (out - plain).abs().max() > 1e-3  # timm's zero padding changes its output
        if chunks_are_windows:  # 7 x 16: windows of 49, 49 and 14 tokens, each a chunk of its own
            torch.testing.assert_close(out, without_padding, atol=1e-5, rtol=1e-5)
        else:
            assert (out - without_padding).abs().max() > 1e-3
