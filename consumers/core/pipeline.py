"""The trainer's pure core: decoded events in, join -> mini-batches -> score, then update -> metrics.

One code path for the live daemon and the backtest. Both build a :class:`Pipeline` and call the same
methods; the only differences are where the bytes come from (Kafka records or an event-log file) and which
clock the pipeline is given:

* live (``consumers.trainer.daemon``): the wall clock, ``time.monotonic``, so a quiet stream still trains within
  ``max_batch_delay_s`` and idle partitions stop holding the watermark back;
* replay (``consumers.tools.backtest``): :class:`EventClock`, the join's watermark in seconds, so a replay makes the
  same batches however fast it runs and never waits.

The flow, per record::

    decode_record(value) -> ingest(events, source)   bad events come back (dead letters); good ones -> join
    train_ready()        -> join.emit() -> MiniBatcher -> encode_rows -> Learner.step -> TrainerMetrics.observe
    flush()              -> end of a finite stream: every pending impression and waiting sample is trained

Each batch is scored before it is learnt (``Learner.step`` returns the predictions made before the update),
so the metrics are prequential. Kafka, checkpoint files, publication and signals stay in the daemon.

>>> from consumers.runtime.config import load_config
>>> from streamer.events import encode
>>> cfg = load_config(None, env={}, overrides=["model.tasks=['click']", "join.attribution_window_s={click = 1}",
...                                    "batching.batch_size=2", "model.options={rung = 'mtl', embedding_dim = 4, hidden_dims = [8], tower_dims = [4]}"])
>>> pipeline = Pipeline(cfg, clock=None)
>>> for i in range(3):
...     impression = encode({"v": 1, "impression_id": f"i{i}", "ts_ms": 1000 * i, "user_id": "u", "item_id": "a", "features": {}})
...     _ = pipeline.ingest(decode_record(impression), ("impressions", 0))
>>> pipeline.train_ready(), pipeline.trained_samples, pipeline.flush(), pipeline.trained_samples
(0, 0, 3, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from streamer.events import EventError, decode_events  # per record: imported once here, not in the hot path

if TYPE_CHECKING:
    import numpy as np

    from consumers.runtime.config import Config
    from consumers.core.join import JoinConfig, JoinedSample
    from consumers.runtime.learner_process import RemoteLearner
    from consumers.state.ledger import Ledger
    from consumers.runtime.telemetry import TrainerMetrics

Source = Hashable
BatchHook = Callable[["list[JoinedSample]", "dict[str, np.ndarray]", "dict[str, np.ndarray]", "list[tuple[str, str]]"], None]


def model_config(cfg: Config):
    """The ``models.config.ModelConfig`` described by the ``[model]`` section."""
    from models.config import ModelConfig

    options = dict(cfg.model.options)
    options.setdefault("seed", cfg.model.seed)
    return ModelConfig(tasks=tuple(cfg.model.tasks), **options)


def make_learner(cfg: Config) -> Any:
    """The learner of the ``[model]`` section: CrossDistil at any rung of the ladder, or, with
    ``options.rung = "river_lr"`` or ``"river_fm"``, the river online baseline over the same hashed features
    (river options as ``"river.KEY" = value`` in ``[model.options]``; river learns on the CPU)."""
    from models.river_baseline import RIVER_CONFIGS

    rung = cfg.model.options.get("rung")
    if rung not in RIVER_CONFIGS:
        from models.learner import Learner

        return Learner(model_config(cfg), device=cfg.model.device)
    from models.features import FeatureSpec
    from models.river_baseline import config_for, make_learner as make_river_learner

    features = cfg.model.options.get("features")
    spec = FeatureSpec.from_dict(features) if isinstance(features, Mapping) else FeatureSpec()
    river_options = {k.removeprefix("river."): v for k, v in cfg.model.options.items() if k.startswith("river.")}
    return make_river_learner(config_for(rung, cfg.model.tasks, spec, cfg.model.seed, **river_options))


def join_config(cfg: Config, *, live: bool = True) -> JoinConfig:
    """The ``consumers.core.join.JoinConfig`` of the ``[join]`` section.

    Live (``live=True``): ``wait_for_all_partitions``, because a partition the consumer has not fetched yet
    must hold the watermark back, or the first partition fetched would race ahead in event time and make every
    other partition's feedback late; idle partitions time out on the wall clock (``idle_timeout_s``).

    Replay (``live=False``): there is no wall clock, so no source is ever idle, and sources appear with their
    first event (an event log does not list its partitions up front). Windows, lateness and bounds are the same.
    """
    from consumers.core.join import JoinConfig

    windows = {task: float(cfg.join.attribution_window_s.get(task, cfg.join.default_window_s)) for task in cfg.model.tasks}
    return JoinConfig(
        attribution_window_s=windows,
        allowed_lateness_s=cfg.join.allowed_lateness_s,
        max_pending=cfg.join.max_pending,
        idle_timeout_s=(cfg.join.idle_timeout_s or None) if live else None,
        wait_for_all_partitions=live,
    )


def train_rows(learner: Any, rows: Sequence[Mapping[str, Any]], tasks: tuple[str, ...]) -> tuple[
        np.ndarray, np.ndarray, float, dict[str, float]]:
    """``encode_rows`` + one ``Learner.step`` on ``rows`` (``{"user_id", "item_id", "features", "labels"}``).

    Returns labels (int8, [n, tasks]), the predictions made before the update (float32, [n, tasks]), the
    seconds it took and the losses. The one training call, in this process or in a learner process.
    """
    import numpy as np

    from models.features import encode_rows

    started = time.perf_counter()
    batch = encode_rows(rows, learner.config.features, tasks)
    losses, predictions = learner.step(batch)
    seconds = time.perf_counter() - started
    labels = batch.labels.numpy().astype(np.int8)
    scores = np.stack([predictions[task].numpy() for task in tasks], axis=1).astype(np.float32)
    return labels, scores, seconds, {k: float(v) for k, v in losses.items()}


GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Set the collector up for a process that turns millions of small events into samples (trainer, backtest).

    Every event allocates a handful of dicts and lists, and with CPython's default (a young-generation
    collection every 700 net allocations) the collector keeps tracing objects that reference counting frees
    anyway: ``bench/pipeline_stages.py`` measured the trainer's core 1.4x faster with a threshold of 50,000
    (median of seven rounds). Reference cycles, which only the collector frees, just wait longer.
    Process-wide; the serving daemon keeps the default.
    """
    import gc

    gc.set_threshold(*GC_THRESHOLDS)


