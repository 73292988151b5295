from __future__ import annotations

import json
import subprocess
import sys

import pytest

import spa.bench.block as block_bench
from spa.bench import bench_block, format_table
from spa.bench.timing import cache_evictor
from spa.cli import main

SMALL = {"batch_size": 2, "resolution": 7, "dim": 16, "num_heads": 2, "rounds": 2, "warmup": 1}


def test_bench_block_records_every_configuration():
    records = bench_block(keep_ratios=(1.0, 0.3), **SMALL)
    assert len(records) == 2 * (1 + 4 * 2)
    keys = {"layout", "keep_ratio", "pass", "ms", "ratio_to_dense"}
    assert all(keys <= r.keys() for r in records)
    assert {r["layout"] for r in records} == {"dense", "containers", "stream", "padded", "masked"}
    for r in records:
        assert r["ms"] > 0 and r["ratio_to_dense"] > 0
        if r["layout"] == "dense":
            assert r["ratio_to_dense"] == 1.0
        else:
            assert 0.0 <= r["padding_fraction"] < 1.0
    full = next(r for r in records if r["layout"] == "containers" and r["keep_ratio"] == 1.0)
    assert full["containers"] == 2 and full["padding_fraction"] == 0.0  # one 7x7 window per image
    part = next(r for r in records if r["layout"] == "containers" and r["keep_ratio"] == 0.3)
    assert full["kept_fraction"] == 1.0 and part["kept_fraction"] == round(15 / 49, 4)  # ceil(0.3 * 49) each
    assert "| fwd+bwd | containers | 0.30 | 0.306 |" in format_table(records)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "block.json"
    argv = ["bench", "block", "--json", str(out), "--batch-size", "2", "--resolution", "7", "--dim", "16"]
    argv += ["--heads", "2", "--rounds", "1", "--keep-ratios", "0.5", "--layouts", "containers"]
    argv += ["--backend", "sdpa"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["threads"] >= 1
    assert [(r["layout"], r["pass"]) for r in data["records"]] == [
        ("dense", "fwd"),
        ("containers", "fwd"),
        ("dense", "fwd+bwd"),
        ("containers", "fwd+bwd"),
    ]
    assert [r["backend"] for r in data["records"] if r["layout"] != "dense"] == ["sdpa", "sdpa"]
    assert data["cost_fit"] == []  # one keep ratio: no line to fit


def test_cli_block_flushes_denormals_in_a_fresh_process_and_keeps_them_when_asked(tmp_path):
    # in-process (pytest) torch's threads already run; ``spa bench block`` from a shell sets the mode first
    for mode, flushed in (("flush", True), ("keep", False)):
        out = tmp_path / f"{mode}.json"
        argv = ["bench", "block", "--json", str(out), "--batch-size", "1", "--resolution", "7", "--dim", "16"]
        argv += ["--heads", "2", "--rounds", "1", "--keep-ratios", "0.5", "--layouts", "containers"]
        argv += ["--denormals", mode]
        code = f"import sys, spa_cli; sys.exit(spa_cli.main({argv!r}))"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "spa bench: warning" not in run.stderr
        data = json.loads(out.read_text())
        assert data["environment"]["flush_denormal"] is flushed
        assert all(r["env_flush_denormal"] is flushed for r in data["records"])


def test_cost_fit_splits_fixed_and_per_token_cost():
    from spa.bench.block import cost_fit, format_cost_fit

    def rec(pass_, layout, kept, ratio, backend="math"):
        return {"pass": pass_, "layout": layout, "keep_ratio": kept, "kept_fraction": kept,
                "ratio_to_dense": ratio, "backend": None if layout == "dense" else backend}  # fmt: skip

    records = [rec("fwd", "dense", 1.0, 1.0)]
    records += [rec("fwd", "containers", k, 0.05 + 0.95 * k) for k in (1.0, 0.5, 0.25)]  # on a line
    records += [rec("fwd", "masked", k, 1.3) for k in (1.0, 0.5, 0.25)]  # saves nothing: slope 0
    records += [rec("fwd", "stream", 0.5, 0.6)]  # one point: not fitted
    fits = {f["layout"]: f for f in cost_fit(records)}
    assert set(fits) == {"containers", "masked"}  # never the dense baseline itself
    assert fits["containers"]["fixed"] == pytest.approx(0.05) and fits["containers"][
        "per_token"
    ] == pytest.approx(0.95)
    assert (
        fits["containers"]["max_residual"] == pytest.approx(0, abs=1e-9) and fits["containers"]["points"] == 3
    )
    assert fits["masked"]["per_token"] == pytest.approx(0, abs=1e-9) and fits["masked"][
        "fixed"
    ] == pytest.approx(1.3)
    bent = records[:1] + [rec("fwd", "containers", k, v) for k, v in ((1.0, 1.0), (0.5, 0.3), (0.25, 0.3))]
    assert cost_fit(bent)[0]["max_residual"] > 0.05  # a line that does not describe the rows says so
    assert "| fwd | containers | 0.050 | 0.950 | 3 | 0.000 |" in format_cost_fit(cost_fit(records))
    assert format_cost_fit([]) == ""
    real = cost_fit(bench_block(keep_ratios=(1.0, 0.3), **SMALL))  # every layout and pass of a real run
    assert len(real) == 2 * 4 and all(f["points"] == 2 for f in real)


def test_bench_block_evicts_caches_before_every_timed_call(monkeypatch):
    made = []

    def counting_evictor(megabytes, device):
        evict = cache_evictor(megabytes, device)
        calls = []
        made.append((megabytes, calls))
        if evict is None:
            return None

        def call():
            calls.append(1)
            evict()

        return call

    monkeypatch.setattr(block_bench, "cache_evictor", counting_evictor)
    small = {**SMALL, "rounds": 3}
    records = bench_block(keep_ratios=(0.3,), layouts=("containers",), evict_cache_mb=0.5, **small)
    assert [m for m, _ in made] == [0.5]
    assert len(made[0][1]) == 3 * len(records)  # every configuration, every round
    assert all(r["evict_cache_mb"] == 0.5 for r in records)
    made.clear()
    assert all(
        r["evict_cache_mb"] == 0.0 for r in bench_block(keep_ratios=(0.3,), layouts=("containers",), **SMALL)
    )


def test_cli_rejects_a_bad_eviction_size(capsys):
    for bad in ("-1", "abc", "nan", "1e400", "5000"):
        with pytest.raises(SystemExit):
            main(["bench", "block", "--evict-cache-mb", bad])
        assert "expected a size in MB from 0 to 4096" in capsys.readouterr().err
