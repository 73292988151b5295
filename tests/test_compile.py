"""``spa.compile_model``: which blocks get wrapped, bad input, the eager path left alone.

Actual compilation is 40 s+ per graph on a small CPU: only the ``slow`` tests compile. The default tests swap
``torch.compile`` for a pass-through to check the plumbing.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

import spa
from spa.compile import _CompiledKeptUpdate, compile_model, compiled_regions
from spa.models import create_backbone
from spa.models.spa_block import SPABlock


@pytest.fixture
def fake_compile(monkeypatch):
    """``torch.compile`` as a pass-through that records its options."""
    calls = []

    def passthrough(fn=None, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", passthrough)
    return calls


def _blocks(model: nn.Module) -> tuple[list[str], list[str]]:
    spa_blocks = [n for n, m in model.named_modules() if isinstance(m, SPABlock)]
    swin_blocks = [n for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]
    return spa_blocks, swin_blocks


def test_exported_from_the_package():
    assert spa.compile_model is compile_model


@pytest.mark.parametrize("name", ["spt_nano", "swin_nano"])
@pytest.mark.parametrize("features_only", [False, True])
def test_every_block_is_wrapped_and_nothing_else(name, features_only, fake_compile):
    model = create_backbone(name, features_only=features_only, img_size=64).eval()
    spa_blocks, swin_blocks = _blocks(model)
    assert swin_blocks and bool(spa_blocks) == name.startswith("spt")
    keys = list(model.state_dict())
    assert compiled_regions(model) == []
    assert compile_model(model) is model
    assert sorted(compiled_regions(model)) == sorted(spa_blocks + swin_blocks)
    assert list(model.state_dict()) == keys  # same weights, same names
    for n, m in model.named_modules():
        if isinstance(m, SPABlock):
            assert isinstance(m.__dict__["_kept_update"], _CompiledKeptUpdate)
        elif not isinstance(m, SwinTransformerBlock):
            assert getattr(m, "_compiled_call_impl", None) is None, n  # stems, merges, heads stay eager
    # timm blocks are compiled at once (a wrapper, no tracing yet); SPA blocks on first call
    assert fake_compile == [{"dynamic": True, "mode": None}] * len(swin_blocks)


def test_wrappers_find_the_blocks_of_detectors_and_classifiers(fake_compile):
    from spa.tasks.detection import build_detector

    det = build_detector(model="spt_nano", num_classes=2, img_size=64, min_size=64, max_size=64)
    spa_blocks, swin_blocks = _blocks(det)
    compile_model(det, mode="max-autotune-no-cudagraphs", dynamic=False)
    assert sorted(compiled_regions(det)) == sorted(spa_blocks + swin_blocks) and spa_blocks
    assert fake_compile[0] == {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    block = det.get_submodule(spa_blocks[0])
    assert block._kept_update.options == {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}


def test_dense_static_compiles_timm_blocks_with_static_sizes(fake_compile):
    model = create_backbone("spt_nano", img_size=64).eval()
    spa_blocks, swin_blocks = _blocks(model)
    compile_model(model, dense_static=True)
    assert fake_compile == [{"dynamic": False, "mode": None}] * len(swin_blocks)
    for name in spa_blocks:  # the SPA blocks keep symbolic sizes: their row counts change every call
        assert model.get_submodule(name)._kept_update.options == {"dynamic": True, "mode": None}
    with pytest.raises(TypeError, match="dense_static"):
        compile_model(create_backbone("swin_nano", img_size=64), dense_static="yes")


def test_single_blocks_and_idempotence(fake_compile):
    block = SPABlock(16, (14, 14), 2)
    compile_model(block)
    wrapper = block.__dict__["_kept_update"]
    compile_model(block)
    assert block.__dict__["_kept_update"] is wrapper and compiled_regions(block) == [""]
    swin = SwinTransformerBlock(16, (14, 14), 2, window_size=7)
    compile_model(swin)
    compile_model(swin)
    assert len(fake_compile) == 1 and compiled_regions(swin) == [""]


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        compile_model(lambda x: x)
    block = SPABlock(16, (14, 14), 2)
    with pytest.raises(ValueError, match="mode"):
        compile_model(block, mode="fastest")
    with pytest.raises(TypeError, match="dynamic"):
        compile_model(block, dynamic="yes")
    with pytest.raises(ValueError, match="no SPABlock"):
        compile_model(nn.Sequential(nn.Linear(2, 2)))
    assert compiled_regions(block) == []  # nothing was wrapped on the way


def test_compiled_plumbing_gives_the_eager_outputs(fake_compile):
    """Through the wrappers (``torch.compile`` a pass-through) the model computes what it did eagerly; the
    original of a compiled copy is untouched."""
    torch.manual_seed(0)
    model = create_backbone("spt_nano", img_size=64).eval()
    compiled = compile_model(copy.deepcopy(model))
    assert compiled_regions(model) == []
    assert all("_kept_update" not in m.__dict__ for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    calls = len(fake_compile)
    with torch.no_grad():
        compiled(x)
    assert len(fake_compile) == calls  # each wrapper compiles once


def test_copies_and_pickles_of_compiled_blocks_compile_again(fake_compile):
    block = compile_model(SPABlock(16, (14, 14), 2).eval())
    x = torch.randn(1, 14, 14, 16)
    with torch.no_grad():
        expected, _ = block(x)
    assert block._kept_update._fn is not None
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        wrapper = clone.__dict__["_kept_update"]
        assert wrapper.block is clone and wrapper._fn is None
        with torch.no_grad():
            assert torch.equal(clone(x)[0], expected)


def _spt(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("spt_nano", img_size=64, select="topk", **kwargs).eval()


@pytest.mark.slow
def test_compiled_spt_matches_eager_and_reuses_its_graphs():
    """Outputs as eager for several kept counts and batch sizes; a second pass over the same settings (new
    images) compiles nothing new. (The first pass may add graphs: batch size 1, trimmed containers.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _spt()
    compiled = compile_model(copy.deepcopy(model))
    graphs = []
    with torch.no_grad():
        for _ in range(2):
            for ratio, batch in ((0.3, 2), (0.5, 3), (0.2, 2)):
                for m in (model, compiled):
                    for block in m.spa_blocks():
                        block.gate.keep_ratio = ratio
                x = torch.randn(batch, 3, 64, 64)
                torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]


@pytest.mark.slow
def test_compiled_spt_trains_like_eager():
    model = _spt().train()
    for block in model.spa_blocks():
        block.gate.select = "topk"
    compiled = compile_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (model, compiled):
        torch.manual_seed(1)
        m(x).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
