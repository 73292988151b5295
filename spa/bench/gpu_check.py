"""``python -m spa.bench.gpu_check``: the project's GPU check, sized to fit a short lease on one GPU.

Sections, in order (each in its own process under its own time limit, so that a crash, a hang or a poisoned
CUDA context in one leaves the others running; all within ``--budget-s``):

- ``env``: torch / CUDA / cuDNN / torchvision / timm / spa versions, the GPU.
- ``attention`` (check): ``PackedAttention`` on rows with a table bias and a pair mask, every layout, every
  backend but ``auto`` / ``reference`` (``math``, ``sdpa``, ``varlen``; ``varlen`` is CUDA only) against
  ``reference``: outputs and gradients (input, weights, bias table), float32 and bf16 autocast; the batch has
  an image keeping no token and one keeping all.
- ``block`` (check): ``SPABlock`` (gate soft factor, relative position bias, shifted-window mask), unshifted
  and shifted, every layout, the same backends against ``reference``, outputs and gradients of the input and
  every parameter, float32 and bf16; forced selections keep 0 / all / some tokens per image; unkept tokens
  must pass through bit-identical.
- ``spt_vs_timm`` (check): ``spt_tiny`` (Swin-T depths, ``select='all'``, timm's Swin-T weights loaded with
  ``spa.load_swin_weights``) == timm's Swin-T, every stage and the logits, per backend, float32.
- ``train_amp`` (check): a few optimizer steps (``spa.engine.Trainer.train_step``, AMP bf16 on CUDA) of
  ``spt_nano`` + Faster R-CNN per backend on a seeded synthetic batch: finite losses and gradient norms.
- ``attention_varlen``, ``block_varlen``, ``spt_vs_timm_varlen``, ``train_amp_varlen``: the same checks for
  ``varlen`` alone, after those of ``math`` / ``sdpa`` (``attention`` ... ``train_amp`` run those two): its
  compiled FlexAttention has never been timed, and a slow compile must not cost the eager backends' results.
  A section cut off by its time limit keeps the checks it finished (each is written as it ends).
- ``timing_block`` / ``timing_backbone``: ``spa bench block`` (stage-3 shape, every backend, keep 1.0 / 0.5 /
  0.3, bf16 and float32) and ``spa bench backbone`` (``spt_tiny`` vs ``swin_tiny``, 224 px, batch 32, bf16,
  every backend) through their own APIs (``spa.bench.block``, ``spa.bench.backbone``: CUDA events, GPU peak
  memory).

Tolerances (max abs error / max abs of the float32 reference): float32 ``2e-4`` (TF32 off); bf16 autocast,
against the float32 reference, ``max(5e-2, 4 x the reference backend's own bf16 error)``.

Writes ``results.json`` (every number), ``summary.md`` (verdict, tables) and ``run.log`` under ``--out``
(default ``$OUT``, else ``./gpu_out``). Exit code 0 when every correctness check passed, 1 when one failed or a
check section did not finish (error, timeout, out of budget); timing problems are reported, not failed.

``--device cpu --small`` is the smoke mode the default tests run (tiny shapes, ``varlen`` skipped, sections in
this process with ``--in-process``). ``scripts/gpu_check.sh`` (``make gpu-check``) installs what the machine's
Python lacks from carried wheels first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = ["SECTIONS", "main", "run_check"]

TOL_FP32 = 2e-4
TOL_BF16 = 5e-2
BF16_REFERENCE_FACTOR = 4.0
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Context:
    device: torch.device
    small: bool
    work: Path
    backends: tuple[str, ...] | None = None  # the section's backends (None: all)
    partial: Path | None = None  # every finished check is also written here (kept if the section times out)
    done: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def record(self, check: dict) -> dict:
        """Keep ``check`` in the partial results file as soon as it is finished; returns it."""
        self.done.append(check)
        if self.partial is not None:
            self.partial.write_text(json.dumps({"checks": self.done}, default=str))
        return check


# -- helpers ------------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()}"[:800]


def _backends(ctx: Context) -> list[tuple[str, str | None]]:
    """(backend, reason it is skipped or None): every backend but ``auto`` and ``reference``."""
    from spa.attention import BACKENDS

    out = []
    for name in BACKENDS:
        if name in ("auto", "reference") or (ctx.backends is not None and name not in ctx.backends):
            continue
        out.append((name, "needs CUDA" if name == "varlen" and not ctx.cuda else None))
    return out


def _with_auto(ctx: Context) -> list[tuple[str, str | None]]:
    """``_backends`` and ``auto`` (``sdpa`` on CUDA, ``math`` elsewhere) where the section runs those."""
    auto = ctx.backends is None or "sdpa" in ctx.backends
    return ([("auto", None)] if auto else []) + _backends(ctx)


def _strict_fp32() -> None:
    """Correctness compares against a loop reference: no TF32 anywhere."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _autocast(ctx: Context, precision: str):
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf for a shape mismatch or a non-finite value)."""
    got, ref = got.detach().float(), ref.detach().float().to(got.device)
    if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    if got.numel() == 0:
        return 0.0
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-8)


def _grads(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(t) if t.grad is None else t.grad.detach().clone() for k, t in named.items()}


def _worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    errors = {k: _rel(got[k], ref[k]) for k in ref}
    name = max(errors, key=errors.__getitem__)
    return errors[name], name


def _judge(rec: dict, precision: str, baseline: dict | None) -> None:
    """Set ``rec['tol']`` and ``rec['pass']`` from its output / gradient errors (and, for bf16, the
    reference backend's own bf16 errors in ``baseline``)."""
    if precision == "fp32":
        tol_out = tol_grad = TOL_FP32
    else:
        base = baseline or {}
        tol_out = max(TOL_BF16, BF16_REFERENCE_FACTOR * base.get("out_rel", 0.0))
        tol_grad = max(TOL_BF16, BF16_REFERENCE_FACTOR * base.get("grad_rel", 0.0))
    rec["tol_out"], rec["tol_grad"] = tol_out, tol_grad
    ok = rec["out_rel"] <= tol_out and rec["grad_rel"] <= tol_grad
    rec["pass"] = bool(ok and rec.get("unkept_identical", True))


def _compare_backends(
    ctx: Context,
    label: dict,
    run: Callable[[str, str], tuple[torch.Tensor, dict[str, torch.Tensor], bool]],
) -> list[dict]:
    """Every backend in fp32 and bf16 against ``reference`` in fp32; ``run(backend, precision)`` returns the
    output, the gradients and whether unkept tokens passed through unchanged."""
    ref_out, ref_grads, _ = run("reference", "fp32")
    ref16_out, ref16_grads, _ = run("reference", "bf16")
    g16, _ = _worst(ref16_grads, ref_grads)
    baseline = {"out_rel": _rel(ref16_out, ref_out), "grad_rel": g16}
    checks = []
    for precision in PRECISIONS:
        for backend, skip in _backends(ctx):
            rec = {**label, "backend": backend, "precision": precision}
            if skip:
                rec["skipped"] = skip
                checks.append(rec)
                continue
            try:
                out, grads, unkept = run(backend, precision)
                rec["out_rel"] = _rel(out, ref_out)
                rec["grad_rel"], rec["grad_worst"] = _worst(grads, ref_grads)
                rec["unkept_identical"] = unkept
                if precision == "bf16":
                    rec["reference_bf16_out_rel"], rec["reference_bf16_grad_rel"] = (
                        baseline["out_rel"],
                        baseline["grad_rel"],
                    )
                _judge(rec, precision, baseline)
            except Exception as e:  # a backend that raises fails its check; the others still run
                rec["error"], rec["pass"] = _err(e), False
                traceback.print_exc()
            checks.append(ctx.record(rec))
    return checks


# -- sections ----------------------------------------------------------------------------------------------


def section_env(ctx: Context) -> dict:
    from spa.bench.timing import environment

    env = environment(ctx.device)
    env["cuda_available"] = torch.cuda.is_available()
    env["git"] = os.environ.get("SPA_GIT_REV", "")
    env["installed_from_wheels"] = os.environ.get("SPA_GPU_INSTALLED", "")
    if ctx.cuda:
        env["sdp_enabled"] = {
            name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
            for name in ("flash", "mem_efficient", "math", "cudnn")
        }
    return {"info": env}


def section_attention(ctx: Context) -> dict:
    """``PackedAttention`` on rows, a table bias and a pair mask, every layout, against ``reference``."""
    from spa.attention import PackedAttention, TableBias
    from spa.packing import LAYOUTS, pack

    _strict_fp32()
    B, N, L, C, H = (4, 24, 5, 16, 2) if ctx.small else (6, 196, 49, 64, 2)
    dev = ctx.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    keep = torch.zeros(B, N, dtype=torch.bool)  # image 0 keeps no token, image 1 every token
    keep[1] = True
    for b in range(2, B):
        keep[b] = torch.rand(N, generator=g) < (0.1, 0.35, 0.6, 0.85)[(b - 2) % 4]
    order = torch.randperm(N, generator=g)
    torch.manual_seed(0)
    module = PackedAttention(C, H).to(dev).train()
    table = torch.nn.Parameter((0.5 * torch.randn(H, 2 * L - 1, generator=g)).to(dev))
    x, keep, order = x.to(dev), keep.to(dev), order.to(dev)

    def table_bias(position: torch.Tensor) -> TableBias:
        p = position.clamp(min=0)
        return TableBias(table, (p[:, :, None] - p[:, None, :]).clamp(-(L - 1), L - 1) + (L - 1))

    def pair_mask(position: torch.Tensor) -> torch.Tensor:
        region = (position.clamp(min=0) // 7) % 2 == 0
        return region[:, :, None] == region[:, None, :]

    checks = []
    for layout in ("containers", "masked") if ctx.small else LAYOUTS:

        def run(backend: str, precision: str, layout: str = layout):
            module.backend = backend
            module.zero_grad(set_to_none=True)
            table.grad = None
            xi = x.detach().clone().requires_grad_(True)
            packed = pack(xi, keep, L, layout, order)
            with _autocast(ctx, precision):
                rows = module(packed.select(xi), packed, pair_bias=table_bias, pair_mask=pair_mask)
                out = packed.scatter_rows(rows, fill=0.0)
            weights = torch.linspace(-1, 1, out.numel(), device=dev).view_as(out)
            (out.float() * weights).sum().backward()
            named = {"x": xi, "table": table, **dict(module.named_parameters())}
            return out.detach()[keep], _grads(named), True

        checks += _compare_backends(ctx, {"level": "attention", "layout": layout}, run)
    return {"checks": checks}


def section_block(ctx: Context) -> dict:
    """``SPABlock`` (soft factor, relative position bias, shifted windows), every layout, vs ``reference``."""
    from spa.models.spa_block import SPABlock
    from spa.packing import LAYOUTS

    _strict_fp32()
    B, R, C, H = (3, 10, 16, 2) if ctx.small else (5, 14, 96, 3)
    dev = ctx.device
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(B, R, R, dtype=torch.bool)  # image 0 keeps no token, image 1 every token
    keep[1] = True
    for b in range(2, B):
        keep[b] = torch.rand(R, R, generator=g) < (0.2, 0.5, 0.8)[(b - 2) % 3]
    x = torch.randn(B, R, R, C, generator=g).to(dev)
    keep = keep.to(dev)
    checks = []
    for shift in (0, 3):
        torch.manual_seed(shift)
        base = SPABlock(C, (R, R), H, window_size=7, shift_size=shift).train()
        with torch.no_grad():
            base.attn.relative_position_bias_table.normal_(0, 1.0)
            base.gate.proj.weight.normal_(0, 0.5)
        base = base.to(dev)
        for layout in ("containers",) if ctx.small else LAYOUTS:

            def run(backend: str, precision: str, base: SPABlock = base, layout: str = layout):
                block = copy.deepcopy(base)
                block.attn.backend, block.layout = backend, layout
                # under autocast the input is bf16, as in an SPT (a stage's PatchMerging Linear feeds it)
                xi = (
                    x.to(torch.bfloat16 if precision == "bf16" else torch.float32)
                    .detach()
                    .requires_grad_(True)
                )
                with _autocast(ctx, precision):
                    y, _ = block(xi, keep=keep)
                weights = torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)
                (y.float() * weights).sum().backward()
                unkept = bool(torch.equal(y.detach()[~keep], xi.detach()[~keep]))
                return y.detach(), _grads({"x": xi, **dict(block.named_parameters())}), unkept

            label = {"level": "block", "layout": layout, "shift": shift}
            checks += _compare_backends(ctx, label, run)
    return {"checks": checks}


def section_spt_vs_timm(ctx: Context) -> dict:
    """Keep-all SPT with Swin weights == timm's Swin, every stage and the logits, per backend, fp32."""
    import timm

    import spa

    _strict_fp32()
    if ctx.small:
        size, depths = 64, (1, 1, 3, 1)
        swin = timm.create_model("swin_nano", img_size=size, depths=depths).eval()
        model = spa.create_model("spt_nano", depths=depths, select="all", img_size=size).eval()
    else:
        size, depths = 224, (2, 2, 6, 2)
        swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=size).eval()
        model = spa.create_model("spt_tiny", depths=depths, select="all", img_size=size).eval()
    loaded = spa.load_swin_weights(model, swin)
    swin, model = swin.to(ctx.device), model.to(ctx.device)
    x = torch.randn(1 if ctx.small else 2, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(ctx.device)
    with torch.no_grad():
        expected = swin.forward_intermediates(x, intermediates_only=True)
        expected_logits = swin(x)
    info = {
        "model": "spt_nano" if ctx.small else "spt_tiny",
        "size": size,
        "unexpected_keys": len(loaded.unexpected),
        "missing_non_gate": [k for k in loaded.missing if ".gate." not in k],
    }
    checks = []
    for backend, skip in _backends(ctx) if ctx.small else _with_auto(ctx):
        rec: dict = {"level": "spt_vs_timm", "backend": backend, "precision": "fp32"}
        if skip:
            rec["skipped"] = skip
            checks.append(rec)
            continue
        try:
            for block in model.spa_blocks():
                block.attn.backend = backend
            with torch.no_grad():
                got = model.forward_intermediates(x, intermediates_only=True)
                logits = model(x)
            rec["stage_rel"] = [_rel(a, b) for a, b in zip(got, expected)]
            rec["logits_rel"] = _rel(logits, expected_logits)
            rec["stage_max_abs"] = [float((a - b).abs().max()) for a, b in zip(got, expected)]
            rec["all_kept"] = all(bool(s.keep.all()) for s in model.last_selections)
            worst = max([*rec["stage_rel"], rec["logits_rel"]])
            rec["out_rel"], rec["tol_out"] = worst, 1e-4
            rec["pass"] = bool(worst <= 1e-4 and rec["all_kept"] and not info["missing_non_gate"])
            if not ctx.small:
                with torch.no_grad(), _autocast(ctx, "bf16"):  # informational: bf16 against fp32 timm
                    rec["bf16_logits_rel"] = _rel(model(x), expected_logits)
        except Exception as e:
            rec["error"], rec["pass"] = _err(e), False
            traceback.print_exc()
        checks.append(ctx.record(rec))
    return {"checks": checks, "info": info}


def section_train_amp(ctx: Context) -> dict:
    """A few optimizer steps of spt_nano + Faster R-CNN per backend (AMP bf16 on CUDA), synthetic batch."""
    from spa.bench.detector import DetectorHeads, synthetic_batch
    from spa.data import collate_detection
    from spa.engine.distributed import DistInfo
    from spa.engine.trainer import TrainConfig, Trainer
    from spa.tasks.detection import DetectorConfig, build_detector

    size, steps, batch = (64, 1, 2) if ctx.small else (128, 3, 4)
    heads = DetectorHeads(num_classes=3, boxes_per_image=3)
    images, targets = synthetic_batch(size, batch, "faster_rcnn", heads, seed=0)
    dataset = list(zip(images, targets))
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.cuda else ctx.device
    amp = "bf16" if ctx.cuda else "off"
    checks = []
    for backend, skip in _backends(ctx)[:1] if ctx.small else _backends(ctx):
        rec: dict = {"level": "train", "backend": backend, "precision": amp, "steps": steps}
        if skip:
            rec["skipped"] = skip
            checks.append(rec)
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            config = DetectorConfig(
                model="spt_nano", detector="faster_rcnn", num_classes=heads.num_classes, img_size=size,
                min_size=size, max_size=size, model_kwargs={"backend": backend, "gate_init": 0.5},
            )  # fmt: skip
            model = build_detector(config)
            train_config = TrainConfig(
                out_dir=str(ctx.work / f"train_{backend}"), max_steps=steps, batch_size=batch, warmup_steps=1,
                progress=False, amp=amp,
            )  # fmt: skip
            trainer = Trainer(
                model, dataset, collate_detection, train_config, {"task": "detect"},
                dist_info=DistInfo(rank=0, world_size=1, local_rank=0, device=device),
            )  # fmt: skip
            before = [p.detach().clone() for p in trainer.model.parameters()]
            imgs = [im.to(device) for im in images]
            tgts = [{k: v.to(device) for k, v in t.items()} for t in targets]
            logged = [trainer.train_step(imgs, tgts) for _ in range(steps)]
            changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
            rec["losses"] = [round(r["loss"], 4) for r in logged]
            rec["grad_norms"] = [round(r["grad_norm"], 4) for r in logged]
            rec["keep_stats"] = {k: v for k, v in logged[-1].items() if k.startswith("keep")}
            rec["weights_changed"] = changed
            finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged)
            rec["pass"] = bool(finite and changed)
        except Exception as e:
            rec["error"], rec["pass"] = _err(e), False
            traceback.print_exc()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        checks.append(ctx.record(rec))
    return {"checks": checks}


