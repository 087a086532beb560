"""The stream core (merge, pacing, summary) and the event-log sink, without a broker."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.datasets.base import Interaction
from streamer.eventlog import EventLogError, EventLogWriter, read_event_log
from streamer.sinks import FileSink
from streamer.stream import (
    Pacer,
    RoutedEvent,
    StreamError,
    add_arguments,
    merge_events,
    parse_options,
    parse_speed,
    run,
    stream_dataset,
    stream_events,
)

pytestmark = pytest.mark.unit


def interaction(i: int, ts_ms: int, delays: dict[str, int], user: str | None = None) -> Interaction:
    return Interaction(f"imp-{i}", user or f"u{i % 3}", f"item{i}", ts_ms, features={"f": 1},
                       labels={**{t: 1 for t in delays}, "never": 0}, feedback_delay_ms=delays)


def read_plain(path: Path) -> list[dict]:
    """An event log read with msgpack alone, as a third party would."""
    with path.open("rb") as handle:
        return list(msgpack.Unpacker(handle, raw=False))


# -- merge ------------------------------------------------------------------------------------------------
streams = st.lists(
    st.tuples(st.integers(0, 5_000), st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 10_000))),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(streams)
def test_merged_stream_is_in_time_order_with_every_feedback_after_its_impression(raw) -> None:
    records, ts = [], 0
    for i, (gap, delays) in enumerate(raw):
        ts += gap
        records.append(interaction(i, ts, delays))
    merged = list(merge_events(records))
    times = [e.event["ts_ms"] for e in merged]
    assert times == sorted(times)
    shown: dict[str, str] = {}
    for topic, key, event in merged:
        if topic == "impressions":
            shown[event["impression_id"]] = key
        else:
            assert shown[event["impression_id"]] == key  # feedback follows its impression, with its user as key
    assert Counter(e.topic for e in merged) == +Counter({"impressions": len(records),
                                                         "feedback": sum(len(d) for _, d in raw)})


def test_feedback_due_at_an_impressions_time_comes_before_it() -> None:
    merged = list(merge_events([interaction(0, 100, {"a": 50}), interaction(1, 150, {})]))
    assert [(e.topic, e.event["impression_id"]) for e in merged] == [
        ("impressions", "imp-0"), ("feedback", "imp-0"), ("impressions", "imp-1")]


def test_feedback_events_follow_the_contract() -> None:
    (_, key, shown), (_, fkey, fed) = merge_events([interaction(0, 1000, {"a": 250}, user="ü")])
    assert shown == {"v": 1, "impression_id": "imp-0", "ts_ms": 1000, "user_id": "ü", "item_id": "item0",
                     "features": {"f": 1}}
    assert fed == {"v": 1, "impression_id": "imp-0", "ts_ms": 1250, "task": "a", "value": 1}
    assert key == fkey == "ü"


def test_merge_is_lazy_and_holds_only_pending_feedback() -> None:
    endless = (interaction(i, i * 1000, {"a": 1500}) for i in itertools.count())
    first = list(itertools.islice(merge_events(endless), 1000))  # would never return if merge read everything
    assert len(first) == 1000


def test_limit_counts_impressions_and_still_emits_their_feedback() -> None:
    merged = list(merge_events([interaction(i, i, {"a": 10**6}) for i in range(10)], limit=3))
    assert Counter(e.topic for e in merged) == {"impressions": 3, "feedback": 3}


def test_interactions_going_back_in_time_are_an_error() -> None:
    with pytest.raises(StreamError, match="not in time order"):
        list(merge_events([interaction(0, 10, {}), interaction(1, 5, {})]))


def test_topics_are_configurable() -> None:
    merged = merge_events([interaction(0, 1, {"a": 1})], impression_topic="imp", feedback_topic="fb")
    assert [e.topic for e in merged] == ["imp", "fb"]


# -- pacing and arguments ---------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_pacer_sleeps_to_event_time_divided_by_the_factor() -> None:
    fake = FakeClock()
    pacer = Pacer(10.0, clock=fake.clock, sleep=fake.sleep)
    for ts in (5_000, 5_000, 15_000, 25_000):
        pacer.wait_for(ts)
    assert fake.slept == [1.0, 1.0]


def test_pacer_at_max_speed_never_sleeps() -> None:
    fake = FakeClock()
    pacer = Pacer(None, clock=fake.clock, sleep=fake.sleep)
    pacer.wait_for(0)
    pacer.wait_for(10**9)
    assert fake.slept == []


def test_speed_and_options_parse_or_say_what_is_wrong() -> None:
    assert (parse_speed("max"), parse_speed("realtime"), parse_speed("60")) == (None, 1.0, 60.0)
    for bad in ("fast", "0", "-2"):
        with pytest.raises(StreamError, match="--speed"):
            parse_speed(bad)
    assert parse_options(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(StreamError, match="key=value"):
        parse_options(["novalue"])


# -- whole runs into an event log -------------------------------------------------------------------------
def test_icme_into_an_event_log_reads_back_with_msgpack_alone(shared_data: Path, tmp_path: Path) -> None:
    log = tmp_path / "icme.evlog"
    summary = stream_dataset("icme2019", str(shared_data / "icme2019"), f"file://{log}")
    records = read_plain(log)
    assert Counter(r["topic"] for r in records) == {"impressions": 1000, "feedback": 379}
    assert Counter(r["event"]["task"] for r in records if r["topic"] == "feedback") == {"finish": 367, "like": 12}
    times = [r["event"]["ts_ms"] for r in records]
    assert times == sorted(times)
    assert summary["events_per_topic"] == {"impressions": 1000, "feedback": 379}
    assert summary["feedback_per_task"] == {"finish": 367, "like": 12}
    assert summary["positive_rate"]["finish"] == pytest.approx(0.367)
    assert summary["bytes"] == log.stat().st_size and summary["events_per_s"] > 0


def test_replaying_an_event_log_into_another_file_copies_it_exactly(tmp_path: Path) -> None:
    first, second = tmp_path / "a.evlog", tmp_path / "b.evlog"
    stream_dataset("synthetic", None, f"file://{first}", options={"n_events": "2000"})
    summary = stream_dataset("log", f"file://{first}", f"file://{second}")
    assert second.read_bytes() == first.read_bytes()
    assert summary["impressions"] == 2000 and set(summary["feedback_per_task"]) == {"task0", "task1"}


def test_replay_unwraps_a_batch_envelope_record_keeping_its_key(tmp_path: Path) -> None:
    log, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    fed = {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1}
    log.write_bytes(msgpack.packb({"topic": "feedback", "key": "u9", "event": {"v": 1, "batch": [fed, fed]}}))
    stream_dataset("log", f"file://{log}", f"file://{out}")
    assert [(r["key"], r["event"]["task"]) for r in read_plain(out)] == [("u9", "t"), ("u9", "t")]


def test_a_truncated_event_log_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "a.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options={"n_events": "10"})
    log.write_bytes(log.read_bytes()[:-3])
    with pytest.raises(EventLogError, match="truncated"):
        list(read_event_log(log))


def test_a_record_that_is_not_topic_key_event_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "a.evlog"
    log.write_bytes(msgpack.packb({"topic": "x", "event": {}}))
    with pytest.raises(EventLogError, match="record 0 must be a map with keys topic, key, event"):
        list(read_event_log(log))


@pytest.mark.parametrize("record", [{"topic": "", "key": "k", "event": {}}, {"topic": "t", "key": 5, "event": {}},
                                    {"topic": "t", "key": "k", "event": [1]}, {"topic": b"t", "key": "k", "event": {}}])
def test_a_record_with_a_field_of_the_wrong_type_is_reported_after_good_ones(tmp_path: Path, record: dict) -> None:
    log = tmp_path / "a.evlog"
    good = {"topic": "feedback", "key": "k", "event": {"v": 1}}
    log.write_bytes(msgpack.packb(good) + msgpack.packb(record, use_bin_type=True))
    records = read_event_log(log)
    assert next(records) == ("feedback", "k", {"v": 1})
    with pytest.raises(EventLogError, match="record 1 needs a non-empty str topic, a str key and a map event"):
        next(records)


def cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["--dataset", "csv", "--source", str(tmp_path), "--to", f"file://{tmp_path}/x"]) == 2
    assert "needs a mapping" in capsys.readouterr().err
    assert cli(["--dataset", "synthetic", "--to", "ftp://x"]) == 2
    assert "kafka://HOST:PORT or file://PATH" in capsys.readouterr().err
    assert cli(["--dataset", "log", "--source", f"file://{tmp_path}/none", "--to", f"file://{tmp_path}/y"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_prints_a_summary_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["--dataset", "synthetic", "--option", "n_events=300", "--option", "tasks=click,like",
                "--to", f"file://{tmp_path}/s.evlog", "--speed", "1e9", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert "impressions" in out and "click" in out and "events/s" in out


def test_unreachable_kafka_says_how_to_start_one() -> None:
    from consumers.runtime.local_kafka import free_port
    from streamer.sinks import KafkaSink, SinkError

    port = free_port()
    with pytest.raises(SinkError, match=rf"Kafka at 127.0.0.1:{port} is not reachable; start one with "
                                        r"'crossdistil kafka up' or check --to"):
        KafkaSink(f"127.0.0.1:{port}", ("impressions", "feedback"), producer_config={"bootstrap_timeout_ms": 500})


@pytest.mark.parametrize("cut", [1, 3, 7, 40])
def test_a_log_cut_anywhere_in_its_last_record_is_reported(tmp_path: Path, cut: int) -> None:
    # a log cut 7 bytes short once passed: the unpacker's position counted the partial record's buffered bytes
    log = tmp_path / "a.evlog"
    with EventLogWriter(log) as writer:
        for i in range(300):
            writer.write("feedback", "k", {"v": 1, "impression_id": f"i{i}", "ts_ms": 1_000 * i, "task": "click",
                                           "value": 1})
    log.write_bytes(log.read_bytes()[:-cut])
    with pytest.raises(EventLogError, match="truncated"):
        list(read_event_log(log))


# -- a stream that fails or stops leaves no partial log; a bad event says where it came from --------------
def feedback(i: int, ts_ms: int) -> dict:
    return {"v": 1, "impression_id": f"i{i}", "ts_ms": ts_ms, "task": "click", "value": 1}


def starting(text: str) -> str:
    """A pattern for ``pytest.raises(match=...)``: a message that starts with ``text``."""
    return "^" + re.escape(text)


def write_log(path: Path, events: list[dict]) -> None:
    """An event log of feedback events as given (bad ones included), one record each, as a third party would."""
    path.write_bytes(b"".join(msgpack.packb({"topic": "feedback", "key": "u", "event": e}) for e in events))


def test_a_file_sink_holds_its_records_under_a_partial_name_until_it_is_closed(tmp_path: Path) -> None:
    log = tmp_path / "out.evlog"
    sink = FileSink(str(log))
    sink.write("feedback", "u", feedback(0, 5))
    assert not log.exists() and [p.name for p in tmp_path.glob("out.evlog.*.partial")]
    sink.close()
    assert [r["event"]["ts_ms"] for r in read_plain(log)] == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.evlog"]


def test_a_stream_that_fails_part_way_leaves_the_file_at_its_path_as_it_was(tmp_path: Path) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    write_log(source, [feedback(i, 1_000 * i) for i in range(500)] + [{**feedback(500, 500_000), "v": 2}])
    out.write_bytes(b"an older log")
    with pytest.raises(StreamError, match="unsupported schema version 2"):
        stream_dataset("log", f"file://{source}", f"file://{out}")
    assert out.read_bytes() == b"an older log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.evlog", "out.evlog"]  # no partial file left


def test_an_interrupted_stream_to_a_file_leaves_no_log(tmp_path: Path) -> None:
    out = tmp_path / "out.evlog"

    def interrupted():
        yield RoutedEvent("feedback", "u", feedback(0, 5))
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    with pytest.raises(KeyboardInterrupt):
        stream_events(interrupted(), FileSink(str(out)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_stream_to_a_file_and_leaves_the_file_at_its_path_as_it_was(tmp_path: Path, sig) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    write_log(source, [feedback(i, 1_000 * i) for i in range(600)])  # 10 min of event time: paced at 1x
    out.write_bytes(b"an older log")
    repo = Path(__file__).resolve().parents[3]
    # SIG_DFL first: a shell's background job inherits SIGINT ignored, and Python then never raises on it
    child = subprocess.Popen([sys.executable, "-m", "consumers.cli", "stream", "--dataset", "log", "--source",
                              f"file://{source}", "--to", f"file://{out}", "--speed", "1", "--quiet"],
                             cwd=repo, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out.evlog.*.partial")):  # the sink is open: the stream is under way
            assert child.poll() is None and time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        child.send_signal(sig)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130)  # SIGTERM still ends it
    assert f"{out} is left as it was" in err
    assert out.read_bytes() == b"an older log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.evlog", "out.evlog"]


def test_a_stream_into_a_fifo_writes_straight_into_it(tmp_path: Path) -> None:
    fifo, copy = tmp_path / "pipe", tmp_path / "copy.evlog"
    os.mkfifo(fifo)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()), daemon=True)
    reader.start()
    stream_dataset("synthetic", None, f"file://{fifo}", options={"n_events": "50"})
    reader.join(timeout=30)
    stream_dataset("synthetic", None, f"file://{copy}", options={"n_events": "50"})
    assert read == [copy.read_bytes()] and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.evlog", "pipe"]


def test_a_bad_event_in_an_event_log_names_the_log_and_its_record(tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.evlog"
    write_log(source, [feedback(0, 1), feedback(1, 2), {**feedback(2, 3), "value": "yes"}])
    assert cli(["--dataset", "log", "--source", f"file://{source}", "--to", f"file://{tmp_path}/o.evlog"]) == 2
    assert capsys.readouterr().err == (f"crossdistil stream: event log {source}: record 2: feedback.value: "
                                       "expected a number, got str\n")


def test_a_bad_event_in_a_batch_envelope_names_its_place_in_the_envelope(tmp_path: Path) -> None:
    source = tmp_path / "in.evlog"
    envelope = {"v": 1, "batch": [feedback(1, 2), {**feedback(2, 3), "ts_ms": -1}]}
    write_log(source, [feedback(0, 1), envelope])
    with pytest.raises(StreamError, match=starting(f"event log {source}: record 1 batch[1]: feedback.ts_ms: ")):
        stream_dataset("log", f"file://{source}", f"file://{tmp_path}/o.evlog")


def csv_with_a_long_city(tmp_path: Path, id_column: bool) -> tuple[Path, dict]:
    """Three rows whose second (data row 1) has a city longer than an event may carry; rows are out of time order,
    so the row is not the event's place in the stream."""
    source = tmp_path / "data.csv"
    cities = ["a", "x" * 2000, "b"]
    rows = [f"imp{i},u{i},item{i},{t},{city},1" for i, (t, city) in enumerate(zip((30, 10, 20), cities))]
    source.write_text("imp,user,item,ts,city,click\n" + "\n".join(rows) + "\n")
    mapping = {"name": "mine", "user": "user", "item": "item", "time": "ts", "time_unit": "s",
               "categorical": ["city"], "tasks": {"click": {"column": "click"}}}
    return source, {**mapping, "impression_id": "imp"} if id_column else mapping


