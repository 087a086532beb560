"""The attribution join: impressions and feedback in, labelled samples out, in event time.

Pure and deterministic: no Kafka, no wall clock unless the caller passes one. The live trainer and the
backtest feed it the same way, so the same input sequence gives the same samples and counters.

How it works
------------
* Every event comes with its *source*, any hashable plain value; the daemons use ``(topic, partition)``.
  Each source keeps the largest ``ts_ms`` it has delivered (its event-time clock).
* The **watermark** is ``min(clock of every active source) - allowed_lateness``; it never goes back. The
  join assumes that every event stamped *before* the watermark has arrived. (An event stamped exactly at
  the watermark may still come, so every comparison against the watermark below is strict.)
* A source that has delivered nothing does not hold the watermark back (a topic may have partitions that
  carry no keys at all, and a finite replay must not hang on them). Set ``wait_for_all_partitions`` to make
  unseen sources hold it back instead, e.g. while a live consumer's first fetches are still in flight.
* Idle sources (live mode): with ``idle_timeout_s``, a source that has delivered nothing for that long on the
  caller's clock stops holding the watermark back until it delivers again. The clock is ``now`` passed to ``tick``
  (call it once per poll) or to ``add_*``; an event added without ``now`` is timed at the last ``tick``. Idleness is
  only decided in ``tick``. The backtest passes no clock and no source is ever idle. If every source is idle the
  watermark stays where it is: with no data nothing new can close (``max_pending`` still bounds memory).
* An impression is held until the attribution window of every task has closed: ``ts + window_k < watermark``
  for the longest window. Feedback of task k with ``impression.ts <= feedback.ts <= impression.ts +
  window_k`` is *in window*; if its value is > 0 it sets label k to 1. Feedback that arrives after its own
  task's window has closed in event time counts as late, even if the impression is still held for a
  longer window of another task, so labels do not depend on when ``emit()`` is called.
* Feedback may arrive *before* its impression (another topic, another partition, a slower producer). It is
  held as *early feedback* until the watermark passes ``feedback.ts + early_feedback_grace_s``: an on-time
  impression (``ts <= feedback.ts``) would have arrived by then. Only then is it counted as an orphan.
* Ids of emitted impressions are remembered for ``completed_retention_s`` of event time past their longest
  window (and at most ``max_completed`` of them), to count late feedback and duplicate impressions. Feedback
  for an impression that has been forgotten is held as early feedback and ends up counted as an orphan.
* Memory is bounded: when more than ``max_pending`` impressions are held, the oldest is emitted early with
  ``reason="evicted"``; when more than ``max_early_feedback`` feedback events are held, the oldest is counted
  as an orphan. Both are counted; nothing is dropped silently.
* Feedback for a task the join does not have is counted (``unknown_task_feedback``, or ``ignored_task_feedback`` for
  an outcome of ``JoinConfig.ignored_tasks``, left out of the model on purpose) and ignored. ``task_labels``
  (``TaskLabels``) counts such names one by one (the first ``MAX_UNKNOWN_TASKS``, later ones together) and per task
  the positive labels emitted and the samples emitted since the last one, so that a task the producer names
  otherwise (``clik`` for ``click``) is said (``task_labels_warning``), not only an AUC that reads "no data".

Samples come out of ``emit()`` in the order they became ready: closed impressions by ``(ts_ms,
impression_id)``. ``flush()`` ends a finite replay. ``state_dict()`` holds only plain values (msgpack-able),
so a checkpoint keeps pending impressions and early feedback exactly.

>>> join = AttributionJoin(JoinConfig(attribution_window_s={"like": 10.0}))
>>> join.add_impression({"impression_id": "i1", "ts_ms": 0, "user_id": "u", "item_id": "a", "features": {}}, "p0")
>>> join.add_feedback({"impression_id": "i1", "ts_ms": 4_000, "task": "like", "value": 1}, "p0")
>>> join.add_impression({"impression_id": "i2", "ts_ms": 10_001, "user_id": "u", "item_id": "b", "features": {}}, "p0")
>>> [(s.impression["impression_id"], s.labels, s.reason) for s in join.emit()]
[('i1', {'like': 1}, 'closed')]
"""

from __future__ import annotations

import difflib
import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Source = Hashable
"""Where an event came from; the daemons use ``(topic, partition)``. Must be built of str/int/tuples."""

JOIN_STATE_FORMAT = 1  # a state saved before "unknown_tasks" and "task_positives" were kept loads: they are optional

# Distinct unknown task names counted one by one (in the state and the warnings); later ones are counted together.
# A producer that puts ids into the task field must not grow the join state without bound.
MAX_UNKNOWN_TASKS = 16

