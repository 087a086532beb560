"""A damaged event log: strict by default (an ``EventLogError`` that names the record, its byte offset and
``--skip-damaged``); with a ``DamagedRecords`` the reader skips what it can skip soundly (a whole msgpack value that
is not a record, a record holding a string that is not UTF-8, a last record cut short), counts it with its reason,
index and offset, and reads every whole record as it was written. Bytes that are not msgpack stop it in both modes,
saying how many records came before and how to keep them. ``crossdistil stream --dataset log --skip-damaged``."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import msgpack
import pytest

from streamer.eventlog import (
    DAMAGE_REASONS,
    DamagedRecords,
    EventLogError,
    read_event_log,
    read_event_log_entries,
    read_event_log_sized,
)

pytestmark = pytest.mark.unit


def record(i: int, key: str = "k") -> dict:
    return {"topic": "feedback", "key": key,
            "event": {"v": 1, "impression_id": f"i{i}", "ts_ms": 1_000 * i, "task": "click", "value": 1.0}}


def packed(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def not_utf8(i: int) -> bytes:
    """Record ``i`` with its key's one byte replaced by one that is not UTF-8: whole msgpack framing, bad text."""
    data = packed(record(i, key="x"))
    assert data.count(b"\xa3key\xa1x") == 1
    return data.replace(b"\xa3key\xa1x", b"\xa3key\xa1\xff")


JUNK = {  # a whole msgpack value that is not a record, and its reason
    "a header": (packed("crossdistil event log v1"), "not_a_record"),
    "an int": (packed(42), "not_a_record"),
    "other keys": (packed({"topic": "impressions", "key": "k", "value": b"x"}), "not_a_record"),
    "an empty topic": (packed({"topic": "", "key": "k", "event": {}}), "bad_field"),
    "a list event": (packed({"topic": "t", "key": "k", "event": [1]}), "bad_field"),
    "a nested map": (packed({"a": {"b": [1, 2, {"c": None}]}}), "not_a_record"),
}


def write(path: Path, parts: list[bytes]) -> Path:
    path.write_bytes(b"".join(parts))
    return path


def entries(path: Path, damaged: DamagedRecords | None = None) -> list[tuple]:
    return list(read_event_log_entries(path, damaged))


# ------------------------------------------------------------------------------------------------ strict


def test_a_record_that_is_not_one_is_an_error_naming_the_flag_and_its_offset(tmp_path: Path) -> None:
    good = [packed(record(i)) for i in range(3)]
    log = write(tmp_path / "a.evlog", [*good[:2], JUNK["other keys"][0], good[2]])
    offset = len(good[0]) + len(good[1])
    with pytest.raises(EventLogError, match=rf"record 2 must be a map with keys topic, key, event; got 'key', "
                                            rf"'topic', 'value' \(at byte {offset}\); --skip-damaged skips such a "
                                            "record and counts it in the output"):
        entries(log)
    log = write(tmp_path / "b.evlog", [good[0], JUNK["an empty topic"][0]])
    with pytest.raises(EventLogError, match=r"record 1 needs a non-empty str topic, a str key and a map event "
                                            rf"\(at byte {len(good[0])}\); --skip-damaged"):
        entries(log)


def test_a_truncated_log_says_how_many_bytes_of_which_record_and_names_the_flag(tmp_path: Path) -> None:
    good = [packed(record(i)) for i in range(4)]
    log = write(tmp_path / "a.evlog", [*good[:3], good[3][:-7]])
    whole = sum(map(len, good[:3]))
    with pytest.raises(EventLogError, match=rf"ends in the middle of record 3 \(truncated file\?\): its last "
                                            rf"{len(good[3]) - 7} bytes, from byte {whole}, are a record cut short "
                                            r".*after 3 whole records; --skip-damaged"):
        entries(log)


def test_a_string_that_is_not_utf8_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    log = write(tmp_path / "a.evlog", [packed(record(0)), not_utf8(1), packed(record(2))])
    with pytest.raises(EventLogError, match=r"record 1 \(at byte \d+\) holds a string that is not UTF-8 .*after 1 "
                                            "whole records; --skip-damaged"):
        entries(log)


