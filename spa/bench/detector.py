"""``spa bench detector``: whole detectors (Faster / Mask R-CNN + FPN), SPT against its dense Swin baseline.

Method:

- Models: ``spa.tasks.detection.build_detector`` at realistic head sizes (:class:`DetectorHeads`: FPN 256
  channels, box head representation 1024, 512 sampled RoIs and 256 RPN anchors per training image, 10
  classes), random weights, drop path off, the detector's transform fixed to the benchmark size
  (``min_size = max_size = size``). Each SPT variant gets its dense timm Swin baseline of the same width
  (``spa.models.dense_baseline_of``) with the very same heads. SPT configurations are ``select='topk'`` at
  forced keep ratios (one model, same weights; every SPA block's ``gate.select`` / ``gate.keep_ratio``
  switched before each call, as ``bench backbone`` does) and, with ``checkpoint``, ``select='gate'``: the
  backbone body (SPT + trained gate) of a detection checkpoint (``spa.tasks.base.load_model``) inside the
  benchmark's heads (so that its heads cost what the others' cost; ``keep_ratio`` = measured kept fraction).
- Equal head work: random weights must not make one model's heads slower, so ``roi_heads.score_thresh =
  0``, RPN and box NMS thresholds 1.0 (NMS runs but removes nothing), fixed RPN pre/post-NMS top-n (train
  and test) and ``detections_per_img``: every image gets exactly ``rpn_post_nms_top_n_test`` proposals and
  ``detections_per_img`` detections in inference (``infer_detections`` records it) and
  ``box_batch_size_per_image`` sampled RoIs in training. Only the mask head's training work (it runs on the
  positive RoIs) still depends on the proposals; ``train_positive_rois`` records their number per image.
- Inputs: one fixed, seeded synthetic batch: uniform random images in [0, 1] of ``size`` x ``size`` plus
  ``boxes_per_image`` random boxes (labels, and box-filled masks for Mask R-CNN) per image as targets.
- Timing: one worker process per (size, batch) (``bench backbone``'s launcher,
  ``python -m spa.bench _worker``) builds every detector once, runs each configuration once untimed
  (GMACs, kept ratio, detection / RoI counts, CUDA peak memory), then times all of them in the same
  interleaved, shuffled rounds (``spa.bench.timing.interleaved_rounds``, after ``warmup`` calls each). A
  train step is ``zero_grad`` + forward of the whole detector in train mode + backward of its loss dict summed
  (no optimizer); inference is a forward in eval mode under ``torch.inference_mode``. ``*_ms`` = median
  over rounds; ``train_ratio_to_dense`` / ``infer_ratio_to_dense`` = median over rounds of (this
  configuration's time / the dense baseline's time in the same round): a TIME ratio, below 1 = faster;
  dense records have 1.0. On CUDA the device is synchronized before every clock reading.
- Backbone share: in the same rounds, ``detector.backbone(images.tensors)`` of the DENSE detector alone
  (the backbone body + FPN on the same padded batch; train: forward + backward of the sum of its output
  maps with ``zero_grad``; inference: eval forward under ``inference_mode``).
  ``backbone_share_train`` = median over rounds of (that train time / the dense whole-detector train step
  time), ``backbone_share_infer`` likewise; every record of a (size, batch) carries its dense baseline's
  shares: the part of the detector's time that a faster backbone can save at most.
- Cost: ``gmacs_executed`` / ``gmacs_kept`` of the backbone body per image (``spa.flops.count_macs`` on the
  padded batch, eval mode); ``kept_ratio_measured`` = mean kept fraction over SPA blocks.
- Memory (``device='cuda'`` only): ``train_peak_mem_mb`` / ``infer_peak_mem_mb`` =
  ``torch.cuda.max_memory_allocated`` during one step (every detector of the worker is resident, so that is
  included; ``*_peak_mem_delta_mb`` subtracts what was allocated before the step).
- Device and precision: ``spa.bench.timing.BenchDevice``, as ``bench block`` and ``bench backbone`` (CUDA
  events after a synchronisation; ``amp='bf16'``: every step, the backbone-share steps too, under bf16
  autocast); ``backend`` sets the SPT's attention backend. Records carry ``device``, ``amp``, ``backend`` and
  ``env_*`` (GPU name, versions).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from spa.attention import BACKENDS
from spa.bench.backbone import _backbone_configs, _config_records, _configure, _run_worker
from spa.bench.timing import DENORMAL_MODES, BenchDevice, check_timed_denormals, median_ratio, pass_fields
from spa.errors import ConfigError

__all__ = [
    "DETECTOR_KEEP_RATIOS",
    "DETECTOR_REQUIRED_KEYS",
    "DetectorHeads",
    "bench_detector",
    "format_detector_table",
    "synthetic_batch",
]

DETECTOR_KEEP_RATIOS = (1.0, 0.5, 0.3)
DETECTOR_REQUIRED_KEYS = (
    "model", "detector", "size", "batch_size", "select", "keep_ratio", "train_ms", "infer_ms",
    "train_ratio_to_dense", "infer_ratio_to_dense", "backbone_share_train", "backbone_share_infer",
    "kept_ratio_measured", "gmacs_executed", "rounds", "env_device", "env_device_name",
)  # fmt: skip


@dataclass(frozen=True)
class DetectorHeads:
    """The heads every detector of a benchmark shares (defaults: realistic Faster / Mask R-CNN sizes)."""

    fpn_channels: int = 256
    representation_size: int = 1024
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    detections_per_img: int = 100
    num_classes: int = 10
    boxes_per_image: int = 3

    @classmethod
    def quick(cls) -> DetectorHeads:
        """Small heads for tests (``--quick``), still heavy enough next to ``spt_nano`` at 128 px that the
        dense backbone's share of the time stays well below 1 on a noisy machine."""
        return cls(
            fpn_channels=32, representation_size=512, rpn_batch_size_per_image=64, box_batch_size_per_image=512,
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_test=1000, detections_per_img=100, num_classes=3, boxes_per_image=4,
        )  # fmt: skip

    def check(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"detector head settings must be positive integers, got {bad}")


