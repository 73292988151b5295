"""Selection loss: supervise every SPA block's own gate logits with the ground-truth foreground."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from spa.labels import batch_selection_labels
from spa.selection import Selection

__all__ = ["SELECT_LOSS_NAME", "selection_loss", "selection_loss_from_targets"]

SELECT_LOSS_NAME = "loss_select"

Labels = Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor]


def selection_loss(
    selections: Sequence[Selection],
    labels: Labels,
    alpha: float = 0.01,
    name: str = SELECT_LOSS_NAME,
    check_labels: bool = True,
) -> dict[str, torch.Tensor]:
    """``{name: alpha * sum_blocks mean_tokens BCE-with-logits(own_logits, label at the block's stride)}``.

    Args:
        selections: the records of the SPA blocks (the backbone's output).
        labels: a mapping ``stride -> [B, h, w]`` float labels, or a callable ``stride -> labels``
            (e.g. a :func:`functools.partial` of :func:`spa.labels.batch_selection_labels`; it is called
            once per distinct stride). Labels must match each block's ``own_logits`` shape exactly.
        alpha: loss weight (the spec's 0.01).
        name: key of the returned loss term.
        check_labels: check labels given as a mapping (below); the tasks' training steps, which make them
            with ``batch_selection_labels``, turn it off (no device sync per step).

    With no selections the term is a zero scalar (without a graph). Labels given as a mapping are checked:
    a missing stride, NaN or values outside [0, 1] (e.g. a 0/255 mask) raise ``ValueError`` (one device sync
    per stride on an accelerator); a callable's labels are trusted (``batch_selection_labels`` makes them).
    """
    cache: dict[int, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for sel in selections:
        if sel.stride not in cache:
            if isinstance(labels, Mapping):
                if sel.stride not in labels:
                    raise ValueError(
                        f"no selection labels at stride {sel.stride} (block {sel.block} of stage {sel.stage}); "
                        f"labels has strides {sorted(labels)}"
                    )
                lab = torch.as_tensor(labels[sel.stride])
                cache[sel.stride] = _checked_labels(lab, sel.stride) if check_labels else lab
            else:
                cache[sel.stride] = torch.as_tensor(labels(sel.stride))
        lab = cache[sel.stride]
        logits = sel.own_logits
        if lab.shape != logits.shape:
            raise ValueError(
                f"selection labels at stride {sel.stride} have shape {tuple(lab.shape)} but block "
                f"{sel.block} of stage {sel.stage} has own_logits {tuple(logits.shape)} [B, H, W]; labels "
                "must use the block's ceil(H/stride) x ceil(W/stride) grid of the (padded) input"
            )
        term = F.binary_cross_entropy_with_logits(
            logits.float(), lab.to(device=logits.device, dtype=torch.float32), reduction="mean"
        )
        total = term if total is None else total + term
    if total is None:
        total = torch.zeros(())
    return {name: alpha * total}


def _checked_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """``labels`` if they are numbers in [0, 1] (BCE targets); ``ValueError`` otherwise."""
    if labels.is_complex():
        raise TypeError(f"selection labels at stride {stride} must be real numbers, got {labels.dtype}")
    if labels.numel() and labels.dtype != torch.bool:
        values = labels.float()
        if bool(((values < 0) | (values > 1) | values.isnan()).any()):
            low, high = torch.aminmax(values.nan_to_num(nan=0.0))
            nan = " and NaN" if bool(values.isnan().any()) else ""
            raise ValueError(
                f"selection labels at stride {stride} must be in [0, 1] (BCE targets), got values in "
                f"[{float(low):g}, {float(high):g}]{nan}"
            )
    return labels


def selection_loss_from_targets(
    selections: Sequence[Selection],
    targets: Sequence[Mapping[str, Any]],
    input_size: tuple[int, int],
    alpha: float = 0.01,
    use_masks: bool = True,
    name: str = SELECT_LOSS_NAME,
) -> dict[str, torch.Tensor]:
    """:func:`selection_loss` with labels built from torchvision-style ``targets`` in the frame of the
    (padded) input of ``input_size = (H, W)`` (see :func:`spa.labels.batch_selection_labels`)."""
    batch = selections[0].own_logits.shape[0] if selections else len(targets)
    if len(targets) != batch:  # never pad a missing image's targets with background
        raise ValueError(f"{len(targets)} targets for a batch of {batch} images: give one target per image")

    def build(stride: int) -> torch.Tensor:
        return batch_selection_labels(targets, input_size, stride, use_masks=use_masks, batch_size=batch)

    return selection_loss(selections, build, alpha=alpha, name=name)
