"""Dense Swin baselines of the SPT variants, registered with timm: timm's ``SwinTransformer`` of the SPT's width
with Swin's depths (no extra stage-3 blocks), e.g. ``swin_tiny`` (2-2-6-2) for ``spt_tiny`` (2-2-10-2).

``timm.create_model("swin_tiny", ...)`` builds the same module (same state-dict keys and shapes) as timm's
``swin_tiny_patch4_window7_224`` with the overrides of the former ``spa.tasks.backbones.SWIN_BASELINES``, with
``dynamic_img_size=True`` by default (any input size: attention masks are built per forward). Nothing is
ever downloaded: ``pretrained=True`` raises (load Swin weights with ``spa.load_swin_weights``).

``features_only=True`` gives ``SwinFeatures``: timm's getter-based features (``forward_intermediates``), NCHW
maps at strides 4/8/16/32, ``output_fmt == "NCHW"``, like the SPT's. The model itself keeps timm's NHWC
``forward_features``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from spa.models._timm import NCHWFeatures, feature_cfg, registered_models, swin_default_cfg
from spa.models.spt import SPT_OPTIONS

__all__ = ["DENSE_BASELINES", "SwinFeatures", "list_models"]

# The dense baseline of each SPT variant.
DENSE_BASELINES: dict[str, str] = {
    "spt_nano": "swin_nano",
    "spt_tiny": "swin_tiny",
    "spt_small": "swin_small",
    "spt_base": "swin_base",
}

# Keys of timm's hook-based Swin features (``FeatureListNet``, flattened ``layers_{i}``), the earlier
# ``features_only`` layout of the dense baselines.
_LEGACY_FEATURE_KEY = re.compile(r"^(patch_embed\.|layers_(\d+)\.)")


class SwinFeatures(NCHWFeatures):
    """``features_only`` dense Swin baseline: ``forward(x)`` -> NCHW maps at the ``out_indices`` stages.

    Also loads state dicts of timm's hook-based Swin features (keys ``patch_embed.*``, ``layers_{i}.*``), the
    layout of detector checkpoints saved before this wrapper.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stages' NHWC outputs as NCHW views, without the copy timm's ``forward_intermediates`` makes
        (the FPN's 1x1 convolutions read either layout; this keeps the numbers of the hook-based extractor
        detectors were trained with before)."""
        model, take = self.model, set(self.out_indices)
        x = model.patch_embed(x)
        maps = []
        for i, stage in enumerate(model.layers[: max(take) + 1]):
            x = stage(x)
            if i in take:
                out = model.norm(x) if self.norm and i == len(model.layers) - 1 else x
                maps.append(out.permute(0, 3, 1, 2))
        return maps


def _rename_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        match = _LEGACY_FEATURE_KEY.match(rest)
        if match is None:
            continue
        head = "patch_embed." if match.group(2) is None else f"layers.{match.group(2)}."
        state_dict[f"{prefix}model.{head}{rest[match.end() :]}"] = state_dict.pop(key)


def _create_swin_baseline(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"no pretrained {variant} weights are bundled and nothing is downloaded; build with pretrained=False "
            "and load Swin weights with spa.load_swin_weights(model, source)"
        )
    spt_only = sorted(set(kwargs) & set(SPT_OPTIONS))
    if spt_only:
        raise ValueError(f"{variant} is a dense Swin baseline; SPT options {spt_only} do not apply")
    kwargs.pop("cache_dir", None)  # nothing is ever downloaded
    kwargs.setdefault("dynamic_img_size", True)
    features = feature_cfg(variant, kwargs, SwinFeatures, len(kwargs["depths"]))
    return build_model_with_cfg(SwinTransformer, variant, pretrained=False, feature_cfg=features, **kwargs)


default_cfgs = generate_default_cfgs(
    {name: swin_default_cfg(license="mit") for name in DENSE_BASELINES.values()}
)


@register_model
def swin_nano(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Dense baseline of SPT-Nano: width 32, depths 1-1-2-1, heads 1/2/4/8."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
    return _create_swin_baseline("swin_nano", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def swin_tiny(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Dense baseline of SPT-T: Swin-T (width 96, depths 2-2-6-2, heads 3/6/12/24)."""
    model_args = dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    )
    return _create_swin_baseline("swin_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def swin_small(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Dense baseline of SPT-S: Swin-S (width 96, depths 2-2-18-2, heads 3/6/12/24)."""
    model_args = dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    )
    return _create_swin_baseline("swin_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def swin_base(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Dense baseline of SPT-B: Swin-B (width 128, depths 2-2-18-2, heads 4/8/16/32)."""
    model_args = dict(
        patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    )
    return _create_swin_baseline("swin_base", pretrained=pretrained, **dict(model_args, **kwargs))


def list_models() -> list[str]:
    """Names of the dense Swin baselines (timm's registry: the entrypoints of this module), smallest first."""
    return registered_models(__name__)