def test_a_bad_event_from_a_csv_names_the_file_and_data_row(tmp_path: Path) -> None:
    source, mapping = csv_with_a_long_city(tmp_path, id_column=False)
    with pytest.raises(StreamError, match=starting(f"{source} data row 1: impression.features['city']: longer than")):
        stream_dataset("csv", str(source), f"file://{tmp_path}/o.evlog", mapping=mapping)


def test_a_bad_event_from_a_csv_with_an_id_column_names_the_file_and_impression(tmp_path: Path) -> None:
    source, mapping = csv_with_a_long_city(tmp_path, id_column=True)
    with pytest.raises(StreamError, match=starting(f"{source}: impression 'imp1': impression.features['city']: ")):
        stream_dataset("csv", str(source), f"file://{tmp_path}/o.evlog", mapping=mapping)


def test_pacing_checks_an_event_before_it_reads_its_time(tmp_path: Path) -> None:
    source = tmp_path / "in.evlog"
    write_log(source, [feedback(0, 1), {**feedback(1, 2), "ts_ms": "1649000000000"}])
    errors = []
    for speed in ("max", "1000000"):
        with pytest.raises(StreamError) as caught:
            stream_dataset("log", f"file://{source}", f"file://{tmp_path}/o.evlog", speed=speed)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] == f"event log {source}: record 1: feedback.ts_ms: expected an integer, got str"


