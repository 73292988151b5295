"""``spa ablate``: the paper's selection ablations, small enough for a CPU.

``spa ablate selection`` trains and evaluates, on the built-in multi-label set, side by side:

- ``dense``: the same SPT with ``select='all'`` (every SPA block keeps every token: Swin's block, exactly so
  where its map is a multiple of the window);
- ``topk``: uniform top-50% (``select='topk'``, ``keep_ratio=0.5``; the scorer is supervised, the count fixed);
- ``gate``: the gate without the selection loss (learns from the classification loss alone);
- ``gate_sup``: the gate with the selection loss (``alpha`` = ``--alpha``),

over a few seeds, and reports mAP (mean and spread) and the kept ratio as a Markdown table and JSON.

``spa ablate stages`` trains Faster R-CNN on the built-in detection set with SPA in stages {4}, {3,4},
{2,3,4} and {1,2,3,4} (supervised gate) and reports box AP / AP50, the kept ratio and backbone GMACs.

Both write ``OUT/results.json`` and ``OUT/results.md``; every run keeps its own folder under ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spa.engine.checkpoint import check_output_folder
from spa.errors import ConfigError

__all__ = [
    "SELECTION_VARIANTS",
    "STAGE_VARIANTS",
    "ablate_selection",
    "ablate_stages",
    "register",
    "selection_table",
    "stages_table",
]

# name -> (description, RunConfig overrides)
SELECTION_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("(a) dense (select=all)", {"select": "all", "supervise_gate": False}),
    "topk": ("(b) uniform top-50%", {"select": "topk", "keep_ratio": 0.5, "supervise_gate": True}),
    "gate": ("(c) gate, no selection loss", {"select": "gate", "supervise_gate": False}),
    "gate_sup": ("(d) gate + selection loss", {"select": "gate", "supervise_gate": True}),
}
# name -> 0-based SPA stage indices
STAGE_VARIANTS: dict[str, tuple[int, ...]] = {
    "{4}": (3,),
    "{3,4}": (2, 3),
    "{2,3,4}": (1, 2, 3),
    "{1,2,3,4}": (0, 1, 2, 3),
}


def _builtin(data: str, data_dir: str, images: int, val_images: int, size: int, coverage: float) -> str:
    """Make (once) the built-in set and return its ``builtin:DIR`` spec (independent of the run seeds)."""
    from spa.data import ensure_builtin

    if data != "builtin":
        raise ConfigError(f"the ablations run on the built-in set: use --data builtin, got {data!r}")
    root = ensure_builtin(
        data_dir, images=images, val_images=val_images, size=size, coverage=coverage, seed=0
    )
    return f"builtin:{root}"


def _finite(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _keep_split(keep: dict[str, dict[str, float]], key: str) -> float:
    values = [_finite(v.get(key)) for v in keep.values()]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def ablate_selection(
    out: str | Path = "runs/ablate_selection",
    data: str = "builtin",
    data_dir: str = "data/ablate_builtin",
    images: int = 256,
    val_images: int = 64,
    coverage: float = 0.2,
    model: str = "spt_nano",
    img_size: int = 128,
    steps: int = 150,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    alpha: float = 0.5,
    gate_lr_scale: float = 10.0,
    seeds: Sequence[int] = (0, 1),
    variants: Sequence[str] = tuple(SELECTION_VARIANTS),
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and evaluate the selection variants; returns (and writes) the results."""
    from spa.config import RunConfig
    from spa.engine.commands import run_training

    unknown = sorted(set(variants) - set(SELECTION_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(SELECTION_VARIANTS)}")
    if not seeds:
        raise ConfigError("give at least one seed")
    check_output_folder(out, "--out")
    spec = _builtin(data, data_dir, images, val_images, img_size, coverage)
    out = Path(out)
    settings = dict(
        model=model, img_size=img_size, steps=steps, batch_size=batch_size, lr=lr, alpha=alpha,
        gate_lr_scale=gate_lr_scale, seeds=list(seeds), images=images, val_images=val_images, data=spec,
    )  # fmt: skip
    rows: dict[str, Any] = {}
    start = time.perf_counter()
    for name in variants:
        description, overrides = SELECTION_VARIANTS[name]
        runs = []
        for seed in seeds:
            cfg = RunConfig(
                task="multilabel",
                model=model,
                data=spec,
                img_size=img_size,
                selection_alpha=alpha,
                max_steps=steps,
                batch_size=batch_size,
                eval_batch_size=max(batch_size, 16),
                lr=lr,
                warmup_steps=warmup_steps,
                gate_lr_scale=gate_lr_scale,
                seed=seed,
                checkpoint_every=10**9,
                log_every=10,
                out=str(out / name / f"seed{seed}"),
                **overrides,
            )
            t0 = time.perf_counter()
            result = run_training(cfg, progress=progress, device=device, log=False, overwrite=True)["eval"]
            runs.append(
                {
                    "seed": seed,
                    "mAP": _finite(result["mAP"]),
                    "keep": _finite(result["keep_mean"]),
                    "keep_object": _keep_split(result["keep"], "object"),
                    "keep_background": _keep_split(result["keep"], "background"),
                    "gmacs_kept": _finite(result["gmacs"]["kept"]),
                    "gmacs_executed": _finite(result["gmacs"]["executed"]),
                    "train_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(
                f"[ablate selection] {name} seed {seed}: mAP {runs[-1]['mAP']:.4f} kept {runs[-1]['keep']:.3f}"
            )
        row: dict[str, Any] = {"description": description, "runs": runs}
        for key in ("mAP", "keep", "keep_object", "keep_background", "gmacs_kept", "gmacs_executed"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
        rows[name] = row
    result = {
        "ablation": "selection",
        "settings": settings,
        "variants": rows,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    _write(out, result, selection_table(result))
    return result


def ablate_stages(
    out: str | Path = "runs/ablate_stages",
    data: str = "builtin",
    data_dir: str = "data/ablate_builtin_det",
    images: int = 128,
    val_images: int = 32,
    coverage: float = 0.2,
    model: str = "spt_nano",
    img_size: int = 128,
    steps: int = 120,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    alpha: float = 0.5,
    gate_lr_scale: float = 10.0,
    seed: int = 0,
    variants: Sequence[str] = tuple(STAGE_VARIANTS),
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and evaluate Faster R-CNN with SPA in the given stage sets; returns (and writes) the results."""
    from spa.config import RunConfig
    from spa.engine.commands import run_training

    unknown = sorted(set(variants) - set(STAGE_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown stage set(s) {unknown}; choose from {list(STAGE_VARIANTS)}")
    check_output_folder(out, "--out")
    spec = _builtin(data, data_dir, images, val_images, img_size, coverage)
    out = Path(out)
    settings = dict(
        model=model, detector="faster_rcnn", img_size=img_size, steps=steps, batch_size=batch_size, lr=lr,
        alpha=alpha, gate_lr_scale=gate_lr_scale, seed=seed, images=images, val_images=val_images, data=spec,
    )  # fmt: skip
    rows: dict[str, Any] = {}
    start = time.perf_counter()
    for name in variants:
        stages = STAGE_VARIANTS[name]
        cfg = RunConfig(
            task="detect",
            model=model,
            data=spec,
            img_size=img_size,
            spa_stages=list(stages),
            selection_alpha=alpha,
            max_steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            gate_lr_scale=gate_lr_scale,
            seed=seed,
            checkpoint_every=10**9,
            log_every=10,
            out=str(out / f"stages_{'_'.join(str(s + 1) for s in stages)}"),
        )
        t0 = time.perf_counter()
        result = run_training(cfg, progress=progress, device=device, log=False, overwrite=True)["eval"]
        keep = result.get("keep", {})
        rows[name] = {
            "spa_stages": [s + 1 for s in stages],
            "AP": _finite(result["bbox"]["AP"]),
            "AP50": _finite(result["bbox"]["AP50"]),
            "keep_object": _keep_split(keep, "object"),
            "keep_background": _keep_split(keep, "background"),
            "keep_by_stage": keep,
            "gmacs_kept": _finite(result["gmacs"]["kept"]),
            "gmacs_executed": _finite(result["gmacs"]["executed"]),
            "train_s": round(time.perf_counter() - t0, 1),
        }
        r = rows[name]
        print(
            f"[ablate stages] SPA in {name}: AP {r['AP']:.4f} AP50 {r['AP50']:.4f} GMACs {r['gmacs_kept']:.4f}"
        )
    result = {
        "ablation": "stages",
        "settings": settings,
        "variants": rows,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    _write(out, result, stages_table(result))
    return result


def _f(x: float, digits: int = 4) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def selection_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`ablate_selection` results."""
    n = len(result["settings"]["seeds"])
    lines = [
        f"| variant | mAP (mean ± std, {n} seed{'s' if n > 1 else ''}) | kept ratio | kept object | "
        "kept background | GMACs kept / executed |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["variants"].values():
        lines.append(
            f"| {row['description']} | {_f(row['mAP'])} ± {_f(row['mAP_std'])} | {_f(row['keep'], 3)} | "
            f"{_f(row['keep_object'], 3)} | {_f(row['keep_background'], 3)} | "
            f"{_f(row['gmacs_kept'])} / {_f(row['gmacs_executed'])} |"
        )
    return "\n".join(lines)


def stages_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`ablate_stages` results."""
    lines = [
        "| SPA stages | box AP | AP50 | kept object | kept background | GMACs kept / executed |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {_f(row['AP'])} | {_f(row['AP50'])} | {_f(row['keep_object'], 3)} | "
            f"{_f(row['keep_background'], 3)} | {_f(row['gmacs_kept'])} / {_f(row['gmacs_executed'])} |"
        )
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    s = result["settings"]
    header = f"# spa ablate {result['ablation']}\n\nsettings: {json.dumps(s)}; wall {result['wall_s']} s\n\n"
    (out / "results.md").write_text(header + table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _common(p: argparse.ArgumentParser, out: str, data_dir: str, images: int, val_images: int, steps: int,
            batch: int) -> None:  # fmt: skip
    p.add_argument("--data", default="builtin", help="only the built-in set (builtin)")
    p.add_argument("--data-dir", default=data_dir, help="where the built-in set is made")
    p.add_argument(
        "--images", type=int, default=images, help=f"training images of the built-in set (default {images})"
    )
    p.add_argument(
        "--val-images", type=int, default=val_images, help=f"validation images (default {val_images})"
    )
    p.add_argument("--coverage", type=float, default=0.2, help="object area fraction of the built-in set")
    p.add_argument("--model", default="spt_nano", help="SPT variant to ablate (default spt_nano)")
    p.add_argument("--img-size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"training batch size (default {batch})")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=10, help="warm-up steps (default 10)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="selection loss weight (default 0.5: these short runs need a stronger signal than the paper's 0.01)",
    )
    p.add_argument(
        "--gate-lr-scale", type=float, default=10.0, help="learning-rate factor of the gates (default 10)"
    )
    p.add_argument(
        "--out",
        default=out,
        help="results folder (results.md, results.json, one folder per run; a new run replaces them)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--progress", action="store_true", help="progress bars")


def _run_selection(args: argparse.Namespace) -> int:
    ablate_selection(
        out=args.out, data=args.data, data_dir=args.data_dir, images=args.images, val_images=args.val_images,
        coverage=args.coverage, model=args.model, img_size=args.img_size, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, alpha=args.alpha,
        gate_lr_scale=args.gate_lr_scale, seeds=args.seeds, variants=args.variants, device=args.device,
        progress=args.progress,
    )  # fmt: skip
    return 0


def _run_stages(args: argparse.Namespace) -> int:
    ablate_stages(
        out=args.out, data=args.data, data_dir=args.data_dir, images=args.images, val_images=args.val_images,
        coverage=args.coverage, model=args.model, img_size=args.img_size, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, alpha=args.alpha,
        gate_lr_scale=args.gate_lr_scale, seed=args.seed, variants=args.variants, device=args.device,
        progress=args.progress,
    )  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa ablate selection`` and ``spa ablate stages``."""
    ablate = subparsers.add_parser("ablate", help="selection / SPA-stage ablations on the built-in set")
    sub = ablate.add_subparsers(dest="ablation", metavar="ABLATION", required=True)
    sel = sub.add_parser("selection", help="dense vs top-50%% vs gate vs gate + selection loss (multi-label)")
    _common(sel, "runs/ablate_selection", "data/ablate_builtin", 256, 64, 150, 8)
    sel.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="e.g. 0 1 2 for three (default 0 1)"
    )
    sel.add_argument(
        "--variants",
        nargs="+",
        default=list(SELECTION_VARIANTS),
        choices=list(SELECTION_VARIANTS),
        help="variants to run (default all)",
    )
    sel.set_defaults(func=_run_selection)
    st = sub.add_parser("stages", help="SPA in stages {4} / {3,4} / {2,3,4} / {1,2,3,4} (detection)")
    _common(st, "runs/ablate_stages", "data/ablate_builtin_det", 128, 32, 120, 4)
    st.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    st.add_argument(
        "--variants",
        nargs="+",
        default=list(STAGE_VARIANTS),
        choices=list(STAGE_VARIANTS),
        help="SPA stage sets to run, quoted for the shell: --variants '{3,4}' '{4}' (default all)",
    )
    st.set_defaults(func=_run_stages)
