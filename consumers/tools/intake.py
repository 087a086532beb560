"""A replay's input: event-log records, and the intake process that reads, joins and encodes them for a dense replay.

``log_records`` gives the records of an event log (``LoggedRecord``: the event as the log's reader unpacked it,
validated in place by the trainer's validator). A backtest feeds them to its pipelines (``consumers.tools.
backtest.run_backtest``) in one of two ways:

* inline: this process reads, validates, joins, batches, encodes and trains, one chunk of records after another
  (event-time batching always: the batches depend on the replay clock the learner's own pipeline keeps);
* an intake process (dense batching of an event log, ``crossdistil backtest --intake process``, the default
  there): a child reads the log, validates every event, runs each group's join and batcher (the trainer's
  ``Pipeline`` with a port that sends instead of training) and encodes every batch (``consumers.core.pipeline.
  encode_samples``, once per feature set); this process only trains, scores and keeps the metrics. The two run
  on two cores at once, and the batches, their order and their tensors are the same as inline, so every number
  of the replay is the same bit for bit (``tests/unit/consumers/tools/test_backtest_intake.py``).

The child does not import torch (it starts in ~0.1 s) and never sees a learner. Protocol: the hello (JSON: the
log, its range, the topics a trainer reads, whether damaged records are skipped, the groups' join settings, batch
sizes, tasks and feature sets) on the child's stdin; then length-framed msgpack maps on a pipe, child to parent
only (nothing is pickled), in this order: ``read`` (records, events and bytes read so far, after each chunk),
``batch`` (a group's batch: each sample's impression id, user id and event time, and the arrays of each feature set
as bytes), ``done`` (its CPU seconds, the first bad events described, the damaged records skipped with
``skip_damaged``; per group the join's final state, dead letters by reason, events consumed per topic, samples
emitted) or ``error`` (the exception's kind and message; an ``EventLogError`` or ``ValueError`` is raised as such
in the parent, so a truncated log fails as it does inline). The pipe's buffer bounds how far the child runs ahead
(~1 MiB, a few batches); it dies with the parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import msgpack
import numpy as np

from consumers.core.batching import MiniBatcher
from consumers.core.join import AttributionJoin, JoinConfig
from consumers.core.pipeline import NoMetrics, Pipeline, UserCodes, encode_samples, sample_columns
from consumers.runtime.processes import describe_exit, die_with_parent, grow_pipe, tune_gc
from models.features import FeatureSpec, columns_from_bytes, columns_to_bytes
from streamer.eventlog import DamagedRecords, EventLogError, path_from_url, read_event_log_entries
from streamer.events import DEFAULT_LIMITS, EventError, check_events, decode_events

REPO_ROOT = Path(__file__).resolve().parents[2]
_MAX_EVENT_BYTES = DEFAULT_LIMITS.max_event_bytes
_MAX_STR_BYTES = DEFAULT_LIMITS.max_str_bytes


# ----------------------------------------------------------------------------------------------- records


class LoggedRecord(NamedTuple):
    """One event-log record to replay: its topic (partition 0), the event as the log's reader unpacked it, and the
    record's size in the file (a named tuple: one is made per record, and a tuple is the cheapest to make).

    ``events()`` gives what ``Record(topic, 0, value).events()`` gives for the bytes of the event, without packing
    and unpacking it again: the event is validated in place by the trainer's validator. Anything that could make
    the two differ (an invalid event, whose error message depends on the decoder's limits, or a record larger than
    a single event may be) goes through the bytes, so bad events are dead-lettered with the same reasons.
    """

    topic: str
    event: dict[str, Any]
    size: int
    partition: int = 0

    @property
    def value(self) -> bytes:
        """The bytes a Kafka message would carry (the event packed as ``crossdistil stream`` packs it)."""
        return msgpack.packb(self.event, use_bin_type=True)

    def events(self) -> list[dict | EventError]:
        if self.size <= _MAX_EVENT_BYTES:  # the event packs into at most its record's size
            # a record of at most max_str_bytes holds no longer string: the quicker check of the features
            events = check_events(self.event, unpacked=self.size <= _MAX_STR_BYTES)
            # all good (one event, the common case, tested without a generator: ~3% of a replay's intake)
            if (len(events) == 1 and type(events[0]) is dict) or all(type(event) is dict for event in events):
                return events
        return decode_events(self.value)


class StrayRecord(NamedTuple):
    """A log record on a topic the trainer does not read (``LogRecords.topics``): replayed as one dead letter
    (``unknown_topic``), never joined, as the trainer would never see it (a typo such as ``impresions``, or a
    ``model-updates`` record, in a log written by another tool)."""

    topic: str
    size: int
    read_topics: tuple[str, ...]
    partition: int = 0

    def events(self) -> list[dict | EventError]:
        return [EventError(f"record on topic {self.topic!r}, which the trainer does not read (it reads "
                           f"{', '.join(map(repr, self.read_topics))})", field="topic", reason="unknown_topic")]


@dataclasses.dataclass(frozen=True)
class LogRecords:
    """The records of an event log in ``[from_ms, to_ms)`` (at most ``limit``), read as they are iterated (each
    iteration reads the file again). A dense backtest hands these parameters to its intake process instead.

    The range applies to each event: a batch envelope keeps its events in the range (and is left out when none
    is). ``topics``: the topics a trainer reads (impressions, feedback), any sequence, kept as a tuple; a record on
    another one is a ``StrayRecord`` (one dead letter). None: every record replays whatever its topic.
    ``skip_damaged``: damaged records are skipped (``streamer.eventlog.read_event_log_entries``) instead of raising
    ``EventLogError``; ``read(damaged)`` counts them in a ``DamagedRecords`` (iterating counts them nowhere)."""

    url: str
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int | None = None
    topics: tuple[str, ...] | None = None
    skip_damaged: bool = False

    def __post_init__(self) -> None:
        if self.topics is not None:  # a list from log_records' caller or the intake's JSON hello: one place for both
            object.__setattr__(self, "topics", tuple(self.topics))

    def __iter__(self) -> Iterator[LoggedRecord | StrayRecord]:
        return self.read(DamagedRecords() if self.skip_damaged else None)

    def read(self, damaged: DamagedRecords | None = None) -> Iterator[LoggedRecord | StrayRecord]:
        """The records, reading the file again; with ``damaged`` (``skip_damaged``) the damaged ones are skipped and
        counted there."""
        if damaged is not None and not self.skip_damaged:
            raise ValueError("a strict LogRecords (skip_damaged=False) skips nothing: read it without a DamagedRecords")
        entries = read_event_log_entries(path_from_url(self.url), damaged)
        topics = self.topics
        if self.from_ms is None and self.to_ms is None:
            for topic, _key, event, size in itertools.islice(entries, self.limit):
                yield (LoggedRecord(topic, event, size) if topics is None or topic in topics
                       else StrayRecord(topic, size, topics))
            return
        n = 0
        for topic, _key, event, size in entries:
            if self.limit is not None and n >= self.limit:
                return
            if topics is not None and topic not in topics:
                n += 1
                yield StrayRecord(topic, size, topics)
                continue
            ts = event.get("ts_ms")
            if isinstance(ts, int):
                if not self._in_range(ts):
                    continue
            elif isinstance(event.get("batch"), list):
                batch = event["batch"]
                kept = [e for e in batch if not (isinstance(e, dict) and isinstance(e.get("ts_ms"), int)
                                                 and not self._in_range(e["ts_ms"]))]
                if not kept:
                    continue
                if len(kept) < len(batch):
                    event = {**event, "batch": kept}
            n += 1
            yield LoggedRecord(topic, event, size)

    def _in_range(self, ts: int) -> bool:
        return (self.from_ms is None or ts >= self.from_ms) and (self.to_ms is None or ts < self.to_ms)


DEAD_LETTER_EXAMPLES = 20  # a replay's first bad events, described in its summary and on stderr


def add_dead_letter_examples(examples: list[str], chunk: Sequence[Any], decoded: Sequence[tuple[Sequence[Any], Any]],
                             first: int) -> None:
    """Up to ``DEAD_LETTER_EXAMPLES`` in all: the bad events of a chunk of records (the ``first``-th record of the
    replay onwards, ``decoded`` their events), each as its record's number and topic, its problem and reason, and
    its impression id where it has one. Called for a chunk that had some (rare: the scan is not on the common path)."""
    for offset, (events, _source) in enumerate(decoded):
        for error in (e for e in events if isinstance(e, EventError)):
            if len(examples) >= DEAD_LETTER_EXAMPLES:
                return
            record = chunk[offset]
            event = error.event if error.event is not None else getattr(record, "event", None)
            impression_id = event.get("impression_id") if isinstance(event, dict) else None
            named = f", impression_id {impression_id!r}" if isinstance(impression_id, str) else ""
            examples.append(f"record {first + offset} ({record.topic}): {error} ({error.reason}{named})")


def check_time_range(from_ms: int | None, to_ms: int | None) -> None:
    """A time range must not be empty (``ValueError`` naming both bounds)."""
    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
        raise ValueError(f"--from-time ({from_ms} ms) is not before --to-time ({to_ms} ms): the range [from, to) is "
                         "empty")


def log_records(url: str, from_ms: int | None = None, to_ms: int | None = None, limit: int | None = None,
                topics: Sequence[str] | None = None, skip_damaged: bool = False) -> tuple[LogRecords, dict[str, Any]]:
    """Records of an event log (source ``(topic, 0)``), optionally only events in ``[from_ms, to_ms)``, with
    records on topics other than ``topics`` dead-lettered, and damaged records skipped (``LogRecords``)."""
    check_time_range(from_ms, to_ms)
    path = path_from_url(url)
    if not path.is_file():
        raise EventLogError(f"event log {path} does not exist; write one with "
                            "'crossdistil stream --dataset kuairand --source ../shared/data/kuairand --to file://PATH'")
    desc = {"kind": "log", "log": str(url), "from_ms": from_ms, "to_ms": to_ms, "limit": limit,
            "bytes": path.stat().st_size}
    if topics is not None:
        desc["topics"] = list(topics)
    if skip_damaged:  # only then: what a strict replay's summary says is as it was
        desc["skip_damaged"] = True
    return LogRecords(url, from_ms, to_ms, limit, topics, skip_damaged), desc


# ----------------------------------------------------------------------------------------- the child


@dataclasses.dataclass(frozen=True)
class IntakeGroup:
    """What one group of a dense replay cuts and encodes: its join, batch size, tasks and feature sets."""

    join: JoinConfig
    batch_size: int
    tasks: tuple[str, ...]
    features: tuple[FeatureSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"join": dataclasses.asdict(self.join), "batch_size": self.batch_size, "tasks": list(self.tasks),
                "features": [spec.to_dict() for spec in self.features]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntakeGroup:
        return cls(JoinConfig(**data["join"]), int(data["batch_size"]), tuple(data["tasks"]),
                   tuple(FeatureSpec.from_dict(spec) for spec in data["features"]))


class _Tally(NoMetrics):
    """The stream-side metrics of a child's pipeline, counted to be handed to the parent's at the end."""

    def __init__(self) -> None:
        self.dead_letters: dict[str, int] = {}
        self.consumed: dict[str, int] = {}
        self.emitted = 0

    def events_consumed(self, topic: str, n: int) -> None:
        self.consumed[topic] = self.consumed.get(topic, 0) + n

    def dead_letter(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1

    def samples_emitted(self, n: int) -> None:
        self.emitted += n


class _Sender:
    """The learner port of a child's pipeline: each batch is encoded with every feature set and sent."""

    steps = 0
    in_flight = 0

    def __init__(self, index: int, group: IntakeGroup, send: Any) -> None:
        self.index, self.group, self.send = index, group, send
        self.coder = UserCodes()  # the parent's per-user metrics read codes, not strings

    def submit(self, samples: list, context: Any) -> None:
        encoded = [columns_to_bytes(encode_samples(samples, spec, self.group.tasks)) for spec in self.group.features]
        ids, users, ts_ms = sample_columns(samples)
        self.send({"op": "batch", "group": self.index, "n": len(samples), "ids": ids, "users": users,
                   "user_codes": self.coder(users).tobytes(), "ts": ts_ms, "encoded": encoded})

    def answers(self, wait: bool = False) -> Iterator[Any]:
        return iter(())

    def check_alive(self) -> None:
        """Always: nothing trains here."""

    def close(self) -> None:
        """Nothing to stop."""