# --------------------------------------------------------------------------------------------------- worker


def _build(cfg: dict, spec: dict) -> nn.Module:
    """The detector of one configuration, with the benchmark's heads and the equal-work settings."""
    from spa.tasks.detection import DetectorConfig, build_detector

    heads = DetectorHeads(**spec["heads"])
    options: dict = {"drop_path_rate": 0.0}
    if cfg["select"] == "topk":
        options.update(select="topk", keep_ratio=cfg["keep_ratio"])
    if cfg["select"] != "dense" and cfg.get("backend"):
        options["backend"] = cfg["backend"]
    size = spec["size"]
    config = DetectorConfig(
        model=cfg["model"], detector=spec["detector"], num_classes=heads.num_classes, img_size=size,
        min_size=size, max_size=size, fpn_channels=heads.fpn_channels,
        representation_size=heads.representation_size, rpn_batch_size_per_image=heads.rpn_batch_size_per_image,
        box_batch_size_per_image=heads.box_batch_size_per_image, model_kwargs=options,
    )  # fmt: skip
    model = build_detector(config)
    if cfg.get("checkpoint"):  # the trained body (SPT + gate) inside the benchmark's heads
        from spa.tasks.base import load_model

        body = load_model(cfg["checkpoint"], task="detect")[0].backbone.body
        for module in body.modules():  # drop path off, as in the other models
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        model.detector.backbone.body = body
    det = model.detector
    det.rpn._pre_nms_top_n = {
        "training": heads.rpn_pre_nms_top_n_train,
        "testing": heads.rpn_pre_nms_top_n_test,
    }
    det.rpn._post_nms_top_n = {
        "training": heads.rpn_post_nms_top_n_train,
        "testing": heads.rpn_post_nms_top_n_test,
    }
    det.rpn.nms_thresh = 1.0  # NMS runs, removes nothing: a fixed number of proposals whatever the weights
    det.roi_heads.nms_thresh = 1.0
    det.roi_heads.score_thresh = 0.0
    det.roi_heads.detections_per_img = heads.detections_per_img
    return model


