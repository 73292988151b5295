"""``spa demo``: the main job end to end on the built-in data, with a report.

1. make the built-in detection set (generated, nothing downloaded);
2. train ``spt_nano`` and its dense Swin baseline ``swin_nano`` with the same Faster R-CNN and schedule;
3. evaluate both (COCO AP, kept-token ratios on object / background tokens, backbone GMACs);
4. sweep the SPT's inference keep threshold (one trained model) -> AP vs GMACs;
5. measure backbone cost vs scene coverage on built-in sets of several coverages;
6. time training and inference of the whole detectors and of the backbones alone (batch 1 and larger);
7. draw selection overlays and the kept ratio during training; write ``report.md`` / ``report.json``.

Defaults fit about 15 minutes on 2 CPU cores; ``--full`` and the other flags make longer runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from spa.bench.timing import environment, interleaved_rounds

__all__ = ["DemoConfig", "register", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of a demo run (``--full`` scales them up)."""

    out: str = "runs/demo"
    data_dir: str = "data/builtin"
    model: str = "spt_nano"
    detector: str = "faster_rcnn"
    img_size: int = 256
    train_images: int = 64
    val_images: int = 16
    coverage: float = 0.2
    steps: int = 500
    batch_size: int = 4
    lr: float = 5e-4
    selection_alpha: float = 1.0
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    coverages: tuple[float, ...] = (0.05, 0.2, 0.4, 0.6)
    coverage_images: int = 8
    timing_rounds: int = 5
    bench_backbone: bool = True
    seed: int = 0

    @classmethod
    def full(cls, **overrides: Any) -> DemoConfig:
        base = cls(
            train_images=512, val_images=64, steps=4000, batch_size=8, coverage_images=32, timing_rounds=9
        )
        return replace(base, **overrides)


def _log(msg: str) -> None:
    print(f"[spa demo] {msg}", flush=True)


