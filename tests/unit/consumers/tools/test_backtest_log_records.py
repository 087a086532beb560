"""An event log's records are checked in place, and give exactly what the trainer's decoder gives for their bytes."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from consumers.tools.backtest import Record, log_records
from consumers.tools.intake import LoggedRecord, StrayRecord
from streamer.eventlog import EventLogWriter
from streamer.events import DEFAULT_LIMITS, EventError

pytestmark = pytest.mark.unit

IMPRESSION = {"v": 1, "impression_id": "i1", "ts_ms": 1_000, "user_id": "u", "item_id": "a",
              "features": {"hour": 3, "city": "paris", "watch": 1.5}}
FEEDBACK = {"v": 1, "impression_id": "i1", "ts_ms": 2_000, "task": "click", "value": 1}
BAD = [
    {**IMPRESSION, "ts_ms": "soon"},  # wrong_type
    {**IMPRESSION, "extra": 1},  # unknown_field
    {k: v for k, v in FEEDBACK.items() if k != "task"},  # missing_field
    {**FEEDBACK, "value": float("nan")},  # not_finite
    {**IMPRESSION, "user_id": "x" * 2000},  # too_large (the decoder's string limit)
    {**IMPRESSION, "features": {"k" * 2000: 1}},  # too_large as a key
    {**IMPRESSION, "features": {"blob": b"\x00\x01"}},  # bin is not in the contract
    # records of at most max_str_bytes get the quicker check of their features (check_events' unpacked)
    {**IMPRESSION, "features": {"watch": float("inf"), "hour": 3}},  # not_finite
    {**IMPRESSION, "features": {"flag": True}},  # wrong_type
    {**IMPRESSION, "features": {"": "x"}},  # empty name
    {"v": 2, "impression_id": "i1"},  # bad_version
    {"v": 1, "batch": [IMPRESSION, {**FEEDBACK, "ts_ms": -1}]},  # one bad event in a batch
    {"v": 1, "batch": []},  # empty
    {**IMPRESSION, "features": {7: 1}},  # a name that is not a string: not_msgpack (the decoder's strict map keys)
    {**IMPRESSION, 3.5: "x"},  # a field named by a float, the same
]


def as_decoded(events: list) -> list:
    """Events and errors as comparable values: an error by its class, reason, field, index and text."""
    return [(type(e).__name__, e.reason, e.field, e.index, str(e)) if isinstance(e, EventError) else e
            for e in events]


def logged(tmp_path: Path, events: list[dict]) -> list[LoggedRecord]:
    path = tmp_path / "x.evlog"
    with EventLogWriter(path) as log:
        for event in events:
            log.write("impressions" if "user_id" in event else "feedback", "u", event)
    records, _ = log_records(f"file://{path}")
    return list(records)


def test_valid_events_of_a_log_are_what_the_decoder_makes_of_their_bytes(tmp_path: Path) -> None:
    batch = {"v": 1, "batch": [IMPRESSION, FEEDBACK]}
    for record, event in zip(logged(tmp_path, [IMPRESSION, FEEDBACK, batch]), [IMPRESSION, FEEDBACK, batch]):
        expected = Record(record.topic, 0, msgpack.packb(event, use_bin_type=True)).events()
        assert record.events() == expected
        assert all(type(e) is dict for e in expected)
    assert type(logged(tmp_path, [FEEDBACK])[0].events()[0]["value"]) is float  # normalised as the decoder does


@pytest.mark.parametrize("event", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_event_of_a_log_gets_the_decoders_error_and_reason(tmp_path: Path, event: dict) -> None:
    [record] = logged(tmp_path, [event])
    expected = Record(record.topic, 0, msgpack.packb(event, use_bin_type=True)).events()
    assert any(isinstance(e, EventError) for e in expected)
    assert as_decoded(record.events()) == as_decoded(expected)


def test_a_record_larger_than_one_event_may_be_is_decoded_from_its_bytes(tmp_path: Path) -> None:
    # A valid batch envelope over max_event_bytes: the size check is the decoder's, through the bytes.
    many = {"v": 1, "batch": [{**IMPRESSION, "impression_id": f"i{n}", "features": {"text": "y" * 250}}
                              for n in range(5_000)]}
    [record] = logged(tmp_path, [many])
    assert record.size > DEFAULT_LIMITS.max_event_bytes
    assert record.events() == Record(record.topic, 0, record.value).events()
    assert len(record.events()) == 5_000


def test_log_records_carry_each_records_size_in_the_file(tmp_path: Path) -> None:
    records = logged(tmp_path, [IMPRESSION, FEEDBACK])
    assert sum(r.size for r in records) == (tmp_path / "x.evlog").stat().st_size
    assert [(r.topic, r.partition) for r in records] == [("impressions", 0), ("feedback", 0)]


def test_records_on_topics_a_trainer_does_not_read_are_one_dead_letter_each(tmp_path: Path) -> None:
    path = tmp_path / "x.evlog"
    with EventLogWriter(path) as log:
        log.write("impressions", "u", IMPRESSION)
        log.write("impresions", "u", {**IMPRESSION, "impression_id": "i2"})  # a typo of another writer
        log.write("model-updates", "m", {"v": 1})
        log.write("feedback", "u", FEEDBACK)
    records, desc = log_records(f"file://{path}", topics=["impressions", "feedback"])
    assert desc["topics"] == ["impressions", "feedback"]
    for ranged in ({}, {"from_ms": 0}):  # the two ways of reading a log
        read = list(records if not ranged else log_records(f"file://{path}", topics=["impressions", "feedback"],
                                                            **ranged)[0])
        assert [type(r) for r in read] == [LoggedRecord, StrayRecord, StrayRecord, LoggedRecord]
        [error] = read[1].events()
        assert (error.reason, error.field, read[1].topic) == ("unknown_topic", "topic", "impresions")
        assert "'impressions', 'feedback'" in str(error)
    everything, _ = log_records(f"file://{path}")  # no topics named: every record replays
    assert [type(r) for r in everything] == [LoggedRecord] * 4


def test_a_time_range_applies_to_each_event_of_a_batch_envelope(tmp_path: Path) -> None:
    early, inside, late = ({**IMPRESSION, "impression_id": f"i{ts}", "ts_ms": ts} for ts in (500, 1_500, 2_500))
    path = tmp_path / "x.evlog"
    with EventLogWriter(path) as log:
        log.write("impressions", "u", {"v": 1, "batch": [early, inside, late, {**IMPRESSION, "ts_ms": "soon"}]})
        log.write("impressions", "u", {"v": 1, "batch": [early, late]})  # nothing in range: left out
        log.write("impressions", "u", inside)
    records, _ = log_records(f"file://{path}", from_ms=1_000, to_ms=2_000)
    first, second = records
    # the event without a time is kept, to be dead-lettered as it would be without a range
    assert [e["impression_id"] if type(e) is dict else e.reason for e in first.events()] == ["i1500", "wrong_type"]
    assert second.event == inside
