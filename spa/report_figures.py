"""Figures for the demo report: pure functions of plain dicts/lists that write PNGs (matplotlib, Agg).

- ``plot_ap_vs_gmacs(sweep, dense, out)``: AP / AP50 vs backbone GMACs over a sweep of inference keep
  thresholds of one trained SPT model (kept-token and executed GMACs), the dense baseline as a point.
- ``plot_cost_vs_coverage(rows, out)``: backbone GMACs (executed) and ms per image vs scene coverage, per model.
- ``plot_keep_during_training(metrics, out)``: ``keep_obj_stageN`` / ``keep_bg_stageN`` vs step (smoothed),
  from a trainer's ``metrics.jsonl`` or its records.

Each raises a ``ValueError`` naming the problem when the input is empty or malformed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_ap_vs_gmacs", "plot_cost_vs_coverage", "plot_keep_during_training", "save_figure", "smooth"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _rows(rows: Any, keys: Sequence[str], name: str) -> list[Mapping[str, Any]]:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"{name} must be a non-empty list of dicts with keys {list(keys)}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{name}[{i}] must be a dict, got {type(row).__name__}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{name}[{i}] lacks key(s) {missing} (has {sorted(row)})")
    return list(rows)


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating parent folders) and close a matplotlib figure; returns the path written (a
    name without a suffix gets ``.png``, as matplotlib adds it). An existing folder is refused."""
    out = Path(out)
    if out.is_dir():
        raise NotADirectoryError(
            f"{out} is a folder; give the picture's file name (e.g. {out / 'figure.png'})"
        )
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


def _interval(row: Mapping[str, Any], key: str, what: str) -> tuple[float, float] | None:
    """``row[key]`` as a checked ``(lo, hi)`` interval, or None when absent."""
    ci = row.get(key)
    if ci is None:
        return None
    if isinstance(ci, (str, bytes)) or not isinstance(ci, Sequence) or len(ci) != 2:
        raise ValueError(f"{what} must be [lo, hi], got {ci!r}")
    lo, hi = _number(ci[0], what), _number(ci[1], what)
    if lo > hi:
        raise ValueError(f"{what} must have lo <= hi, got {ci!r}")
    return lo, hi


def _yerr(values: Sequence[float], intervals: Sequence[tuple[float, float] | None]):
    """Asymmetric error bars (matplotlib's ``yerr``) of intervals around values; None when none is given."""
    if all(ci is None for ci in intervals):
        return None
    low = [max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, intervals)]
    high = [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, intervals)]
    return [low, high]


