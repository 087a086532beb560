"""The serving daemon's Kafka half: follow the serving topic, verify and load each checkpoint, swap it in.

On start :meth:`CheckpointFollower.find_latest` finds the latest complete checkpoint from the end of the
serving topic (docs/wire-format.md, "fast path": the last message is a manifest whose ``span`` says how far
back its chunks start), falling back to reading from the beginning; then :meth:`CheckpointFollower.run`
follows the topic. Every checkpoint goes through :class:`consumers.state.wire.Reassembler` (chunk and payload
sha256, format version), then ``safetensors`` and ``ServingModel.from_serving_state``: nothing is unpickled.
A rejected or unloadable checkpoint is logged and counted in ``crossdistil_serving_reload_failures_total{reason}``
and recorded in the holder (:meth:`ModelHolder.rejected`: the last one and the count since the last good load, which
``/healthz`` shows); the previous model keeps serving. :class:`ModelHolder` is the one reference both halves share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from kafka import TopicPartition

from consumers.runtime.telemetry import ServingMetrics
from consumers.runtime.topic_range import read_range
from consumers.state.tensors import non_finite_tensors
from consumers.state.wire import (
    MANIFEST_KEY,
    SERVING_TOPIC_MAX_MESSAGE_BYTES,
    Reassembler,
    Rejection,
    WireCheckpoint,
)
from models.learner import ServingModel
from models.river_baseline import SERVING_FORMAT as RIVER_FORMAT
from models.river_baseline import RiverServingModel

log = logging.getLogger("crossdistil.serving")

MAX_MESSAGE_BYTES = SERVING_TOPIC_MAX_MESSAGE_BYTES  # no valid message of the serving topic is larger


# ------------------------------------------------------------------------------------------ the model slot


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and what a response says about it."""

    version: int
    model: ServingModel
    tasks: tuple[str, ...]
    step: int | None
    published_at_s: float | None
    loaded_at_s: float


@dataclass(frozen=True)
class Rejected:
    """A publication the replica refused: its version (None for a message without one), the reason (a wire code,
    ``bad_model`` or ``non_finite_weights``: docs/serving.md), what was wrong, and when (wall clock, s since the
    epoch)."""

    version: int | None
    reason: str
    detail: str
    at_s: float


