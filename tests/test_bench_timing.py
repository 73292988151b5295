"""``spa.bench.timing``: interleaved, shuffled rounds and the paired ratio (no wall-clock value asserted)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest

from spa.bench.timing import (
    CacheEvictor,
    cache_evictor,
    check_timed_denormals,
    environment,
    interleaved_rounds,
    median_ratio,
    set_denormals,
)
from spa.errors import ConfigError, SpaWarning


def _recording(keys, log):
    return {key: (lambda key=key: log.append(key)) for key in keys}


def _round_orders(log, keys, warmup, rounds):
    timed = log[warmup * len(keys) :]
    assert len(timed) == rounds * len(keys)
    return [timed[r * len(keys) : (r + 1) * len(keys)] for r in range(rounds)]


@pytest.mark.parametrize(("warmup", "rounds"), [(0, 1), (1, 3), (2, 5)])
def test_every_configuration_gets_rounds_times_after_its_warmup(warmup, rounds):
    keys, log = ["a", "b", "c", "d"], []
    times = interleaved_rounds(_recording(keys, log), rounds, warmup=warmup)
    assert list(times) == keys
    assert all(len(ts) == rounds and all(t >= 0 for t in ts) for ts in times.values())
    assert log[: warmup * len(keys)] == [
        k for k in keys for _ in range(warmup)
    ]  # warm-up first, in key order
    for order in _round_orders(log, keys, warmup, rounds):
        assert sorted(order) == keys  # each round calls every configuration once


def test_shuffled_order_varies_between_rounds_and_is_reproducible():
    keys = list(range(6))
    orders = []
    for _ in range(2):
        log: list[int] = []
        interleaved_rounds(_recording(keys, log), rounds=8, warmup=0, seed=3)
        orders.append(_round_orders(log, keys, 0, 8))
    assert orders[0] == orders[1]
    assert len({tuple(o) for o in orders[0]}) > 1
    log = []
    interleaved_rounds(_recording(keys, log), rounds=8, warmup=0, seed=4)
    assert _round_orders(log, keys, 0, 8) != orders[0]


def test_times_belong_to_their_configuration_with_sync_around_each_call():
    now, events = [0.0], []

    def advance(seconds):
        def run():
            events.append("run")
            now[0] += seconds

        return run

    def sync():
        events.append("sync")

    times = interleaved_rounds(
        {"fast": advance(0.001), "slow": advance(0.004)}, rounds=3, warmup=1, sync=sync, clock=lambda: now[0]
    )
    assert times["fast"] == pytest.approx([1.0] * 3) and times["slow"] == pytest.approx([4.0] * 3)
    assert events == ["run", "run"] + ["sync", "run", "sync"] * 6  # no sync in the warm-up


def test_progress_messages():
    messages: list[str] = []
    interleaved_rounds(_recording("ab", []), rounds=2, warmup=1, progress=messages.append)
    assert messages == ["warm-up 1/2", "warm-up 2/2", "round 1/2", "round 2/2"]


def test_bad_rounds():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_rounds({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        interleaved_rounds({"a": lambda: None}, rounds=1, warmup=-1)


def test_median_ratio_pairs_rounds():
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0  # ratios 2, 1, 3
    assert median_ratio([5.0, 1.0], [5.0, 1.0]) == 1.0
    assert median_ratio([1.0, 3.0], [2.0, 2.0]) == 1.0  # even count: mean of the middle two (0.5, 1.5)
    assert (
        median_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0
    )  # not the ratio of medians of unpaired rounds
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        median_ratio([], [])


def test_environment_keys():
    assert {"torch", "threads", "device", "processor", "python", "flush_denormal"} <= environment().keys()
    assert isinstance(environment()["flush_denormal"], bool)


def _fresh_process(code: str) -> list[str]:
    """Run ``code`` in a new Python with 2 torch threads; its printed lines (spa's warnings go to stdout too,
    other libraries' are dropped)."""
    script = (
        "import warnings, sys\nwarnings.simplefilter('always')\nwarnings.showwarning = lambda m, c, *a: "
        "print(f'{c.__name__}: {m}') if c.__name__ == 'SpaWarning' else None\n" + textwrap.dedent(code)
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_denormals_are_flushed_in_every_thread_when_set_first():
    lines = _fresh_process(
        """
        import torch
        from spa.bench.timing import _denormal_state, environment, set_denormals
        print(set_denormals("flush"), _denormal_state(), environment()["flush_denormal"])
        """
    )
    assert lines == ["True flushed True"]


def test_denormals_set_after_the_threads_started_are_reported_not_assumed():
    # torch's worker threads copy the setting when they start: set after a parallel op, only some threads flush
    lines = _fresh_process(
        """
        import torch
        from spa.bench.timing import _denormal_state, set_denormals
        torch.set_num_threads(2)
        (torch.ones(1 << 20) * 2).sum()  # starts the worker threads
        print(set_denormals("flush"), _denormal_state())
        """
    )
    assert lines[-1] == "False mixed"
    assert any(
        line.startswith("SpaWarning: denormals='flush' asked, but denormals are mixed") for line in lines
    )


def test_kept_denormals_are_denormal():
    # the premise of the flag: in a fresh process torch keeps denormals, and timm's shifted-window mask makes
    # them in softmax (SPA blocks mask with -inf instead, which gives exact zeros)
    lines = _fresh_process(
        """
        import torch
        from timm.models.swin_transformer import SwinTransformerBlock
        from spa.bench.timing import _denormal_state, set_denormals
        print(set_denormals("keep"), _denormal_state())
        block = SwinTransformerBlock(32, (14, 14), 2, window_size=7, shift_size=3)
        probs = torch.softmax(torch.zeros(49) + block.attn_mask[1, 0], 0)
        print(float(block.attn_mask.min()), bool(((probs > 0) & (probs < torch.finfo(torch.float32).tiny)).any()))
        """
    )
    assert lines == ["False kept", "-100.0 True"]


def test_a_timing_process_that_did_not_flush_as_asked_is_a_warning():
    with pytest.warns(SpaWarning, match="bench backbone: denormals='flush' asked, but the timing process"):
        check_timed_denormals({"flush_denormal": False}, "flush", "bench backbone")
    with pytest.warns(SpaWarning, match="denormals='keep' asked"):
        check_timed_denormals({"flush_denormal": True}, "keep", "bench detector")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_timed_denormals({"flush_denormal": True}, "flush", "bench backbone")
        check_timed_denormals({"flush_denormal": False}, "keep", "bench backbone")
        check_timed_denormals({}, "flush", "bench backbone")  # an environment from before the field


def test_set_denormals_refuses_an_unknown_mode():
    with pytest.raises(ConfigError, match="denormals must be one of"):
        set_denormals("sometimes")


def test_cpu_model_names_the_host(tmp_path):
    from spa.bench.timing import cpu_model

    info = tmp_path / "cpuinfo"
    entry = (
        "processor\t: {}\nmodel\t\t: 167\nmodel name\t: Intel(R) Xeon(R) Processor\ncache size\t: 491520 KB\n"
    )
    info.write_text(entry.format(0) + "\n" + entry.format(1).replace("167", "85"))
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor (model 167, cache 491520 KB)"  # the first entry
    info.write_text("processor\t: 0\nmodel name\t: Neoverse\n")
    assert cpu_model(info) == "Neoverse"
    info.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")  # ARM
    assert cpu_model(info) == f"{platform.machine()} implementer 0x41 part 0xd0c"
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())
    info.write_bytes(b"processor\t: 0\nmodel name\t: Caf\xe9 CPU\n")  # not UTF-8: read, not a crash
    assert cpu_model(info).startswith("Caf") and cpu_model(info).endswith(" CPU")
    assert environment()["processor"] == cpu_model()


def test_before_each_runs_untimed_before_every_timed_call_and_not_in_warmup():
    now, events = [0.0], []

    def run():
        events.append("run")
        now[0] += 0.002

    def before():
        events.append("before")
        now[0] += 1.0  # would show in the times if it were timed

    times = interleaved_rounds(
        {"a": run, "b": run}, rounds=3, warmup=2, clock=lambda: now[0], before_each=before
    )
    assert events[:4] == ["run"] * 4  # the warm-up calls come without it
    assert events[4:] == ["before", "run"] * 6
    assert all(t == pytest.approx(2.0) for ts in times.values() for t in ts)


def test_cache_evictor_size_and_pass():
    assert cache_evictor(0) is None
    evict = cache_evictor(1.0)
    assert isinstance(evict, CacheEvictor)
    assert evict.buffer.numel() * evict.buffer.element_size() == 2**20
    evict()
    evict()
    assert bool((evict.buffer == 2.0).all())  # every element read and written on each call
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="cache eviction size"):
            cache_evictor(bad)
