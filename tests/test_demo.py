from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spa.demo import (
    DemoConfig,
    _default_settings,
    _sets,
    choose_keep_threshold,
    pretrain_backbone,
    render_report,
    run_demo,
)


def _tiny(tmp_path, **overrides) -> DemoConfig:
    values = dict(
        out=str(tmp_path / "demo"), data_dir=str(tmp_path / "data" / "builtin"), img_size=96, train_images=4,
        val_images=3, steps=2, batch_size=2, thresholds=(0.3, 0.8), coverages=(0.05, 0.2, 0.6), timing_rounds=1,
        bench_backbone=False, pretrain_images=4, pretrain_val_images=2, pretrain_steps=2, pretrain_batch_size=2,
        threshold_images=2, bootstrap_resamples=20, coverage_timing_images=2,
    )  # fmt: skip
    values.update(overrides)
    return DemoConfig(**values)


def _pixels(root) -> set[str]:
    return {
        hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
        for p in sorted(root.glob("*/images/*.png"))
    }


def test_demo_writes_report_and_figures(tmp_path):
    cfg = _tiny(tmp_path)
    report = run_demo(cfg)
    out = tmp_path / "demo"
    for name in ("report.md", "report.json", "ap_vs_gmacs.png", "cost_vs_coverage.png",
                 "selection_overlays.png", "keep_during_training.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["models"]) == {"spt_nano", "swin_nano"}
    assert [row["keep_threshold"] for row in saved["threshold_sweep"]] == [0.3, 0.8]
    assert saved["threshold_sweep"][1]["gmacs_executed"] <= saved["threshold_sweep"][0]["gmacs_executed"]
    assert {row["coverage"] for row in saved["coverage"]} == {0.05, 0.2, 0.6}
    for model in ("spt_nano", "swin_nano"):
        assert saved["timing"][model]["detector_train_b2_img_s"] > 0
        assert saved["timing"][model]["backbone_infer_b1_img_s"] > 0
    text = (out / "report.md").read_text()
    assert "Small-scale run" in text and "| box AP50 [95% CI] |" in text and "torch" in text
    assert render_report(report) == text
    # the report says how denormals were handled: in-process (pytest) torch's threads already run, so the
    # environment records what was measured, and older reports (no key) read as kept
    flushed = saved["environment"]["flush_denormal"]
    assert isinstance(flushed, bool) and f"denormals {'flushed' if flushed else 'kept'}." in text
    del report["environment"]["flush_denormal"]
    assert "denormals not recorded (kept)." in render_report(report)

    # the keys others read (#16 item 5)
    assert saved["val_images"] == 3
    pre = saved["pretrained"]
    assert {"path", "sha256", "trained_on"} <= set(pre) and pre["reused"] is False
    assert hashlib.sha256(Path(pre["path"]).read_bytes()).hexdigest() == pre["sha256"]
    assert Path(pre["path"]).with_suffix(".sha256").read_text().split()[0] == pre["sha256"]
    assert pre["sha256"] in text and "same init" in text
    for model in ("spt_nano", "swin_nano"):
        for key in ("ap", "ap50"):
            entry = saved["models"][model][key]
            lo, hi = entry["ci95"]
            assert 0.0 <= lo <= entry["value"] <= hi <= 1.0, (model, key, entry)
    rows = saved["coverage_rows"]
    assert len(rows) == 6
    for row in rows:
        assert {"coverage", "model", "kept_stage3", "kept_stage4", "gmacs_executed", "ms_per_image"} <= set(
            row
        )
        assert 0.0 <= row["kept_stage3"] <= 1.0 and row["ms_per_image"] > 0
        if row["model"] == "swin_nano":
            assert row["kept_stage3"] == 1.0
    for row in saved["threshold_sweep"]:
        assert row["AP_ci95"][0] <= row["AP"] <= row["AP_ci95"][1]
    assert saved["keep_threshold"]["chosen"][0]["keep_threshold"] in (0.3, 0.8)
    assert saved["targets"]["gmacs_ratio"] > 0
    # a tiny run does not decide the 15-minute target of a first run at the default settings
    assert saved["targets"]["minutes_met"] is None and "not decided by this run" in text

    # the pretraining images come from a disjoint seed: none equals a detection or coverage image
    data = tmp_path / "data" / "builtin"
    pretrain = _pixels(data / "pretrain")
    assert pretrain and not pretrain & (_pixels(data / "detect") | _pixels(data / "coverage-0.05"))
    meta = json.loads((data / "pretrain" / "meta.json").read_text())["config"]
    assert meta["seed"] != json.loads((data / "detect" / "meta.json").read_text())["config"]["seed"]
    # the coverage-0.2 point is the validation set itself; other coverages share its scenes' seed
    assert saved["data"]["coverage-0.2"] == saved["data"]["detect"]
    assert json.loads((data / "coverage-0.6" / "meta.json").read_text())["config"]["seed"] == 0


def test_choose_keep_threshold():
    def row(t, obj, bg):
        return {"keep_threshold": t, "keep": {"stage3": {"object": obj, "background": bg},
                                              "stage4": {"object": obj, "background": bg}}}  # fmt: skip

    rows = [row(0.1, 1.0, 0.9), row(0.3, 0.9, 0.3), row(0.5, 0.7, 0.2), row(0.7, 0.3, 0.05)]
    choice = choose_keep_threshold(rows)
    assert choice["keep_threshold"] == 0.3 and abs(choice["separation"] - 0.6) < 1e-9
    tie = [row(0.2, 0.5, 0.5), row(0.6, 0.0, 0.0)]  # a gate that separates nothing: keep the most
    assert choose_keep_threshold(tie)["keep_threshold"] == 0.2


def test_full_config_and_cli_flags():
    assert _default_settings(asdict(DemoConfig(out="elsewhere", data_dir="fresh")))
    assert not _default_settings(asdict(DemoConfig(steps=5))) and not _default_settings(
        asdict(DemoConfig.full())
    )
    full = DemoConfig.full(steps=5)
    assert full.seeds == (0, 1, 2) and full.val_images >= 200 and full.steps == 5
    assert DemoConfig().val_images >= 200 and DemoConfig().bootstrap_resamples >= 200
    assert (
        DemoConfig().resolved_pretrain_size() == 224
        and DemoConfig(img_size=96).resolved_pretrain_size() == 96
    )


def test_pretrained_init_is_cached_by_settings_and_sha256(tmp_path):
    cfg = _tiny(tmp_path, coverages=(0.2,), train_images=2, val_images=1, pretrain_images=2, pretrain_val_images=1,
                pretrain_steps=1)  # fmt: skip
    sets = _sets(cfg)
    first = pretrain_backbone(cfg, "swin_nano", sets["pretrain"])
    path = Path(first["path"])
    assert first["reused"] is False and path.parent == tmp_path / "data" / "builtin" / "pretrained"
    assert path.with_suffix(".sha256").read_text().split()[0] == first["sha256"]
    assert "seed 1000" in first["trained_on"] and "multi-label" in first["trained_on"]
    again = pretrain_backbone(cfg, "swin_nano", sets["pretrain"])
    assert again["reused"] is True and again["path"] == first["path"] and again["sha256"] == first["sha256"]
    other = pretrain_backbone(replace(cfg, pretrain_lr=5e-4), "swin_nano", sets["pretrain"])
    assert other["reused"] is False and other["path"] != first["path"]  # other settings, other file
    path.write_bytes(path.read_bytes() + b"x")  # a file that no longer matches its sha256 is trained again
    redone = pretrain_backbone(cfg, "swin_nano", sets["pretrain"])
    assert redone["reused"] is False and hashlib.sha256(path.read_bytes()).hexdigest() == redone["sha256"]


def test_demo_backbone_bench_times_the_gate_at_the_chosen_threshold(tmp_path):
    """The demo's backbone benchmark runs the SPT checkpoint's gate at the keep threshold chosen on training
    images (the one every other number of the report uses), not at the threshold stored in the checkpoint."""
    report = run_demo(_tiny(tmp_path, bench_backbone=True))
    chosen = report["keep_threshold"]["chosen"][0]["keep_threshold"]
    gate = [r for r in report["backbone_bench"] if r["select"] == "gate"]
    assert gate and all(r["keep_threshold"] == chosen for r in gate)
    # its timing workers handle denormals as the demo's own process does (in-process here: not flushed)
    flushed = report["environment"]["flush_denormal"]
    assert all(r["env_flush_denormal"] is flushed for r in report["backbone_bench"])


def test_settings_that_would_fail_after_fine_tuning_are_refused_up_front(tmp_path, capsys):
    from spa.cli import main
    from spa.errors import ConfigError

    for bad, match in (({"bootstrap_resamples": 0}, "bootstrap_resamples"), ({"val_images": 0}, "val_images"),
                       ({"thresholds": (0.3, 1.5)}, "keep thresholds"), ({"keep_threshold": 0.0}, "keep thresholds"),
                       ({"model": "swin_nano"}, "must be an SPT")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            _tiny(tmp_path, **bad)
    assert (
        _tiny(tmp_path, keep_threshold=0.4, thresholds=(), threshold_images=0).keep_threshold == 0.4
    )  # unused
    with pytest.raises(ConfigError, match="seeds"):
        _tiny(tmp_path, seeds=())
    assert main(["demo", "--out", str(tmp_path / "d"), "--bootstrap-resamples", "0"]) == 2
    assert "bootstrap_resamples" in capsys.readouterr().err and not (tmp_path / "d").exists()
