"""``crossdistil backtest --skip-damaged``: a damaged event log stops a backtest by default (exit 2, the message names
the flag); with the flag the damaged records are skipped, the replay's numbers are those of the log without them,
the same inline, with the intake process and from the replay cache, and summary.json (``skipped_records``), the
report's warnings and stderr say how many, of what kind and where."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgpack
import pytest

from consumers.tools import backtest, intake
from streamer.eventlog import EventLogError, EventLogWriter, read_event_log_entries
from tests.unit.consumers.tools.test_backtest_batching import predictions_digest

pytestmark = pytest.mark.unit

WINDOWS = ("join.attribution_window_s={click = 60, like = 120}",)
JUNK = [msgpack.packb("a header another tool wrote", use_bin_type=True),
        msgpack.packb({"topic": "impressions", "key": "k", "value": 1}, use_bin_type=True),
        msgpack.packb({"topic": "", "key": "k", "event": {}}, use_bin_type=True)]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The messy log of test_backtest_intake damaged (a header first, records that are not records in its middle, a
    record with a key that is not UTF-8, the last record cut short), and the clean log the damage leaves: the same
    records less the one with the bad key and the last one."""
    from tests.unit.consumers.tools.test_backtest_intake import messy_events

    folder = tmp_path_factory.mktemp("damaged")
    whole = folder / "whole.evlog"
    with EventLogWriter(whole) as log:
        for event in messy_events():
            log.write("feedback" if "task" in event else "impressions", "k", event)
    data = whole.read_bytes()
    bounds, start = [], 0
    for *_, size in read_event_log_entries(whole):
        bounds.append((start, start + size))
        start += size
    records = [data[a:b] for a, b in bounds]
    utf8 = 400  # this record's key becomes a byte that is not UTF-8
    assert records[utf8].count(b"\xa3key\xa1k") == 1
    damaged_parts, clean_parts = [JUNK[0]], []
    for n, raw in enumerate(records):
        if n == utf8:
            damaged_parts.append(raw.replace(b"\xa3key\xa1k", b"\xa3key\xa1\xff"))
            continue
        if n == len(records) - 1:
            damaged_parts.append(raw[:-6])
            continue
        damaged_parts.append(raw)
        clean_parts.append(raw)
        if n in (100, 900):
            damaged_parts.append(JUNK[1 if n == 100 else 2])
    out = {"damaged": folder / "damaged.evlog", "clean": folder / "clean.evlog"}
    out["damaged"].write_bytes(b"".join(damaged_parts))
    out["clean"].write_bytes(b"".join(clean_parts))
    return out


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def replay(log: Path, config_file: Path, skip: bool, **kwargs) -> tuple[backtest.BacktestResult, dict]:
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", list(WINDOWS))
    records, desc = backtest.log_records(f"file://{log}", skip_damaged=skip)
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, **kwargs)
    return result, backtest.summary(result, desc)


def without_damage(summary: dict) -> dict:
    """A summary less what differs between a damaged log replayed with --skip-damaged and the clean log."""
    out = {k: v for k, v in summary.items() if k not in ("skipped_records", "warnings")}
    out["input"] = {k: v for k, v in summary["input"].items() if k not in ("log", "skip_damaged")}
    out["warnings"] = [w for w in summary["warnings"] if not w.startswith("--skip-damaged")]
    return out


