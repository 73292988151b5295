"""timm glue shared by the SPT and the dense Swin baselines: registry queries and getter-based NCHW features.

Feature contract of every spa backbone built with ``features_only=True``: a ``FeatureGetterNet`` (maps from the
model's ``forward_intermediates``), NCHW maps at the ``out_indices`` stages, ``output_fmt == "NCHW"``. The
feature cfg is set explicitly here, so it does not depend on how a timm version fills in ``output_fmt`` (timm
< 1.0.29 copies the model's own ``output_fmt``, NHWC for Swin-like models, into the wrapper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
from timm.layers import Format
from timm.models import model_entrypoint

# timm exports neither name publicly (not from timm.models nor timm.layers, as of timm 1.0.31): private module.
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn

__all__ = ["FeatureGetterNet", "NCHWFeatures", "feature_cfg", "feature_take_indices", "registered_models"]


def registered_models(module: str) -> list[str]:
    """Names in timm's registry whose entrypoint is defined in ``module`` (a module ``__name__``), in the order
    they are declared there."""
    short = module.rpartition(".")[2]  # timm files entrypoints under the last component of the module name
    names = [n for n in timm.list_models(module=short) if model_entrypoint(n).__module__ == module]
    return sorted(names, key=lambda n: model_entrypoint(n).__code__.co_firstlineno)


class NCHWFeatures(FeatureGetterNet):
    """timm's getter-based feature extractor, NCHW maps only.

    ``output_fmt`` is the plain string ``"NCHW"`` (timm's own wrappers hold a ``Format`` enum, equal to it but
    printing as ``Format.NCHW``).
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: int | Sequence[int] = 4,
        out_map: Sequence[int | str] | None = None,
        return_dict: bool = False,
        output_fmt: str = "NCHW",
        norm: bool = False,
        prune: bool = True,
    ) -> None:
        if Format(output_fmt) is not Format.NCHW:
            raise ValueError(f"{type(self).__name__} gives NCHW maps only, got output_fmt={output_fmt!r}")
        super().__init__(
            model, out_indices=out_indices, out_map=out_map, return_dict=return_dict, norm=norm, prune=prune
        )
        self.output_fmt = Format.NCHW.value


def feature_cfg(
    variant: str, kwargs: dict[str, Any], default_cls: type[FeatureGetterNet], num_stages: int
) -> dict[str, Any]:
    """The ``feature_cfg`` for ``build_model_with_cfg`` (pops ``out_indices``, ``feature_cls`` and ``feature_cfg``
    from ``kwargs``): getter-based, NCHW, all stages by default.

    ``feature_cls``: None or ``"getter"`` -> ``default_cls``; a ``FeatureGetterNet`` subclass is used as given;
    anything else (hook / list / dict / fx extractors) raises ``ValueError``.
    """
    cfg: dict[str, Any] = dict(out_indices=tuple(range(num_stages)))
    cfg.update(kwargs.pop("feature_cfg", None) or {})
    if "out_indices" in kwargs:
        cfg["out_indices"] = kwargs.pop("out_indices")
    feature_cls = kwargs.pop("feature_cls", cfg.get("feature_cls"))
    if feature_cls is None or (isinstance(feature_cls, str) and feature_cls.lower() == "getter"):
        feature_cls = default_cls
    if not (isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)):
        raise ValueError(
            f"{variant}: features come from forward_intermediates (NCHW); feature_cls must be 'getter' or a "
            f"FeatureGetterNet subclass, got {feature_cls!r}"
        )
    if Format(cfg.get("output_fmt", "NCHW")) is not Format.NCHW:
        raise ValueError(f"{variant}: features are NCHW maps, got output_fmt={cfg['output_fmt']!r}")
    cfg.update(feature_cls=feature_cls, output_fmt="NCHW")
    cfg.pop("flatten_sequential", None)  # hook-based extractors only
    return cfg


def swin_default_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained-cfg fields of a Swin-style model at 224 px (no weights: ``url`` is empty)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        **kwargs,
    }