def _train(cfg: DemoConfig, model: str, out: Path) -> tuple[dict, torch.nn.Module]:
    """Train and evaluate one detector exactly as ``spa train`` would; returns (metrics, trained model)."""
    from spa.config import RunConfig
    from spa.engine.commands import run_training
    from spa.models import is_spt_name

    run = RunConfig(
        model=model,
        detector=cfg.detector,
        data="builtin",
        data_dir=cfg.data_dir,
        builtin_images=cfg.train_images,
        builtin_val_images=cfg.val_images,
        coverage=cfg.coverage,
        img_size=cfg.img_size,
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        checkpoint_every=max(50, cfg.steps // 4),
        out=str(out),
        **({"selection_alpha": cfg.selection_alpha} if is_spt_name(model) else {}),
    )
    start = time.perf_counter()
    result = run_training(run, overwrite=True)  # a new demo run replaces the last one
    metrics = result["eval"]
    metrics["train_minutes"] = (time.perf_counter() - start) / 60
    return metrics, result["model"]


def _median_ms(fn, rounds: int) -> float:
    """Median milliseconds of a call over ``rounds`` timed calls, after one warm-up."""
    return statistics.median(interleaved_rounds({"run": fn}, rounds)["run"])


def _time_detectors(
    models: dict[str, Any], images: list[torch.Tensor], targets: list[dict], rounds: int
) -> dict:
    """Images/s of whole detectors (train step at the training batch, inference at batch 1 and at that
    batch) and of their backbones alone, timed in interleaved, shuffled rounds (``spa.bench.timing``)."""
    batch = len(images)
    tensor = torch.stack(images)
    jobs: dict[tuple[str, str], Any] = {}
    for name, model in models.items():

        def train_step(model=model):
            model.train()
            model.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()

        def infer(model=model, n=batch):
            model.eval()
            with torch.inference_mode():
                model(images[:n])

        def backbone_train(model=model):
            body = model.backbone.body.train()
            body.zero_grad(set_to_none=True)
            sum(f.float().mean() for f in body(tensor)).backward()

        def backbone_infer(model=model, n=batch):
            body = model.backbone.body.eval()
            with torch.inference_mode():
                body(tensor[:n])

        jobs[(name, f"detector_train_b{batch}")] = train_step
        jobs[(name, "detector_infer_b1")] = lambda infer=infer: infer(n=1)
        jobs[(name, f"detector_infer_b{batch}")] = infer
        jobs[(name, f"backbone_train_b{batch}")] = backbone_train
        jobs[(name, "backbone_infer_b1")] = lambda backbone_infer=backbone_infer: backbone_infer(n=1)
        jobs[(name, f"backbone_infer_b{batch}")] = backbone_infer
    times = interleaved_rounds(jobs, rounds)
    out: dict[str, dict[str, float]] = {}
    for (name, what), ts in times.items():
        n = 1 if what.endswith("_b1") else batch
        out.setdefault(name, {})[f"{what}_img_s"] = n * 1e3 / statistics.median(ts)
    return out


def _threshold_sweep(cfg: DemoConfig, checkpoint: Path, val: Any) -> list[dict]:
    from spa.gate import set_keep_threshold
    from spa.tasks.base import load_model
    from spa.tasks.evaluation import evaluate_detection

    model, _ = load_model(checkpoint, task="detect")
    rows = []
    for threshold in cfg.thresholds:
        set_keep_threshold(model, threshold)
        result = evaluate_detection(model, val, batch_size=4)
        rows.append(
            {
                "keep_threshold": threshold,
                "gmacs_kept": result["gmacs"]["kept"],
                "gmacs_executed": result["gmacs"]["executed"],
                "AP": result["bbox"]["AP"],
                "AP50": result["bbox"]["AP50"],
                "keep": result["keep"],
            }
        )
        _log(
            f"threshold {threshold}: AP50 {rows[-1]['AP50']:.3f}, executed {rows[-1]['gmacs_executed']:.3f} GMACs"
        )
    return rows


def _coverage_sweep(cfg: DemoConfig, models: dict[str, Any], out: Path) -> list[dict]:
    from spa.data import builtin_dataset, ensure_builtin
    from spa.flops import count_macs

    rows = []
    for coverage in cfg.coverages:
        root = ensure_builtin(
            Path(cfg.data_dir).parent / f"builtin-coverage-{coverage}",
            images=1,
            val_images=cfg.coverage_images,
            size=cfg.img_size,
            coverage=coverage,
            seed=cfg.seed + 1,
        )
        val = builtin_dataset(root, "val")
        images = torch.stack([val[i][0] for i in range(len(val))])
        for name, model in models.items():
            body = model.backbone.body.eval()
            macs = count_macs(body, images)
            with torch.inference_mode():
                ms = _median_ms(lambda body=body, x=images: body(x), cfg.timing_rounds) / len(images)
            rows.append({"coverage": coverage, "model": name, "gmacs_executed": macs.executed,
                         "gmacs_kept": macs.kept, "ms_per_image": ms})  # fmt: skip
        _log(
            f"coverage {coverage}: "
            + ", ".join(f"{r['model']} {r['gmacs_executed']:.3f} G" for r in rows[-2:])
        )
    return rows


def _keep_movement(metrics: Path) -> dict[str, dict[str, float]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10) :]
    keys = sorted(k for k in records[-1] if k.startswith("keep_"))
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs if k in r and r[k] == r[k])  # noqa: E731
    return {k: {"start": mean(head, k), "end": mean(tail, k)} for k in keys}


