"""Token gate: a linear scorer, logit fusion and the hard keep decision (spec steps 1-3).

The pure functions here take logits ``[B, N]`` and return bool keep masks ``[B, N]``; ``TokenGate`` wires
them together for one SPA block. ``valid`` masks mark real tokens (padding tokens are never kept).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SELECT_MODES",
    "GateDecision",
    "TokenGate",
    "enforce_min_keep",
    "fuse_logits",
    "gumbel_keep",
    "keep_top",
    "random_keep",
    "set_keep_threshold",
    "threshold_keep",
    "topk_keep",
]

SELECT_MODES = ("gate", "all", "topk", "random")
_AT_LEAST_FP32 = (torch.float32, torch.float64)  # dtypes that ``promote_types(dtype, float32)`` leaves alone


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` if it is enabled there (else nothing: no context at all)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): never enabled there
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


# Set by ``deferred_nan_checks``: the NaN checks of ``_check_logits`` are collected there instead of run (each
# one costs a device sync); the caller runs them in a sync it makes anyway.
_DEFERRED_NAN_CHECKS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "spa_deferred_nan_checks", default=None
)


def _nan_error(name: str) -> ValueError:
    return ValueError(
        f"{name} contain NaN or inf: the gate cannot decide which tokens to keep, or a kept token would make its "
        "window NaN (NaN or inf in the input or weights?)"
    )


@contextlib.contextmanager
def _deferred_nan_checks():
    """Collect the NaN checks of the gate functions called inside as ``(has_nan, name)`` pairs (``has_nan`` a
    0-d bool tensor, not yet read) instead of running them; the caller must read them all and raise
    ``_nan_error(name)`` for the first that is True (``SPABlock`` reads them with the packing counts)."""
    pending: list[tuple[torch.Tensor, str]] = []
    token = _DEFERRED_NAN_CHECKS.set(pending)
    try:
        yield pending
    finally:
        _DEFERRED_NAN_CHECKS.reset(token)


def _check_logits(logits: torch.Tensor, name: str = "logits", own: torch.Tensor | None = None) -> None:
    """Refuse NaN ``logits`` (no decision can be made); with ``own`` (a gate's own logits, fused into ``logits``),
    also a token whose own logit is not finite: inf in a token gives an inf logit, and attention over the token
    would give its whole window NaN. ``+-inf`` in ``logits`` alone (e.g. a caller's previous logits meaning
    "always" / "never keep") is allowed."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"{name} must be a floating point tensor, got {getattr(logits, 'dtype', type(logits))}"
        )
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [B, N], got shape {tuple(logits.shape)}")
    # ``x - x`` is NaN exactly where ``x`` is NaN or +-inf (fewer ops than ``isfinite``: this runs every block)
    if own is None:
        bad = torch.isnan(logits).any()
    elif own is logits:
        bad = torch.isnan(own - own).any()
    else:
        bad = torch.isnan(logits + (own - own)).any()
    pending = _DEFERRED_NAN_CHECKS.get()
    if pending is not None:
        pending.append((bad, name))
    elif bad:
        raise _nan_error(name)


