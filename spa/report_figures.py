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
    """Lay out, write (creating parent folders) and close a matplotlib figure; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


def plot_ap_vs_gmacs(sweep: Sequence[Mapping[str, Any]], dense: Mapping[str, Any], out: str | Path) -> Path:
    """AP and AP50 vs backbone GMACs per image: one SPT model over inference keep thresholds vs dense.

    ``sweep``: ``[{"keep_threshold", "gmacs_kept", "gmacs_executed", "AP", "AP50"}, ...]``;
    ``dense``: ``{"gmacs", "AP", "AP50"}``. Left panel AP, right AP50; SPT drawn against executed GMACs
    (solid) and kept-token GMACs (dashed), each point labelled with its threshold.
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
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("AP", "AP50")):
        ap = [r[metric] for r in rows]
        ax.plot([r["gmacs_executed"] for r in rows], ap, "o-", color="C0", label="SPT (executed GMACs)")
        ax.plot(
            [r["gmacs_kept"] for r in rows], ap, "s--", color="C0", alpha=0.5, label="SPT (kept-token GMACs)"
        )
        for r in rows:
            ax.annotate(
                f"t={r['keep_threshold']:g}", (r["gmacs_executed"], r[metric]), fontsize=7,
                textcoords="offset points", xytext=(4, 4),
            )  # fmt: skip
        ax.plot([dense["gmacs"]], [dense[metric]], "*", color="C3", markersize=14, label="dense Swin")
        ax.set_xlabel("backbone GMACs per image")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs backbone compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_cost_vs_coverage(rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Backbone cost vs scene coverage: executed GMACs (left) and ms per image (right), one line per model.

    ``rows``: ``[{"coverage", "model", "gmacs_executed", "ms_per_image"}, ...]``.
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
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(
        axes, ("gmacs_executed", "ms_per_image"), ("backbone GMACs per image", "ms per image")
    ):
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