def intake(records: LogRecords, groups: Sequence[IntakeGroup], train_every: int, send: Any) -> None:
    """The child's work: ``run_backtest``'s dense loop over ``records`` for each group, batches sent, not trained."""
    pipelines = []
    for index, group in enumerate(groups):
        pipelines.append(Pipeline(_Sender(index, group, send), AttributionJoin(group.join),
                                  MiniBatcher(group.batch_size, None), tasks=group.tasks, clock=None, metrics=_Tally()))
    n_records = n_events = n_bytes = 0
    examples: list[str] = []
    damaged = DamagedRecords() if records.skip_damaged else None
    records_iter = records.read(damaged)
    while chunk := list(itertools.islice(records_iter, train_every)):
        decoded = [(record.events(), (record.topic, record.partition)) for record in chunk]
        for index, pipeline in enumerate(pipelines):
            bad = pipeline.ingest_each(decoded)
            if bad and index == 0 and len(examples) < DEAD_LETTER_EXAMPLES:  # every group reads the same records
                add_dead_letter_examples(examples, chunk, decoded, n_records)
            if len(chunk) == train_every:
                pipeline.train_ready()
        n_records += len(chunk)
        n_events += sum(len(events) for events, _ in decoded)
        n_bytes += sum(record.size for record in chunk)
        send({"op": "read", "records": n_records, "events": n_events, "bytes": n_bytes})
    for pipeline in pipelines:
        pipeline.flush()
    send({"op": "done", "records": n_records, "events": n_events, "cpu_s": time.process_time(),
          "dead_letter_examples": examples, "damaged": None if damaged is None else damaged.to_dict(), "groups": [
        {"join_state": p.join.state_dict(), "dead_letters": p.metrics.dead_letters, "consumed": p.metrics.consumed,
         "emitted": p.metrics.emitted, "events_ingested": p.events_ingested} for p in pipelines]})