def section_timing_block(ctx: Context) -> dict:
    """``spa bench block`` (stage-3 shape) for every backend, in bf16 and fp32."""
    from spa.bench.block import bench_block, format_table

    backends = [b for b, skip in _backends(ctx) if not skip]
    shape = (
        {"batch_size": 2, "resolution": 7, "dim": 16, "num_heads": 2, "rounds": 1, "warmup": 0}
        if ctx.small
        else {"batch_size": 32, "resolution": 14, "dim": 384, "num_heads": 12, "rounds": 10, "warmup": 3}
    )
    records, tables = [], []
    for amp in ("bf16", "off") if ctx.cuda else ("off",):
        recs = bench_block(
            **shape, keep_ratios=(0.5,) if ctx.small else (1.0, 0.5, 0.3), layouts=("containers",), backend=backends,
            device=str(ctx.device), amp=amp, progress=lambda m, a=amp: _say(f"block {a}: {m}"),
        )  # fmt: skip
        records += recs
        tables.append(f"amp {amp}, batch {shape['batch_size']}:\n\n{format_table(recs)}")
    return {"records": records, "tables": tables}


def section_timing_backbone(ctx: Context) -> dict:
    """``spa bench backbone``: spt_tiny vs swin_tiny, 224 px, batch 32, bf16, every backend."""
    from spa.bench.backbone import bench_backbone, format_backbone_table

    backends = [b for b, skip in _backends(ctx) if not skip][: 1 if ctx.small else None]
    if ctx.small:
        shape = {"models": ("spt_nano",), "sizes": (64,), "batch_sizes": (2,), "rounds": 1, "warmup": 0}
    else:
        shape = {"models": ("spt_tiny",), "sizes": (224,), "batch_sizes": (32,), "rounds": 6, "warmup": 2}
    amp = "bf16" if ctx.cuda else "off"
    records = bench_backbone(
        **shape, keep_ratios=(0.5,) if ctx.small else (1.0, 0.5, 0.3), layouts=("containers",), backend=backends, memory=False,
        device=str(ctx.device), amp=amp, progress=lambda m: _say(f"backbone: {m}"),
    )  # fmt: skip
    return {"records": records, "tables": [f"amp {amp}:\n\n{format_backbone_table(records)}"]}


