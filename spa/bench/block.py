"""``spa bench block``: one SPA block against timm's Swin block.

Method: every configuration is warmed up, then all configurations are timed in interleaved rounds (one call
each per round, in a shuffled order; ``spa.bench.timing``), so that machine noise hits them alike. A
configuration's ``ms`` is the median over rounds; ``ratio_to_dense`` is the median over rounds of its time
divided by the dense block's time in the same round. Keep ratios are forced with ``select='topk'`` (the gate's
top tokens, the same count in every image).

Device and precision (``spa.bench.timing.BenchDevice``): ``device='cuda'`` times with CUDA events after a
synchronisation and records ``peak_mem_mb`` (``torch.cuda.max_memory_allocated`` during one call, every block
of the run resident; ``peak_mem_delta_mb`` subtracts what was allocated before it); ``amp='bf16'`` runs every
call under bf16 autocast (the input stays float32, as an SPT's stage input under autocast would be after a
float32 norm). Several ``backend`` values are timed in the same rounds against the one dense block.
``compile=True`` wraps every block, the dense one too, in ``spa.compile.compile_model`` (warm-up includes the
compilation).

Cache state: by default a block is timed over and over with its weights and input in the caches, which a
block inside a backbone never is (the blocks before it streamed their own). ``evict_cache_mb`` streams a
buffer of that size through the caches before every timed call (``spa.bench.timing.cache_evictor``), untimed;
at small batches this is what predicts the backbone (the fixed per-call work of the SPA block, many small
ops, is the part that grows most when the caches are cold).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from spa.attention import BACKENDS
from spa.bench.timing import BenchDevice, cache_evictor, pass_fields
from spa.errors import ConfigError
from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS

__all__ = ["bench_block", "cost_fit", "format_cost_fit", "format_table"]


def _step(
    block: nn.Module, x: torch.Tensor, backward: bool, spa: bool, bench: BenchDevice
) -> Callable[[], None]:
    def run() -> None:
        if backward:
            block.zero_grad(set_to_none=True)
            xi = x.detach().requires_grad_(True)
            with bench.autocast():
                out = block(xi)
            out = out[0] if spa else out
            out.float().sum().backward()
        else:
            with torch.inference_mode(), bench.autocast():
                block(x)

    return run


def _compiled(block: nn.Module) -> nn.Module:
    from spa.compile import compile_model  # lazy: torch.compile is only paid for when asked

    return compile_model(block, dense_static=True)  # one input size: timm's dense block with static sizes


def bench_block(
    batch_size: int = 16,
    resolution: int = 14,
    dim: int = 384,
    num_heads: int = 12,
    window_size: int = 7,
    shift: bool = False,
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2),
    layouts: tuple[str, ...] = LAYOUTS,
    backend: str | Sequence[str] = "auto",
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    rounds: int = 7,
    warmup: int = 2,
    seed: int = 0,
    device: str = "cpu",
    amp: str = "off",
    compile: bool = False,
    evict_cache_mb: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time an SPA block (gate, pack, attention, FFN on kept tokens, unpack) against timm's Swin block.

    ``backend`` is one attention backend or several (each gets every layout and keep ratio, in the same rounds).

    Returns one record per configuration with ``layout`` (``dense`` for timm), ``keep_ratio``, ``pass``,
    ``ms`` (median), ``ratio_to_dense``, ``padding_fraction``, ``containers``, ``kept_fraction`` (tokens
    actually kept: ``select='topk'`` keeps ``ceil(keep_ratio * H * W)`` per image), the attention
    ``backend`` (SPA blocks), ``device``, ``amp``, ``compiled``, ``evict_cache_mb``, on CUDA ``peak_mem_mb``,
    and ``env_*``.
    """
    from timm.models.swin_transformer import SwinTransformerBlock

    bench = BenchDevice.resolve(device, amp)
    backends = (backend,) if isinstance(backend, str) else tuple(backend)
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise ConfigError(f"backend(s) must be in {BACKENDS}, got {list(backends)}")
    sizes = {"batch_size": batch_size, "resolution": resolution, "dim": dim, "num_heads": num_heads}
    sizes.update(window_size=window_size, rounds=rounds)
    bad_sizes = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad_sizes:
        raise ConfigError(f"sizes must be integers >= 1, got {bad_sizes}")
    if dim % num_heads:
        raise ConfigError(f"dim must be a multiple of the heads, got dim {dim} and {num_heads} heads")
    if any(not 0.0 < r <= 1.0 for r in keep_ratios) or not keep_ratios:
        raise ConfigError(f"keep ratios must be in (0, 1], got {list(keep_ratios)}")
    if any(p not in ("fwd", "fwd+bwd") for p in passes):
        raise ConfigError(f"passes must be 'fwd' and/or 'fwd+bwd', got {list(passes)}")
    torch.manual_seed(seed)
    dev = bench.device
    evict = cache_evictor(evict_cache_mb, dev)  # checks the size before anything is built
    shift_size = window_size // 2 if shift else 0
    res = (resolution, resolution)
    dense = SwinTransformerBlock(dim, res, num_heads, window_size=window_size, shift_size=shift_size).to(dev)
    x = torch.randn(batch_size, resolution, resolution, dim).to(dev)
    wrap = _compiled if compile else (lambda block: block)
    configs: list[dict] = []
    for pass_name in passes:
        backward = pass_name == "fwd+bwd"
        dense_pass = copy.deepcopy(dense).train(backward)  # same weights; a module per pass keeps its mode
        run = _step(wrap(dense_pass), x, backward, False, bench)
        configs.append({"layout": "dense", "keep_ratio": 1.0, "pass": pass_name, "run": run})
        for name in backends:
            for layout in layouts:
                for ratio in keep_ratios:
                    block = SPABlock(
                        dim, res, num_heads, window_size=window_size, shift_size=shift_size,
                        select="topk", keep_ratio=ratio, layout=layout, backend=name,
                    )  # fmt: skip
                    block.load_state_dict(dense.state_dict(), strict=False)
                    block = block.to(dev).train(backward)
                    with torch.no_grad(), bench.autocast():
                        block(x)
                    packed = block.last_packed
                    configs.append(
                        {
                            "layout": layout,
                            "keep_ratio": ratio,
                            "pass": pass_name,
                            "padding_fraction": round(packed.padding_fraction, 4),
                            "kept_fraction": round(packed.num_kept / (batch_size * resolution**2), 4),
                            "containers": packed.num_containers,
                            "backend": name,
                            "run": _step(wrap(block), x, backward, True, bench),
                        }
                    )
    memory: dict[int, dict] = {}
    if bench.is_cuda:  # one untimed call each (after compilation, if any: that is the warm-up's first call)
        for i, cfg in enumerate(configs):
            memory[i] = bench.peak_memory(cfg["run"])
    runs = {i: cfg["run"] for i, cfg in enumerate(configs)}
    times = bench.rounds(runs, rounds, warmup=warmup, seed=seed, progress=progress, before_each=evict)
    dense_index = {cfg["pass"]: i for i, cfg in enumerate(configs) if cfg["layout"] == "dense"}
    env = bench.environment()
    records = []
    for i, cfg in enumerate(configs):
        record = {k: v for k, v in cfg.items() if k != "run"}
        timed = pass_fields({"x_ms": times[i]}, {"x_ms": times[dense_index[cfg["pass"]]]}, ("x",), digits=3)
        record.update(
            ms=timed["x_ms"],
            ratio_to_dense=timed["x_ratio_to_dense"],
            **memory.get(i, {}),
            batch_size=batch_size,
            resolution=resolution,
            dim=dim,
            num_heads=num_heads,
            window_size=window_size,
            shift=shift,
            rounds=rounds,
            **bench.fields(),
            compiled=compile,
            compiled_dense_static=compile,
            evict_cache_mb=evict_cache_mb,
            **{f"env_{k}": v for k, v in env.items()},
        )
        records.append(record)
    return records


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def format_table(records: list[dict]) -> str:
    """Markdown table of ``bench_block`` records (a backend column when several backends were timed, a peak
    memory column on CUDA)."""
    backends = len({r.get("backend") for r in records if r["layout"] != "dense"}) > 1
    memory = any(r.get("peak_mem_mb") is not None for r in records)
    head = "| pass |" + (" backend |" if backends else "") + " layout | keep ratio | kept | ms (median) "
    head += "| ratio to dense | padding | containers |" + (" peak MB |" if memory else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        line = f"| {r['pass']} |" + (f" {r.get('backend', 'timm')} |" if backends else "")
        line += (
            f" {r['layout']} | {r['keep_ratio']:.2f} | {r.get('kept_fraction', 1.0):.3f} "
            f"| {_ms(r['ms'])} | {r['ratio_to_dense']:.3f} | {r.get('padding_fraction', 0.0):.3f} "
            f"| {r.get('containers', '')} |"
        )
        if memory:
            line += f" {r.get('peak_mem_mb') or 0:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def cost_fit(records: list[dict]) -> list[dict]:
    """The line ``ratio_to_dense = fixed + per_token * kept`` (least squares over the keep ratios) of every pass,
    layout and backend of ``bench_block`` records with two or more kept fractions.

    ``fixed`` is the part of a step that does not shrink with the kept tokens (the gate on every token, the
    packing plan, the residual's copy of the map, op dispatch), ``per_token`` what a kept token costs against a
    dense one; ``max_residual`` says how well a line describes the rows. A host whose small ops are slower
    shows a larger ``fixed`` at the same ``per_token``, which is why the ratios move between hosts.
    """
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in records:
        if r["layout"] != "dense":
            key = (r["pass"], r["layout"], r.get("backend"))
            groups.setdefault(key, []).append(
                (float(r.get("kept_fraction", r["keep_ratio"])), r["ratio_to_dense"])
            )
    fits = []
    for (pass_, layout, backend), points in groups.items():
        kept = [k for k, _ in points]
        if len(set(kept)) < 2:
            continue
        ratios = [v for _, v in points]
        per_token, fixed = statistics.linear_regression(kept, ratios)
        residual = max(abs(v - (fixed + per_token * k)) for k, v in points)
        fits.append(
            {"pass": pass_, "layout": layout, "backend": backend, "fixed": round(fixed, 4),
             "per_token": round(per_token, 4), "points": len(points), "max_residual": round(residual, 4)}
        )  # fmt: skip
    return fits


def format_cost_fit(fits: list[dict]) -> str:
    """Markdown table of ``cost_fit`` (empty when nothing could be fitted)."""
    if not fits:
        return ""
    backends = len({f["backend"] for f in fits}) > 1
    head = (
        "| pass |"
        + (" backend |" if backends else "")
        + " layout | fixed | per kept token | points | max residual |"
    )
    lines = ["time / dense = fixed + per kept token x kept fraction (least squares over the keep ratios):", "",
             head, "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
    for f in fits:
        line = f"| {f['pass']} |" + (f" {f['backend']} |" if backends else "")
        line += f" {f['layout']} | {f['fixed']:.3f} | {f['per_token']:.3f} | {f['points']} | {f['max_residual']:.3f} |"
        lines.append(line)
    return "\n".join(lines)