def _child_main(fd_out: int, parent_pid: int) -> int:
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        return 1
    tune_gc()
    out = Connection(fd_out, readable=False)
    packer = msgpack.Packer(use_bin_type=True)

    def send(message: Mapping[str, Any]) -> None:
        out.send_bytes(packer.pack(message))

    try:
        hello = json.loads(sys.stdin.buffer.read())
        records = LogRecords(hello["url"], hello["from_ms"], hello["to_ms"], hello["limit"], hello.get("topics"),
                             bool(hello.get("skip_damaged")))
        intake(records, [IntakeGroup.from_dict(g) for g in hello["groups"]], int(hello["train_every"]), send)
    except BrokenPipeError:
        return 0  # the parent stopped reading (it failed or was interrupted): nothing to report to
    except Exception as exc:
        send({"op": "error", "kind": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()})
        return 1
    return 0


# ---------------------------------------------------------------------------------------- the parent


class IntakeError(RuntimeError):
    """The intake process failed (its traceback is in the message) or died."""


class IntakeProcess:
    """The parent's handle: starts the child on ``records`` and ``groups``; ``messages()`` yields what it sends
    (``batch`` messages with their arrays already turned into ``numpy`` columns per feature set)."""

    def __init__(self, records: LogRecords, groups: Sequence[IntakeGroup], train_every: int,
                 spool: _Spool | None = None) -> None:
        self.groups = list(groups)
        self.waited_s = 0.0
        self.spool = spool  # where every message also goes (a replay cache's file), kept once ``done`` came; its
        # creator discards it if the replay ends otherwise
        read_fd, write_fd = os.pipe()
        grow_pipe(write_fd)  # 1 MiB: a few batches ahead
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        hello = {"url": records.url, "from_ms": records.from_ms, "to_ms": records.to_ms, "limit": records.limit,
                 "topics": records.topics, "skip_damaged": records.skip_damaged, "train_every": train_every,
                 "groups": [g.to_dict() for g in self.groups]}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumers.tools.intake", str(write_fd), str(os.getpid())],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
        os.close(write_fd)
        self._in = Connection(read_fd, writable=False)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(hello).encode())
        self.process.stdin.close()

    def messages(self) -> Iterator[dict[str, Any]]:
        """Every message up to ``done`` (raises ``EventLogError``, ``ValueError`` or ``IntakeError`` on a failure).
        ``waited_s`` adds up the seconds spent waiting for them (the child was behind: the input was the bound)."""
        while True:
            started = time.perf_counter()
            try:
                raw = self._in.recv_bytes()
            except (EOFError, OSError):
                raise IntakeError(f"the intake process died ({describe_exit(self.process, 5.0)})") from None
            self.waited_s += time.perf_counter() - started
            message = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            op = message["op"]
            if op == "error":
                kind, text = message["kind"], message["message"]
                if kind == "EventLogError":
                    raise EventLogError(text)
                if kind == "ValueError":
                    raise ValueError(text)
                raise IntakeError(f"the intake process failed:\n{message['traceback']}")
            if self.spool is not None:
                self.spool.write(raw, keep=op == "done")
            yield _with_columns(message, self.groups)
            if op == "done":
                return

    def close(self) -> None:
        """Stop the child (at once: it only reads) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._in.close()

    def __enter__(self) -> IntakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_columns(message: dict[str, Any], groups: Sequence[IntakeGroup]) -> dict[str, Any]:
    """A ``batch`` message's arrays as ``numpy`` columns, one dict per feature set of its group, and its users'
    codes as int32 (in place)."""
    if message["op"] == "batch":
        group = groups[message["group"]]
        n = message["n"]
        message["user_codes"] = np.frombuffer(message["user_codes"], dtype=np.int32)
        if len(message["user_codes"]) != n:
            raise IntakeError(f"a batch of {n} samples came with {len(message['user_codes'])} user codes")
        message["columns"] = [
            columns_from_bytes(encoded, [(n, len(spec.categorical)), (n, len(spec.numeric)), (n, len(group.tasks)),
                                         (n,)])  # COLUMN_DTYPES' order
            for spec, encoded in zip(group.features, message.pop("encoded"))]
    return message


# ------------------------------------------------------------------------------------------ the replay cache

CACHE_FORMAT = 2
# The code that decides what an intake sends (the log's reader, validation, the join, batching, encoding): a change
# to any of these files makes every cached replay stale.
_INTAKE_CODE = (*sorted((REPO_ROOT / "streamer").glob("*.py")),
                *sorted((REPO_ROOT / "consumers" / "core").glob("*.py")),
                REPO_ROOT / "models" / "features.py", REPO_ROOT / "consumers" / "tools" / "intake.py")
_ENDS = 1 << 20  # bytes hashed at each end of a log, with its size, time and inode, to tell it from another


def _digest(*chunks: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def replay_key(records: LogRecords, groups: Sequence[IntakeGroup], train_every: int) -> dict[str, Any]:
    """What an intake's messages depend on: the code, the log (path, size, modification time, inode and the digest of
    its first and last MiB), the range and limit, and each group's join, batch size, tasks and feature sets."""
    path = path_from_url(records.url).resolve()
    stat = path.stat()
    with open(path, "rb") as f:
        head = f.read(_ENDS)
        f.seek(max(0, stat.st_size - _ENDS))
        tail = f.read(_ENDS)
    key = {"format": CACHE_FORMAT, "code": _digest(*(p.read_bytes() for p in _INTAKE_CODE)),
            "log": {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
                    "ends": _digest(head, tail)},
            "from_ms": records.from_ms, "to_ms": records.to_ms, "limit": records.limit, "topics": records.topics,
            "skip_damaged": records.skip_damaged, "train_every": train_every,
            "groups": [g.to_dict() for g in groups]}
    return json.loads(json.dumps(key))  # plain lists and maps, as the key reads back from a cache file


