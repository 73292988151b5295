from __future__ import annotations

import json

from spa.demo import DemoConfig, render_report, run_demo


def test_demo_writes_report_and_figures(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), data_dir=str(tmp_path / "data" / "builtin"), img_size=96, train_images=4,
        val_images=2, steps=2, batch_size=2, thresholds=(0.3, 0.8), coverages=(0.05, 0.6), coverage_images=1,
        timing_rounds=1, bench_backbone=False,
    )  # fmt: skip
    report = run_demo(cfg)
    out = tmp_path / "demo"
    for name in ("report.md", "report.json", "ap_vs_gmacs.png", "cost_vs_coverage.png",
                 "selection_overlays.png", "keep_during_training.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["models"]) == {"spt_nano", "swin_nano"}
    assert [row["keep_threshold"] for row in saved["threshold_sweep"]] == [0.3, 0.8]
    assert saved["threshold_sweep"][1]["gmacs_executed"] <= saved["threshold_sweep"][0]["gmacs_executed"]
    assert {row["coverage"] for row in saved["coverage"]} == {0.05, 0.6}
    for model in ("spt_nano", "swin_nano"):
        assert saved["timing"][model]["detector_train_b2_img_s"] > 0
        assert saved["timing"][model]["backbone_infer_b1_img_s"] > 0
    text = (out / "report.md").read_text()
    assert "Small-scale run" in text and "| box AP50 |" in text and "torch" in text
    assert render_report(report) == text
