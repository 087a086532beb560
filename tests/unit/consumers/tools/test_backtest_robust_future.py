"""``join.max_future_s`` in a backtest of a Kafka range: an event stamped more than that after its record's Kafka
timestamp is a dead letter (``future``), as the live trainer finds it when it reads the record at that time; the
merge of the partitions leaves such an event out of its clock; configurations that differ in the bound are
replayed apart. An event log stores no arrival time: its backtest applies no bound. (The same against a real broker
and the live trainer: tests/integration/test_backtest_robust_kafka_future.py.)"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from consumers.tools import backtest
from streamer.eventlog import EventLogWriter
from streamer.events import encode

pytestmark = pytest.mark.unit

Message = namedtuple("Message", "offset value timestamp")
HOUR_MS = 3_600_000
DELAY_MS = 5_000  # each record is appended this long after its event's time


class FakeRange(backtest.KafkaRange):
    """A Kafka range whose partitions' messages are given (no broker): ``KafkaRange``'s merge and records."""

    def __init__(self, messages: dict, **kwargs) -> None:
        super().__init__("fake:9092", {tp: (0, len(m)) for tp, m in messages.items()}, **kwargs)
        self.messages = messages

    def _messages(self, tp, start: int, stop: int):
        yield from self.messages[tp][start:stop]


def stream(n: int = 600, future_every: int = 37) -> tuple[dict, list[tuple[str, dict, int]], set[str], set[str]]:
    """Impressions (one a second, two users' partitions) and their clicks, each record stamped ``DELAY_MS`` after its
    event; every ``future_every``-th impression also has a twin stamped 2 h after its record (refused with the
    default bound of 1 h) and a click stamped 30 min after its record (accepted). The messages per partition, the
    (topic, event, record timestamp) in order, the ids refused and the ids of the accepted clicks' twins."""
    from kafka import TopicPartition

    rows, refused, near = [], set(), set()
    for i in range(n):
        ts = 1_700_000_000_000 + 1_000 * i
        impression = {"v": 1, "impression_id": f"i{i}", "ts_ms": ts, "user_id": f"u{i % 2}", "item_id": f"v{i % 13}",
                      "features": {"item_category": "abc"[i % 3], "duration_s": float(i % 7)}}
        rows.append(("impressions", impression, ts + DELAY_MS))
        if i % 3 == 0:
            click = {"v": 1, "impression_id": f"i{i}", "ts_ms": ts + 20_000, "task": "click", "value": 1}
            rows.append(("feedback", click, ts + 20_000 + DELAY_MS))
        if i % future_every == 0:
            ahead = {**impression, "impression_id": f"ahead{i}", "ts_ms": ts + DELAY_MS + 2 * HOUR_MS + 1}
            rows.append(("impressions", ahead, ts + DELAY_MS))
            refused.add(ahead["impression_id"])
            soon = {"v": 1, "impression_id": f"i{i}", "ts_ms": ts + DELAY_MS + HOUR_MS // 2, "task": "like",
                    "value": 1}
            rows.append(("feedback", soon, ts + DELAY_MS))
            near.add(soon["impression_id"])
    rows.sort(key=lambda row: row[2])  # appended in record-time order
    messages: dict = {}
    for topic, event, stamp in rows:
        number = int(event["impression_id"].removeprefix("ahead").removeprefix("i"))
        tp = TopicPartition(topic, number % 2)
        partition = messages.setdefault(tp, [])
        partition.append(Message(len(partition), encode(event), stamp))
    return messages, rows, refused, near


def replay(records, config_file: Path, overrides: tuple[str, ...] = (), names: tuple[str, ...] = ("mtl",),
           batching: str = "dense") -> tuple[backtest.BacktestResult, dict]:
    configs = {}
    for name in names:
        extra = ("join.max_future_s=0",) if name == "unbounded" else ()
        configs[name] = backtest.build_configs([str(config_file)], "mtl", [*overrides, *extra])["mtl"]
    result = backtest.run_backtest(records, configs, batching=batching, sample_every=200)
    return result, backtest.summary(result, {"kind": "kafka", "topics": ["impressions", "feedback"]})


def test_a_record_bounds_its_events_time_by_its_timestamp() -> None:
    event = {"v": 1, "impression_id": "i", "ts_ms": 1_000 + HOUR_MS, "task": "click", "value": 1}
    on_the_bound = backtest.Record("feedback", 0, encode(event), 1_000)
    assert isinstance(on_the_bound.events(3600)[0], dict)  # the bound itself is accepted
    late = backtest.Record("feedback", 0, encode({**event, "ts_ms": 1_001 + HOUR_MS}), 1_000)
    error = late.events(3600)[0]
    assert error.reason == "future" and "after" in str(error)
    assert isinstance(late.events()[0], dict) and isinstance(late.events(0)[0], dict)  # no bound
    assert isinstance(backtest.Record("feedback", 0, encode({**event, "ts_ms": 10 ** 13}), None).events(3600)[0],
                      dict)  # no timestamp: no bound
    envelope = backtest.Record("feedback", 0, encode({"v": 1, "batch": [event, {**event, "ts_ms": 2 * HOUR_MS}]}),
                               1_000)
    assert [type(e).__name__ for e in envelope.events(3600)] == ["dict", "EventError"]


def test_the_merge_clock_leaves_out_what_the_bound_refuses() -> None:
    values = [encode({"v": 1, "impression_id": f"i{n}", "ts_ms": ts, "task": "t", "value": 1})
              for n, ts in enumerate((10_000, 20_000 + 2 * HOUR_MS, 30_000))]
    messages = [Message(n, value, 10_000 * (n + 1)) for n, value in enumerate(values)]
    unbounded = [key[0] for key in backtest._ordered("feedback", 0, messages)]
    bounded = [key[0] for key in backtest._ordered("feedback", 0, messages, 3600)]
    assert unbounded == [10_000, 20_000 + 2 * HOUR_MS, 20_000 + 2 * HOUR_MS]
    assert bounded == [10_000, 10_000, 30_000]
    assert [key[-1].timestamp_ms for key in backtest._ordered("feedback", 0, messages)] == [10_000, 20_000, 30_000]


@pytest.mark.parametrize("batching", ["dense", "event-time"])
def test_a_kafka_range_dead_letters_the_events_the_live_trainer_would(config_file: Path, batching: str) -> None:
    messages, rows, refused, near = stream()
    result, data = replay(FakeRange(messages), config_file, batching=batching)
    run_ = result.runs["mtl"]
    assert data["configurations"]["mtl"]["dead_letters_by_reason"] == {"future": len(refused)}
    trained = set(run_.impression_ids)
    assert trained == {e["impression_id"] for topic, e, _ in rows if topic == "impressions"} - refused
    assert any("(future" in example for example in result.dead_letter_examples)
    # the near-future feedback (30 min ahead of its record, within the hour) was taken, not dead-lettered (the
    # dead letters are the refused impressions alone): the join counted it as feedback
    join = data["configurations"]["mtl"]["join"]
    assert join["feedback"] == sum(1 for topic, _, _ in rows if topic == "feedback") and len(near) > 0
    # the same range read by a configuration without a bound takes every event (the refused ones are trained)
    unbounded, data = replay(FakeRange(messages), config_file, names=("unbounded",), batching=batching)
    assert data["configurations"]["unbounded"]["dead_letters_by_reason"] == {}
    assert refused <= set(unbounded.runs["unbounded"].impression_ids)


def test_configurations_with_other_bounds_are_replayed_apart_for_kafka_only(config_file: Path,
                                                                            tmp_path: Path) -> None:
    messages, rows, refused, _ = stream(300)
    result, data = replay(FakeRange(messages), config_file, names=("mtl", "unbounded"))
    assert data["replayed"]["groups"] == [["mtl"], ["unbounded"]]
    assert data["configurations"]["mtl"]["dead_letters_by_reason"] == {"future": len(refused)}
    assert data["configurations"]["unbounded"]["dead_letters_by_reason"] == {}
    # an event log of the same events: no arrival time, no bound, one group
    log = tmp_path / "same.evlog"
    with EventLogWriter(log) as writer:
        for topic, event, _ in rows:
            writer.write(topic, "k", event)
    records, desc = backtest.log_records(f"file://{log}", topics=["impressions", "feedback"])
    logged = backtest.run_backtest(records, {n: backtest.build_configs([str(config_file)], "mtl", extra)["mtl"]
                                             for n, extra in (("mtl", []), ("unbounded", ["join.max_future_s=0"]))},
                                   batching="dense", sample_every=200)
    summary = backtest.summary(logged, desc)
    assert summary["replayed"]["groups"] == [["mtl", "unbounded"]]
    assert all(c["dead_letters_by_reason"] == {} for c in summary["configurations"].values())
    assert refused <= set(logged.runs["mtl"].impression_ids)


def test_the_report_of_a_kafka_range_says_the_bound(config_file: Path) -> None:
    messages, *_ = stream(120)
    result, data = replay(FakeRange(messages), config_file)
    report = backtest.render_report(data, {"seconds": 1.0, "records_per_s": 1}, [])
    assert "after its Kafka record's timestamp is a dead letter (`future`)" in report
    assert json.dumps(data, default=backtest._json_default)  # plain JSON


def bounded(config_file: Path, bounds: dict[str, float]) -> dict:
    """One mtl configuration per name, each with its ``join.max_future_s``."""
    return {name: backtest.build_configs([str(config_file)], "mtl", [f"join.max_future_s={bound}"])["mtl"]
            for name, bound in bounds.items()}


def replayed_numbers(records, configs: dict, batching: str) -> dict:
    """Per configuration: its predictions, series, batches and summary.json entry."""
    from tests.unit.consumers.tools.test_backtest_robust_failures import numbers

    result = backtest.run_backtest(records, configs, batching=batching, sample_every=200)
    data = backtest.summary(result, {"kind": "kafka", "topics": ["impressions", "feedback"]})
    return {name: (numbers(run_), data["configurations"][name]) for name, run_ in result.runs.items()}


def test_each_bound_merges_the_range_in_the_order_a_backtest_of_it_alone_does(config_file: Path) -> None:
    # the likes stamped 30 min after their records move the feedback partitions' merge clock under the default
    # bound (1 h) and not under 10 min: the later feedback of those partitions comes in another order, which event-time
    # batching shows (the join holds its watermark for a partition held back, so its labels are the same)
    messages, *_ = stream(300)
    batching = "event-time"
    hour, tight = FakeRange(messages).read(3600), FakeRange(messages).read(600)
    assert [(r.topic, r.partition, r.value) for r in hour] != [(r.topic, r.partition, r.value) for r in tight]
    together = replayed_numbers(FakeRange(messages), bounded(config_file, {"hour": 3600, "tight": 600}), batching)
    for name, bound in (("hour", 3600), ("tight", 600)):
        alone = replayed_numbers(FakeRange(messages), bounded(config_file, {name: bound}), batching)
        assert together[name] == alone[name], name
    # the orders differ: the tight bound's numbers in the hour's merge order are not its own
    in_hours_order = replayed_numbers(FakeRange(messages, max_future_s=3600), bounded(config_file, {"tight": 600}),
                                      batching)
    assert in_hours_order["tight"] != together["tight"]