class _Spool:
    """A replay cache file being written: a temporary file next to it, renamed into place once the intake is done (a
    replay that fails or is interrupted leaves no cache file). A file system error (a full disk, a folder that cannot
    be written) stops the writing, not the replay: ``error`` says what happened."""

    def __init__(self, path: Path, key: Mapping[str, Any]) -> None:
        self.path = path
        self.tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self.file: BinaryIO | None = None
        self.kept = False
        self.error: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by write(keep=True) or discard()
            self.file.write(msgpack.packb({"op": "cache", "key": key}, use_bin_type=True))
        except OSError as exc:
            self._fail(exc)

    def write(self, frame: bytes, keep: bool = False) -> None:
        """Append one frame; ``keep``: the last one, so the entry takes its name."""
        if self.file is None:
            return
        try:
            self.file.write(frame)
            if keep:
                self.file.close()
                self.file = None
                os.replace(self.tmp, self.path)
                self.kept = True
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = f"not written: {exc}"
        self.discard()

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if not self.kept:
            with contextlib.suppress(OSError):  # e.g. its folder could not be made
                self.tmp.unlink(missing_ok=True)


DEFAULT_CACHE_LIMIT = 20 << 30  # bytes a replay cache folder keeps (--replay-cache-limit): 20 GiB
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_ABANDONED_S = 3600.0  # a temporary entry not written to for this long was left by a replay that was killed


