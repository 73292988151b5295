"""SPT (Select and Pack Transformer): a Swin hierarchy whose later stages are made of SPA blocks.

Stages listed in ``spa_stages`` (default: stages 3-4, indices ``(2, 3)``) are ``SPAStage`` s (patch merging,
then SPA blocks, shifted every second block like Swin); the other stages are timm's ``SwinTransformerStage``.
Parameter names follow timm's ``SwinTransformer`` (``patch_embed``, ``layers.{i}.downsample``,
``layers.{i}.blocks.{j}``, ``norm``, ``head.fc``) so Swin weights load by name (``spa.load_swin_weights``).

Selections: every forward records the ``Selection`` of each SPA block (``stage``, ``block`` and ``stride``
set). The ``*_with_selections`` methods return them next to the output; every forward also leaves them in
``model.last_selections`` for convenience.

Formats, as timm's Swin: the model's ``forward_features`` (and ``output_fmt``) is NHWC; ``forward_intermediates``
and the ``features_only`` wrapper (``SPTFeatures``, ``output_fmt == "NCHW"``) give NCHW maps.

The variants (``spt_nano`` ... ``spt_base``) are timm entrypoints: ``timm.create_model("spt_tiny", ...)``,
``spa.create_model`` or ``spa.models.create_backbone``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerStage
from torch import nn
from torch.utils.checkpoint import checkpoint

from spa.attention import BACKENDS
from spa.gate import SELECT_MODES, TokenGate
from spa.models._timm import (
    NCHWFeatures,
    feature_cfg,
    feature_take_indices,
    registered_models,
    swin_default_cfg,
)
from spa.models.spa_block import FFN_MODES, SPABlock
from spa.packing import LAYOUTS
from spa.selection import Selection

__all__ = ["SPT", "SPT_OPTIONS", "SPAStage", "SPTFeatures", "create_model", "list_models"]

# Options of the SPT that a dense Swin does not have (its SPA blocks and gates); every other SPT option is one
# of timm's ``SwinTransformer``.
SPT_OPTIONS: tuple[str, ...] = (
    "spa_stages",
    "select",
    "keep_threshold",
    "keep_ratio",
    "gate_init",
    "temperature",
    "min_keep",
    "straight_through",
    "layout",
    "ffn",
    "backend",
)


class SPAStage(nn.Module):
    """One SPT stage of SPA blocks: optional 2x2 patch merging, then ``depth`` SPA blocks.

    Fused gate logits flow from block to block; logits coming from the previous stage are max-pooled 2x2
    (ceil mode, as ``PatchMerging`` pads odd maps) when the stage downsamples.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        downsample: bool = True,
        num_heads: int = 4,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        stage: int = 2,
        stride: int = 16,
        **spa_kwargs,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.output_resolution = (
            tuple((r + 1) // 2 for r in input_resolution) if downsample else self.input_resolution
        )
        self.depth = depth
        self.grad_checkpointing = False  # recompute blocks in backward (``SPT.set_grad_checkpointing``)
        self.downsample = (
            PatchMerging(dim=dim, out_dim=out_dim, norm_layer=norm_layer) if downsample else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            SPABlock(
                dim=out_dim,
                input_resolution=self.output_resolution,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path,
                norm_layer=norm_layer,
                stage=stage,
                block=i,
                stride=stride,
                **spa_kwargs,
            )
            for i in range(depth)
        )

    def forward(
        self, x: torch.Tensor, previous_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[Selection]]:
        """``x`` ``[B, H, W, C]`` -> (output map, last fused logits ``[B, H', W']``, selections of the blocks).

        ``previous_logits``: fused logits of the previous SPA block at the input resolution, or None.
        """
        x = self.downsample(x)
        logits = previous_logits
        if logits is not None and not isinstance(self.downsample, nn.Identity):
            logits = F.max_pool2d(logits[:, None], kernel_size=2, stride=2, ceil_mode=True)[:, 0]
        selections = []
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for block in self.blocks:
            if recompute:
                # non-reentrant: any outputs (the Selection), and the RNG state is restored for the recompute so
                # the Gumbel noise and stochastic depth (hence the pack plan) are the same in both passes
                x, selection = checkpoint(block, x, logits, use_reentrant=False)
            else:
                x, selection = block(x, logits)
            logits = selection.fused_logits
            selections.append(selection)
        return x, logits, selections


def _check_images(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"SPT expects a tensor of images [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"SPT expects images [B, C, H, W] (4-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"SPT expects floating point images, got dtype {x.dtype}")
    if x.shape[1] != in_chans:
        raise ValueError(f"SPT expects {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if 0 in x.shape:
        raise ValueError(
            f"SPT expects at least one image of at least 1 x 1 pixels, got shape {tuple(x.shape)}"
        )


class SPT(nn.Module):
    """Select and Pack Transformer backbone / classifier (timm-style API).

    Args:
        img_size: nominal input size; sets the window size rule per stage. Other sizes work (maps that need
            a smaller window than built for shrink it; in larger ones SPA blocks clip the relative offsets to
            the bias table they were built with, and no equality with timm is promised there).
        patch_size, in_chans, num_classes, global_pool, embed_dim, depths, num_heads, window_size, mlp_ratio,
            qkv_bias, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer: as timm's
            ``SwinTransformer``.
        spa_stages: indices of the stages made of SPA blocks (default ``(2, 3)``: stages 3-4).
        select: ``gate`` (default), ``all``, ``topk`` or ``random`` (see ``spa.TokenGate``).
        keep_threshold: keep probability threshold of the gate (default 0.3).
        keep_ratio: ratio for ``topk`` / ``random``.
        gate_init: initial keep probability of every gate (its bias starts at the logit of this).
        temperature, min_keep, straight_through: passed to every ``TokenGate``.
        layout: packing layout ``containers`` (default), ``stream``, ``padded`` or ``masked``.
        ffn: ``kept`` (default: FFN on kept tokens only) or ``all``.
        backend: attention backend of the SPA blocks (``auto``, ``math``, ``sdpa``, ``varlen``, ``reference``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 10, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        spa_stages: Sequence[int] = (2, 3),
        select: str = "gate",
        keep_threshold: float = 0.3,
        keep_ratio: float = 0.5,
        gate_init: float = 0.5,
        temperature: float = 1.0,
        min_keep: int = 0,
        straight_through: bool = False,
        layout: str = "containers",
        ffn: str = "kept",
        backend: str = "auto",
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(
                f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length"
            )
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths {depths}")
        spa_stages = tuple(sorted(set(spa_stages)))
        if any(s not in range(len(depths)) for s in spa_stages):
            raise ValueError(f"spa_stages must be stage indices in [0, {len(depths)}), got {spa_stages}")
        for name, value, allowed in (
            ("select", select, SELECT_MODES),
            ("layout", layout, LAYOUTS),
            ("ffn", ffn, FFN_MODES),
            ("backend", backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"gate_init (initial keep probability) must be in (0, 1), got {gate_init}")
        for name, value in (("patch_size", patch_size), ("window_size", window_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"  # forward_features, as timm's Swin; features_only (SPTFeatures) is NCHW
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.depths = depths
        self.spa_stages = spa_stages
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.last_selections: list[Selection] = []
        self.feature_info: list[dict] = []

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            strict_img_size=False,
            dynamic_img_pad=True,
            output_fmt="NHWC",
        )
        grid = tuple(self.patch_embed.grid_size)
        dims = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        spa_kwargs = dict(
            select=select,
            keep_threshold=keep_threshold,
            temperature=temperature,
            keep_ratio=keep_ratio,
            min_keep=min_keep,
            straight_through=straight_through,
            init_keep_prob=gate_init,
            layout=layout,
            ffn=ffn,
            backend=backend,
        )
        layers: list[nn.Module] = []
        in_dim, scale = dims[0], 1
        for i in range(self.num_layers):
            common = dict(
                dim=in_dim,
                out_dim=dims[i],
                input_resolution=((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale),
                depth=depths[i],
                downsample=i > 0,
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
            )
            if i > 0:
                scale *= 2
            stride = patch_size * scale
            if i in spa_stages:
                layers.append(SPAStage(**common, stage=i, stride=stride, **spa_kwargs))
            else:
                layers.append(SwinTransformerStage(**common, dynamic_mask=True))
            in_dim = dims[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f"layers.{i}"))
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
        )
        self.init_weights()

    def init_weights(self) -> None:
        """timm's Swin init: truncated normal (std 0.02) linear weights, zero biases; gates keep their prior."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, TokenGate):
                module.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing: Swin stages through timm, SPA stages block by block (activations of a block
        are recomputed in backward, with the same random draws, so the same tokens are kept)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one of ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def spa_blocks(self) -> list[SPABlock]:
        """The SPA blocks of the model, in forward order."""
        return [m for m in self.modules() if isinstance(m, SPABlock)]

    def _run(self, x: torch.Tensor, take: Sequence[int] = (), last: int | None = None):
        """Run stages ``0..last``; returns (last NHWC map, NHWC maps of the stages in ``take``, selections)."""
        _check_images(x, self.in_chans)
        last = self.num_layers - 1 if last is None else last
        x = self.patch_embed(x)
        logits: torch.Tensor | None = None
        taken: list[torch.Tensor] = []
        selections: list[Selection] = []
        for i, stage in enumerate(self.layers[: last + 1]):
            if isinstance(stage, SPAStage):
                x, logits, stage_selections = stage(x, logits)
                selections.extend(stage_selections)
            else:
                x, logits = stage(x), None
            if i in take:
                taken.append(x)
        self.last_selections = selections
        return x, taken, selections

    def forward_features_with_selections(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Selection]]:
        """Images ``[B, C, H, W]`` -> (normed last-stage map ``[B, H/32, W/32, C']`` (NHWC), selections)."""
        x, _, selections = self._run(x)
        return self.norm(x), selections

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed last-stage map (NHWC), as timm's Swin; selections land in ``last_selections``."""
        return self.forward_features_with_selections(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward_with_selections(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Selection]]:
        """Images -> (classifier output, ``Selection`` of every SPA block in forward order)."""
        x, selections = self.forward_features_with_selections(x)
        return self.forward_head(x), selections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_selections(x)[0]

    def forward_intermediates_with_selections(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> tuple[list[torch.Tensor], list[Selection]]:
        """Multi-scale maps for a detector neck, and the selections: (``[B, C_i, H_i, W_i]`` list, selections).

        ``indices``: stages to return (default all: strides 4/8/16/32); an int takes the last n. Stops after
        the last requested stage.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.layers), indices)
        _, maps, selections = self._run(x, take, last)
        if norm and last == self.num_layers - 1 and (self.num_layers - 1) in take:
            maps[-1] = self.norm(maps[-1])
        if output_fmt == "NCHW":
            maps = [m.permute(0, 3, 1, 2).contiguous() for m in maps]
        return maps, selections

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``; selections land in ``last_selections``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.layers), indices)
        stop = last if (stop_early or intermediates_only) else len(self.layers) - 1
        x, maps, _ = self._run(x, take, stop)
        if norm and (self.num_layers - 1) in take:
            maps[-1] = self.norm(maps[-1])
        maps = [m.permute(0, 3, 1, 2).contiguous() for m in maps]
        if intermediates_only:
            return maps
        if stop == self.num_layers - 1:  # the final norm is sized for the last stage: only after it ran
            x = self.norm(x)
        return x, maps

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested one (and the head); returns the kept indices."""
        take, last = feature_take_indices(len(self.layers), indices)
        prune_end = last < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[: last + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="", input_fmt=self.output_fmt)
            self.num_classes = 0
        return take


class SPTFeatures(NCHWFeatures):
    """``features_only`` SPT: ``forward(x)`` -> NCHW maps at the ``out_indices`` stages (strides 4/8/16/32);
    ``output_fmt == "NCHW"``.

    ``forward_with_selections(x)`` returns ``(maps, selections)``; ``last_selections`` holds those of the
    latest forward.
    """

    def forward_with_selections(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[Selection]]:
        return self.model.forward_intermediates_with_selections(x, indices=self.out_indices, norm=self.norm)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_selections(x)[0]

    @property
    def last_selections(self) -> list[Selection]:
        return self.model.last_selections


_BUILDER_KWARGS = {"features_only", "out_indices", "feature_cfg", "feature_cls", "pretrained_strict"}


def _check_kwargs(variant: str, kwargs: dict) -> None:
    allowed = set(inspect.signature(SPT.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed - _BUILDER_KWARGS)
    if unknown:
        raise TypeError(
            f"{variant}: unknown option(s) {unknown}; SPT options are {sorted(allowed | {'out_indices'})}"
        )


def _create_spt(variant: str, pretrained: bool = False, **kwargs) -> SPT | SPTFeatures:
    if pretrained:
        raise ValueError(
            f"no pretrained {variant} weights are published; build with pretrained=False and load Swin weights "
            "with spa.load_swin_weights(model, source)"
        )
    cfg_kwargs = {k: kwargs.pop(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay") if k in kwargs}
    kwargs.pop("cache_dir", None)  # nothing is ever downloaded
    _check_kwargs(variant, kwargs)
    features = feature_cfg(variant, kwargs, SPTFeatures, len(kwargs["depths"]))
    return build_model_with_cfg(SPT, variant, pretrained=False, feature_cfg=features, **cfg_kwargs, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        name: swin_default_cfg(license="apache-2.0")
        for name in ("spt_nano", "spt_tiny", "spt_small", "spt_base")
    }
)


@register_model
def spt_nano(pretrained: bool = False, **kwargs) -> SPT:
    """SPT-Nano: width 32, depths 1-1-3-1, heads 1/2/4/8; trains on a CPU in minutes at 64-128 px."""
    model_args = dict(embed_dim=32, depths=(1, 1, 3, 1), num_heads=(1, 2, 4, 8))
    return _create_spt("spt_nano", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spt_tiny(pretrained: bool = False, **kwargs) -> SPT:
    """SPT-T: Swin-T widths (96, heads 3/6/12/24), depths 2-2-10-2 (4 extra stage-3 blocks)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 10, 2), num_heads=(3, 6, 12, 24))
    return _create_spt("spt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spt_small(pretrained: bool = False, **kwargs) -> SPT:
    """SPT-S: Swin-S widths (96, heads 3/6/12/24), depths 2-2-22-2."""
    model_args = dict(embed_dim=96, depths=(2, 2, 22, 2), num_heads=(3, 6, 12, 24))
    return _create_spt("spt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spt_base(pretrained: bool = False, **kwargs) -> SPT:
    """SPT-B: Swin-B widths (128, heads 4/8/16/32), depths 2-2-22-2."""
    model_args = dict(embed_dim=128, depths=(2, 2, 22, 2), num_heads=(4, 8, 16, 32))
    return _create_spt("spt_base", pretrained=pretrained, **dict(model_args, **kwargs))


def list_models() -> list[str]:
    """Names of the SPT variants (timm's registry: the entrypoints of this module), smallest first."""
    return registered_models(__name__)


def create_model(name: str, **kwargs) -> SPT | SPTFeatures:
    """Build an SPT variant by name (``spt_nano``, ``spt_tiny``, ``spt_small``, ``spt_base``) with timm.

    ``kwargs`` are ``SPT`` options plus ``features_only``/``out_indices``/``feature_cls``; unknown names or
    options raise. ``spa.models.create_backbone`` also builds the dense Swin baselines.
    """
    if name not in list_models():
        raise ValueError(f"unknown SPT model {name!r}; available: {list_models()}")
    return timm.create_model(name, **kwargs)
