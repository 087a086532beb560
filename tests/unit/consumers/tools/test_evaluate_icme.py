"""``crossdistil evaluate``: flag parsing, the report renderer, and a smoke run on the real ICME 2019 sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from consumers.cli import main
from consumers.tools import evaluate

pytestmark = pytest.mark.unit

ICME = Path(__file__).resolve().parents[4] / ".." / "shared" / "data" / "icme2019"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_seeds_flag_takes_a_count_or_a_list() -> None:
    assert evaluate.parse_seeds("3") == [0, 1, 2]
    assert evaluate.parse_seeds("4,9") == [4, 9]
    with pytest.raises(ValueError, match="--seeds"):
        evaluate.parse_seeds("many")


def test_list_flags_reject_unknown_names_and_say_which_are_valid() -> None:
    with pytest.raises(ValueError, match="choose from .*crossdistil"):
        evaluate.parse_list("mtl,crossdistill", evaluate.CONFIGS, "--configs")


def test_model_options_are_typed() -> None:
    assert evaluate.parse_pairs(["kd_weight=0.5", "quadruplet_pairs=all", "hidden_dims=64,32", "bf16=false"],
                                "--model-option") == {"kd_weight": 0.5, "quadruplet_pairs": "all",
                                                      "hidden_dims": [64, 32], "bf16": False}


def _fake_run(config: str, seed: int, auc: float) -> dict:
    metrics = {t: {"auc": auc, "gauc": auc, "multi_auc": None, "log_loss": 0.5, "calibration": 1.0, "n": 10,
                   "positive_rate": 0.5} for t in ("finish", "like")}
    return {"tasks": ["finish", "like"], "config": config, "backbone": "mmoe", "seed": seed, "mode": "split",
            "metrics": {"test": metrics},
            "curve": [{"events": 5, "fraction": 1.0, "auc": {"finish": auc, "like": auc}}],
            "losses": {}, "train_events": 8, "test_events": 2, "seconds": 0.1}


def test_report_has_a_row_per_configuration_with_mean_and_std_and_paired_differences() -> None:
    doc = {"dataset": "x", "command": "crossdistil evaluate ...",
           "runs": [_fake_run("mtl", 0, 0.70), _fake_run("mtl", 1, 0.72),
                    _fake_run("crossdistil", 0, 0.71), _fake_run("crossdistil", 1, 0.74)]}
    report = evaluate.render_report(doc)
    assert "| mmoe | mtl | 0.7100 ± 0.0141 |" in report
    assert "| mmoe | crossdistil | 0.7250 ± 0.0212 |" in report
    # Paired differences: +0.01 and +0.02 -> mean +0.015, std 0.0071.
    assert "+0.0150 ± 0.0071" in report
    assert "–" in report  # undefined Multi-AUC is shown as a dash, not as nan


@pytest.mark.slow
def test_evaluate_smoke_run_on_the_icme_sample_writes_three_sane_files(tmp_path: Path) -> None:
    if not ICME.exists():
        pytest.skip(f"real data not found at {ICME} (the shared data folder is absent on this machine)")
    out = tmp_path / "report"
    status = main(["evaluate", "--dataset", "icme2019", "--source", str(ICME), "--tasks", "finish,like",
                   "--backbone", "shared_bottom,mmoe", "--configs", "mtl,crossdistil", "--seeds", "2",
                   "--mode", "both", "--batch-size", "64", "--hash-buckets", "16384", "--device", "cpu",
                   "--curve-points", "3",
                   "--out", str(out)])
    assert status == 0
    doc = json.loads((out / "results.json").read_text())
    # 2 modes x 2 backbones x 2 configs x 2 seeds
    assert len(doc["runs"]) == 16
    for run in doc["runs"]:
        window = "test" if run["mode"] == "split" else "all"
        finish = run["metrics"][window]["finish"]
        assert 0.0 <= finish["auc"] <= 1.0
        assert math.isfinite(finish["log_loss"]) and finish["log_loss"] > 0
        assert run["curve"] and run["seed"] in (0, 1)
    split = [r for r in doc["runs"] if r["mode"] == "split"]
    assert {r["metrics"]["test"]["finish"]["n"] for r in split} == {200}  # last 20 % of 1,000 events
    report = (out / "report.md").read_text()
    for backbone in ("shared_bottom", "mmoe"):
        for config in ("mtl", "crossdistil"):
            assert f"| {backbone} | {config} |" in report
    assert (out / "auc_curve.png").read_bytes()[:8] == PNG_SIGNATURE


def test_evaluate_refuses_a_task_the_data_set_does_not_have(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not ICME.exists():
        pytest.skip(f"real data not found at {ICME} (the shared data folder is absent on this machine)")
    status = main(["evaluate", "--dataset", "icme2019", "--source", str(ICME), "--tasks", "finish,click",
                   "--out", str(tmp_path)])
    assert status == 2
    assert "not tasks of" in capsys.readouterr().err


def test_evaluate_refuses_cuda_graphs_without_a_cuda_device(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not ICME.exists():
        pytest.skip(f"real data not found at {ICME} (the shared data folder is absent on this machine)")
    status = main(["evaluate", "--dataset", "icme2019", "--source", str(ICME), "--device", "cpu", "--cuda-graphs",
                   "--out", str(tmp_path)])
    assert status == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
