"""The benchmarks' one device / AMP / timing / record path (``spa.bench.timing.BenchDevice``, ``pass_fields``)
and the ``--device`` / ``--amp`` / ``--backend`` / ``--compile`` flags (no wall-clock value asserted)."""

from __future__ import annotations

import pytest
import torch

from spa.bench import (
    AMP_MODES,
    DEVICES,
    BenchDevice,
    bench_backbone,
    bench_block,
    format_backbone_table,
    format_table,
    pass_fields,
    peak_memory,
)
from spa.bench.timing import interleaved_rounds
from spa.cli import main
from spa.errors import ConfigError

TINY_BLOCK = {"batch_size": 2, "resolution": 7, "dim": 16, "num_heads": 2, "rounds": 1, "warmup": 0}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def test_resolve_checks_device_and_amp():
    bench = BenchDevice.resolve("cpu", "bf16")
    assert bench.device == torch.device("cpu") and not bench.is_cuda
    assert bench.fields() == {"device": "cpu", "amp": "bf16"}
    assert DEVICES == ("cpu", "cuda") and AMP_MODES == ("off", "bf16")
    with pytest.raises(ConfigError, match="device must be one of"):
        BenchDevice.resolve("tpu")
    with pytest.raises(ConfigError, match="amp must be one of"):
        BenchDevice.resolve("cpu", "fp16")


@no_cuda
def test_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        BenchDevice.resolve("cuda")


def test_autocast_timer_and_peak_memory_on_cpu():
    seen = []
    with BenchDevice.resolve("cpu", "bf16").autocast():
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    with BenchDevice.resolve("cpu", "off").autocast():
        seen.append(not torch.is_autocast_enabled("cpu"))
    assert seen == [True, True]
    calls = []
    bench = BenchDevice.resolve("cpu")
    assert bench.timer(lambda: calls.append(1)) >= 0 and calls == [1]
    assert peak_memory(lambda: calls.append(2)) == {} and calls == [1, 2]  # the step still runs once
    env = bench.environment()
    assert {"torch", "torchvision", "timm", "spa", "device", "device_name"} <= env.keys()


def test_a_timer_replaces_sync_and_clock():
    events = []
    times = interleaved_rounds(
        {"a": lambda: events.append("a")}, rounds=2, warmup=1, sync=lambda: events.append("sync"),
        timer=lambda run: (run(), 7.0)[1],
    )  # fmt: skip
    assert times == {"a": [7.0, 7.0]} and events == ["a", "a", "a"]


def test_pass_fields_medians_throughput_and_paired_ratios():
    times = {"train_ms": [20.0, 10.0, 30.0], "infer_ms": [4.0, 5.0, 6.0]}
    dense = {"train_ms": [10.0, 10.0, 10.0], "infer_ms": [8.0, 5.0, 4.0]}
    out = pass_fields(times, dense, ("train", "infer"), batch_size=4)
    assert out == {
        "train_ms": 20.0, "train_img_s": 200.0, "infer_ms": 5.0, "infer_img_s": 800.0,
        "train_ratio_to_dense": 2.0, "infer_ratio_to_dense": 1.0,
    }  # fmt: skip
    assert pass_fields({"x_ms": [1.23456]}, {"x_ms": [1.0]}, ("x",), digits=3) == {
        "x_ms": 1.235,
        "x_ratio_to_dense": 1.2346,
    }


def test_bench_block_amp_and_several_backends_in_the_same_rounds():
    records = bench_block(
        keep_ratios=(0.5,), layouts=("containers",), backend=("math", "sdpa"), amp="bf16", **TINY_BLOCK
    )
    assert [(r["pass"], r["layout"], r.get("backend")) for r in records] == [
        ("fwd", "dense", None),
        ("fwd", "containers", "math"),
        ("fwd", "containers", "sdpa"),
        ("fwd+bwd", "dense", None),
        ("fwd+bwd", "containers", "math"),
        ("fwd+bwd", "containers", "sdpa"),
    ]
    for r in records:
        assert r["device"] == "cpu" and r["amp"] == "bf16" and r["compiled"] is False
        assert r["env_torch"] == torch.__version__ and "peak_mem_mb" not in r
    assert "| fwd+bwd | sdpa | containers | 0.50 |" in format_table(records)
    with pytest.raises(ConfigError, match="backend"):
        bench_block(backend=("flash",), **TINY_BLOCK)


def test_bench_backbone_backends_and_amp():
    records = bench_backbone(
        models=["spt_nano"], sizes=[64], batch_sizes=[1], keep_ratios=[0.5], layouts=["containers"],
        backend=("math", "sdpa"), amp="bf16", rounds=1, warmup=0, memory=False,
    )  # fmt: skip
    assert [(r["select"], r["backend"]) for r in records] == [
        ("dense", None),
        ("topk", "math"),
        ("topk", "sdpa"),
    ]
    for r in records:
        assert r["device"] == "cpu" and r["amp"] == "bf16" and r["compiled"] is False
        assert r["env_device"] == "cpu" and r["env_timm"] and r["train_img_s"] > 0
        assert r["train_ratio_to_dense"] > 0 and r["infer_ratio_to_dense"] > 0
    assert "| spt_nano | 64 | 1 | topk | 0.50 | containers | sdpa |" in format_backbone_table(records)
    with pytest.raises(ConfigError, match="unknown backend"):
        bench_backbone(models=["spt_nano"], sizes=[64], batch_sizes=[1], backend="flash")


@no_cuda
@pytest.mark.parametrize("kind", ["block", "backbone", "detector"])
def test_cli_device_cuda_without_cuda_is_one_line(kind, capsys, monkeypatch):
    monkeypatch.delenv("SPA_DEBUG", raising=False)
    assert main(["bench", kind, "--device", "cuda", "--amp", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa bench: error: --device cuda: CUDA is not available") and err.count("\n") == 1


def test_cli_amp_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "block", "--amp", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["block", "backbone"])
def test_cli_backend_takes_a_comma_list(kind, capsys, monkeypatch):
    import spa.bench.cli as bench_cli

    seen = {}
    fake = lambda **kwargs: seen.update(kwargs) or []  # noqa: E731  (records nothing: no timing here)
    monkeypatch.setattr(bench_cli, f"bench_{kind}", fake)
    monkeypatch.setattr(
        bench_cli, "format_table" if kind == "block" else "format_backbone_table", lambda r: ""
    )
    assert main(["bench", kind, "--backend", "math, sdpa"]) == 0
    assert seen["backend"] == ["math", "sdpa"]
    assert main(["bench", kind]) == 0 and seen["backend"] == ["auto"]
    with pytest.raises(SystemExit):
        main(["bench", kind, "--backend", "math,flash"])
    assert (
        "backends are auto, math, sdpa, varlen, reference (comma list), got 'math,flash'"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_bench_block_compiled():  # torch.compile: tens of seconds per graph
    records = bench_block(keep_ratios=(0.5,), layouts=("containers",), compile=True, **TINY_BLOCK)
    assert len(records) == 4 and all(r["compiled"] and r["ms"] > 0 for r in records)
    assert all(r["compiled_dense_static"] for r in records)