@dataclass(frozen=True)
class Section:
    run: Callable[[Context], dict]
    limit_s: int
    check: bool  # a correctness section: its failure (or not finishing) fails the whole check
    backends: tuple[str, ...] | None = None  # the backends it runs (None: all)


# ``varlen`` compiles FlexAttention (never timed yet): its own sections, run after these eager ones
_EAGER = ("math", "sdpa")
SECTIONS: dict[str, Section] = {
    "env": Section(section_env, 60, False),
    "attention": Section(section_attention, 90, True, _EAGER),
    "block": Section(section_block, 120, True, _EAGER),
    "spt_vs_timm": Section(section_spt_vs_timm, 90, True, _EAGER),
    "train_amp": Section(section_train_amp, 120, True, _EAGER),
    "attention_varlen": Section(section_attention, 120, True, ("varlen",)),
    "block_varlen": Section(section_block, 150, True, ("varlen",)),
    "spt_vs_timm_varlen": Section(section_spt_vs_timm, 90, True, ("varlen",)),
    "train_amp_varlen": Section(section_train_amp, 120, True, ("varlen",)),
    "timing_block": Section(section_timing_block, 150, False),
    "timing_backbone": Section(section_timing_backbone, 180, False),
}


# -- driver ------------------------------------------------------------------------------------------------


