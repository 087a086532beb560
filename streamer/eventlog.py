"""Event-log files: the streamed events on disk, so a replay or a backtest knows every event's topic and key.

An event log is a plain stream of concatenated msgpack maps (no header, no framing, no compression), one per
event, in the order they were streamed (non-decreasing event time when written by ``crossdistil stream``)::

    {"topic": "impressions", "key": "4854", "event": {"v": 1, "impression_id": "kr-19942", ...}}
    {"topic": "feedback",    "key": "4854", "event": {"v": 1, "impression_id": "kr-19942", "task": "click", ...}}

``event`` is one contract event (``streamer.events``); ``key`` is the Kafka message key as text (the user id).
A reader needs msgpack alone (see docs/event-log.md)::

    import msgpack
    with open("run.evlog", "rb") as f:
        for record in msgpack.Unpacker(f, raw=False):
            print(record["topic"], record["key"], record["event"]["ts_ms"])

The project's reader (``read_event_log_entries`` and the functions on it) is strict: a damaged log (a record that is
not ``{topic, key, event}``, bytes that are not msgpack, a last record cut short) is an ``EventLogError`` naming the
record and its byte offset. With a ``DamagedRecords`` it skips what it can skip soundly and counts it there (see
``read_event_log_entries``): ``crossdistil backtest --skip-damaged``, ``crossdistil stream --dataset log
--skip-damaged``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import msgpack

RECORD_KEYS = frozenset({"topic", "key", "event"})
# A record holds one event (<= 1 MiB by the contract) or, if a third party wrote one, a batch envelope.
MAX_RECORD_BYTES = 16 << 20


class EventLogError(ValueError):
    """An event-log file is missing, truncated, or holds something that is not a {topic, key, event} record."""


SKIP_HINT = "--skip-damaged skips such a record and counts it in the output"
DAMAGE_REASONS = {
    "not_a_record": "a msgpack value that is not a map with exactly the keys topic, key, event",
    "bad_field": "a {topic, key, event} map with an empty or non-str topic, a non-str key or a non-map event",
    "invalid_utf8": "a record whose bytes are whole but hold a string that is not UTF-8",
    "truncated": "the last record, cut short (a writer stopped mid-write)",
}


class DamagedRecords:
    """What a reader skipped of a damaged event log (``read_event_log_entries(path, damaged=...)``): records of the
    wrong shape, records holding a string that is not UTF-8, and a last record cut short. ``records`` and ``bytes``
    count them, ``by_reason`` per reason (``DAMAGE_REASONS``), and ``first`` describes the first ``EXAMPLES``: the
    record's index in the file (every msgpack value counted, the skipped ones too), its byte offset and size, the
    reason and the problem. Empty (false) when nothing was skipped.

    >>> damaged = DamagedRecords()
    >>> damaged.skip(3, 410, 12, "not_a_record", "a str")
    >>> damaged.skip(9, 900, 37, "truncated", "the last 37 bytes are a record cut short")
    >>> bool(damaged), damaged.records, damaged.bytes, damaged.by_reason
    (True, 2, 49, {'not_a_record': 1, 'truncated': 1})
    >>> said = damaged.describe()
    >>> said[:98]
    '2 damaged records skipped (49 bytes: not_a_record 1, truncated 1; the first at record 3, byte 410)'
    >>> said[98:]
    '; the last record was cut short: its 37 bytes at byte 900 skipped'
    """

    EXAMPLES = 10

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.by_reason: dict[str, int] = {}
        self.first: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        return self.records > 0

    def skip(self, index: int, offset: int, size: int, reason: str, problem: str) -> None:
        """Count one record skipped: the ``index``-th of the file, ``size`` bytes at byte ``offset``."""
        self.records += 1
        self.bytes += size
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.first) < self.EXAMPLES:
            self.first.append({"record": index, "byte": offset, "bytes": size, "reason": reason, "problem": problem})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (summary.json's ``skipped_records``, the intake's message)."""
        return {"records": self.records, "bytes": self.bytes, "by_reason": dict(self.by_reason),
                "first": [dict(example) for example in self.first]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DamagedRecords:
        out = cls()
        out.records, out.bytes = int(data["records"]), int(data["bytes"])
        out.by_reason = {str(k): int(v) for k, v in data["by_reason"].items()}
        out.first = [dict(example) for example in data["first"]]
        return out

    def describe(self) -> str:
        """One line: how many records and bytes, by reason, where the first was; a cut-short last record apart."""
        if not self:
            return "no damaged record"
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in self.by_reason.items())
        first = self.first[0]
        said = (f"{self.records:,} damaged record{'' if self.records == 1 else 's'} skipped ({self.bytes:,} bytes: "
                f"{reasons}; the first at record {first['record']:,}, byte {first['byte']:,})")
        tail = next((e for e in self.first if e["reason"] == "truncated"), None)
        if tail is not None:
            said += f"; the last record was cut short: its {tail['bytes']:,} bytes at byte {tail['byte']:,} skipped"
        return said


