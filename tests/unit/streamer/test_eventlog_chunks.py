"""``read_event_log_chunks``: the records, sizes and errors of ``read_event_log_sized``, a chunk at a time."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from streamer.eventlog import EventLogError, read_event_log_chunks, read_event_log_sized
from streamer.stream import stream_dataset

pytestmark = pytest.mark.unit


def chunked(path: Path, records: int) -> list[tuple]:
    return [((topic, key, event), size) for chunk in read_event_log_chunks(path, records)
            for topic, key, event, size in zip(*chunk)]


@pytest.mark.parametrize("records", [1, 7, 256, 100_000])
def test_chunks_hold_the_records_and_sizes_of_the_record_by_record_reader(tmp_path: Path, records: int) -> None:
    log = tmp_path / "a.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options={"n_events": "300"})
    assert chunked(log, records) == [(tuple(record), size) for record, size in read_event_log_sized(log)]


@pytest.mark.parametrize("damage, match", [
    (lambda data: data[:-3], "truncated"),
    (lambda data: data + msgpack.packb({"topic": "x", "event": {}}), r"record 12 must be a map with keys"),
    (lambda data: data + msgpack.packb({"topic": "", "key": "k", "event": {}}), r"record 12 needs a non-empty"),
    (lambda data: data + b"\xc1", "record 12 is not valid msgpack"),
])
def test_a_damaged_log_gets_the_record_by_record_readers_error(tmp_path: Path, damage, match: str) -> None:
    log = tmp_path / "a.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options={"n_events": "6"})
    assert len(list(read_event_log_sized(log))) == 12
    log.write_bytes(damage(log.read_bytes()))
    with pytest.raises(EventLogError, match=match) as reference:
        list(read_event_log_sized(log))
    for records in (5, 256):
        with pytest.raises(EventLogError) as error:
            chunked(log, records)
        assert str(error.value) == str(reference.value)
