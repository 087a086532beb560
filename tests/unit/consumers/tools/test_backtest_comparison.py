"""``crossdistil backtest`` with several configurations: each against the first, paired on the same samples, with a
bootstrap interval and a verdict that does not call noise a win; and the report's header says what was replayed and
how to replay it again (consumers/tools/comparison.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from consumers.tools import backtest, comparison
from models.metrics import auc
from tests.unit.consumers.tools.test_backtest import CONFIG, cli

pytestmark = pytest.mark.unit


def two_models(n: int, signal_a: float, signal_b: float, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Labels and two models' scores: each the label times its signal plus noise of its own."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    return y, signal_a * y + rng.normal(size=n), signal_b * y + rng.normal(size=n)


def test_the_interval_is_that_of_a_block_bootstrap_of_exact_aucs() -> None:
    y, a, b = two_models(3000, 1.0, 1.2)
    b = 0.5 * a + 0.5 * b  # correlated with a, as two configurations trained on the same samples are
    resamples, blocks = 400, 50
    got = comparison.paired_auc_difference(y, a, b, resamples=resamples, blocks=blocks, seed=7)
    # the same resamples of the same blocks, each resample's AUCs computed exactly
    drawn = np.random.default_rng(7).integers(0, blocks, size=(resamples, blocks))
    edges = np.linspace(0, len(y), blocks + 1).astype(int)
    exact = []
    for row in drawn:
        index = np.concatenate([np.arange(edges[k], edges[k + 1]) for k in row])
        exact.append(auc(y[index], b[index]) - auc(y[index], a[index]))
    want = np.quantile(exact, [0.025, 0.975])
    assert got["difference"] == pytest.approx(auc(y, b) - auc(y, a), abs=1e-12)
    width = want[1] - want[0]
    assert got["interval"] == pytest.approx(list(want), abs=0.1 * width), (got["interval"], want)


def test_a_difference_of_a_thousandth_on_20k_samples_is_within_noise_not_a_win() -> None:
    y, a, b = two_models(20_000, 1.0, 1.0)  # two models of the same quality, each with its own noise
    for base, other in ((a, b), (b, a)):  # whichever way round: one is ahead by a little, which is not a win
        got = comparison.paired_auc_difference(y, base, other)
        assert 0 < abs(got["difference"]) < 0.005
        assert got["interval"][0] < 0 < got["interval"][1]
        assert got["verdict"] == "within noise"


def test_a_real_improvement_is_better_and_the_reverse_worse() -> None:
    y, a, b = two_models(20_000, 1.0, 1.3)
    assert comparison.paired_auc_difference(y, a, b)["verdict"] == "better"
    assert comparison.paired_auc_difference(y, b, a)["verdict"] == "worse"


def test_the_interval_is_seeded() -> None:
    y, a, b = two_models(5000, 1.0, 1.1)
    assert comparison.paired_auc_difference(y, a, b) == comparison.paired_auc_difference(y, a, b)


def test_identical_predictions_are_identical_not_a_zero_win() -> None:
    y, a, _ = two_models(1000, 1.0, 1.0)
    got = comparison.paired_auc_difference(y, a, a.copy())
    assert got["verdict"] == "identical" and got["difference"] == 0.0 and got["interval"] == [0.0, 0.0]


def test_a_diverged_configuration_is_not_compared() -> None:
    y, a, b = two_models(1000, 1.0, 1.0)
    b[10] = np.nan
    got = comparison.paired_auc_difference(y, a, b)
    assert got["verdict"] == "not comparable" and "not finite" in got["why"] and got["difference"] is None


@dataclass
class Run:
    impression_ids: list[str]
    columns: dict[str, tuple[np.ndarray, np.ndarray]]

    def arrays(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        return self.columns[task]


def test_samples_are_paired_by_impression_and_different_labels_are_not_compared() -> None:
    y, a, b = two_models(400, 1.0, 1.0)
    ids = [f"i{k}" for k in range(400)]
    order = np.random.default_rng(0).permutation(400)[:390]  # the other replay trained 390 of them, in its order
    flipped = y.copy()
    flipped[:5] = ~flipped[:5]  # other attribution windows: other labels
    base = Run(ids, {"click": (y, a), "like": (y, a)})
    other = Run([ids[k] for k in order] + ["new"], {"click": (np.r_[y[order], True], np.r_[b[order], 0.5]),
                                                    "like": (np.r_[flipped[order], True], np.r_[b[order], 0.5])})
    got = comparison.compare_runs({"A": base, "B": other}, {"A": ["click", "like"], "B": ["click", "like"]},
                                  {"A": ["click", "like"], "B": ["click", "like"]}, 0.2)["configurations"]["B"]
    assert (got["samples"], got["only_baseline"], got["only_this"]) == (390, 10, 1)
    shared = np.sort(order)
    assert got["tasks"]["click"]["difference"] == pytest.approx(auc(y[shared], b[shared]) - auc(y[shared], a[shared]))
    assert got["tasks"]["like"]["verdict"] == "not comparable" and "labels differ" in got["tasks"]["like"]["why"]
    assert "combined" not in got  # its label is built of the tasks' labels, which differ


def test_the_verdict_line_says_when_a_win_is_the_warm_up_only() -> None:
    row = {"verdict": "better", "difference": 0.02, "last": {"verdict": "within noise"}}
    line = comparison.summary_line({"tasks": {"click": row, "like": {**row, "last": {"verdict": "better"}}}}, 0.2)
    assert line == "better on click (+0.0200; last 20%: within noise), like (+0.0200)"


def test_config_differences_name_every_effective_setting_that_differs() -> None:
    got = comparison.config_differences({"mtl": {"model": {"options": {"rung": "mtl"}}, "seed": 0},
                                         "b": {"model": {"options": {"rung": "kd", "kd_gate": "none"}}, "seed": 0}})
    assert got == {"b": {"model.options.kd_gate": [None, "none"], "model.options.rung": ["mtl", "kd"]}}


def test_the_command_names_the_environment_overrides_and_quotes_the_arguments(monkeypatch) -> None:
    monkeypatch.setenv("CROSSDISTIL__BATCHING__BATCH_SIZE", "64")
    got = backtest.command_line(["crossdistil", "backtest", "--log", "file:///a b.evlog", "--limit", "10"])
    assert got == "CROSSDISTIL__BATCHING__BATCH_SIZE=64 crossdistil backtest --log 'file:///a b.evlog' --limit 10"


def test_the_report_says_which_is_better_what_was_replayed_and_how_to_replay_it(
        drift_log: Path, config_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil@paper",
            "--out", str(tmp_path), "--sample-every", "500", "--quiet", "--no-plots"]
    monkeypatch.setattr(sys, "argv", ["crossdistil", "backtest", *argv])
    assert cli(*argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    timing = json.loads((tmp_path / "timing.json").read_text())
    report = (tmp_path / "report.md").read_text()
    got = summary["comparison"]
    assert got["baseline"] == "mtl" and got["method"]["seed"] == comparison.SEED
    entry = got["configurations"]["crossdistil@paper"]
    assert entry["samples"] == 3000 and set(entry["tasks"]) == {"click", "like"} and "combined" in entry
    for row in [*entry["tasks"].values(), entry["combined"]]:
        assert row["interval"][0] <= row["difference"] <= row["interval"][1]
        assert row["verdict_unadjusted"] == comparison.verdict(row["difference"], row["interval"])
    assert summary["replayed"]["config_differences"]["crossdistil@paper"]["model.options.rung"] == ["mtl",
                                                                                                    "crossdistil"]
    first, last = summary["replayed"]["event_time_ms"].values()
    assert first < last
    assert timing["command"] == "crossdistil backtest " + " ".join(argv) and timing["code"]["commit"]
    assert "## Which configuration is better" in report and f"- **`crossdistil@paper` vs `mtl`** on 3,000 samples: " \
        f"{entry['summary']}." in report
    assert f"    {timing['command']}" in report and "| crossdistil@paper | `model.options.rung` |" in report
    assert "`auc@N` and `log_loss@N` (N = 500, 1,000) are over the last N trained samples" in report
    said = f"crossdistil@paper vs mtl (paired, 95% interval, Holm-adjusted): {entry['summary']}"
    assert said in capsys.readouterr().out


def test_configurations_replayed_apart_are_paired_and_their_different_labels_not_compared(
        drift_log: Path, config_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short_click.toml"  # clicks arrive ~2 s after their impression: a 1 s window loses most
    short.write_text(CONFIG.replace("click = 60", "click = 1"))
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--config", str(short),
               "--out", str(tmp_path / "out"), "--sample-every", "500", "--quiet", "--no-plots") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["replayed"]["groups"] == [["base"], ["short_click"]]
    entry = summary["comparison"]["configurations"]["short_click"]
    assert entry["tasks"]["click"]["verdict"] == "not comparable"
    like = entry["tasks"]["like"]  # its window is the same: the same labels, so a paired difference
    assert like["samples"] == 3000 and like["verdict"] in ("better", "worse", "within noise")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Replayed apart" in report
    assert "| short_click | click | | | | | | | not comparable: the labels differ" in report


def test_a_final_windowed_auc_over_a_window_the_replay_did_not_fill_says_so() -> None:
    config = {"tasks": ["click"], "prequential_auc": {"click": 0.7}, "prequential_auc_last_20pct": {"click": 0.72},
              "final": {"click": {"auc@500": 0.7, "log_loss@500": 0.4}}, "drift_detections": [],
              "trained_samples": 300, "steps": 3, "dead_letters": 0, "join": {}}
    report = backtest.render_report({"input": {"log": "file:///x.evlog"}, "records": 600, "events": 600,
                                     "configurations": {"mtl": config}}, {"seconds": 1.0, "records_per_s": 600}, [])
    assert "| 0.7000 (auc@500, window not full: all 300 samples) |" in report