def synthetic_batch(
    size: int, batch: int, detector: str, heads: DetectorHeads, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The benchmark's fixed batch: uniform images in [0, 1] and ``heads.boxes_per_image`` random boxes per
    image (labels; box-filled masks for Mask R-CNN), all from ``torch.Generator().manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=gen))
        n = heads.boxes_per_image
        wh = (0.15 + 0.35 * torch.rand(n, 2, generator=gen)) * size
        xy = torch.rand(n, 2, generator=gen) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor().clamp(0, size)
        target = {"boxes": boxes, "labels": torch.randint(1, heads.num_classes + 1, (n,), generator=gen)}
        if detector == "mask_rcnn":
            masks = torch.zeros(n, size, size, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


@contextmanager
def _counting_positives(roi_heads: nn.Module) -> Iterator[list[int]]:
    """Positive RoIs (all images) of each ``select_training_samples`` call while inside."""
    counts: list[int] = []
    original = roi_heads.select_training_samples

    def counted(proposals, targets):
        out = original(proposals, targets)
        counts.append(sum(int((labels > 0).sum()) for labels in out[2]))
        return out

    roi_heads.select_training_samples = counted
    try:
        yield counts
    finally:
        del roi_heads.select_training_samples  # back to the class's method


def _train_step(model: nn.Module, images: list, targets: list, bench: BenchDevice | None = None) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    with bench.autocast() if bench else nullcontext():
        losses = model(images, targets)
    sum(losses.values()).backward()


def _infer_step(model: nn.Module, images: list, bench: BenchDevice | None = None) -> list:
    model.eval()
    with torch.inference_mode(), bench.autocast() if bench else nullcontext():
        return model(images)


def _backbone_train(model: nn.Module, x: torch.Tensor, bench: BenchDevice | None = None) -> None:
    backbone = model.backbone
    backbone.train()
    backbone.zero_grad(set_to_none=True)
    with bench.autocast() if bench else nullcontext():
        outs = backbone(x)
    sum(o.float().sum() for o in outs.values()).backward()


def _backbone_infer(model: nn.Module, x: torch.Tensor, bench: BenchDevice | None = None) -> None:
    model.eval()
    with torch.inference_mode(), bench.autocast() if bench else nullcontext():
        model.backbone(x)


def _worker_time(spec: dict, progress: Callable[[str], None]) -> dict:
    """Time every configuration of one (size, batch) and the dense backbones alone, interleaved."""
    from spa.flops import count_macs

    size, batch, seed = spec["size"], spec["batch_size"], spec.get("seed", 0)
    bench = BenchDevice.resolve(spec.get("device", "cpu"), spec.get("amp", "off"))
    device = bench.device
    heads = DetectorHeads(**spec["heads"])
    images, targets = synthetic_batch(size, batch, spec["detector"], heads, seed)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    say = lambda msg: progress(f"size {size} batch {batch}: {msg}")  # noqa: E731
    models: dict[tuple, nn.Module] = {}
    results: list[dict] = []
    runs: dict[tuple, Callable[[], None]] = {}
    padded = None
    for i, cfg in enumerate(spec["configs"]):
        key = (cfg["model"], cfg["select"] == "dense", cfg.get("checkpoint"))
        if key not in models:
            torch.manual_seed(seed)
            models[key] = _build(cfg, spec).to(device)
        model = models[key]
        _configure(model, cfg)
        model.eval()
        if padded is None:  # the padded batch the backbone sees (same for every model: same transform)
            padded = model.detector.transform(images)[0].tensors
        body = model.backbone.body
        macs = count_macs(body, padded)
        selections = getattr(body, "last_selections", []) if cfg["select"] != "dense" else []
        kept = float(torch.stack([s.keep_ratio.mean() for s in selections]).mean()) if selections else 1.0
        with _counting_positives(model.detector.roi_heads) as positives:
            train_mem = bench.peak_memory(lambda m=model: _train_step(m, images, targets, bench))
        detections: list = []
        infer_mem = bench.peak_memory(lambda m=model, d=detections: d.extend(_infer_step(m, images, bench)))
        res = {
            "gmacs_kept": round(macs.kept, 4),
            "gmacs_executed": round(macs.executed, 4),
            "kept_ratio_measured": round(kept, 4),
            "train_positive_rois": round(positives[-1] / batch, 1),
            "infer_detections": round(sum(len(d["boxes"]) for d in detections) / batch, 1),
        }
        res.update({f"train_{k}": v for k, v in train_mem.items()})
        res.update({f"infer_{k}": v for k, v in infer_mem.items()})
        results.append(res)
        say(f"set up {i + 1}/{len(spec['configs'])} ({cfg['model']} {cfg['select']} {cfg['keep_ratio']})")

        def run(
            step: Callable, *args: object, model: nn.Module = model, cfg: dict = cfg
        ) -> Callable[[], None]:
            return lambda: (_configure(model, cfg), step(model, *args, bench))

        runs[(i, "train_ms")] = run(_train_step, images, targets)
        runs[(i, "infer_ms")] = run(_infer_step, images)
        if cfg["select"] == "dense":
            runs[(i, "backbone_train_ms")] = run(_backbone_train, padded)
            runs[(i, "backbone_infer_ms")] = run(_backbone_infer, padded)
    times = bench.rounds(runs, spec["rounds"], spec["warmup"], seed, say)
    for (i, key), ms in times.items():
        results[i][key] = ms
    return {"results": results, "environment": bench.environment()}


# --------------------------------------------------------------------------------------------------- driver


def _checkpoint_model(checkpoint: str | Path) -> str:
    """The SPT a detection checkpoint was trained with (a dense one has no gate to benchmark)."""
    from spa.engine.checkpoint import load_checkpoint
    from spa.models import is_spt_name

    meta = load_checkpoint(checkpoint).get("meta") or {}
    if meta.get("task") != "detect" or "detector" not in meta:
        raise ConfigError(f"{checkpoint} is not a detection checkpoint (task {meta.get('task')!r})")
    name = meta["detector"]["model"]
    if not is_spt_name(name):
        raise ConfigError(f"{checkpoint} holds a dense {name}; a trained SPT gate is needed")
    return name


def bench_detector(
    models: Sequence[str] = ("spt_tiny", "swin_tiny"),
    detector: str = "mask_rcnn",
    sizes: Sequence[int] = (512, 800),
    batch_sizes: Sequence[int] = (2,),
    keep_ratios: Sequence[float] = DETECTOR_KEEP_RATIOS,
    checkpoint: str | Path | None = None,
    heads: DetectorHeads | None = None,
    rounds: int = 5,
    warmup: int = 1,
    threads: int = 2,
    device: str = "cpu",
    amp: str = "off",
    backend: str = "auto",
    seed: int = 0,
    denormals: str = "flush",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Benchmark whole detectors (SPT vs its dense Swin baseline, same heads); see the module docstring.

    Returns one record per (model, size, batch size, select, keep ratio): train-step and inference times,
    their ratios to the dense baseline, the dense backbone's share of the detector's time, backbone GMACs,
    kept ratio, RoI / detection counts, the heads, the device and AMP mode and the environment (``env_*``).
    ``denormals``: as for ``bench_backbone`` (default ``flush``).
    """
    from spa.tasks.detection import DETECTORS

    say = progress or (lambda msg: None)
    heads = heads or DetectorHeads()
    heads.check()
    if detector not in DETECTORS:
        raise ConfigError(f"unknown detector {detector!r}; choose from {DETECTORS}")
    if not models:
        raise ConfigError("models must not be empty")
    if not keep_ratios:
        raise ConfigError("keep_ratios must not be empty")
    if any(not 0.0 < r <= 1.0 for r in keep_ratios):
        raise ConfigError(f"keep ratios must be in (0, 1], got {list(keep_ratios)}")
    if not sizes or not batch_sizes or any(s < 64 for s in sizes) or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"need sizes >= 64 and batch sizes >= 1, got {list(sizes)} and {list(batch_sizes)}")
    if rounds < 1 or warmup < 0 or threads < 1:
        raise ConfigError(f"need rounds >= 1, warmup >= 0, threads >= 1; got {rounds}, {warmup}, {threads}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if denormals not in DENORMAL_MODES:
        raise ConfigError(f"denormals must be one of {DENORMAL_MODES}, got {denormals!r}")
    bench = BenchDevice.resolve(device, amp)
    checkpoint_model = _checkpoint_model(checkpoint) if checkpoint is not None else None
    configs = _backbone_configs(models, keep_ratios, ["containers"], checkpoint, checkpoint_model, [backend])
    load = round(os.getloadavg()[0], 2)  # other work on the machine makes timings noisy
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="spa-bench-detector-") as tmp:
        for size in sizes:
            for batch in batch_sizes:
                say(
                    f"size {size} batch {batch}: timing {len(configs)} {detector} configurations in one process"
                )
                spec = {
                    "mode": "detector", "size": size, "batch_size": batch, "threads": threads, "seed": seed,
                    "device": str(bench.device), "amp": bench.amp, "detector": detector, "heads": asdict(heads),
                    "configs": configs, "rounds": rounds, "warmup": warmup, "denormals": denormals,
                }  # fmt: skip
                out = _run_worker(spec, Path(tmp), f"detector-{size}-{batch}")
                check_timed_denormals(out["environment"], denormals, "bench detector")
                records += _records(configs, out, spec, bench, load)
    return records


def _records(configs: list[dict], out: dict, spec: dict, bench: BenchDevice, load: float) -> list[dict]:
    """The records of one worker's results (medians, ratios to dense, backbone shares)."""
    timed, batch = out["results"], spec["batch_size"]
    env = {**out["environment"], "load_avg_1m": load}
    records = []
    for i, dense, rec in _config_records(configs, timed):
        res, ref = timed[i], timed[dense]
        backbone = pass_fields(ref, ref, ("backbone_train", "backbone_infer"))  # the dense baseline's
        rec.update(
            detector=spec["detector"],
            size=spec["size"],
            batch_size=batch,
            **pass_fields(res, ref, ("train", "infer"), batch),
            backbone_train_ms=backbone["backbone_train_ms"],
            backbone_infer_ms=backbone["backbone_infer_ms"],
            backbone_share_train=round(median_ratio(ref["backbone_train_ms"], ref["train_ms"]), 4),
            backbone_share_infer=round(median_ratio(ref["backbone_infer_ms"], ref["infer_ms"]), 4),
            **{k: v for k, v in res.items() if not k.endswith("_ms")},
            gmacs_executed_ratio_to_dense=round(res["gmacs_executed"] / ref["gmacs_executed"], 4),
            rounds=spec["rounds"],
            warmup=spec["warmup"],
            **bench.fields(),
            inputs="synthetic (seeded random images and boxes)",
            **spec["heads"],
            **{f"env_{k}": v for k, v in env.items()},
        )
        records.append(rec)
    return records


def format_detector_table(records: list[dict]) -> str:
    """Markdown table of ``bench_detector`` records (time ratios: SPT time / dense time, lower is faster;
    backbone share: the dense backbone + FPN alone / the dense whole detector, same rounds)."""
    memory = any(r.get("train_peak_mem_mb") is not None for r in records)
    head = (
        "| model | detector | size | batch | select | keep | kept | backbone GMACs exec | train ms | infer ms "
        "| train t/dense | infer t/dense | backbone share train | backbone share infer | pos RoIs/img | det/img |"
    )
    lines = [head + (" train peak MB | infer peak MB |" if memory else "")]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for r in records:
        line = (
            f"| {r['model']} | {r['detector']} | {r['size']} | {r['batch_size']} | {r['select']} "
            f"| {r['keep_ratio']:.2f} | {r['kept_ratio_measured']:.3f} | {r['gmacs_executed']:.2f} "
            f"| {r['train_ms']:.0f} | {r['infer_ms']:.0f} | {r['train_ratio_to_dense']:.3f} "
            f"| {r['infer_ratio_to_dense']:.3f} | {r['backbone_share_train']:.3f} "
            f"| {r['backbone_share_infer']:.3f} | {r['train_positive_rois']:.1f} | {r['infer_detections']:.1f} |"
        )
        if memory:
            line += f" {r.get('train_peak_mem_mb') or 0:.0f} | {r.get('infer_peak_mem_mb') or 0:.0f} |"
        lines.append(line)
    return "\n".join(lines)
