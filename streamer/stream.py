"""``crossdistil stream``: a data set (or an event log) as impression and feedback events, into Kafka or a file.

    crossdistil stream --dataset kuairand --source ../shared/data/kuairand --to kafka://127.0.0.1:9092
    crossdistil stream --dataset synthetic --option n_events=1000000 --option drift=abrupt \\
        --option drift_at=500000 --to file://synthetic.evlog --speed max
    crossdistil stream --dataset log --source file://synthetic.evlog --to kafka://127.0.0.1:9092 --speed 60

The pure core is ``merge_events``: every interaction becomes one impression at ``ts_ms`` and, for each positive
task, one feedback event at ``ts_ms + feedback_delay_ms[task]``; pending feedback waits in a heap, so the merged
stream is in non-decreasing event time and memory is bounded by the feedback that falls within the longest
delay, not by the data size. Events are keyed by user id; a feedback event carries its impression's user id as
its key. ``--limit N`` stops after N impressions (their feedback is still emitted); for ``--dataset log`` it
counts events. ``stream_dataset(...)`` does the whole run and returns the summary as a dict.

``--impressions-topic`` / ``--feedback-topic`` mean the same for every data set: an event log's impression topic
and feedback topic, whatever their names, are mapped onto them (``log_topic_kinds``, ``log_topic_map``: one read
through the log before the stream starts); a log with two topics of one kind, or a topic of both kinds, is refused
before anything is streamed.

A bad event stops the stream with an error that says where it came from: the source file and data row of a data
set (the adapter's own count, 0-based), or the event log and its record index. ``--to file://PATH`` writes PATH
only when the stream completes (``streamer.sinks.FileSink``): a failed or stopped stream leaves PATH as it was.
Pacing (``--speed`` other than max) checks each event before it waits for its time, and refuses an event more than
``MAX_PACED_GAP_MS`` after the latest one before it: such a gap is a wrong time far more often than a real pause,
and pacing would sleep through it (for years, for a time in the far future).
"""

from __future__ import annotations

import argparse
import heapq
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from streamer.datasets import open_dataset
from streamer.datasets.base import DatasetError, Interaction
from streamer.eventlog import DamagedRecords, EventLogError, path_from_url, read_event_log
from streamer.events import FEEDBACK_TOPIC, IMPRESSION_TOPIC, EventError, event_kind, validate
from streamer.kafka_settings import COMPRESSIONS, SecurityError, add_client_arguments, client_options_from_args

PROGRESS_EVERY = 1000  # events between progress-bar refreshes (a refresh per event costs more than the event)
# Pacing refuses an event this far (event time) after the latest before it: longer than a data set's weekends and
# outages, far shorter than a wrong unit or a far-future time (which pacing would wait out, for years).
MAX_PACED_GAP_MS = 7 * 86_400_000


class RoutedEvent(NamedTuple):
    """One event of the merged stream, with the topic and key it travels with."""

    topic: str
    key: str
    event: dict[str, Any]


class StreamError(RuntimeError):
    """The stream cannot run as asked; the message says what to change."""


class Terminated(BaseException):
    """SIGTERM arrived while streaming to a file (a ``BaseException``, like ``KeyboardInterrupt``: nothing catches
    it by mistake on its way out)."""


def impression_event(record: Interaction) -> dict[str, Any]:
    """The contract impression of one interaction."""
    return {"v": 1, "impression_id": record.impression_id, "ts_ms": record.ts_ms, "user_id": record.user_id,
            "item_id": record.item_id, "features": dict(record.features)}


def feedback_event(record: Interaction, task: str) -> dict[str, Any]:
    """The contract feedback event of one positive task of an interaction, at its delayed event time."""
    return {"v": 1, "impression_id": record.impression_id, "ts_ms": record.ts_ms + record.feedback_delay_ms[task],
            "task": task, "value": 1}


