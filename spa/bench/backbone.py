"""``spa bench backbone``: whole backbones, SPT against its dense Swin baseline.

Method: whole ``features_only`` backbones (``spa.models.create_backbone``: SPT variants and their dense timm Swin
baselines of the same width, random weights, drop path off) on random images.

- Timing: one worker process per (size, batch size) (``python -m spa.bench _worker``, see ``_worker_main``)
  builds every model once, then times all configurations (dense and SPT, train step and inference) in the
  same interleaved, shuffled rounds as ``bench block`` (``spa.bench.timing``), after ``warmup`` calls each.
  A train step is forward + backward of the backbone alone with the loss ``sum`` of every output map
  (``zero_grad`` included, no optimizer); inference is a forward under ``torch.inference_mode`` in eval mode. ``*_img_s`` = batch / median time;
  ``train_ratio_to_dense`` / ``infer_ratio_to_dense`` = median over rounds of (this configuration's time /
  the dense baseline's time in the same round): a TIME ratio, below 1 means faster than dense. Dense
  records have ratio 1.0. SPT configurations switch ``select``/``keep_ratio``/``layout`` on the same model
  (same weights) before each call.
- Cost: ``spa.flops.count_macs`` on the same batch in eval mode (GMACs per image, kept-token and executed),
  with ``gmacs_*_ratio_to_dense``; ``kept_ratio_measured`` is the mean kept fraction over SPA blocks.
- Memory: every configuration once more in its own short worker process (build, one inference pass, one
  train step); ``peak_rss_mb`` is that process's ``ru_maxrss`` (so it includes Python + torch; ``base_rss_mb`` is
  the peak after the imports, ``peak_rss_delta_mb`` the difference), ``infer_peak_rss_mb`` the peak after inference only.
- Configurations: ``select='topk'`` at forced keep ratios (default 1.0/0.5/0.3/0.2) for each layout
  (``containers``, and ``stream``/``padded``/``masked`` as peer baselines), at the SPT's own depths or at each
  of ``spt_depths`` (e.g. Swin-T's 2-2-6-2 for ``spt_tiny`` instead of the spec's 2-2-10-2: records say
  ``depths``, None for a model's own; the dense baseline keeps its depths); ``select='gate'`` (the trained
  gate, ``keep_ratio`` = measured kept fraction) for the backbone of a detection checkpoint
  (``--checkpoint``); ``select='dense'``, ``layout='dense'`` for the timm Swin baselines.
- Inputs: random normal images, or ``--images`` (files/folders, cycled to fill the batch, resized to the size,
  ImageNet-normalized) so that a trained gate sees real scenes; records say which (``inputs``).
- Device and precision (``spa.bench.timing.BenchDevice``): ``device='cuda'`` times with CUDA events after a
  synchronisation; ``amp='bf16'`` runs train steps and inference under bf16 autocast (GMACs are counted
  without). On CUDA the peak-RSS processes are not run (host RSS says little there); instead
  ``train_peak_mem_mb`` / ``infer_peak_mem_mb`` = ``torch.cuda.max_memory_allocated`` during one step in the
  timing worker (every model of the worker resident; ``*_peak_mem_delta_mb`` subtracts what was allocated
  before the step). ``backend``: the SPA blocks' attention backend(s); several are timed in the same rounds.
  ``compile=True``: every model, the dense baselines too, goes through ``spa.compile.compile_model``, one
  compiled copy (same weights) per configuration so that switching configurations never recompiles; timm's dense
  blocks (all of Swin's, stages 1-2 of an SPT) with static sizes (``dense_static=True``: the input size is
  fixed here), which records say with ``compiled_dense_static``.
  Records carry ``device``, ``amp``, ``backend``, ``compiled`` and ``env_*`` (GPU name, versions).
- Stages (``stage_times=True``): every timed inference call also times each stage of the backbone (forward
  pre/post hooks on ``model.layers[i]``; on CUDA a synchronisation at each stage boundary, which the whole-call
  times then include); ``infer_stage_ms`` is the per-stage median over rounds and
  ``infer_stage_ratio_to_dense`` the median over rounds of (stage time / the dense baseline's same stage in
  the same round). The patch embedding and the feature-map outputs are outside every stage.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spa.attention import BACKENDS
from spa.bench.timing import (
    DENORMAL_MODES,
    BenchDevice,
    check_timed_denormals,
    median_ratio,
    pass_fields,
    set_denormals,
)
from spa.errors import ConfigError
from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS

__all__ = ["REQUIRED_KEYS", "SPT_KEEP_RATIOS", "bench_backbone", "format_backbone_table"]

SPT_KEEP_RATIOS = (1.0, 0.5, 0.3, 0.2)
REQUIRED_KEYS = (
    "model", "size", "batch_size", "select", "keep_ratio", "layout", "gmacs_kept", "gmacs_executed",
    "train_img_s", "infer_img_s", "peak_rss_mb", "train_ratio_to_dense", "infer_ratio_to_dense",
)  # fmt: skip


def _backbone_configs(
    models: Sequence[str],
    keep_ratios: Sequence[float],
    layouts: Sequence[str],
    checkpoint: str | None,
    checkpoint_model: str | None,
    backends: Sequence[str] = ("auto",),
    keep_threshold: float | None = None,
    spt_depths: Sequence[tuple[int, ...] | None] = (None,),
) -> list[dict]:
    """Configurations to time in one (size, batch) worker; every SPT width gets its dense baseline. SPT
    configurations run for every attention backend of ``backends`` and every depth tuple of ``spt_depths``
    (None: the model's own); dense ones have ``backend`` and ``depths`` None."""
    from spa.models import dense_baseline_of, is_spt_name, list_backbones

    configs: list[dict] = []
    dense: list[str] = []
    for name in models:
        if name not in list_backbones():
            raise ConfigError(f"unknown backbone {name!r}; choose from {list_backbones()}")
        if is_spt_name(name):
            for depths in spt_depths:
                for backend in backends:
                    for layout in layouts:
                        for ratio in keep_ratios:
                            configs.append(
                                {"model": name, "select": "topk", "keep_ratio": float(ratio), "layout": layout,
                                 "backend": backend, "depths": None if depths is None else list(depths)}
                            )  # fmt: skip
        if dense_baseline_of(name) not in dense:
            dense.append(dense_baseline_of(name))
    if checkpoint:
        for backend in backends:
            for layout in layouts:
                configs.append(
                    {"model": checkpoint_model, "select": "gate", "keep_ratio": None, "layout": layout,
                     "checkpoint": str(checkpoint), "backend": backend, "keep_threshold": keep_threshold}
                )  # fmt: skip
        if dense_baseline_of(checkpoint_model) not in dense:
            dense.append(dense_baseline_of(checkpoint_model))
    configs = [
        {"model": d, "select": "dense", "keep_ratio": 1.0, "layout": "dense", "backend": None} for d in dense
    ] + configs
    for cfg in configs:
        cfg.setdefault("checkpoint", None)
        cfg.setdefault("keep_threshold", None)
        cfg.setdefault("depths", None)
        cfg["dense_model"] = dense_baseline_of(cfg["model"])
    return configs


def _build_backbone(cfg: dict, size: int) -> nn.Module:
    from spa.models import create_backbone

    if cfg.get("checkpoint"):
        from spa.tasks.base import load_model

        body = load_model(cfg["checkpoint"], task="detect")[0].backbone.body
        if cfg.get("keep_threshold") is not None:  # else: the threshold stored in the checkpoint
            from spa.gate import set_keep_threshold

            set_keep_threshold(body, cfg["keep_threshold"])
        return body
    options = {} if cfg["select"] == "dense" else {"select": "topk", "keep_ratio": cfg["keep_ratio"]}
    if cfg.get("depths") is not None:
        options["depths"] = tuple(cfg["depths"])
    return create_backbone(cfg["model"], features_only=True, img_size=size, drop_path_rate=0.0, **options)


def _configure(model: nn.Module, cfg: dict) -> None:
    """Switch every SPA block of ``model`` to the configuration's selection mode and layout."""
    if cfg["select"] == "dense":
        return
    for block in model.modules():
        if isinstance(block, SPABlock):
            block.layout = cfg["layout"]
            if cfg.get("backend"):
                block.attn.backend = cfg["backend"]
            if cfg["select"] == "topk":
                block.gate.select, block.gate.keep_ratio = "topk", cfg["keep_ratio"]


def _train_step(model: nn.Module, x: torch.Tensor, bench: BenchDevice | None = None) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    with bench.autocast() if bench else nullcontext():
        outs = model(x)
    loss = sum(o.float().sum() for o in outs)
    loss.backward()


def _infer_step(model: nn.Module, x: torch.Tensor, bench: BenchDevice | None = None) -> None:
    model.eval()
    with torch.inference_mode(), bench.autocast() if bench else nullcontext():
        model(x)


class _StageClock:
    """Per-stage times of the inference calls of the configurations that ``start`` them: forward pre/post hooks
    on each stage of each model (``attach`` once per model); ``sync`` before every clock reading (CUDA)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.current: list[float] | None = None  # the stage times of the call in progress
        self.calls: dict[int, list[list[float]]] = {}  # configuration -> per call, per stage (ms)
        self._attached: set[int] = set()

    def attach(self, model: nn.Module) -> None:
        if id(model) in self._attached:
            return
        self._attached.add(id(model))
        for i, stage in enumerate(_stages(model)):
            stage.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            stage.register_forward_hook(lambda _m, _a, _o, i=i: self._leave(i))

    def _enter(self, i: int) -> None:
        if self.current is not None:
            self.sync()
            self.current[i] = -time.perf_counter()

    def _leave(self, i: int) -> None:
        if self.current is not None:
            self.sync()
            self.current[i] = (self.current[i] + time.perf_counter()) * 1e3

    def timed(self, index: int, model: nn.Module, run: Callable[[], None]) -> Callable[[], None]:
        """``run``, recording the stage times of each call under configuration ``index``."""
        count = len(_stages(model))

        def call() -> None:
            self.current = [0.0] * count
            try:
                run()
            finally:
                self.calls.setdefault(index, []).append(self.current)
                self.current = None

        return call


def _stages(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The stages of a ``features_only`` backbone (SPT or timm Swin): ``model.model.layers``."""
    inner = getattr(model, "model", model)
    stages = getattr(inner, "layers", None)
    if not isinstance(stages, (nn.Sequential, nn.ModuleList)):
        raise ConfigError(f"stage times need a backbone with .layers stages, got {type(model).__name__}")
    return stages


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _inputs(spec: dict) -> torch.Tensor:
    """The benchmark batch: random normal images, or ``spec["images"]`` (files, cycled) resized to the size
    and normalized with ImageNet mean/std as the detectors do."""
    size, batch = spec["size"], spec["batch_size"]
    paths = spec.get("images") or []
    if not paths:
        return torch.randn(batch, 3, size, size)
    from spa.viz import _load_image

    images = [_load_image(Path(paths[i % len(paths)])) for i in range(batch)]
    x = torch.stack([F.interpolate(im[None], size=(size, size), mode="bilinear")[0] for im in images])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _worker_time(spec: dict, progress: Callable[[str], None]) -> dict:
    """Time every configuration of one (size, batch), interleaved; GMACs, kept ratios and (CUDA) peak memory
    on the way. Returns ``{"results": [...], "environment": {...}}``."""
    from spa.flops import count_macs

    size, batch = spec["size"], spec["batch_size"]
    bench = BenchDevice.resolve(spec.get("device", "cpu"), spec.get("amp", "off"))
    torch.manual_seed(spec.get("seed", 0))
    x = _inputs(spec).to(bench.device)
    models: dict[tuple, nn.Module] = {}
    results: list[dict] = []
    runs: dict[tuple[int, str], Callable[[], None]] = {}
    stages = _StageClock(bench.sync) if spec.get("stage_times") else None
    for i, cfg in enumerate(spec["configs"]):
        depths = tuple(cfg["depths"]) if cfg.get("depths") is not None else None
        key = (cfg["model"], cfg["select"] == "dense", cfg.get("checkpoint"), depths)
        if key not in models:
            models[key] = _build_backbone(cfg, size).to(bench.device)
        model = models[key]
        _configure(model, cfg)
        model.eval()
        macs = count_macs(model, x)
        selections = getattr(model, "last_selections", []) if cfg["select"] != "dense" else []
        kept = float(torch.stack([s.keep_ratio.mean() for s in selections]).mean()) if selections else 1.0
        res = {
            "gmacs_kept": round(macs.kept, 4),
            "gmacs_executed": round(macs.executed, 4),
            "kept_ratio_measured": round(kept, 4),
        }
        timed_model = model
        if spec.get("compile"):  # a compiled copy per configuration: its graph never sees another setting
            from spa.compile import compile_model

            timed_model = compile_model(
                copy.deepcopy(model) if cfg["select"] != "dense" else model, dense_static=True
            )

        def run(step: Callable, model: nn.Module = timed_model, cfg: dict = cfg) -> Callable[[], None]:
            return lambda: (_configure(model, cfg), step(model, x, bench))

        runs[(i, "train_ms")] = run(_train_step)
        runs[(i, "infer_ms")] = run(_infer_step)
        if stages is not None:
            stages.attach(timed_model)
            runs[(i, "infer_ms")] = stages.timed(i, timed_model, runs[(i, "infer_ms")])
        if bench.is_cuda:
            res.update({f"train_{k}": v for k, v in bench.peak_memory(runs[(i, "train_ms")]).items()})
            res.update({f"infer_{k}": v for k, v in bench.peak_memory(runs[(i, "infer_ms")]).items()})
        results.append(res)
    say = lambda msg: progress(f"size {size} batch {batch}: {msg}")  # noqa: E731
    times = bench.rounds(runs, spec["rounds"], spec["warmup"], spec.get("seed", 0), say)
    for (i, key), ms in times.items():
        results[i][key] = ms
    if stages is not None:  # the timed rounds are each configuration's last calls (after its warm-up)
        for i, calls in stages.calls.items():
            results[i]["stage_rounds_ms"] = [list(ms) for ms in zip(*calls[-spec["rounds"] :])]
    return {"results": results, "environment": bench.environment()}


def _worker_memory(spec: dict) -> dict:
    """Peak RSS of one configuration: after imports, after an inference pass, after a train step."""
    cfg, size = spec["config"], spec["size"]
    base = _rss_mb()
    torch.manual_seed(spec.get("seed", 0))
    model = _build_backbone(cfg, size)
    _configure(model, cfg)
    x = _inputs(spec)
    _infer_step(model, x)
    infer = _rss_mb()
    _train_step(model, x)
    peak = _rss_mb()
    return {
        "base_rss_mb": round(base, 1),
        "infer_peak_rss_mb": round(infer, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_delta_mb": round(peak - base, 1),
    }


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m spa.bench _worker SPEC.json OUT.json``: one measurement process of ``bench backbone`` (or
    of ``bench detector``: ``mode`` ``"detector"``, see ``spa.bench.detector``)."""
    spec = json.loads(Path(argv[0]).read_text())
    # first: torch's CPU threads copy this thread's denormal setting when they start
    set_denormals(spec.get("denormals", "flush"))
    torch.set_num_threads(spec.get("threads", 2))
    if spec["mode"] == "detector":
        from spa.bench.detector import _worker_time as detector_time

        result: object = detector_time(spec, lambda msg: print(f"[bench detector] {msg}", flush=True))
    elif spec["mode"] == "time":
        result = _worker_time(spec, lambda msg: print(f"[bench backbone] {msg}", flush=True))
    else:
        result = _worker_memory(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def _run_worker(spec: dict, workdir: Path, name: str, quiet: bool = False) -> object:
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    threads = str(spec.get("threads", 2))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [sys.executable, "-m", "spa.bench", "_worker", str(spec_path), str(out_path)]
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def bench_backbone(
    models: Sequence[str] = ("spt_tiny", "swin_tiny"),
    sizes: Sequence[int] = (224, 512),
    batch_sizes: Sequence[int] = (1, 8),
    keep_ratios: Sequence[float] = SPT_KEEP_RATIOS,
    layouts: Sequence[str] = LAYOUTS,
    checkpoint: str | Path | None = None,
    images: Sequence[str | Path] | None = None,
    rounds: int = 5,
    warmup: int = 1,
    threads: int = 2,
    memory: bool = True,
    seed: int = 0,
    device: str = "cpu",
    amp: str = "off",
    backend: str | Sequence[str] = "auto",
    compile: bool = False,
    keep_threshold: float | None = None,
    stage_times: bool = False,
    denormals: str = "flush",
    spt_depths: Sequence[Sequence[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Benchmark whole backbones (``features_only`` SPT vs timm Swin of the same width); see the module docstring.

    Returns one record per (model, size, batch size, select, keep ratio, layout, backend) with GMACs (kept and
    executed), train-step and inference images/s, peak memory (RSS on CPU, allocated GPU memory on CUDA), the
    time ratios to the dense baseline, the device, AMP mode and environment (``env_*``). ``keep_threshold``:
    the inference keep threshold of the checkpoint's gate (default: the one stored in the checkpoint).
    ``stage_times``: also ``infer_stage_ms`` / ``infer_stage_ratio_to_dense`` per stage (module docstring).
    ``denormals``: ``flush`` (default) or ``keep`` float32 denormals in the timed processes (``set_denormals``:
    timm's shifted windows make denormals on CPU, SPA blocks do not; records say ``env_flush_denormal``).
    ``spt_depths``: time every forced-keep-ratio SPT configuration at each of these stage depths (e.g.
    ``[(2, 2, 6, 2)]``) instead of the model's own (a checkpoint's gate keeps its own); records say ``depths``.
    """
    import tempfile

    say = progress or (lambda msg: None)
    bench = BenchDevice.resolve(device, amp)
    backends = [backend] if isinstance(backend, str) else list(backend)
    for name, values in (("layouts", layouts), ("keep_ratios", keep_ratios), ("backends", backends)):
        if not values:
            raise ConfigError(f"{name} must not be empty")
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad:
        raise ConfigError(f"unknown layout(s) {bad}; choose from {LAYOUTS}")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    if any(not 0.0 < r <= 1.0 for r in keep_ratios):
        raise ConfigError(f"keep ratios must be in (0, 1], got {list(keep_ratios)}")
    if not sizes or not batch_sizes or any(s < 32 for s in sizes) or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"need sizes >= 32 and batch sizes >= 1, got {list(sizes)} and {list(batch_sizes)}")
    if rounds < 1 or warmup < 0:
        raise ConfigError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if denormals not in DENORMAL_MODES:
        raise ConfigError(f"denormals must be one of {DENORMAL_MODES}, got {denormals!r}")
    if keep_threshold is not None and (checkpoint is None or not 0.0 < keep_threshold < 1.0):
        raise ConfigError(f"keep_threshold needs a checkpoint and must be in (0, 1), got {keep_threshold}")
    depth_options = _check_spt_depths(models, spt_depths)
    checkpoint_model = None
    if checkpoint is not None:
        from spa.engine.checkpoint import load_checkpoint

        meta = load_checkpoint(checkpoint).get("meta") or {}
        if "detector" not in meta:
            raise ConfigError(
                f"{checkpoint} is a {meta.get('task', 'non-detection')!r} checkpoint; --checkpoint takes a "
                "detection checkpoint (its backbone's trained gate)"
            )
        checkpoint_model = meta["detector"]["model"]
        from spa.models import is_spt_name

        if not is_spt_name(checkpoint_model):
            raise ConfigError(f"{checkpoint} holds a dense {checkpoint_model}; a trained SPT gate is needed")
    image_paths: list[str] = []
    if images:
        from spa.viz import _image_paths

        image_paths = [str(p) for p in _image_paths([str(i) for i in images])]
    configs = _backbone_configs(
        models, keep_ratios, layouts, checkpoint, checkpoint_model, backends, keep_threshold, depth_options
    )
    load = round(os.getloadavg()[0], 2)  # other work on the machine makes timings noisy
    rss_memory = memory and not bench.is_cuda  # on CUDA the timing worker records GPU peak memory instead
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="spa-bench-") as tmp:
        workdir = Path(tmp)
        for size in sizes:
            for batch in batch_sizes:
                say(f"size {size} batch {batch}: timing {len(configs)} configurations in one process")
                common = {
                    "size": size, "batch_size": batch, "threads": threads, "seed": seed, "denormals": denormals
                }  # fmt: skip
                common["images"] = image_paths
                spec = {
                    **common, "mode": "time", "configs": configs, "rounds": rounds, "warmup": warmup,
                    "device": str(bench.device), "amp": bench.amp, "compile": compile,
                    "stage_times": stage_times,
                }  # fmt: skip
                out = _run_worker(spec, workdir, f"time-{size}-{batch}")
                check_timed_denormals(out["environment"], denormals, "bench backbone")
                rss: list[dict] = []
                for i, cfg in enumerate(configs):
                    if rss_memory:
                        say(f"size {size} batch {batch}: peak memory {i + 1}/{len(configs)}")
                        rss.append(
                            _run_worker({**common, "mode": "memory", "config": cfg}, workdir, f"mem-{i}")
                        )
                    else:
                        rss.append(dict.fromkeys(_RSS_KEYS))
                records += _records(configs, out, rss, spec, bench, load, image_paths)
    return records


