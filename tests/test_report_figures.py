"""Report figure helpers: each writes a non-empty PNG and rejects empty or malformed input."""

from __future__ import annotations

import json
import math

import pytest

from spa.report_figures import plot_ap_vs_gmacs, plot_cost_vs_coverage, plot_keep_during_training, smooth

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = [
    {"keep_threshold": t, "gmacs_kept": g * 0.9, "gmacs_executed": g, "AP": ap, "AP50": ap + 0.2}
    for t, g, ap in [(0.1, 1.2, 0.30), (0.3, 0.9, 0.28), (0.5, 0.6, 0.2)]
]
DENSE = {"gmacs": 1.0, "AP": 0.29, "AP50": 0.5}
COVERAGE = [
    {"coverage": c, "model": m, "gmacs_executed": g, "ms_per_image": 10 * g}
    for m, base in (("spt_nano", 0.5), ("swin_nano", 1.0))
    for c, g in ((0.1, base), (0.3, base + (0.2 if m.startswith("spt") else 0.0)))
]


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_ap_vs_gmacs(tmp_path):
    assert _is_png(plot_ap_vs_gmacs(SWEEP, DENSE, tmp_path / "a" / "ap.png"))
    with pytest.raises(ValueError, match="non-empty"):
        plot_ap_vs_gmacs([], DENSE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks key"):
        plot_ap_vs_gmacs([{"keep_threshold": 0.3, "AP": 0.1}], DENSE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite number"):
        plot_ap_vs_gmacs([{**SWEEP[0], "AP": "high"}], DENSE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="dense"):
        plot_ap_vs_gmacs(SWEEP, {"gmacs": 1.0}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cost_vs_coverage(tmp_path):
    assert _is_png(plot_cost_vs_coverage(COVERAGE, tmp_path / "cov.png"))
    with pytest.raises(ValueError, match="non-empty"):
        plot_cost_vs_coverage("rows", tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be a dict"):
        plot_cost_vs_coverage([1, 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="model"):
        plot_cost_vs_coverage([{**COVERAGE[0], "model": ""}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite"):
        plot_cost_vs_coverage([{**COVERAGE[0], "coverage": float("nan")}], tmp_path / "x.png")


def test_keep_during_training_from_jsonl_and_records(tmp_path):
    records = [
        {"step": s, "loss": 1.0 / s, "keep_obj_stage3": 0.9, "keep_bg_stage3": 0.5 - s / 100,
         "keep_obj_stage4": float("nan") if s == 3 else 0.8, "keep_bg_stage4": 0.4}
        for s in range(1, 21)
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN is written as NaN (json allows it)
    assert _is_png(plot_keep_during_training(path, tmp_path / "keep.png"))
    assert _is_png(plot_keep_during_training(records, tmp_path / "keep2.png"))
    with pytest.raises(ValueError, match="no keep_obj"):
        plot_keep_during_training([{"step": 1, "loss": 0.3}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no keep_obj"):
        plot_keep_during_training([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no 'step'"):
        plot_keep_during_training([{"keep_obj_stage3": 0.5}], tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        plot_keep_during_training(bad, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_keep_during_training(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_smooth():
    assert smooth([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
    out = smooth([0.0, float("nan"), 1.0], alpha=0.5)
    assert out[0] == 0.0 and math.isnan(out[1]) and 0.0 < out[2] < 1.0
    with pytest.raises(ValueError):
        smooth([1.0], alpha=1.0)


def test_ap_vs_gmacs_error_bars_and_chosen_threshold(tmp_path):
    sweep = [{**row, "AP_ci95": [row["AP"] - 0.05, row["AP"] + 0.04], "AP50_ci95": [row["AP50"] - 0.1, row["AP50"]]}
             for row in SWEEP]  # fmt: skip
    dense = {**DENSE, "AP_ci95": [0.25, 0.33], "AP50_ci95": [0.45, 0.55]}
    plain = plot_ap_vs_gmacs(SWEEP, DENSE, tmp_path / "plain.png")
    bars = plot_ap_vs_gmacs(sweep, dense, tmp_path / "bars.png", chosen=0.3)
    assert _is_png(bars) and bars.read_bytes() != plain.read_bytes()  # the bars are drawn
    with pytest.raises(ValueError, match=r"\[lo, hi\]"):
        plot_ap_vs_gmacs([{**sweep[0], "AP_ci95": [0.1]}], dense, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lo <= hi"):
        plot_ap_vs_gmacs(sweep, {**dense, "AP50_ci95": [0.6, 0.5]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite"):
        plot_ap_vs_gmacs([{**sweep[0], "AP_ci95": [0.1, float("nan")]}], dense, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cost_vs_coverage_with_kept_ratio_panel(tmp_path):
    rows = [
        {**row, "kept_stage3": 1.0 if row["model"] == "swin_nano" else 0.2 + row["coverage"]}
        for row in COVERAGE
    ]
    with_kept = plot_cost_vs_coverage(rows, tmp_path / "kept.png")
    assert _is_png(with_kept)
    from PIL import Image

    assert (
        Image.open(with_kept).size[0]
        > Image.open(plot_cost_vs_coverage(COVERAGE, tmp_path / "two.png")).size[0]
    )
    with pytest.raises(ValueError, match="kept_stage3"):
        plot_cost_vs_coverage([{**rows[0], "kept_stage3": "most"}, *rows[1:]], tmp_path / "x.png")