def merge_events(interactions: Iterable[Interaction], *, impression_topic: str = IMPRESSION_TOPIC,
                 feedback_topic: str = FEEDBACK_TOPIC, limit: int | None = None) -> Iterator[RoutedEvent]:
    """Impressions and their delayed feedback, merged into one stream in non-decreasing event time.

    Feedback due at or before an impression's time is emitted before it; feedback of one impression comes in
    task order when due at the same time. Raises ``StreamError`` if the interactions go back in time.

    >>> a = Interaction("i1", "u1", "x", 1000, labels={"click": 1}, feedback_delay_ms={"click": 500})
    >>> b = Interaction("i2", "u2", "y", 1200, labels={"click": 1}, feedback_delay_ms={"click": 0})
    >>> [(e.topic, e.key, e.event["ts_ms"]) for e in merge_events([a, b])]
    [('impressions', 'u1', 1000), ('impressions', 'u2', 1200), ('feedback', 'u2', 1200), ('feedback', 'u1', 1500)]
    """
    pending: list[tuple[int, int, str, dict[str, Any]]] = []  # (due ts_ms, sequence, key, event): a min-heap
    sequence = 0
    last_ts: int | None = None
    for count, record in enumerate(interactions):
        if limit is not None and count >= limit:
            break
        if last_ts is not None and record.ts_ms < last_ts:
            raise StreamError(f"interaction {record.impression_id} at {record.ts_ms} ms comes after one at "
                              f"{last_ts} ms: the data set is not in time order")
        last_ts = record.ts_ms
        while pending and pending[0][0] <= record.ts_ms:
            _, _, key, event = heapq.heappop(pending)
            yield RoutedEvent(feedback_topic, key, event)
        yield RoutedEvent(impression_topic, record.user_id, impression_event(record))
        for task, label in record.labels.items():
            if label and task in record.feedback_delay_ms:
                event = feedback_event(record, task)
                heapq.heappush(pending, (event["ts_ms"], sequence, record.user_id, event))
                sequence += 1
    while pending:
        _, _, key, event = heapq.heappop(pending)
        yield RoutedEvent(feedback_topic, key, event)


