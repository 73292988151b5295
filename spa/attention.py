"""Multi-head attention over packed tokens (spec step 6).

A token attends to the tokens of its own segment (its image's chunk, see ``spa.packing``), never to
padding, optionally restricted further by a pair mask (Swin's shifted-window regions) and shifted by a
per-pair additive bias (relative position bias). Both hooks are functions of the slots' ``position``
(their index in the visiting order) so every backend, and the loop-based reference, can call them.

Backends:
    ``auto``       (default) ``math`` on CPU, ``sdpa`` on CUDA.
    ``math``       explicit ``baddbmm -> softmax -> bmm`` over all containers with an additive mask. On CPU in
                   training it is ~1.5x faster than ``sdpa``: with a bias that needs a gradient, PyTorch's
                   SDPA falls back to its math kernel, which adds a scale pass on ``q``/``k``, a safe-softmax
                   check and a masked-fill backward (``spa bench block`` measures the block).
    ``sdpa``       one ``F.scaled_dot_product_attention`` call over all containers with a mask.
    ``varlen``     FlexAttention on CUDA with the same mask and bias, through ``torch.compile`` (its fused
                   kernel; ``dynamic=True``, so varying container counts do not recompile). Its ``mask_mod`` and
                   ``score_mod`` read small per-slot tensors (segment = image and chunk, shifted-window region,
                   rolled-frame coordinates -> relative position bias table) when the hooks are
                   ``RegionMask`` / ``RelativePositionBias`` (what ``SPABlock`` passes for this backend); other
                   hooks are evaluated densely and read. The block mask is built once per packing plan (kept on
                   the ``Packed``), shared by all heads. No GPU in CI: tests run it eagerly on CPU (forward only,
                   FlexAttention has no CPU backward).
    ``reference``  explicit loops over images and chunks, written from the spec, for tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from spa.layers import RowsLinear
from spa.packing import Packed

__all__ = [
    "BACKENDS",
    "PackedAttention",
    "PairBias",
    "PairMask",
    "RegionMask",
    "RelativePositionBias",
    "TableBias",
    "allowed_pairs",
    "packed_attention",
    "relative_entry",
]

BACKENDS = ("auto", "math", "sdpa", "varlen", "reference")


@dataclass(frozen=True)
class TableBias:
    """A per-pair additive bias given as a lookup, ``bias[k, h, i, j] = table[h, index[k, i, j]]``.

    Relative position biases have this form. Backends gather it themselves, so that the ``math`` backend can
    gather the bias and the attention mask in one pass (masked pairs read an extra ``-inf`` entry).

    Attributes:
        table: ``[heads, entries]`` bias values (any layout; a transposed view of a parameter is fine).
        index: ``[K, S, S]`` long entry of every pair.
    """

    table: torch.Tensor
    index: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.table, torch.Tensor) or self.table.dim() != 2:
            raise ValueError(
                f"table must be [heads, entries], got {getattr(self.table, 'shape', type(self.table))}"
            )
        index = self.index
        if not isinstance(index, torch.Tensor) or index.dtype != torch.long:
            raise TypeError(f"index must be a long tensor, got {getattr(index, 'dtype', type(index))}")
        if index.dim() != 3 or index.shape[1] != index.shape[2]:
            raise ValueError(f"index must be [K, S, S], got {tuple(index.shape)}")
        # the math backend reads entry E as -inf (masked), so an index one past the end would silently mask a
        # pair there: checked on CPU (on CUDA the check would cost a device sync per call)
        if index.numel() and index.device.type == "cpu":
            low, high = torch.aminmax(index)
            if low < 0 or high >= self.table.shape[1]:
                raise ValueError(
                    f"index entries must be in [0, {self.table.shape[1]}) (the table's entries), "
                    f"got {int(low)}..{int(high)}"
                )

    def dense(self) -> torch.Tensor:
        """The bias ``[K, heads, S, S]`` (a head-major view: its ``transpose(0, 1)`` is contiguous)."""
        K, S, _ = self.index.shape
        return _GatherColumns.apply(self.table, self.index).view(-1, K, S, S).transpose(0, 1)

    def masked(self, allowed: torch.Tensor) -> torch.Tensor:
        """The bias with ``-inf`` where ``allowed`` (bool ``[K, S, S]``) is False, in one gather, as head-major
        matrices ``[heads * K, S, S]`` (``dense()`` order transposed) in a fresh tensor that may be updated in
        place (the ``math`` backend accumulates ``q @ k`` into it)."""
        return _GatherColumns.apply(_with_masked_column(self.table), self.masked_index(allowed))

    def masked_index(self, allowed: torch.Tensor) -> torch.Tensor:
        """``index`` with entry ``E`` (the ``-inf`` column ``_with_masked_column`` appends) where ``allowed``
        (bool ``[K, S, S]``) is False."""
        return torch.where(allowed, self.index, self.table.shape[1])


@dataclass(frozen=True)
class _LookupBias(TableBias):
    """A ``TableBias`` whose index was read off a lookup table checked when it was built (so it is not checked
    again per call). With ``premasked`` the index may hold entry ``E`` (one past the table's entries) for pairs
    that are masked anyway (e.g. Swin's shifted-window regions), read as ``-inf``, like ``masked_index``.

    With ``masks_padding`` (implies ``premasked``) the index also holds ``E`` for every pair of a real slot and a
    padding slot, and a finite entry between padding slots: the ``math`` backend then needs only the segment mask
    (none at all when no container holds two segments) instead of ``allowed_pairs``."""

    premasked: bool = False
    masks_padding: bool = False

    def __post_init__(self) -> None:
        pass

    def dense(self) -> torch.Tensor:
        if not self.premasked:
            return super().dense()
        K, S, _ = self.index.shape
        out = _GatherColumns.apply(_with_masked_column(self.table), self.index)
        return out.view(-1, K, S, S).transpose(0, 1)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a device type autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` if it is enabled there (else no context at all)."""
    return (
        torch.autocast(device_type, enabled=False)
        if _autocast_enabled(device_type)
        else contextlib.nullcontext()
    )


def _with_masked_column(table: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[H, E]`` -> ``[H, E + 1]``: entry ``E`` is ``-inf`` (what masked pairs read)."""
    table = table.to(dtype or table.dtype)
    return torch.cat([table, table.new_full((table.shape[0], 1), float("-inf"))], 1)


def _gather_columns(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[:, index]`` for ``[H, E]`` x ``[K, S, S]``, as a fresh ``[H * K, S, S]`` tensor."""
    heads = table.shape[0]
    K, S, _ = index.shape
    out = table.new_empty(heads * K, S, S)
    torch.index_select(table.contiguous(), 1, index.reshape(-1), out=out.view(heads, -1))
    return out


def _scatter_columns(grad: torch.Tensor, index: torch.Tensor, entries: int) -> torch.Tensor:
    """The gradient of ``_gather_columns`` for its table: ``[H * K, S, S]`` summed into ``[H, entries]``."""
    flat = grad.reshape(grad.shape[0] // index.shape[0], -1)  # heads, K * S * S
    return grad.new_zeros(flat.shape[0], entries).index_add_(1, index.reshape(-1), flat)


class _GatherColumns(torch.autograd.Function):
    """``table[:, index]`` ``[H, E]`` x ``[K, S, S]`` -> ``[H * K, S, S]``, returned as a tensor of its own (not a
    view) so that autograd lets callers update it in place."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.entries = table.shape[1]
        return _gather_columns(table, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return _scatter_columns(grad, index, ctx.entries), None


class _RowsMathAttention(torch.autograd.Function):
    """The ``math`` backend from the rows of ``qkv`` to the rows of the output, with a hand-written backward.

    Rows ``[R, 3 * H * D]`` (in slot order) go straight into head-major slots ``[3, H, K * S, D]`` in one copy
    (the rows before the first padding slot are the first slots, the rest are placed by index); the output
    slots go straight back to rows ``[R, H * D]``. Autograd would record the slot scatter, the head split,
    the unbind and the scale as separate nodes, each with a full-size copy in backward.

    Everything runs in ``qkv``'s dtype (the bias table is cast to it); the table's gradient is accumulated in at
    least float32 and returned in the table's dtype. Under autocast ``_rows_math`` casts ``qkv`` to the autocast
    dtype and calls this with autocast off (what ``torch.amp.custom_fwd(cast_inputs=...)`` does, for any
    device type); the backward also runs with autocast off, so its ops see the dtypes the forward saved.
    """

    @staticmethod
    def forward(ctx, qkv, table, index, tail_slots, prefix: int, slots: tuple[int, int], heads: int, scale):
        """``qkv`` rows ``[R, 3 * heads * D]``; ``table`` ``[heads, E]``; ``index`` ``[K, S, S]`` entry of every
        pair (``E`` where the pair is masked); rows ``0..prefix-1`` sit in slots ``0..prefix-1``, the others in
        ``tail_slots``; ``slots`` is ``(K, S)``."""
        out, qkv_slots, probs = _rows_math_forward(qkv, table, index, tail_slots, prefix, slots, heads, scale)
        ctx.save_for_backward(qkv_slots, probs, index, tail_slots)
        ctx.geometry = (prefix, *slots, heads, qkv.shape[1] // (3 * heads), table.shape[1], scale)
        ctx.table_dtype = table.dtype
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable: say so instead of failing
    def backward(ctx, grad):
        with _autocast_off(grad.device.type):  # a backward run inside an autocast region: no casts here
            return _RowsMathAttention._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        qkv_slots, probs, index, tail_slots = ctx.saved_tensors
        prefix, K, S, heads, D, entries, scale = ctx.geometry
        R = grad.shape[0]
        q, k, v = (t.view(heads * K, S, D) for t in qkv_slots.view(3, heads * K * S, D).unbind(0))
        grad_out = _rows_to_slots(grad.reshape(R, heads, D), tail_slots, prefix, K * S).view(heads * K, S, D)
        grad_slots = grad.new_empty(3, heads * K, S, D)
        grad_q, grad_k, grad_v = grad_slots.unbind(0)
        torch.bmm(probs.transpose(1, 2), grad_out, out=grad_v)
        grad_probs = torch.bmm(grad_out, v.transpose(1, 2))
        grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        table_grad = None
        if ctx.needs_input_grad[1]:  # the masked column's sum (all zeros: probs are 0 there) is dropped
            # summed in at least float32 (a no-op cast for an fp32 table, whatever precision the logits had)
            table_dtype = ctx.table_dtype
            grad_logits_sum = grad_logits.to(torch.promote_types(table_dtype, torch.float32))
            table_grad = _scatter_columns(grad_logits_sum, index, entries + 1)[:, :entries].to(table_dtype)
        torch.baddbmm(grad_q, grad_logits, k, beta=0, alpha=scale, out=grad_q)
        torch.baddbmm(grad_k, grad_logits.transpose(1, 2), q, beta=0, alpha=scale, out=grad_k)
        grad_qkv = _slots_to_rows(grad_slots.view(3 * heads, K * S, D), tail_slots, prefix)
        return grad_qkv.view(R, 3 * heads * D), table_grad, None, None, None, None, None, None


def _rows_math_forward(
    qkv, table, index, tail_slots, prefix: int, slots: tuple[int, int], heads: int, scale
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of ``_RowsMathAttention`` (same arguments): output rows, and the slots and probabilities its
    backward needs."""
    K, S = slots
    R = qkv.shape[0]
    D = qkv.shape[1] // (3 * heads)
    qkv_slots = _rows_to_slots(qkv.view(R, 3 * heads, D), tail_slots, prefix, K * S)
    q, k, v = (t.view(heads * K, S, D) for t in qkv_slots.view(3, heads * K * S, D).unbind(0))
    # bias and mask in one gather (masked pairs read the extra -inf column) into a fresh tensor
    logits = _gather_columns(_with_masked_column(table, qkv.dtype), index)
    logits.baddbmm_(q, k.transpose(1, 2), alpha=scale)
    probs = logits.softmax(-1)  # never a fully masked row: padding rows see themselves
    out = torch.bmm(probs, v).view(heads, K * S, D)
    return _slots_to_rows(out, tail_slots, prefix).view(R, heads * D), qkv_slots, probs


def _apply_rows_math(qkv, table, index, tail_slots, prefix: int, slots: tuple[int, int], heads: int, scale):
    """``_RowsMathAttention.apply``, or its forward alone (the same ops) when no gradient is recorded."""
    if torch.is_grad_enabled() and (qkv.requires_grad or table.requires_grad):
        return _RowsMathAttention.apply(qkv, table, index, tail_slots, prefix, slots, heads, scale)
    return _rows_math_forward(qkv, table, index, tail_slots, prefix, slots, heads, scale)[0]


def _rows_to_slots(rows: torch.Tensor, tail_slots: torch.Tensor, prefix: int, num_slots: int) -> torch.Tensor:
    """Rows ``[R, G, D]`` -> group-major slots ``[G, num_slots, D]`` (zeros in padding slots): rows
    ``0..prefix-1`` go to the same slots, the others to ``tail_slots``."""
    out = rows.new_empty(rows.shape[1], num_slots, rows.shape[2])
    by_group = rows.permute(1, 0, 2)
    out[:, :prefix].copy_(by_group[:, :prefix])
    if prefix < num_slots:
        tail = out[:, prefix:]
        tail.zero_()
        if tail_slots.numel():
            tail.index_copy_(1, tail_slots - prefix, by_group[:, prefix:])
    return out


def _slots_to_rows(slots: torch.Tensor, tail_slots: torch.Tensor, prefix: int) -> torch.Tensor:
    """Group-major slots ``[G, K * S, D]`` -> rows ``[R, G, D]`` (the inverse of ``_rows_to_slots``)."""
    G, _, D = slots.shape
    out = slots.new_empty(prefix + tail_slots.shape[0], G, D)
    out[:prefix].copy_(slots[:, :prefix].permute(1, 0, 2))
    if tail_slots.numel():
        out[prefix:].copy_(slots.index_select(1, tail_slots).permute(1, 0, 2))
    return out


def _rows_math(
    qkv: torch.Tensor, packed: Packed, bias: TableBias | None, pair_mask, heads: int, scale: float
) -> torch.Tensor:
    """``math`` attention from ``qkv`` rows ``[R, 3 * heads * D]`` to output rows ``[R, heads * D]``."""
    if isinstance(bias, _LookupBias) and bias.masks_padding and pair_mask is None:
        # padding (and regions) are in the index already: only pairs of different segments to mask, if any
        index = bias.index
        if packed.mixed_containers:
            segment = packed.segment
            index = index.masked_fill(segment[:, :, None] != segment[:, None, :], bias.table.shape[1])
    else:
        allowed = allowed_pairs(packed.segment, _call(pair_mask, packed.position))
        if bias is None:  # the mask alone: one zero entry for every pair
            bias = TableBias(
                qkv.new_zeros(heads, 1), torch.zeros(allowed.shape, dtype=torch.long, device=qkv.device)
            )
        index = bias.masked_index(allowed)
    K, S = packed.image.shape
    if packed.layout == "masked" or packed.num_kept == K * S:
        prefix, tail = qkv.shape[0], packed.slot_index[:0]  # the rows are the slots
    else:  # rows in slot order: those before the first padding slot sit in their own slots
        prefix = packed._first_padding_slot  # from the packing plan (host), no device sync
        tail = packed.slot_index[prefix:]
    device_type = qkv.device.type
    if not _autocast_enabled(device_type):
        return _apply_rows_math(qkv, bias.table, index, tail, prefix, (K, S), heads, scale)
    # autocast: as torch.amp.custom_fwd(cast_inputs=<the autocast dtype>) for this device type: qkv in the
    # autocast dtype (float64 is left alone, as autocast does), the function itself with autocast off
    if qkv.dtype != torch.float64:
        qkv = qkv.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return _apply_rows_math(qkv, bias.table, index, tail, prefix, (K, S), heads, scale)


PairBias = Callable[[torch.Tensor], "torch.Tensor | TableBias | None"]
"""``position`` ``[K, S]`` -> additive bias ``[K, heads, S, S]`` (or a ``TableBias``) or None (padding
positions are ``-1``)."""
PairMask = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``position`` ``[K, S]`` -> bool ``[K, S, S]`` (True where query ``i`` may see key ``j``) or None. Every real
query must be allowed at least one key of its segment (e.g. itself, as Swin's region masks do): the output of
a query that may see none is not defined (NaN from ``math`` / ``reference``, zeros from ``sdpa``)."""


def _call(hook, position: torch.Tensor) -> torch.Tensor | TableBias | None:
    return None if hook is None else hook(position)


def _dense_bias(pair_bias: PairBias | None, position: torch.Tensor) -> torch.Tensor | None:
    bias = _call(pair_bias, position)
    return bias.dense() if isinstance(bias, TableBias) else bias


def allowed_pairs(segment: torch.Tensor, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[K, S, S]``: same segment, not padding, and ``pair_mask``; padding rows see only themselves.

    Padding rows get their own diagonal so that no softmax row is empty (their outputs are discarded).
    """
    # a real row sees the real tokens of its segment (padding has segment -1, never equal to a real one), a
    # padding row only itself
    same = segment[:, :, None] == segment[:, None, :]
    if pair_mask is not None:
        if pair_mask.dtype != torch.bool:
            raise TypeError(f"a pair mask must be bool [K, S, S] (True: may attend), got {pair_mask.dtype}")
        same = same & pair_mask
    return torch.where((segment >= 0)[:, :, None], same, _eye(segment.shape[1], segment.device))


_EYES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _eye(size: int, device: torch.device) -> torch.Tensor:
    """Bool identity ``[size, size]`` on ``device`` (cached: a few sizes per model, never written to; made in the
    graph while tracing, where a guard on the cache would recompile once it fills)."""
    if torch.compiler.is_compiling():
        return torch.eye(size, dtype=torch.bool, device=device)
    key = (size, device)
    eye = _EYES.get(key)
    if eye is None:
        if len(_EYES) >= 64:
            _EYES.clear()
        with torch.inference_mode(False), torch.no_grad():
            eye = _EYES[key] = torch.eye(size, dtype=torch.bool, device=device)
    return eye


def _math(q, k, v, packed: Packed, pair_bias, pair_mask, dropout_p: float, scale: float | None):
    K, H, S, D = q.shape
    allowed = allowed_pairs(packed.segment, _call(pair_mask, packed.position))  # K, S, S
    bias = _call(pair_bias, packed.position)
    from_table = isinstance(bias, TableBias)
    if not from_table:
        additive = q.new_zeros(K, 1, S, S).masked_fill_(~allowed[:, None], float("-inf"))
        # a plain add (not masked_fill) on the bias: its backward passes the gradient through untouched
        additive = (additive if bias is None else bias + additive).expand(K, H, S, S)  # a bias may broadcast
    # batch the (container, head) matrices in the memory order of the bias (head-major for a TableBias or when
    # the hook returns a transposed view), so that the bias is never copied, forward or backward
    head_major = from_table or additive.transpose(0, 1).is_contiguous()

    def batched(t: torch.Tensor) -> torch.Tensor:
        return (t.transpose(0, 1) if head_major else t).reshape(K * H, S, t.shape[-1])

    scale = D**-0.5 if scale is None else scale
    if from_table:
        # bias and mask in one gather into a fresh tensor; q @ k accumulates into it in place
        logits = bias.masked(allowed).to(q.dtype)  # a no-op unless q is in another precision (autocast)
        logits = logits.baddbmm_(batched(q), batched(k).transpose(1, 2), alpha=scale)
    else:
        logits = torch.baddbmm(batched(additive), batched(q), batched(k).transpose(1, 2), alpha=scale)
    weights = logits.softmax(-1)  # never a fully masked row: padding rows see themselves
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    out = torch.bmm(weights, batched(v))
    return out.view(H, K, S, D).transpose(0, 1) if head_major else out.view(K, H, S, D)


def _sdpa(q, k, v, packed: Packed, pair_bias, pair_mask, dropout_p: float, scale: float | None):
    allowed = allowed_pairs(packed.segment, _call(pair_mask, packed.position))[:, None]  # K, 1, S, S
    bias = _dense_bias(pair_bias, packed.position)
    attn_mask = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def _varlen(q, k, v, packed: Packed, pair_bias, pair_mask, dropout_p: float, scale: float | None):
    if q.device.type != "cuda":
        raise RuntimeError(
            "attention backend 'varlen' needs a CUDA device (it runs FlexAttention kernels); "
            f"got tensors on {q.device}. Use backend='sdpa' on CPU."
        )
    if dropout_p > 0:
        raise ValueError("attention backend 'varlen' does not support attention dropout; use 'sdpa'")
    return _flex(q, k, v, packed, pair_bias, pair_mask, scale)


@dataclass(frozen=True, eq=False)
class RelativePositionBias:
    """Swin's relative position bias as a ``PairBias`` described per token (what ``varlen`` reads).

    The bias of query ``i`` and key ``j`` (visiting positions ``p_i``, ``p_j``) is ``table[e, h]`` with ``e``
    the entry of their rolled-frame offset ``coords[p_i] - coords[p_j]``, clipped to ``[-(M-1), M-1]``
    (``relative_entry``). Called as a hook it returns the ``TableBias`` of the slots (read off ``pairs`` when
    given: the same entries precomputed for every pair of positions); FlexAttention instead looks the
    entry up per score from the slots' ``[K, S]`` coordinates (no ``[K, S, S]`` tensor).

    Attributes:
        table: ``[entries, heads]`` bias table (timm's ``relative_position_bias_table`` layout).
        coords: ``[N, 2]`` long rolled-frame ``(row, col)`` of every visiting position.
        window: ``(h, w)`` of the table (``entries = (2h - 1) * (2w - 1)``).
        pairs: optional ``[N, N]`` long entry of every pair of visiting positions.
    """

    table: torch.Tensor
    coords: torch.Tensor
    window: tuple[int, int]
    pairs: torch.Tensor | None = None

    def __call__(self, position: torch.Tensor) -> TableBias:
        p = position.clamp(min=0)
        if self.pairs is not None:
            return _LookupBias(self.table.t(), self.pairs[p[:, :, None], p[:, None, :]])
        c = self.coords[p]
        rows, cols = c[..., 0], c[..., 1]
        index = relative_entry(
            rows[:, :, None] - rows[:, None, :], cols[:, :, None] - cols[:, None, :], self.window
        )
        return TableBias(self.table.t(), index)


def relative_entry(dh: torch.Tensor, dw: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Entry of Swin's relative position bias table for row / column offsets ``dh``, ``dw`` (clipped to the
    window's range), as ``spa.models.spa_block.PackedWindowAttention.relative_position_bias`` computes it."""
    wh, ww = window
    dh = dh.clamp(-(wh - 1), wh - 1)
    dw = dw.clamp(-(ww - 1), ww - 1)
    return dh * (2 * ww - 1) + dw + ((wh - 1) * (2 * ww - 1) + ww - 1)


@dataclass(frozen=True, eq=False)
class RegionMask:
    """Swin's shifted-window region mask as a ``PairMask`` described per token (what ``varlen`` reads): query
    ``i`` may see key ``j`` iff ``region[p_i] == region[p_j]``.

    Attributes:
        region: ``[N]`` long region label of every visiting position.
        pairs: optional ``[N, N]`` bool, the same test precomputed for every pair of positions.
    """

    region: torch.Tensor
    pairs: torch.Tensor | None = None

    def __call__(self, position: torch.Tensor) -> torch.Tensor:
        p = position.clamp(min=0)
        if self.pairs is not None:
            return self.pairs[p[:, :, None], p[:, None, :]]
        region = self.region[p]
        return region[:, :, None] == region[:, None, :]


def _plan_cache(packed: Packed) -> dict | None:
    """A per-plan cache kept on the ``Packed`` object itself (None while tracing: no side effects there)."""
    if torch.compiler.is_compiling():
        return None
    return packed.__dict__.setdefault("_flex_cache", {})


def _cached(cache: dict | None, key: tuple, tensors: tuple, build: Callable[[], object]) -> object:
    """``build()``, kept in ``cache`` under ``key`` as long as ``tensors`` are the very tensors it read."""
    if cache is None:
        return build()
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(tensors) and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    value = build()
    cache[key] = (tensors, value)
    return value


def _flex_mask_mod(packed: Packed, pair_mask: PairMask | None) -> Callable:
    """FlexAttention ``mask_mod`` equal to ``allowed_pairs(packed.segment, pair_mask(packed.position))``.

    It reads per-slot ``[K, S]`` tensors only: the segment (image and chunk; ``-1`` for padding, whose rows see
    themselves) and, for a ``RegionMask``, the region of each slot. Any other ``pair_mask`` is evaluated into its
    dense ``[K, S, S]`` allowed pairs, which the ``mask_mod`` then reads.
    """
    segment = packed.segment
    if pair_mask is not None and not isinstance(pair_mask, RegionMask):
        allowed = allowed_pairs(segment, pair_mask(packed.position))

        def dense_mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, q_idx, kv_idx]

        return dense_mask_mod
    region = None if pair_mask is None else pair_mask.region[packed.position.clamp(min=0)]

    def mask_mod(b, h, q_idx, kv_idx):
        seg_q = segment[b, q_idx]
        same = seg_q == segment[b, kv_idx]
        if region is not None:
            same = same & (region[b, q_idx] == region[b, kv_idx])
        return torch.where(seg_q >= 0, same, q_idx == kv_idx)

    return mask_mod


def _flex_score_mod(packed: Packed, pair_bias: PairBias | None, cache: dict | None) -> Callable | None:
    """FlexAttention ``score_mod`` adding ``pair_bias``: for a ``RelativePositionBias`` a table lookup from the
    slots' ``[K, S]`` rolled-frame coordinates; any other hook's bias is evaluated densely (``[K, heads, S, S]``)
    and read."""
    if pair_bias is None:
        return None
    if not isinstance(pair_bias, RelativePositionBias):
        bias = _dense_bias(pair_bias, packed.position)
        if bias is None:
            return None

        def dense_score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]

        return dense_score_mod
    coords = pair_bias.coords
    # contiguous, not views of one [K, S, 2] tensor: Inductor's CPU template for FlexAttention takes only whole
    # buffers into its score and mask subgraphs
    rows, cols = _cached(
        cache,
        ("coords",),
        (coords,),
        lambda: tuple(c.contiguous() for c in coords[packed.position.clamp(min=0)].unbind(-1)),
    )
    table, window = pair_bias.table, pair_bias.window

    def score_mod(score, b, h, q_idx, kv_idx):
        entry = relative_entry(rows[b, q_idx] - rows[b, kv_idx], cols[b, q_idx] - cols[b, kv_idx], window)
        return score + table[entry, h]

    return score_mod


def _flex_block_mask(packed: Packed, pair_mask: PairMask | None, cache: dict | None):
    """The ``BlockMask`` of ``packed`` (and a ``RegionMask``), shared by all heads; built once per plan."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        K, S = packed.image.shape
        return create_block_mask(
            _flex_mask_mod(packed, pair_mask), K, None, S, S, device=packed.segment.device
        )

    if pair_mask is None or isinstance(pair_mask, RegionMask):
        tensors = (packed.segment,) if pair_mask is None else (packed.segment, pair_mask.region)
        return _cached(cache, ("block_mask",), tensors, build)
    return build()  # an arbitrary hook: built per call


_COMPILED_FLEX: list[Callable] = []


def _flex_attention_fn(compiled: bool) -> Callable:
    """``flex_attention``, wrapped in ``torch.compile`` (once per process) when ``compiled``."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled or torch.compiler.is_compiling():  # inside a compiled region Dynamo captures it itself
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED_FLEX[0]


def _flex(q, k, v, packed: Packed, pair_bias, pair_mask, scale: float | None, compiled: bool | None = None):
    """FlexAttention over the containers of ``packed`` (the ``varlen`` backend without its device checks).

    The ``mask_mod`` and ``score_mod`` read small per-slot tensors (segment, region, coordinates: see
    ``RelativePositionBias`` and ``RegionMask``); the block mask and the slots' coordinates are built once per
    plan and kept on it. ``compiled`` (default: on CUDA) runs ``flex_attention`` through ``torch.compile`` (its
    fused kernel); eager FlexAttention computes the full score matrix, and has no backward on CPU.
    """
    cache = _plan_cache(packed)
    block_mask = _flex_block_mask(packed, pair_mask, cache)
    score_mod = _flex_score_mod(packed, pair_bias, cache)
    compiled = q.device.type == "cuda" if compiled is None else compiled
    return _flex_attention_fn(compiled)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _reference(q, k, v, packed: Packed, pair_bias, pair_mask, dropout_p: float, scale: float | None):
    """Loops over images and their chunks, rebuilt from ``image``/``position`` and the spec's chunk rule."""
    if dropout_p > 0:
        raise ValueError("the reference backend does not support attention dropout")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    K, H, S, D = q.shape
    q_flat, k_flat, v_flat = (t.transpose(1, 2).reshape(K * S, H, D) for t in (q, k, v))
    out = torch.zeros_like(q_flat)
    image = packed.image.reshape(-1).tolist()
    position = packed.position.reshape(-1).tolist()
    container = [i // S for i in range(K * S)]
    real = packed.slot_index.tolist() if packed.layout == "masked" else range(K * S)
    per_image: dict[int, list[tuple[int, int]]] = {}
    for slot in real:
        if image[slot] >= 0:
            per_image.setdefault(image[slot], []).append((position[slot], slot))
    for _, members in sorted(per_image.items()):
        members.sort()  # visiting order of this image's kept tokens
        if packed.layout == "stream":  # the paper's chunks: whatever shares the container
            groups: dict[int, list[tuple[int, int]]] = {}
            for pos, slot in members:
                groups.setdefault(container[slot], []).append((pos, slot))
            chunks = list(groups.values())
        else:
            L = packed.length
            chunks = [members[i : i + L] for i in range(0, len(members), L)]
        for chunk in chunks:
            slots = torch.tensor([s for _, s in chunk], device=q.device)
            pos = torch.tensor([p for p, _ in chunk], device=q.device)[None]
            qc, kc, vc = q_flat[slots], k_flat[slots], v_flat[slots]  # n, H, D
            logits = torch.einsum("ihd,jhd->hij", qc, kc) * scale
            bias, mask = _dense_bias(pair_bias, pos), _call(pair_mask, pos)
            if bias is not None:
                logits = logits + bias[0]
            if mask is not None:
                logits = logits.masked_fill(~mask[0][None], float("-inf"))
            weights = logits.softmax(-1)
            chunk_out = torch.einsum("hij,jhd->ihd", weights, vc)  # an fp32 bias promotes it under autocast
            out = out.index_put((slots,), chunk_out.to(out.dtype))
    return out.view(K, S, H, D).transpose(1, 2)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``sdpa`` on CUDA, ``math`` elsewhere; other names are returned as they are."""
    if backend == "auto":
        return "sdpa" if device.type == "cuda" else "math"
    return backend


_BACKEND_FNS = {"math": _math, "sdpa": _sdpa, "varlen": _varlen, "reference": _reference}


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed: Packed,
    pair_bias: PairBias | None = None,
    pair_mask: PairMask | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` ``[K, heads, S, D]`` laid out as ``packed``; returns ``[K, heads, S, D]``.

    Outputs in padding slots are unspecified (``unpack`` drops them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4 or q.shape[0] != packed.num_containers or q.shape[2] != packed.image.shape[1]:
        raise ValueError(
            f"q must be [K, heads, S, D] with K={packed.num_containers}, S={packed.image.shape[1]}; "
            f"got {tuple(q.shape)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have q's shape [K, heads, S, D] = {list(q.shape)}, got {list(t.shape)}"
            )
    if packed.num_containers == 0:
        return q
    return _BACKEND_FNS[_resolve_backend(backend, q.device)](
        q, k, v, packed, pair_bias, pair_mask, dropout_p, scale
    )


class PackedAttention(nn.Module):
    """Multi-head self-attention over packed tokens; parameter names follow timm's ``WindowAttention``.

    Args:
        dim: token channels.
        num_heads: attention heads.
        head_dim: channels per head (default ``dim // num_heads``).
        qkv_bias: bias in the ``qkv`` projection.
        attn_drop: attention dropout (``sdpa`` only).
        proj_drop: dropout after the output projection.
        backend: ``auto`` (``math`` on CPU, ``sdpa`` on CUDA), ``math``, ``sdpa``, ``varlen`` (CUDA) or
            ``reference``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.backend = backend
        self.qkv = RowsLinear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = RowsLinear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        packed: Packed,
        pair_bias: PairBias | None = None,
        pair_mask: PairMask | None = None,
    ) -> torch.Tensor:
        """Attention over ``x`` laid out as ``packed``.

        ``x`` is either the rows ``[R, C]`` of the kept tokens (``packed.select(...)``: the projections run
        on kept tokens only and padding exists only inside attention; returns ``[R, C]``) or per-slot
        tokens ``[K, S, C]`` (returns ``[K, S, C]``). ``pair_bias`` and ``pair_mask`` are the optional
        hooks described in the module docstring.
        """
        if x.dim() == 2:
            packed.check_rows(x)
            qkv = self.qkv(x)
            if self._rows_math_applies(qkv, packed):
                bias = _call(pair_bias, packed.position)
                if bias is None or isinstance(bias, TableBias):
                    out = _rows_math(qkv, packed, bias, pair_mask, self.num_heads, self.head_dim**-0.5)
                    return self.proj_drop(self.proj(out))
                pair_bias = lambda _position: bias  # noqa: E731  (the dense bias above, not computed again)
            qkv = packed.to_slots(qkv)
            return self.proj_drop(
                self.proj(packed.from_slots(self._attend(qkv, packed, pair_bias, pair_mask)))
            )
        if x.dim() != 3:
            raise ValueError(f"x must be [R, C] rows or [K, S, C] slots, got {tuple(x.shape)}")
        return self.proj_drop(self.proj(self._attend(self.qkv(x), packed, pair_bias, pair_mask)))

    def _rows_math_applies(self, qkv: torch.Tensor, packed: Packed) -> bool:
        """Rows go through ``_RowsMathAttention`` (the ``math`` backend without autograd's copies) unless
        attention dropout is active or nothing is kept (under autocast too: it runs in the autocast dtype)."""
        return (
            _resolve_backend(self.backend, qkv.device) == "math"
            and packed.num_containers > 0
            and not (self.training and self.attn_drop.p > 0)
        )

    def _attend(
        self, qkv: torch.Tensor, packed: Packed, pair_bias: PairBias | None, pair_mask: PairMask | None
    ) -> torch.Tensor:
        """``qkv`` ``[K, S, 3 * heads * D]`` -> attention output ``[K, S, heads * D]``."""
        K, S, _ = qkv.shape
        if K == 0:
            return qkv.new_zeros(0, S, self.num_heads * self.head_dim)
        q, k, v = qkv.reshape(K, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = packed_attention(
            q,
            k,
            v,
            packed,
            pair_bias=pair_bias,
            pair_mask=pair_mask,
            backend=self.backend,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )
        return out.transpose(1, 2).reshape(K, S, -1)
