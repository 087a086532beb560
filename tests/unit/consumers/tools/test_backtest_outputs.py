"""What a new user of ``crossdistil backtest`` meets: an ``--out`` that holds exactly this backtest's outputs, a
report that words a comparison with no test properly, warnings that fit a Kafka range, and a misspelt ``--configs``
rung answered with the closest valid one and every valid form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumers.tools import backtest, comparison
from streamer.eventlog import EventLogWriter, read_event_log
from tests.unit.consumers.tools.test_backtest import CONFIG, cli

pytestmark = pytest.mark.unit


def test_an_out_folder_keeps_only_this_backtests_outputs_of_each_kind(drift_log: Path, config_file: Path,
                                                                     tmp_path: Path) -> None:
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
               "--out", str(tmp_path), "--limit", "1200", "--quiet") == 0
    assert {p.name for p in tmp_path.glob("series_*.csv")} == {"series_mtl.csv", "series_crossdistil.csv"}
    assert list(tmp_path.glob("auc_*.png"))
    (tmp_path / "traceback_old.txt").write_text("an earlier backtest's failure")
    (tmp_path / "notes.txt").write_text("the user's own")
    (tmp_path / "series_notes.md").write_text("not a kind the backtest writes")
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl",
               "--out", str(tmp_path), "--limit", "1200", "--quiet", "--no-plots") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.md", "series_mtl.csv",
                                                          "series_notes.md", "summary.json", "timing.json"]


def test_identical_configurations_are_no_tests_and_the_report_says_so(drift_log: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):  # the same configuration twice: the same predictions, every comparison identical
        (tmp_path / f"{name}.toml").write_text(CONFIG)
    out = tmp_path / "out"
    assert cli("--log", f"file://{drift_log}", "--config", str(tmp_path / "a.toml"), "--config",
               str(tmp_path / "b.toml"), "--out", str(out), "--limit", "1200", "--quiet", "--no-plots") == 0
    report = (out / "report.md").read_text()
    assert "No difference of this report is a test: every comparison is identical" in report
    assert "across all 0 comparisons" not in report
    adjustment = json.loads((out / "summary.json").read_text())["comparison"]["method"]["adjustment"]
    assert adjustment["comparisons"] == 0 and "0 paired differences" not in adjustment["what"]


def test_the_holm_wording_of_a_single_test_is_singular() -> None:
    adjustment = comparison.adjust([{"tasks": {"click": {"difference": 0.01, "interval": [0.001, 0.02],
                                                                  "p_value": 0.01, "verdict": "better"}}}])
    data = {"comparison": {"baseline": "a", "configurations": {}, "method": {
        "level": 0.95, "resamples": 10, "blocks": 5, "seed": 0, "adjustment": adjustment}}}
    text = "\n".join(backtest._comparison_lines(data))
    assert "across the one comparison of this report" in text and "all 1 comparisons" not in text


def test_a_kafka_ranges_stream_warnings_speak_of_partitions_not_of_a_log(drift_log: Path, config_file: Path,
                                                                         tmp_path: Path) -> None:
    path = tmp_path / "reversed.evlog"
    with EventLogWriter(path) as log:
        for record in reversed(list(read_event_log(drift_log))[:1_200]):
            log.write(record.topic, record.key, record.event)
    records, _ = backtest.log_records(f"file://{path}")
    configs = backtest.build_configs([str(config_file)], "mtl", ["join.attribution_window_s={click = 1, like = 1}"])
    result = backtest.run_backtest(records, configs, batching="dense", intake="inline")
    as_log = backtest.summary(result, {"kind": "log"})["warnings"]
    as_kafka = backtest.summary(result, {"kind": "kafka"})["warnings"]
    assert any("is the log in event-time order" in w for w in as_log)
    late = [w for w in as_kafka if "arrived after the event-time watermark" in w]
    assert len(late) == 1 and "were some partitions written out of event-time order" in late[0]
    assert not any("log" in w for w in as_kafka), as_kafka


def test_a_misspelt_rung_names_the_closest_one_and_every_valid_form() -> None:
    with pytest.raises(ValueError) as error:
        backtest.build_configs([], "mtl,crosdistil", [])
    message = str(error.value)
    assert message.startswith("--configs: unknown rung 'crosdistil' (did you mean 'crossdistil'?)")
    for form in ("mtl, aux, kd, cal, crossdistil, direct_kd", "river_lr, river_fm", "vw, vw_q", "RUNG@PRESET",
                 "crossdistil@paper"):
        assert form in message
    assert "('mtl'" not in message  # not a Python tuple
    with pytest.raises(ValueError, match=r"unknown rung 'river_lx' in 'river_lx@paper' \(did you mean 'river_lr'"):
        backtest.build_configs([], "river_lx@paper", [])
