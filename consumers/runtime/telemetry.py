"""Every Prometheus metric of the trainer and serving daemons (served by ``consumers.runtime.httpd``).

One module defines all names (prefix ``crossdistil_``; counters end in ``_total``, durations in ``_seconds``;
labels ``task``, ``role``, ``window``, ``reference``, ``detector``, ``topic``, ``partition``, ``reason``,
``outcome`` — never a user or item id). docs/monitoring.md lists them with their meaning.

The trainer calls :class:`TrainerMetrics` from its loop; quality gauges (AUC per window, GAUC, log loss, ...)
are computed when Prometheus scrapes (or :meth:`TrainerMetrics.snapshot` is called), not on every batch, so
the per-batch cost is a few vectorised numpy copies plus the drift detectors (see bench/metrics_cost.py).

>>> import numpy as np
>>> m = TrainerMetrics(["click"], windows=(4,), baseline_window=8)
>>> fired = m.observe({"click": np.array([0, 1, 0, 1])}, {"click": np.array([0.2, 0.8, 0.3, 0.6])})
>>> m.snapshot()["click"]["student"]["auc"]["4"]
1.0
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from consumers.core.drift import AUC_DETECTOR, DETECTORS, AucDropDetector, LossDriftDetectors, per_sample_log_loss
from consumers.core.quality import StreamQuality, user_ids_of

PREFIX = "crossdistil"
ROLES: tuple[str, ...] = ("student", "teacher")

# Join counters (consumers.core.join.COUNTERS) exported as crossdistil_join_events_total{outcome=...}.
JOIN_OUTCOMES: tuple[str, ...] = (
    "impressions", "feedback", "emitted", "matched_feedback", "positive_labels", "early_feedback",
    "early_feedback_matched", "duplicate_impressions", "late_impressions", "late_feedback", "orphan_feedback",
    "outside_window_feedback", "unknown_task_feedback", "ignored_task_feedback", "evicted_impressions",
    "evicted_early_feedback",
)  # fmt: skip

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
IO_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Outcomes of a training step for a task's distillation (crossdistil_kd_gate_steps_total{task,outcome}).
KD_GATE_OUTCOMES: tuple[str, ...] = ("distilled", "skipped")

# Quality metrics exported per (task, role, window): name in StreamQuality.summary -> (metric name, help).
_QUALITY_GAUGES: dict[str, tuple[str, str]] = {
    "auc": ("auc", "ROC AUC of prequential predictions over the last `window` samples (exact), or the lifetime AUC "
                   "(window=\"lifetime\", 65,536-bin histogram)"),
    "gauc": ("gauc", "impression-weighted per-user AUC over the last `window` samples"),
    "log_loss": ("log_loss", "mean binary cross-entropy over the window"),
    "calibration_ratio": ("calibration_ratio", "mean prediction / mean label over the window (1 = calibrated, > 1 "
                                               "over-predicts)"),
    "positive_rate": ("positive_rate", "share of positive labels over the window"),
    "samples": ("window_samples", "samples the window currently covers (less than `window` until it fills)"),
}  # fmt: skip


def _to_numpy(values: Any) -> np.ndarray:
    """A 1-D float array from a numpy array, a list or a torch tensor (without importing torch)."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _plain(value: float | None) -> float | None:
    """A JSON/msgpack-friendly float: ``None`` for an undefined (NaN) value."""
    return None if value is None or math.isnan(value) else float(value)


class _QualityCollector:
    """Computes the per-(task, role) quality gauges at scrape time from the trainer's StreamQuality objects."""

    def __init__(self, owner: "TrainerMetrics") -> None:
        self._owner = owner

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Without describe(), registering would call collect() (and compute every metric) once.
        for name, help_text in _QUALITY_GAUGES.values():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["task", "role", "window"])
        yield GaugeMetricFamily(f"{PREFIX}_auc_drift", "", labels=["task", "role", "window", "reference"])
        yield GaugeMetricFamily(f"{PREFIX}_auc_reference", "", labels=["task", "role", "window", "reference"])

    def collect(self) -> Iterable[GaugeMetricFamily]:
        summaries, drift, references = self._owner._quality_state()
        families = {
            key: GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["task", "role", "window"])
            for key, (name, help_text) in _QUALITY_GAUGES.items()
        }
        for (task, role), summary in summaries.items():
            for key, values in summary.items():
                for window, value in values.items():
                    families[key].add_metric([task, role, window], value)
        drift_family = GaugeMetricFamily(
            f"{PREFIX}_auc_drift",
            "windowed AUC minus a reference: reference=\"published\" is the same window's AUC when the last "
            "checkpoint was published; reference=\"baseline\" is the AUC over the slow baseline window",
            labels=["task", "role", "window", "reference"],
        )
        reference_family = GaugeMetricFamily(
            f"{PREFIX}_auc_reference",
            "the reference AUC that crossdistil_auc_drift subtracts",
            labels=["task", "role", "window", "reference"],
        )
        for labels, value in drift.items():
            drift_family.add_metric(list(labels), value)
        for labels, value in references.items():
            reference_family.add_metric(list(labels), value)
        yield from families.values()
        yield drift_family
        yield reference_family