def decode_record(value: Any) -> list[dict | EventError]:
    """``streamer.events.decode_events`` of one message value; a tombstone (None) is a bad message like any other."""
    return decode_events(value if value is not None else b"")


class EventClock:
    """The replay clock: the join's watermark in seconds (0.0 before the first event). Never waits on the wall."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None

    def __call__(self) -> float:
        join = self.pipeline.join if self.pipeline is not None else None
        watermark = join.watermark_ms if join is not None else None
        return 0.0 if watermark is None else watermark / 1000.0


class Pipeline:
    """Join + mini-batcher + learner + metrics, driven by one injected clock.

    ``clock``: a zero-argument callable giving seconds (``time.monotonic`` live); ``None`` means
    :class:`EventClock`, the replay clock. Every method that needs the time takes an optional ``now`` and asks
    the clock when it is not given (the live loop passes the time of its poll, so one poll uses one instant).
    ``metrics``: a ``TrainerMetrics`` (a fresh one on its own registry by default). ``ledger``: an optional
    ``consumers.state.ledger.Ledger`` that receives every trained sample with its prequential predictions.
    ``on_batch(samples, labels, scores, fired)`` is called after every training step (scores made before the
    update; fired = drift detections of this batch); ``on_emitted(n, now)`` when the join hands ``n`` samples to
    the batcher.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] | None = time.monotonic,
        join: JoinConfig | None = None,
        metrics: TrainerMetrics | None = None,
        ledger: Ledger | None = None,
        on_batch: BatchHook | None = None,
        on_emitted: Callable[[int, float], None] | None = None,
    ) -> None:
        from consumers.core.batching import MiniBatcher
        from consumers.core.join import AttributionJoin
        from consumers.runtime.telemetry import TrainerMetrics
        self.cfg = cfg
        self.tasks: tuple[str, ...] = tuple(cfg.model.tasks)
        if clock is None:
            clock = EventClock()
            clock.pipeline = self
        self.clock: Callable[[], float] = clock
        # model.separate_process: a RemoteLearner (consumers.runtime.learner_process) trains while this process ingests.
        self.remote: RemoteLearner | None = None
        if cfg.model.separate_process:
            from consumers.runtime.learner_process import RemoteLearner

            self.learner = self.remote = RemoteLearner(cfg)
        else:
            self.learner = make_learner(cfg)
        self.join = AttributionJoin(join if join is not None else join_config(cfg, live=not isinstance(clock, EventClock)))
        self.batcher: MiniBatcher[JoinedSample] = MiniBatcher(cfg.batching.batch_size, cfg.batching.max_batch_delay_s)
        self.metrics = metrics if metrics is not None else TrainerMetrics.from_config(cfg)
        self.ledger = ledger
        self.on_batch = on_batch
        self.on_emitted = on_emitted
        self.trained_samples = 0
        self.last_step_s = 0.0  # seconds the last training step took (encode + step), in this or the learner process
        self.last_batch_s = 0.0  # seconds from handing the last batch to the learner to its metrics being done
        self.dead_letters = 0
        self.events_ingested = 0
        self._topic_counters: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------- input

    def ingest(self, events: Sequence[dict | EventError], source: Source, now: float | None = None) -> list[EventError]:
        """Feed one record's decoded events (``decode_record``) from ``source`` = (topic, partition) to the join.

        Returns the bad ones (``EventError``), already counted; the caller dead-letters them (live) or not.
        """
        now = self.clock() if now is None else now
        bad: list[EventError] = [event for event in events if isinstance(event, EventError)]
        if bad:
            for error in bad:
                self.dead_letters += 1
                self.metrics.dead_letter(str(error.reason or "invalid"))
            self.join.add_events([event for event in events if not isinstance(event, EventError)], source, now)
        else:
            self.join.add_events(events, source, now)  # type: ignore[arg-type]
        topic = source[0] if isinstance(source, tuple) else str(source)
        counter = self._topic_counters.get(topic)
        if counter is None:  # label lookups cost microseconds each; keep the children
            counter = self._topic_counters[topic] = self.metrics.events_consumed_total.labels(topic)
        counter.inc(len(events))
        self.events_ingested += len(events)
        return bad

    def tick(self, now: float | None = None) -> None:
        """Advance the join's clock (live: once per poll while caught up, so idle partitions can time out)."""
        self.join.tick(self.clock() if now is None else now)

    # ----------------------------------------------------------------------------------------- training

    def train_ready(self, now: float | None = None, lead_s: float = 0.0) -> int:
        """Train what is ready: samples the join emitted, full batches, and batches overdue on the clock
        (``lead_s`` early: ``MiniBatcher.poll``).

        Returns the number of samples trained by this call.
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

    def _add_samples(self, samples: list[JoinedSample], now: float) -> None:
        if samples:
            self.metrics.samples_emitted(len(samples))
            if self.on_emitted is not None:
                self.on_emitted(len(samples), now)
        for batch in self.batcher.add_many(samples, now):
            self.train_batch(batch)

    def train_batch(self, samples: list[JoinedSample]) -> None:
        """Score first, then one teacher-student step; predictions feed the metrics, the ledger and ``on_batch``.

        With a learner process the batch is sent and this returns at once; its predictions are handled when
        its answer comes back (``collect``), in the order batches were sent.
        """
        if self.remote is not None:
            from consumers.runtime.learner_process import sample_row

            self.remote.submit([sample_row(s) for s in samples], (samples, time.perf_counter()))
            self.collect()
            return
        started = time.perf_counter()
        rows = [{"user_id": s.impression["user_id"], "item_id": s.impression["item_id"],
                 "features": s.impression.get("features") or {}, "labels": s.labels} for s in samples]
        labels, scores, seconds, losses = train_rows(self.learner, rows, self.tasks)
        self._trained(samples, labels, scores, seconds, losses)
        self.last_batch_s = time.perf_counter() - started

    def collect(self, wait: bool = False) -> int:
        """Learner process: hand the batches it has answered (``wait``: every batch sent) to the metrics, the
        ledger and ``on_batch``; returns their samples. Without one, every batch is handled as it trains: 0."""
        if self.remote is None:
            return 0
        import numpy as np

        done = 0
        width = len(self.tasks)
        for (samples, submitted_at), reply in self.remote.answers(wait):
            n = int(reply["n"])
            self._trained(samples, np.frombuffer(reply["labels"], dtype=np.int8).reshape(n, width),
                          np.frombuffer(reply["scores"], dtype=np.float32).reshape(n, width), float(reply["seconds"]),
                          reply.get("losses") or {})
            self.last_batch_s = time.perf_counter() - submitted_at  # with its wait behind the batches before it
            done += n
        return done

    def _trained(self, samples: list[JoinedSample], label_matrix: np.ndarray, score_matrix: np.ndarray,
                 seconds: float, losses: Mapping[str, float]) -> None:
        """A trained batch (``train_rows``' labels and scores, one column per task, and its losses) to the metrics,
        the ledger and ``on_batch``, whichever process trained it."""
        import numpy as np

        self.last_step_s = seconds
        labels = {task: label_matrix[:, k] for k, task in enumerate(self.tasks)}
        scores = {task: score_matrix[:, k] for k, task in enumerate(self.tasks)}
        users = np.array([s.impression["user_id"] for s in samples], dtype=object)
        self.metrics.batch_trained(len(samples), seconds)
        self.metrics.record_learner(losses)
        fired = self.metrics.observe(labels, scores, role="student", users=users)
        if self.ledger is not None:
            self.ledger.add([s.impression["impression_id"] for s in samples], labels, scores)
        self.trained_samples += len(samples)
        if self.on_batch is not None:
            self.on_batch(samples, labels, scores, fired)

    # -------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Learner (tensors inside), join and batcher state, counters: what a checkpoint must hold.

        In-process learner only; with a learner process the child writes the learner's part
        (``RemoteLearner.write_checkpoint``) next to ``stream_state()``.
        """
        if self.remote is not None:
            raise RuntimeError("the learner lives in another process: use stream_state() and "
                               "RemoteLearner.write_checkpoint")
        return {"learner": self.learner.state_dict(), **self.stream_state()}

    def stream_state(self) -> dict[str, Any]:
        """Join and batcher state and the trained-sample count (plain values): the checkpoint's stream side.

        Call ``collect(wait=True)`` first with a learner process, so that the count matches the model.
        """
        from consumers.core.join import JoinedSample

        return {
            "join_state": self.join.state_dict(),
            "batcher_state": self.batcher.state_dict(JoinedSample.to_plain),
            "trained_samples": self.trained_samples,
        }

    def close(self) -> None:
        """Stop the learner process, if there is one (its answers not collected by then are dropped)."""
        if self.remote is not None:
            self.remote.close()

    def load_state_dict(self, state: dict[str, Any], now: float | None = None) -> None:
        """Restore ``state_dict()`` output written by another process: clock-valued fields are rebased to ``now``.

        The join's per-source activity times and the batcher's wait belong to the writer's clock; without the
        rebase every partition would look idle right after a restart and a partial batch would be overdue.
        """
        from consumers.core.join import JoinedSample

        now = self.clock() if now is None else now
        if state.get("learner") is not None:  # None: a learner process loaded it from the file itself
            self.learner.load_state_dict(state["learner"])
        self.join.load_state_dict(rebase_join_clock(state["join_state"], now))
        batcher_state = dict(state["batcher_state"])
        batcher_state["oldest_at"] = now  # restart the wait
        self.batcher.load_state_dict(batcher_state, JoinedSample.from_plain)
        self.trained_samples = int(state.get("trained_samples", 0))


def rebase_join_clock(join_state: dict[str, Any], now: float) -> dict[str, Any]:
    """A restored join state whose wall-clock fields are reset to ``now`` (another process, another clock).

    Without it every partition would look idle right after a restart (its last activity is as old as the
    downtime) and the watermark could skip ahead of partitions that simply have not been fetched yet.
    """
    state = dict(join_state)
    state["now"] = now
    state["sources"] = [[source, max_ts, now, False] for source, max_ts, _last, _idle in state["sources"]]
    return state
