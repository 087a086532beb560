"""A dense backtest of an event log with an intake process (``consumers.tools.intake``: the log read, validated,
joined, batched and encoded in a child while this process trains) gives the numbers of the inline replay, bit for
bit, and fails the way it does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.runtime.processes import can_fork
from consumers.tools import backtest, intake
from streamer.eventlog import EventLogError, EventLogWriter
from tests.unit.consumers.tools.test_backtest_batching import predictions_digest
from tests.unit.consumers.tools.test_backtest_log_records import BAD

pytestmark = pytest.mark.unit

WINDOWS = ("join.attribution_window_s={click = 60, like = 120}",)


def messy_events(n: int = 1200, seed: int = 5) -> list[dict]:
    """Impressions (features that differ in names, types and number) and their feedback in event-time order, with
    what the join and the validator must tell apart: bad events, a batch envelope, duplicate impressions, feedback
    before its impression, late feedback, orphans, an unknown task and int feedback values."""
    rng = random.Random(seed)
    events: list[dict] = []
    for i in range(n):
        ts = 1_000_000 + 1_000 * i
        features = {"item_category": rng.choice(["a", "b", "c", ""]), "duration_s": rng.choice([3, 7.5, 0])}
        if i % 7 == 0:
            del features["duration_s"]
        if i % 11 == 0:
            features = {"duration_s": 2.0, "item_category": "b", "extra": i}  # the same count, other names
        impression = {"v": 1, "impression_id": f"i{i}", "ts_ms": ts, "user_id": f"u{i % 37}",
                      "item_id": f"v{rng.randrange(90)}", "features": features}
        click = {"v": 1, "impression_id": f"i{i}", "ts_ms": ts + rng.randrange(0, 50_000), "task": "click",
                 "value": rng.choice([0, 1, 1.0, 0.0])}
        events += [click, impression] if i % 13 == 0 else [impression, click]  # feedback before its impression
        if i % 17 == 0:
            events.append({**click, "ts_ms": ts + 30_000, "task": "like", "value": 1})
        if i % 19 == 0:
            events.append({**impression, "features": {"dup": 1}})  # a duplicate impression
        if i % 23 == 0 and i > 130:  # in its window (120 s), which closed before it came: late
            events.append({"v": 1, "impression_id": f"i{i - 130}", "ts_ms": ts - 30_000, "task": "like", "value": 1})
        if i % 41 == 0:  # after its task's window (60 s)
            events.append({**click, "ts_ms": ts + 70_000, "value": 1})
        if i % 29 == 0:
            events.append({"v": 1, "impression_id": f"gone{i}", "ts_ms": ts, "task": "click", "value": 1})  # orphan
        if i % 31 == 0:
            events.append({"v": 1, "impression_id": f"i{i}", "ts_ms": ts + 5, "task": "share", "value": 1})
        if i % 97 == 0:
            events.append(BAD[(i // 97) % len(BAD)])
        if i % 211 == 0:
            events.append({"v": 1, "batch": [{**impression, "impression_id": f"b{i}"}, {**click, "task": "like"}]})
    return events


@pytest.fixture(scope="module")
def messy_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "messy.evlog"
    with EventLogWriter(path) as log:
        for event in messy_events():
            log.write("feedback" if "task" in event else "impressions", "k", event)
    return path


def replay(log: Path, config_file: Path, mode: str, rungs: str = "mtl,crossdistil", overrides: tuple = WINDOWS,
           **limits) -> tuple[str, dict[str, str], dict[str, str]]:
    """The summary (as JSON text), each configuration's series CSV and predictions digest (with the users' codes
    and event times: an intake process codes the users itself)."""
    configs = backtest.build_configs([str(config_file)], rungs, list(overrides))
    records, desc = backtest.log_records(f"file://{log}", **limits)
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, intake=mode)
    assert result.intake == mode
    summary = json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default)
    return (summary, {n: backtest.series_csv(r.series) for n, r in result.runs.items()},
            {n: (predictions_digest(r), r.users().tobytes(), r.event_ts_ms) for n, r in result.runs.items()})


def test_an_intake_replay_of_a_messy_log_is_the_inline_one(messy_log: Path, config_file: Path) -> None:
    inline = replay(messy_log, config_file, "inline")
    assert replay(messy_log, config_file, "process") == inline
    summary = json.loads(inline[0])
    join = summary["configurations"]["mtl"]["join"]
    assert summary["configurations"]["mtl"]["dead_letters"] >= 10  # bad events, dead-lettered the same way
    for counter in ("late_feedback", "early_feedback_matched", "orphan_feedback", "duplicate_impressions",
                    "unknown_task_feedback", "outside_window_feedback"):
        assert join[counter] > 0, counter


def test_an_intake_replay_keeps_the_time_range_and_the_limit(messy_log: Path, config_file: Path) -> None:
    for limits in ({"limit": 777}, {"from_ms": 1_200_000, "to_ms": 1_900_000}, {"from_ms": 1_500_000, "limit": 300}):
        assert replay(messy_log, config_file, "process", "mtl", **limits) == replay(
            messy_log, config_file, "inline", "mtl", **limits), limits


def test_an_intake_replay_encodes_each_feature_set_and_each_group(drift_log: Path, config_file: Path) -> None:
    # three configurations: two read other features (one group, two encodings), one cuts other batches (a group)
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", [])
    configs["buckets"] = backtest.build_configs(
        [str(config_file)], "mtl", ["model.options.features={categorical = ['user_id', 'item_id'], "
                                    "hash_buckets = 4096}"])["mtl"]
    configs["small"] = backtest.build_configs([str(config_file)], "mtl", ["batching.batch_size=64"])["mtl"]
    digests = {}
    for mode in ("inline", "process"):
        records, desc = backtest.log_records(f"file://{drift_log}")
        result = backtest.run_backtest(records, configs, batching="dense", sample_every=250, intake=mode)
        assert result.runs["buckets"].leader == "mtl" and result.runs["small"].leader is None
        digests[mode] = ({n: predictions_digest(r) for n, r in result.runs.items()},
                         {n: r.series for n, r in result.runs.items()},
                         json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default))
    assert digests["process"] == digests["inline"]


def test_auto_takes_the_process_where_it_applies_and_process_says_why_not(drift_log: Path, config_file: Path,
                                                                          messy_log: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))
    records, _ = backtest.log_records(f"file://{messy_log}", limit=200)
    assert backtest.run_backtest(records, configs, batching="dense").intake == "process"
    assert backtest.run_backtest(records, configs, batching="event-time").intake == "inline"
    with pytest.raises(ValueError, match="event-time batching"):
        backtest.run_backtest(records, configs, batching="event-time", intake="process")
    listed = list(records)  # records that are not an event log's (as a Kafka range's are not)
    with pytest.raises(ValueError, match="not an event log"):
        backtest.run_backtest(listed, configs, batching="dense", intake="process")
    assert backtest.run_backtest(listed, configs, batching="dense").intake == "inline"


@pytest.mark.slow
def test_configurations_in_learner_processes_get_the_intake_batches(messy_log: Path, config_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # crossdistil in a learner process because it asks (model.separate_process), like in a group started on a
    # machine with a core to spare for the second configuration (here 3: intake, this process and one more)
    inline = replay(messy_log, config_file, "inline", "mtl,crossdistil")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", list(WINDOWS))
    records, desc = backtest.log_records(f"file://{messy_log}")
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, intake="process")
    assert result.processes["learner_processes"] == 1
    assert json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default) == inline[0]
    assert {n: (predictions_digest(r), r.users().tobytes(), r.event_ts_ms) for n, r in result.runs.items()} == inline[2]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one alone: only if it asks does it train elsewhere
    separate = backtest.build_configs([str(config_file)], "mtl", [*WINDOWS, "model.separate_process=true"])
    result = backtest.run_backtest(records, separate, batching="dense", sample_every=100, intake="process")
    assert result.processes["learner_processes"] == 0 and result.intake == "process"
    assert predictions_digest(result.runs["mtl"]) == inline[2]["mtl"][0]
    result.runs["mtl"].pipeline.close()
    # two cores, two configurations: one trains beside the intake (the cheaper step, mtl's; forked, with one torch
    # thread here as `crossdistil backtest` runs: the costlier, crossdistil's); one core: none does
    import torch

    threads = torch.get_num_threads()
    for cores, started, torch_threads in ((2, 1, 2), (2, 1, 1), (1, 0, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        torch.set_num_threads(torch_threads)
        try:
            result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, intake="process")
        finally:
            torch.set_num_threads(threads)
        assert result.processes["learner_processes"] == started, cores
        forked = torch_threads == 1 and can_fork()  # then it takes the costlier step (crossdistil's)
        moved = {"crossdistil" if forked else "mtl"} if started else set()
        ports = {n: getattr(r.pipeline.learner, "port", r.pipeline.learner) for n, r in result.runs.items()}
        assert {n for n, port in ports.items() if isinstance(port, backtest._PreparedRemote)} == moved
        assert all(ports[n].remote.forked == forked for n in moved)
        assert {n: predictions_digest(r) for n, r in result.runs.items()} == {n: v[0] for n, v in inline[2].items()}


def test_a_truncated_log_fails_in_the_intake_as_it_does_inline(messy_log: Path, config_file: Path,
                                                                tmp_path: Path) -> None:
    cut = tmp_path / "cut.evlog"
    cut.write_bytes(messy_log.read_bytes()[:-7])
    messages = []
    for mode in ("inline", "process"):
        configs = backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))
        records, _ = backtest.log_records(f"file://{cut}")
        with pytest.raises(EventLogError, match="truncated") as raised:
            backtest.run_backtest(records, configs, batching="dense", intake=mode)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def test_a_killed_intake_process_is_an_error_not_a_hang(messy_log: Path, config_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    original = intake.IntakeProcess.messages

    def kill_after_the_first_message(self):
        for n, message in enumerate(original(self)):
            if n == 0:
                started.append(self.process.pid)
                os.kill(self.process.pid, signal.SIGKILL)
            yield message

    monkeypatch.setattr(intake.IntakeProcess, "messages", kill_after_the_first_message)
    configs = backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))
    records, _ = backtest.log_records(f"file://{messy_log}")
    with pytest.raises(intake.IntakeError, match="died .*signal 9"):
        backtest.run_backtest(records, configs, batching="dense", intake="process")
    assert started


def test_the_intake_process_starts_without_torch() -> None:
    code = "import sys, consumers.tools.intake; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[4])
    assert done.stdout.strip() == "False"


def test_the_cli_names_the_intake_in_timing_and_the_report(messy_log: Path, config_file: Path,
                                                           tmp_path: Path) -> None:
    from tests.unit.consumers.tools.test_backtest_batching import cli

    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--quiet",
              "--no-plots", "--batching", "dense", *[a for o in WINDOWS for a in ("--set", o)])
    assert cli(*common, "--out", str(tmp_path / "p")) == 0
    assert cli(*common, "--out", str(tmp_path / "i"), "--intake", "inline") == 0
    assert json.loads((tmp_path / "p" / "timing.json").read_text())["intake"] == "process"
    assert json.loads((tmp_path / "i" / "timing.json").read_text())["intake"] == "inline"
    assert "intake process" in (tmp_path / "p" / "report.md").read_text()
    assert (tmp_path / "p" / "summary.json").read_text() == (tmp_path / "i" / "summary.json").read_text()
    assert cli(*common[:-2], "--out", str(tmp_path / "e"), "--batching", "event-time", "--intake", "process") == 2


@pytest.mark.parametrize("intake_mode", ["process", "inline"])
def test_the_progress_of_a_limited_log_counts_records_up_to_the_limit(messy_log: Path, config_file: Path,
                                                                     tmp_path: Path, intake_mode: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --limit a log's progress is its bytes (all of them are read); with it, the replay stops after that
    many records, so the bar counts records up to the limit instead of a fraction of the file's bytes."""
    from tests.unit.consumers.tools.test_backtest_batching import cli

    bars: list[dict] = []

    class Recorded:
        def __init__(self, enabled: bool, total: int | None, unit: str) -> None:
            self.bar = {"total": total, "unit": unit, "done": 0}
            bars.append(self.bar)

        def __enter__(self):
            return lambda n: self.bar.__setitem__("done", self.bar["done"] + n)

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(backtest, "_progress", Recorded)
    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--no-plots",
              "--batching", "dense", "--intake", intake_mode, *[a for o in WINDOWS for a in ("--set", o)])
    assert cli(*common, "--out", str(tmp_path / "all")) == 0
    assert cli(*common, "--out", str(tmp_path / "some"), "--limit", "40") == 0
    whole, limited = bars
    assert whole == {"total": messy_log.stat().st_size, "unit": "bytes", "done": messy_log.stat().st_size}
    assert limited == {"total": 40, "unit": "records", "done": 40}
