"""The trainer's pure core: decoded events in, join -> mini-batches -> score, then update -> metrics.

One code path for the live daemon and the backtest. Both build a :class:`Pipeline` (``consumers.runtime.assembly.
build_pipeline`` does it from a configuration) and call the same methods; the only differences are where the
bytes come from (Kafka records or an event-log file) and which clock the pipeline is given:

* live (``consumers.trainer``): the wall clock, ``time.monotonic``, so a quiet stream still trains within
  ``max_batch_delay_s`` and idle partitions stop holding the watermark back;
* replay (``consumers.tools.backtest``): :class:`EventClock`, the join's watermark in seconds, so a replay makes
  the same batches however fast it runs and never waits.

The flow, per record::

    decode_record(value) -> ingest(events, source)   bad events come back (dead letters); good ones -> join
    train_ready()        -> join.emit() -> MiniBatcher -> LearnerPort.submit -> answers -> metrics, ledger
    flush()              -> end of a finite stream: every pending impression and waiting sample is trained

The learner is reached through a :class:`LearnerPort` (submit a batch, collect answers in order):
:class:`InProcessLearner` trains at once in this process; the learner process
(``consumers.runtime.learner_process.RemoteLearner``) trains in a child while this process ingests. The
pipeline never asks which one it has. Each batch is scored before it is learnt (``Learner.step`` returns the
predictions made before the update), so the metrics are prequential. Kafka, checkpoint files, publication and
signals stay in the daemon.

>>> from consumers.core.batching import MiniBatcher
>>> from consumers.core.join import AttributionJoin, JoinConfig
>>> from models.config import ModelConfig
>>> from models.learner import Learner
>>> from streamer.events import encode
>>> learner = Learner(ModelConfig(tasks=("click",), rung="mtl", embedding_dim=4, hidden_dims=(8,), tower_dims=(4,)))
>>> pipeline = Pipeline(InProcessLearner(learner, ("click",)), AttributionJoin(JoinConfig({"click": 1.0})),
...                     MiniBatcher(2, 5.0), tasks=("click",), clock=None)
>>> for i in range(3):
...     impression = encode({"v": 1, "impression_id": f"i{i}", "ts_ms": 1000 * i, "user_id": "u", "item_id": "a",
...                          "features": {}})
...     _ = pipeline.ingest(decode_record(impression), ("impressions", 0))
>>> pipeline.train_ready(), pipeline.trained_samples, pipeline.flush(), pipeline.trained_samples
(0, 0, 3, 3)
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from consumers.core.batching import MiniBatcher
from consumers.core.join import AttributionJoin, JoinedSample
from models.features import Batch, batch_from_columns, encode_columns, encode_rows
from streamer.events import EventError, decode_events  # per record: imported once here, not in the hot path

Source = Hashable
BatchHook = Callable[
    ["list[JoinedSample]", "dict[str, np.ndarray]", "dict[str, np.ndarray]", "list[tuple[str, str]]"], None
]


# --------------------------------------------------------------------------------------- the learner port


@dataclass
class Answer:
    """A trained batch: labels (int8 [n, tasks]), the predictions made before the update (float32 [n, tasks]),
    the seconds the step took (encode + step), its losses, and the learner's step count after it."""

    labels: np.ndarray
    scores: np.ndarray
    seconds: float
    losses: Mapping[str, float]
    steps: int


class LearnerPort(Protocol):
    """Where the pipeline's batches are trained: answers come back in the order batches were submitted.

    ``submit(samples, context)`` hands over one batch of ``JoinedSample``; ``answers(wait)`` yields
    ``(context, Answer)`` for every batch answered so far (``wait=True``: for every batch submitted);
    ``in_flight`` counts batches submitted and not yet handed back; ``steps`` is the step count of the last
    batch handed back; ``check_alive`` raises when the learner can no longer answer; ``close`` stops it.
    """

    steps: int

    @property
    def in_flight(self) -> int: ...

    def submit(self, samples: list[JoinedSample], context: Any) -> None: ...

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Answer]]: ...

    def check_alive(self) -> None: ...

    def close(self) -> None: ...