class LogReplay:
    """The records of an event log as routed events (a batch envelope in a record is unwrapped, keeping its key).

    ``where(routed)`` names the record the latest event came from (``event log PATH: record 12``), for errors.
    ``topics`` renames the log's topics (``log_topic_map``); a topic it does not name keeps its name.
    ``skip_damaged``: the log's damaged records are skipped (``streamer.eventlog.read_event_log_entries``) and
    counted in ``damaged`` (a ``DamagedRecords``, new at each iteration) instead of stopping the stream.
    """

    def __init__(self, path: str, limit: int | None = None, skip_damaged: bool = False,
                 topics: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.limit = limit
        self.skip_damaged = skip_damaged
        self.topics = dict(topics or {})  # a log topic -> the topic its events go to (absent: the log's own)
        self.damaged: DamagedRecords | None = None
        self._record = 0
        self._in_envelope: int | None = None  # the event's place in its record's batch envelope, if it had one

    def __iter__(self) -> Iterator[RoutedEvent]:
        count = 0
        self.damaged = damaged = DamagedRecords() if self.skip_damaged else None
        topics = self.topics
        for index, record in enumerate(read_event_log(self.path, damaged)):
            if damaged is not None:
                index += damaged.records  # the record's index in the file: the skipped ones came before it
            batch = record.event.get("batch")
            inner = batch if isinstance(batch, list) else [record.event]
            topic = topics.get(record.topic, record.topic)
            for place, event in enumerate(inner):
                if self.limit is not None and count >= self.limit:
                    return
                self._record, self._in_envelope = index, place if inner is batch else None
                yield RoutedEvent(topic, record.key, event)
                count += 1

    def where(self, routed: RoutedEvent) -> str:
        """Where the latest event came from (``routed`` is that event; the record index says more)."""
        place = f" batch[{self._in_envelope}]" if self._in_envelope is not None else ""
        return f"event log {self.path}: record {self._record}{place}"


def replay_log(path: str, limit: int | None = None, skip_damaged: bool = False,
               topics: Mapping[str, str] | None = None) -> LogReplay:
    """The records of an event log as routed events; see ``LogReplay``."""
    return LogReplay(path, limit, skip_damaged, topics)


KIND_NAMES = {"impression": "impressions", "feedback": "feedback events"}


def log_topic_kinds(replay: LogReplay) -> dict[str, str]:
    """The kind of event (``"impression"`` or ``"feedback"``) each topic of a log holds, read once through ``replay``
    (its limit and damaged records as the stream will see them). An event of neither kind is left to the stream's
    check, which names it; a topic holding both kinds is a ``StreamError`` naming the first record that mixes them."""
    kinds: dict[str, str] = {}
    for routed in replay:
        try:
            kind = event_kind(routed.event)
        except EventError:
            continue
        if kind == "batch":  # an envelope inside an envelope: the stream's check refuses it
            continue
        seen = kinds.setdefault(routed.topic, kind)
        if seen != kind:
            raise StreamError(f"{replay.where(routed)}: topic {routed.topic!r} holds {KIND_NAMES[seen]} and "
                              f"{KIND_NAMES[kind]}: a log's topics are replayed onto --impressions-topic and "
                              "--feedback-topic by the kind of event each holds, so each must hold one kind (split "
                              "the log's events by kind into two topics)")
    return kinds


def log_topic_map(kinds: Mapping[str, str], path: str, impression_topic: str,
                  feedback_topic: str) -> dict[str, str]:
    """Each topic of a log -> the topic its events go to: the log's impression topic onto ``impression_topic``, its
    feedback topic onto ``feedback_topic`` (``kinds`` from ``log_topic_kinds``). A log with two topics of one kind
    (so more than two topics, or another pairing) cannot be mapped so: ``StreamError``.

    >>> log_topic_map({"imp": "impression", "fb": "feedback"}, "a.evlog", "impressions", "feedback")
    {'imp': 'impressions', 'fb': 'feedback'}
    """
    by_kind: dict[str, list[str]] = {}
    for topic, kind in kinds.items():
        by_kind.setdefault(kind, []).append(topic)
    for kind, topics in by_kind.items():
        if len(topics) > 1:
            raise StreamError(f"event log {path} holds {KIND_NAMES[kind]} in {len(topics)} topics "
                              f"({', '.join(map(repr, topics))}): a log's impression topic is replayed onto "
                              "--impressions-topic and its feedback topic onto --feedback-topic, so a log may name "
                              "one topic of each (split it into logs of one impression and one feedback topic)")
    target = {"impression": impression_topic, "feedback": feedback_topic}
    return {topic: target[kind] for topic, kind in kinds.items()}


def dataset_origin(data: Any, name: str) -> Callable[[RoutedEvent], str]:
    """A function naming where one of a data set's events came from, for errors: ``SOURCE data row N`` when the
    impression id is the adapter's default ``<prefix>-<data row>`` (the csv adapter's, kuairand's, icme2019's),
    else ``SOURCE: impression ID``."""
    source = getattr(data, "source", None) or f"data set {name}"
    mapping = getattr(data, "mapping", None)  # a csv-adapter mapping; its ids carry the row unless a column gives them
    prefix = None
    if mapping is not None and mapping.impression_id is None:
        prefix = f"{mapping.impression_id_prefix or mapping.name}-"

    def where(routed: RoutedEvent) -> str:
        impression_id = routed.event.get("impression_id")
        if prefix is not None and isinstance(impression_id, str) and impression_id.startswith(prefix):
            row = impression_id[len(prefix):]
            if row.isascii() and row.isdigit():
                return f"{source} data row {row}"
        return f"{source}: impression {impression_id!r}"

    return where


def parse_speed(text: str) -> float | None:
    """``max`` -> None (no pacing); ``realtime`` -> 1.0; a positive number -> that speed-up factor."""
    if text == "max":
        return None
    if text == "realtime":
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        raise StreamError(f"--speed {text!r} must be max, realtime or a positive number (a speed-up factor)") from None
    if not factor > 0:
        raise StreamError(f"--speed {text!r} must be a positive factor")
    return factor


class Pacer:
    """Sleeps so that event time advances ``factor`` times faster than wall time (None: never sleeps).

    An event more than ``max_gap_ms`` after the latest event time so far raises ``StreamError`` instead of a sleep.
    """

    def __init__(self, factor: float | None, clock=time.monotonic, sleep=time.sleep,
                 max_gap_ms: int = MAX_PACED_GAP_MS) -> None:
        self.factor = factor
        self.max_gap_ms = max_gap_ms
        self._clock, self._sleep = clock, sleep
        self._origin: tuple[float, int] | None = None
        self._latest_ts = 0

    def wait_for(self, ts_ms: int, on_wait=None) -> None:
        """Return when the wall clock has reached the event's time; ``on_wait()`` runs before sleeping."""
        if self.factor is None:
            return
        if self._origin is None:
            self._origin = (self._clock(), ts_ms)
            self._latest_ts = ts_ms
            return
        if ts_ms - self._latest_ts > self.max_gap_ms:
            gap_s = (ts_ms - self._latest_ts) / 1000.0
            speed = f"{self.factor:.0f}" if float(self.factor).is_integer() else f"{self.factor:g}"
            raise StreamError(
                f"ts_ms {ts_ms} is {_duration(gap_s)} after the latest event before it ({self._latest_ts}); at "
                f"--speed {speed} that is a wait of {_duration(gap_s / self.factor)}, and pacing refuses a gap over "
                f"{self.max_gap_ms / 86_400_000:g} days as a wrong time (check the event's ts_ms; --speed max "
                "streams it unpaced)")
        self._latest_ts = max(self._latest_ts, ts_ms)
        wall0, ts0 = self._origin
        delay = wall0 + (ts_ms - ts0) / 1000.0 / self.factor - self._clock()
        if delay > 0:
            if on_wait is not None:
                on_wait()
            self._sleep(delay)


def _duration(seconds: float) -> str:
    """``90061.0`` -> ``'1.0 days'``: a wait or a gap in the unit a reader takes in at once."""
    for unit, size in (("years", 365.25 * 86_400), ("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


@dataclass
class Tally:
    """Counts for the summary: events per topic, feedback per task, impressions."""

    impression_topic: str
    feedback_topic: str

    def __post_init__(self) -> None:
        self.per_topic: Counter[str] = Counter()
        self.per_task: Counter[str] = Counter()

    def add(self, routed: RoutedEvent) -> None:
        """Count one event."""
        self.per_topic[routed.topic] += 1
        if routed.topic == self.feedback_topic and "task" in routed.event:
            self.per_task[routed.event["task"]] += 1


def summarize(tally: Tally, tasks: Iterable[str], bytes_written: int, messages: int, seconds: float,
              dataset: str, to: str) -> dict[str, Any]:
    """The end-of-run summary as a plain dict (the CLI prints it as a table; tests and the demo read it)."""
    impressions = tally.per_topic.get(tally.impression_topic, 0)
    task_names = list(dict.fromkeys([*tasks, *sorted(tally.per_task)]))
    total = sum(tally.per_topic.values())
    return {
        "dataset": dataset,
        "to": to,
        "events": total,
        "impressions": impressions,
        "events_per_topic": dict(tally.per_topic),
        "feedback_per_task": {t: tally.per_task.get(t, 0) for t in task_names},
        "positive_rate": {t: (tally.per_task.get(t, 0) / impressions if impressions else 0.0) for t in task_names},
        "messages": messages,
        "bytes": bytes_written,
        "seconds": seconds,
        "events_per_s": total / seconds if seconds > 0 else 0.0,
    }


def _progress(enabled: bool, total: int | None):
    """A rich progress bar on stderr, or None."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("streaming impressions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    progress.start()
    return progress, progress.add_task("stream", total=total)


def stream_events(routed: Iterable[RoutedEvent], sink: Any, *, speed: float | None = None,
                  tasks: Iterable[str] = (), impression_topic: str = IMPRESSION_TOPIC,
                  feedback_topic: str = FEEDBACK_TOPIC, progress: bool = False, total_impressions: int | None = None,
                  dataset: str = "", to: str = "", origin: Callable[[RoutedEvent], str] | None = None
                  ) -> dict[str, Any]:
    """Write routed events to ``sink`` at ``speed`` and close it; return the summary dict.

    A bad event raises ``StreamError`` prefixed with ``origin(event)`` (where it came from), and anything that
    stops the stream, an interrupt included, ``abort()``s the sink (a file sink then leaves no partial log).
    """
    tally = Tally(impression_topic, feedback_topic)
    pacer = Pacer(speed)
    where = origin or _by_impression
    bar, bar_task = _progress(progress, total_impressions)
    started = time.perf_counter()
    try:
        for n, item in enumerate(routed):
            if pacer.factor is not None:
                _pace(pacer, item, sink, where)
            try:
                sink.write(item.topic, item.key, item.event)
            except EventError as exc:
                if not sink.checks_each_event:
                    raise  # it names batch[i] of an envelope being sent, not this event
                raise StreamError(f"{where(item)}: {exc}") from exc
            tally.add(item)
            if bar is not None and n % PROGRESS_EVERY == 0:
                bar.update(bar_task, completed=tally.per_topic.get(impression_topic, 0))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - started
    summary = summarize(tally, tasks, sink.bytes_written, sink.messages, seconds, dataset, to)
    if getattr(sink, "split_envelopes", 0):  # envelopes over their topic's max.message.bytes, sent as halves
        summary["split_envelopes"] = sink.split_envelopes
    return summary


def _by_impression(routed: RoutedEvent) -> str:
    """Where an event came from, when its source says nothing: its impression id."""
    return f"impression {routed.event.get('impression_id')!r}"


def _pace(pacer: Pacer, item: RoutedEvent, sink: Any, where: Callable[[RoutedEvent], str]) -> None:
    """Wait for the event's time. The event is checked first: pacing reads its ts_ms, and a bad one must get the
    contract's error (as at --speed max), not a TypeError."""
    try:
        ts_ms = validate(item.event)["ts_ms"]
    except EventError as exc:
        raise StreamError(f"{where(item)}: {exc}") from exc
    try:
        pacer.wait_for(ts_ms, on_wait=sink.idle)
    except StreamError as exc:  # the gap refused (sink.idle raises EventError or SinkError only)
        raise StreamError(f"{where(item)}: {exc}") from exc


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without '=' is an error."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StreamError(f"--option {pair!r} must look like key=value")
        options[key.strip()] = value.strip()
    return options


def stream_dataset(dataset: str, source: str | None, to: str, *, mapping: str | None = None,
                   options: dict[str, Any] | None = None, speed: str | float | None = "max", limit: int | None = None,
                   envelope: int = 1, impression_topic: str = IMPRESSION_TOPIC, feedback_topic: str = FEEDBACK_TOPIC,
                   progress: bool = False, producer_config: dict[str, Any] | None = None,
                   skip_damaged: bool = False) -> dict[str, Any]:
    """Stream a data set (``dataset="log"``: an event log at ``source``) to ``to``; return the summary.

    ``skip_damaged`` (an event log only): its damaged records are skipped instead of stopping the stream, and the
    summary's ``skipped_records`` (``DamagedRecords.to_dict``) counts them. Raises ``StreamError`` (or
    ``DatasetError`` / ``SinkError``, both with user-facing messages, or ``EventLogError``) on bad input.
    """
    from streamer.sinks import open_sink  # lazy: the Kafka client loads only when events are written

    factor = parse_speed(speed) if isinstance(speed, str) else speed
    if envelope < 1:
        raise StreamError(f"--envelope {envelope} must be >= 1")
    if skip_damaged and dataset != "log":
        raise StreamError("--skip-damaged applies to --dataset log (an event log's damaged records)")
    replay = None
    if dataset == "log":
        if not source:
            raise StreamError("--dataset log needs --source file://PATH (an event log)")
        path = str(path_from_url(source))
        # The log's own topics map onto the flags' (one read through the log first): the flags mean the same for
        # every data set, and a log that cannot be mapped is refused before anything is streamed.
        kinds = log_topic_kinds(replay_log(path, limit=limit, skip_damaged=skip_damaged))
        topics = log_topic_map(kinds, path, impression_topic, feedback_topic)
        replay = replay_log(path, limit=limit, skip_damaged=skip_damaged, topics=topics)
        routed: Iterable[RoutedEvent] = replay
        origin = replay.where
        tasks: tuple[str, ...] = ()
        total = None
    else:
        data = open_dataset(dataset, source, mapping, **(options or {}))
        routed = merge_events(data.interactions(), impression_topic=impression_topic, feedback_topic=feedback_topic,
                              limit=limit)
        origin = dataset_origin(data, dataset)
        tasks = tuple(data.tasks)
        bounds = [x for x in (getattr(data, "n_interactions", None), limit) if x is not None]
        total = min(bounds) if bounds else None
    sink = open_sink(to, (impression_topic, feedback_topic), envelope=envelope, producer_config=producer_config)
    summary = stream_events(routed, sink, speed=factor, tasks=tasks, impression_topic=impression_topic,
                            feedback_topic=feedback_topic, progress=progress, total_impressions=total,
                            dataset=dataset, to=to, origin=origin)
    if replay is not None and replay.damaged is not None:
        summary["skipped_records"] = replay.damaged.to_dict()
    return summary


def print_summary(summary: dict[str, Any], file=None) -> None:
    """Print the summary as rich tables (on ``file``, default stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    table = Table(title=f"streamed {summary['dataset']} -> {summary['to']}")
    table.add_column("topic")
    table.add_column("events", justify="right")
    for topic, count in summary["events_per_topic"].items():
        table.add_row(topic, f"{count:,}")
    console.print(table)
    tasks = Table(title="feedback per task")
    for name in ("task", "positives", "rate"):
        tasks.add_column(name, justify="left" if name == "task" else "right")
    for task, count in summary["feedback_per_task"].items():
        tasks.add_row(task, f"{count:,}", f"{summary['positive_rate'][task]:.1%}")
    console.print(tasks)
    console.print(f"{summary['events']:,} events in {summary['messages']:,} messages, {summary['bytes']:,} bytes, "
                  f"{summary['seconds']:.2f} s, {summary['events_per_s']:,.0f} events/s")
    if summary.get("split_envelopes"):
        console.print(f"{summary['split_envelopes']:,} envelopes were over their topic's max.message.bytes and went "
                      "as halves (a smaller --envelope saves encoding them twice)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crossdistil stream`` flags."""
    parser.add_argument("--dataset", required=True, help="kuairand, icme2019, csv, synthetic, or log (an event log)")
    parser.add_argument("--source", help="the data file or folder; for --dataset log: file://PATH")
    parser.add_argument("--mapping", help="TOML column mapping for --dataset csv (see mappings/*.toml)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="data set option, repeatable (synthetic: n_events, tasks, correlation, drift, seed, ...)")
    parser.add_argument("--to", required=True,
                        help="kafka://HOST:PORT or file://PATH (an event log, written to PATH.<pid>.partial and "
                             "renamed to PATH when the stream completes: a failed or stopped stream leaves PATH as "
                             "it was)")
    parser.add_argument("--speed", default="max",
                        help="max (default), realtime, or a speed-up factor such as 60; pacing refuses an event more "
                             f"than {MAX_PACED_GAP_MS // 86_400_000} days after the latest before it (a wrong time it "
                             "would wait out)")
    parser.add_argument("--limit", type=int, help="stop after N impressions (for --dataset log: N events)")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="--dataset log: skip the log's damaged records (not {topic, key, event}, a string that "
                             "is not UTF-8, a last record cut short) instead of stopping at the first, and say how "
                             "many on stderr; bytes that are not msgpack still stop the stream")
    parser.add_argument("--envelope", type=int, default=1,
                        help="Kafka only: N events per {v:1, batch:[...]} message (default 1: single events)")
    parser.add_argument("--impressions-topic", default=IMPRESSION_TOPIC,
                        help="where impressions go (--dataset log: those of the log's impression topic, whatever "
                             "its name); default: %(default)s")
    parser.add_argument("--feedback-topic", default=FEEDBACK_TOPIC,
                        help="where feedback goes (--dataset log: that of the log's feedback topic, whatever its "
                             "name); default: %(default)s")
    parser.add_argument("--compression", default="none", choices=COMPRESSIONS,
                        help="Kafka only: compression of the produced record batches (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    add_client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``crossdistil stream``; user errors print one line on stderr and exit with status 2."""
    from streamer.sinks import SinkError  # lazy: the Kafka client loads only when the command runs

    to_file = args.to.startswith("file://")
    try:
        producer_config = client_options_from_args(args)
        if args.compression != "none":
            producer_config["compression_type"] = args.compression
        with _sigterm_raises(enabled=to_file):
            summary = stream_dataset(
                args.dataset, args.source, args.to, mapping=args.mapping, options=parse_options(args.option),
                speed=args.speed, limit=args.limit, envelope=args.envelope, impression_topic=args.impressions_topic,
                feedback_topic=args.feedback_topic, progress=not args.quiet and sys.stderr.isatty(),
                producer_config=producer_config, skip_damaged=args.skip_damaged,
            )
    except (StreamError, DatasetError, SinkError, EventLogError, EventError, SecurityError) as exc:
        print(f"crossdistil stream: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        if to_file:
            print(f"crossdistil stream: stopped; {path_from_url(args.to)} is left as it was (the log is written "
                  "there only when the stream completes)", file=sys.stderr)
        if isinstance(exc, Terminated):
            return _end_by_sigterm()
        raise
    if not args.quiet:
        print_summary(summary)
    skipped = summary.get("skipped_records")
    if skipped and skipped["records"]:  # even with --quiet: the stream has less than the log
        print(f"crossdistil stream: warning: {args.source}: {DamagedRecords.from_dict(skipped).describe()} "
              "(--skip-damaged): those records were not streamed", file=sys.stderr)
    return 0


@contextmanager
def _sigterm_raises(enabled: bool) -> Iterator[None]:
    """While streaming to a file, SIGTERM raises ``Terminated``: its default disposition ends the process at once,
    which would leave the partial file behind. Only the main thread can set a handler; elsewhere nothing changes."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_by_sigterm() -> int:
    """End the process by SIGTERM's default disposition, as if no handler had run (a parent sees the signal)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    return 128 + signal.SIGTERM  # not reached: a signal a process sends itself is delivered before kill returns