def plot_ap_vs_gmacs(
    sweep: Sequence[Mapping[str, Any]],
    dense: Mapping[str, Any],
    out: str | Path,
    chosen: float | None = None,
) -> Path:
    """AP and AP50 vs backbone GMACs per image: one SPT model over inference keep thresholds vs dense.

    ``sweep``: ``[{"keep_threshold", "gmacs_kept", "gmacs_executed", "AP", "AP50"}, ...]``;
    ``dense``: ``{"gmacs", "AP", "AP50"}``. Left panel AP, right AP50; SPT drawn against executed GMACs
    (solid) and kept-token GMACs (dashed), each point labelled with its threshold. Optional ``"AP_ci95"`` /
    ``"AP50_ci95"`` (``[lo, hi]``) in the rows and in ``dense`` are drawn as error bars; ``chosen`` (a
    threshold of the sweep) is circled.
    """
    keys = ("keep_threshold", "gmacs_kept", "gmacs_executed", "AP", "AP50")
    rows = _rows(sweep, keys, "sweep")
    for i, row in enumerate(rows):
        for k in keys:
            _number(row[k], f"sweep[{i}][{k!r}]")
    if not isinstance(dense, Mapping) or any(k not in dense for k in ("gmacs", "AP", "AP50")):
        raise ValueError(f"dense must be a dict with keys ['gmacs', 'AP', 'AP50'], got {dense!r}")
    for k in ("gmacs", "AP", "AP50"):
        _number(dense[k], f"dense[{k!r}]")
    rows = sorted(rows, key=lambda r: r["gmacs_executed"])
    intervals = {
        metric: [
            _interval(r, f"{metric}_ci95", f"sweep[{i}][{metric + '_ci95'!r}]") for i, r in enumerate(rows)
        ]
        for metric in ("AP", "AP50")
    }
    dense_ci = {
        metric: _interval(dense, f"{metric}_ci95", f"dense[{metric + '_ci95'!r}]")
        for metric in ("AP", "AP50")
    }
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("AP", "AP50")):
        ap = [r[metric] for r in rows]
        executed = [r["gmacs_executed"] for r in rows]
        ax.plot(executed, ap, "o-", color="C0", label="SPT (executed GMACs)")
        yerr = _yerr(ap, intervals[metric])
        if yerr is not None:
            ax.errorbar(executed, ap, yerr=yerr, fmt="none", ecolor="C0", alpha=0.6, capsize=3,
                        label="SPT 95% interval")  # fmt: skip
        if chosen is not None:
            picked = [r for r in rows if r["keep_threshold"] == chosen]
            ax.plot([r["gmacs_executed"] for r in picked], [r[metric] for r in picked], "o", markersize=13,
                    markerfacecolor="none", markeredgecolor="C2", label=f"chosen t={chosen:g}")  # fmt: skip
        ax.plot(
            [r["gmacs_kept"] for r in rows], ap, "s--", color="C0", alpha=0.5, label="SPT (kept-token GMACs)"
        )
        for r in rows:
            ax.annotate(
                f"t={r['keep_threshold']:g}", (r["gmacs_executed"], r[metric]), fontsize=7,
                textcoords="offset points", xytext=(4, 4),
            )  # fmt: skip
        ax.plot([dense["gmacs"]], [dense[metric]], "*", color="C3", markersize=14, label="dense Swin")
        if dense_ci[metric] is not None:
            ax.errorbar([dense["gmacs"]], [dense[metric]], yerr=_yerr([dense[metric]], [dense_ci[metric]]),
                        fmt="none", ecolor="C3", capsize=4, label="dense 95% interval")  # fmt: skip
        ax.set_xlabel("backbone GMACs per image")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs backbone compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_cost_vs_coverage(rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Backbone cost vs scene coverage: executed GMACs and ms per image, one line per model; with
    ``"kept_stage3"`` in every row, a first panel of the stage-3 kept-token ratio.

    ``rows``: ``[{"coverage", "model", "gmacs_executed", "ms_per_image"[, "kept_stage3"]}, ...]``.
    """
    keys = ("coverage", "model", "gmacs_executed", "ms_per_image")
    rows = _rows(rows, keys, "rows")
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        for k in ("coverage", "gmacs_executed", "ms_per_image"):
            _number(row[k], f"rows[{i}][{k!r}]")
        if not isinstance(row["model"], str) or not row["model"]:
            raise ValueError(f"rows[{i}]['model'] must be a non-empty string, got {row['model']!r}")
        by_model.setdefault(row["model"], []).append(row)
    panels = [("gmacs_executed", "backbone GMACs per image"), ("ms_per_image", "ms per image")]
    if all("kept_stage3" in r for r in rows):
        for i, row in enumerate(rows):
            _number(row["kept_stage3"], f"rows[{i}]['kept_stage3']")
        panels.insert(0, ("kept_stage3", "stage-3 kept-token ratio"))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for model, points in by_model.items():
            points = sorted(points, key=lambda r: r["coverage"])
            ax.plot([p["coverage"] for p in points], [p[key] for p in points], "o-", label=model)
        ax.set_xlabel("scene coverage (fraction of the image inside objects)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("backbone cost vs scene coverage")
    return save_figure(fig, out)


def smooth(values: Sequence[float], alpha: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style); NaNs are skipped (kept as NaN)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(float("nan"))
            continue
        avg = alpha * avg + (1 - alpha) * float(v)
        weight = alpha * weight + (1 - alpha)
        out.append(avg / weight)
    return out


_KEEP_KEY = re.compile(r"^keep_(obj|bg)_stage(\d+)$")


def _load_metrics(metrics: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}")
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not JSON: {err}") from err
            records.append(record)
        metrics = records
    if isinstance(metrics, (bytes, Mapping)) or not isinstance(metrics, Sequence):
        raise ValueError("metrics must be a metrics.jsonl path or a list of record dicts")
    if not all(isinstance(r, Mapping) for r in metrics):
        raise ValueError("every metrics record must be a dict")
    return list(metrics)


def plot_keep_during_training(
    metrics: str | Path | Sequence[Mapping[str, Any]], out: str | Path, alpha: float = 0.8
) -> Path:
    """Kept-token ratio on object (solid) and background (dashed) tokens per SPA stage vs training step.

    ``metrics``: a trainer's ``metrics.jsonl`` path or its records (each with ``step`` and
    ``keep_obj_stageN`` / ``keep_bg_stageN``); lines are smoothed (EMA ``alpha``), raw values drawn faintly.
    """
    records = _load_metrics(metrics)
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i, record in enumerate(records):
        keys = [k for k in record if _KEEP_KEY.match(k)]
        if not keys:
            continue
        if "step" not in record:
            raise ValueError(f"metrics record {i} has keep ratios but no 'step'")
        step = _number(record["step"], f"record {i} 'step'")
        for k in keys:
            kind, stage = _KEEP_KEY.match(k).groups()
            value = record[k]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                value = float("nan")  # no object (or background) token in that batch
            else:
                value = _number(value, f"record {i} {k!r}")
            series.setdefault((kind, int(stage)), []).append((step, value))
    if not series:
        raise ValueError(
            "no keep_obj_stageN / keep_bg_stageN values in the metrics (was the backbone an SPT?)"
        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = sorted({stage for _, stage in series})
    for (kind, stage), points in sorted(series.items()):
        points.sort()
        steps, values = [p[0] for p in points], [p[1] for p in points]
        color = f"C{stages.index(stage)}"
        style = "-" if kind == "obj" else "--"
        name = "object" if kind == "obj" else "background"
        ax.plot(steps, values, style, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth(values, alpha), style, color=color, label=f"stage {stage}, {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("kept-token ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("tokens kept during training (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)