def test_pacer_refuses_an_event_far_after_the_latest_instead_of_sleeping_until_it() -> None:
    fake = FakeClock()
    pacer = Pacer(1e6, clock=fake.clock, sleep=fake.sleep)
    pacer.wait_for(1_000)
    pacer.wait_for(1_000 + 6 * 86_400_000)  # six days: a real gap, waited at this speed
    assert fake.slept == [0.5184]
    with pytest.raises(StreamError, match=r"7\.0 days after the latest event before it .* a gap over 7 days"):
        pacer.wait_for(1_000 + 13 * 86_400_000 + 1)
    assert fake.slept == [0.5184]


def test_a_far_future_event_paced_is_an_error_naming_its_record(tmp_path: Path) -> None:
    source = tmp_path / "in.evlog"
    write_log(source, [feedback(0, 1_649_000_000_000), feedback(1, 32_503_680_000_000)])  # the year 3000
    far_future = starting(f"event log {source}: record 1: ts_ms 32503680000000 is 977.7 years after the latest")
    with pytest.raises(StreamError, match=far_future):
        stream_dataset("log", f"file://{source}", f"file://{tmp_path}/o.evlog", speed="1000000")
    assert stream_dataset("log", f"file://{source}", f"file://{tmp_path}/o.evlog")["events"] == 2  # unpaced: as is