def sample_row(sample: JoinedSample) -> list[Any]:
    """The part of a joined sample the learner needs, compact for a pipe: ``[user_id, item_id, features, labels]``."""
    impression = sample.impression
    return [impression["user_id"], impression["item_id"], impression.get("features") or {}, sample.labels]


class SampleColumns(Sequence[JoinedSample]):
    """A batch of joined samples held as three columns, impression ids, users and event times (ms), instead of
    :class:`JoinedSample` objects: what an intake replay (``consumers.tools.backtest``) trains, its features and
    labels already encoded by the intake process. ``Pipeline`` and a backtest's ``on_batch`` read the columns
    (:func:`sample_columns`); anything that iterates gets ``JoinedSample`` objects with those three fields.
    ``user_codes``: the users as :class:`UserCodes` codes, where the sender coded them.

    >>> batch = SampleColumns(["i1", "i2"], ["u1", "u2"], [10, 20])
    >>> len(batch), batch[1].impression, sample_columns(batch)[1]
    (2, {'impression_id': 'i2', 'user_id': 'u2', 'ts_ms': 20}, ['u1', 'u2'])
    """

    __slots__ = ("ids", "users", "ts_ms", "user_codes")

    def __init__(self, ids: list[str], users: list[str], ts_ms: list[int],
                 user_codes: np.ndarray | None = None) -> None:
        if not len(ids) == len(users) == len(ts_ms) == (len(ids) if user_codes is None else len(user_codes)):
            raise ValueError(f"columns differ in length: {len(ids)} ids, {len(users)} users, {len(ts_ms)} times"
                             + ("" if user_codes is None else f", {len(user_codes)} user codes"))
        self.ids, self.users, self.ts_ms, self.user_codes = ids, users, ts_ms, user_codes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        impression = {"impression_id": self.ids[index], "user_id": self.users[index], "ts_ms": self.ts_ms[index]}
        return JoinedSample(impression, {}, None, "")


class UserCodes:
    """Small integer codes for users (int32), in order of first appearance: per-user metrics over a long replay
    keep 4 bytes a sample instead of a string. Calling it codes a batch's users, new ones first.

    >>> codes = UserCodes()
    >>> codes(["b", "a", "b"]).tolist(), codes(["c", "a"]).tolist(), len(codes)
    ([0, 1, 0], [2, 1], 3)
    """

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, users: Sequence[Any]) -> np.ndarray:
        index = self.index
        new = [user for user in dict.fromkeys(users) if user not in index]
        index.update(zip(new, range(len(index), len(index) + len(new))))
        return np.fromiter(map(index.__getitem__, users), dtype=np.int32, count=len(users))


def sample_column(samples: Sequence[JoinedSample], key: str) -> list[Any]:
    """One of a batch's columns, ``"impression_id"``, ``"user_id"`` or ``"ts_ms"``: a :class:`SampleColumns`' own
    list, or read from each sample's impression (only that one: the live trainer's batches are lists)."""
    if isinstance(samples, SampleColumns):
        return {"impression_id": samples.ids, "user_id": samples.users, "ts_ms": samples.ts_ms}[key]
    return [s.impression[key] for s in samples]


def sample_columns(samples: Sequence[JoinedSample]) -> tuple[list[str], list[Any], list[int]]:
    """A batch's impression ids, users and event times (ms) (:func:`sample_column`)."""
    return (sample_column(samples, "impression_id"), sample_column(samples, "user_id"),
            sample_column(samples, "ts_ms"))


def _topic(source: Source) -> str:
    """The topic of a record's source: (topic, partition) live, or a name."""
    return source[0] if isinstance(source, tuple) else str(source)