class LogRecord(NamedTuple):
    """One record of an event log: the topic and key the event travels with, and the event itself."""

    topic: str
    key: str
    event: dict[str, Any]


def path_from_url(url: str) -> Path:
    """``file://PATH`` (or a bare path) -> Path. ``file:///abs`` and ``file://rel/path`` both work."""
    return Path(url[len("file://"):] if url.startswith("file://") else url)


class EventLogWriter:
    """Appends records to an event-log file; ``bytes_written`` counts what it wrote.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [r.key for r in read_event_log(path)]
    ['u1']
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise EventLogError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._file: BinaryIO = self.path.open("wb")
        self._packer = msgpack.Packer(use_bin_type=True)
        self.bytes_written = 0

    def write(self, topic: str, key: str, event: Mapping[str, Any]) -> int:
        """Write one record; returns its size in bytes."""
        data = self._packer.pack({"topic": topic, "key": key, "event": dict(event)})
        self._file.write(data)
        self.bytes_written += len(data)
        return len(data)

    def close(self) -> None:
        """Flush and close the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_event_log(path: str | Path, damaged: DamagedRecords | None = None) -> Iterator[LogRecord]:
    """Yield the records of an event log in file order; raise ``EventLogError`` on a malformed record (``damaged``:
    skip what can be skipped and count it there, ``read_event_log_entries``).

    Events are returned as stored (validate them with ``streamer.events.validate`` if the file is untrusted).
    """
    for record, _size in read_event_log_sized(path, damaged):
        yield record


def read_event_log_sized(path: str | Path, damaged: DamagedRecords | None = None) -> Iterator[tuple[LogRecord, int]]:
    """``read_event_log`` with each record's size in bytes in the file (its event packs into no more than that).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [(r.topic, size == n) for r, size in read_event_log_sized(path)]
    [('feedback', True)]
    """
    for topic, key, event, size in read_event_log_entries(path, damaged):
        yield LogRecord(topic, key, event), size


def read_event_log_entries(path: str | Path, damaged: DamagedRecords | None = None
                           ) -> Iterator[tuple[str, str, dict[str, Any], int]]:
    """``read_event_log_sized`` as flat ``(topic, key, event, size)`` tuples: the cheapest form, for a replay that
    reads every record of a long log (the same records and the same errors).

    Strict (``damaged`` None): a damaged log is an ``EventLogError`` at its first damage, naming the record, its byte
    offset and how many whole records came before it. With ``damaged`` (a ``DamagedRecords``), what can be skipped
    soundly is skipped and counted there, each with its reason:

    * ``not_a_record`` / ``bad_field``: a whole msgpack value that is not a record (another tool's header, a map
      with other keys or types): msgpack says where it ends, so the next record is read as it was written;
    * ``invalid_utf8``: a record whose framing is whole but holds a string that is not UTF-8 (a flipped high bit in
      a text): its extent is read again without decoding strings, and the reading goes on after it;
    * ``truncated``: a last record cut short (the usual end of a writer killed mid-write): its bytes are skipped.

    Bytes that are not msgpack at all (a reserved byte, a nesting too deep, a record over ``MAX_RECORD_BYTES``) are
    an ``EventLogError`` in both modes: msgpack has no record boundaries to find the next record from, and a guess
    could read a record's inside as records. The message says how many whole records were read before it and how
    to keep them (``head -c``).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [(topic, key, size == n) for topic, key, _event, size in read_event_log_entries(path)]
    [('feedback', 'u1', True)]
    """
    path = Path(path)
    if not path.is_file():
        raise EventLogError(f"event log {path} does not exist")
    with path.open("rb") as handle:
        index = 0
        base = 0  # the byte offset the current unpacker started at (a new one after a skipped invalid_utf8 record)
        start = 0  # the end of the last whole record, from ``base``
        while True:
            # strict_map_key=False: a map key that is not a string (e.g. a feature name written as an int) is the
            # event's problem, which its validation names and dead-letters as the trainer does, not the whole log's
            unpacker = msgpack.Unpacker(handle, raw=False, strict_map_key=False, max_buffer_size=MAX_RECORD_BYTES)
            tell = unpacker.tell
            try:
                for record in unpacker:
                    end = tell()
                    # the common case tested inline (a call per record costs a few per cent of a replay's intake);
                    # anything else goes to _check_record, which names the problem (or, skipping, counts it)
                    if not (type(record) is dict and record.keys() == RECORD_KEYS
                            and type(topic := record["topic"]) is str and topic and type(key := record["key"]) is str
                            and type(event := record["event"]) is dict):
                        checked = _check_record(record, path, index, base + start, end - start, damaged)
                        if checked is None:  # skipped, counted in ``damaged``
                            start = end
                            index += 1
                            continue
                        topic, key, event = checked
                    yield topic, key, event, end - start
                    start = end
                    index += 1
            except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
                    msgpack.exceptions.BufferFull, ValueError) as exc:
                if isinstance(exc, EventLogError):
                    raise
                if damaged is None or not isinstance(exc, UnicodeDecodeError):
                    raise _not_msgpack(path, index, base + start, exc, damaged is not None) from None
                # the record's framing is whole: read where it ends without decoding its strings, go on after it
                size = _record_extent(path, base + start)
                if size is None:  # it does not end before the file does: the last record, cut short
                    break
                damaged.skip(index, base + start, size, "invalid_utf8", f"a string that is not UTF-8 ({exc.reason} "
                             f"at byte {exc.start} of a {len(exc.object)}-byte string)")
                index += 1
                base += start + size
                start = 0
                handle.seek(base)
                continue
            break
        # ``start`` (the end of the last whole record), not ``unpacker.tell()``: after a partial last record the
        # unpacker's position may count the bytes it buffered (a log cut 7 bytes short passed that way)
        _check_end(path, index, base + start, damaged)