def _check_spt_depths(
    models: Sequence[str], spt_depths: Sequence[Sequence[int]] | None
) -> list[tuple[int, ...] | None]:
    """``bench_backbone``'s ``spt_depths`` as the depth options of its SPT configurations (``[None]``: the
    models' own); a ``ConfigError`` for an empty list, a non-positive depth, a stage count an SPT model of
    ``models`` does not have, or no SPT model to apply them to."""
    if spt_depths is None:
        return [None]
    from spa.models import create_backbone, is_spt_name, list_backbones

    if any(m not in list_backbones() for m in models):
        return [None]  # _backbone_configs names the unknown model
    depths = [tuple(d) for d in spt_depths]
    spt = [m for m in models if is_spt_name(m)]
    if not depths or not spt:
        raise ConfigError(
            f"spt_depths needs SPT models and at least one depth tuple, got {depths} for {models}"
        )
    for d in depths:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in d):
            raise ConfigError(f"spt_depths: every stage needs a whole number of blocks >= 1, got {d}")
        for name in spt:
            try:  # the model's own check (one depth per stage), on the meta device: no weights made
                with torch.device("meta"):
                    create_backbone(name, num_classes=0, depths=d)
            except ValueError as err:
                raise ConfigError(f"spt_depths {d} for {name}: {err}") from None
    return depths