def training_rows(samples: Sequence[JoinedSample]) -> list[dict[str, Any]]:
    """Joined samples as ``train_rows`` takes them: ``{"user_id", "item_id", "features", "labels"}``."""
    return [{"user_id": s.impression["user_id"], "item_id": s.impression["item_id"],
             "features": s.impression.get("features") or {}, "labels": s.labels} for s in samples]


def encode_samples(samples: Sequence[JoinedSample], spec: Any, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """``encode_columns`` of joined samples: ``encode_rows(training_rows(samples), ...)``'s arrays, bit for bit,
    without a row dict per sample (the impressions are the rows, their labels beside them)."""
    return encode_columns([s.impression for s in samples], spec, tasks, [s.labels for s in samples])


def train_rows(learner: Any, rows: Sequence[Mapping[str, Any]], tasks: tuple[str, ...]) -> Answer:
    """``encode_rows`` + one ``Learner.step`` on rows ``{"user_id", "item_id", "features", "labels"}``: the one
    training call, in this process or in a learner process."""
    started = time.perf_counter()
    return train_encoded(learner, encode_rows(rows, learner.config.features, tasks), tasks, started)


def train_encoded(learner: Any, batch: Batch, tasks: tuple[str, ...], started: float) -> Answer:
    """One ``Learner.step`` on an encoded batch; the answer's seconds count from ``started`` (before encoding)."""
    return answer_of(learner.step(batch), batch, tasks, started, int(learner.steps))


def answer_of(result: tuple[Mapping[str, float], Mapping[str, Any]], batch: Batch, tasks: tuple[str, ...],
              started: float, steps: int) -> Answer:
    """The :class:`Answer` of a step's (losses, predictions) on ``batch`` (on the host), ``steps`` after it: the
    labels and scores of the tasks it predicts (a counted task, ``models.config.ModelConfig.counted_tasks``, is an
    input of the model and predicts nothing; the labels of ``tasks`` go in, those of ``learnt_tasks`` come out)."""
    losses, predictions = result
    seconds = time.perf_counter() - started
    labels = batch.labels.numpy().astype(np.int8)
    scored = [k for k, task in enumerate(tasks) if task in predictions]
    if len(scored) != len(tasks):
        labels = labels[:, scored]
    scores = np.stack([predictions[tasks[k]].numpy() for k in scored], axis=1).astype(np.float32)
    return Answer(labels, scores, seconds, {k: float(v) for k, v in losses.items()}, steps)


class InProcessLearner:
    """A :class:`LearnerPort` over a learner in this process: ``submit`` trains at once.

    ``learner`` is a ``models.learner.Learner`` (or anything with its verbs: ``step``, ``steps``, ``config``).
    ``encode``: how a batch of samples becomes tensors (default ``encode_samples`` with the
    learner's features); a backtest gives configurations with the same features and batches one shared
    encoding (``consumers.tools.backtest.SharedEncoding``). ``read_behind`` (default: where the learner is on a
    GPU): each step is issued with ``Learner.step_async`` and answered once the device has finished it or the
    next step is issued, so the host never waits for the step it just issued (``answers(wait=True)`` waits).
    """

    def __init__(self, learner: Any, tasks: Sequence[str],
                 encode: Callable[[list[JoinedSample]], Batch] | None = None, read_behind: bool | None = None) -> None:
        self.learner = learner
        self.tasks = tuple(tasks)
        self.encode = encode
        self._answered: deque[tuple[Any, Answer]] = deque()
        if read_behind is None:
            read_behind = getattr(getattr(learner, "device", None), "type", "cpu") == "cuda"
        self.read_behind = read_behind
        self._issued: deque[tuple[Any, Any, Batch, float, int]] = deque()  # (context, pending, batch, started, steps)

    @property
    def steps(self) -> int:
        return int(self.learner.steps) - len(self._issued)

    @property
    def in_flight(self) -> int:
        return len(self._answered) + len(self._issued)

    def submit(self, samples: list[JoinedSample], context: Any) -> None:
        started = time.perf_counter()
        if self.encode is None:
            batch = batch_from_columns(encode_samples(samples, self.learner.config.features, self.tasks), self.tasks)
        else:
            batch = self.encode(samples)
        if self.read_behind:
            pending = self.learner.step_async(batch)
            self._issued.append((context, pending, batch, started, int(self.learner.steps)))
            return
        answer = train_encoded(self.learner, batch, self.tasks, started)
        self._answered.append((context, answer))

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Answer]]:
        while self._answered:
            yield self._answered.popleft()
        # issued steps in order: all when waiting, else those behind the newest and any the device has finished
        while self._issued and (wait or len(self._issued) > 1 or self._issued[0][1].done()):
            context, pending, batch, started, steps = self._issued.popleft()
            yield context, answer_of(pending.result(), batch, self.tasks, started, steps)

    def check_alive(self) -> None:
        """Always alive: it runs in this process."""

    def close(self) -> None:
        """Nothing to stop."""