def run_demo(cfg: DemoConfig) -> dict:
    """Run every step and write ``report.md``, ``report.json`` and the figures into ``cfg.out``."""
    from spa.data import builtin_dataset, collate_detection, detection_transforms
    from spa.models import dense_baseline_of
    from spa.report_figures import plot_ap_vs_gmacs, plot_cost_vs_coverage, plot_keep_during_training
    from spa.viz import draw_selection_overlays, model_selections

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_name = dense_baseline_of(cfg.model)
    report: dict[str, Any] = {"config": asdict(cfg), "environment": environment(), "models": {}}

    models: dict[str, torch.nn.Module] = {}
    for i, name in enumerate((cfg.model, dense_name)):
        _log(f"step {i + 1}/6: training {name} + {cfg.detector} for {cfg.steps} steps")
        metrics, models[name] = _train(cfg, name, out / name)
        report["models"][name] = {"eval": metrics}
    checkpoints = {name: out / name / "checkpoints" / "last.pt" for name in models}
    val = builtin_dataset(cfg.data_dir, "val")

    _log("step 3/6: keep-threshold sweep of the trained SPT")
    sweep = _threshold_sweep(cfg, checkpoints[cfg.model], val)
    dense_eval = report["models"][dense_name]["eval"]
    plot_ap_vs_gmacs(
        sweep,
        {
            "gmacs": dense_eval["gmacs"]["executed"],
            "AP": dense_eval["bbox"]["AP"],
            "AP50": dense_eval["bbox"]["AP50"],
        },
        out / "ap_vs_gmacs.png",
    )
    report["threshold_sweep"] = sweep

    _log("step 4/6: backbone cost vs scene coverage")
    report["coverage"] = _coverage_sweep(cfg, models, out)
    plot_cost_vs_coverage(report["coverage"], out / "cost_vs_coverage.png")

    _log("step 5/6: timing detectors and backbones (interleaved rounds, median)")
    train = builtin_dataset(cfg.data_dir, "train", transforms=detection_transforms(False, cfg.img_size))
    images, targets = collate_detection([train[i] for i in range(cfg.batch_size)])
    report["timing"] = _time_detectors(models, images, targets, cfg.timing_rounds)
    if cfg.bench_backbone:
        from spa.bench import bench_backbone

        report["backbone_bench"] = bench_backbone(
            models=(cfg.model, dense_name),
            sizes=(cfg.img_size,),
            batch_sizes=(1, 8),
            keep_ratios=(1.0, 0.5, 0.3),
            layouts=("containers",),
            checkpoint=checkpoints[cfg.model],
            images=[Path(cfg.data_dir) / "val" / "images"],  # the trained gate sees real scenes, not noise
            rounds=cfg.timing_rounds,
            memory=False,
            progress=lambda msg: _log(f"bench: {msg}"),
        )

    _log("step 6/6: figures and report")
    seen, selections, detections = model_selections(
        models[cfg.model], [val[i][0] for i in range(min(4, len(val)))]
    )
    confident = [d["boxes"][d["scores"] >= 0.5] for d in detections] if detections else None
    draw_selection_overlays(seen, selections, out / "selection_overlays.png", boxes=confident)
    plot_keep_during_training(out / cfg.model / "metrics.jsonl", out / "keep_during_training.png")
    report["keep_movement"] = _keep_movement(out / cfg.model / "metrics.jsonl")
    report["minutes"] = (time.perf_counter() - start) / 60
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_report(report))
    _log(f"done in {report['minutes']:.1f} min: {out / 'report.md'}")
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_report(report: dict) -> str:
    """``report.md`` from ``report.json``'s content."""
    cfg, env = report["config"], report["environment"]
    spt, dense = cfg["model"], next(n for n in report["models"] if n != cfg["model"])
    e = {n: report["models"][n]["eval"] for n in (spt, dense)}
    t = report.get("timing", {})
    lines = [
        "# spa demo report",
        "",
        f"**Small-scale run**: {cfg['train_images']} training images of {cfg['img_size']} px from the built-in "
        f"generated set, {cfg['steps']} steps of batch {cfg['batch_size']}, random initialisation (no pretrained "
        "weights), on the machine below. Numbers show the mechanism, not COCO-scale accuracy. A full run "
        "(`spa demo --full`: 512 images, 4000 steps of batch 8) trains about 30x longer on this CPU; a COCO run "
        "needs a GPU and Swin weights (`spa.load_swin_weights`).",
        "",
        f"Environment: {env['device']}, {env['threads']} threads, torch {env['torch']}, python {env['python']}, "
        f"{env['processor']}. Total time {report.get('minutes', 0):.1f} min.",
        "",
        "## Side by side",
        "",
        f"| | {spt} (SPA) | {dense} (dense) |",
        "|---|---|---|",
        f"| box AP | {_fmt(e[spt]['bbox']['AP'])} | {_fmt(e[dense]['bbox']['AP'])} |",
        f"| box AP50 | {_fmt(e[spt]['bbox']['AP50'])} | {_fmt(e[dense]['bbox']['AP50'])} |",
        f"| backbone GMACs/image, kept tokens | {_fmt(e[spt]['gmacs']['kept'])} | {_fmt(e[dense]['gmacs']['kept'])} |",
        f"| backbone GMACs/image, executed | {_fmt(e[spt]['gmacs']['executed'])} | {_fmt(e[dense]['gmacs']['executed'])} |",
    ]
    for key in sorted(t.get(spt, {})):
        label = key.replace("_img_s", " (images/s)").replace("_b", ", batch ").replace("_", " ")
        lines.append(f"| {label} | {_fmt(t[spt][key], 1)} | {_fmt(t[dense][key], 1)} |")
    for stage, keep in e[spt].get("keep", {}).items():
        lines.append(f"| kept ratio {stage}: object / background tokens | {_fmt(keep['object'])} / "
                     f"{_fmt(keep['background'])} | 1 / 1 |")  # fmt: skip
    lines += [
        "",
        "Kept ratio during training (mean of the first and last 10% of steps, Gumbel-perturbed):",
        "",
    ]
    for key, move in report.get("keep_movement", {}).items():
        lines.append(f"- {key}: {move['start']:.3f} -> {move['end']:.3f}")
    lines += [
        "",
        "## Accuracy vs compute (one trained SPT, inference keep threshold swept)",
        "",
        "![AP vs GMACs](ap_vs_gmacs.png)",
        "",
        "| keep threshold | AP | AP50 | GMACs kept | GMACs executed |",
        "|---|---|---|---|---|",
    ]
    for row in report.get("threshold_sweep", []):
        lines.append(f"| {row['keep_threshold']} | {_fmt(row['AP'])} | {_fmt(row['AP50'])} | "
                     f"{_fmt(row['gmacs_kept'])} | {_fmt(row['gmacs_executed'])} |")  # fmt: skip
    lines += [
        f"| dense {dense} | {_fmt(e[dense]['bbox']['AP'])} | {_fmt(e[dense]['bbox']['AP50'])} | "
        f"{_fmt(e[dense]['gmacs']['kept'])} | {_fmt(e[dense]['gmacs']['executed'])} |",
        "",
        "## Backbone cost vs scene coverage",
        "",
        "![cost vs coverage](cost_vs_coverage.png)",
        "",
        "| coverage | model | GMACs executed | ms / image |",
        "|---|---|---|---|",
    ]
    for row in report.get("coverage", []):
        lines.append(
            f"| {row['coverage']} | {row['model']} | {_fmt(row['gmacs_executed'])} | {_fmt(row['ms_per_image'], 2)} |"
        )
    if report.get("backbone_bench"):
        lines += ["", "## Backbone benchmark (`spa bench backbone`, same run)", "",
                  "| model | batch | select | keep ratio | train img/s | infer img/s | train / dense | infer / dense |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["backbone_bench"]:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['select']} | {_fmt(r['keep_ratio'], 2)} | "
                f"{_fmt(r['train_img_s'], 1)} | {_fmt(r['infer_img_s'], 1)} | {_fmt(r['train_ratio_to_dense'], 2)} | "
                f"{_fmt(r['infer_ratio_to_dense'], 2)} |"
            )
    lines += ["", "## Selections", "", "![selection overlays](selection_overlays.png)", "",
              "![kept ratio during training](keep_during_training.png)", ""]  # fmt: skip
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    overrides = {
        k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None
    }
    cfg = DemoConfig.full(**overrides) if args.full else DemoConfig(**overrides)
    run_demo(cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa demo`` to the CLI."""
    demo = subparsers.add_parser("demo", help="main job end to end on built-in data: train, evaluate, report")
    demo.add_argument("--out", default=None, help="report folder (default runs/demo)")
    demo.add_argument("--full", action="store_true", help="a longer run (512 images, 4000 steps)")
    demo.add_argument(
        "--steps", type=int, default=None, help="training steps of each detector (default 500; --full 4000)"
    )
    demo.add_argument(
        "--batch-size", type=int, default=None, help="training batch size (default 4; --full 8)"
    )
    demo.add_argument(
        "--train-images", type=int, default=None, help="built-in training images (default 64; --full 512)"
    )
    demo.add_argument(
        "--val-images", type=int, default=None, help="built-in validation images (default 16; --full 64)"
    )
    demo.add_argument("--img-size", type=int, default=None, help="image side in pixels (default 256)")
    demo.add_argument("--model", default=None, help="SPT variant (its dense Swin baseline is trained too)")
    demo.add_argument("--detector", default=None, help="faster_rcnn (default) or mask_rcnn")
    demo.add_argument(
        "--data-dir", default=None, help="where the built-in set is generated (default data/builtin)"
    )
    demo.add_argument(
        "--coverage-images",
        type=int,
        default=None,
        help="validation images per coverage of the cost-vs-coverage sweep (default 8)",
    )
    demo.add_argument(
        "--timing-rounds", type=int, default=None, help="interleaved timing rounds (default 5; --full 9)"
    )
    demo.add_argument(
        "--no-bench-backbone",
        dest="bench_backbone",
        action="store_false",
        default=None,
        help="skip the backbone benchmark step",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2, the fastest setting on the project's CPU machines)",
    )
    demo.set_defaults(func=_run)
