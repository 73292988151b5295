"""``spa bench backbone``: record keys and invariants on a tiny run (timings are never asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_spt_detector_checkpoint
from PIL import Image

from spa.bench import REQUIRED_KEYS, bench_backbone, format_backbone_table
from spa.cli import main


def _check(records: list[dict]) -> None:
    for r in records:
        assert set(REQUIRED_KEYS) <= r.keys(), set(REQUIRED_KEYS) - r.keys()
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
        assert r["train_ratio_to_dense"] > 0 and r["infer_ratio_to_dense"] > 0
        assert 0 < r["gmacs_kept"] <= r["gmacs_executed"] + 1e-9
        if r["select"] == "dense":
            assert r["layout"] == "dense" and r["model"].startswith("swin_")
            assert r["train_ratio_to_dense"] == 1.0 and r["infer_ratio_to_dense"] == 1.0
        else:
            assert r["dense_model"] == r["model"].replace("spt_", "swin_")


def test_bench_backbone_quick():
    records = bench_backbone(
        models=["spt_nano"], sizes=[64], batch_sizes=[2], keep_ratios=[1.0, 0.3], layouts=["containers"],
        rounds=1, warmup=0, memory=False,
    )  # fmt: skip
    _check(records)
    assert [(r["model"], r["select"], r["keep_ratio"]) for r in records] == [
        ("swin_nano", "dense", 1.0),
        ("spt_nano", "topk", 1.0),
        ("spt_nano", "topk", 0.3),
    ]
    full, low = records[1], records[2]
    assert low["gmacs_kept"] < full["gmacs_kept"] and low["gmacs_executed"] < full["gmacs_executed"]
    assert abs(low["kept_ratio_measured"] - 0.3) < 0.15 and full["kept_ratio_measured"] == 1.0
    assert "| spt_nano | 64 | 2 | topk | 0.30 | containers |" in format_backbone_table(records)
    # the default: denormals flushed in the timing process, and every record says so
    assert all(r["env_flush_denormal"] is True for r in records)


def _check_memory(records: list[dict]) -> None:
    for r in records:
        assert r["peak_rss_mb"] > 0 and r["infer_peak_rss_mb"] > 0 and r["peak_rss_delta_mb"] >= 0
        assert r["peak_rss_mb"] >= r["infer_peak_rss_mb"] >= r["base_rss_mb"]
        assert r["peak_rss_ratio_to_dense"] > 0


def test_bench_backbone_memory_subprocess():
    records = bench_backbone(models=["swin_nano"], sizes=[64], batch_sizes=[1], rounds=1, warmup=0)
    assert len(records) == 1
    _check(records)
    _check_memory(records)
    assert records[0]["peak_rss_ratio_to_dense"] == 1.0


@pytest.mark.slow
def test_bench_backbone_memory_every_configuration():
    records = bench_backbone(
        models=["spt_nano", "swin_nano"], sizes=[64], batch_sizes=[1, 2], keep_ratios=[1.0, 0.2],
        layouts=["containers", "padded"], rounds=2, warmup=1,
    )  # fmt: skip
    assert len(records) == 2 * (1 + 2 * 2)
    _check(records)
    _check_memory(records)


def test_cli_quick_with_trained_gate(tmp_path):
    out = tmp_path / "bb.json"
    ckpt = write_spt_detector_checkpoint(tmp_path / "last.pt")
    argv = ["bench", "backbone", "--models", "spt_nano", "--quick", "--no-memory", "--sizes", "64"]
    argv += ["--batch-sizes", "1", "--keep-ratios", "0.5", "--layouts", "masked", "--rounds", "1"]
    argv += ["--denormals", "keep"]
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray((np.random.rand(48, 80, 3) * 255).astype(np.uint8)).save(image)
    assert main([*argv, "--checkpoint", str(ckpt), "--images", str(image.parent), "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list)
    _check(records)
    assert [(r["select"], r["layout"]) for r in records] == [
        ("dense", "dense"),
        ("topk", "masked"),
        ("gate", "masked"),
    ]
    gate = records[-1]
    assert gate["checkpoint"] == str(ckpt) and 0.0 <= gate["keep_ratio"] <= 1.0
    assert all(r["peak_rss_mb"] is None and r["inputs"] == "1 image files" for r in records)
    # --denormals keep reaches the timing process: torch's default, recorded
    assert all(r["env_flush_denormal"] is False for r in records)


def test_spt_depths_times_the_spt_at_other_depths(tmp_path):
    """``--spt-depths``: every SPT configuration at each depth tuple (same keep ratio), the dense baseline
    once at its own depths; fewer blocks count fewer GMACs; records and table say the depths."""
    out = tmp_path / "bb.json"
    argv = ["bench", "backbone", "--models", "spt_nano", "--quick", "--no-memory", "--sizes", "64"]
    argv += ["--batch-sizes", "1", "--keep-ratios", "0.5", "--layouts", "containers", "--rounds", "1"]
    assert main([*argv, "--spt-depths", "1-1-3-1,1-1-1-1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    _check(records)
    assert [(r["model"], r["depths"]) for r in records] == [
        ("swin_nano", None),
        ("spt_nano", [1, 1, 3, 1]),
        ("spt_nano", [1, 1, 1, 1]),
    ]
    own, shallow = records[1], records[2]
    assert shallow["gmacs_executed"] < own["gmacs_executed"]
    table = format_backbone_table(records)
    assert "| model | depths |" in table and "| spt_nano | 1-1-1-1 | 64 |" in table
    assert "| swin_nano | default | 64 |" in table
    # without the option: no depths column
    assert "depths" not in format_backbone_table([{**r, "depths": None} for r in records])


@pytest.mark.parametrize(
    ("spt_depths", "models", "match"),
    [
        ([(1, 1, 3)], ["spt_nano"], "must be non-empty and of equal length"),
        ([(1, 0, 3, 1)], ["spt_nano"], ">= 1"),
        ([(1, 1, 2, 1)], ["swin_nano"], "needs SPT models"),
        ([], ["spt_nano"], "at least one depth tuple"),
    ],
)
def test_bad_spt_depths(spt_depths, models, match):
    with pytest.raises(ValueError, match=match):
        bench_backbone(models=models, sizes=[64], batch_sizes=[1], spt_depths=spt_depths)


@pytest.mark.parametrize("text", ["1-1-x-1", "1-1-0-1", ",", "2--2"])
def test_cli_spt_depths_is_checked_by_argparse(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "backbone", "--models", "spt_nano", "--spt-depths", text])
    assert exit_.value.code == 2 and "dash-joined" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"models": ["resnet50"]}, "unknown backbone"),
        ({"layouts": ["diagonal"]}, "unknown layout"),
        ({"keep_ratios": [0.0]}, "keep ratios"),
        ({"sizes": [8]}, "sizes"),
        ({"rounds": 0}, "rounds"),
        ({"denormals": "sometimes"}, "denormals must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_backbone(**{"models": ["spt_nano"], "sizes": [64], "batch_sizes": [1], **kwargs})


def test_keep_threshold_sets_the_checkpoint_gate(tmp_path):
    """``--keep-threshold`` overrides the checkpoint's stored threshold for its gate configurations: a low one
    keeps more tokens than a high one; without a checkpoint it is refused."""
    ckpt = write_spt_detector_checkpoint(tmp_path / "last.pt")
    argv = ["bench", "backbone", "--models", "spt_nano", "--quick", "--no-memory", "--sizes", "64"]
    argv += ["--batch-sizes", "1", "--keep-ratios", "0.5", "--layouts", "containers", "--rounds", "1"]
    kept = {}
    for threshold in ("0.01", "0.99"):
        out = tmp_path / f"bb{threshold}.json"
        argv_t = [*argv, "--checkpoint", str(ckpt), "--keep-threshold", threshold, "--json", str(out)]
        assert main(argv_t) == 0
        gate = [r for r in json.loads(out.read_text()) if r["select"] == "gate"]
        assert len(gate) == 1
        kept[threshold] = gate[0]["kept_ratio_measured"]
    assert kept["0.01"] > kept["0.99"]
    assert main([*argv, "--keep-threshold", "0.5"]) == 2  # no checkpoint: a one-line error


def test_stage_times_per_stage_and_against_the_dense_stages():
    records = bench_backbone(
        models=["spt_nano"], sizes=[64], batch_sizes=[1], keep_ratios=[0.3], layouts=["containers"],
        rounds=2, warmup=1, memory=False, stage_times=True,
    )  # fmt: skip
    _check(records)
    dense, spt = records
    for r in records:
        assert len(r["infer_stage_ms"]) == 4 and all(ms > 0 for ms in r["infer_stage_ms"])
        assert len(r["infer_stage_ratio_to_dense"]) == 4
        assert "stage_rounds_ms" not in r
    assert dense["infer_stage_ratio_to_dense"] == [1.0] * 4
    assert all(v > 0 for v in spt["infer_stage_ratio_to_dense"])
    table = format_backbone_table(records)
    assert "infer t/dense per stage" in table and "| 1.000 / 1.000 / 1.000 / 1.000 |" in table
    # without the option: no stage fields, no column
    plain = bench_backbone(
        models=["swin_nano"], sizes=[64], batch_sizes=[1], rounds=1, warmup=0, memory=False
    )
    assert "infer_stage_ms" not in plain[0] and "per stage" not in format_backbone_table(plain)


def test_stage_clock_records_only_the_calls_it_times():
    import torch
    from torch import nn

    from spa.bench.backbone import _StageClock

    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            for stage in self.layers:
                x = stage(x)
            return x

    model, x, syncs = TwoStages(), torch.randn(2, 4), []
    clock = _StageClock(lambda: syncs.append(1))
    clock.attach(model)
    clock.attach(model)  # once per model: no second set of hooks
    timed = clock.timed(3, model, lambda: model(x))
    model(x)  # an untimed call (e.g. a train step on the same model) records nothing
    assert clock.calls == {} and syncs == []
    timed()
    timed()
    assert list(clock.calls) == [3] and len(clock.calls[3]) == 2
    assert all(len(call) == 2 and all(ms >= 0 for ms in call) for call in clock.calls[3])
    assert len(syncs) == 2 * 2 * 2  # enter and leave of each stage, each call
    with pytest.raises(Exception, match="stages"):
        clock.attach(nn.Linear(2, 2))


def test_a_checkpoint_that_is_not_a_detector_is_one_clear_error(tmp_path):
    from spa.engine.checkpoint import save_checkpoint
    from spa.errors import ConfigError

    path = save_checkpoint(
        tmp_path / "ml.pt", {"model": {}, "meta": {"task": "multilabel", "classifier": {}}}
    )
    with pytest.raises(
        ConfigError, match="'multilabel' checkpoint; --checkpoint takes a detection checkpoint"
    ):
        bench_backbone(models=["spt_nano"], sizes=[64], batch_sizes=[1], checkpoint=path, memory=False)