class PipelineMetrics(Protocol):
    """What the pipeline reports (``consumers.runtime.telemetry.TrainerMetrics`` implements it)."""

    def events_consumed(self, topic: str, n: int) -> None: ...

    def dead_letter(self, reason: str) -> None: ...

    def samples_emitted(self, n: int) -> None: ...

    def counted_positives(self, task: str, n: int) -> None: ...

    def batch_trained(self, size: int, step_seconds: float) -> None: ...

    def record_learner(self, losses: Mapping[str, float]) -> None: ...

    def observe(self, labels: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray], role: str = "student",
                users: Any = None) -> list[tuple[str, str]]: ...

    def join_counters(self, counters: Mapping[str, int]) -> None: ...

    def watermark(self, watermark_ms: int | None) -> None: ...


class NoMetrics:
    """A :class:`PipelineMetrics` that records nothing (doctests, tools that read the pipeline's own counts)."""

    def events_consumed(self, topic: str, n: int) -> None: pass
    def dead_letter(self, reason: str) -> None: pass
    def samples_emitted(self, n: int) -> None: pass
    def counted_positives(self, task: str, n: int) -> None: pass
    def batch_trained(self, size: int, step_seconds: float) -> None: pass
    def record_learner(self, losses: Mapping[str, float]) -> None: pass
    def join_counters(self, counters: Mapping[str, int]) -> None: pass
    def watermark(self, watermark_ms: int | None) -> None: pass

    def observe(self, labels: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray], role: str = "student",
                users: Any = None) -> list[tuple[str, str]]:
        return []


# -------------------------------------------------------------------------------------------- helpers


def decode_record(value: Any, not_after_ms: int | None = None) -> list[dict | EventError]:
    """``streamer.events.decode_events`` of one message value; a tombstone (None) is a bad message like any other.
    ``not_after_ms``: an event stamped later is bad (reason ``future``): the live trainer's wall clock plus
    ``join.max_future_s`` (``future_bound_ms``)."""
    return decode_events(value if value is not None else b"", not_after_ms=not_after_ms)


def future_bound_ms(max_future_s: float, wall_s: float) -> int | None:
    """The latest event time a live trainer accepts at wall-clock time ``wall_s`` (``time.time()``), or None
    for no bound (``max_future_s`` 0).

    One producer whose clock runs far ahead would otherwise move its partition's event-time clock, and so the
    watermark, to its time: every pending impression's windows would close at once and be trained without their
    labels, and every later feedback and impression would be late until real time caught up. A replay has no
    wall clock (its results must not depend on when it runs): one of an event log applies no bound, one of a Kafka
    topic range bounds each event by its record's Kafka timestamp instead, as the trainer that read the record then
    would have (``crossdistil backtest``, docs/backtest.md).

    >>> future_bound_ms(3600, 1_700_000_000.25), future_bound_ms(0, 1_700_000_000.25)
    (1700003600250, None)
    """
    return int((wall_s + max_future_s) * 1000) if max_future_s > 0 else None


