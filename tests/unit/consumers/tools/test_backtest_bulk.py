"""A dense backtest of an event log read in bulk gives the numbers of the record-by-record replay, bit for bit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from consumers.tools import backtest, backtest_bulk
from streamer.eventlog import EventLogWriter
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
        if i % 13 == 0:
            events += [click, impression]  # feedback before its impression
        else:
            events += [impression, click]
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


def spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list:
    """What every call of ``owner.name`` returns, from now on."""
    returned: list = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(owner, name, wrapper)
    return returned


def replay(log: Path, config_file: Path, bulk: bool, rungs: str = "mtl,crossdistil", overrides: tuple = WINDOWS,
           **limits) -> tuple[str, dict[str, str], dict[str, str]]:
    """The summary (as JSON text), each configuration's series CSV and predictions digest."""
    configs = backtest.build_configs([str(config_file)], rungs, list(overrides))
    records, desc = backtest.log_records(f"file://{log}", **limits)
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, bulk=bulk)
    summary = json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default)
    return (summary, {n: backtest.series_csv(r.series) for n, r in result.runs.items()},
            {n: predictions_digest(r) for n, r in result.runs.items()})


@pytest.mark.parametrize("bulk_records", [16, 8192])
def test_bulk_replay_of_a_messy_log_is_the_record_by_record_one(messy_log: Path, config_file: Path,
                                                                bulk_records: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # chunks of 16 records: DENSE_TRAIN_EVERY records come from several; 8,192: it is one chunk's slice
    monkeypatch.setattr(backtest_bulk, "BULK_RECORDS", bulk_records)
    reference = replay(messy_log, config_file, bulk=False)
    chunks = spy(monkeypatch, backtest_bulk, "_checked")
    assert replay(messy_log, config_file, bulk=True) == reference
    assert len(chunks) == -(-len(messy_events()) // bulk_records)  # read in bulk, every record once
    summary = json.loads(reference[0])
    join = summary["configurations"]["mtl"]["join"]
    assert summary["configurations"]["mtl"]["dead_letters"] >= 10  # bad events, dead-lettered the same way
    for counter in ("late_feedback", "early_feedback_matched", "orphan_feedback", "duplicate_impressions",
                    "unknown_task_feedback", "outside_window_feedback"):
        assert join[counter] > 0, counter


def test_bulk_replay_keeps_the_time_range_and_the_limit(messy_log: Path, config_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backtest_bulk, "BULK_RECORDS", 64)
    for limits in ({"limit": 777}, {"from_ms": 1_200_000, "to_ms": 1_900_000}, {"from_ms": 1_500_000, "limit": 300}):
        assert replay(messy_log, config_file, True, "mtl", **limits) == replay(
            messy_log, config_file, False, "mtl", **limits), limits


def test_bulk_replay_of_the_drift_stream_is_the_record_by_record_one(drift_log: Path, config_file: Path) -> None:
    assert replay(drift_log, config_file, True, overrides=()) == replay(drift_log, config_file, False, overrides=())


def test_event_time_batching_ignores_bulk(messy_log: Path, config_file: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))
    records, _ = backtest.log_records(f"file://{messy_log}")
    digests = [predictions_digest(backtest.run_backtest(records, configs, bulk=bulk).runs["mtl"])
               for bulk in (True, False)]
    assert digests[0] == digests[1]
