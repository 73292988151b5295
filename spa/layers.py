"""Layers of the SPA block that run on token rows.

``RowsLinear`` is ``nn.Linear`` (same parameters, same state dict, same result up to float rounding) with one
change of GEMM orientation. A packed block runs its linear layers on the kept tokens' rows only, so at batch 1
they see few rows: SPT-T's stage 4 keeps about 15 of 49 tokens at keep ratio 0.3. For ``x @ W.T`` with so few
rows, the CPU BLAS PyTorch ships with (MKL) picks a kernel that is slower than for 49 rows; ``(W @ x.T).T``,
the same product with the weight as the left operand, is not. Measured on this project's 2-core CPU machine,
each layer alone at 15 rows (``768 -> 2304`` / ``768 -> 3072`` / ``3072 -> 768``): 0.59 / 0.84 / 0.84 ms as
``F.linear``, 0.23 / 0.34 / 0.32 ms transposed; at 49 rows and more the two are equal or ``F.linear`` is faster.
For a whole stage-4 SPA block at batch 1 and keep ratio 0.3 (``spa bench block --batch-size 1 --resolution 7
--dim 768 --heads 24 --keep-ratios 1.0,0.3 --layouts containers``) the forward went from 0.972 to 0.830 of a
dense Swin block. So the transposed form is used only below ``FEW_ROWS`` rows, for weights of at least
``FEW_ROWS_MIN_WEIGHT`` entries (smaller weights stay in cache and show no gap), in float32 on CPU, without
autograd (inference), without autocast (not measured there) and outside ``torch.compile`` (which picks its
own kernels). At SPT-T's widths that is ``qkv``, ``fc1`` and ``fc2`` of the stage-4 blocks (``proj``'s
768 x 768 weight is below the floor). Set ``spa.layers.FEW_ROWS = 0`` to turn it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEW_ROWS", "FEW_ROWS_MIN_WEIGHT", "RowsLinear", "few_rows_applies"]

FEW_ROWS = 33  # the transposed product is used for inputs of fewer rows than this
FEW_ROWS_MIN_WEIGHT = 2**20  # ... and weights of at least this many entries (768 x 2304 has 1.77 M)


def few_rows_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``RowsLinear`` computes ``x @ weight.T`` as ``(weight @ x.T).T`` (see the module docstring)."""
    # compiling first: a traced row count is symbolic, and testing it would add a guard (and a recompile when
    # the kept-token count crosses ``FEW_ROWS``); then the row count, which rules out most calls (many rows)
    if torch.compiler.is_compiling() or x.dim() != 2 or x.shape[0] >= FEW_ROWS:
        return False
    return (
        weight.numel() >= FEW_ROWS_MIN_WEIGHT
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class RowsLinear(nn.Linear):
    """``nn.Linear`` that computes a product of few rows in the faster GEMM orientation on CPU (module
    docstring). The result is a transposed (non-contiguous) ``[rows, out]`` view in that case."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not few_rows_applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(self.weight, x.t()).t()
        return torch.addmm(self.bias[:, None], self.weight, x.t()).t()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> RowsLinear:
        """A ``RowsLinear`` holding ``linear``'s very parameters (nothing is copied or re-initialised)."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight = linear.weight
        out.bias = linear.bias
        return out
