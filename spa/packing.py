"""Pack the kept tokens of a batch into dense fixed-length containers, and scatter results back.

``pack(x, keep, length=L, layout=...)`` visits every image's tokens in ``order`` (Swin window order in an
SPA block), cuts each image's kept tokens into chunks of ``L`` and lays them into containers of ``L``
slots. Attention then runs per container, a token seeing only the tokens of its own *segment* (its
image's chunk). Layouts (``docs``: the method spec, "Memory layouts") change cost, never results, except
``stream``:

``containers`` (default, batch-invariant)
    every full chunk gets a container of its own; the images' last partial chunks share containers by
    first-fit decreasing, never split. An image's output does not depend on the rest of the batch.
``stream``
    the paper's order: all kept tokens of the batch one after another, cut every ``L`` slots, so a
    container may hold the tail of one image and the head of the next (a per-image mask keeps them apart)
    and only the last container is padded. An image's chunking depends on the images before it.
``padded``
    SparseViT-style cost: every image gets the batch's largest number of containers.
``masked``
    DynamicViT-style cost: no gather; all ``N`` tokens of every image stay in place (``[B, N, C]``) and
    unkept tokens are computed but discarded.

Everything here is pure (no module state) so it can be property-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate

import torch

__all__ = ["LAYOUTS", "Packed", "pack"]

LAYOUTS = ("containers", "stream", "padded", "masked")


@dataclass(frozen=True)
class Packed:
    """Kept tokens laid into ``K`` containers of ``S`` slots, with where every slot came from.

    ``S`` is the chunk length ``L`` for every layout but ``masked`` (``K = B``, ``S = N``), or less when no
    container is full: containers are then trimmed to the fullest one (padding that every container would
    share is never computed). All index tensors are ``[K, S]`` long with ``-1`` in padding slots.

    Attributes:
        inputs: the ``[B, N, C]`` tokens that were packed (a reference, not a copy), or None for a plan kept
            without them (``without_inputs``).
        image: source image of every slot.
        position: index of the slot's token in the visiting sequence (``order``), e.g. its place in window
            order; attention hooks look up coordinates with it.
        segment: tokens attend to each other only if their segment ids are equal (same image and chunk).
        source: flat source position ``b * N + n`` of every slot.
        slot_index: ``[T]`` flat slot ``k * S + s`` of each of the ``T`` kept tokens, ascending (rows are in
            slot order; for ``masked``: image by image in visiting order).
        source_index: ``[T]`` flat source position of each kept token, aligned with ``slot_index``.
        layout: the layout name.
        batch_size: ``B``.
        num_tokens: ``N``, tokens per image in the unpacked input.
        length: chunk length ``L``.
    """

    inputs: torch.Tensor | None
    image: torch.Tensor
    position: torch.Tensor
    segment: torch.Tensor
    source: torch.Tensor
    slot_index: torch.Tensor
    source_index: torch.Tensor
    layout: str
    batch_size: int
    num_tokens: int
    length: int

    @cached_property
    def tokens(self) -> torch.Tensor:
        """``[K, S, C]`` packed tokens, zeros in padding slots (for ``masked``: the input itself).

        Built on first access: a block that works on rows (``select``) never pays for this copy.
        """
        if self.inputs is None:
            raise ValueError(
                "this plan was kept without its inputs (Packed.without_inputs); use gather(values)"
            )
        return self.gather(self.inputs)

    def without_inputs(self) -> Packed:
        """The same plan without the reference to the packed tokens (what a module may keep for inspection
        after its forward without holding on to the activation)."""
        if type(self).__init__ is not Packed.__init__:  # a subclass with its own construction
            return replace(self, inputs=None)
        # ``replace(self, inputs=None)`` without going through ``__init__`` field by field; the cached plan
        # values are kept, the cached ``tokens`` (a copy of the inputs) are not
        plan = object.__new__(type(self))
        state = {k: v for k, v in self.__dict__.items() if k != "tokens"}
        state["inputs"] = None
        plan.__dict__.update(state)
        return plan

    @cached_property
    def padding_slots(self) -> torch.Tensor:
        """``[K * S - T]`` flat indices of the padding slots (``masked``: of the unkept tokens)."""
        # the count is known on the host: no device sync for the size of the result
        return torch.nonzero_static(
            self.image.reshape(-1) < 0, size=self.image.numel() - self.num_kept
        ).squeeze(1)

    @cached_property
    def _first_padding_slot(self) -> int:
        """Flat index of the first padding slot (``K * S`` when there is none). ``pack`` knows it from its
        plan (no device sync); a ``Packed`` built otherwise reads it off ``padding_slots``."""
        padding = self.padding_slots
        return int(padding[0]) if padding.numel() else self.image.numel()

    @cached_property
    def mixed_containers(self) -> bool:
        """Whether some container holds real tokens of more than one segment (then attention needs the segment
        mask; otherwise every pair of real slots in a container may attend). ``pack`` knows it from its plan
        (no device sync); a ``Packed`` built otherwise reads it off ``segment``."""
        if self.segment.numel() == 0:
            return False
        real = self.segment >= 0
        low = self.segment.masked_fill(~real, self.segment.max() + 1).amin(1)
        high = self.segment.amax(1)
        return bool(((high > low) & real.any(1)).any())

    @property
    def num_containers(self) -> int:
        """``K``: number of containers attention runs over (0 when nothing is kept)."""
        return self.image.shape[0]

    @property
    def num_kept(self) -> int:
        """``T``: number of kept tokens in the whole batch."""
        return self.slot_index.numel()

    @property
    def padding_fraction(self) -> float:
        """Padded (or, for ``masked``, computed but discarded) slots over all slots; 0 when empty."""
        slots = self.image.numel()
        return 0.0 if slots == 0 else 1.0 - self.num_kept / slots

    @property
    def num_rows(self) -> int:
        """``R``: rows the block computes on: kept tokens, or all ``B * N`` tokens for ``masked``."""
        return self.batch_size * self.num_tokens if self.layout == "masked" else self.num_kept

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, ...]`` of a per-token tensor ``[B, N, ...]``: the kept tokens in slot order, container
        by container (for ``masked``: every token, in place). Linear layers and the FFN run on these rows,
        so padding exists only inside attention (``to_slots``)."""
        B, N = self.batch_size, self.num_tokens
        if values.shape[:2] != (B, N):
            raise ValueError(f"values must start with [B, N] = [{B}, {N}], got {tuple(values.shape)}")
        flat = values.reshape(B * N, *values.shape[2:])
        return flat if self.layout == "masked" else flat.index_select(0, self.source_index)

    def to_slots(self, rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Lay rows ``[R, ...]`` into the containers: ``[K, S, ...]``, ``fill`` in padding slots."""
        self.check_rows(rows)
        K, S = self.image.shape
        if self.layout == "masked" or self.num_kept == K * S:
            return rows.view(K, S, *rows.shape[1:])  # no padding: rows in slot order are the slots
        # fill only the padding slots (before the copy, so autograd records no fill), then copy the rows in
        # place into the fresh buffer: one write of every slot
        out = rows.new_empty(K * S, *rows.shape[1:]).index_fill_(0, self.padding_slots, fill)
        return out.index_copy_(0, self.slot_index, rows).view(K, S, *rows.shape[1:])

    def from_slots(self, y: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, D]`` of per-slot values ``[K, S, D]`` (the inverse of ``to_slots``)."""
        K, S = self.image.shape
        if y.shape[:2] != (K, S):
            raise ValueError(f"y must start with [K, S] = [{K}, {S}], got {tuple(y.shape)}")
        flat = y.reshape(K * S, *y.shape[2:])
        if self.layout == "masked" or self.num_kept == K * S:
            return flat  # no padding: the slots are the rows
        return flat.index_select(0, self.slot_index)

    def scatter_rows(self, rows: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Write rows ``[R, D]`` back to ``[B, N, D]``; tokens that were not kept take ``fill``.

        ``fill`` is a number or a ``[B, N, D]`` tensor (e.g. the block input, so unselected tokens pass
        through bit-identical). Differentiable with respect to ``rows`` and ``fill``. The result has the dtype
        of a ``fill`` tensor (rows in another precision, e.g. computed under autocast, are cast to it), else
        that of ``rows``.
        """
        rows = self._kept_rows(rows)
        B, N, D = self.batch_size, self.num_tokens, rows.shape[-1]
        if isinstance(fill, torch.Tensor):
            base = self._flat_tokens(fill, "fill", D)
        else:
            base = rows.new_full((B * N, D), float(fill))
        rows = rows if rows.dtype == base.dtype else rows.to(base.dtype)
        return base.index_copy(0, self.source_index, rows).view(B, N, D)

    def add_rows(self, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``base`` ``[B, N, D]`` with rows ``[R, D]`` added at the kept tokens (a residual update).

        Tokens that were not kept come out bit-identical. Differentiable; the gradient of ``base`` is the
        incoming gradient itself (no copy), which makes this cheaper than ``scatter_rows(base + ..., fill=base)``
        in training. For ``masked`` the rows of unkept tokens are ignored. The result has ``base``'s dtype: rows
        in another precision (e.g. computed under autocast) are cast to it, so an fp32 residual stream takes a
        bf16 update as ``base + update`` would and a bf16 stream stays bf16 (no cast when the dtypes agree).
        """
        rows = self._kept_rows(rows)
        flat = self._flat_tokens(base, "base", rows.shape[-1])
        rows = rows if rows.dtype == flat.dtype else rows.to(flat.dtype)
        return flat.index_add(0, self.source_index, rows).view(base.shape)

    def unpack(self, y: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Scatter per-slot results ``y`` ``[K, S, D]`` back to ``[B, N, D]``.

        Unkept positions take ``fill``: a number, or a ``[B, N, D]`` tensor. Differentiable with respect
        to ``y`` and ``fill``.
        """
        K, S = self.image.shape
        if y.dim() != 3 or y.shape[:2] != (K, S):
            raise ValueError(f"y must be [K, S, D] = [{K}, {S}, D], got {tuple(y.shape)}")
        return self.scatter_rows(self.from_slots(y), fill)

    def gather(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Pack another per-token tensor (``[B, N]`` or ``[B, N, D]``) into ``[K, S, ...]`` slots.

        Padding slots take ``fill`` (for ``masked`` the values are returned in place, unkept included).
        """
        return self.to_slots(self.select(values), fill)

    def _kept_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, D]`` -> the kept tokens' rows ``[T, D]``, aligned with ``source_index``."""
        self.check_rows(rows)
        if rows.dim() != 2:
            raise ValueError(f"rows must be [R, D] with R = {self.num_rows}, got {tuple(rows.shape)}")
        return rows.index_select(0, self.source_index) if self.layout == "masked" else rows

    def _flat_tokens(self, tokens: torch.Tensor, name: str, D: int) -> torch.Tensor:
        """A ``[B, N, D]`` tensor as ``[B * N, D]``; ``name`` is the argument named in the error."""
        B, N = self.batch_size, self.num_tokens
        if tokens.shape != (B, N, D):
            raise ValueError(f"{name} must be [B, N, D] = [{B}, {N}, {D}], got {tuple(tokens.shape)}")
        return tokens.reshape(B * N, D)

    def check_rows(self, rows: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``rows`` has one row per computed token (``R = num_rows``)."""
        if rows.dim() < 1 or rows.shape[0] != self.num_rows:
            raise ValueError(f"rows must be [R, ...] with R = {self.num_rows}, got {tuple(rows.shape)}")


def _check_inputs(
    x: torch.Tensor,
    keep: torch.Tensor,
    length: int,
    layout: str,
    order: torch.Tensor | None,
    check_order: bool,
) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, N, C] tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {getattr(keep, 'dtype', type(keep))}")
    if keep.shape != x.shape[:2]:
        raise ValueError(f"keep must have shape [B, N] = {list(x.shape[:2])}, got {list(keep.shape)}")
    if keep.device != x.device:
        raise ValueError(f"keep is on {keep.device} but x is on {x.device}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if order is not None:
        if order.dtype != torch.long or order.dim() != 1:
            raise TypeError(
                f"order must be a 1-D long tensor, got {order.dtype} of shape {tuple(order.shape)}"
            )
        if order.device != x.device:
            raise ValueError(f"order is on {order.device} but x is on {x.device}")
        N = x.shape[1]
        if order.numel() > N:
            raise ValueError(f"order must hold distinct token indices in [0, {N})")
        if not check_order:
            return
        if order.numel() and (order.min() < 0 or order.max() >= N):
            raise ValueError(f"order must hold distinct token indices in [0, {N})")
        if order.numel() and torch.bincount(order, minlength=N).max() > 1:
            raise ValueError("order must not repeat a token index")


def _first_fit_decreasing(sizes: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """Bin of and offset in the bin for every size (0-sized items get bin -1); returns also the bin count."""
    bins_free: list[int] = []
    where = [-1] * len(sizes)
    offset = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[i]
        if size == 0:
            continue
        j = next((j for j, free in enumerate(bins_free) if free >= size), len(bins_free))
        if j == len(bins_free):
            bins_free.append(capacity)
        where[i], offset[i] = j, capacity - bins_free[j]
        bins_free[j] -= size
    return where, offset, len(bins_free)


def pack(
    x: torch.Tensor,
    keep: torch.Tensor,
    length: int,
    layout: str = "containers",
    order: torch.Tensor | None = None,
    check_order: bool = True,
) -> Packed:
    """Pack the kept tokens of ``x`` ``[B, N, C]`` (``keep`` ``[B, N]`` bool) into containers of ``length``.

    Args:
        x: tokens of every image.
        keep: which tokens to keep.
        length: chunk (and container) length ``L``.
        layout: ``containers`` (default), ``stream``, ``padded`` or ``masked``; see the module docstring.
        order: visiting order of the tokens (indices into ``N``), e.g. Swin window order; tokens not in it
            must not be kept. Default: ``0..N-1``.
        check_order: check that ``order`` holds distinct indices in range (a few reductions per call);
            ``SPABlock`` turns it off for the window order it builds and caches itself. Unchecked, a bad
            ``order`` is the caller's error: an index out of range raises ``IndexError``, a repeated one
            packs that token twice.

    Returns:
        A ``Packed`` with the tokens and the plan to ``unpack`` results. Zero kept tokens give zero
        containers.
    """
    return _pack(x, keep, length, layout, order, check_order)[0]


# one image: the plan in a few ops (``_pack_one_image``); tests compare it with the general one
_ONE_IMAGE_PLAN = True


def _to_device(values: list[list[int]], device: torch.device) -> torch.Tensor:
    """A small long tensor of host values on ``device``; to an accelerator through pinned memory without
    blocking (a plain ``torch.tensor(..., device=...)`` from pageable memory waits for the device)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        # the pinned buffer stays reserved until the copy is done (PyTorch's caching host allocator)
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _first_short(fills: list[int], slots: int) -> int:
    """Flat index of the first padding slot of containers filled ``fills[k]`` slots from their start (every
    layout but ``masked`` fills a prefix of each container); ``len(fills) * slots`` when none is short."""
    for k, fill in enumerate(fills):
        if fill < slots:
            return k * slots + fill
    return len(fills) * slots


def _pack(
    x: torch.Tensor,
    keep: torch.Tensor,
    length: int,
    layout: str = "containers",
    order: torch.Tensor | None = None,
    check_order: bool = True,
    sync_with: tuple[torch.Tensor, ...] = (),
) -> tuple[Packed, list[int]]:
    """``pack``, plus the host values of ``sync_with`` (0-d integer or bool tensors), read in the same device
    sync as the per-image counts the plan needs (the only one here: every other size is known on the host)."""
    _check_inputs(x, keep, length, layout, order, check_order)
    B, N, _ = x.shape
    device = x.device
    seq_keep = keep if order is None else keep[:, order]
    counts_t = seq_keep.sum(1)
    partial_order = order is not None and order.numel() < N
    extra = [*sync_with, keep.sum()] if partial_order else list(sync_with)
    if extra:  # (torch.cat promotes bool flags to the counts' integer dtype)
        host = torch.cat([counts_t, *(e.view(1) for e in extra)]).tolist()
        counts, extra_values = host[:B], host[B:]
    else:
        counts, extra_values = counts_t.tolist(), []
    if partial_order and sum(counts) != extra_values.pop():
        raise ValueError("keep marks tokens that are not in order")
    total = sum(counts)
    starts = list(accumulate(counts, initial=0))[:-1]
    slots = length
    seg_stride = N // length + 1  # segment ids: ``b * seg_stride + chunk`` (all layouts but ``stream``)
    # per image, with ``t`` a token's flat rank in the batch (``rank = t - starts[b]`` within its image):
    # ``dest = t + where(t < cut, full_shift, rest_shift)`` (full chunks, then the partial one) and
    # ``segment = (t + seg_shift) // length`` (``seg_shift = b * seg_stride * length - starts[b]``); one gather
    # of the per-image values, then a few element-wise ops
    seg_shift = [b * seg_stride * length - st for b, st in enumerate(starts)]
    mixed = True  # some container holds more than one segment (the safe answer)
    if layout == "containers":
        full = [c // length for c in counts]
        rest = [c % length for c in counts]
        bins, bin_offset, num_bins = _first_fit_decreasing(rest, length)
        mixed = len({j for j, r in zip(bins, rest) if r}) < sum(1 for r in rest if r)
        num_full = sum(full)
        fills = [0] * num_bins
        for j, o, r in zip(bins, bin_offset, rest):
            if r:
                fills[j] = max(fills[j], o + r)
        if not num_full:  # only shared bins: trim every container to the fullest bin
            slots = max(fills, default=length)
        full_base = list(accumulate([0, *full[:-1]]))
        per_image = [
            [st + f * length for st, f in zip(starts, full)],
            [base * length - st for base, st in zip(full_base, starts)],
            [
                (num_full + j) * slots + o - f * length - st
                for j, o, f, st in zip(bins, bin_offset, full, starts)
            ],
            seg_shift,
        ]
        num_containers = num_full + num_bins
        first_padding = _first_short([length] * num_full + fills, slots)
    elif layout == "stream":
        num_containers = -(-total // length)
        slots = min(length, total) if total else length
        per_image = []  # slot = flat rank in the batch
        first_padding = total
        mixed = sum(1 for c in counts if c) > 1  # conservative: an image boundary may fall inside a container
    elif layout == "padded":
        per_container = max((-(-c // length) for c in counts), default=0)
        if per_container == 1:
            slots = max(counts)
        num_containers = B * per_container if total else 0
        per_image = [[b * per_container * slots - st for b, st in enumerate(starts)], seg_shift]
        fills = [min(slots, max(0, c - i * slots)) for c in counts for i in range(per_container)]
        first_padding = _first_short(fills, slots) if total else 0
        mixed = False  # every container holds one chunk of one image
    else:  # masked: no gather, tokens stay where they are
        num_containers, slots = B, N
        per_image = [seg_shift]
        first_padding = -1  # not a prefix layout: read off the slot map if ever needed
        mixed = any(c > length for c in counts)  # an image's container holds its chunks
    if B == 1 and layout != "masked" and total and _ONE_IMAGE_PLAN:
        seq_pos = torch.nonzero_static(seq_keep.view(-1), size=total).squeeze(1)
        packed = _pack_one_image(x, seq_pos, order, length, num_containers, slots, layout)
        return _with_host_plan(packed, first_padding, mixed), extra_values
    # row-major: image by image, in visiting order (the size is known: no sync)
    batch_idx, seq_pos = torch.nonzero_static(seq_keep, size=total).unbind(1)
    token_idx = seq_pos if order is None else order[seq_pos]
    t = torch.arange(total, device=device)
    source = batch_idx * N + token_idx
    if layout == "stream":
        dest = t
        segment = dest // length * B + batch_idx
    else:
        plan = _to_device(per_image, device)[:, batch_idx]
        if layout == "containers":
            cut, full_shift, rest_shift, shift = plan.unbind(0)
            dest = t + torch.where(t < cut, full_shift, rest_shift)
        elif layout == "padded":
            rest_shift, shift = plan.unbind(0)
            dest = t + rest_shift
        else:
            (shift,) = plan.unbind(0)
            dest = source
        segment = (t + shift).floor_divide_(length)

    # every per-slot field in one scatter: -1 in padding slots
    fields = torch.full((4, num_containers * slots), -1, device=device, dtype=torch.long)
    fields.index_copy_(1, dest, torch.stack([batch_idx, seq_pos, segment, source]))
    image, position, segment_slots, source_slots = fields.view(4, num_containers, slots).unbind(0)
    slot_index, source_index = dest, source
    if layout != "masked":  # rows in slot order: ascending slots, read off the slot map (no sort, no sync)
        slot_index = torch.nonzero_static(source_slots.reshape(-1) >= 0, size=total).squeeze(1)
        source_index = source_slots.reshape(-1).index_select(0, slot_index)
    packed = Packed(
        inputs=x,
        image=image,
        position=position,
        segment=segment_slots,
        source=source_slots,
        slot_index=slot_index,
        source_index=source_index,
        layout=layout,
        batch_size=B,
        num_tokens=N,
        length=length,
    )
    return _with_host_plan(packed, first_padding, mixed), extra_values


def _with_host_plan(packed: Packed, first_padding: int, mixed: bool) -> Packed:
    """``packed`` with what the plan knows on the host cached, so that reading it needs no device sync: the first
    padding slot (``-1``: not known, ``masked``) and whether a container holds two segments."""
    if first_padding >= 0:
        packed.__dict__["_first_padding_slot"] = first_padding
    packed.__dict__["mixed_containers"] = mixed
    return packed


def _pack_one_image(
    x: torch.Tensor,
    seq_pos: torch.Tensor,
    order: torch.Tensor | None,
    length: int,
    num_containers: int,
    slots: int,
    layout: str,
) -> Packed:
    """The plan of ``_pack`` for one image (every layout but ``masked``), in a few ops: the kept tokens fill the
    slots in visiting order (slot ``t`` holds the ``t``-th kept token), so no plan gather, no scatter and no
    reading of the slot order are needed. Equal to the general plan (tested)."""
    total = seq_pos.numel()
    t = torch.arange(total, device=x.device)
    source = seq_pos if order is None else order[seq_pos]
    fields = torch.stack([torch.zeros_like(t), seq_pos, t // length, source])
    pad = num_containers * slots - total
    if pad:
        fields = torch.cat([fields, fields.new_full((4, pad), -1)], 1)
    image, position, segment, source_slots = fields.view(4, num_containers, slots).unbind(0)
    return Packed(
        inputs=x,
        image=image,
        position=position,
        segment=segment,
        source=source_slots,
        slot_index=t,
        source_index=source,
        layout=layout,
        batch_size=1,
        num_tokens=x.shape[1],
        length=length,
    )