_RSS_KEYS = ("base_rss_mb", "infer_peak_rss_mb", "peak_rss_mb", "peak_rss_delta_mb")


def _config_records(configs: list[dict], timed: list[dict]) -> Iterator[tuple[int, int, dict]]:
    """Per configuration of one timing worker: its index, the index of its dense baseline, and its record
    so far (the configuration; a trained gate's ``keep_ratio`` = its measured kept fraction)."""
    dense_at = {c["model"]: i for i, c in enumerate(configs) if c["select"] == "dense"}
    for i, cfg in enumerate(configs):
        rec = dict(cfg)
        if rec["keep_ratio"] is None:
            rec["keep_ratio"] = timed[i]["kept_ratio_measured"]
        yield i, dense_at[cfg["dense_model"]], rec


def _records(
    configs: list[dict],
    out: dict,
    rss: list[dict],
    spec: dict,
    bench: BenchDevice,
    load: float,
    image_paths: Sequence[str],
) -> list[dict]:
    """The records of one timing worker's results (medians, img/s, ratios to dense, memory, environment)."""
    timed, batch = out["results"], spec["batch_size"]
    env = {**out["environment"], "threads": spec["threads"], "load_avg_1m": load}
    records = []
    for i, dense, rec in _config_records(configs, timed):
        res, ref = timed[i], timed[dense]
        dense_rss = rss[dense]["peak_rss_mb"]
        rec.update(
            size=spec["size"],
            batch_size=batch,
            **{k: v for k, v in res.items() if not k.endswith("_ms")},
            **_stage_fields(res, ref),
            gmacs=res["gmacs_executed"],
            **pass_fields(res, ref, ("train", "infer"), batch),
            gmacs_kept_ratio_to_dense=round(res["gmacs_kept"] / ref["gmacs_kept"], 4),
            gmacs_executed_ratio_to_dense=round(res["gmacs_executed"] / ref["gmacs_executed"], 4),
            **rss[i],
            peak_rss_ratio_to_dense=(
                round(rss[i]["peak_rss_mb"] / dense_rss, 4) if rss[i]["peak_rss_mb"] and dense_rss else None
            ),
            rounds=spec["rounds"],
            **bench.fields(),
            compiled=bool(spec.get("compile")),
            compiled_dense_static=bool(spec.get("compile")),
            inputs=f"{len(image_paths)} image files" if image_paths else "random normal",
            **{f"env_{k}": v for k, v in env.items()},
        )
        records.append(rec)
    return records