# -- a replayed log goes to the topics the flags name -------------------------------------------------------
def impression(i: int, ts_ms: int) -> dict:
    return {"v": 1, "impression_id": f"i{i}", "ts_ms": ts_ms, "user_id": "u", "item_id": f"item{i}", "features": {}}


def write_records(path: Path, records: list[tuple[str, dict]]) -> None:
    """An event log of (topic, event) records, as a third party would write it."""
    path.write_bytes(b"".join(msgpack.packb({"topic": t, "key": "u", "event": e}) for t, e in records))


def test_a_replayed_log_goes_to_the_topics_the_flags_name_and_its_feedback_is_counted(tmp_path: Path) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    stream_dataset("synthetic", None, f"file://{source}", options={"n_events": "300", "tasks": "click,like"})
    summary = stream_dataset("log", f"file://{source}", f"file://{out}", impression_topic="my-impressions",
                             feedback_topic="my-feedback")
    logged, replayed = read_plain(source), read_plain(out)
    assert Counter(r["topic"] for r in replayed) == {"my-impressions": 300, "my-feedback": len(logged) - 300}
    renamed = {"impressions": "my-impressions", "feedback": "my-feedback"}
    assert replayed == [{**r, "topic": renamed[r["topic"]]} for r in logged]  # the same events, in the same order
    assert summary["impressions"] == 300
    assert summary["feedback_per_task"] == dict(Counter(r["event"]["task"] for r in logged if "task" in r["event"]))
    assert summary["feedback_per_task"]["click"] > 0