# A task without a positive label over this many emitted samples is reported (task_labels_warning). With a positive rate
# p, a healthy task goes that long without one with probability (1 - p) ** n: under 1e-4 for p >= 0.1 % (a like or a
# share rate), so it does not cry wolf, while a misnamed task, whose labels are all 0, trips it within minutes at any
# live rate. Fewer samples since the start say nothing yet (over a few hundred samples a rare task has no positive by
# chance); a backtest says it at its end, over the whole replay (consumers.tools.backtest.replay_stream_warnings).
MIN_SAMPLES_WITHOUT_POSITIVE = 10_000

# Why a sample was emitted.
REASON_CLOSED = "closed"  # every attribution window closed in event time: labels are final
REASON_LATE = "late"  # the impression itself arrived after its windows had closed
REASON_EVICTED = "evicted"  # emitted early because max_pending was reached: labels may miss feedback
REASON_FLUSHED = "flushed"  # emitted by flush() at the end of a finite replay

COUNTERS = (
    "impressions",  # impression events received
    "feedback",  # feedback events received
    "emitted",  # samples emitted
    "matched_feedback",  # in-window feedback applied to an impression (any value)
    "positive_labels",  # labels set to 1
    "early_feedback",  # feedback held because its impression had not arrived yet
    "early_feedback_matched",  # ... and later matched by its impression
    "duplicate_impressions",  # an impression id seen again (ignored)
    "late_impressions",  # impressions that arrived with all windows already closed
    "late_feedback",  # in-window feedback whose window had already closed in event time
    "orphan_feedback",  # feedback whose impression never arrived (or was forgotten)
    "outside_window_feedback",  # feedback before the impression or after its task's window
    "unknown_task_feedback",  # feedback for a task that is not configured (ignored)
    "ignored_task_feedback",  # feedback for an outcome the configuration leaves out on purpose (ignored_tasks)
    "evicted_impressions",  # impressions emitted early because of max_pending
    "evicted_early_feedback",  # early feedback counted as orphan because of max_early_feedback
)


