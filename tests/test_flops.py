"""spa.flops.count_macs against PyTorch's FlopCounterMode, and kept vs executed MACs."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import spa
from spa.flops import count_macs, counting_macs


def _torch_gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Half of FlopCounterMode's FLOPs (2 per MAC), per image; math SDPA so attention matmuls are counted.

    FlopCounterMode has a formula for ``baddbmm`` but not for its in-place form, which the ``math`` attention
    backend uses; torch's own ``baddbmm`` formula is registered for it.
    """
    baddbmm = flop_counter.flop_registry[torch.ops.aten.baddbmm]  # already takes tensors, not shapes

    def baddbmm_in_place(*args, **kwargs):
        return baddbmm(*args, **kwargs)

    baddbmm_in_place._get_raw = True  # tell FlopCounterMode not to wrap it a second time
    in_place = {torch.ops.aten.baddbmm_: baddbmm_in_place}
    with (
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False, custom_mapping=in_place) as counter,
        torch.no_grad(),
    ):
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        (dict(img_size=224), 224),
        (dict(img_size=112, spa_stages=(1, 2, 3), ffn="all"), 112),
        (dict(img_size=224, depths=(1, 1, 4, 2)), 224),
    ],
)
def test_select_all_matches_flop_counter(kwargs, size: int) -> None:
    model = spa.create_model("spt_nano", select="all", **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    macs = count_macs(model, x)
    expected = _torch_gmacs(model, x)
    assert macs.kept == pytest.approx(expected, rel=1e-9)
    assert macs.executed == pytest.approx(expected, rel=1e-9)
    assert sum(e for _, e in macs.by_module.values()) == pytest.approx(macs.executed)


def test_executed_matches_flop_counter_with_partial_keep() -> None:
    for layout in ("containers", "padded", "masked", "stream"):
        model = spa.create_model("spt_nano", img_size=112, gate_init=0.3, layout=layout).eval()
        x = torch.randn(3, 3, 112, 112)
        macs = count_macs(model, x)
        assert macs.executed == pytest.approx(_torch_gmacs(model, x), rel=1e-9), layout
        assert macs.kept < macs.executed, layout


@pytest.mark.parametrize("layout", ["containers", "masked"])
def test_executed_matches_flop_counter_when_nothing_is_kept(layout: str) -> None:
    """A block that keeps no token skips attention and the FFN in every layout (``masked`` included)."""
    model = spa.create_model("spt_nano", img_size=64, gate_init=1e-4, layout=layout).eval()
    x = torch.randn(2, 3, 64, 64)
    macs = count_macs(model, x)
    assert all(s.keep.sum() == 0 for s in model.last_selections)
    assert macs.executed == pytest.approx(_torch_gmacs(model, x), rel=1e-9)


def test_kept_is_layout_independent_and_below_dense() -> None:
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    results = {}
    for layout in ("containers", "padded", "masked"):
        torch.manual_seed(0)
        model = spa.create_model("spt_nano", img_size=112, gate_init=0.3, layout=layout).eval()
        results[layout] = count_macs(model, x)
    torch.manual_seed(0)
    dense = count_macs(spa.create_model("spt_nano", img_size=112, select="all").eval(), x)
    kept = {k: r.kept for k, r in results.items()}
    assert kept["padded"] == pytest.approx(kept["containers"]) == pytest.approx(kept["masked"])
    assert results["containers"].kept < dense.kept
    # padding is executed, not kept: every layout executes at least what it keeps, and the masked layout (all
    # tokens of every image) the most. Containers vs padded is not ordered in general: with no full chunk,
    # padded trims to the largest image while first-fit bins can be longer (counts 30, 10, 10 of 49 slots)
    for result in results.values():
        assert kept["containers"] <= result.executed <= results["masked"].executed


def test_swin_padding_counts_as_executed_only() -> None:
    swin = SwinTransformer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), img_size=160).eval()
    x = torch.randn(1, 3, 160, 160)  # 40x40 map: padded to 42x42 windows
    macs = count_macs(swin, x)
    assert macs.executed == pytest.approx(_torch_gmacs(swin, x), rel=1e-9)
    assert macs.kept < macs.executed


def test_bad_images() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        count_macs(spa.create_model("spt_nano"), torch.zeros(0, 3, 64, 64))


def test_counting_macs_counts_images_only_when_asked() -> None:
    model = spa.create_model("spt_nano", select="all", img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with counting_macs(model) as tally, torch.no_grad():
        model(x)
        model(x[:1])
    assert tally.images == 4
    assert tally.result().executed == pytest.approx(count_macs(model, x).executed, rel=1e-9)
    with counting_macs(model, count_images=False) as tally, torch.no_grad():
        model(x)
    assert tally.images == 0
    with pytest.raises(ValueError, match="no forward"):
        tally.result()