def _check_valid(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(like, dtype=torch.bool)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    if valid.shape != like.shape:
        raise ValueError(f"valid must have shape {tuple(like.shape)}, got {tuple(valid.shape)}")
    return valid


def fuse_logits(own: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Element-wise max of a block's own logits and the previous block's fused logits (spec step 1)."""
    if previous is None:
        return own
    if previous.shape != own.shape:
        raise ValueError(
            f"previous logits {tuple(previous.shape)} do not match own logits {tuple(own.shape)}"
        )
    return torch.maximum(own, previous)


def threshold_keep(logits: torch.Tensor, threshold: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic decision used in eval: keep where ``sigmoid(logits) > threshold``."""
    _check_logits(logits)
    return (torch.sigmoid(logits) > threshold) & _check_valid(valid, logits)


def gumbel_keep(
    logits: torch.Tensor,
    threshold: float,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-perturbed decision used in training.

    With keep/drop logits ``(s, 0)`` the two-class Gumbel-softmax keep probability is
    ``sigmoid((s + g1 - g2) / T)``, and ``g1 - g2`` is logistic noise. Returns ``(keep, y)``: the hard mask
    ``y > threshold`` and the perturbed soft sample ``y`` (used by the optional straight-through estimator).
    """
    _check_logits(logits)
    return _gumbel_decision(logits, threshold, temperature, valid, generator)


def _gumbel_decision(
    logits: torch.Tensor,
    threshold: float,
    temperature: float,
    valid: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_keep`` on logits the caller has checked."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # noise and decision in at least float32: bf16 / fp16 uniforms are too coarse for logistic noise
    dtype = torch.promote_types(logits.dtype, torch.float32)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    y = torch.sigmoid((logits.to(dtype) + noise) / temperature)
    keep = y > threshold
    return keep if valid is None else keep & _check_valid(valid, logits), y.to(logits.dtype)


def keep_top(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``counts[b]`` highest-scoring valid tokens of every image (ties broken by position)."""
    valid = _check_valid(valid, scores)
    order = scores.detach().argsort(dim=1, descending=True, stable=True)
    # valid tokens first (a valid token scored -inf still outranks every invalid one), score order kept
    invalid_in_order = (~valid).gather(1, order).to(torch.uint8)
    order = order.gather(1, invalid_in_order.argsort(dim=1, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < counts.to(ranks.device)[:, None]) & valid


def _ratio_counts(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {ratio}")
    # rounded to 1e-6 first so that a product that is an integer (0.28 * 25 = 7.000000000000001 in floating
    # point) is not rounded up to the next one
    return torch.ceil((valid.sum(1).double() * ratio).round(decimals=6)).long()


@functools.lru_cache(maxsize=256)
def _ratio_count(num_tokens: int, ratio: float) -> int:
    """``_ratio_counts`` of an image whose ``num_tokens`` tokens are all valid, on the host (the same ops)."""
    return int(_ratio_counts(torch.ones(1, num_tokens, dtype=torch.bool), ratio)[0])


def _top_of_all(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``keep_top(scores, counts)`` when every token is valid and every image keeps ``count``: the first
    ``count`` of the same stable descending order, set in one scatter."""
    order = (scores.detach() if scores.requires_grad else scores).argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(1, order[:, :count], True)


def topk_keep(logits: torch.Tensor, ratio: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform-ratio baseline: the gate's top ``ceil(ratio * n_valid)`` tokens of every image."""
    _check_logits(logits)
    valid = _check_valid(valid, logits)
    return keep_top(logits, _ratio_counts(valid, ratio), valid)


def random_keep(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``ceil(ratio * n_valid)`` uniformly random valid tokens of every image."""
    scores = torch.rand(valid.shape, generator=generator, device=valid.device)
    return keep_top(scores, _ratio_counts(valid, ratio), valid)


def enforce_min_keep(
    keep: torch.Tensor, logits: torch.Tensor, min_keep: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Top up images that keep fewer than ``min_keep`` valid tokens with their best-scoring unkept ones (up to
    ``min_keep``, at most all valid tokens); images that already keep enough are left as they are."""
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    if min_keep == 0:
        return keep
    valid = _check_valid(valid, logits)
    kept = keep & valid
    missing = (valid.sum(1).clamp(max=min_keep) - kept.sum(1)).clamp(min=0)
    return keep | keep_top(logits, missing, valid & ~kept)


class GateDecision(NamedTuple):
    """Output of ``TokenGate``: all ``[B, N]``; ``soft`` is None when no soft factor applies."""

    own_logits: torch.Tensor
    fused_logits: torch.Tensor
    keep: torch.Tensor
    soft: torch.Tensor | None


class TokenGate(nn.Module):
    """Scores tokens with a linear ``C -> 1`` layer and decides which ones an SPA block keeps.

    Args:
        dim: token channels ``C``.
        select: ``gate`` (threshold on the fused keep probability; Gumbel-perturbed in training),
            ``all`` (keep every token, no soft factor: the block computes Swin's block where its map is a
            multiple of the window; on other maps Swin also attends over its zero padding, this block does not),
            ``topk`` (the gate's top ``keep_ratio`` of every image) or ``random`` (``keep_ratio`` random tokens
            of every image). NaN / inf checks run where a keep decision is made, so ``all`` passes NaN through
            as timm's Swin does.
        keep_threshold: keep where the (perturbed) keep probability exceeds this.
        temperature: Gumbel temperature in training.
        keep_ratio: ratio for ``topk`` and ``random``.
        min_keep: keep at least this many tokens per image (default 0: an image may keep none).
        straight_through: pass the hard decision's gradient to the logits through the soft sample.
        init_keep_prob: initial keep probability; the scorer's bias starts at its logit.
    """

    def __init__(
        self,
        dim: int,
        select: str = "gate",
        keep_threshold: float = 0.3,
        temperature: float = 1.0,
        keep_ratio: float = 0.5,
        min_keep: int = 0,
        straight_through: bool = False,
        init_keep_prob: float = 0.5,
    ) -> None:
        super().__init__()
        if select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
        if not 0.0 < keep_threshold < 1.0:
            raise ValueError(f"keep_threshold must be in (0, 1), got {keep_threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {min_keep}")
        if not 0.0 < init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob must be in (0, 1), got {init_keep_prob}")
        self.select = select
        self.keep_threshold = keep_threshold
        self.temperature = temperature
        self.keep_ratio = keep_ratio
        self.min_keep = min_keep
        self.straight_through = straight_through
        self.init_keep_prob = init_keep_prob
        self.proj = nn.Linear(dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, math.log(self.init_keep_prob / (1.0 - self.init_keep_prob)))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Own logits ``[B, N]`` of tokens ``x`` ``[B, N, C]``, in at least float32.

        The keep decision thresholds these logits, so they are never computed in a low precision: under
        autocast the ``C -> 1`` projection runs with autocast off on an fp32 copy of ``x`` (and of the weights
        when the model itself is in bf16 / fp16). In fp32 without autocast this is ``self.proj(x)`` as it is.
        """
        dtype = x.dtype if x.dtype in _AT_LEAST_FP32 else torch.promote_types(x.dtype, torch.float32)
        proj = self.proj
        with _autocast_off(x.device.type):
            if proj.weight.dtype == dtype and (proj.bias is None or proj.bias.dtype == dtype):
                # through the module: its hooks still see the call
                return proj(x if x.dtype == dtype else x.to(dtype)).squeeze(-1)
            bias = None if proj.bias is None else proj.bias.to(dtype)
            return F.linear(x.to(dtype), proj.weight.to(dtype), bias).squeeze(-1)

    def forward(
        self,
        x: torch.Tensor,
        previous_logits: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> GateDecision:
        own = self.score(x)
        fused = fuse_logits(own, previous_logits)
        if valid is not None:
            valid = _check_valid(valid, own)
        # ``valid=None`` (every token valid, as in an SPA block) takes the same decisions without the all-True
        # mask and its ops
        if self.select == "all":
            keep = torch.ones_like(own, dtype=torch.bool) if valid is None else valid.clone()
            return GateDecision(own, fused, keep, None)
        _check_logits(fused, own=own)  # every decision below reads the fused logits
        sample: torch.Tensor | None = None  # the soft sample of the straight-through estimator
        soft: torch.Tensor | None = None
        if self.select == "gate":
            if self.training:
                keep, sample = _gumbel_decision(fused, self.keep_threshold, self.temperature, valid)
            else:
                if self.straight_through:
                    sample = torch.sigmoid(fused)
                soft = torch.sigmoid(fused)
                keep = soft > self.keep_threshold  # threshold_keep, on the soft factor's values
                if valid is not None:
                    keep = keep & valid
        elif self.select == "topk":
            if valid is None:
                keep = _top_of_all(fused, _ratio_count(fused.shape[1], self.keep_ratio))
            else:
                keep = keep_top(fused, _ratio_counts(valid, self.keep_ratio), valid)
        else:
            if valid is None:
                count = _ratio_count(fused.shape[1], self.keep_ratio)  # checks the ratio before drawing
                keep = _top_of_all(torch.rand(fused.shape, device=fused.device), count)
            else:
                keep = random_keep(valid, self.keep_ratio)
        if self.straight_through and sample is None:
            sample = torch.sigmoid(fused)
        keep = enforce_min_keep(keep, fused, self.min_keep, valid)
        if soft is None:
            soft = torch.sigmoid(fused)
        if self.straight_through:
            soft = soft * (1.0 + sample - sample.detach())
        return GateDecision(own, fused, keep, soft)

    def extra_repr(self) -> str:
        return (
            f"select={self.select!r}, keep_threshold={self.keep_threshold}, temperature={self.temperature}, "
            f"keep_ratio={self.keep_ratio}, min_keep={self.min_keep}, straight_through={self.straight_through}"
        )


def set_keep_threshold(model: nn.Module, threshold: float) -> int:
    """Set the inference keep threshold of every :class:`TokenGate` in ``model``; returns how many gates
    were changed."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"keep threshold must be in (0, 1), got {threshold}")
    gates = [m for m in model.modules() if isinstance(m, TokenGate)]
    for gate in gates:
        gate.keep_threshold = threshold
    return len(gates)