def test_a_log_written_under_other_topic_names_replays_onto_the_default_topics(tmp_path: Path) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    write_records(source, [("imp-a", impression(0, 1)), ("fb-a", feedback(0, 2)), ("imp-a", impression(1, 3))])
    summary = stream_dataset("log", f"file://{source}", f"file://{out}")
    assert [r["topic"] for r in read_plain(out)] == ["impressions", "feedback", "impressions"]
    assert summary["events_per_topic"] == {"impressions": 2, "feedback": 1}
    assert summary["feedback_per_task"] == {"click": 1}


def test_a_log_with_two_topics_of_one_kind_is_refused_before_anything_is_streamed(tmp_path: Path) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    write_records(source, [("impressions", impression(0, 1)), ("feedback", feedback(0, 2)),
                           ("feedback-2", feedback(0, 3))])
    with pytest.raises(StreamError, match=starting(f"event log {source} holds feedback events in 2 topics "
                                                   "('feedback', 'feedback-2'): a log's impression topic is "
                                                   "replayed onto --impressions-topic")):
        stream_dataset("log", f"file://{source}", f"file://{out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.evlog"]  # no output, not even a partial one


def test_a_log_topic_holding_impressions_and_feedback_is_refused_naming_the_record(tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.evlog"
    write_records(source, [("events", impression(0, 1)), ("events", impression(1, 2)), ("events", feedback(0, 3))])
    assert cli(["--dataset", "log", "--source", f"file://{source}", "--to", f"file://{tmp_path}/o.evlog"]) == 2
    assert capsys.readouterr().err.startswith(f"crossdistil stream: event log {source}: record 2: topic 'events' "
                                              "holds impressions and feedback events: ")


def test_the_topics_of_a_log_are_read_within_its_limit(tmp_path: Path) -> None:
    source, out = tmp_path / "in.evlog", tmp_path / "out.evlog"
    write_records(source, [("impressions", impression(0, 1)), ("feedback", feedback(0, 2)), ("other", feedback(1, 3))])
    summary = stream_dataset("log", f"file://{source}", f"file://{out}", limit=2, feedback_topic="fb")
    assert summary["events_per_topic"] == {"impressions": 1, "fb": 1}  # the third topic lies past the limit
