"""Optional compiled inference path: regional ``torch.compile`` of the per-block dense work.

``compile_model(model)`` compiles, in place, the blocks inside ``model`` (an SPT, a dense timm Swin baseline, a
detector or classifier wrapping either, or a single block) rather than the whole model:

* every ``SPABlock``: its per-row work ``_kept_update`` (LayerNorm, ``qkv``, attention over the packed rows,
  projection, soft gate, MLP on the kept tokens' rows). The gate, the packing plan (one host sync per block,
  data-dependent sizes) and the final scatter stay eager, so Dynamo never has to trace through them;
* every timm ``SwinTransformerBlock`` (stages 1-2 of an SPT, all blocks of a dense Swin): the whole block
  (``nn.Module.compile``). The dense baseline is compiled the same way, so SPT / Swin ratios stay fair.

With ``dynamic=True`` (default) the graphs are traced with symbolic sizes, so a new number of kept tokens
(rows, containers) or a new batch size does not recompile. ``dense_static=True`` compiles timm's dense blocks
with static sizes instead (their sizes change only with the batch or image size; every new one recompiles):
at a fixed input size that is much faster on this project's CPU. ``spa bench backbone --models
spt_tiny,swin_tiny --sizes 224 --batch-sizes 8 --keep-ratios 0.3 --layouts containers --rounds 9 --compile
--no-memory`` (the benchmarks set it) timed compiled Swin-T at 7.63 train / 22.5 inference images/s with
static dense blocks against 3.30 / 7.47 with symbolic ones, eager being about 7.0 / 19.2 (README, "Compiled
inference"). Blocks of the same class and configuration share their graphs (Dynamo caches per code object).
Compilation is lazy: the first forward through each distinct block configuration pays for it (tens of seconds
per graph on a small CPU).

Numerics: compiled kernels may reorder floating-point operations (differences of the order of float32
rounding), the default eager path is untouched. Compile after copying or loading the model: the state dict is
unchanged (same keys), and a copy or a pickle of a compiled block compiles again on first use.

FlexAttention (``backend='varlen'``, CUDA) is compiled by ``spa.attention`` itself; inside a compiled region
Dynamo captures it directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compile_model", "compiled_regions"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # Dynamo's graphs per code object, raised to at least this by ``compile_model``


class _CompiledKeptUpdate:
    """``SPABlock._kept_update`` through ``torch.compile``, set as an instance attribute of the block (it shadows
    the method). The compiled function is built on first call and left out of copies and pickles (rebuilt on
    their first call)."""

    def __init__(self, block: nn.Module, options: dict[str, Any]) -> None:
        self.block = block
        self.options = options
        self._fn = None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = torch.compile(type(self.block)._kept_update, **self.options)
        return self._fn(self.block, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"block": self.block, "options": self.options, "_fn": None}

    def __repr__(self) -> str:
        return f"_CompiledKeptUpdate({self.options})"


def _swin_block_types() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformerBlock

    return (SwinTransformerBlock,)


def _regions(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every block ``compile_model`` compiles, ``kind`` ``spa`` or ``swin``."""
    from spa.models.spa_block import SPABlock

    swin = _swin_block_types()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SPABlock):
            found.append((name, module, "spa"))
        elif isinstance(module, swin):
            found.append((name, module, "swin"))
    return found


def _is_compiled(module: nn.Module, kind: str) -> bool:
    if kind == "spa":
        return isinstance(module.__dict__.get("_kept_update"), _CompiledKeptUpdate)
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled_regions(model: nn.Module) -> list[str]:
    """Names (``model.named_modules()``; ``""`` for the model itself) of the blocks of ``model`` that are compiled."""
    return [name for name, module, kind in _regions(model) if _is_compiled(module, kind)]


def compile_model(
    model: nn.Module, *, dynamic: bool = True, mode: str | None = None, dense_static: bool = False
) -> nn.Module:
    """Compile the per-block dense work of ``model`` in place (regional ``torch.compile``); returns ``model``.

    Args:
        model: an SPT, a dense Swin baseline (``spa.models.create_backbone('swin_tiny')``), a detector or
            classifier holding one, or a single ``SPABlock`` / timm ``SwinTransformerBlock``.
        dynamic: trace with symbolic sizes (kept-token counts, containers, batch size) instead of recompiling for
            every new size.
        mode: ``torch.compile`` mode (``None``, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``).
        dense_static: compile timm's dense ``SwinTransformerBlock`` s with static sizes (``dynamic=False``) whatever
            ``dynamic`` says: faster at one input size, a recompile for every new batch or image size (up to
            Dynamo's recompile limit, then eager). For fixed-size inputs (benchmarks, classification at one size).

    Blocks that are already compiled are left as they are (calling this twice is harmless). Raises Dynamo's
    ``recompile_limit`` (a process-wide setting) to at least ``RECOMPILE_LIMIT``. Raises
    ``TypeError`` for a non-module and ``ValueError`` for an unknown mode or a model without such blocks.
    See the module docstring for what is and is not compiled.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_model expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {dynamic!r}")
    if not isinstance(dense_static, bool):
        raise TypeError(f"dense_static must be a bool, got {dense_static!r}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    regions = _regions(model)
    if not regions:
        raise ValueError(
            f"{type(model).__name__} holds no SPABlock or timm SwinTransformerBlock to compile "
            "(compile_model compiles blocks, not whole models; use torch.compile for others)"
        )
    options: dict[str, Any] = {"dynamic": dynamic, "mode": mode}
    # every block class has one code object, and Dynamo caps the graphs per code object (8 by default): the
    # configurations of a model's blocks (width, shift, batch size 1, trimmed containers, training / inference)
    # need more, else the rest would silently run eagerly
    import torch._dynamo

    config = torch._dynamo.config
    # torch < 2.7 calls it cache_size_limit
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for _, module, kind in regions:
        if _is_compiled(module, kind):
            continue
        if kind == "spa":
            module.__dict__["_kept_update"] = _CompiledKeptUpdate(module, options)
        else:
            module.compile(**{**options, "dynamic": False} if dense_static else options)
    return model
