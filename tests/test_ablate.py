"""``spa ablate``: every variant trains, evaluates and lands in the table and JSON with finite numbers."""

from __future__ import annotations

import json
import math

import pytest

from spa.ablate import (
    SELECTION_VARIANTS,
    STAGE_VARIANTS,
    ablate_selection,
    ablate_stages,
    selection_table,
    stages_table,
)
from spa.cli import main
from spa.data import ensure_builtin

TINY = dict(images=2, val_images=2, img_size=64, steps=1, batch_size=2, warmup_steps=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One tiny built-in set for every test here (the ablations reuse it: same parameters)."""
    root = tmp_path_factory.mktemp("ablate") / "data"
    ensure_builtin(root, images=2, val_images=2, size=64, coverage=0.2, seed=0)
    return str(root)


def test_selection_ablation_tiny(tmp_path, data_dir):
    out = tmp_path / "sel"
    result = ablate_selection(out=out, data_dir=data_dir, seeds=[0], **TINY)
    assert list(result["variants"]) == list(SELECTION_VARIANTS)
    for name, row in result["variants"].items():
        for key in ("mAP", "keep", "gmacs_kept", "gmacs_executed"):
            assert math.isfinite(row[key]), (name, key)
        assert row["mAP_std"] == 0.0 and len(row["runs"]) == 1
    assert result["variants"]["dense"]["keep"] == 1.0
    assert result["variants"]["topk"]["keep"] == pytest.approx(0.5, abs=0.1)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["variants"]) == set(SELECTION_VARIANTS)
    table = (out / "results.md").read_text()
    for description, _ in SELECTION_VARIANTS.values():
        assert description in table
    assert selection_table(saved).count("\n") == len(SELECTION_VARIANTS) + 1


@pytest.mark.slow
def test_stages_ablation_tiny(tmp_path, data_dir):
    out = tmp_path / "st"
    result = ablate_stages(out=out, data_dir=data_dir, **TINY)
    assert list(result["variants"]) == list(STAGE_VARIANTS)
    for name, row in result["variants"].items():
        for key in ("AP", "AP50", "gmacs_kept", "gmacs_executed"):
            assert math.isfinite(row[key]), (name, key)
        assert len(row["keep_by_stage"]) == len(STAGE_VARIANTS[name])
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in STAGE_VARIANTS)
    assert stages_table(result) in table


@pytest.mark.slow
def test_cli_one_variant_each(tmp_path, data_dir, capsys):
    args = ["--data-dir", data_dir, "--images", "2", "--val-images", "2", "--img-size", "64"]
    args += ["--steps", "1", "--batch-size", "2", "--warmup-steps", "1"]
    main(
        ["ablate", "selection", *args, "--seeds", "1", "--variants", "gate_sup", "--out", str(tmp_path / "s")]
    )
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert list(saved["variants"]) == ["gate_sup"] and saved["settings"]["seeds"] == [1]
    main(["ablate", "stages", *args, "--variants", "{3,4}", "--out", str(tmp_path / "t")])
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert list(saved["variants"]) == ["{3,4}"] and math.isfinite(saved["variants"]["{3,4}"]["AP50"])
    assert "| {3,4} |" in capsys.readouterr().out


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="built-in set"):
        ablate_selection(out=tmp_path, data="voc:/x")
    with pytest.raises(ValueError, match="unknown variant"):
        ablate_selection(out=tmp_path, variants=["sparse"])
    with pytest.raises(ValueError, match="seed"):
        ablate_selection(out=tmp_path, seeds=[])
    with pytest.raises(ValueError, match="unknown stage set"):
        ablate_stages(out=tmp_path, variants=["{1}"])
    with pytest.raises(SystemExit):
        main(["--debug", "ablate", "selection", "--variants", "sparse"])
