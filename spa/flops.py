"""Multiply-accumulate counts (MACs) of a forward pass, two ways (per image, in G).

``count_macs(model, images)`` runs ``model(images)`` once with forward hooks and returns a ``MacCount``:

``executed``
    what the layers actually computed, padding included: SPA blocks from their packing plan
    (``block.last_packed``): linear layers and the FFN on the ``R`` rows (kept tokens, or every token for the
    ``masked`` layout), attention on ``K`` containers of ``S`` slots (``2 * K * S * S * A`` for ``q @ k`` and
    ``attn @ v``, ``A`` = heads x head dim); timm Swin blocks on windows of the padded map.
``kept``
    the same, counting only real, kept tokens: linear layers and FFN on kept tokens, attention on the pairs
    of kept tokens that share a chunk (``2 * A * sum(n_chunk ** 2)``; masks inside a chunk are not subtracted).

Both count linear layers (including the gate's ``C -> 1`` scorer on every token and ``ffn='all'`` on
unkept tokens), attention matmuls and convolutions (the patch embedding); norms, activations, softmax and
other element-wise work are not counted. With ``select='all'`` at sizes where every map is a multiple of
the window, both equal half of PyTorch's ``FlopCounterMode`` total (it counts 2 FLOPs per MAC; use the
``math`` SDPA backend so attention is counted there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from spa.models.spa_block import SPABlock

__all__ = ["MacCount", "MacTally", "count_macs", "counting_macs"]


@dataclass(frozen=True)
class MacCount:
    """GMACs per image of one forward pass.

    Attributes:
        kept: MACs spent on real, kept tokens.
        executed: MACs actually computed, padding included.
        by_module: ``name -> (kept, executed)`` GMACs per image of every counted module.
    """

    kept: float
    executed: float
    by_module: dict[str, tuple[float, float]] = field(default_factory=dict)


def _linear_macs(linear: nn.Linear) -> int:
    return linear.in_features * linear.out_features


def _mlp_macs(mlp: nn.Module) -> int:
    return sum(_linear_macs(m) for m in mlp.modules() if isinstance(m, nn.Linear))


def _spa_block_macs(block: SPABlock, x: torch.Tensor) -> tuple[int, int]:
    packed = block.last_packed
    B, H, W, _ = x.shape
    N = H * W
    attn_dim = block.attn.qkv.out_features // 3
    per_row = _linear_macs(block.attn.qkv) + _linear_macs(block.attn.proj) + _mlp_macs(block.mlp)
    gate = B * N * _linear_macs(block.gate.proj)
    kept_tokens = packed.num_kept
    unkept_ffn = (B * N - kept_tokens) * _mlp_macs(block.mlp) if block.ffn == "all" else 0
    K, S = packed.image.shape
    segment = packed.segment[packed.segment >= 0]
    pairs = int((torch.unique(segment, return_counts=True)[1] ** 2).sum()) if segment.numel() else 0
    executed = gate + unkept_ffn
    if kept_tokens:  # the block skips attention and the FFN when it keeps nothing (any layout, masked too)
        executed += packed.num_rows * per_row + 2 * attn_dim * K * S * S
    kept = gate + kept_tokens * per_row + 2 * attn_dim * pairs + unkept_ffn
    return kept, executed


def _swin_block_macs(block: SwinTransformerBlock, x: torch.Tensor) -> tuple[int, int]:
    B, H, W, _ = x.shape
    wh, ww = block.window_size
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    attn_dim = block.attn.qkv.out_features // 3
    proj = _linear_macs(block.attn.qkv) + _linear_macs(block.attn.proj)
    mlp = B * H * W * _mlp_macs(block.mlp)  # the MLP runs on the unpadded map
    windows = (hp // wh) * (wp // ww)
    executed = B * hp * wp * proj + 2 * attn_dim * B * windows * (wh * ww) ** 2 + mlp
    rows = sum(min(wh, H - r) ** 2 for r in range(0, hp, wh))
    cols = sum(min(ww, W - c) ** 2 for c in range(0, wp, ww))
    kept = B * H * W * proj + 2 * attn_dim * B * rows * cols + mlp
    return kept, executed


def _plain_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() // module.out_features * _linear_macs(module)
    kernel = module.weight.shape[1] * module.weight[0, 0].numel()  # in_channels / groups * kernel area
    return output.numel() * kernel


class MacTally:
    """MACs accumulated over every forward of a model while ``counting_macs`` is active."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}
        self.images = 0

    def add(self, name: str, kept: int, executed: int) -> None:
        old = self.counts.get(name, (0, 0))
        self.counts[name] = (old[0] + kept, old[1] + executed)

    def result(self) -> MacCount:
        """GMACs per image over all images seen so far."""
        if self.images == 0:
            raise ValueError("no forward pass was counted")
        scale = 1e9 * self.images
        return MacCount(
            kept=sum(k for k, _ in self.counts.values()) / scale,
            executed=sum(e for _, e in self.counts.values()) / scale,
            by_module={name: (k / scale, e / scale) for name, (k, e) in self.counts.items()},
        )


@contextmanager
def counting_macs(
    model: nn.Module, count_images: bool = True, exclude: Iterable[nn.Module] = ()
) -> Iterator[MacTally]:
    """Count the MACs of every forward of ``model``'s layers inside the block (hooks, no extra forward).

    With ``count_images`` the images are counted from the first dimension of ``model``'s first input at
    each ``model(...)`` call; a caller that runs the model another way (e.g. a detector calling a
    backbone method) sets it to False and adds to ``tally.images`` itself. Modules in ``exclude`` (and
    their children) are not counted, e.g. a classifier head when only the backbone's features count.
    """
    tally = MacTally()
    inside: set[int] = {id(m) for module in exclude for m in module.modules()}
    handles = []
    if count_images:
        handles.append(
            model.register_forward_pre_hook(
                lambda m, args: setattr(tally, "images", tally.images + args[0].shape[0])
            )
        )
    for name, module in model.named_modules():
        if isinstance(module, (SPABlock, SwinTransformerBlock)) and id(module) not in inside:
            inside.update(id(m) for m in module.modules() if m is not module)
            fn = _spa_block_macs if isinstance(module, SPABlock) else _swin_block_macs
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, name=name, fn=fn: tally.add(name, *fn(m, args[0]))
                )
            )
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(module) not in inside:
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, name=name: tally.add(name, _plain_macs(m, out), _plain_macs(m, out))
                )
            )
    try:
        yield tally
    finally:
        for handle in handles:
            handle.remove()


def count_macs(model: nn.Module, images: torch.Tensor) -> MacCount:
    """Run ``model(images)`` once (no grad, in the model's current mode) and count its MACs per image.

    SPA blocks, timm Swin blocks, and every other ``nn.Linear`` / ``nn.Conv2d`` are counted (see the module
    docstring). Returns GMACs per image.
    """
    if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty batch tensor")
    with counting_macs(model) as tally, torch.no_grad():
        model(images)
    return tally.result()
