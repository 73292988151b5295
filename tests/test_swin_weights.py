"""spa.load_swin_weights: sources, checkpoint layouts, the extra-block rule, errors."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer

import spa
from spa.models.swin_weights import swin_block_for

SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), img_size=112)


def _swin(**kwargs) -> SwinTransformer:
    return SwinTransformer(**{**SMALL, "num_classes": 10, **kwargs}).eval()


def _spt(**kwargs) -> spa.SPT:
    kwargs = {"img_size": 112, "num_classes": 10, "depths": (1, 1, 5, 1), **kwargs}
    return spa.create_model("spt_nano", **kwargs).eval()


def _original_layout(state: dict) -> dict:
    """timm keys -> original Microsoft Swin keys (downsample at the end of the previous stage, ``head``)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value
    return out


def _mmdet_layout(original: dict) -> dict:
    """Original keys -> mmdetection's native Swin checkpoint (what ``mmdet``'s ``swin_converter`` writes:
    renamed keys, patch-merging channels in ``nn.Unfold`` order, ``backbone.`` prefix, no head), plus the
    per-output norms and neck weights an mmdetection detector checkpoint also holds."""
    out = {}
    for key, value in original.items():
        if key.startswith(("head", "norm.")):  # mmdetection's model has per-output norms instead
            continue
        if key.startswith("layers."):
            if (
                ".downsample." in key
            ):  # neighbour g at channel g * C + c -> channel c * 4 + u, u = [0, 2, 1, 3][g]
                merged = value.reshape(-1, 4, value.shape[-1] // 4)[:, [0, 2, 1, 3]]
                value = merged.transpose(1, 2).reshape(value.shape)
            key = key.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
            key = key.replace(".mlp.fc2.", ".ffn.layers.1.").replace("layers.", "stages.", 1)
        key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        out[f"backbone.{key}"] = value
    out["backbone.norm3.weight"] = torch.ones(256)
    out["neck.lateral_convs.0.conv.weight"] = torch.zeros(3)
    return out


def _assert_copied(model: spa.SPT, swin: SwinTransformer, block_map: dict[int, list[int]]) -> None:
    theirs = swin.state_dict()
    for key, value in model.state_dict().items():
        match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        if ".gate." in key:
            continue
        if match:
            stage, block, rest = int(match.group(1)), int(match.group(2)), match.group(3)
            key = f"layers.{stage}.blocks.{block_map[stage][block]}.{rest}"
        assert torch.equal(value, theirs[key]), key


def test_block_rule() -> None:
    assert [swin_block_for(i, 6, 6) for i in range(6)] == list(range(6))
    assert [swin_block_for(i, 10, 6) for i in range(10)] == [0, 1, 2, 1, 2, 3, 4, 3, 4, 5]
    for n_model, n_swin in [(10, 6), (22, 18), (5, 2), (2, 6), (3, 1)]:
        mapping = [swin_block_for(i, n_model, n_swin) for i in range(n_model)]
        assert all(0 <= j < n_swin for j in mapping)
        if n_swin > 1:
            assert all(j % 2 == i % 2 for i, j in enumerate(mapping))  # shifted copies shifted
        assert mapping[0] == 0


def test_load_from_module_copies_by_rule() -> None:
    swin, model = _swin(), _spt()
    result = spa.load_swin_weights(model, swin)
    assert result.block_map == {0: [0], 1: [0], 2: [0, 1, 0, 1, 0], 3: [0]}
    assert result.unexpected == []
    assert result.missing and all(".gate.proj." in k for k in result.missing)
    _assert_copied(model, swin, result.block_map)


def test_files_nested_prefixed_and_original_layouts(tmp_path) -> None:
    swin = _swin()
    state = swin.state_dict()
    reference = _spt(select="all", depths=(1, 1, 2, 1))
    spa.load_swin_weights(reference, state)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = swin(x)
        torch.testing.assert_close(reference(x), expected, atol=1e-4, rtol=0)
    torch.save({"model": state, "epoch": 3}, tmp_path / "nested.pth")
    mmdet = {f"backbone.{k}": v for k, v in _original_layout(state).items() if not k.startswith("head")}
    mmdet["neck.lateral.weight"] = torch.zeros(3)
    torch.save({"state_dict": mmdet, "meta": {"epoch": 12}}, tmp_path / "mmdet.pth")
    torch.save(_original_layout(state), tmp_path / "original.pt")
    save_file(state, str(tmp_path / "weights.safetensors"))
    for name in ("nested.pth", "mmdet.pth", "original.pt", "weights.safetensors"):
        model = _spt(select="all", depths=(1, 1, 2, 1))
        result = spa.load_swin_weights(model, tmp_path / name)
        assert result.unexpected == [], name
        with torch.no_grad():
            got = model.forward_features(x) if name == "mmdet.pth" else model(x)
            want = swin.forward_features(x) if name == "mmdet.pth" else expected
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=name)
    # extra keys are reported, not loaded
    result = spa.load_swin_weights(_spt(), {**state, "extra.weight": torch.zeros(1)})
    assert result.unexpected == ["extra.weight"]