class ModelHolder:
    """The single reference that the HTTP threads read and the Kafka loop swaps, and what the Kafka loop refused.

    Assigning an attribute is atomic in CPython, so a swap is one assignment; a request that read
    :attr:`current` keeps its model until it returns, whatever happens to the reference meanwhile.
    :attr:`rejections` is ``(the last Rejected or None, rejections since the last model swapped in)``, one tuple
    replaced in one assignment by the Kafka loop (its only writer), so ``/healthz`` reads a consistent pair.
    """

    def __init__(self) -> None:
        self.current: ServedModel | None = None
        self.rejections: tuple[Rejected | None, int] = (None, 0)
        self._swapped = threading.Condition()

    def swap(self, served: ServedModel) -> None:
        """Make ``served`` the model of every request that starts from now on (a good load: the count of
        rejections starts again; the last one stays)."""
        with self._swapped:
            self.current = served
            self.rejections = (self.rejections[0], 0)
            self._swapped.notify_all()

    def rejected(self, rejection: Rejected) -> None:
        """Record a publication the Kafka loop refused (the model served stays)."""
        self.rejections = (rejection, self.rejections[1] + 1)

    def wait_for_version(self, version: int, timeout_s: float) -> ServedModel | None:
        """Block until a model of at least ``version`` is served (tests and benchmarks); None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._swapped:
            while self.current is None or self.current.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._swapped.wait(left)
            return self.current


class NonFiniteWeights(ValueError):
    """A verified publication whose weights hold NaN or infinite values (a model that diverged)."""


def load_checkpoint(checkpoint: WireCheckpoint, device: str = "cpu") -> ServedModel:
    """Build the served model from a verified wire checkpoint; ValueError if it is not a serving state, and
    ``NonFiniteWeights`` (a ValueError) if its weights hold NaN or infinite values: such a model scores NaN.

    The trainer puts ``Learner.serving_state()``'s metadata under the manifest metadata's ``serving`` key.
    """
    serving_meta = checkpoint.metadata.get("serving")
    if not isinstance(serving_meta, Mapping):
        raise ValueError("manifest metadata has no 'serving' map (the students' format, version and config)")
    broken = non_finite_tensors(checkpoint.tensors)
    if broken is not None:
        raise NonFiniteWeights(f"weights that are not finite numbers (the model diverged in training): {broken}")
    try:
        if serving_meta.get("format") == RIVER_FORMAT:  # the river baseline: CPU only, no device
            model = RiverServingModel.from_serving_state(checkpoint.tensors, serving_meta)
        else:
            model = ServingModel.from_serving_state(checkpoint.tensors, serving_meta, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # wrong tensor names or shapes, bad config
        raise ValueError(f"cannot build the model: {exc}") from exc
    step = checkpoint.metadata.get("step")
    published_ms = checkpoint.metadata.get("published_at_ms")
    return ServedModel(
        version=checkpoint.version,
        model=model,
        tasks=tuple(model.config.served_tasks),  # auxiliary tasks are learnt, never served
        step=step if isinstance(step, int) else None,
        published_at_s=published_ms / 1000 if isinstance(published_ms, (int, float)) else None,
        loaded_at_s=time.time(),
    )


# ------------------------------------------------------------------------------------- following the topic


@dataclass
class FollowerStats:
    """What the Kafka loop did: where it started and how much it read (tests assert on these)."""

    start_path: str = ""  # "fast" (from the last manifest's span), "slow" (from the beginning) or "empty"
    end_offset_at_start: int = 0
    start_offset: int = 0  # where reading for the initial model began
    records_read: int = 0  # every record read: those of the start-up's ranges, then every one followed
    startup_records: int = 0  # records read before following began
    topic_recreations: int = 0  # times the topic was found deleted and created again (its versions start again)
    rejections: deque[tuple[int | None, str]] = field(default_factory=lambda: deque(maxlen=1000))  # the latest


class CheckpointFollower:
    """Reads the serving topic's single partition and swaps every newer verified model into ``holder``."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        holder: ModelHolder,
        metrics: ServingMetrics,
        *,
        device: str = "cpu",
        max_checkpoint_bytes: int = 1 << 30,
        poll_timeout_ms: int = 200,
        on_swap: Callable[[ServedModel], None] | None = None,
    ) -> None:

        self.consumer = consumer
        self.topic = topic
        self.tp = TopicPartition(topic, 0)
        self.holder = holder
        self.metrics = metrics
        self.device = device
        self.poll_timeout_ms = poll_timeout_ms
        self.on_swap = on_swap
        self.stats = FollowerStats()
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.reassembler = Reassembler(max_payload_bytes=max_checkpoint_bytes, max_message_bytes=MAX_MESSAGE_BYTES)
        self._held: list[tuple[int | None, str, str]] | None = None  # rejections held back during the fast path
        # Which topic is followed: its id (KIP-516; None where kafka-python does not say) and the next offset. A topic
        # deleted and created again has another id and starts again at offset 0, its versions at 1 (a new trainer).
        self._topic_id: Any = None
        self._next_offset = 0
        self._new_topic = False  # a recreated topic's first model is swapped in whatever its version

    # -- start-up

    def find_latest(self, stop: threading.Event) -> None:
        """Load the newest complete checkpoint without replaying the topic's history, then stand at its end.

        Fast path: read the last message; if it is a manifest, read only its ``span`` messages before it.
        Slow path (no manifest last, or the fast path found no complete checkpoint): read from the beginning
        to the end offset seen at start. Either way the consumer ends positioned at that end offset.
        """
        self.consumer.assign([self.tp])
        begin = self.consumer.beginning_offsets([self.tp])[self.tp]
        end = self.consumer.end_offsets([self.tp])[self.tp]
        self.stats.end_offset_at_start = end
        self._topic_id, self._next_offset = self._current_topic_id(), end  # every path below ends at ``end``
        if end <= begin:
            self.stats.start_path, self.stats.start_offset = "empty", end
            self.consumer.seek(self.tp, end)
            return
        last = list(self._read_range(end - 1, end, stop))
        span = _manifest_span(last[-1]) if last else None
        if span is not None:
            start = max(begin, end - 1 - span)
            self.stats.start_path, self.stats.start_offset = "fast", start
            # The window starts where the newest publication's chunks do: an older manifest inside it lacks its
            # chunks without being broken. Its rejections are held until the outcome is known.
            self._held = []
            try:
                loaded = self._load_first(self._read_range(start, end, stop))
            finally:
                held, self._held = self._held, None
            if loaded:
                served = self._floor()
                for version, reason, detail in held:  # only those about what is newer than the model now served
                    if version is None or version > served:
                        self._reject(version, reason, detail)
                self.stats.startup_records = self.stats.records_read
                return
            # Not loaded: the slow path below reads the same messages again and reports what is wrong with them.
            log.info("the last manifest on %s did not complete a checkpoint; reading the topic from offset %d",
                     self.topic, begin)
            # A fresh reader: the fast path's rejections would otherwise make the replay's chunks look stale.
            self.reassembler = Reassembler(max_payload_bytes=self.max_checkpoint_bytes,
                                           max_message_bytes=MAX_MESSAGE_BYTES)
        self.stats.start_path, self.stats.start_offset = "slow", begin
        self._load_first(self._read_range(begin, end, stop))
        self.stats.startup_records = self.stats.records_read

    def _read_range(self, start: int, end: int, stop: threading.Event) -> Iterator[tuple[bytes | None, bytes | None]]:
        """The (key, value) of every record in [start, end) still on the topic (compaction leaves gaps), as it is
        read (``consumers.runtime.topic_range.read_range``: the reassembler keeps what it needs, not the range)."""
        for record in read_range(self.consumer, self.tp, start, end, stop=stop, poll_timeout_ms=self.poll_timeout_ms):
            self.stats.records_read += 1
            yield record.key, record.value

    def _load_first(self, messages: Iterable[tuple[bytes | None, bytes | None]]) -> bool:
        """Feed ``messages``; swap in the newest checkpoint that verifies and loads. True if one did."""
        loaded = False
        for key, value in messages:
            loaded = self._feed(key, value) or loaded
        return loaded

    # -- following

    def run(self, stop: threading.Event) -> None:
        """Start-up, then follow the topic until ``stop`` is set. The whole Kafka loop of the daemon.

        A topic deleted and created again (an operator's reset of the serving topic, with a trainer started on a new
        checkpoint.dir: its versions start again at 1) is found by :meth:`_recreated`; the start-up runs again on the
        new topic and its newest complete publication is served whatever its version, after which versions must grow
        again as on any topic.
        """
        self.find_latest(stop)
        while not stop.is_set():
            records = self.consumer.poll(timeout_ms=self.poll_timeout_ms).get(self.tp, [])
            recreated = self._recreated(records)
            if recreated is not None:
                self._follow_new_topic(recreated, stop)
                continue
            for record in records:
                self.stats.records_read += 1
                self._next_offset = record.offset + 1
                self._feed(record.key, record.value)

    def _recreated(self, records: Sequence[Any]) -> str | None:
        """Why the topic polled now is another one than the topic followed so far (deleted and created again under
        the same name), or None.

        The topic's id says so where kafka-python knows it (Kafka 2.8+ brokers). Without ids: its offsets went back
        (kafka-python resets a position past the end of the new, shorter log to its beginning). Offsets that go
        back under the same id are a truncated log (an unclean leader election), not a new topic: versions already
        served stay refused.
        """
        topic_id = self._current_topic_id()
        if topic_id is not None and self._topic_id is not None and topic_id != self._topic_id:
            return f"its topic id changed from {self._topic_id} to {topic_id}"
        if self._topic_id is None:
            self._topic_id = topic_id
        if records and records[0].offset < self._next_offset:
            went_back = f"its offsets went back from {self._next_offset} to {records[0].offset}"
            if topic_id is None:
                return went_back
            log.warning("%s on %s under the same topic id %s: its log was truncated (an unclean leader election?); "
                        "following on, versions not newer than the one served still refused", went_back, self.topic,
                        topic_id)
        return None

    def _follow_new_topic(self, why: str, stop: threading.Event) -> None:
        """The topic was created again (``why``): a fresh reader, then the start-up over the new topic."""
        self.stats.topic_recreations += 1
        current = self.holder.current
        keeping = f"version {current.version} stays served" if current is not None else "no model served yet"
        log.warning("serving topic %s was deleted and created again (%s): a new topic whose versions start again; "
                    "its newest complete publication is served next, whatever its version (%s until then)",
                    self.topic, why, keeping)
        self.reassembler = Reassembler(max_payload_bytes=self.max_checkpoint_bytes, max_message_bytes=MAX_MESSAGE_BYTES)
        self._new_topic = True
        self.find_latest(stop)

    def _current_topic_id(self) -> Any:
        """The followed topic's id in kafka-python's cluster metadata, or None where it is not known (an older
        kafka-python or broker; a stand-in consumer). kafka-python 3 keeps it there without a public accessor."""
        cluster = getattr(self.consumer, "_cluster", None)
        topic_id = getattr(cluster, "topic_id", None)
        return topic_id(self.topic) if callable(topic_id) else None

    def _floor(self) -> int:
        """The version a publication must be above to be swapped in: the one served (-1 before the first, and on a
        recreated topic until its first model loads)."""
        current = self.holder.current
        return -1 if current is None or self._new_topic else current.version

    def _feed(self, key: bytes | None, value: bytes | None) -> bool:
        """One record through the reassembler; True if it completed a model that is now served."""
        started = time.perf_counter()
        outcome = self.reassembler.feed(key, value)
        if isinstance(outcome, Rejection):
            self._reject(outcome.version, outcome.reason, outcome.detail)
            return False
        if not isinstance(outcome, WireCheckpoint):
            return False
        try:
            served = load_checkpoint(outcome, self.device)
        except ValueError as exc:
            self._reject(outcome.version, "non_finite_weights" if isinstance(exc, NonFiniteWeights) else "bad_model",
                         str(exc))
            return False
        if served.version <= self._floor():
            return False  # a restart of the reassembler replayed an older version: never go back
        if self._new_topic and self.holder.current is not None:
            log.warning("serving topic %s was created again: its version %d replaces version %d of the old topic",
                        self.topic, served.version, self.holder.current.version)
        self._new_topic = False
        self.holder.swap(served)
        seconds = time.perf_counter() - started
        self.metrics.model_loaded(served.version, served.published_at_s or served.loaded_at_s, seconds)
        log.info("serving model version %d (step %s, tasks %s), verified and loaded in %.3f s",
                 served.version, served.step, ",".join(served.tasks), seconds)
        if self.on_swap is not None:
            self.on_swap(served)
        return True

    def _reject(self, version: int | None, reason: str, detail: str) -> None:
        if self._held is not None:
            self._held.append((version, reason, detail))
            return
        if reason == "stale_version":
            # Trainers never repeat a version on one topic (consumers.trainer.publisher): a lower one comes from
            # another topic's trainer that _recreated could not tell apart (no topic id, and the log never went back).
            detail += (f"; trainers never repeat a version on one topic: if {self.topic} was deleted and created "
                       "again, restart this replica to serve the new topic's newest publication")
        self.stats.rejections.append((version, reason))
        self.holder.rejected(Rejected(version, reason, detail, time.time()))
        self.metrics.reload_failed(reason)
        current = self.holder.current
        keeping = f"keeping version {current.version}" if current is not None else "no model served yet"
        log.warning("rejected checkpoint %s on %s: %s (%s); %s",
                    "?" if version is None else version, self.topic, reason, detail, keeping)


def _manifest_span(message: tuple[bytes | None, bytes | None]) -> int | None:
    """``span`` of a manifest message, or None if the message is not a readable manifest."""
    key, value = message
    if key != MANIFEST_KEY or value is None or len(value) > MAX_MESSAGE_BYTES:
        return None
    try:
        manifest = msgpack.unpackb(value, raw=False)
    except Exception:  # any malformed value: msgpack raises several exception types
        return None
    span = manifest.get("span") if isinstance(manifest, dict) else None
    return span if isinstance(span, int) and not isinstance(span, bool) and span >= 0 else None