def _check_end(path: Path, index: int, offset: int, damaged: DamagedRecords | None) -> None:
    """After the last whole record (the ``index``-th, ending at byte ``offset``): bytes left are a last record cut
    short, an error, or counted in ``damaged``."""
    cut = path.stat().st_size - offset
    if cut == 0:
        return
    if damaged is None:
        raise EventLogError(f"event log {path} ends in the middle of record {index} (truncated file?): its last "
                            f"{cut:,} bytes, from byte {offset:,}, are a record cut short (a writer stopped "
                            f"mid-write?), after {index:,} whole records; {SKIP_HINT}")
    damaged.skip(index, offset, cut, "truncated", f"the last {cut:,} bytes are a record cut short (a writer stopped "
                 "mid-write?)")


_NOT_A_LOG = ": is this an event log? 'crossdistil stream --to file://PATH' writes one (docs/event-log.md)"


def _not_msgpack(path: Path, index: int, offset: int, exc: Exception, skipping: bool) -> EventLogError:
    """The error for bytes that are not msgpack at record ``index`` (byte ``offset``): how many whole records came
    before, and how to keep them; why it is not skipped."""
    why = str(exc) or type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):  # the framing is whole: skippable (read_event_log_entries)
        return EventLogError(f"event log {path}: record {index} (at byte {offset:,}) holds a string that is not UTF-8 "
                             f"({why}), after {index:,} whole records; {SKIP_HINT}")
    said = f"event log {path}: record {index} (at byte {offset}) is not valid msgpack ({why})"
    if index == 0:
        return EventLogError(said + _NOT_A_LOG)
    return EventLogError(f"{said}, after {index:,} whole records: msgpack has no record boundaries to find the next "
                         f"record from, so the reading stops here{' even with --skip-damaged' if skipping else ''}; "
                         f"'head -c {offset} {path} > KEPT.evlog' keeps the {index:,} records before it")


def _record_extent(path: Path, offset: int) -> int | None:
    """The size of the msgpack value at byte ``offset`` of ``path``, its strings left undecoded (a record whose only
    damage is a string that is not UTF-8); None if it does not end before the file does."""
    with path.open("rb") as handle:
        handle.seek(offset)
        unpacker = msgpack.Unpacker(handle, raw=True, strict_map_key=False, max_buffer_size=MAX_RECORD_BYTES)
        try:
            unpacker.skip()
        except msgpack.exceptions.OutOfData:
            return None
        return unpacker.tell()


def _check_record(record: Any, path: Path, index: int, offset: int = 0, size: int = 0,
                  damaged: DamagedRecords | None = None) -> LogRecord | None:
    """The record's (topic, key, event); a record that is not one raises ``EventLogError``, or is counted in
    ``damaged`` (None returned) when it is given."""
    if not isinstance(record, dict) or record.keys() != RECORD_KEYS:
        keys = ', '.join(sorted(map(repr, record))) if isinstance(record, dict) else type(record).__name__
        if damaged is not None:
            damaged.skip(index, offset, size, "not_a_record", f"not a map with keys topic, key, event: {keys[:200]}")
            return None
        raise EventLogError(f"event log {path}: record {index} must be a map with keys topic, key, event; got {keys}"
                            f"{_NOT_A_LOG if index == 0 else f' (at byte {offset:,}); {SKIP_HINT}'}")
    topic, key, event = record["topic"], record["key"], record["event"]
    if not isinstance(topic, str) or not topic or not isinstance(key, str) or not isinstance(event, dict):
        if damaged is not None:
            damaged.skip(index, offset, size, "bad_field", "needs a non-empty str topic, a str key and a map event")
            return None
        raise EventLogError(f"event log {path}: record {index} needs a non-empty str topic, a str key and a map event "
                            f"(at byte {offset:,}); {SKIP_HINT}")
    return LogRecord(topic, key, event)