def _stage_fields(res: dict, ref: dict) -> dict:
    """``infer_stage_ms`` (median per stage) and ``infer_stage_ratio_to_dense`` (per-round ratios to the dense
    baseline's same stage, median), when the stages were timed."""
    mine, dense = res.get("stage_rounds_ms"), ref.get("stage_rounds_ms")
    if mine is None or dense is None:
        return {}
    if len(mine) != len(dense):  # a different stage count has no stage-by-stage reference
        ratios = [None] * len(mine)
    else:
        ratios = [round(median_ratio(m, d), 3) for m, d in zip(mine, dense)]
    return {
        "infer_stage_ms": [round(statistics.median(m), 3) for m in mine],
        "infer_stage_ratio_to_dense": ratios,
    }


def format_backbone_table(records: list[dict]) -> str:
    """Markdown table of ``bench_backbone`` records (time ratios: SPT time / dense time, lower is faster); a
    backend column when several backends were timed, a depths column with ``spt_depths``, GPU peak memory
    (train step) on CUDA."""
    backends = len({r.get("backend") for r in records if r["select"] != "dense"}) > 1
    gpu = any(r.get("train_peak_mem_mb") is not None for r in records)
    depth_column = any(r.get("depths") for r in records)  # spt_depths: the depths each row ran at
    head = "| model |" + (" depths |" if depth_column else "") + " size | batch | select | keep | layout |"
    head += " backend |" if backends else ""
    head += " GMACs kept | GMACs exec | train img/s | infer img/s | train t/dense | infer t/dense |"
    head += " train peak GPU MB | infer peak GPU MB |" if gpu else " peak RSS MB |"
    stages = any(r.get("infer_stage_ratio_to_dense") for r in records)
    head += " infer t/dense per stage |" if stages else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if gpu:
            memory = f" {r.get('train_peak_mem_mb') or 0:.0f} | {r.get('infer_peak_mem_mb') or 0:.0f} |"
        else:
            memory = " " + ("" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}") + " |"
        depths = "-".join(map(str, r["depths"])) if r.get("depths") else "default"
        lines.append(
            f"| {r['model']} |"
            + (f" {depths} |" if depth_column else "")
            + f" {r['size']} | {r['batch_size']} | {r['select']} | {r['keep_ratio']:.2f} "
            f"| {r['layout']} |"
            + (f" {r.get('backend') or 'timm'} |" if backends else "")
            + f" {r['gmacs_kept']:.3f} | {r['gmacs_executed']:.3f} | {r['train_img_s']:.2f} "
            f"| {r['infer_img_s']:.2f} | {r['train_ratio_to_dense']:.3f} | {r['infer_ratio_to_dense']:.3f} |"
            + memory
            + (f" {_per_stage(r.get('infer_stage_ratio_to_dense'))} |" if stages else "")
        )
    return "\n".join(lines)


def _per_stage(ratios: Sequence[float | None] | None) -> str:
    return " / ".join("-" if v is None else f"{v:.3f}" for v in ratios or ())
