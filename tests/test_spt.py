"""SPT backbone: timm equivalence, selections, batch invariance, gradients, sizes, registry, bad input."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import spa
from spa.models.spt import SPAStage

NANO = dict(img_size=112, num_classes=10)


def _nano(**kwargs) -> spa.SPT:
    return spa.create_model("spt_nano", **{**NANO, **kwargs})


def test_forward_intermediates_stop_early_returns_the_last_stage_run() -> None:
    model = _nano().eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        last, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        final, _ = model.forward_intermediates(x, indices=[1])
    assert len(maps) == 1 and torch.equal(maps[0], full[1])
    assert torch.equal(last.permute(0, 3, 1, 2), full[1])  # stage 2's map, not normed (the norm is stage 4's)
    torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.parametrize("size", [224, pytest.param(448, marks=pytest.mark.slow)])
def test_equivalence_with_timm_swin(size: int) -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=size).eval()
    model = spa.create_model("spt_tiny", depths=(2, 2, 6, 2), select="all", img_size=size).eval()
    result = spa.load_swin_weights(model, swin)
    assert not result.unexpected and all(".gate." in k for k in result.missing)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = swin.forward_intermediates(x, intermediates_only=True)
        got = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
        torch.testing.assert_close(logits, swin(x), atol=1e-4, rtol=0)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4
    # the packed path ran: one container per window in every SPA block
    grid = size // 32
    windows = [(grid * 2 // 7) ** 2] * 6 + [max(1, grid // 7) ** 2] * 2
    assert [blk.last_packed.num_containers for blk in model.spa_blocks()] == windows
    assert len(model.last_selections) == 8 and all(s.keep.all() for s in model.last_selections)


def test_selections_are_described() -> None:
    model = _nano().eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out, selections = model.forward_with_selections(x)
    assert out.shape == (2, 10)
    assert [(s.stage, s.block, s.stride) for s in selections] == [
        (2, 0, 16),
        (2, 1, 16),
        (2, 2, 16),
        (3, 0, 32),
    ]
    assert selections[0].keep.shape == (2, 7, 7) and selections[-1].keep.shape == (2, 4, 4)
    assert model.last_selections == selections
    maps, selections2 = model.forward_intermediates_with_selections(x)
    assert [m.shape[1:] for m in maps] == [(32, 28, 28), (64, 14, 14), (128, 7, 7), (256, 4, 4)]
    assert len(selections2) == 4


def test_logits_flow_within_and_across_stages() -> None:
    model = _nano(gate_init=0.3, spa_stages=(1, 2, 3)).eval()
    x = torch.randn(2, 3, 100, 116)  # odd maps: 13x15 -> 7x8 -> 4x4 (ceil-mode pooling)
    with torch.no_grad():
        _, selections = model.forward_with_selections(x)
    assert [s.stage for s in selections] == [1, 2, 2, 2, 3]
    assert selections[0].keep.shape == (2, 13, 15)
    for prev, cur in itertools.pairwise(selections):
        if cur.stage == prev.stage:
            carried = prev.fused_logits
        else:
            carried = F.max_pool2d(prev.fused_logits[:, None], 2, 2, ceil_mode=True)[:, 0]
        torch.testing.assert_close(cur.fused_logits, torch.maximum(cur.own_logits, carried))
    torch.testing.assert_close(selections[0].fused_logits, selections[0].own_logits)  # no previous logits


def test_batch_invariance_eval() -> None:
    model = _nano(gate_init=0.3).eval()
    images = torch.randn(5, 3, 112, 112)
    with torch.no_grad():
        batch, selections = model.forward_intermediates_with_selections(images)
        packed = model.spa_blocks()[0].last_packed
        shared = any(len(set(row[row >= 0].tolist())) > 1 for row in packed.image)
        kept = selections[0].keep.flatten(1).sum(1)
        for i in range(images.shape[0]):
            alone, _ = model.forward_intermediates_with_selections(images[i : i + 1])
            for a, b in zip(alone, batch):
                assert (a[0] - b[i]).abs().max() <= 1e-4
    assert shared, "the test must use batches where containers are actually shared"
    assert (kept > 0).all() and (kept < 49).all()


def test_gradients_reach_gates_from_task_and_selection_loss() -> None:
    model = _nano(gate_init=0.4, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 112, 112)
    out, selections = model.forward_with_selections(x)
    F.cross_entropy(out, torch.tensor([1, 2])).backward(retain_graph=True)
    gates = [blk.gate.proj.weight for blk in model.spa_blocks()]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    model.zero_grad()
    selection_loss = sum(
        F.binary_cross_entropy_with_logits(s.own_logits, torch.rand_like(s.own_logits).round())
        for s in selections
    )
    selection_loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize("layout", ["containers", "stream", "padded", "masked"])
def test_train_and_eval_run(layout: str) -> None:
    model = _nano(layout=layout, gate_init=0.4)
    x = torch.randn(2, 3, 112, 112)
    model.train()
    assert torch.isfinite(model(x)).all()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_zero_kept_and_all_kept() -> None:
    x = torch.randn(1, 3, 112, 112)
    none = _nano(gate_init=1e-4).eval()
    with torch.no_grad():
        maps, selections = none.forward_intermediates_with_selections(x)
    assert not any(s.keep.any() for s in selections)
    assert all(blk.last_packed.num_containers == 0 for blk in none.spa_blocks())
    assert torch.isfinite(maps[-1]).all()
    every = _nano(gate_init=0.999).eval()
    with torch.no_grad():
        _, selections = every.forward_with_selections(x)
    assert all(s.keep.all() for s in selections)


@pytest.mark.parametrize(
    ("built", "size"), [(224, (200, 232)), (224, (97, 130)), (224, (64, 64)), (64, (200, 232))]
)
def test_other_input_sizes(built: int, size: tuple[int, int]) -> None:
    model = _nano(gate_init=0.4, img_size=built).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        maps, selections = model.forward_intermediates_with_selections(x)
    H, W = -(-size[0] // 4), -(-size[1] // 4)
    for m in maps:
        assert m.shape[-2:] == (H, W)
        H, W = -(-H // 2), -(-W // 2)
    assert selections[0].keep.shape[1:] == maps[2].shape[-2:]


def test_timm_registry_features_only_and_head() -> None:
    assert {"spt_nano", "spt_tiny", "spt_small", "spt_base"} <= set(timm.list_models("spt_*"))
    features = timm.create_model("spt_nano", features_only=True, out_indices=(1, 3), img_size=112)
    assert features.feature_info.reduction() == [8, 32]
    x = torch.randn(1, 3, 112, 112)
    maps, selections = features.forward_with_selections(x)
    assert [m.shape for m in maps] == [(1, 64, 14, 14), (1, 256, 4, 4)]
    assert features.last_selections is not None and len(selections) == 4
    model = _nano()
    model.reset_classifier(3, global_pool="max")
    assert model(x).shape == (1, 3) and model.global_pool == "max"
    model.reset_classifier(0)
    assert model(x).shape == (1, 256)
    assert model.forward_features(x).shape == (1, 4, 4, 256)
    for name, depths, width in [("spt_tiny", 10, 96), ("spt_small", 22, 96), ("spt_base", 22, 128)]:
        with torch.device("meta"):
            big = spa.create_model(name)
        assert big.depths[2] == depths and big.embed_dim == width


def test_bad_input_and_options() -> None:
    model = _nano()
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 112, 112))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 112, 112))
    # an empty batch / image: named, not timm's reshape error
    for empty in ((0, 3, 112, 112), (1, 3, 0, 112)):
        with pytest.raises(ValueError, match="at least one image of at least 1 x 1 pixels"):
            model(torch.randn(empty))
    for name in ("window_size", "patch_size"):
        for bad in (0, -1, 2.5):
            with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
                spa.create_model("spt_nano", **{name: bad})
    with pytest.raises(ValueError, match="unknown SPT model"):
        spa.create_model("spt_huge")
    with pytest.raises(TypeError, match="unknown option"):
        spa.create_model("spt_nano", keep_treshold=0.2)
    with pytest.raises(TypeError, match="unknown option"):
        timm.create_model("spt_nano", bogus=1)
    with pytest.raises(ValueError, match="select"):
        spa.create_model("spt_nano", select="best")
    with pytest.raises(ValueError, match="layout"):
        spa.create_model("spt_nano", layout="dense")
    with pytest.raises(ValueError, match="spa_stages"):
        spa.create_model("spt_nano", spa_stages=(4,))
    with pytest.raises(ValueError, match="gate_init"):
        spa.create_model("spt_nano", gate_init=1.0)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("spt_nano", pretrained=True)
    assert isinstance(model.layers[2], SPAStage)


def _saved_bytes(fn) -> tuple[int, object]:
    """``(bytes of the tensors autograd saves for backward while fn runs, fn's result)``; checkpointing saves
    fewer."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_grad_checkpointing_recomputes_spa_blocks_with_the_same_selection() -> None:
    torch.manual_seed(0)
    model = _nano(gate_init=0.4, drop_path_rate=0.2).train()  # Gumbel noise and stochastic depth are random
    x = torch.randn(2, 3, 112, 112)
    results = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        saved, (out, selections) = _saved_bytes(lambda: model.forward_with_selections(x))
        loss = out.square().sum() + sum(s.own_logits.sigmoid().sum() for s in selections)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enable] = saved, out, [s.keep for s in selections], grads
    (saved_plain, out_plain, keep_plain, grads_plain) = results[False]
    (saved_ckpt, out_ckpt, keep_ckpt, grads_ckpt) = results[True]
    assert any(k.any() and not k.all() for k in keep_plain)  # a real partial selection
    assert saved_ckpt < 0.6 * saved_plain  # SPA stages (and timm's Swin stages) keep only block inputs
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(keep_ckpt, keep_plain))
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_checkpointing_of_spa_stages_alone_saves_memory() -> None:
    stage = SPAStage(32, 32, (14, 14), depth=2, downsample=False, num_heads=2, select="all").train()
    x = torch.randn(2, 14, 14, 32, requires_grad=True)
    plain, _ = _saved_bytes(lambda: stage(x))
    stage.grad_checkpointing = True
    ckpt, (out, _, _) = _saved_bytes(lambda: stage(x))
    assert ckpt < 0.2 * plain
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("train", [False, True])
def test_one_device_read_per_spa_block_and_shared_geometry(train, monkeypatch) -> None:
    """Issue #17: the packing counts are the only value an SPA block reads back from the device (they carry the
    gate's NaN check); the blocks of a stage share their window geometry (two: plain and shifted)."""
    model = _nano(select="topk", keep_ratio=0.3).train(train)
    x = torch.randn(2, 3, 112, 112)
    model(x)
    calls: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.inference_mode(not train):
        out = model(x)
    assert calls == ["tolist"] * len(model.spa_blocks())
    if train:
        out.sum().backward()
    stage = spa.create_model("spt_nano", img_size=112, depths=(1, 1, 4, 1)).layers[2]
    cpu = torch.device("cpu")
    shapes = {id(block.geometry(7, 7, cpu)) for block in stage.blocks}
    assert len(shapes) == 1  # a 7x7 map fits one window: no shift anywhere, one geometry
    shapes = {id(block.geometry(14, 14, cpu)) for block in stage.blocks}
    assert len(shapes) == 2 and stage.blocks[0].geometry(14, 14, cpu) is stage.blocks[2].geometry(14, 14, cpu)
