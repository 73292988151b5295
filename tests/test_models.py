"""Model contract (in the style of timm's tests/test_models.py) over every registered SPT variant and dense Swin
baseline, and the backbone factory (``spa.models.create_backbone`` and friends)."""

from __future__ import annotations

import inspect
import warnings
from functools import cache

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

import spa
from spa.models import (
    SPT,
    SPT_OPTIONS,
    SPTFeatures,
    SwinFeatures,
    create_backbone,
    dense_baseline_of,
    is_spt,
    is_spt_name,
    list_backbones,
)
from spa.models._timm import FeatureGetterNet

SPT_NAMES = ["spt_nano", "spt_tiny", "spt_small", "spt_base"]
DENSE_NAMES = ["swin_nano", "swin_tiny", "swin_small", "swin_base"]
ALL = SPT_NAMES + DENSE_NAMES
SIZE = 64  # small inputs: maps of 16/8/4/2
STRIDES = [4, 8, 16, 32]
NUM_CLASSES = 10
# What the dense baselines were before they were registered: a timm Swin and overrides (as the deprecated
# ``spa.tasks.backbones.SWIN_BASELINES`` still says); checkpoints of those must still load.
FORMER = {
    "swin_nano": (
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    ),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small": ("swin_small_patch4_window7_224", {}),
    "swin_base": ("swin_base_patch4_window7_224", {}),
}


@cache
def _model(name: str) -> nn.Module:
    """One eval-mode classifier per name, shared by the read-only tests (built at ``SIZE``)."""
    return create_backbone(name, img_size=SIZE, num_classes=NUM_CLASSES).eval()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


def _channels(model: nn.Module) -> list[int]:
    return [info["num_chs"] for info in model.feature_info]


def test_registry_lists_every_backbone() -> None:
    assert list_backbones() == ALL
    assert spa.list_models() == SPT_NAMES == spa.models.list_models()
    assert set(ALL) <= set(timm.list_models())
    assert timm.list_models(module="swin_baselines") == sorted(DENSE_NAMES)


@pytest.mark.parametrize("name", ALL)
def test_model_forward(name: str) -> None:
    model = _model(name)
    assert isinstance(model, SPT if name in SPT_NAMES else SwinTransformer)
    with torch.no_grad():
        out = model(_x())
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    assert model.num_features == model.head_hidden_size == _channels(model)[-1]
    assert [info["reduction"] for info in model.feature_info] == STRIDES
    assert model.output_fmt == "NHWC"  # the model's forward_features, as timm's Swin


@pytest.mark.parametrize("name", ALL)
def test_model_default_cfg(name: str) -> None:
    model = _model(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and not cfg.get("url") and not cfg.get("hf_hub_id")
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert cfg["input_size"] == (3, 224, 224) and not cfg["fixed_input_size"]


@pytest.mark.parametrize("name", ALL)
def test_model_pretrained_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="load_swin_weights"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(ValueError, match="load_swin_weights"):
        create_backbone(name, pretrained=True)


@pytest.mark.parametrize("name", ALL)
def test_model_forward_intermediates(name: str) -> None:
    model = _model(name)
    x = _x()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == 4
        for m, c, s in zip(maps, _channels(model), STRIDES):
            assert m.shape == (2, c, SIZE // s, SIZE // s)  # NCHW
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, intermediates_only=True)
        assert len(only) == 4 and all(torch.equal(a, b) for a, b in zip(only, maps))
        picked = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert [p.shape for p in picked] == [maps[1].shape, maps[3].shape]
        torch.testing.assert_close(picked[0], maps[1])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[1], maps[3])
        assert last_two[0].shape == maps[2].shape


