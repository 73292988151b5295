from __future__ import annotations

import json

from spa.bench import bench_block, format_table
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
