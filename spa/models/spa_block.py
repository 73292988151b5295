"""The SPA block: gate -> pack -> windowed attention on kept tokens -> FFN -> unpack (spec steps 1-8).

Parameter names match timm's ``SwinTransformerBlock`` (``norm1``, ``attn.qkv``, ``attn.proj``,
``attn.relative_position_bias_table``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), plus ``gate.proj``, so Swin
weights load directly. With ``select='all'`` and a map that is a multiple of the window, every chunk is
exactly one (shifted) window and the block computes exactly Swin's W-MSA / SW-MSA block, through the
same packed code path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Mlp, trunc_normal_
from torch import nn

from spa.attention import (
    PackedAttention,
    RegionMask,
    RelativePositionBias,
    TableBias,
    _LookupBias,
    _resolve_backend,
)
from spa.gate import _DEFERRED_NAN_CHECKS, TokenGate, _nan_error
from spa.layers import RowsLinear
from spa.packing import LAYOUTS, Packed, _pack
from spa.selection import Selection

__all__ = ["PackedWindowAttention", "SPABlock", "WindowGeometry", "window_geometry", "window_shift"]

FFN_MODES = ("kept", "all")


def window_shift(
    resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's size rule: the window shrinks to a smaller map; no shift where the map fits in the window."""
    win = tuple(r if r <= w else w for r, w in zip(resolution, window))
    sh = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift))
    return win, sh  # type: ignore[return-value]


@dataclass(frozen=True)
class WindowGeometry:
    """Where the tokens of an ``H x W`` map go in (shifted) window order.

    Attributes:
        order: ``[H*W]`` flat image-frame index of each token, in window order of the rolled frame
            (windows row by row, tokens row by row inside a window; padding positions skipped).
        coords: ``[H*W, 2]`` rolled-frame ``(row, col)`` of each entry of ``order``.
        region: ``[H*W]`` Swin shifted-window region label of each entry (all 0 without shift).
        window: window ``(h, w)`` after the size rule.
        shift: shift ``(h, w)`` after the size rule.
    """

    order: torch.Tensor
    coords: torch.Tensor
    region: torch.Tensor
    window: tuple[int, int]
    shift: tuple[int, int]


def _region_labels(size: int, window: int, shift: int) -> torch.Tensor:
    labels = torch.zeros(size, dtype=torch.long)
    if shift:
        labels[size - window : size - shift] = 1
        labels[size - shift :] = 2
    return labels