@pytest.mark.parametrize("feature_cls", [None, "getter"])
@pytest.mark.parametrize("name", ALL)
def test_model_features_only(name: str, feature_cls: str | None) -> None:
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    features = timm.create_model(name, features_only=True, img_size=SIZE, **kwargs).eval()
    assert isinstance(features, SPTFeatures if name in SPT_NAMES else SwinFeatures)
    assert isinstance(features, FeatureGetterNet)
    assert features.output_fmt == "NCHW" and str(features.output_fmt) == "NCHW"
    model = _model(name)
    assert features.feature_info.channels() == _channels(model)
    assert features.feature_info.reduction() == STRIDES
    assert is_spt(features) == is_spt_name(name)
    # same weights -> the model's intermediates (the head and final norm are pruned from the wrapper)
    missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    x = _x()
    with torch.no_grad():
        maps = features(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 4
    for m, e, c, s in zip(maps, expected, features.feature_info.channels(), STRIDES):
        assert m.shape == (2, c, SIZE // s, SIZE // s)
        torch.testing.assert_close(m, e)


@pytest.mark.parametrize("name", ["spt_nano", "swin_nano"])
def test_model_features_out_indices(name: str) -> None:
    features = create_backbone(name, features_only=True, img_size=SIZE, out_indices=(1, 3)).eval()
    assert features.feature_info.reduction() == [8, 32]
    assert features.feature_info.channels() == [64, 256]
    with torch.no_grad():
        maps = features(_x(1))
    assert [m.shape for m in maps] == [(1, 64, 8, 8), (1, 256, 2, 2)]
    if name in SPT_NAMES:
        maps2, selections = features.forward_with_selections(_x(1))
        assert len(maps2) == 2 and len(selections) == 4
    with pytest.raises(ValueError, match="feature_cls"):
        create_backbone(name, features_only=True, img_size=SIZE, feature_cls="hook")


@pytest.mark.parametrize("name", ALL)
def test_model_reset_classifier(name: str) -> None:
    model = create_backbone(name, img_size=SIZE, num_classes=NUM_CLASSES).eval()
    x = _x()
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5, global_pool="max")
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5


# --- the factory ---


def test_create_backbone_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown backbone 'spt_huge'; choose from \['spt_nano'.*'swin_base'\]"
    ):
        create_backbone("spt_huge")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("swin_tiny_patch4_window7_224")  # a timm model, not a spa backbone
    expected = r"swin_nano is a dense Swin baseline; SPT options \['keep_ratio', 'select'\] do not apply"
    with pytest.raises(ValueError, match=expected):
        create_backbone("swin_nano", features_only=True, select="topk", keep_ratio=0.5)
    with pytest.raises(ValueError, match=expected):
        timm.create_model("swin_nano", select="topk", keep_ratio=0.5)  # the entrypoint checks too
    with pytest.raises(TypeError, match="unknown option"):
        create_backbone("spt_nano", keep_treshold=0.2)
    with pytest.raises(TypeError):
        create_backbone("swin_nano", bogus=1)


def test_spt_options_are_what_a_dense_swin_lacks() -> None:
    spt_args = set(inspect.signature(SPT).parameters)
    swin_args = set(inspect.signature(SwinTransformer).parameters)
    assert set(SPT_OPTIONS) == spt_args - swin_args


def test_dense_baseline_of_and_names() -> None:
    assert [dense_baseline_of(n) for n in SPT_NAMES] == DENSE_NAMES
    assert [dense_baseline_of(n) for n in DENSE_NAMES] == DENSE_NAMES
    with pytest.raises(ValueError, match="unknown backbone"):
        dense_baseline_of("spt_huge")
    assert all(is_spt_name(n) for n in SPT_NAMES)
    assert not any(is_spt_name(n) for n in [*DENSE_NAMES, "spt_huge", "resnet18", ""])


def test_is_spt_decides_on_the_model() -> None:
    spt_model = _model("spt_nano")
    assert is_spt(spt_model)
    assert is_spt(create_backbone("spt_nano", features_only=True, img_size=SIZE))
    plain = create_backbone("spt_nano", features_only=True, img_size=SIZE, feature_cls=FeatureGetterNet)
    assert type(plain) is FeatureGetterNet and is_spt(plain)
    assert not is_spt(_model("swin_nano"))
    assert not is_spt(create_backbone("swin_nano", features_only=True, img_size=SIZE))
    assert not is_spt(nn.Linear(2, 2))

    class WithSelections(nn.Module):
        def forward_with_selections(self, x):
            return x, []

    assert is_spt(WithSelections())