def test_a_damaged_log_stops_a_backtest_naming_the_flag(logs: dict, config_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    common = ("--log", f"file://{logs['damaged']}", "--config", str(config_file), "--configs", "mtl", "--quiet",
              "--no-plots", "--set", WINDOWS[0])
    assert cli(*common, "--out", str(tmp_path / "strict")) == 2
    err = capsys.readouterr().err
    assert "record 0 must be a map with keys topic, key, event; got str: is this an event log?" in err
    assert not (tmp_path / "strict").exists()
    for mode in ("inline", "process"):
        records, _ = backtest.log_records(f"file://{logs['damaged']}")
        with pytest.raises(EventLogError, match="is this an event log"):
            backtest.run_backtest(records, backtest.build_configs([str(config_file)], "mtl", list(WINDOWS)),
                                  batching="dense", intake=mode)


@pytest.mark.parametrize("batching", ["dense", "event-time"])
def test_skipping_gives_the_numbers_of_the_log_without_the_damage(logs: dict, config_file: Path,
                                                                  batching: str) -> None:
    configs = lambda: backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))  # noqa: E731
    results = {}
    for name, skip in (("clean", False), ("damaged", True)):
        records, desc = backtest.log_records(f"file://{logs[name]}", skip_damaged=skip)
        result = backtest.run_backtest(records, configs(), batching=batching, sample_every=100, intake="inline")
        results[name] = (result, backtest.summary(result, desc))
    (clean, clean_summary), (damaged, damaged_summary) = results["clean"], results["damaged"]
    assert predictions_digest(damaged.runs["mtl"]) == predictions_digest(clean.runs["mtl"])
    assert damaged.runs["mtl"].series == clean.runs["mtl"].series
    assert without_damage(damaged_summary) == without_damage(clean_summary)
    skipped = damaged_summary["skipped_records"]
    assert skipped["records"] == 5 and skipped["by_reason"] == {"not_a_record": 2, "bad_field": 1,
                                                                 "invalid_utf8": 1, "truncated": 1}
    # each record's index in the file: the header is record 0, so record n of the clean log is n + 1 up to the junk
    # after it (102), the record with the bad key (402), the junk after record 900, the cut-short last one
    whole = sum(1 for _ in read_event_log_entries(logs["clean"])) + 2
    assert [e["record"] for e in skipped["first"]] == [0, 102, 402, 903, whole + 2]
    assert [e["reason"] for e in skipped["first"]] == ["not_a_record", "not_a_record", "invalid_utf8", "bad_field",
                                                       "truncated"]
    assert skipped["first"][0]["byte"] == 0 and skipped["first"][4]["bytes"] > 0
    assert damaged_summary["warnings"][0].startswith("--skip-damaged: 5 damaged records skipped (")
    assert "skipped_records" not in clean_summary and "skip_damaged" not in clean_summary["input"]


def test_the_intake_process_and_the_replay_cache_skip_the_same(logs: dict, config_file: Path, tmp_path: Path) -> None:
    inline = replay(logs["damaged"], config_file, True, intake="inline")[1]
    process = replay(logs["damaged"], config_file, True, intake="process", replay_cache=tmp_path)
    cached = replay(logs["damaged"], config_file, True, intake="process", replay_cache=tmp_path)
    assert (process[0].intake, cached[0].intake) == ("process", "cache")
    text = lambda s: json.dumps(s, sort_keys=True, default=backtest._json_default)  # noqa: E731
    assert text(process[1]) == text(inline) == text(cached[1])
    assert inline["skipped_records"]["records"] == 5
    # a strict replay of the same log is another cache entry (it must fail, not read what a skipping one kept)
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", list(WINDOWS))
    strict, _ = backtest.log_records(f"file://{logs['damaged']}")
    with pytest.raises(EventLogError):
        backtest.run_backtest(strict, configs, batching="dense", replay_cache=tmp_path)
    skipping, _ = backtest.log_records(f"file://{logs['damaged']}", skip_damaged=True)
    groups = [backtest._intake_group(leader) for leader in backtest._grouped_runs(configs, "dense", 100)[1].values()]
    keys = {intake.ReplayCache(tmp_path, r, groups, backtest.DENSE_TRAIN_EVERY).path for r in (strict, skipping)}
    assert len(keys) == 2


def test_the_command_says_what_it_skipped_in_the_summary_the_report_and_on_stderr(
        logs: dict, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("--log", f"file://{logs['damaged']}", "--config", str(config_file), "--configs", "mtl", "--quiet",
               "--no-plots", "--set", WINDOWS[0], "--skip-damaged", "--batching", "dense",
               "--out", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert "warning: --skip-damaged: 5 damaged records skipped" in err
    assert "the last record was cut short: its" in err
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["input"]["skip_damaged"] is True and data["skipped_records"]["records"] == 5
    assert "> **Warning**: --skip-damaged: 5 damaged records skipped" in (tmp_path / "report.md").read_text()


def test_a_log_with_nothing_but_damage_has_nothing_to_replay(config_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "junk.evlog"
    log.write_bytes(b"".join(JUNK))
    assert cli("--log", f"file://{log}", "--config", str(config_file), "--quiet", "--skip-damaged",
               "--out", str(tmp_path / "out")) == 2
    assert "has no records that are not damaged (3 damaged records skipped" in capsys.readouterr().err


def test_skip_damaged_is_for_an_event_log(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("--kafka", "127.0.0.1:1", "--config", str(config_file), "--skip-damaged", "--out",
               str(tmp_path / "out")) == 2
    assert "--skip-damaged applies to an event log (--log)" in capsys.readouterr().err