def window_geometry(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
) -> WindowGeometry:
    """Window order, rolled-frame coordinates and region labels of an ``height x width`` map.

    ``window`` and ``shift`` are used as given (apply ``window_shift`` first for timm's size rule).
    """
    wh, ww = window
    sh, sw = shift
    hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
    rows = torch.arange(hp).view(hp // wh, 1, wh, 1).expand(hp // wh, wp // ww, wh, ww).reshape(-1)
    cols = torch.arange(wp).view(1, wp // ww, 1, ww).expand(hp // wh, wp // ww, wh, ww).reshape(-1)
    real = (rows < height) & (cols < width)
    rows, cols = rows[real], cols[real]
    order = ((rows + sh) % height) * width + (cols + sw) % width
    region = _region_labels(hp, wh, sh)[rows] * 3 + _region_labels(wp, ww, sw)[cols]
    return WindowGeometry(
        order=order.to(device),
        coords=torch.stack([rows, cols], 1).to(device),
        region=region.to(device),
        window=(wh, ww),
        shift=(sh, sw),
    )


_SHARED_CACHE_SIZE = 64  # geometries / pair tables kept (a few per stage and input size)
_SHARED_CACHE_BYTES = 256 * 2**20  # and at most this much tensor memory per cache (pair tables are N x N)
_GEOMETRIES: OrderedDict[tuple, WindowGeometry] = OrderedDict()
_SHARED_LOCK = threading.Lock()


def _nbytes(value: object) -> int:
    tensors = (getattr(value, name) for name in getattr(value, "__dataclass_fields__", ()))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _shared(cache: OrderedDict, key: tuple, build: Callable[[], object]) -> object:
    """``cache[key]``, built on first use; least recently used entries are dropped beyond ``_SHARED_CACHE_SIZE``
    entries or ``_SHARED_CACHE_BYTES`` of tensors (the newest entry is always kept).

    Built outside inference mode and autograd, so that an entry made during an inference pass also serves
    training. Entries are index tensors that are only ever read.
    """
    with _SHARED_LOCK:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
            return value
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    with _SHARED_LOCK:
        value = cache.setdefault(key, value)
        cache.move_to_end(key)
        total = sum(_nbytes(v) for v in cache.values())
        while len(cache) > 1 and (len(cache) > _SHARED_CACHE_SIZE or total > _SHARED_CACHE_BYTES):
            total -= _nbytes(cache.popitem(last=False)[1])
    return value


def _shared_geometry(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> WindowGeometry:
    """``window_geometry``, shared by every block that asks for the same map, window, shift and device (the
    blocks of a stage, every second one shifted, share two)."""
    key = (height, width, window, shift, device)
    return _shared(_GEOMETRIES, key, lambda: window_geometry(height, width, window, shift, device))


class PackedWindowAttention(PackedAttention):
    """``PackedAttention`` with Swin's relative position bias table.

    The bias of a pair comes from the tokens' ``(row, col)`` offset in the rolled frame, clipped to the
    table's range ``[-(M-1), M-1]`` (tokens of one chunk can come from neighbouring windows).
    """

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.window = window
        self.window_size = window  # timm's name (``checkpoint_filter_fn`` reads it)
        wh, ww = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, coords: torch.Tensor) -> TableBias:
        """Bias of the pairs of tokens at rolled-frame ``coords`` ``[K, S, 2]``, as a table lookup
        (``TableBias.dense()`` is ``[K, heads, S, S]``); offsets are clipped to the table's range."""
        wh, ww = self.window
        row, col = coords[..., 0], coords[..., 1]
        dh = (row[:, :, None] - row[:, None, :]).clamp_(-(wh - 1), wh - 1)
        dw = (col[:, :, None] - col[:, None, :]).clamp_(-(ww - 1), ww - 1)
        index = dh.mul_(2 * ww - 1).add_(dw).add_((wh - 1) * (2 * ww - 1) + ww - 1)
        return TableBias(self.relative_position_bias_table.t(), index)


# pair tables are [N, N] long (8 MiB each at 1024 tokens); larger maps compute the pairs per call
_PAIR_TABLE_MAX_TOKENS = 1024
_PAIR_TABLES: OrderedDict[tuple, _PairTables] = OrderedDict()


@dataclass(frozen=True)
class _PairTables:
    """Per-pair lookups of one window geometry, indexed by two visiting positions ``[p_i, p_j]`` (what the
    attention hooks of ``SPABlock`` otherwise compute per call from the tokens' coordinates and regions).

    Attributes:
        entry: ``[N, N]`` relative-position bias entry of every pair (``relative_position_bias``).
        same_region: ``[N, N]`` bool, the shifted-window region mask; None without shift.
        masked_entry: ``[N + 1, N + 1]``: ``entry`` with ``E`` (one past the bias table) where the regions
            differ, and one more row and column for padding slots (position ``-1`` reads index ``N``): ``E``
            against every real token, entry 0 between padding slots (a padding row sees only padding). One lookup
            then gives the ``math`` backend its whole index but for the segment mask.
    """

    entry: torch.Tensor
    same_region: torch.Tensor | None
    masked_entry: torch.Tensor


def _pair_tables(
    attn: PackedWindowAttention, height: int, width: int, geometry: WindowGeometry, device: torch.device
) -> _PairTables:
    """The pair tables of ``geometry`` (of an ``height x width`` map) for ``attn``'s bias window, shared by the
    blocks with the same key."""
    entries = attn.relative_position_bias_table.shape[0]
    key = (height, width, geometry.window, geometry.shift, attn.window, entries, device)

    def build() -> _PairTables:
        # the very computation of ``relative_position_bias`` on all N tokens at once (checked there, once)
        entry = attn.relative_position_bias(geometry.coords[None]).index[0]
        n = entry.shape[0]
        masked = entry.new_full((n + 1, n + 1), entries)
        masked[n, n] = 0
        if not any(geometry.shift):
            masked[:n, :n] = entry
            return _PairTables(entry, None, masked)
        region = geometry.region
        same = region[:, None] == region[None, :]
        masked[:n, :n] = entry.masked_fill(~same, entries)
        return _PairTables(entry, same, masked)

    return _shared(_PAIR_TABLES, key, build)


class SPABlock(nn.Module):
    """Select and Pack Attention block (pre-norm, Swin-style, windowed).

    For a kept token ``t``: ``y = t + sigmoid(s_t) * Attn_packed(LN1(t))`` and ``out = y + MLP(LN2(y))``;
    an unselected token passes through bit-identical (or gets ``x + MLP(LN2(x))`` with ``ffn='all'``).

    Args:
        dim: channels.
        input_resolution: nominal ``(H, W)`` of the map, for the window/shift size rule (other sizes work:
            the rule is re-applied to the actual map in ``forward``).
        num_heads: attention heads.
        window_size: Swin window ``M``.
        shift_size: cyclic shift (0 or ``M // 2``).
        mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path: as timm's Swin block.
        select, keep_threshold, temperature, keep_ratio, min_keep, straight_through, init_keep_prob:
            passed to ``TokenGate``.
        layout: packing layout (``containers``, ``stream``, ``padded``, ``masked``).
        ffn: ``kept`` (FFN only on kept tokens) or ``all``.
        backend: attention backend (``auto``, ``math``, ``sdpa``, ``varlen``, ``reference``).
        stage, block, stride: written into the ``Selection`` record.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        select: str = "gate",
        keep_threshold: float = 0.3,
        temperature: float = 1.0,
        keep_ratio: float = 0.5,
        min_keep: int = 0,
        straight_through: bool = False,
        init_keep_prob: float = 0.5,
        layout: str = "containers",
        ffn: str = "kept",
        backend: str = "auto",
        stage: int = 0,
        block: int = 0,
        stride: int = 16,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
        if (
            isinstance(shift_size, bool)
            or not isinstance(shift_size, int)
            or not 0 <= shift_size < window_size
        ):
            raise ValueError(
                f"shift_size must be an integer in [0, window_size={window_size}), got {shift_size!r}"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if ffn not in FFN_MODES:
            raise ValueError(f"ffn must be one of {FFN_MODES}, got {ffn!r}")
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.target_window = (window_size, window_size)
        self.target_shift = (shift_size, shift_size)
        self.window_size, self.shift_size = window_shift(
            self.input_resolution, self.target_window, self.target_shift
        )
        self.layout = layout
        self.ffn = ffn
        self.stage, self.block, self.stride = stage, block, stride
        self.drop_path = drop_path
        self.gate = TokenGate(
            dim,
            select=select,
            keep_threshold=keep_threshold,
            temperature=temperature,
            keep_ratio=keep_ratio,
            min_keep=min_keep,
            straight_through=straight_through,
            init_keep_prob=init_keep_prob,
        )
        self.norm1 = norm_layer(dim)
        self.attn = PackedWindowAttention(
            dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            backend=backend,
        )  # fmt: skip
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        # the FFN runs on the kept rows: the GEMM orientation that is fast for few rows (``spa.layers``)
        self.mlp.fc1 = RowsLinear.from_linear(self.mlp.fc1)
        self.mlp.fc2 = RowsLinear.from_linear(self.mlp.fc2)
        self._geometry_cache: dict[tuple, WindowGeometry] = {}
        # the pair tables of the latest map: (key, tables); one entry, so that the shared cache's limits hold
        self._last_pair_tables: tuple[tuple, _PairTables | None] | None = None
        self.last_packed: Packed | None = None  # the latest plan (no inputs), for inspection and FLOPs

    def __getstate__(self) -> dict:
        # the caches are rebuilt on demand (and shared): a copy or a pickle of the block does not carry them
        state = dict(super().__getstate__())
        state["_geometry_cache"] = {}
        state["_last_pair_tables"] = None
        return state

    def geometry(self, height: int, width: int, device: torch.device) -> WindowGeometry:
        """Window geometry of an ``height x width`` map (cached).

        The size rule is applied to the actual map, so any size works. A map that needs a smaller window than
        the block was built for indexes the same bias table with its smaller offsets; a map that needs a larger
        window (the block was built for a smaller input) has its offsets clipped to the table's range, as for
        any pair of packed tokens (no equality with timm is promised there).
        """
        if not isinstance(device, torch.device):
            device = torch.device(device)
        key = (height, width, device)
        geometry = self._geometry_cache.get(key)
        if geometry is None:
            window, shift = window_shift((height, width), self.target_window, self.target_shift)
            geometry = self._geometry_cache[key] = _shared_geometry(height, width, window, shift, device)
        return geometry

    def _tables(self, height: int, width: int, geometry: WindowGeometry, device: torch.device):
        """The shared pair tables of this block's map, or None where the hooks compute per call (a large map,
        or an attention module whose relative position bias is not ``PackedWindowAttention``'s)."""
        attn = self.attn
        table = getattr(attn, "relative_position_bias_table", None)
        key = (height, width, device, getattr(attn, "window", None), None if table is None else table.shape)
        last = self._last_pair_tables
        if last is not None and last[0] == key:
            return last[1]
        tables = None
        if (
            type(attn).relative_position_bias is PackedWindowAttention.relative_position_bias
            and height * width <= _PAIR_TABLE_MAX_TOKENS
        ):
            tables = _pair_tables(attn, height, width, geometry, device)
        self._last_pair_tables = (key, tables)
        return tables

    def _per_image_drop_path(self, batch_size: int, like: torch.Tensor) -> torch.Tensor | None:
        """Stochastic depth scales ``[2, B]``: one draw per image for the attention branch, an independent one
        for the MLP branch, as timm's Swin block (None when inactive)."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep_prob = 1.0 - self.drop_path
        return like.new_empty(2, batch_size).bernoulli_(keep_prob).div_(keep_prob)

    def forward(
        self, x: torch.Tensor, previous_logits: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Selection]:
        """``x``: ``[B, H, W, C]``; ``previous_logits``: the previous SPA block's fused logits ``[B, H, W]``.

        ``keep`` (bool ``[B, H, W]``, optional) overrides the gate's hard decision (the logits and the soft
        factor still come from the gate); tests and analyses use it to force a selection.

        Returns the output map ``[B, H, W, C]`` and this block's ``Selection``.

        Under autocast the residual stream keeps ``x``'s dtype (as timm's Swin block: an fp32 input gives an
        fp32 output, a bf16 one a bf16 output) while the linear layers and attention run in the autocast
        dtype; the gate's logits (hence the ``Selection``'s) and keep decision are always at least float32.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"SPABlock expects [B, H, W, {self.dim}] input, got {tuple(x.shape)}")
        B, H, W, C = x.shape
        if H == 0 or W == 0:
            raise ValueError(f"SPABlock expects a map of at least 1 x 1 tokens, got {tuple(x.shape)}")
        if previous_logits is not None and previous_logits.shape != (B, H, W):
            raise ValueError(
                f"previous_logits must be [B, H, W] = {[B, H, W]}, got {list(previous_logits.shape)}"
            )
        if previous_logits is not None and not previous_logits.is_floating_point():
            raise TypeError(f"previous_logits must be floating point logits, got {previous_logits.dtype}")
        geometry = self.geometry(H, W, x.device)
        tokens = x.reshape(B, H * W, C)
        previous = None if previous_logits is None else previous_logits.reshape(B, H * W)
        # the gate's NaN checks (one device sync each) are read with the packing counts below, in the one sync
        # the packing plan needs; a forced ``keep`` (tests, analyses) keeps them in the gate, before its checks
        nan_checks: list[tuple[torch.Tensor, str]] = []
        if keep is None:
            deferred = _DEFERRED_NAN_CHECKS.set(nan_checks)
            try:
                decision = self.gate(tokens, previous)
            finally:
                _DEFERRED_NAN_CHECKS.reset(deferred)
        else:
            decision = self.gate(tokens, previous)
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
                raise TypeError(f"keep must be a bool tensor, got {getattr(keep, 'dtype', type(keep))}")
            if keep.shape != (B, H, W):
                raise ValueError(f"keep must be [B, H, W] = {[B, H, W]}, got {list(keep.shape)}")
            decision = decision._replace(keep=keep.reshape(B, H * W).to(x.device))
        window = geometry.window
        packed, has_nan = _pack(
            tokens,
            decision.keep,
            window[0] * window[1],
            self.layout,
            geometry.order,
            check_order=False,
            sync_with=tuple(flag for flag, _ in nan_checks),
        )
        for flag, (_, name) in zip(has_nan, nan_checks):
            if flag:
                raise _nan_error(name)
        self.last_packed = packed.without_inputs()  # the plan only: the block does not hold on to x
        scale = self._per_image_drop_path(B, x)  # per image, drawn after unpacking (never per container)
        out = tokens
        if packed.num_kept:
            tables = self._tables(H, W, geometry, x.device)
            update = self._kept_update(packed, tokens, decision.soft, geometry, scale, tables)
            out = packed.add_rows(tokens, update)
        if self.ffn == "all":
            unkept = B * H * W - packed.num_kept
            out = self._ffn_on_unkept(out, decision.keep, None if scale is None else scale[1], unkept)
        selection = Selection(
            own_logits=decision.own_logits.view(B, H, W),
            fused_logits=decision.fused_logits.view(B, H, W),
            keep=decision.keep.view(B, H, W),
            stage=self.stage,
            block=self.block,
            stride=self.stride,
        )
        return out.view(B, H, W, C), selection

    def _kept_update(
        self,
        packed: Packed,
        tokens: torch.Tensor,
        soft: torch.Tensor | None,
        geometry: WindowGeometry,
        scale: torch.Tensor | None,
        tables: _PairTables | None = None,
    ) -> torch.Tensor:
        """Residual update (attention + FFN) of the kept tokens' rows (``packed.select``): ``[R, C]`` out.

        Linear layers and the FFN run on rows only; padding slots exist only inside attention.
        """
        rows = packed.select(tokens)
        pair_bias, pair_mask = self._pair_hooks(geometry, tables, rows, packed)
        update = self.attn(self.norm1(rows), packed, pair_bias=pair_bias, pair_mask=pair_mask)
        if soft is not None:  # the gate's fp32 factor, in the update's precision (a no-op in fp32)
            factor = packed.select(soft)
            update = update * (factor if factor.dtype == update.dtype else factor.to(update.dtype))[:, None]
        if scale is not None:  # [2, B]: attention branch, MLP branch
            if packed.layout == "masked":
                row_scale = scale.repeat_interleave(packed.num_tokens, dim=1)[:, :, None]
            else:
                row_scale = scale[:, packed.source_index // packed.num_tokens][:, :, None]
            update = update * row_scale[0]
            return update + self.mlp(self.norm2(rows + update)) * row_scale[1]
        return update + self.mlp(self.norm2(rows + update))

    def _pair_hooks(
        self, geometry: WindowGeometry, tables: _PairTables | None, rows: torch.Tensor, packed: Packed
    ) -> tuple[Callable, Callable]:
        """The attention hooks: relative position bias and shifted-window mask of the slots' positions.

        With pair tables, a pair's bias entry (and region test) is one lookup; where the attention runs the
        ``math`` rows path the region mask is folded into that lookup (entry ``E``: masked) and no mask hook
        is needed. For the ``varlen`` backend the hooks are ``RelativePositionBias`` / ``RegionMask``, which also
        describe the bias and mask per token (FlexAttention's mods read the slots' coordinates and regions).
        Either way the same entries and masks as computed from the coordinates.
        """
        attn = self.attn
        if (
            _resolve_backend(attn.backend, rows.device) == "varlen"
            and type(attn).relative_position_bias is PackedWindowAttention.relative_position_bias
        ):
            # hooks described per token: FlexAttention reads the slots' coordinates and regions, not [K, S, S]
            bias = RelativePositionBias(
                attn.relative_position_bias_table, geometry.coords, attn.window,
                None if tables is None else tables.entry,
            )  # fmt: skip
            if not any(geometry.shift):
                return bias, None
            return bias, RegionMask(geometry.region, None if tables is None else tables.same_region)
        if tables is None:

            def pair_bias(position: torch.Tensor) -> TableBias:
                return attn.relative_position_bias(geometry.coords[position.clamp(min=0)])

            def pair_mask(position: torch.Tensor) -> torch.Tensor | None:
                if not any(geometry.shift):
                    return None
                region = geometry.region[position.clamp(min=0)]
                return region[:, :, None] == region[:, None, :]

            return pair_bias, pair_mask

        def lookup(table: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            p = position.clamp(min=0)
            return table[p[:, :, None], p[:, None, :]]

        table = attn.relative_position_bias_table
        if type(attn).forward is PackedAttention.forward and attn._rows_math_applies(rows, packed):
            # the ``math`` rows path: region mask and padding read off the padded table (-1 -> its last row)
            masked_entry = tables.masked_entry

            def pair_bias(position: torch.Tensor) -> TableBias:
                p = position.remainder(masked_entry.shape[0])
                index = masked_entry[p[:, :, None], p[:, None, :]]
                return _LookupBias(table.t(), index, premasked=True, masks_padding=True)

            return pair_bias, None
        if tables.same_region is None:  # no shift: no mask

            def pair_bias(position: torch.Tensor) -> TableBias:
                return _LookupBias(table.t(), lookup(tables.entry, position))

            return pair_bias, None

        def pair_bias(position: torch.Tensor) -> TableBias:
            return _LookupBias(table.t(), lookup(tables.entry, position))

        def pair_mask(position: torch.Tensor) -> torch.Tensor | None:
            return lookup(tables.same_region, position)

        return pair_bias, pair_mask

    def _ffn_on_unkept(
        self, out: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor | None, unkept: int | None = None
    ) -> torch.Tensor:
        """``ffn='all'``: unselected tokens get ``x + MLP(LN2(x))`` (``unkept``: how many, if known)."""
        B, N, C = out.shape
        if unkept is None:
            index = (~keep).reshape(-1).nonzero().squeeze(1)
        else:  # the size is known: no device sync
            index = torch.nonzero_static(~keep.reshape(-1), size=unkept).squeeze(1)
        if index.numel() == 0:
            return out
        flat = out.reshape(B * N, C)
        rest = flat.index_select(0, index)
        update = self.mlp(self.norm2(rest))
        if scale is not None:
            update = update * scale[index // N][:, None]
        return flat.index_copy(0, index, (rest + update).to(flat.dtype)).view(B, N, C)