def test_classifier_call_of_both_kinds() -> None:
    """The call ``spa.tasks.classification`` makes: ``create_backbone(name, num_classes, global_pool, img_size,
    **model_kwargs)``; for a dense baseline, the same module (and init) as the former timm call."""
    common = dict(num_classes=3, global_pool="avg", img_size=SIZE)
    model = create_backbone("spt_nano", **common, select="topk", keep_ratio=0.5).eval()
    assert isinstance(model, SPT) and model.spa_blocks()[0].gate.select == "topk"
    timm_name, overrides = FORMER["swin_nano"]
    torch.manual_seed(0)
    before = timm.create_model(
        timm_name, pretrained=False, dynamic_img_size=True, **common, **overrides, drop_path_rate=0.0
    ).eval()
    torch.manual_seed(0)
    now = create_backbone("swin_nano", **common, drop_path_rate=0.0).eval()
    assert before.state_dict().keys() == now.state_dict().keys()
    assert all(torch.equal(v, now.state_dict()[k]) for k, v in before.state_dict().items())
    x = torch.randn(1, 3, 72, 56)  # any input size
    with torch.no_grad():
        torch.testing.assert_close(now(x), before(x))


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_dense_baselines_keep_the_former_layout(name: str) -> None:
    timm_name, overrides = FORMER[name]
    with torch.device("meta"):
        before = timm.create_model(timm_name, **overrides).state_dict()
        now = timm.create_model(name).state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in now.items()}


def test_dense_features_load_former_hook_based_checkpoints() -> None:
    timm_name, overrides = FORMER["swin_nano"]
    old = timm.create_model(timm_name, features_only=True, img_size=SIZE, dynamic_img_size=True, **overrides)
    assert any(k.startswith("layers_0.") for k in old.state_dict())  # FeatureListNet keys, NHWC maps
    new = create_backbone("swin_nano", features_only=True, img_size=SIZE)
    new.load_state_dict(old.state_dict())  # strict
    holder, old_holder = nn.Module(), nn.Module()
    holder.body, old_holder.body = create_backbone("swin_nano", features_only=True, img_size=SIZE), old
    holder.load_state_dict(old_holder.state_dict())  # under a prefix, as in a detector checkpoint
    x = _x(1)
    with torch.no_grad():
        expected = [m.permute(0, 3, 1, 2) for m in old.eval()(x)]
        for got in (new.eval()(x), holder.body.eval()(x)):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b)


def test_deprecated_task_aliases() -> None:
    from spa.tasks import backbones

    assert list(backbones.SPT_MODELS) == SPT_NAMES and list(backbones.BACKBONES) == ALL
    assert backbones.SWIN_BASELINES == FORMER
    assert backbones.dense_baseline_of is dense_baseline_of
    assert backbones.set_grad_checkpointing is spa.models.set_grad_checkpointing
    for name in ("spt_nano", "swin_nano"):
        with pytest.warns(DeprecationWarning, match="create_backbone"):
            body = backbones.build_body(name, SIZE, drop_path_rate=0.0)
        assert body.output_fmt == "NCHW" and body.feature_info.reduction() == STRIDES
        with torch.no_grad():
            maps = body.eval()(_x(1))
        assert [m.shape[1] for m in maps] == body.feature_info.channels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="dense Swin baseline"):
            backbones.build_body("swin_nano", SIZE, select="gate")


def test_set_grad_checkpointing() -> None:
    model = create_backbone("swin_nano", img_size=SIZE)
    assert spa.models.set_grad_checkpointing(model) >= 1
    assert all(layer.grad_checkpointing for layer in model.layers)
    with pytest.raises(ValueError, match="no backbone"):
        spa.models.set_grad_checkpointing(nn.Linear(2, 2))