def rebase_join_clock(join_state: dict[str, Any], now: float) -> dict[str, Any]:
    """A restored join state whose wall-clock fields are reset to ``now`` (another process, another clock).

    Without it every partition would look idle right after a restart (its last activity is as old as the
    downtime) and the watermark could skip ahead of partitions that simply have not been fetched yet.
    """
    state = dict(join_state)
    state["now"] = now
    state["sources"] = [[source, max_ts, now, False] for source, max_ts, _last, _idle in state["sources"]]
    return state


class EventClock:
    """The replay clock: the join's watermark in seconds (0.0 before the first event). Never waits on the wall."""

    def __init__(self) -> None:
        self.join: AttributionJoin | None = None

    def __call__(self) -> float:
        watermark = self.join.watermark_ms if self.join is not None else None
        return 0.0 if watermark is None else watermark / 1000.0


# ------------------------------------------------------------------------------------------ the pipeline


class Pipeline:
    """Join + mini-batcher + learner port + metrics, driven by one injected clock.

    ``clock``: a zero-argument callable giving seconds (``time.monotonic`` live); ``None`` or an unbound
    :class:`EventClock` is the replay clock, bound to this pipeline's join. Every method that needs the time takes
    an optional ``now`` and asks the clock when it is not given (the live loop passes the time of its poll, so one
    poll uses one instant). ``metrics``: a :class:`PipelineMetrics` (``TrainerMetrics``; :class:`NoMetrics` by
    default). ``ledger``: an optional ``consumers.state.ledger.Ledger`` that receives every trained sample with its
    prequential predictions. ``on_batch(samples, labels, scores, fired)`` is called after every training step
    (scores made before the update; fired = drift detections of this batch); ``on_emitted(n, now)`` when the join
    hands ``n`` samples to the batcher. ``metrics_users``: hand each batch's users to the metrics (their per-user
    AUC, GAUC); a backtest, which shows no GAUC, leaves them out.
    """

    def __init__(
        self,
        learner: LearnerPort,
        join: AttributionJoin,
        batcher: MiniBatcher[JoinedSample],
        *,
        tasks: Sequence[str],
        clock: Callable[[], float] | None = time.monotonic,
        metrics: PipelineMetrics | None = None,
        ledger: Any = None,
        on_batch: BatchHook | None = None,
        on_emitted: Callable[[int, float], None] | None = None,
        metrics_users: bool = True,
        scored_tasks: Sequence[str] | None = None,
    ) -> None:
        self.tasks: tuple[str, ...] = tuple(tasks)
        # the tasks the learner predicts, so those of its answers, metrics and ledger: ``tasks`` less the counted
        # ones (models.config.ModelConfig.counted_tasks), whose labels the model only counts
        self.scored_tasks: tuple[str, ...] = tuple(scored_tasks) if scored_tasks is not None else self.tasks
        self.counted_tasks = tuple(t for t in self.tasks if t not in self.scored_tasks)  # their positives are counted
        if clock is None:
            clock = EventClock()
        if isinstance(clock, EventClock) and clock.join is None:
            clock.join = join  # the replay clock reads this pipeline's watermark
        self.clock: Callable[[], float] = clock
        self.learner = learner
        self.join = join
        self.batcher = batcher
        self.metrics: PipelineMetrics = metrics if metrics is not None else NoMetrics()
        self.ledger = ledger
        self.on_batch = on_batch
        self.on_emitted = on_emitted
        self.metrics_users = metrics_users
        self.trained_samples = 0
        self.last_step_s = 0.0  # seconds the last training step took (encode + step), wherever it ran
        self.last_batch_s = 0.0  # seconds from handing the last batch to the learner to its metrics being done
        self.dead_letters = 0
        self.events_ingested = 0
        # The learner's step count after the first answer whose total loss was NaN or infinite since the owner last
        # took it (None: none): the trainer checks its model at once instead of at the next scheduled checkpoint.
        self.non_finite_loss_step: int | None = None

    # -------------------------------------------------------------------------------------------- input

    def ingest(self, events: Sequence[dict | EventError], source: Source, now: float | None = None) -> list[EventError]:
        """Feed one record's decoded events (``decode_record``) from ``source`` = (topic, partition) to the join.

        Returns the bad ones (``EventError``), already counted; the caller dead-letters them (live) or not.
        """
        now = self.clock() if now is None else now
        good, bad = self._counted_bad(events)
        self.join.add_events(good, source, now)
        self.metrics.events_consumed(_topic(source), len(events))
        self.events_ingested += len(events)
        return bad

    def ingest_each(self, messages: Sequence[tuple[Sequence[dict | EventError], Source]]) -> list[EventError]:
        """``ingest`` of each ``(events, source)`` in turn, each its own message for the join at the clock's time
        before it: a replay's run of records, with the per-record bookkeeping of ``ingest`` paid once (the
        consumed-events metric is added per topic at the end). Returns the bad events, already counted.
        """
        join, clock = self.join, self.clock
        consumed: dict[str, int] = {}
        bad: list[EventError] = []
        ingested = 0
        for events, source in messages:
            n = len(events)  # bad events count as consumed, as in ingest
            good, errors = self._counted_bad(events)
            bad += errors
            join.add_events(good, source, clock())
            topic = _topic(source)
            consumed[topic] = consumed.get(topic, 0) + n
            ingested += n
        for topic, n in consumed.items():
            self.metrics.events_consumed(topic, n)
        self.events_ingested += ingested
        return bad

    def _counted_bad(self, events: Sequence[dict | EventError]) -> tuple[Sequence[dict], list[EventError]]:
        """A record's good events and its bad ones (``EventError``), the bad counted as dead letters."""
        if (len(events) == 1 and type(events[0]) is dict) or all(type(event) is dict for event in events):
            return events, []  # type: ignore[return-value]  # the common case: one good event, or all good
        bad = [event for event in events if isinstance(event, EventError)]
        for error in bad:
            self.dead_letters += 1
            self.metrics.dead_letter(str(error.reason or "invalid"))
        return [event for event in events if not isinstance(event, EventError)], bad

    def tick(self, now: float | None = None) -> None:
        """Advance the join's clock (live: once per poll while caught up, so idle partitions can time out)."""
        self.join.tick(self.clock() if now is None else now)

    # ----------------------------------------------------------------------------------------- training

    def train_ready(self, now: float | None = None, lead_s: float = 0.0) -> int:
        """Train what is ready: samples the join emitted, full batches, and batches overdue on the clock
        (``lead_s`` early: ``MiniBatcher.poll``).

        Returns the number of samples trained (answered) by this call.
        """
        now = self.clock() if now is None else now
        before = self.trained_samples
        self._add_samples(self.join.emit(), now)
        for batch in self.batcher.poll(now, lead_s):
            self.train_batch(batch)
        self.collect()
        self.metrics.join_counters(self.join.counters)
        self.metrics.watermark(self.join.watermark_ms)
        return self.trained_samples - before

    def flush(self, now: float | None = None) -> int:
        """End of a finite stream: emit every pending impression (with the labels it has) and train everything.

        Returns the number of samples trained by this call.
        """
        now = self.clock() if now is None else now
        before = self.trained_samples
        self._add_samples(self.join.flush(), now)
        for batch in self.batcher.flush():
            self.train_batch(batch)
        self.collect(wait=True)
        self.metrics.join_counters(self.join.counters)
        self.metrics.watermark(self.join.watermark_ms)
        return self.trained_samples - before

    def cut_partial(self) -> None:
        """Hand the waiting partial batch to the learner now (several ranks step together: a rank's partial batch
        joins the others' full ones, so the ranks' step is about one trainer's batch)."""
        for batch in self.batcher.flush():
            self.train_batch(batch)

    def _add_samples(self, samples: list[JoinedSample], now: float) -> None:
        if samples:
            self.metrics.samples_emitted(len(samples))
            for task in self.counted_tasks:  # no prediction shows their labels: their positives do (few tasks, if any)
                self.metrics.counted_positives(task, sum(1 for s in samples if s.labels[task]))
            if self.on_emitted is not None:
                self.on_emitted(len(samples), now)
        for batch in self.batcher.add_many(samples, now):
            self.train_batch(batch)

    def train_batch(self, samples: list[JoinedSample]) -> None:
        """Score first, then one teacher-student step; predictions feed the metrics, the ledger and ``on_batch``
        once the learner answers (at once in process; in submission order from a learner process)."""
        self.learner.submit(samples, (samples, time.perf_counter()))
        self.collect()

    def collect(self, wait: bool = False) -> int:
        """Hand the batches the learner has answered (``wait``: every batch submitted) to the metrics, the
        ledger and ``on_batch``; returns their samples."""
        done = 0
        for (samples, submitted_at), answer in self.learner.answers(wait):
            self._trained(samples, answer)
            self.last_batch_s = time.perf_counter() - submitted_at  # with its wait behind the batches before it
            done += len(samples)
        return done

    def _trained(self, samples: list[JoinedSample], answer: Answer) -> None:
        """One answered batch to the metrics, the ledger and ``on_batch``."""
        self.last_step_s = answer.seconds
        labels = {task: answer.labels[:, k] for k, task in enumerate(self.scored_tasks)}
        scores = {task: answer.scores[:, k] for k, task in enumerate(self.scored_tasks)}
        users = np.array(sample_column(samples, "user_id"), dtype=object) if self.metrics_users else None
        self.metrics.batch_trained(len(samples), answer.seconds)
        self.metrics.record_learner(answer.losses)
        if self.non_finite_loss_step is None and not math.isfinite(answer.losses.get("total", 0.0)):
            self.non_finite_loss_step = answer.steps
        fired = self.metrics.observe(labels, scores, role="student", users=users)
        if self.ledger is not None:
            self.ledger.add(sample_column(samples, "impression_id"), labels, scores)
        self.trained_samples += len(samples)
        if self.on_batch is not None:
            self.on_batch(samples, labels, scores, fired)

    # -------------------------------------------------------------------------------------------- state

    def stream_state(self) -> dict[str, Any]:
        """Join and batcher state and the trained-sample count (plain values): the checkpoint's stream side
        (the learner's side is the learner's own). Call ``collect(wait=True)`` first so the count matches it."""
        return {
            "join_state": self.join.state_dict(),
            "batcher_state": self.batcher.state_dict(JoinedSample.to_plain),
            "trained_samples": self.trained_samples,
        }

    def load_stream_state(self, state: Mapping[str, Any], now: float | None = None) -> None:
        """Restore ``stream_state()`` output written by another process: clock-valued fields are rebased to ``now``.

        The join's per-source activity times and the batcher's wait belong to the writer's clock; without the
        rebase every partition would look idle right after a restart and a partial batch would be overdue.
        """
        now = self.clock() if now is None else now
        self.join.load_state_dict(rebase_join_clock(state["join_state"], now))
        batcher_state = dict(state["batcher_state"])
        batcher_state["oldest_at"] = now  # restart the wait
        self.batcher.load_state_dict(batcher_state, JoinedSample.from_plain)
        self.trained_samples = int(state.get("trained_samples", 0))

    def close(self) -> None:
        """Stop the learner (a learner process; its answers not collected by then are dropped)."""
        self.learner.close()