@dataclass(frozen=True)
class JoinConfig:
    """Configuration of the attribution join.

    ``attribution_window_s`` maps every task to its attribution window in seconds of event time. Optional
    bounds default to: ``max_early_feedback = max_pending``, ``max_completed = 2 * max_pending``,
    ``completed_retention_s = longest window``. ``ignored_tasks``: outcomes the producer sends that the model leaves
    out on purpose; their feedback is counted as ``ignored_task_feedback`` instead of ``unknown_task_feedback`` (which
    alerts and warnings read as a misnamed task).
    """

    attribution_window_s: Mapping[str, float]
    allowed_lateness_s: float = 0.0
    max_pending: int = 1_000_000
    max_early_feedback: int | None = None
    early_feedback_grace_s: float = 0.0
    completed_retention_s: float | None = None
    max_completed: int | None = None
    idle_timeout_s: float | None = None
    wait_for_all_partitions: bool = False
    ignored_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.attribution_window_s:
            raise ValueError("attribution_window_s is empty: configure at least one task and its window in seconds")
        both = sorted(set(self.ignored_tasks) & set(self.attribution_window_s))
        if both:
            raise ValueError(f"ignored_tasks {both} are tasks of the join too (they have attribution windows)")
        for task, window in self.attribution_window_s.items():
            if not isinstance(task, str) or not task:
                raise ValueError(f"task names must be non-empty strings, got {task!r}")
            if not _finite_non_negative(window):
                raise ValueError(f"attribution window of task {task!r} must be a finite number >= 0, got {window!r}")
        for name in ("allowed_lateness_s", "early_feedback_grace_s"):
            if not _finite_non_negative(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("completed_retention_s", "idle_timeout_s"):
            value = getattr(self, name)
            if value is not None and not _finite_non_negative(value):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
        for name in ("max_pending", "max_early_feedback", "max_completed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite_non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _freeze(value: Any) -> Any:
    """Lists (what msgpack makes of tuples) back into tuples, so restored sources are hashable again."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(slots=True)
class JoinedSample:
    """An impression with its final labels ``{task: 0 | 1}``, its source and why it was emitted."""

    impression: dict[str, Any]
    labels: dict[str, int]
    source: Source
    reason: str

    def to_plain(self) -> list[Any]:
        """A msgpack-able form (see ``from_plain``)."""
        return [self.impression, self.labels, self.source, self.reason]

    @classmethod
    def from_plain(cls, plain: list[Any]) -> JoinedSample:
        """Inverse of ``to_plain`` (also after a msgpack round trip, which turns tuples into lists)."""
        impression, labels, source, reason = plain
        return cls(dict(impression), dict(labels), _freeze(source), reason)


class AttributionJoin:
    """Joins impressions with per-task feedback inside attribution windows, driven by a watermark.

    ``add_impression`` / ``add_feedback`` take events already validated against the contract, plus their
    source; ``emit()`` returns the samples that became ready. See the module docstring for the rules.
    """

    def __init__(self, config: JoinConfig) -> None:
        self.config = config
        self.tasks: tuple[str, ...] = tuple(sorted(config.attribution_window_s))
        self._window_ms = {task: _ms(config.attribution_window_s[task]) for task in self.tasks}
        self._max_window_ms = max(self._window_ms.values())
        self._lateness_ms = _ms(config.allowed_lateness_s)
        self._grace_ms = _ms(config.early_feedback_grace_s)
        retention_s = config.completed_retention_s
        self._retention_ms = self._max_window_ms if retention_s is None else _ms(retention_s)
        self._max_pending = config.max_pending
        self._max_early = config.max_early_feedback or config.max_pending
        self._max_completed = config.max_completed or 2 * config.max_pending
        self._idle_timeout_s = config.idle_timeout_s

        # Per source: [largest ts_ms seen or None, last activity on the caller's clock or None].
        self._sources: dict[Source, list[Any]] = {}
        self._unassigned: dict[Source, int] = {}  # the event-time clocks of sources ``assign`` took away
        self._idle: set[Source] = set()
        self._min_source: Source | None = None  # the source that defines the watermark now
        self._watermark_ms: int | None = None
        self._now: float | None = None

        self._pending: dict[str, list[Any]] = {}  # impression id -> [event, labels, source]
        self._pending_heap: list[tuple[int, str]] = []  # (ts_ms, impression id): closes in this order
        self._early: dict[str, list[list[Any]]] = {}  # impression id -> [[task, ts_ms, value, seq], ...]
        self._early_heap: list[tuple[int, int, str]] = []  # (expiry ts_ms, seq, id); may hold stale entries
        self._early_count = 0
        self._seq = 0
        self._completed: dict[str, int] = {}  # emitted impression id -> its ts_ms
        self._completed_order: deque[tuple[int, str]] = deque()  # emission order, for pruning
        self._ready: deque[JoinedSample] = deque()
        self._counters = dict.fromkeys(COUNTERS, 0)
        # unknown task names; positives per task
        self.task_labels = TaskLabels(config.attribution_window_s, config.ignored_tasks)

    # ----------------------------------------------------------------------------------------- inputs

    def add_impression(self, event: Mapping[str, Any], source: Source, now: float | None = None) -> None:
        """Add one impression event from ``source``; ``now`` is the caller's clock (live mode only)."""
        self._impression(event, source)
        self._advance_source(source, event["ts_ms"], now)

    def add_feedback(self, event: Mapping[str, Any], source: Source, now: float | None = None) -> None:
        """Add one feedback event from ``source``; ``now`` is the caller's clock (live mode only)."""
        self._feedback(event)
        self._advance_source(source, event["ts_ms"], now)

    def add_events(self, events: Iterable[Mapping[str, Any]], source: Source, now: float | None = None) -> None:
        """Add the validated impressions and feedback of one message (a batch envelope's events, in order).

        The same as ``add_impression`` / ``add_feedback`` on each in turn, except that ``source``'s event-time
        clock advances once, to the largest ``ts_ms`` of the message, after all of them: the events of one
        message arrive together, so none of them is judged late against a watermark that another event of the
        same message moved. Returns nothing; ``emit()`` has what became ready.

        Here the feedback for ``i1`` counts: one event at a time, ``i2`` would first have closed ``i1``'s window.

        >>> join = AttributionJoin(JoinConfig(attribution_window_s={"like": 10.0}))
        >>> join.add_events([{"impression_id": "i1", "ts_ms": 0, "user_id": "u", "item_id": "a", "features": {}},
        ...                  {"impression_id": "i2", "ts_ms": 20_000, "user_id": "u", "item_id": "b", "features": {}},
        ...                  {"impression_id": "i1", "ts_ms": 5_000, "task": "like", "value": 1.0}], "p0")
        >>> [(s.impression["impression_id"], s.labels) for s in join.emit()], join.counters["late_feedback"]
        ([('i1', {'like': 1})], 0)
        """
        latest: int | None = None
        for event in events:
            if "task" in event:
                self._feedback(event)
            else:
                self._impression(event, source)
            ts = event["ts_ms"]
            if latest is None or ts > latest:
                latest = ts
        if latest is not None:
            self._advance_source(source, latest, now)

    def _impression(self, event: Mapping[str, Any], source: Source) -> None:
        counters = self._counters
        counters["impressions"] += 1
        impression_id = event["impression_id"]
        ts = event["ts_ms"]
        if impression_id in self._pending or impression_id in self._completed:
            counters["duplicate_impressions"] += 1
        else:
            labels = dict.fromkeys(self.tasks, 0)
            early = self._early.pop(impression_id, None)
            if early is not None:
                self._apply_early_feedback(ts, labels, early)
            watermark = self._watermark_ms
            if watermark is not None and ts + self._max_window_ms < watermark:
                counters["late_impressions"] += 1
                self._emit_one(event, labels, source, REASON_LATE)
            else:
                self._pending[impression_id] = [event, labels, source]
                heapq.heappush(self._pending_heap, (ts, impression_id))
                if len(self._pending) > self._max_pending:
                    self._evict_oldest_impression()

    def _feedback(self, event: Mapping[str, Any]) -> None:
        counters = self._counters
        counters["feedback"] += 1
        task = event["task"]
        ts = event["ts_ms"]
        window = self._window_ms.get(task)
        if window is None:
            counters[self.task_labels.unknown(task)] += 1
        else:
            impression_id = event["impression_id"]
            held = self._pending.get(impression_id)
            if held is not None:
                impression_ts = held[0]["ts_ms"]
                if not impression_ts <= ts <= impression_ts + window:
                    counters["outside_window_feedback"] += 1
                elif self._watermark_ms is not None and impression_ts + window < self._watermark_ms:
                    counters["late_feedback"] += 1
                else:
                    counters["matched_feedback"] += 1
                    if event["value"] > 0 and not held[1][task]:
                        held[1][task] = 1
                        counters["positive_labels"] += 1
            else:
                impression_ts = self._completed.get(impression_id)
                if impression_ts is not None:
                    if impression_ts <= ts <= impression_ts + window:
                        counters["late_feedback"] += 1
                    else:
                        counters["outside_window_feedback"] += 1
                else:
                    self._hold_early_feedback(impression_id, task, ts, event["value"])

    def assign(self, sources: Iterable[Source], now: float | None = None) -> None:
        """Set the sources that drive the watermark (after a Kafka rebalance); others stop driving it, and one
        assigned back has its event-time clock again (``_reassigned``).

        Sources never assigned are added automatically on their first event, so a backtest need not call this.
        Pending impressions of a revoked source stay pending; the trainer decides what to do with them.
        """
        if now is not None:
            self._now = now
        self._sources, self._unassigned = _reassigned(self._sources, self._unassigned, list(sources), self._now)
        self._idle &= set(self._sources)
        self._recompute_watermark()

    def tick(self, now: float) -> None:
        """Advance the caller's clock (live mode): marks idle sources and may advance the watermark."""
        self._now = now
        if self._idle_timeout_s is None:
            return
        for source, state in self._sources.items():
            if state[1] is None:
                state[1] = now  # first time this source is timed: start its idle timer now
            elif now - state[1] >= self._idle_timeout_s:
                self._idle.add(source)
        self._recompute_watermark()

    # ---------------------------------------------------------------------------------------- outputs

    def emit(self) -> list[JoinedSample]:
        """The samples that became ready since the last call, in the order they became ready."""
        ready = list(self._ready)
        self._ready.clear()
        self.task_labels.emitted(ready, self._counters["emitted"])
        self._counters["emitted"] += len(ready)
        return ready

    def flush(self) -> list[JoinedSample]:
        """Emit everything still held (end of a finite replay); held early feedback becomes orphan."""
        while self._pending_heap:
            _, impression_id = heapq.heappop(self._pending_heap)
            event, labels, source = self._pending.pop(impression_id)
            self._emit_one(event, labels, source, REASON_FLUSHED)
        self._counters["orphan_feedback"] += self._early_count
        self._early.clear()
        self._early_heap.clear()
        self._early_count = 0
        return self.emit()

    @property
    def watermark_ms(self) -> int | None:
        """Event time (ms) before which every event is assumed to have arrived; None before any data."""
        return self._watermark_ms

    @property
    def pending_impressions(self) -> int:
        """Impressions held until their attribution windows close."""
        return len(self._pending)

    def source_max_ts(self, source: Source) -> int | None:
        """The newest event time (ms) seen from ``source``; None before its first event."""
        state = self._sources.get(source)
        return None if state is None else state[0]

    @property
    def early_feedback(self) -> int:
        """Feedback events held because their impression has not arrived yet."""
        return self._early_count

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters (names in ``COUNTERS``)."""
        return dict(self._counters)

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain values (msgpack-able, no pickle)."""
        return {
            "format": JOIN_STATE_FORMAT,
            "window_ms": dict(self._window_ms),
            "watermark_ms": self._watermark_ms,
            "now": self._now,
            "sources": [[source, state[0], state[1], source in self._idle] for source, state in self._sources.items()],
            "pending": [self._pending[impression_id] for _, impression_id in sorted(self._pending_heap)],
            "early": [
                [impression_id, *entry] for impression_id, entries in self._early.items() for entry in entries
            ],
            "seq": self._seq,
            "completed": [[impression_id, ts] for ts, impression_id in self._completed_order],
            "ready": [sample.to_plain() for sample in self._ready],
            "counters": dict(self._counters),
            **self.task_labels.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output (also after a msgpack or JSON round trip).

        The tasks must be the same; windows may differ (the new ones apply from now on).
        """
        _check_state(state, self.tasks)
        self._watermark_ms = state["watermark_ms"]
        self._now = state["now"]
        self._sources = {}
        self._unassigned = {}
        self._idle = set()
        for source, max_ts, last_seen, idle in state["sources"]:
            source = _freeze(source)
            self._sources[source] = [max_ts, last_seen]
            if idle:
                self._idle.add(source)
        self._pending = {}
        self._pending_heap = []
        for event, labels, source in state["pending"]:
            event = dict(event)
            self._pending[event["impression_id"]] = [event, dict(labels), _freeze(source)]
            self._pending_heap.append((event["ts_ms"], event["impression_id"]))
        heapq.heapify(self._pending_heap)
        self._early = {}
        self._early_heap = []
        for impression_id, task, ts, value, seq in state["early"]:
            self._early.setdefault(impression_id, []).append([task, ts, value, seq])
            self._early_heap.append((ts + self._grace_ms, seq, impression_id))
        heapq.heapify(self._early_heap)
        self._early_count = len(state["early"])
        self._seq = state["seq"]
        self._completed = {}
        self._completed_order = deque()
        for impression_id, ts in state["completed"]:
            self._completed[impression_id] = ts
            self._completed_order.append((ts, impression_id))
        self._ready = deque(JoinedSample.from_plain(plain) for plain in state["ready"])
        self._counters = {**dict.fromkeys(COUNTERS, 0), **state["counters"]}
        self.task_labels.load_state_dict(state, self._counters["emitted"])
        self._min_source = None
        self._recompute_watermark()

    # -------------------------------------------------------------------------------------- internals

    def _apply_early_feedback(self, impression_ts: int, labels: dict[str, int], early: list[list[Any]]) -> None:
        counters = self._counters
        self._early_count -= len(early)
        for task, ts, value, _seq in early:
            if impression_ts <= ts <= impression_ts + self._window_ms[task]:
                counters["matched_feedback"] += 1
                counters["early_feedback_matched"] += 1
                if value > 0 and not labels[task]:
                    labels[task] = 1
                    counters["positive_labels"] += 1
            else:
                counters["outside_window_feedback"] += 1

    def _hold_early_feedback(self, impression_id: str, task: str, ts: int, value: float) -> None:
        expiry = ts + self._grace_ms
        if self._watermark_ms is not None and expiry < self._watermark_ms:
            # An on-time impression (ts <= feedback ts) would already be here: it can no longer match.
            self._counters["orphan_feedback"] += 1
            return
        self._counters["early_feedback"] += 1
        self._seq += 1
        self._early.setdefault(impression_id, []).append([task, ts, value, self._seq])
        heapq.heappush(self._early_heap, (expiry, self._seq, impression_id))
        self._early_count += 1
        if self._early_count > self._max_early:
            while self._early_count > self._max_early and self._pop_early():
                self._counters["evicted_early_feedback"] += 1
                self._counters["orphan_feedback"] += 1

    def _pop_early(self, expiring_before: int | None = None) -> bool:
        """Remove the earliest-expiring held feedback (only if it expires before ``expiring_before``).

        Returns False when there is none. Heap entries whose feedback was already matched are discarded.
        """
        heap = self._early_heap
        while heap:
            expiry, seq, impression_id = heap[0]
            entries = self._early.get(impression_id)
            index = next((i for i, entry in enumerate(entries or ()) if entry[3] == seq), -1)
            if index < 0:
                heapq.heappop(heap)  # stale: its impression arrived and took it
                continue
            if expiring_before is not None and expiry >= expiring_before:
                return False
            heapq.heappop(heap)
            del entries[index]
            if not entries:
                del self._early[impression_id]
            self._early_count -= 1
            return True
        return False

    def _evict_oldest_impression(self) -> None:
        _, impression_id = heapq.heappop(self._pending_heap)
        event, labels, source = self._pending.pop(impression_id)
        self._counters["evicted_impressions"] += 1
        self._emit_one(event, labels, source, REASON_EVICTED)

    def _emit_one(self, event: Any, labels: dict[str, int], source: Source, reason: str) -> None:
        self._ready.append(JoinedSample(event, labels, source, reason))
        ts = event["ts_ms"]
        impression_id = event["impression_id"]
        self._completed[impression_id] = ts
        self._completed_order.append((ts, impression_id))
        if len(self._completed) > self._max_completed:
            _, oldest = self._completed_order.popleft()
            del self._completed[oldest]

    def _advance_source(self, source: Source, ts: int, now: float | None) -> None:
        state = self._sources.get(source)
        recompute = False
        if state is None:
            state = self._sources[source] = [None, now if now is not None else self._now]
            recompute = True
        if now is not None:
            self._now = now
        activity = now if now is not None else self._now  # without a clock of its own: the last tick
        if activity is not None:
            state[1] = activity
            if source in self._idle:
                self._idle.discard(source)
                recompute = True
        if state[0] is None or ts > state[0]:
            recompute = recompute or state[0] is None or source == self._min_source
            state[0] = ts
        if recompute:
            self._recompute_watermark()

    def _recompute_watermark(self) -> None:
        lowest: int | None = None
        lowest_source: Source | None = None
        for source, (max_ts, _) in self._sources.items():
            if source in self._idle:
                continue
            if max_ts is None:
                if self.config.wait_for_all_partitions:
                    self._min_source = None
                    return
                continue
            if lowest is None or max_ts < lowest:
                lowest, lowest_source = max_ts, source
        self._min_source = lowest_source
        if lowest is None:
            return
        candidate = lowest - self._lateness_ms
        if self._watermark_ms is None or candidate > self._watermark_ms:
            self._watermark_ms = candidate
            self._on_watermark_advanced(candidate)

    def _on_watermark_advanced(self, watermark: int) -> None:
        # Impressions whose longest window closed, in (ts, id) order.
        heap = self._pending_heap
        close_before = watermark - self._max_window_ms
        while heap and heap[0][0] < close_before:
            _, impression_id = heapq.heappop(heap)
            event, labels, source = self._pending.pop(impression_id)
            self._emit_one(event, labels, source, REASON_CLOSED)
        # Early feedback that can no longer meet an on-time impression (none held, the common case: no call).
        while self._early_heap and self._pop_early(expiring_before=watermark):
            self._counters["orphan_feedback"] += 1
        # Forget emitted ids once late feedback for them is no longer worth telling apart from orphans.
        forget_before = watermark - self._max_window_ms - self._retention_ms
        order = self._completed_order
        while order and order[0][0] < forget_before:
            _, impression_id = order.popleft()
            del self._completed[impression_id]


def _reassigned(sources: dict[Source, list[Any]], unassigned: dict[Source, int], wanted: list[Source],
                now: float | None) -> tuple[dict[Source, list[Any]], dict[Source, int]]:
    """``AttributionJoin.assign``'s new (sources, unassigned clocks): a wanted source keeps its state; one assigned
    back has its clock again, its idle timer started anew (a restored trainer's first assignment from kafka-python
    is often empty, the real one follows: without its clocks, the watermark waited for every partition's next event
    or ``idle_timeout_s``); a new one has none yet. The clocks of sources no longer wanted are kept aside."""
    kept = {source: sources.get(source) or ([unassigned[source], now] if source in unassigned else [None, now])
            for source in wanted}
    aside = {source: ts for source, ts in unassigned.items() if source not in kept}
    aside.update({source: state[0] for source, state in sources.items() if source not in kept and state[0] is not None})
    return kept, aside


class TaskLabels:
    """A join's account of its tasks' labels: feedback for task names it does not have, by name (the first
    ``MAX_UNKNOWN_TASKS`` names, later ones together), and per task the positive labels of the samples emitted and the
    samples emitted since the last of them (or since the start). ``report()`` is what ``task_labels_warning`` reads.

    >>> join = AttributionJoin(JoinConfig(attribution_window_s={"click": 60.0}))
    >>> join.add_feedback({"impression_id": "i1", "ts_ms": 0, "task": "clik", "value": 1}, "p0")
    >>> labels = join.task_labels.report(join.counters)
    >>> labels["unknown"], labels["positives"], labels["since_positive"]
    ({'clik': 1}, {'click': 0}, {'click': 0})
    """

    def __init__(self, window_s: Mapping[str, float], ignored: Iterable[str] = ()) -> None:
        self.tasks = tuple(sorted(window_s))
        self.ignored = frozenset(ignored)  # outcomes left out of the model on purpose: not unknown names
        self.window_s = {task: float(window_s[task]) for task in self.tasks}
        self.unknown_names: dict[str, int] = {}  # the first MAX_UNKNOWN_TASKS names -> feedback events
        self.unknown_other = 0  # feedback events of any later unknown name
        self.positives = dict.fromkeys(self.tasks, 0)  # positive labels emitted, per task
        # per task, the ``emitted`` count just after the last sample with its positive label
        self.emitted_at_positive = dict.fromkeys(self.tasks, 0)

    def unknown(self, task: str) -> str:
        """One feedback event for ``task``, a name the join does not have, counted by name; returns the join counter
        it adds to: ``ignored_task_feedback`` for an outcome left out on purpose, else ``unknown_task_feedback``."""
        names = self.unknown_names
        if task in names:
            names[task] += 1
        elif len(names) < MAX_UNKNOWN_TASKS:
            names[task] = 1
        else:
            self.unknown_other += 1
        return "ignored_task_feedback" if task in self.ignored else "unknown_task_feedback"

    def emitted(self, samples: Sequence[JoinedSample], before: int) -> None:
        """``samples`` were emitted after ``before`` others."""
        positives, at = self.positives, self.emitted_at_positive
        for position, sample in enumerate(samples, before + 1):
            for task, label in sample.labels.items():
                if label:
                    positives[task] += 1
                    at[task] = position

    def report(self, counters: Mapping[str, int]) -> dict[str, Any]:
        """Plain values: ``unknown`` (feedback events per name the join does not have, ignored ones too),
        ``unknown_other``, ``ignored`` (the outcomes left out on purpose), ``positives`` and ``since_positive`` (per
        task), ``window_s`` (the attribution window per task), and the join's ``feedback`` and ``emitted`` counters
        (``counters``)."""
        emitted = int(counters["emitted"])
        return {"unknown": dict(self.unknown_names), "unknown_other": self.unknown_other,
                "ignored": sorted(self.ignored),
                "positives": dict(self.positives),
                "since_positive": {task: emitted - at for task, at in self.emitted_at_positive.items()},
                "window_s": dict(self.window_s), "feedback": int(counters["feedback"]), "emitted": emitted}

    def state_dict(self) -> dict[str, Any]:
        """The keys this adds to the join's state."""
        return {"unknown_tasks": [dict(self.unknown_names), self.unknown_other],
                "task_positives": {task: [self.positives[task], self.emitted_at_positive[task]] for task in self.tasks}}

    def load_state_dict(self, state: Mapping[str, Any], emitted: int) -> None:
        """Restore from a join state whose ``emitted`` counter is ``emitted``. A state saved before these were kept
        has neither key: no names, and each task's samples without a positive counted from here (from its start, every
        task would look as if it never had one)."""
        names, other = state.get("unknown_tasks", ({}, 0))
        self.unknown_names, self.unknown_other = dict(names), int(other)
        saved = state.get("task_positives", {})
        self.positives = {task: saved[task][0] if task in saved else 0 for task in self.tasks}
        self.emitted_at_positive = {task: saved[task][1] if task in saved else emitted for task in self.tasks}


def _check_state(state: Mapping[str, Any], tasks: Sequence[str]) -> None:
    """Refuse a join state of another format, or saved for other tasks, with a sentence saying what to do."""
    if state.get("format") != JOIN_STATE_FORMAT:
        raise ValueError(f"join state has format {state.get('format')!r}; this code reads format {JOIN_STATE_FORMAT}")
    if set(state["window_ms"]) != set(tasks):
        raise ValueError(f"join state was saved for tasks {sorted(state['window_ms'])} but this join has tasks "
                         f"{list(tasks)}; start from an empty state or configure the same tasks")


def late_feedback_warning(counters: Mapping[str, int], reported: int) -> str | None:
    """The trainer's log line when feedback was judged late since the last report, else None.

    ``reported`` is the ``late_feedback`` count at that report. Late feedback is dropped by design (its
    impression's window had closed in event time), so a producer that sends feedback far out of event-time order
    loses labels silently unless someone says so.

    >>> late_feedback_warning({"late_feedback": 7, "feedback": 100}, 2)[:58]
    '5 feedback events arrived after their impression had been '
    >>> late_feedback_warning({"late_feedback": 2, "feedback": 100}, 2) is None
    True
    """
    counts = _late_since(counters, "late_feedback", "feedback", reported)
    if counts is None:
        return None
    late, total = counts
    return (f"{late - reported} feedback events arrived after their impression had been emitted and were dropped "
            f"({late} of {total} feedback events so far, {late / total:.1%}): the producer sends feedback out of "
            "event-time order (e.g. envelopes spanning days) or join.attribution_window_s / join.allowed_lateness_s "
            "are too short for this stream")


def _late_since(counters: Mapping[str, int], late_key: str, total_key: str, reported: int) -> tuple[int, int] | None:
    """(late so far, events so far) of the join's ``late_key`` counter and its ``total_key``, or None when no more are
    late than at the last report (``reported``): what the late warnings say."""
    late = int(counters.get(late_key, 0))
    if late <= reported:
        return None
    return late, max(int(counters.get(total_key, 0)), late)


def late_impressions_warning(counters: Mapping[str, int], reported: int) -> str | None:
    """The trainer's log line when impressions arrived late since the last report (``reported``: the
    ``late_impressions`` count then), else None. A late impression's windows had all closed in event time: it is
    trained at once with the labels that had reached it, mostly none, so the model learns false negatives.

    >>> late_impressions_warning({"late_impressions": 30, "impressions": 1000}, 0)[:51]
    '30 impressions arrived after the event-time waterma'
    >>> late_impressions_warning({"late_impressions": 30, "impressions": 1000}, 30) is None
    True
    """
    counts = _late_since(counters, "late_impressions", "impressions", reported)
    if counts is None:
        return None
    late, total = counts
    return (f"{late - reported} impressions arrived after the event-time watermark had closed their attribution "
            f"windows and were trained without waiting for labels ({late} of {total} impressions so far, "
            f"{late / total:.1%}): a producer sends impressions out of event-time order or with a clock far ahead "
            "(one event far in the future moves the watermark), or join.allowed_lateness_s is too short")


def nearest_task(name: str, tasks: Iterable[str]) -> str | None:
    """The task of ``tasks`` that ``name`` is most likely a misspelling of (difflib, case aside), else None.

    >>> nearest_task("clik", ["click", "like"]), nearest_task("Click", ["click"]), nearest_task("like", ["click"])
    ('click', 'click', None)
    """
    by_lower = {task.lower(): task for task in tasks}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def describe_unknown_tasks(unknown: Mapping[str, int], other: int, tasks: Iterable[str]) -> str:
    """Task names the join does not have with their feedback events, most first, each with the task of ``tasks`` it
    most likely misspells; ``other``: the events of names beyond the first ``MAX_UNKNOWN_TASKS``.

    >>> describe_unknown_tasks({"hate": 3, "clik": 1200}, 2, ["click", "like"])
    "'clik' 1,200 (did you mean 'click'?), 'hate' 3, 2 of other names"
    """
    tasks = list(tasks)
    parts = []
    for name, n in sorted(unknown.items(), key=lambda item: (-item[1], item[0])):
        near = nearest_task(name, tasks)
        parts.append(f"{name!r} {n:,}" + (f" (did you mean {near!r}?)" if near is not None else ""))
    if other:
        parts.append(f"{other:,} of other names")
    return ", ".join(parts)


def task_labels_warning(labels: Mapping[str, Any], reported: Mapping[str, Any] | None, *,
                        min_samples: int = MIN_SAMPLES_WITHOUT_POSITIVE) -> str | None:
    """The trainer's log line when, since the last report, feedback came for task names the join does not have, or
    a task has gone ``min_samples`` emitted samples or more without a positive label (and samples were emitted since
    the last report); else None. Either way a task whose feedback the producer names otherwise (``clik`` for
    ``click``) trains on labels that are all 0 and its AUC reads "no data", and nothing else says why.

    ``labels``: the join's ``task_labels.report(counters)`` now; ``reported``: its value at the last report (None:
    none yet). Outcomes left out of the model on purpose (``JoinConfig.ignored_tasks``) are not unknown names.

    >>> labels = {"unknown": {"clik": 900}, "unknown_other": 0, "ignored": [], "positives": {"click": 0, "like": 40},
    ...           "since_positive": {"click": 12_000, "like": 3}, "window_s": {"click": 60.0, "like": 900.0},
    ...           "feedback": 1_000, "emitted": 12_000}
    >>> message = task_labels_warning(labels, None)
    >>> message[:71]
    '900 feedback events for task names the model does not have were ignored'
    >>> message[72:116]
    '(900 of 1,000 feedback events so far, 90.0%)'
    >>> message[118:152], message.split("; ")[-1][:56]
    ("'clik' 900 (did you mean 'click'?)", "no positive label for 'click' in the last 12,000 samples")
    >>> task_labels_warning(labels, labels) is None  # nothing new since that report
    True
    """
    skip = set(labels["ignored"])
    before = reported["unknown"] if reported is not None else {}
    new = {name: n - before.get(name, 0) for name, n in labels["unknown"].items()
           if name not in skip and n > before.get(name, 0)}
    new_other = labels["unknown_other"] - (reported["unknown_other"] if reported is not None else 0)
    tasks = list(labels["positives"])
    parts = []
    if new or new_other > 0:
        n_new = sum(new.values()) + max(new_other, 0)
        so_far = sum(n for name, n in labels["unknown"].items() if name not in skip) + labels["unknown_other"]
        total = max(int(labels["feedback"]), so_far)
        parts.append(f"{n_new:,} feedback events for task names the model does not have were ignored ({so_far:,} of "
                     f"{total:,} feedback events so far, {so_far / total:.1%}): "
                     f"{describe_unknown_tasks(new, max(new_other, 0), tasks)}. The producer must name the tasks as "
                     f"model.tasks does ({', '.join(map(repr, tasks))}); an outcome left out of the model on purpose "
                     "is no longer reported once join.attribution_window_s gives it a window (beside every task of "
                     "model.tasks)")
    emitted_before = reported["emitted"] if reported is not None else 0
    if labels["emitted"] > emitted_before:
        for task in tasks:
            since = labels["since_positive"][task]
            if since >= min_samples:
                ever = labels["positives"][task]
                parts.append(f"no positive label for {task!r} in the last {since:,} samples "
                             f"({f'{ever:,} before them' if ever else 'none so far'}): it learns from labels that are "
                             "all 0 and its AUC reads no data. Check the task's name in the producer's feedback and in "
                             f"model.tasks, and its window join.attribution_window_s.{task} "
                             f"({labels['window_s'][task]:g} s: later feedback is dropped)")
    return "; ".join(parts) if parts else None
