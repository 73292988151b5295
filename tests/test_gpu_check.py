"""``python -m spa.bench.gpu_check`` in its CPU smoke mode (``--device cpu --small``): what it writes, and that a
broken backend makes it fail. The GPU run itself (``make gpu-check``) needs a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from spa.bench import gpu_check
from spa.bench.gpu_check import SECTIONS, main, run_check

FAST = [name for name in SECTIONS if name != "timing_backbone"]  # the backbone benchmark: test_bench_backbone


def _read(out):
    return json.loads((out / "results.json").read_text()), (out / "summary.md").read_text()


def test_cpu_smoke_writes_results_and_summary(tmp_path):
    out = tmp_path / "gpu_out"
    assert run_check(device="cpu", small=True, out=out, sections=FAST, in_process=True) == 0
    results, summary = _read(out)
    sections = results["sections"]
    assert list(sections) == FAST and results["failures"] == []
    assert all(sections[name]["status"] == "passed" for name in FAST)
    assert (
        sections["env"]["info"]["torch"] == torch.__version__ and sections["env"]["info"]["device"] == "cpu"
    )
    for name in ("attention", "block"):
        checks = sections[name]["checks"]
        ran = {(c["backend"], c["precision"]) for c in checks if not c.get("skipped")}
        assert ran == {(b, p) for b in ("math", "sdpa") for p in ("fp32", "bf16")}
        assert "varlen" not in {c["backend"] for c in checks}  # it has sections of its own, run after these
        for c in checks:
            if not c.get("skipped"):
                assert c["pass"] and c["out_rel"] <= c["tol_out"] and c["grad_rel"] <= c["tol_grad"]
                if c["precision"] == "fp32":
                    assert c["tol_out"] == c["tol_grad"] == gpu_check.TOL_FP32
                else:  # bf16: the bf16 floor, or a multiple of the reference backend's own bf16 error
                    assert (
                        gpu_check.TOL_BF16 <= c["tol_out"] < 1.0 and gpu_check.TOL_BF16 <= c["tol_grad"] < 1.0
                    )
    for name in ("attention_varlen", "block_varlen", "spt_vs_timm_varlen", "train_amp_varlen"):
        assert sections[name]["status"] == "passed"  # nothing to run on a CPU: skipped checks, no failure
        assert [(c["backend"], c["skipped"]) for c in sections[name]["checks"]] == [("varlen", "needs CUDA")]
    order = list(SECTIONS)
    assert order.index("train_amp") < order.index("attention_varlen") < order.index("timing_block")
    assert {c["shift"] for c in sections["block"]["checks"]} == {0, 3}
    assert all(c["unkept_identical"] for c in sections["block"]["checks"] if not c.get("skipped"))
    timm_checks = [c for c in sections["spt_vs_timm"]["checks"] if not c.get("skipped")]
    assert timm_checks and all(c["pass"] and c["all_kept"] for c in timm_checks)
    train = [c for c in sections["train_amp"]["checks"] if not c.get("skipped")]
    assert train and all(c["pass"] and c["weights_changed"] for c in train)
    timing = sections["timing_block"]["records"]
    assert {r["backend"] for r in timing if r["layout"] != "dense"} == {"math", "sdpa"}
    assert all(
        r["device"] == "cpu" and r["amp"] == "off" and r["env_torch"] == torch.__version__ for r in timing
    )
    assert summary.startswith("# spa GPU check") and "**all correctness checks passed**" in summary
    assert (
        "| attention | check | passed |" in summary
        and "| block | sdpa | containers, shift 3 | bf16 |" in summary
    )
    assert "| varlen |" in summary and "skipped (needs CUDA)" in summary
    assert "## Timing: one block" in summary and "| pass | backend | layout |" in summary


def test_a_broken_backend_fails_the_check(tmp_path, monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: 1.2 * sdpa(*a, **k))
    out = tmp_path / "gpu_out"
    assert run_check(device="cpu", small=True, out=out, sections=["attention"], in_process=True) == 1
    results, summary = _read(out)
    checks = results["sections"]["attention"]["checks"]
    assert results["sections"]["attention"]["status"] == "failed"
    assert all(not c["pass"] for c in checks if c["backend"] == "sdpa")
    assert all(c["pass"] for c in checks if c["backend"] == "math")
    assert "**FAILED:**" in summary and "- attention: sdpa containers fp32: FAIL" in summary
    assert "| attention | math | containers | fp32 |" in summary


def test_sections_run_in_their_own_process_and_the_budget_skips_the_rest(tmp_path):
    out = tmp_path / "gpu_out"
    assert run_check(device="cpu", small=True, out=out, sections=["env"]) == 0  # a section process
    results, _ = _read(out)
    assert results["sections"]["env"]["info"]["torch"] == torch.__version__
    assert "section env (cpu, small)" in (out / "run.log").read_text()
    assert run_check(device="cpu", small=True, out=out, sections=["attention"], budget_s=5) == 1
    results, summary = _read(out)
    assert results["sections"]["attention"]["status"] == "skipped"
    assert "section attention: skipped out of the 5 s budget" in summary


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert main(["--device", "cpu", "--sections", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown section(s) ['nope']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path)]) == 2  # --device cuda is the default
        err = capsys.readouterr().err
        assert (
            err.startswith("gpu_check: error: --device cuda: CUDA is not available") and err.count("\n") == 1
        )


@pytest.mark.slow
def test_cpu_smoke_every_section_in_its_own_process(tmp_path):
    out = tmp_path / "gpu_out"
    assert main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    results, summary = _read(out)
    assert all(res["status"] == "passed" for res in results["sections"].values())
    assert "## Timing: whole backbone" in summary


def test_a_section_cut_off_by_its_limit_keeps_the_checks_it_finished(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    ctx = gpu_check.Context(torch.device("cpu"), True, work, partial=work / "block.partial.json")
    ctx.record({"level": "block", "backend": "math", "pass": True})
    assert json.loads((work / "block.partial.json").read_text())["checks"][0]["backend"] == "math"
    killed = []

    class Hangs:  # a section process that never ends
        pid = 12345

        def __init__(self, *args, **kwargs):
            pass

        def wait(self, timeout=None):
            if timeout is not None:
                raise gpu_check.subprocess.TimeoutExpired("section", timeout)
            return -9

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Hangs)
    monkeypatch.setattr(gpu_check.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    args = gpu_check.argparse.Namespace(device="cpu", small=True)
    res = gpu_check._run_section_process("block", args, 3.0, tmp_path / "run.log", work)
    assert killed == [(12345, 9)] and res["status"] == "timeout"
    assert res["checks"] == [{"level": "block", "backend": "math", "pass": True}]
    results = {"sections": {"block": res}}
    assert gpu_check.failures(results) == ["section block: timeout killed after 3 s"]  # still a failure
