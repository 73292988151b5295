"""The ``spa`` command: fast help, one-line user errors (exit 2), tracebacks on request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from spa.cli import COMMANDS, main
from spa.engine import CheckpointError


def test_help_imports_neither_spa_nor_torch():
    code = "import sys, spa_cli\ntry:\n    spa_cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print(sorted(m for m in ('torch', 'spa', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert all(verb in out for verb in COMMANDS)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPA_DEBUG", raising=False)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa eval: error: checkpoint not found") and err.count("\n") == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    assert main(["eval", "--checkpoint", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "weights_only" not in err
    unsafe = tmp_path / "unsafe.pt"
    torch.save(
        {"model": {}, "fn": print}, unsafe
    )  # a pickled Python object: refused, no advice to unpickle it
    assert main(["eval", "--checkpoint", str(unsafe)]) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err and "weights_only=False" not in err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _this_thread_flushes_denormals() -> bool:
    return bool(torch.tensor([1e-30]) * 1e-10 == 0)  # one element: computed in this thread


def test_model_verbs_flush_denormals_while_they_run_then_restore(monkeypatch, tmp_path, capsys):
    import spa_cli

    monkeypatch.delenv("SPA_DENORMALS", raising=False)
    # torch's default: a failure here means an earlier test left this thread flushing denormals
    assert not _this_thread_flushes_denormals(), "an earlier test leaked torch.set_flush_denormal(True)"
    seen = []
    for verb, env in (("eval", None), ("predict", "flush"), ("data", None), ("eval", "keep")):
        if env is None:
            monkeypatch.delenv("SPA_DENORMALS", raising=False)
        else:
            monkeypatch.setenv("SPA_DENORMALS", env)
        with spa_cli._denormals(verb):
            seen.append(_this_thread_flushes_denormals())
        assert not _this_thread_flushes_denormals()  # restored
    assert seen == [True, True, False, False]
    # a value that is neither is one error line, before the command runs
    monkeypatch.delenv("SPA_DEBUG", raising=False)
    monkeypatch.setenv("SPA_DENORMALS", "sometimes")
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "spa eval: error: SPA_DENORMALS must be flush or keep, got 'sometimes' (spa bench and spa demo take "
        "--denormals instead)\n"
    )
    # verbs that do not read it ignore it; empty is unset
    with spa_cli._denormals("export"):
        assert not _this_thread_flushes_denormals()
    monkeypatch.setenv("SPA_DENORMALS", "")
    with spa_cli._denormals("eval"):
        assert _this_thread_flushes_denormals()


def test_model_verbs_flush_denormals_in_every_thread_from_a_fresh_process():
    # importing a verb's module must not start torch's CPU threads before the setting (they copy it at start)
    code = (
        "import spa_cli\nfrom spa.bench.timing import _denormal_state\n"
        "spa_cli.build_parser(spa_cli._FLUSH_DENORMALS)\n"
        "with spa_cli._denormals('eval'):\n    print(_denormal_state())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("SPA_DENORMALS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["flushed"]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", "--checkpoint", str(tmp_path / "none.pt")])
    monkeypatch.setenv("SPA_DEBUG", "1")
    with pytest.raises(CheckpointError):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"x")
        main(["eval", "--checkpoint", str(bad)])


def test_names_are_checked_before_any_data_is_opened(capsys):
    with pytest.raises(SystemExit):  # argparse: the choices come from timm's registry
        main(["train", "--model", "spt_tinyy", "--data", "coco:/no/such.json:/no/such"])
    assert "invalid choice: 'spt_tinyy'" in capsys.readouterr().err


def test_every_flag_of_every_verb_has_a_help_sentence():
    import argparse

    from spa.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.dest != "help" and not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "spa")
    assert not missing, missing
    train_help = build_parser(["train"])._subparsers._group_actions[0].choices["train"].format_help()
    assert "coco:ANNOTATIONS.json:IMAGES_DIR" in train_help and "spt_tiny" in train_help  # grammar, choices


def test_a_value_the_library_refuses_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["data", "make", "--out", str(tmp_path / "d"), "--coverage", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spa data: error: coverage must be in (0, 0.9], got 2.0") and "Traceback" not in err
    with pytest.raises(ValueError, match="coverage"):  # --debug: the exception itself
        main(["--debug", "data", "make", "--out", str(tmp_path / "d"), "--coverage", "2"])


def test_yaml_numbers_are_read_as_the_options_type(tmp_path):
    from spa.config import resolve_config
    from spa.errors import ConfigError

    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\nmax_steps: '12'\nkeep_threshold: 0.4\nclip_grad: null\nmin_size: none\n")
    cfg = resolve_config(str(good), {})
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.max_steps == 12 and cfg.clip_grad is None
    assert cfg.min_size is None  # "none", as the flags take it
    for text, value in (("'false'", False), ("no", False), ("'1'", True), ("true", True), ("0", False)):
        good.write_text(f"supervise_gate: {text}\ngrad_checkpointing: {text}\nspa_stages: [2, 3]\n")
        cfg = resolve_config(str(good), {})
        assert cfg.supervise_gate is value and cfg.grad_checkpointing is value and cfg.spa_stages == [2, 3]
    # YAML 1.1 booleans for the off/on choices, "none" for optional text, one list item: as the flags take them
    good.write_text("amp: off\ncheck_data: off\nval_data: none\nspa_stages: 3\nselect: null\n")
    cfg = resolve_config(str(good), {})
    assert (cfg.amp, cfg.check_data, cfg.val_data, cfg.spa_stages, cfg.select) == (
        "off",
        "off",
        None,
        [3],
        None,
    )
    good.write_text("amp: true\n")
    assert resolve_config(str(good), {}).amp == "auto"
    from spa.config import NONE

    assert resolve_config(None, {"spa_stages": [NONE]}).spa_stages is None  # --spa-stages none
    for text, match in (("lr: fast\n", "lr must be a number, got 'fast'"),
                        ("max_steps: 2.5\n", "max_steps must be an integer, got 2.5"),
                        ("batch_size: true\n", "batch_size must be an integer"),
                        ("lr: .nan\n", "lr must be a finite number"), ("lr: 'inf'\n", "lr must be a number"),
                        ("batch_size: none\n", "batch_size must be an integer"),
                        ("lr: null\n", "lr must be set"),
                        ("supervise_gate: nope\n", "supervise_gate must be true or false, got 'nope'"),
                        ("supervise_gate: 2\n", "supervise_gate must be true or false"),
                        ("spa_stages: two\n", r"spa_stages must be a list, e\.g\. spa_stages: \[2, 3\]"),
                        ("spa_stages: [true]\n", "spa_stages item must be an integer"),
                        ("data: 3\n", "data must be text, got 3"), ("pretrained: 5\n", "pretrained must be text"),
                        ("bad_images: ignore\n", r"bad_images must be one of \('error', 'skip'\)"),
                        ("model: spt_huge\n", "model must be one of")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            resolve_config(str(bad), {})


def test_a_device_that_is_not_there_is_refused_before_the_run(monkeypatch, tmp_path, capsys):
    from spa.engine.distributed import check_device
    from spa.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_device("cuda:0")
    with pytest.raises(ConfigError, match="not a device"):
        check_device("gpu")
    out = tmp_path / "run"
    assert main(["train", "--data", "builtin", "--data-dir", str(tmp_path / "d"), "--device", "cuda",
                 "--out", str(out), "--max-steps", "1"]) == 2  # fmt: skip
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()  # nothing written


@pytest.mark.parametrize("verb", [["bench", "block"], ["bench", "backbone"], ["viz"], ["demo"]])
def test_threads_must_be_a_positive_integer(verb, capsys):
    extra = ["--checkpoint", "c.pt", "--images", ".", "--out", "o"] if verb == ["viz"] else []
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            main([*verb, *extra, "--threads", bad])
        assert "expected an integer >= 1" in capsys.readouterr().err


def test_run_config_values_that_cannot_work_are_refused(tmp_path, capsys):
    from spa.config import RunConfig
    from spa.errors import ConfigError

    for kwargs, match in (({"img_size": 10}, "img_size must be >= 32"), ({"selection_alpha": -1.0}, "selection_alpha"),
                          ({"min_size": 128, "max_size": 64}, "must not exceed max_size")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            RunConfig(**kwargs)
    assert main(["train", "--img-size", "10", "--out", str(tmp_path / "r")]) == 2
    assert "img_size must be >= 32" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_options_this_run_never_reads_are_refused_for_new_runs(tmp_path, capsys):
    from spa.config import RunConfig
    from spa.errors import ConfigError

    for kwargs, match in (({"select": "all", "keep_threshold": 0.4}, "--select all ignores it"),
                          ({"select": "topk", "keep_threshold": 0.4}, "--keep-threshold is used by --select gate"),
                          ({"keep_ratio": 0.3}, "--select gate ignores it"),  # the default select is the gate
                          ({"select": "all", "keep_ratio": 0.3}, "--keep-ratio is used by --select topk")):  # fmt: skip
        cfg = RunConfig(**kwargs)  # a stored configuration still loads
        with pytest.raises(ConfigError, match=match):
            cfg.check_options()
    for kwargs, match in (({"task": "multilabel", "fpn_channels": 8, "min_size": 100},
                           "--fpn-channels, --min-size: detection option"),
                          ({"task": "classify", "detector": "mask_rcnn"}, "--task classify ignores them"),
                          ({"empty_images": "drop"}, "--empty-images: classification / multi-label option")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            RunConfig(**kwargs).check_options()
    for fine in ({}, {"keep_threshold": 0.4}, {"select": "gate", "keep_threshold": 0.4},
                 {"task": "multilabel", "empty_images": "drop"}, {"fpn_channels": 8, "min_size": 100},
                 {"select": "topk", "keep_ratio": 0.3}, {"select": "random", "keep_ratio": 0.3}):  # fmt: skip
        RunConfig(**fine).check_options()
    out = tmp_path / "r"
    argv = ["train", "--model", "spt_nano", "--select", "all", "--keep-threshold", "0.4", "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 2
    assert "--select all ignores it" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "d").exists()  # refused before any data is made


@pytest.mark.parametrize("verb", [["viz", "--checkpoint", "c.pt", "--images", "."], ["ablate", "selection"],
                                  ["ablate", "stages"], ["demo"]])  # fmt: skip
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(verb, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for out, says in ((mine, "is a file"), (mine / "sub", f"is under the file {mine}")):
        assert main([*verb, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} {says}; give a folder" in err and err.count("\n") == 1
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_spa_warnings_print_one_line_under_the_cli(capsys):
    import warnings

    from spa.data.common import warn_dropped
    from spa_cli import _one_line_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = []  # what reaches Python's own handling
        warnings.showwarning = lambda message, category, *rest: shown.append((str(message), category))
        before = warnings.showwarning
        with _one_line_warnings("data"):
            warn_dropped("set.json", "dropped degenerate boxes", ["ann 1", "ann 2"])
            warnings.warn("old API", DeprecationWarning, stacklevel=1)  # another class: as Python prints it
            warnings.warn("a library's own note", UserWarning, stacklevel=1)  # not spa's: as Python prints it
        assert warnings.showwarning is before
    err = capsys.readouterr().err
    assert "spa data: warning: set.json: dropped degenerate boxes: 2 (ann 1, ann 2)\n" in err
    assert "old API" not in err and "a library's own note" not in err
    assert shown == [("old API", DeprecationWarning), ("a library's own note", UserWarning)]  # passed on