def _status(result: dict) -> str:
    if "status" in result:
        return result["status"]
    checks = [c for c in result.get("checks", []) if not c.get("skipped")]
    return "failed" if any(not c.get("pass") for c in checks) else "passed"


def _run_section_here(name: str, ctx: Context) -> dict:
    t0 = time.perf_counter()
    ctx = replace(ctx, backends=SECTIONS[name].backends, done=[])
    if ctx.backends is not None and all(skip for _, skip in _backends(ctx)):  # e.g. varlen on a CPU
        checks = [{"level": name, "backend": b, "skipped": skip} for b, skip in _backends(ctx)]
        return {"checks": checks, "seconds": round(time.perf_counter() - t0, 2), "status": "passed"}
    try:
        result = SECTIONS[name].run(ctx)
    except Exception as e:
        traceback.print_exc()
        result = {"status": "error", "error": _err(e)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["status"] = _status(result)
    return result


_RUNNING: list[subprocess.Popen] = []  # the section process in flight (killed with this one on SIGTERM)


def _stop_running_section(signum: int, _frame: object) -> None:
    for proc in _RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
    raise SystemExit(128 + signum)


def _partial_path(result_path: Path) -> Path:
    """Where a section process writes each check as it finishes (``Context.record``)."""
    return result_path.with_suffix(".partial.json")


def _run_section_process(name: str, args: argparse.Namespace, limit: float, log: Path, work: Path) -> dict:
    result_path = work / f"{name}.json"
    cmd = [sys.executable, "-m", "spa.bench.gpu_check", "--section", name, "--result", str(result_path)]
    cmd += ["--device", args.device, "--work", str(work)] + (["--small"] if args.small else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    with log.open("a") as out:
        # its own process group (so that its workers are killed with it), in this session: whatever stops this
        # run (a time limit's kill of the session) stops the section too
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=os.setpgrp)
        _RUNNING[:] = [proc]
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the section's own process group (its workers too)
            proc.wait()
            partial = _partial_path(result_path)  # the checks it finished before the limit
            done = json.loads(partial.read_text())["checks"] if partial.is_file() else []
            return {"status": "timeout", "error": f"killed after {limit:.0f} s", "seconds": round(limit, 1),
                    "checks": done}  # fmt: skip
        finally:
            _RUNNING.clear()
    seconds = round(time.perf_counter() - t0, 2)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"status": "error", "error": f"section process exited {rc} without a result", "seconds": seconds}


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.4f}"
    return str(value)


