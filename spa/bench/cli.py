"""``spa bench block|backbone|detector``: the command-line front of ``spa.bench``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spa.attention import BACKENDS
from spa.bench.backbone import SPT_KEEP_RATIOS, bench_backbone, format_backbone_table
from spa.bench.block import bench_block, cost_fit, format_cost_fit, format_table
from spa.bench.detector import DETECTOR_KEEP_RATIOS, DetectorHeads, bench_detector, format_detector_table
from spa.bench.timing import AMP_MODES, DENORMAL_MODES, DEVICES, BenchDevice, denormals
from spa.engine.checkpoint import check_output_file
from spa.errors import ConfigError
from spa.packing import LAYOUTS

__all__ = ["register"]


def _write_json(path: str, data: object) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


_MAX_EVICT_MB = 4096  # far beyond any cache; a typo of a few more digits is an error, not a huge allocation


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= _MAX_EVICT_MB:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"expected a size in MB from 0 to {_MAX_EVICT_MB}, got {text!r}")
    return value


def _backends(text: str) -> list[str]:
    """``--backend``: one attention backend or a comma list of them (timed in the same rounds)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"backends are {', '.join(BACKENDS)} (comma list), got {text!r}")
    return names


def _depth_lists(text: str) -> list[tuple[int, ...]]:
    """``--spt-depths``: a comma list of dash-joined stage depths, e.g. ``2-2-6-2,2-2-10-2``."""
    try:
        depths = [tuple(int(v) for v in item.split("-")) for item in text.split(",") if item.strip()]
    except ValueError:
        depths = []
    if not depths or any(v < 1 for d in depths for v in d):
        raise argparse.ArgumentTypeError(
            f"expected dash-joined block counts >= 1 per stage, comma list (e.g. 2-2-6-2), got {text!r}"
        )
    return depths