@pytest.mark.parametrize("skipping", [False, True])
def test_bytes_that_are_not_msgpack_stop_the_reading_saying_how_to_keep_what_came_before(tmp_path: Path,
                                                                                         skipping: bool) -> None:
    good = [packed(record(i)) for i in range(5)]
    offset = sum(map(len, good[:3]))
    log = write(tmp_path / "a.evlog", [*good[:3], b"\xc1", *good[3:]])  # 0xc1: never used by msgpack
    damaged = DamagedRecords() if skipping else None
    with pytest.raises(EventLogError) as raised:
        entries(log, damaged)
    said = str(raised.value)
    assert f"record 3 (at byte {offset}) is not valid msgpack" in said and "after 3 whole records" in said
    assert ("even with --skip-damaged" in said) == skipping
    assert f"'head -c {offset} {log} > KEPT.evlog' keeps the 3 records before it" in said
    kept = write(tmp_path / "kept.evlog", [log.read_bytes()[:offset]])  # what the message says to do
    assert [e[:3] for e in entries(kept)] == [tuple(record(i).values()) for i in range(3)]


# ---------------------------------------------------------------------------------------------- skipping


def test_skipping_reads_every_whole_record_as_written_and_counts_the_rest(tmp_path: Path) -> None:
    good = [packed(record(i)) for i in range(12)]
    parts: list[bytes] = [JUNK["a header"][0]]
    expected_damage = [(0, "not_a_record")]
    kinds = [*JUNK.values()]
    for i, data in enumerate(good):
        parts.append(data)
        if i % 3 == 1:
            junk, reason = kinds[(i // 3) % len(kinds)]
            expected_damage.append((len(parts), reason))
            parts.append(junk)
        if i == 7:
            expected_damage.append((len(parts), "invalid_utf8"))
            parts.append(not_utf8(100))
    cut = packed(record(99))[:-4]
    expected_damage.append((len(parts), "truncated"))
    parts.append(cut)
    log = write(tmp_path / "damaged.evlog", parts)
    damaged = DamagedRecords()
    read = entries(log, damaged)
    assert [(t, k, e, size) for t, k, e, size in read] == [(*record(i).values(), len(good[i])) for i in range(12)]
    offsets = [sum(map(len, parts[:n])) for n in range(len(parts))]
    assert [(d["record"], d["reason"]) for d in damaged.first] == expected_damage[:DamagedRecords.EXAMPLES]
    assert all(d["byte"] == offsets[d["record"]] and d["bytes"] == len(parts[d["record"]]) for d in damaged.first)
    assert damaged.records == len(expected_damage) and damaged.bytes == sum(len(parts[n]) for n, _ in expected_damage)
    assert set(damaged.by_reason) <= set(DAMAGE_REASONS) and damaged.by_reason["truncated"] == 1
    assert damaged.by_reason["invalid_utf8"] == 1
    assert DamagedRecords.from_dict(damaged.to_dict()).to_dict() == damaged.to_dict()
    said = damaged.describe()
    assert said.startswith(f"{damaged.records} damaged records skipped ({damaged.bytes:,} bytes: ")
    assert f"the last record was cut short: its {len(cut)} bytes at byte {offsets[-1]:,} skipped" in said
    # the wrappers skip the same and yield the same records
    assert [r for r, _ in read_event_log_sized(log, DamagedRecords())] == list(read_event_log(log, DamagedRecords()))
    assert len(list(read_event_log(log, DamagedRecords()))) == 12


@pytest.mark.parametrize("cut", [1, 2, 5, 17, 40])
def test_a_log_cut_anywhere_in_its_last_record_keeps_every_whole_record(tmp_path: Path, cut: int) -> None:
    good = [packed(record(i)) for i in range(50)]
    log = write(tmp_path / "a.evlog", [*good[:-1], good[-1][:-cut]])
    damaged = DamagedRecords()
    assert [e[2]["impression_id"] for e in entries(log, damaged)] == [f"i{i}" for i in range(49)]
    assert damaged.to_dict()["by_reason"] == {"truncated": 1}
    assert damaged.bytes == len(good[-1]) - cut and damaged.first[0]["record"] == 49


def test_a_last_record_cut_inside_a_string_that_is_not_utf8_is_a_truncated_one(tmp_path: Path) -> None:
    bad = not_utf8(5)
    log = write(tmp_path / "a.evlog", [packed(record(0)), bad[:bad.index(b"\xff") + 1]])
    damaged = DamagedRecords()
    assert len(entries(log, damaged)) == 1 and damaged.by_reason == {"truncated": 1}


def test_a_clean_log_reads_the_same_either_way_and_skips_nothing(tmp_path: Path) -> None:
    log = write(tmp_path / "a.evlog", [packed(record(i)) for i in range(30)])
    damaged = DamagedRecords()
    assert entries(log, damaged) == entries(log) and not damaged
    assert damaged.to_dict() == {"records": 0, "bytes": 0, "by_reason": {}, "first": []}
    assert damaged.describe() == "no damaged record"


def test_only_the_first_ones_are_described_every_one_is_counted(tmp_path: Path) -> None:
    log = write(tmp_path / "a.evlog", [packed(record(0))] + [packed(n) for n in range(25)] + [packed(record(1))])
    damaged = DamagedRecords()
    assert len(entries(log, damaged)) == 2
    assert damaged.records == 25 and len(damaged.first) == DamagedRecords.EXAMPLES
    assert [d["record"] for d in damaged.first] == list(range(1, 11))


def test_skipping_random_damage_keeps_exactly_the_whole_records() -> None:
    """Whole values that are not records and strings that are not UTF-8, anywhere, and a last record cut anywhere:
    the records read are the good ones in order, with their sizes; the damage counted is what was put in."""
    import tempfile

    rng = random.Random(11)
    junk = [data for data, _ in JUNK.values()] + [packed([1, 2]), packed(None), packed(3.5), packed({"topic": "x"})]
    with tempfile.TemporaryDirectory() as folder:
        for trial in range(60):
            parts, good, bad = [], [], 0
            for i in range(rng.randrange(0, 40)):
                roll = rng.random()
                if roll < 0.15:
                    parts.append(rng.choice(junk))
                    bad += 1
                elif roll < 0.2:
                    parts.append(not_utf8(i))
                    bad += 1
                else:
                    data = packed(record(i, key=rng.choice(["u", "ü", "用户"])))
                    parts.append(data)
                    good.append((msgpack.unpackb(data, raw=False), data))
            if rng.random() < 0.5:
                last = packed(record(999))
                parts.append(last[:rng.randrange(1, len(last))])
                bad += 1
            log = write(Path(folder) / f"{trial}.evlog", parts)
            damaged = DamagedRecords()
            read = entries(log, damaged)
            assert [(t, k, e, size) for t, k, e, size in read] == [(*r.values(), len(d)) for r, d in good], trial
            assert damaged.records == bad, trial


# ------------------------------------------------------------------------------------ crossdistil stream


def stream_cli(*argv: str) -> int:
    from streamer.stream import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def test_stream_from_a_damaged_log_skips_and_says_how_many_or_stops_naming_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    impressions = [{"topic": "impressions", "key": f"u{i}", "event": {
        "v": 1, "impression_id": f"i{i}", "ts_ms": 1_000 * i, "user_id": f"u{i}", "item_id": "a", "features": {}}}
        for i in range(6)]
    parts = [packed(impressions[0]), JUNK["a header"][0], *map(packed, impressions[1:5]), not_utf8(7),
             packed(impressions[5])[:-3]]
    log = write(tmp_path / "damaged.evlog", parts)
    out = tmp_path / "repaired.evlog"
    assert stream_cli("--dataset", "log", "--source", f"file://{log}", "--to", f"file://{out}", "--quiet") == 2
    assert "--skip-damaged skips such a record" in capsys.readouterr().err and not out.exists()
    assert stream_cli("--dataset", "log", "--source", f"file://{log}", "--to", f"file://{out}", "--quiet",
                      "--skip-damaged") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "3 damaged records skipped" in err and "those records were not streamed" in err
    assert [r.event["impression_id"] for r in read_event_log(out)] == [f"i{i}" for i in range(5)]  # repaired
    from streamer.stream import stream_dataset

    summary = stream_dataset("log", f"file://{log}", f"file://{tmp_path / 'again.evlog'}", skip_damaged=True)
    assert summary["events"] == 5 and summary["skipped_records"]["by_reason"] == {
        "not_a_record": 1, "invalid_utf8": 1, "truncated": 1}


def test_a_bad_event_after_skipped_records_names_its_index_in_the_file(tmp_path: Path) -> None:
    from streamer.stream import StreamError, stream_dataset

    bad_event = {"topic": "feedback", "key": "k", "event": {"v": 1, "impression_id": "", "ts_ms": 5, "task": "t",
                                                            "value": 1}}
    log = write(tmp_path / "a.evlog", [packed(record(0)), JUNK["an int"][0], JUNK["a header"][0], packed(bad_event)])
    with pytest.raises(StreamError, match=r"event log .*a.evlog: record 3"):
        stream_dataset("log", f"file://{log}", f"file://{tmp_path / 'out.evlog'}", skip_damaged=True)


def test_skip_damaged_is_for_an_event_log_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert stream_cli("--dataset", "synthetic", "--option", "n_events=10", "--to", f"file://{tmp_path}/s.evlog",
                      "--skip-damaged") == 2
    assert "--skip-damaged applies to --dataset log" in capsys.readouterr().err