def _check_status(c: dict) -> str:
    if c.get("skipped"):
        return f"skipped ({c['skipped']})"
    if c.get("error"):
        return f"ERROR: {c['error'][:160]}"
    return "PASS" if c.get("pass") else "FAIL"


def _where(c: dict) -> str:
    parts = [c.get("layout"), None if c.get("shift") is None else f"shift {c['shift']}"]
    return ", ".join(p for p in parts if p)


def failures(results: dict) -> list[str]:
    """One line per failed correctness check or correctness section that did not finish."""
    out = []
    for name, res in results["sections"].items():
        if not SECTIONS[name].check:
            continue
        if res["status"] in ("error", "timeout", "skipped"):
            out.append(f"section {name}: {res['status']} {res.get('error', '')}".strip())
        for c in res.get("checks", []):
            if not c.get("skipped") and not c.get("pass"):
                out.append(f"{name}: {c.get('backend')} {_where(c)} {c.get('precision')}: {_check_status(c)}")
    return out


def summary_markdown(results: dict) -> str:
    """``summary.md``: verdict, environment, sections, correctness tables, timing tables."""
    meta, sections = results["meta"], results["sections"]
    fails = results["failures"]
    lines = ["# spa GPU check", ""]
    lines += ["## Verdict", "", "**all correctness checks passed**" if not fails else "**FAILED:**"]
    lines += [f"- {f}" for f in fails] + [""]
    env = sections.get("env", {}).get("info", {})
    lines.append(
        f"Device: {env.get('device_name', meta['device'])} (capability {env.get('gpu_capability', '-')}), torch "
        f"{env.get('torch')}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, torchvision "
        f"{env.get('torchvision')}, timm {env.get('timm')}, spa {env.get('spa')}, git {env.get('git') or '-'}; "
        f"mode: {'small' if meta['small'] else 'full'}, {meta['seconds']} s of a {meta['budget_s']} s budget."
    )
    lines += [
        "",
        "## Sections",
        "",
        "| section | kind | status | seconds | limit s | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in sections.items():
        kind = "check" if SECTIONS[name].check else "info/timing"
        lines.append(
            f"| {name} | {kind} | {res['status']} | {res.get('seconds', '')} | {res.get('limit_s', '')} "
            f"| {(res.get('error') or '')[:160]} |"
        )
    lines.append("")
    rows = [c for name in sections for c in sections[name].get("checks", [])]
    if rows:
        lines += [
            "## Correctness against `reference` (and timm)",
            "",
            f"Relative max error (max abs error / max abs of the fp32 reference). Tolerance: fp32 {TOL_FP32}; "
            f"bf16 autocast max({TOL_BF16}, {BF16_REFERENCE_FACTOR:g} x the reference backend's own bf16 error).",
            "",
            "| level | backend | where | precision | out rel | grad rel (worst) | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            grad = _fmt(c.get("grad_rel")) + (f" ({c['grad_worst']})" if c.get("grad_worst") else "")
            if c.get("level") == "train":
                grad = f"losses {c.get('losses')}, grad norms {c.get('grad_norms')}"
            lines.append(
                f"| {c.get('level')} | {c.get('backend')} | {_where(c)} | {c.get('precision')} "
                f"| {_fmt(c.get('out_rel'))} | {grad} | {_check_status(c)} |"
            )
        lines.append("")
    for name in ("timing_block", "timing_backbone"):
        res = sections.get(name)
        if res and res.get("tables"):
            title = "one block, stage-3 shape" if name == "timing_block" else "whole backbone"
            lines += [f"## Timing: {title} (`spa bench {name.split('_')[1]}`)", ""]
            for table in res["tables"]:
                lines += [table, ""]
    return "\n".join(lines) + "\n"


def run_check(
    device: str = "cuda",
    small: bool = False,
    out: str | Path | None = None,
    sections: list[str] | None = None,
    budget_s: float = 450.0,
    in_process: bool = False,
) -> int:
    """Run the check; write ``results.json``, ``summary.md`` (and ``run.log``) under ``out``; return the exit
    code (0: every correctness check passed)."""
    from spa.errors import ConfigError

    names = list(sections or SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available())")
    out_dir = Path(out or os.environ.get("OUT") or "gpu_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "run.log"
    start = time.perf_counter()
    results: dict = {
        "meta": {
            "device": device,
            "small": small,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "sections": {},
    }
    args = argparse.Namespace(device=device, small=small)
    # SIGTERM (a time limit) also stops the running section; the caller's handler is back afterwards
    previous = None if in_process else signal.signal(signal.SIGTERM, _stop_running_section)
    try:
        with tempfile.TemporaryDirectory(prefix="spa-gpu-check-") as tmp:
            work = Path(tmp)
            ctx = Context(torch.device(device), small, work)
            for name in names:
                section = SECTIONS[name]
                left = budget_s - (time.perf_counter() - start)
                limit = min(section.limit_s, left)
                if limit < 10:
                    res = {"status": "skipped", "error": f"out of the {budget_s:.0f} s budget", "seconds": 0}
                else:
                    _say(f">>> {name} (limit {limit:.0f} s)")
                    if in_process:
                        res = _run_section_here(name, ctx)
                    else:
                        res = _run_section_process(name, args, limit, log, work)
                    _say(f"<<< {name}: {res['status']} in {res.get('seconds')} s")
                res["limit_s"] = round(limit)
                results["sections"][name] = res
                results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
                results["failures"] = failures(results)
                (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
                (out_dir / "summary.md").write_text(summary_markdown(results))  # also if the run is cut short
    finally:
        if not in_process:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    _say(f"wrote {out_dir / 'results.json'} and {out_dir / 'summary.md'}")
    print(summary_markdown(results).split("## Sections")[0], flush=True)
    return 1 if results["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spa.bench.gpu_check",
        description="spa's GPU check: every backend against reference, SPT == timm Swin, AMP training steps, "
        "block/backbone timing; writes results.json + summary.md under --out.",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cuda (the check), or cpu (smoke test of it)",
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes and one timing round (smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_out)")
    parser.add_argument(
        "--sections", default=None, help=f"comma list of sections to run (default all: {','.join(SECTIONS)})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="total seconds; later sections are skipped past it (default 450)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the sections in this process (no per-section time limit)",
    )
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: one section's process
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:  # one section in its own process (started by run_check)
        work = Path(args.work or tempfile.mkdtemp(prefix="spa-gpu-check-"))
        if args.device == "cuda":
            torch.cuda.set_device(0)
        _say(f"section {args.section} ({args.device}{', small' if args.small else ''})")
        partial = _partial_path(Path(args.result))
        res = _run_section_here(
            args.section, Context(torch.device(args.device), args.small, work, partial=partial)
        )
        Path(args.result).write_text(json.dumps(res, indent=1, default=str))
        return 0
    from spa.errors import SpaError

    try:
        return run_check(
            device=args.device,
            small=args.small,
            out=args.out,
            sections=[s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else None,
            budget_s=args.budget_s,
            in_process=args.in_process,
        )
    except SpaError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