def _run_block(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")  # before the timing, not after it
    # user errors are one line, before anything is set
    BenchDevice.resolve(args.device, args.amp)
    keep_ratios = tuple(_numbers(args.keep_ratios, float, "--keep-ratios"))
    with denormals(args.denormals):  # before any parallel op: torch's CPU threads copy it when they start
        return _time_block(args, keep_ratios)


def _time_block(args: argparse.Namespace, keep_ratios: tuple[float, ...]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    records = bench_block(
        batch_size=args.batch_size,
        resolution=args.resolution,
        dim=args.dim,
        num_heads=args.heads,
        window_size=args.window,
        shift=args.shift,
        keep_ratios=keep_ratios,
        layouts=tuple(args.layouts.split(",")),
        backend=args.backend,
        rounds=args.rounds,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        evict_cache_mb=args.evict_cache_mb,
        progress=lambda msg: print(f"[bench block] {msg}", flush=True),
    )
    print(format_table(records))
    fits = cost_fit(records)
    if fits:
        print("\n" + format_cost_fit(fits))
    if args.json:
        env = BenchDevice.resolve(args.device, args.amp).environment()
        _write_json(args.json, {"environment": env, "records": records, "cost_fit": fits})
    return 0


def _run_backbone(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")  # before the timing, not after it
    quick = args.quick
    records = bench_backbone(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        sizes=_ints(args.sizes) if args.sizes else ([64] if quick else [224, 512]),
        batch_sizes=_ints(args.batch_sizes) if args.batch_sizes else ([1, 2] if quick else [1, 8]),
        keep_ratios=[float(r) for r in args.keep_ratios.split(",")],
        layouts=[lay.strip() for lay in args.layouts.split(",")],
        checkpoint=args.checkpoint,
        keep_threshold=args.keep_threshold,
        images=args.images,
        rounds=args.rounds or (2 if quick else 5),
        warmup=1,
        threads=args.threads,
        memory=not args.no_memory,
        device=args.device,
        amp=args.amp,
        backend=args.backend,
        compile=args.compile,
        stage_times=args.stage_times,
        denormals=args.denormals,
        spt_depths=args.spt_depths,
        progress=lambda msg: print(f"[bench backbone] {msg}", flush=True),
    )
    print(format_backbone_table(records))
    if args.json:
        _write_json(args.json, records)
    return 0


def _numbers(text: str, kind: type, flag: str) -> list:
    """A comma list of numbers; a user error (``ConfigError``) when one is not a number."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of {kind.__name__}s, got {text!r}") from None


def _run_detector(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")  # before the timing, not after it
    quick = args.quick
    models = args.models if args.models is not None else ("spt_nano" if quick else "spt_tiny,swin_tiny")
    records = bench_detector(
        models=[m.strip() for m in models.split(",") if m.strip()],
        detector=args.detector,
        sizes=(
            _numbers(args.sizes, int, "--sizes")
            if args.sizes is not None
            else ([128] if quick else [512, 800])
        ),
        batch_sizes=(
            _numbers(args.batch_sizes, int, "--batch-sizes")
            if args.batch_sizes is not None
            else ([1] if quick else [2])
        ),
        keep_ratios=_numbers(args.keep_ratios, float, "--keep-ratios"),
        checkpoint=args.checkpoint,
        heads=DetectorHeads.quick() if quick else DetectorHeads(),
        rounds=args.rounds if args.rounds is not None else (3 if quick else 5),
        warmup=args.warmup if args.warmup is not None else 1,
        threads=args.threads,
        device=args.device,
        amp=args.amp,
        backend=args.backend,
        denormals=args.denormals,
        progress=lambda msg: print(f"[bench detector] {msg}", flush=True),
    )
    print(format_detector_table(records))
    if args.json:
        _write_json(args.json, records)
    return 0


def _device_flags(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--amp`` and ``--denormals``: the same flags on every benchmark."""
    parser.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="where to run: cpu, or cuda (timed with CUDA events; records GPU peak memory) (default cpu)",
    )
    parser.add_argument(
        "--amp",
        default="off",
        choices=AMP_MODES,
        help="off (float32), or bf16 (every timed call under bfloat16 autocast) (default off)",
    )
    parser.add_argument(
        "--denormals",
        default="flush",
        choices=DENORMAL_MODES,
        help="flush float32 denormals to zero on CPU, or keep them (torch's default). timm's shifted windows "
        "mask with -100 and make denormals, which slow its Swin blocks down on x86; SPA blocks mask with -inf. "
        "Records say env_flush_denormal (default flush)",
    )


def _compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every timed model, the dense baseline too (spa.compile.compile_model; slow warm-up)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa bench ...`` to the CLI."""
    from spa.config import positive_int

    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    block = kinds.add_parser("block", help="one SPA block vs timm's dense Swin block (stage-3 shape)")
    block.add_argument(
        "--json",
        help='write {"environment": ..., "records": [...], "cost_fit": [...]} to this JSON file (backbone and '
        "detector write the records alone, each with its env_* fields)",
    )
    block.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    block.add_argument("--resolution", type=int, default=14, help="feature map side (tokens)")
    block.add_argument("--dim", type=int, default=384, help="channels (default 384: stage 3 of Swin-T)")
    block.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    block.add_argument("--window", type=int, default=7, help="window side in tokens (default 7)")
    block.add_argument("--shift", action="store_true", help="benchmark a shifted-window block")
    block.add_argument(
        "--keep-ratios",
        default="1.0,0.5,0.3,0.2",
        help="forced keep ratios, comma list (default 1.0,0.5,0.3,0.2)",
    )
    block.add_argument(
        "--layouts", default=",".join(LAYOUTS), help="packing layouts, comma list (default all)"
    )
    block.add_argument(
        "--backend",
        default=["auto"],
        type=_backends,
        help=f"attention backend(s) of the SPA block, comma list timed in the same rounds ({', '.join(BACKENDS)}; "
        "default auto)",
    )
    block.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    block.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    block.add_argument(
        "--evict-cache-mb",
        type=_megabytes,
        default=0.0,
        metavar="MB",
        help="stream a buffer of MB megabytes through the caches before every timed call, as the blocks before "
        "it do inside a model (e.g. 64; default 0: timed with warm caches)",
    )
    _device_flags(block)
    _compile_flag(block)
    block.set_defaults(func=_run_block)

    bb = kinds.add_parser(
        "backbone", help="whole backbones: SPT vs its dense Swin baseline (GMACs, img/s, memory)"
    )
    bb.add_argument("--models", default="spt_tiny,swin_tiny", help="comma list of spt_*/swin_* backbones")
    bb.add_argument("--sizes", default=None, help="image sides, comma list (default 224,512; --quick: 64)")
    bb.add_argument("--batch-sizes", default=None, help="comma list (default 1,8; --quick: 1,2)")
    bb.add_argument(
        "--keep-ratios",
        default=",".join(str(r) for r in SPT_KEEP_RATIOS),
        help="forced keep ratios of the SPT, comma list (default 1.0,0.5,0.3,0.2)",
    )
    bb.add_argument("--layouts", default=",".join(LAYOUTS), help="packing layouts, comma list (default all)")
    bb.add_argument("--checkpoint", help="detection checkpoint: also benchmark its trained gate")
    bb.add_argument(
        "--keep-threshold",
        type=float,
        help="inference keep threshold of the checkpoint's gate (default: the one stored in the checkpoint)",
    )
    bb.add_argument(
        "--images", nargs="+", help="image files/folders to benchmark on (default: random normal images)"
    )
    bb.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick: 2)"
    )
    bb.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    bb.add_argument(
        "--backend",
        default=["auto"],
        type=_backends,
        help=f"attention backend(s) of the SPT's SPA blocks, comma list timed in the same rounds "
        f"({', '.join(BACKENDS)}; default auto)",
    )
    _device_flags(bb)
    _compile_flag(bb)
    bb.add_argument(
        "--no-memory", action="store_true", help="skip the per-configuration peak-RSS processes (CPU only)"
    )
    bb.add_argument(
        "--stage-times",
        action="store_true",
        help="also time each stage of every inference call (forward hooks; columns infer_stage_ms, "
        "infer_stage_ratio_to_dense; on CUDA a synchronisation per stage)",
    )
    bb.add_argument(
        "--spt-depths",
        type=_depth_lists,
        default=None,
        help="time the SPT at these stage depths instead of its own, dash-joined per configuration, comma "
        "list (e.g. 2-2-6-2 = Swin-T's, against spt_tiny's 2-2-10-2; the dense baseline keeps its depths; "
        "records and table say depths)",
    )
    bb.add_argument("--quick", action="store_true", help="fewer rounds, small sizes (for tests)")
    bb.add_argument("--json", help="write the list of records to this JSON file")
    bb.set_defaults(func=_run_backbone)

    dt = kinds.add_parser(
        "detector",
        help="whole Faster/Mask R-CNN + FPN: SPT vs its dense Swin baseline (time ratios, backbone share)",
    )
    dt.add_argument(
        "--models", default=None, help="comma list of spt_*/swin_* backbones (default spt_tiny,swin_tiny)"
    )
    dt.add_argument(
        "--detector", default="mask_rcnn", choices=("mask_rcnn", "faster_rcnn"), help="default mask_rcnn"
    )
    dt.add_argument("--sizes", default=None, help="image sides, comma list (default 512,800; --quick: 128)")
    dt.add_argument("--batch-sizes", default=None, help="comma list (default 2; --quick: 1)")
    dt.add_argument(
        "--keep-ratios",
        default=",".join(str(r) for r in DETECTOR_KEEP_RATIOS),
        help="forced keep ratios of the SPT, comma list (default 1.0,0.5,0.3)",
    )
    dt.add_argument("--checkpoint", help="detection checkpoint: also benchmark its trained gate")
    dt.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick: 3)"
    )
    dt.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration (default 1)")
    dt.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    dt.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="attention backend of the SPT's SPA blocks (default auto)",
    )
    _device_flags(dt)
    dt.add_argument(
        "--quick", action="store_true", help="spt_nano, 128 px, batch 1, tiny heads, 3 rounds (for tests)"
    )
    dt.add_argument("--json", help="write the list of records to this JSON file")
    dt.set_defaults(func=_run_detector)