def parse_size(text: str | int) -> int:
    """A size in bytes from ``4096``, ``500M``, ``1.5G``, ``20GiB`` or ``2 TB`` (units of 1024 bytes, any case).

    >>> parse_size("20G"), parse_size("1.5k"), parse_size(" 300 MiB "), parse_size(7)
    (21474836480, 1536, 314572800, 7)
    """
    raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = float(raw[:len(raw) - len(unit)].strip())
    except ValueError:
        raise ValueError(f"size {text!r} is not a number of bytes with an optional unit K, M, G or T "
                         "(e.g. 500M, 20G)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"size {text!r} must be a finite number of bytes, at least 0")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes as a short text.

    >>> format_size(80_000_000), format_size(3 << 30), format_size(512)
    ('76.3 MiB', '3 GiB', '512 B')
    """
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


class ReplayCache:
    """One replay's entry in a cache folder (``crossdistil backtest --replay-cache DIR``): the intake's messages as it
    sent them (msgpack frames, nothing pickled), in a file named by the digest of :func:`replay_key`.

    A later replay of the same log, range, groups and code reads them (:meth:`reader`) instead of starting an intake
    process: no reading, validating, joining or encoding, and the same batches, so the same numbers bit for bit.
    The folder keeps at most ``limit`` bytes of entries (:meth:`evict`, least recently used first: a hit makes its
    entry the most recent).
    """

    def __init__(self, folder: str | os.PathLike, records: LogRecords, groups: Sequence[IntakeGroup],
                 train_every: int, limit: int = DEFAULT_CACHE_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"a replay cache's limit must be at least 0 bytes, got {limit}")
        self.groups = list(groups)
        self.limit = limit
        self.key = replay_key(records, groups, train_every)
        self.path = Path(folder) / f"{_digest(json.dumps(self.key, sort_keys=True).encode())}.intake"

    @property
    def hit(self) -> bool:
        return self.path.is_file()

    def touch(self) -> None:
        """Mark this entry used now (the eviction order is the entries' modification times)."""
        with contextlib.suppress(OSError):  # e.g. a read-only cache: it is still read, only its order is not kept
            os.utime(self.path)

    def evict(self) -> dict[str, Any]:
        """Keep the folder's entries within ``limit`` bytes: remove the least recently used other entries (and
        temporary files that replays killed before they ended left behind) until they fit with this entry; this entry
        if it is larger than the limit by itself (then only what does not fit without it goes). ``{"files": n,
        "bytes": b, "this": removed}``: the files other than this entry removed, their bytes, and whether this entry
        was. Files not named like entries are never touched; one that cannot be removed is skipped."""
        removed: dict[str, Any] = {"files": 0, "bytes": 0, "this": False}
        now = time.time()
        sized: list[tuple[float, int, Path]] = []
        for path in self.path.parent.iterdir():
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile by another replay
                continue
            if path.suffix == ".tmp" and ".intake." in path.name:
                if now - stat.st_mtime > _ABANDONED_S and _remove(path):
                    removed["files"] += 1
                    removed["bytes"] += stat.st_size
            elif path.suffix == ".intake" and path.is_file():
                sized.append((stat.st_mtime, stat.st_size, path))
        mine = next((size for _, size, path in sized if path == self.path), 0)
        if mine > self.limit and _remove(self.path):  # too large by itself: the others need not go
            removed["this"] = True
        others = sorted((entry for entry in sized if entry[2] != self.path), key=lambda e: (e[0], e[2].name))
        total = sum(size for _, size, _ in others) + (0 if removed["this"] else mine)
        for _, size, path in others:  # the least recently used first
            if total <= self.limit:
                break
            if _remove(path):
                total -= size
                removed["files"] += 1
                removed["bytes"] += size
        return removed

    def spool(self) -> _Spool:
        """A writer for this entry (give it to ``IntakeProcess``)."""
        return _Spool(self.path, self.key)

    def reader(self) -> CachedIntake:
        return CachedIntake(self.path, self.groups, self.key)


def _remove(path: Path) -> bool:
    """Remove a file; whether it is gone (False: it could not be removed, e.g. a read-only folder)."""
    try:
        path.unlink(missing_ok=True)  # missing: another replay removed it first
    except OSError:
        return False
    return True


class CachedIntake:
    """An ``IntakeProcess`` stand-in that reads a replay cache file: the same ``messages()``."""

    def __init__(self, path: Path, groups: Sequence[IntakeGroup], key: Mapping[str, Any]) -> None:
        self.path, self.groups, self.key = path, list(groups), dict(key)
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()

    def messages(self) -> Iterator[dict[str, Any]]:
        """Every message up to ``done``; an ``IntakeError`` naming the file if it is not a whole entry for this
        replay (delete it to replay the log again)."""
        unpacker = msgpack.Unpacker(self.file, raw=False, strict_map_key=False)
        try:
            header = next(unpacker, None)
            if not isinstance(header, dict) or header.get("op") != "cache" or header.get("key") != self.key:
                raise IntakeError(f"replay cache file {self.path} is not this replay's; delete it")
            for message in unpacker:
                yield _with_columns(message, self.groups)
                if message["op"] == "done":
                    return
        except (msgpack.UnpackException, ValueError, KeyError, TypeError) as exc:
            raise IntakeError(f"replay cache file {self.path} is damaged ({exc}); delete it") from None
        raise IntakeError(f"replay cache file {self.path} ends before its last batch; delete it")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CachedIntake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))
