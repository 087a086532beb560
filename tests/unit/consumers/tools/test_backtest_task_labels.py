"""A backtest's end-of-replay word on its tasks' labels, said once (summary.json and stderr), and the replay's log
records, whatever sequence of topics they were given."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from consumers.tools import backtest, intake

pytestmark = pytest.mark.unit


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def test_the_replays_warnings_are_made_once_for_the_summary_and_stderr(
        drift_log: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    def counted(result: backtest.BacktestResult, **_: object) -> list[str]:
        made.append(1)
        return ["a warning made once"]

    monkeypatch.setattr(backtest, "replay_stream_warnings", counted)
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl", "--limit", "600",
               "--out", str(tmp_path), "--quiet", "--no-plots") == 0
    assert len(made) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"][-1] == "a warning made once"
    assert "crossdistil backtest: warning: a warning made once" in capsys.readouterr().err


def test_log_records_keep_the_topics_as_a_tuple_whatever_sequence_came_in(drift_log: Path) -> None:
    url = f"file://{drift_log}"
    records, desc = intake.log_records(url, topics=["impressions", "feedback"])
    assert records.topics == ("impressions", "feedback") and desc["topics"] == ["impressions", "feedback"]
    # as the intake child makes them from its JSON hello: equal, and hashable as a frozen dataclass is
    from_hello = intake.LogRecords(url, None, None, None, ["impressions", "feedback"])
    assert from_hello == records and hash(from_hello) == hash(records)
    assert intake.LogRecords(url).topics is None