def test_features_only_model_and_other_head() -> None:
    swin = _swin()
    features = spa.create_model("spt_nano", img_size=112, depths=(1, 1, 2, 1), features_only=True)
    result = spa.load_swin_weights(features, swin)
    assert "head.fc.weight" in result.unexpected and "norm.weight" in result.unexpected
    model = _spt(num_classes=3)  # a classifier of another size is skipped and reported
    result = spa.load_swin_weights(model, swin)
    assert "head.fc.weight" in result.unexpected


def test_channel_mismatch_is_refused() -> None:
    wider = SwinTransformer(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), img_size=112)
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight"):
        spa.load_swin_weights(_spt(), wider)
    state = _swin().state_dict()
    state["layers.2.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 128)
    with pytest.raises(ValueError, match=r"layers\.2\.blocks\.0\.mlp\.fc1\.weight"):
        spa.load_swin_weights(_spt(), state)
    more_heads = _swin(num_heads=(1, 2, 8, 8)).state_dict()
    with pytest.raises(ValueError, match="heads"):
        spa.load_swin_weights(_spt(), more_heads)


def test_unreadable_sources(tmp_path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        spa.load_swin_weights(_spt(), bad)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        spa.load_swin_weights(_spt(), tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="source"):
        spa.load_swin_weights(_spt(), 42)
    with pytest.raises(ValueError, match="no tensors"):
        spa.load_swin_weights(_spt(), {"epoch": 1})
    # readable, but nothing in it fits (another architecture): an error, not a silent no-op
    model = _spt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no tensor of the checkpoint fits the model \(keys such as conv1"):
        spa.load_swin_weights(model, {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a partial load is reported, not refused
    partial = {k: v for k, v in _swin().state_dict().items() if k.startswith("patch_embed.")}
    assert any(k.startswith("layers.") for k in spa.load_swin_weights(_spt(), partial).missing)


def test_mmdetection_native_checkpoint(tmp_path) -> None:
    """mmdetection's own key names and patch-merging channel order load to the same weights as the original
    layout (so the same features), with its per-output norm reported as unexpected."""
    swin = _swin()
    original = _original_layout(swin.state_dict())
    assert "layers.0.downsample.reduction.weight" in original  # the test covers patch merging
    torch.save({"state_dict": _mmdet_layout(original), "meta": {}}, tmp_path / "mmdet_native.pth")
    from_original = _spt(select="all", depths=(1, 1, 2, 1))
    spa.load_swin_weights(from_original, original)
    model = _spt(select="all", depths=(1, 1, 2, 1))
    result = spa.load_swin_weights(model, tmp_path / "mmdet_native.pth")
    assert result.unexpected == ["norm3.weight"]
    gates = {k for k in result.missing if ".gate." in k}
    assert set(result.missing) - gates == {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}
    want = from_original.state_dict()
    for key, value in model.state_dict().items():
        if ".gate." not in key and not key.startswith(("norm.", "head.")):
            assert torch.equal(value, want[key]), key
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
        expected = swin.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