class TrainerMetrics:
    """The trainer's metrics: prequential quality per task and role, drift detectors, pipeline counters.

    ``windows`` are the sample windows of the windowed metrics. ``baseline_window`` (default ten times the
    largest window) is the slow window that AUC drift is also measured against; its values are recomputed once
    1 % of it is new (they lag by at most that much). ``drift_chunk`` averages that
    many consecutive per-sample losses before the loss drift detectors see them (cost; see consumers.core.drift);
    ``drift_options`` go to ``LossDriftDetectors`` and ``auc_drop_options`` to ``AucDropDetector``;
    ``drift_tasks`` are the tasks they watch (None: every task); ``counted_tasks`` the model only counts (their
    positives' series exist from the start).
    ``clock`` gives wall time in seconds (event-time lag, detection and checkpoint timestamps); a backtest can
    pass its own. Thread-safe: the trainer updates while the HTTP thread scrapes.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        windows: Sequence[int] = (10_000, 100_000),
        registry: CollectorRegistry | None = None,
        *,
        baseline_window: int | None = None,
        drift_role: str = "student",
        drift_chunk: int = 8,
        clock: Callable[[], float] = time.time,
        drift_options: Mapping[str, float] | None = None,
        auc_drop_options: Mapping[str, float] | None = None,
        drift_tasks: Sequence[str] | None = None,
        counted_tasks: Sequence[str] = (),
    ) -> None:
        if not tasks:
            raise ValueError("TrainerMetrics needs at least one task")
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.drift_tasks: tuple[str, ...] = tuple(drift_tasks) if drift_tasks else self.tasks
        self.counted_tasks: tuple[str, ...] = tuple(counted_tasks)  # their positives' counter series start at 0
        if set(self.drift_tasks) - set(self.tasks):
            raise ValueError(f"drift_tasks {sorted(set(self.drift_tasks) - set(self.tasks))} are not among the tasks "
                             f"{list(self.tasks)}")
        self.windows: tuple[int, ...] = tuple(sorted({int(w) for w in windows}))
        if not self.windows or self.windows[0] < 1:
            raise ValueError(f"windows must be positive sample counts, got {list(windows)}")
        self.baseline_window = int(baseline_window or 10 * self.windows[-1])
        if self.baseline_window <= self.windows[-1]:
            raise ValueError(
                f"baseline_window ({self.baseline_window}) must be longer than the largest window ({self.windows[-1]})"
            )
        self.registry = registry if registry is not None else CollectorRegistry()
        self.drift_role = drift_role
        self._clock = clock
        self._lock = threading.Lock()
        self._quality: dict[tuple[str, str], StreamQuality] = {}
        self._published_reference: dict[tuple[str, str, str], float] = {}
        self._detectors = {task: LossDriftDetectors(chunk=drift_chunk, **dict(drift_options or {}))
                           for task in self.drift_tasks}
        self._auc_detectors = {task: AucDropDetector(**dict(auc_drop_options or {})) for task in self.drift_tasks}
        self._join_last: dict[str, int] = {}
        self._join_children: dict[str, Any] = {}
        self._watermark_ms: int | None = None
        self._lag_children: set[tuple[str, str]] = set()
        self._create_metrics()
        self._kd_gate_children: dict[tuple[Any, ...], Any] = {}
        self._kd_gate_state: dict[str, dict[str, float]] = {}
        self._quality_counters: dict[tuple[str, str], Any] = {}
        self._topic_children: dict[str, Any] = {}
        self._drift_sample_counters = {task: self.drift_samples_total.labels(task) for task in self.drift_tasks}
        self._zero_series()
        self.watermark_seconds.set(math.nan)
        self.event_time_lag_seconds.set_function(self._event_time_lag)
        self.published_version.set(math.nan)
        self.published_timestamp_seconds.set(math.nan)
        self.last_checkpoint_seconds.set(math.nan)
        self.registry.register(_QualityCollector(self))

    def _create_metrics(self) -> None:
        """Create the trainer's counters, gauges and histograms in ``self.registry``."""
        r = self.registry
        p = PREFIX
        # Pipeline.
        self.events_consumed_total = Counter(f"{p}_events_consumed", "events decoded from Kafka, per topic", ["topic"],
                                             registry=r)
        self.dead_letters_total = Counter(f"{p}_dead_letters", "events sent to the dead-letter topic, by reason code",
                                          ["reason"], registry=r)
        self.join_events_total = Counter(f"{p}_join_events",
                                         "join outcomes (consumers.core.join counters): late, orphan, duplicate, "
                                         "evicted, ...", ["outcome"], registry=r)
        self.samples_emitted_total = Counter(f"{p}_samples_emitted", "joined samples emitted to the mini-batcher",
                                             registry=r)
        self.samples_trained_total = Counter(f"{p}_samples_trained", "samples the model has trained on", registry=r)
        self.counted_positives_total = Counter(f"{p}_counted_positives",
                                               "joined samples whose label is positive, per counted task "
                                               "(model.options.counted_tasks: no prediction shows them)", ["task"],
                                               registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "samples per training step", buckets=BATCH_SIZE_BUCKETS,
                                    registry=r)
        self.train_step_seconds = Histogram(f"{p}_train_step_seconds", "wall time of one teacher-student update",
                                            buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.watermark_seconds = Gauge(f"{p}_watermark_timestamp_seconds",
                                       "event-time watermark of the join (unix seconds; NaN before the first event)",
                                       registry=r)
        self.event_time_lag_seconds = Gauge(f"{p}_event_time_lag_seconds",
                                            "wall clock minus the join's watermark, computed at scrape time (NaN "
                                            "before the first event)", registry=r)
        self.consumer_lag_messages = Gauge(f"{p}_consumer_lag_messages",
                                           "messages between the trainer's position and the end of each partition",
                                           ["topic", "partition"], registry=r)
        self.checkpoint_seconds = Histogram(f"{p}_checkpoint_seconds", "wall time to write one checkpoint",
                                            buckets=IO_SECONDS_BUCKETS, registry=r)
        self.checkpoints_total = Counter(f"{p}_checkpoints", "checkpoints written", registry=r)
        self.last_checkpoint_seconds = Gauge(f"{p}_last_checkpoint_timestamp_seconds",
                                             "wall time of the last checkpoint write (unix seconds)", registry=r)
        self.publish_seconds = Histogram(f"{p}_publish_seconds",
                                         "wall time to publish one checkpoint to the serving topic",
                                         buckets=IO_SECONDS_BUCKETS, registry=r)
        self.publications_total = Counter(f"{p}_publications", "checkpoints published to the serving topic", registry=r)
        self.published_version = Gauge(f"{p}_published_model_version", "version of the last published checkpoint",
                                       registry=r)
        self.published_timestamp_seconds = Gauge(f"{p}_published_model_timestamp_seconds",
                                                 "creation time of the last published checkpoint (unix seconds)",
                                                 registry=r)
        self.unpublished_samples = Gauge(f"{p}_unpublished_samples",
                                         "samples trained since the last publication (since the trainer started, "
                                         "before its first): what the served model has not learnt yet",
                                         registry=r)
        self.start_timestamp_seconds = Gauge(f"{p}_start_timestamp_seconds",
                                             "wall time the trainer's metrics started (unix seconds; alerts use it "
                                             "before the first publication)", registry=r)
        self.start_timestamp_seconds.set(self._clock())
        # Drift detectors.
        self.drift_detections_total = Counter(f"{p}_drift_detections",
                                              "drift detections: a rise of the per-sample loss (adwin, page_hinkley) "
                                              "or a fall of the windowed AUC (auc_drop)", ["task", "detector"],
                                              registry=r)
        self.drift_last_detection_seconds = Gauge(f"{p}_drift_last_detection_timestamp_seconds",
                                                  "wall time of the last detection (unix seconds; 0 = never)",
                                                  ["task", "detector"], registry=r)
        self.drift_samples_total = Counter(f"{p}_drift_samples", "per-sample losses fed to the drift detectors",
                                           ["task"], registry=r)
        self.quality_samples_total = Counter(f"{p}_quality_samples",
                                             "prequential predictions scored, per task and role", ["task", "role"],
                                             registry=r)
        # Trust-gated distillation (models.trust_gate): series appear once the learner reports its gate.
        self.kd_gate_open = Gauge(f"{p}_kd_gate_open",
                                  "trust gate of the task's distillation in the last training step: 1 = open (the "
                                  "student learned from its teacher), 0 = closed (a KD warm-up scales it while it "
                                  "ramps)", ["task"], registry=r)
        self.kd_gate_auc = Gauge(f"{p}_kd_gate_auc",
                                 "the trust gate's prequential AUC of the teacher and the student over its window "
                                 "(model kd_gate_window samples), as of its last decision", ["task", "role"],
                                 registry=r)
        self.kd_gate_steps_total = Counter(f"{p}_kd_gate_steps",
                                           "training steps per task with the trust gate open (outcome=\"distilled\") "
                                           "or closed (\"skipped\")", ["task", "outcome"], registry=r)

    def _zero_series(self) -> None:
        """Export every detector's and join outcome's series from the start (0), so rate() and alerts see them."""
        for task in self.drift_tasks:
            for detector in DETECTORS:
                self.drift_detections_total.labels(task, detector)
                self.drift_last_detection_seconds.labels(task, detector).set(0)
        for outcome in JOIN_OUTCOMES:
            self.join_events_total.labels(outcome)
        for task in self.counted_tasks:
            self.counted_positives_total.labels(task)

    # -- pipeline -------------------------------------------------------------------------------------------

    def events_consumed(self, topic: str, n: int) -> None:
        """``n`` events were decoded from ``topic`` (called per record: the labelled child is kept)."""
        child = self._topic_children.get(topic)
        if child is None:  # a label lookup costs microseconds
            child = self._topic_children[topic] = self.events_consumed_total.labels(topic)
        child.inc(n)

    def dead_letter(self, reason: str) -> None:
        """One event went to the dead-letter topic for ``reason`` (a streamer.events reason code)."""
        self.dead_letters_total.labels(reason).inc()

    def join_counters(self, counters: Mapping[str, int]) -> None:
        """The join's cumulative counters; exported as increments. A value that went down (a restored or new
        join) counts as a reset: its whole value is added, as Prometheus does for counter resets."""
        last_values = self._join_last
        for name, value in counters.items():  # per record in a replay: no label lookup unless it moved
            last = last_values.get(name, 0)
            if value == last:
                continue
            value = int(value)
            child = self._join_children.get(name)
            if child is None:  # a label lookup costs microseconds
                child = self._join_children[name] = self.join_events_total.labels(name)
            child.inc(value - last if value >= last else value)
            last_values[name] = value

    def samples_emitted(self, n: int) -> None:
        """``n`` joined samples left the join."""
        self.samples_emitted_total.inc(n)

    def counted_positives(self, task: str, n: int) -> None:
        """``n`` of the samples that just left the join are positive for ``task``, a counted task."""
        self.counted_positives_total.labels(task).inc(n)

    def batch_trained(self, size: int, step_seconds: float) -> None:
        """One training step on ``size`` samples took ``step_seconds``."""
        self.batch_size.observe(size)
        self.train_step_seconds.observe(step_seconds)
        self.samples_trained_total.inc(size)
        self.unpublished_samples.inc(size)

    def record_learner(self, losses: Mapping[str, float]) -> None:
        """What the learner reported for one training step (``Learner.step``'s losses, as ``train_rows`` returns).

        With trust-gated distillation they hold, per task, ``gate/<task>`` (1 = distilling this step),
        ``teacher_auc/<task>`` and ``student_auc/<task>`` (the gate's windowed prequential AUCs). A task's
        series appear with its first gate report; a learner without gating exports none. NaN values (the AUCs
        before the gate's first decision) leave their gauge as it was: absent until its first defined value.
        """
        for task in self.tasks:
            gate = losses.get(f"gate/{task}")
            if gate is None or math.isnan(gate):
                continue
            state = self._kd_gate_state.setdefault(task, {"distilled_steps": 0, "skipped_steps": 0})
            outcome = KD_GATE_OUTCOMES[0] if gate > 0 else KD_GATE_OUTCOMES[1]
            self._kd_gate_child(self.kd_gate_open, task).set(gate)
            self._kd_gate_child(self.kd_gate_steps_total, task, outcome).inc()
            state["open"] = float(gate)
            state[f"{outcome}_steps"] += 1
            for role in ("teacher", "student"):
                auc = losses.get(f"{role}_auc/{task}")
                if auc is not None and not math.isnan(auc):
                    self._kd_gate_child(self.kd_gate_auc, task, role).set(auc)
                    state[f"{role}_auc"] = float(auc)

    def kd_gate_summary(self) -> dict[str, dict[str, Any]]:
        """Per task that reported a trust gate (``record_learner``): ``{"open", "teacher_auc", "student_auc",
        "distilled_steps", "skipped_steps"}`` (the last step's gate and the AUCs of its last decision; None where
        undefined); ``{}`` for a learner without gating. What ``snapshot`` holds under ``"kd_gate"``, without
        computing the quality windows."""
        return {task: {"open": gate.get("open"), "teacher_auc": _plain(gate.get("teacher_auc")),
                       "student_auc": _plain(gate.get("student_auc")),
                       "distilled_steps": int(gate["distilled_steps"]), "skipped_steps": int(gate["skipped_steps"])}
                for task, gate in self._kd_gate_state.items()}

    def _kd_gate_child(self, metric: Any, *labels: str) -> Any:
        """The labelled child of a trust-gate metric, created on first use (label lookups cost microseconds)."""
        key = (metric, *labels)
        child = self._kd_gate_children.get(key)
        if child is None:
            child = self._kd_gate_children[key] = metric.labels(*labels)
        return child

    def watermark(self, watermark_ms: int | None) -> None:
        """The join's event-time watermark (``None`` before any event)."""
        self._watermark_ms = watermark_ms
        self.watermark_seconds.set(math.nan if watermark_ms is None else watermark_ms / 1000.0)

    def _event_time_lag(self) -> float:
        if self._watermark_ms is None:
            return math.nan
        return self._clock() - self._watermark_ms / 1000.0

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Messages behind the end of each ``(topic, partition)``; partitions no longer assigned are dropped."""
        current = {(topic, str(partition)) for topic, partition in lags}
        for gone in self._lag_children - current:
            try:
                self.consumer_lag_messages.remove(*gone)
            except KeyError:
                pass
        for (topic, partition), lag in lags.items():
            self.consumer_lag_messages.labels(topic, str(partition)).set(lag)
        self._lag_children = current

    def checkpoint_written(self, seconds: float) -> None:
        """A checkpoint write took ``seconds``."""
        self.checkpoint_seconds.observe(seconds)
        self.checkpoints_total.inc()
        self.last_checkpoint_seconds.set(self._clock())

    def published(self, version: int, seconds: float, timestamp_s: float) -> None:
        """Checkpoint ``version`` (made at ``timestamp_s``, unix seconds) was published in ``seconds``."""
        self.publish_seconds.observe(seconds)
        self.publications_total.inc()
        self.published_version.set(version)
        self.published_timestamp_seconds.set(timestamp_s)
        self.unpublished_samples.set(0)  # a publication follows its checkpoint's every trained batch (collect)

    # -- quality --------------------------------------------------------------------------------------------

    def observe(
        self,
        labels: Mapping[str, Any],
        predictions: Mapping[str, Any],
        role: str = "student",
        users: Sequence | np.ndarray | None = None,
    ) -> list[tuple[str, str]]:
        """Score one batch of prequential predictions (made before the update) against its labels.

        ``labels`` and ``predictions`` map task -> 1-D array (numpy or torch); tasks missing from either are
        skipped. ``users`` (one per sample) enables GAUC. For ``role == drift_role`` the per-sample log loss
        also feeds the drift detectors. Returns the ``(task, detector)`` pairs that fired in this batch.
        """
        fired_pairs: list[tuple[str, str]] = []
        now = None
        if users is not None and predictions:  # one conversion for every task's stream
            users = user_ids_of(users, len(users))
        for task, raw_p in predictions.items():
            if task not in labels:
                continue
            y = _to_numpy(labels[task])
            p = _to_numpy(raw_p)
            losses = per_sample_log_loss(y, p)  # once, for the quality sums and the drift detectors
            key = (task, role)
            with self._lock:
                quality = self._quality.get(key)
                if quality is None:
                    quality = self._quality[key] = StreamQuality(
                        self.windows + (self.baseline_window,),
                        refresh_every={self.baseline_window: self.baseline_window // 100},
                    )
                    # Label lookups cost microseconds each; keep the children.
                    self._quality_counters[key] = self.quality_samples_total.labels(task, role)
                quality.update(y, p, users, losses=losses)
            self._quality_counters[key].inc(len(y))
            if role == self.drift_role and task in self._detectors:
                fired = self._detectors[task].update(losses)
                if self._auc_detectors[task].update(y, p):
                    fired.append(AUC_DETECTOR)
                self._drift_sample_counters[task].inc(len(y))
                for detector in fired:
                    now = self._clock() if now is None else now
                    self.drift_detections_total.labels(task, detector).inc()
                    self.drift_last_detection_seconds.labels(task, detector).set(now)
                    fired_pairs.append((task, detector))
        return fired_pairs

    def mark_published_reference(self) -> None:
        """Remember every windowed AUC now as the "published" reference of AUC drift (call after publishing)."""
        with self._lock:
            for (task, role), quality in self._quality.items():
                for window in self.windows:
                    self._published_reference[(task, role, str(window))] = quality.auc(window)

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "TrainerMetrics":
        """The metrics of a ``consumers.runtime.config.Config``: its tasks, ``[metrics]`` windows and drift settings
        (``drift_tasks``, else the served tasks); ``kwargs`` (registry, clock, ...) go to the constructor."""
        m = cfg.metrics
        return cls(tuple(cfg.model.learnt_tasks), windows=tuple(m.windows),  # a counted task predicts nothing
                   drift_options={"ph_threshold": m.drift_ph_threshold, "ph_delta": m.drift_ph_delta,
                                  "adwin_delta": m.drift_adwin_delta},
                   auc_drop_options={"min_drop": m.drift_auc_drop, "window": m.drift_auc_window,
                                     "reference": m.drift_auc_reference, "z": m.drift_auc_z},
                   drift_tasks=list(m.drift_tasks) or cfg.model.served_tasks,
                   counted_tasks=cfg.model.counted_tasks, **kwargs)

    def _quality_state(self, in_place: bool = False, gauc: bool = True, metrics: Sequence[str] | None = None):
        """Summaries, AUC drift and references. The rings are copied under the lock and the sorting happens
        outside it, so a scrape blocks the trainer only for the copies.

        ``in_place=True`` (the trainer's own thread, which is the only writer): no copies; the lock is held
        while computing instead, so a checkpoint does not briefly double the rings' memory. ``metrics``: only
        these of ``StreamQuality.summary``'s (default all; AUC always, the drift needs it).
        """
        if in_place:
            with self._lock:
                return _quality_state_of(dict(self._quality), dict(self._published_reference), self.windows,
                                         self.baseline_window, gauc, metrics)
        with self._lock:
            copies = {key: quality.copy() for key, quality in self._quality.items()}
            published_reference = dict(self._published_reference)
        result = _quality_state_of(copies, published_reference, self.windows, self.baseline_window)
        with self._lock:
            for key, quality in copies.items():
                self._quality[key].adopt_cache(quality)
        return result

    def snapshot(self, gauc: bool = True, metrics: Sequence[str] | None = None) -> dict[str, Any]:
        """Latest quality per task, for a checkpoint manifest: ``{task: {role: {metric: {window: value}}}}``
        plus ``{task: {"drift_detections": {detector: detections}}}`` and, once the learner reported a trust gate
        (``record_learner``), ``{task: {"kd_gate": {"open", "teacher_auc", "student_auc", "distilled_steps",
        "skipped_steps"}}}``; undefined values (NaN) become ``None``.

        ``gauc=False`` leaves GAUC out (``{}`` per role): the costliest metric, which a backtest's series does not
        show. ``metrics``: only these of ``consumers.core.quality.METRICS`` per role (AUC always; a backtest's series
        reads AUC and log loss at every point and skips the other windows' sums). Call it
        from the thread that calls ``observe`` (it reads the rings in place, under the lock)."""
        summaries, drift, _ = self._quality_state(in_place=True, gauc=gauc, metrics=metrics)
        out: dict[str, Any] = {task: {} for task in self.tasks}
        for (task, role), summary in summaries.items():
            role_out = out.setdefault(task, {}).setdefault(role, {})
            for metric, values in summary.items():
                role_out[metric] = {w: _plain(v) for w, v in values.items()}
            role_out["auc_drift"] = {
                f"{w}/{reference}": _plain(v) for (t, r, w, reference), v in drift.items() if (t, r) == (task, role)
            }
        for task, detectors in self._detectors.items():
            out[task]["drift_detections"] = {**detectors.detections,
                                             AUC_DETECTOR: self._auc_detectors[task].detections}
        for task, gate in self.kd_gate_summary().items():
            out[task]["kd_gate"] = gate
        return out


def _quality_state_of(copies: dict, published_reference: dict, windows: Sequence[int], baseline_window: int,
                      gauc: bool = True, metrics: Sequence[str] | None = None):
    """``TrainerMetrics._quality_state`` on copies (or the rings themselves) of the per-(task, role) qualities:
    summaries, AUC drift against the baseline window and the published reference, and those references."""
    summaries: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    drift: dict[tuple[str, str, str, str], float] = {}
    references: dict[tuple[str, str, str, str], float] = {}
    wanted = None if metrics is None else tuple(dict.fromkeys(("auc", *metrics)))
    for (task, role), quality in copies.items():
        # GAUC over the baseline window costs more than it tells.
        summary = quality.summary(gauc_windows=windows if gauc else (), metrics=wanted)
        summaries[(task, role)] = summary
        baseline = summary["auc"][str(baseline_window)]
        for window in windows:
            w = str(window)
            current = summary["auc"][w]
            references[(task, role, w, "baseline")] = baseline
            drift[(task, role, w, "baseline")] = current - baseline
            if (task, role, w) in published_reference:
                published = published_reference[(task, role, w)]
                references[(task, role, w, "published")] = published
                drift[(task, role, w, "published")] = current - published
    return summaries, drift, references


class ServingMetrics:
    """The serving daemon's metrics: loaded model version, reloads, reload failures, request latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = f"{PREFIX}_serving"
        self.model_version = Gauge(f"{p}_model_version", "version of the model being served (NaN before the first)",
                                   registry=r)
        self.model_timestamp_seconds = Gauge(f"{p}_model_timestamp_seconds",
                                             "creation time of the served checkpoint (unix seconds)", registry=r)
        self.reloads_total = Counter(f"{p}_reloads", "models loaded and swapped in", registry=r)
        self.reload_failures_total = Counter(f"{p}_reload_failures",
                                             "published checkpoints rejected or failing to load, by reason", ["reason"],
                                             registry=r)
        self.reload_seconds = Histogram(f"{p}_reload_seconds", "wall time to verify and swap in a model",
                                        buckets=IO_SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram(f"{p}_request_seconds", "request latency by endpoint", ["endpoint"],
                                         buckets=REQUEST_SECONDS_BUCKETS, registry=r)
        self.requests_total = Counter(f"{p}_requests", "requests by endpoint and HTTP status code",
                                      ["endpoint", "code"], registry=r)
        self.scored_items_total = Counter(f"{p}_scored_items", "items scored", registry=r)
        self.model_version.set(math.nan)
        self.model_timestamp_seconds.set(math.nan)

    def model_loaded(self, version: int, timestamp_s: float, seconds: float) -> None:
        """Model ``version`` (made at ``timestamp_s``) was swapped in after ``seconds`` of verify and load."""
        self.model_version.set(version)
        self.model_timestamp_seconds.set(timestamp_s)
        self.reloads_total.inc()
        self.reload_seconds.observe(seconds)

    def reload_failed(self, reason: str) -> None:
        """A published checkpoint was rejected (``reason``: a consumers.state.wire rejection code or an error kind)."""
        self.reload_failures_total.labels(reason).inc()

    def request(self, endpoint: str, seconds: float, code: int = 200, items: int = 0) -> None:
        """One request to ``endpoint`` answered ``code`` in ``seconds``, scoring ``items`` items."""
        self.request_seconds.labels(endpoint).observe(seconds)
        self.requests_total.labels(endpoint, str(code)).inc()
        if items:
            self.scored_items_total.inc(items)
