"""``crossdistil train``: the trainer daemon — Kafka in, CrossDistil updates, checkpoints, serving-topic publications.

The flow (one consumer, one model)::

    poll impressions + feedback  ->  decode_record  ->  Pipeline.ingest  ->  bad: dead-letter topic
                                                                        ->  good: AttributionJoin (source = (topic, partition))
    Pipeline.train_ready: join.emit()  ->  MiniBatcher (wall clock)  ->  encode_rows  ->  Learner.step (score first,
                          then update)  ->  TrainerMetrics, ledger
    every N steps / T seconds / on shutdown / before a rebalance revokes partitions:
        checkpoint (model + optimizers, join state, batcher state, positions, publish version)
        -> commit the positions to Kafka (only for lag monitoring)  ->  publish the serving view (consumers.state.wire)

Everything between decoding and the metrics is ``consumers.core.pipeline.Pipeline``, shared with ``crossdistil
backtest``: this module is the Kafka shell around it (poll loop, dead-letter producer, checkpoints, offsets,
publication, signals), and the pipeline's clock here is the wall clock (``time.monotonic``). The records of
one partition in one poll go to the join together (``AttributionJoin.add_events``, up to a batch's worth of
events at a time): they arrived together, so the partition's event-time clock advances once for all of them.

With ``model.separate_process = true`` the learner lives in a child process (``consumers.runtime.learner_process``):
``Learner.step`` of a batch overlaps with the polling, decoding and joining of the next ones, answers come back
in order, and a checkpoint waits for every answer before the child writes the file. Everything below holds in
both modes.

Exactly once
------------
The checkpoint is the only truth. ``positions`` in it are, per (topic, partition), the offset after the last
record whose events went into the join; every event before a position is inside the join state (pending
impressions, early feedback), the batcher state (the partial batch) or the model weights, and none after it
is. A checkpoint is only taken between records, after everything polled so far has been processed, so the
three always agree. On start the daemon restores the newest checkpoint that verifies and seeks every assigned
partition to its position (partitions it has no position for: the beginning), so events consumed after that
checkpoint are replayed and trained once. Offsets committed to Kafka are never read back: they only feed lag
dashboards. The daemon is the only member of its consumer group (one model, one trainer; static membership
makes a second one take over and the first exit with status 5); a revoked partition's pending impressions stay
in the join and are trained as usual.

Publication: a checkpoint's serving view is published after the checkpoint is written, so only an
acknowledged publication is recorded as done (``published.json`` in the checkpoint directory). One that fails
(broker away, messages not acknowledged) is retried with a newer version after 10 s, doubling up to 300 s,
even when nothing else changed; a trainer stopped or killed before that publishes the restored step again as
soon as it starts. Serving therefore always ends up with the newest checkpointed model.

Trained-sample ledger (``--ledger DIR``, for audits and tests): see ``consumers.state.ledger``; segments are written
just before the checkpoint of the same step, and segments newer than the restored checkpoint are deleted on
start, so the ledger lists exactly the samples inside the restored model.

Dead-letter topic
-----------------
Every message (or inner event of a batch envelope) that fails ``streamer.events.decode_events`` is produced to
``kafka.dead_letter_topic`` with the same key as the source message and:

* value: the raw bytes of the source message when the message is bad as a whole (``not_msgpack``,
  ``too_large``, a malformed envelope, ...), or the bad inner event re-packed with msgpack when only one event
  of a batch envelope is bad (so the good events of the envelope are not dead-lettered twice);
* headers (UTF-8 values): ``dl.reason`` (the reason code of ``EventError``, e.g. ``missing_field``),
  ``dl.error`` (the human sentence), ``dl.field`` (dotted field path or empty), ``dl.source.topic``,
  ``dl.source.partition``, ``dl.source.offset`` (decimal), ``dl.index`` (position inside the envelope, or
  empty for a whole message).

Dead letters are flushed before every checkpoint, so none is lost; after a crash, the replayed range may
dead-letter some messages again (at-least-once; (source topic, partition, offset, index) identifies them).

Finite streams: ``--exit-when-idle SECONDS`` ends the daemon once no event arrived for that long *and* every
assigned partition is at its end offset: the join and the batcher are flushed (every pending impression is
trained with the labels it has), a final checkpoint is written and published, and the process exits 0.
SIGTERM / SIGINT end it the same way without the flush (pending impressions stay in the checkpoint).

Exit status: 0 after a stop or the end of a finite stream; 2 for a configuration error; 3 when Kafka cannot be
reached at start; 4 when no partition was assigned for ``kafka.stall_exit_s`` (a group join stuck in the client,
or a broker gone for good): the daemon checkpoints and exits so that its supervisor (systemd ``Restart=on-failure``,
Kubernetes) starts a fresh process, which resumes from that checkpoint; 5 when another trainer with the same
``group_instance_id`` took the partitions over (no checkpoint: the other one owns the model now); 6 when the
learner process (``model.separate_process``) failed or died (no checkpoint; a restart resumes from the last).

Static membership (``kafka.group_instance_id``, on by default): a trainer restarted after a crash gets its
partitions back within seconds instead of after the group's session timeout (measured on the local broker:
5.5 s from restart to assignment, against 45.3 s with dynamic membership and the default 45 s timeout).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumers.core.join import late_feedback_warning
from consumers.core.pipeline import Pipeline, decode_record, join_config, model_config, rebase_join_clock  # noqa: F401
from streamer.events import EventError

if TYPE_CHECKING:
    import torch

    from consumers.runtime.config import Config

log = logging.getLogger("crossdistil.trainer")

_TENSOR_REF = "__tensor__"
FENCE_PROBE_S = 10.0  # how often the checkpointed positions are re-committed to notice a takeover (exit 5)
PUBLISH_RETRY_S = (10.0, 300.0)  # a failed publication is retried after 10 s, doubling up to 300 s
IN_FLIGHT_POLL_MS = 5  # poll timeout while the learner process holds batches: their answers feed metrics and freshness
STATE_FORMAT = 1


def _release_drained_records(consumer: Any) -> None:
    """Work around a kafka-python 3.0.12 fetcher bug that stalls resumed partitions for good.

    Records fetched for a paused partition are parked and handed back once it is resumed (KAFKA-7548), but
    only while the fetcher's current record set is ``None``; a drained one (empty, falsy, not ``None``) can stay
    there indefinitely. Then a resumed partition is neither fetched again (it has parked records) nor given its
    parked records: the KuaiRand replay stopped at 33,750 of 41,828 impressions with every other partition
    paused. A drained record set holds nothing, so dropping it changes no record or position. Only the private
    attribute is touched, and only when it is there.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current:
        fetcher._next_partition_records = None


# ------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil train``."""
    from consumers.runtime.config import add_config_arguments

    add_config_arguments(parser, "deploy/trainer.example.toml", "batching.batch_size=512")
    parser.add_argument("--device", help="torch device, overrides model.device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS", default=None,
                        help="finite streams: when no event arrived for SECONDS and every partition is at its end "
                             "offset, flush the join and the batcher, checkpoint, publish and exit 0")
    parser.add_argument("--ledger", metavar="DIR", default=None,
                        help="write a trained-sample ledger (impression ids, labels, predictions) next to the "
                             "checkpoints, made durable with them (audits, exactly-once tests)")
    parser.add_argument("--from-time", metavar="TIME", default=None,
                        help="a trainer without a checkpoint position for a partition starts it at the first record "
                             "stamped at or after TIME (unix ms or ISO 8601, e.g. 2026-11-01T00:00Z) instead of its "
                             "beginning; positions in the checkpoint always win, so restarts stay exactly-once")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads on CPU (default: torch's choice, one per core). On a shared or "
                             "busy machine 1 is often much faster: idle threads spin while waiting for cores")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil train``; returns the exit status."""
    from consumers.runtime.config import ConfigError, load_config, to_toml

    from consumers.runtime import logs

    logs.configure(str(args.log_level))  # the Kafka client's repeated complaints during an outage are folded
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"crossdistil train: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        cfg.model.device = args.device
    if args.check_config:
        try:
            model_config(cfg)
        except (TypeError, ValueError) as exc:
            print(f"crossdistil train: configuration error in [model]: {exc}", file=sys.stderr)
            return 2
        print(to_toml(cfg))
        return 0
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    start_ms = None
    if args.from_time is not None:
        from consumers.tools.backtest import parse_time

        try:
            start_ms = parse_time(args.from_time)
        except ValueError as exc:
            print(f"crossdistil train: --from-time: {exc}", file=sys.stderr)
            return 2
    from consumers.runtime.learner_process import LearnerProcessError

    try:
        trainer = Trainer(cfg, exit_when_idle_s=args.exit_when_idle, ledger_dir=args.ledger, start_ms=start_ms)
        return trainer.run()
    except LearnerProcessError as exc:
        print(f"crossdistil train: {exc}\nexiting with status 6 without a checkpoint (the last one is consistent: a "
              "restart resumes from it)", file=sys.stderr)
        return 6


# ------------------------------------------------------------------------------------ configuration glue

# The [model] and [join] glue (model_config, join_config, rebase_join_clock) lives in consumers.core.pipeline, which
# the backtest shares; it is imported at the top of this module so that the old names keep working.


# ------------------------------------------------------------------------ learner state <-> checkpoint files


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, plain values) into flat tensors and a plain skeleton.

    Each tensor is replaced in the skeleton by ``{"__tensor__": name}``; ``unflatten_state`` reverses it.
    Needed because checkpoint files hold tensors as safetensors and everything else as msgpack.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {_TENSOR_REF: path}
        if isinstance(value, Mapping):
            return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skeleton, Mapping):
        if set(skeleton) == {_TENSOR_REF}:
            return tensors[skeleton[_TENSOR_REF]]
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def dead_letter_headers(error: Any, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The headers of one dead letter (documented in the module docstring)."""
    return [
        ("dl.reason", str(error.reason or "invalid").encode()),
        ("dl.error", str(error).encode("utf-8", "replace")[:4096]),
        ("dl.field", (error.field or "").encode("utf-8", "replace")),
        ("dl.source.topic", topic.encode()),
        ("dl.source.partition", str(partition).encode()),
        ("dl.source.offset", str(offset).encode()),
        ("dl.index", b"" if error.index is None else str(error.index).encode()),
    ]


def _client_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The passthrough options a kafka-python client class accepts (it refuses unknown ones)."""
    return {k: v for k, v in options.items() if k in defaults}


# ------------------------------------------------------------------------------------------------ daemon


class Trainer:
    """The daemon: owns the consumer, producer, join, batcher, learner, checkpoint store, ledger and metrics."""

    def __init__(self, cfg: Config, exit_when_idle_s: float | None = None, ledger_dir: str | None = None,
                 start_ms: int | None = None) -> None:
        from prometheus_client import CollectorRegistry

        from consumers.state.checkpoints import CheckpointStore
        from consumers.state.ledger import Ledger
        from consumers.runtime.telemetry import TrainerMetrics
        from consumers.state.wire import stable_hash

        self.cfg = cfg
        self.tasks = tuple(cfg.model.tasks)
        self.exit_when_idle_s = exit_when_idle_s
        self.store = CheckpointStore(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last)
        self.ledger = Ledger(ledger_dir, self.tasks) if ledger_dir else None
        self.registry = CollectorRegistry()
        # The one code path shared with the backtest; the live clock is the wall clock.
        self.pipeline = Pipeline(
            cfg, clock=time.monotonic, join=join_config(cfg, live=True),
            metrics=TrainerMetrics.from_config(cfg, registry=self.registry),
            ledger=self.ledger, on_batch=self._on_batch, on_emitted=self._on_emitted,
        )
        self.config_hash = stable_hash(cfg.to_dict())
        self.positions: dict[tuple[str, int], int] = {}  # next offset to process, per (topic, partition)
        self.start_ms = start_ms  # --from-time: where partitions without a checkpointed position start
        self.start_offsets: dict[tuple[str, int], int] = {}  # ... resolved to offsets before subscribing
        self.version = 0  # last publication version (kept in checkpoints so it grows across restarts)
        self.published_chunks = 0
        self.unacknowledged_version: int | None = None  # the last publication attempt failed (None: it did not)
        # The current step's publication has not been acknowledged (a failed attempt, or a restored checkpoint
        # whose publication never landed): retried after a back-off even when nothing else changed.
        self.publication_pending = False
        self.publish_failures = 0
        self.last_publish_attempt_at = float("-inf")
        self.last_checkpoint_step = -1
        self.last_checkpoint_positions: dict[tuple[str, int], int] = {}
        self.last_checkpoint_at = time.monotonic()
        self.last_published_step = -1
        self.last_event_at = time.monotonic()
        self.last_poll_ok_at = time.monotonic()
        self.stop_requested = False
        self.events_consumed = 0
        self.first_assigned_at: float | None = None
        self.unassigned_since: float | None = None  # no partition assigned since then (stall_exit_s)
        self._unassigned_warned_at: float | None = None
        self.exit_status = 0
        self.fenced = False  # another trainer with our group_instance_id took over (exit 5)
        self._fence_probed_at = time.monotonic()
        self.flush_started_at: float | None = None  # end of a finite stream (exit_when_idle)
        self.drained_at: float | None = None
        # Freshness (bench/trainer_throughput.py): seconds from a sample's emission by the join (its windows
        # closed in event time) to the step that trains it, and from a checkpoint to its acknowledged publication.
        self.freshness_s: list[tuple[float, int]] = []  # (seconds, samples); see freshness_percentiles
        self.publication_delay_s: list[float] = []
        self._arrivals: deque[list[float]] = deque()  # [samples, emitted at], FIFO like the batcher
        self.consumer = None
        self.producer = None
        self._pending_dead_letters: list[list[Any]] = []  # [future or None, message]: not yet acknowledged
        # Event-time alignment (join.max_skew_s): partitions paused because they ran ahead of the watermark.
        longest_window_s = max(join_config(cfg, live=True).attribution_window_s.values(), default=0.0)
        skew_s = longest_window_s if cfg.join.max_skew_s == -1 else cfg.join.max_skew_s
        self.max_skew_ms = int(skew_s * 1000) if skew_s > 0 else None
        self.lateness_ms = int(cfg.join.allowed_lateness_s * 1000)
        self._late_feedback_reported = 0  # late_feedback count at the last log warning (_warn_late_feedback)
        self.paused: set = set()
        self.partition_pauses = 0  # partitions paused so far (a partition paused twice counts twice)

    # The pipeline's parts, under the names the daemon (and bench/trainer_throughput.py) always used.

    @property
    def learner(self):
        """The ``models.learner.Learner`` being trained."""
        return self.pipeline.learner

    @property
    def join(self):
        """The ``consumers.core.join.AttributionJoin``."""
        return self.pipeline.join

    @property
    def batcher(self):
        """The ``consumers.core.batching.MiniBatcher``."""
        return self.pipeline.batcher

    @property
    def metrics(self):
        """The ``consumers.runtime.telemetry.TrainerMetrics`` (on ``self.registry``)."""
        return self.pipeline.metrics

    @property
    def trained_samples(self) -> int:
        """Samples trained so far (restored from the checkpoint, so it counts across restarts)."""
        return self.pipeline.trained_samples

    @property
    def dead_letters(self) -> int:
        """Events dead-lettered by this process."""
        return self.pipeline.dead_letters

    # --------------------------------------------------------------------------------------- restore

    def restore(self) -> int | None:
        """Load the newest verified checkpoint into the learner, join, batcher and positions; its step or None."""
        from consumers.state.checkpoints import positions_from_plain

        # With a learner process, the child loads the tensors from the file: this process needs the metadata only.
        checkpoint = self.store.latest(with_tensors=self.pipeline.remote is None)
        if checkpoint is None:
            if self.ledger is not None:
                self.ledger.discard_after(None)
            log.info("no checkpoint in %s: starting from scratch, every partition from its beginning", self.store.directory)
            return None
        meta = checkpoint.metadata
        if meta.get("trainer_format") != STATE_FORMAT:
            raise RuntimeError(f"{checkpoint.path} was not written by this trainer (trainer_format "
                               f"{meta.get('trainer_format')!r}); point checkpoint.dir at an empty directory")
        now = time.monotonic()
        learner_state = None
        if self.pipeline.remote is not None:
            self.pipeline.remote.load_checkpoint(str(checkpoint.path))  # the learner process reads the file
        else:
            learner_state = unflatten_state(meta["learner"], checkpoint.tensors)
        # The saved clocks belong to the dead process: load_state_dict rebases them to now.
        self.pipeline.load_state_dict({
            "learner": learner_state,
            "join_state": meta["join_state"],
            "batcher_state": meta["batcher_state"],
            "trained_samples": int(meta.get("trained_samples", 0)),
        }, now)
        if self.batcher.waiting:
            self._arrivals.append([self.batcher.waiting, now])
        self.positions = positions_from_plain(meta["positions"])
        self.version = int(meta["publish_version"])
        self.published_chunks = int(meta["published_chunks"])
        self.last_checkpoint_step = checkpoint.step
        self.last_checkpoint_positions = dict(self.positions)
        # The checkpoint is written before its publication is attempted: the store's publication record says
        # whether it landed. If not, this step is published again as soon as the loop starts.
        record = self.store.publication()
        acknowledged = bool(meta.get("published")) or (
            record is not None and record["step"] == checkpoint.step and record["version"] >= self.version)
        if record is not None:
            self.version = max(self.version, record["version"])
        self.last_published_step = checkpoint.step if acknowledged else -1
        self.publication_pending = self.cfg.publish.enabled and not acknowledged
        if self.publication_pending:
            log.info("the publication of step %d was never acknowledged by Kafka: publishing it again",
                     checkpoint.step)
        if self.ledger is not None:
            dropped = self.ledger.discard_after(checkpoint.step)
            if dropped:
                log.info("ledger: discarded segments %s newer than the restored checkpoint", dropped)
        log.info("restored %s: step %d, %d pending impressions, %d waiting samples, positions %s",
                 checkpoint.path, checkpoint.step, self.join.pending_impressions, self.batcher.waiting,
                 meta["positions"])
        return checkpoint.step

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> int:
        """Restore, connect, and train until stopped (SIGTERM/SIGINT) or idle at the end (``exit_when_idle_s``)."""
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import KafkaError

        from consumers.runtime.telemetry import serve_http
        from consumers.core.pipeline import tune_gc

        tune_gc()
        self.restore()
        http = None
        if self.cfg.metrics.port:
            http = serve_http(self.cfg.metrics.bind, self.cfg.metrics.port, self.registry, self.health)
            print(f"crossdistil train: metrics at {http.url}/metrics, health at {http.url}/healthz", flush=True)
        else:
            print("crossdistil train: metrics and health endpoints are off (metrics.port = 0)", flush=True)

        k = self.cfg.kafka
        options = dict(k.client_options)
        # Reconnect within seconds after a broker restart (kafka-python's default backs off up to 30 s).
        options.setdefault("reconnect_backoff_max_ms", 2000)
        # A send waits at most this long for metadata while the broker is away (kafka-python's default: 60 s),
        # so a checkpoint's publication, and a shutdown, are not held up for minutes.
        producer_options = {"max_block_ms": 10_000, **options}
        instance_id = f"{k.group_id}-trainer" if k.group_instance_id == "auto" else (k.group_instance_id or None)
        if instance_id is not None:
            options.setdefault("group_instance_id", instance_id)
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=k.bootstrap, group_id=k.group_id, enable_auto_commit=False,
                auto_offset_reset="earliest", max_poll_records=k.max_poll_records,
                max_poll_interval_ms=k.max_poll_interval_ms,
                **_client_options(options, KafkaConsumer.DEFAULT_CONFIG),
            )
            self.producer = KafkaProducer(
                bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                max_request_size=16 * 1024 * 1024,
                **_client_options(producer_options, KafkaProducer.DEFAULT_CONFIG),
            )
        except KafkaError as exc:
            if http is not None:
                http.close()
            print(f"crossdistil train: Kafka at {k.bootstrap} is not reachable ({exc}); start one with "
                  "'crossdistil kafka up' or set kafka.bootstrap (--set kafka.bootstrap=HOST:PORT)", file=sys.stderr)
            return 3
        if self.start_ms is not None:
            self.start_offsets = self._offsets_at(self.start_ms, [k.impressions_topic, k.feedback_topic])
        self.consumer.subscribe([k.impressions_topic, k.feedback_topic], listener=_rebalance_listener(self))
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        print(f"crossdistil train: consuming {k.impressions_topic}, {k.feedback_topic} from {k.bootstrap} "
              f"as group {k.group_id}; checkpoints in {self.store.directory}", flush=True)
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                self.consumer.close(autocommit=False)
            except Exception as exc:  # closing must not hide how the loop ended
                log.warning("closing the consumer: %s", exc)
            try:
                self.producer.close(timeout=10)
            except Exception as exc:
                log.warning("closing the producer: %s", exc)
            if http is not None:
                http.close()
            self.pipeline.close()
        print(f"crossdistil train: stopped at step {self.learner.steps}; {self.trained_samples} samples trained, "
              f"{self.dead_letters} dead letters, publication version {self.version}"
              + (f", {self.partition_pauses} partition pauses (join.max_skew_s)" if self.max_skew_ms else "")
              + ("" if self.unacknowledged_version is None else
                 f" (version {self.unacknowledged_version} was not acknowledged by Kafka: the next start publishes "
                 "this step again)"),
              flush=True)
        return self.exit_status

    def _loop(self) -> None:
        """The poll loop: process every polled record, train ready batches, checkpoint when due."""
        from kafka.errors import FencedInstanceIdError

        k = self.cfg.kafka
        while not self.stop_requested:
            started = time.monotonic()
            # Wait no longer than the partial batch may: max_batch_delay_s holds even when the stream pauses.
            deadline = self.batcher.next_deadline()
            timeout_ms = k.poll_timeout_ms if deadline is None else int(
                min(k.poll_timeout_ms, max(0.0, (deadline - self._train_lead_s() - started) * 1000)))
            if self.pipeline.remote is not None and self.pipeline.remote.in_flight:
                timeout_ms = min(timeout_ms, IN_FLIGHT_POLL_MS)  # collect the learner's answers as they come
            try:
                polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=k.max_poll_records)
            except FencedInstanceIdError:
                self.fenced = True
            if started - self._fence_probed_at >= FENCE_PROBE_S and self.last_checkpoint_positions:
                # kafka-python notices a takeover only on a group request: re-commit the checkpointed positions.
                self._fence_probed_at = started
                self._commit_offsets(self.last_checkpoint_positions)
            if self.fenced:
                log.error("another trainer joined group %s with the same group_instance_id and took the partitions "
                          "over; exiting with status 5 without a checkpoint (two trainers must not write one "
                          "model: give each its own kafka.group_id and checkpoint.dir)", k.group_id)
                self.exit_status = 5
                return
            now = time.monotonic()
            self.last_poll_ok_at = now
            if self.pipeline.remote is not None:
                self.pipeline.remote.check_alive()  # a dead learner ends the daemon (status 6), idle or not
            # A poll can hold hundreds of thousands of events (envelopes): train as batches fill up instead of
            # after the whole poll, so a sample whose windows closed early in the poll is not kept waiting.
            # The partial batch whose max_batch_delay_s ran out while we polled trains before the new records.
            if self._batch_overdue(now):
                self.pipeline.train_ready(now, self._train_lead_s())
            since_train, train_every = 0, self.cfg.batching.batch_size
            for tp, records in polled.items():
                start = 0
                while start < len(records):
                    taken, events = self._process_records(tp.topic, tp.partition, records, start,
                                                          train_every - since_train, now)
                    start += taken
                    since_train += events
                    if since_train >= train_every or self._batch_overdue(time.monotonic()):
                        now = time.monotonic()
                        self.pipeline.train_ready(now, self._train_lead_s())
                        since_train = 0
            if polled:
                now = time.monotonic()  # processing a large poll takes a while: emissions below are timed after it
                self.last_event_at = now
            self._align_partitions()
            if not polled and self._caught_up():
                # Idleness is only decided while every partition is read to its (last known) end, so a partition
                # that is merely behind in fetching never stops holding the watermark back.
                self.pipeline.tick(now)
            self.pipeline.train_ready(now, self._train_lead_s())
            if self._checkpoint_due(now):
                self.checkpoint("periodic")
            elif self._publication_retry_due(now):
                self.checkpoint("publication retry")
            if self._idle_at_end(now):
                log.info("no event for %.1f s and at the end of every partition: flushing and exiting",
                         self.exit_when_idle_s)
                self.flush_started_at = time.monotonic()
                self.pipeline.flush(now)
                self.drained_at = time.monotonic()
                self.checkpoint("end of stream")
                return
            if self._stalled(now):
                log.error("no partition assigned for %.0f s (kafka.stall_exit_s): the group join is stuck or the "
                          "broker is gone%s; checkpointing and exiting with status 4 so that a supervisor restarts "
                          "the trainer", now - self.unassigned_since, self._missing_topics_hint())
                self.exit_status = 4
                break
            if not polled and timeout_ms and time.monotonic() - started < timeout_ms / 4000:
                # kafka-python returns at once while it has no connection; do not spin on it.
                time.sleep(timeout_ms / 1000)
        self.checkpoint("shutdown")

    def _train_lead_s(self) -> float:
        """How much earlier than ``max_batch_delay_s`` a partial batch is cut, so that it is *trained* (and its
        metrics done) within it: the last batch's time from hand-over to metrics, plus one step per batch still
        ahead of it in the learner process; at most half the delay."""
        queued = self.pipeline.remote.in_flight if self.pipeline.remote is not None else 0
        lead = self.pipeline.last_batch_s + self.pipeline.last_step_s * queued
        return min(lead, self.cfg.batching.max_batch_delay_s / 2)

    def _batch_overdue(self, now: float) -> bool:
        deadline = self.batcher.next_deadline()
        return deadline is not None and now + self._train_lead_s() >= deadline

    def _process_records(self, topic: str, partition: int, records: list[Any], start: int, room: int,
                         now: float) -> tuple[int, int]:
        """Decode ``records[start:]`` of one partition until ``room`` events are read, and hand them to the
        pipeline as one message (``AttributionJoin.add_events``: they arrived in one poll); bad events go to the
        dead-letter topic. Returns (records taken, events read)."""
        decoded: list[list[Any]] = []
        events: list[Any] = []
        end = start
        while end < len(records) and len(events) < room:
            record_events = decode_record(records[end].value)
            decoded.append(record_events)
            events += record_events
            end += 1
        if self.pipeline.ingest(events, (topic, partition), now):  # rare: find the records the bad events are in
            for record, record_events in zip(records[start:end], decoded):
                for event in record_events:
                    if isinstance(event, EventError):
                        self._dead_letter(event, record, topic, partition)
        self.positions[(topic, partition)] = records[end - 1].offset + 1
        self.events_consumed += len(events)
        return end - start, len(events)

    def _dead_letter(self, error: Any, record: Any, topic: str, partition: int) -> None:
        import msgpack

        value = record.value if isinstance(record.value, bytes) else b""
        if error.index is not None and error.event is not None:
            try:
                value = msgpack.packb(error.event, use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                pass  # keep the whole message: the bad event cannot be re-packed on its own
        message = {"key": record.key, "value": value, "headers": dead_letter_headers(error, topic, partition, record.offset)}
        self._pending_dead_letters.append([self._send_dead_letter(message), message])

    def _send_dead_letter(self, message: dict) -> Any:
        """Hand one dead letter to the producer; its future, or None when the producer refused it (broker away:
        no metadata within ``max_block_ms``). Either way it stays pending until Kafka acknowledges it."""
        from kafka.errors import KafkaError

        try:
            return self.producer.send(self.cfg.kafka.dead_letter_topic, **message)
        except KafkaError as exc:
            log.warning("dead letter not handed to Kafka yet (%s); it is retried before the next checkpoint", exc)
            return None

    def _on_emitted(self, samples: int, now: float) -> None:
        self._arrivals.append([samples, now])

    def _on_batch(self, samples: list, _labels: Any, _scores: Any, _fired: Any) -> None:
        """Freshness: seconds from each sample's emission by the join to the step that trained it."""
        trained_at, remaining = time.monotonic(), len(samples)
        while remaining and self._arrivals:
            head = self._arrivals[0]
            taken = min(remaining, int(head[0]))
            if len(self.freshness_s) < 1_000_000:  # (seconds, samples): a few entries per step, not one per sample
                self.freshness_s.append((trained_at - head[1], taken))
            head[0] -= taken
            remaining -= taken
            if head[0] <= 0:
                self._arrivals.popleft()

    def freshness_percentiles(self, quantiles: tuple[float, ...] = (0.5, 0.99, 1.0)) -> dict[float, float] | None:
        """Sample-weighted quantiles of ``freshness_s`` (None before the first trained batch)."""
        if not self.freshness_s:
            return None
        ordered = sorted(self.freshness_s)
        total = sum(n for _, n in ordered)
        out, seen, i = {}, 0, 0
        for q in sorted(quantiles):
            rank = min(total - 1, int(total * q))  # the same rank as sorted(samples)[int(len * q)]
            while seen + ordered[i][1] <= rank:
                seen += ordered[i][1]
                i += 1
            out[q] = ordered[i][0]
        return out

    # ------------------------------------------------------------------------------ end-of-stream logic

    def _caught_up(self) -> bool:
        """Every assigned partition is at its last known high watermark (no network call)."""
        assigned = self.consumer.assignment()
        return bool(assigned) and not any(self._may_fetch_more(tp) for tp in assigned)

    def _idle_at_end(self, now: float) -> bool:
        if self.exit_when_idle_s is None or now - self.last_event_at < self.exit_when_idle_s:
            return False
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        try:
            end = self.consumer.end_offsets(list(assigned), timeout_ms=5000)
        except Exception as exc:  # broker away: certainly not "finished"
            log.info("end offsets unavailable (%s); not treating the stream as finished", exc)
            return False
        return all(self.positions.get((tp.topic, tp.partition), 0) >= end[tp] for tp in assigned)

    # ------------------------------------------------------------------------------------- checkpoints

    def _checkpoint_due(self, now: float) -> bool:
        c = self.cfg.checkpoint
        steps = self.learner.steps - max(self.last_checkpoint_step, 0)
        if c.every_steps and steps >= c.every_steps:
            return True
        return bool(c.every_s) and now - self.last_checkpoint_at >= c.every_s

    def _warn_late_feedback(self) -> None:
        """Say in the log, at most once per checkpoint, that labels were dropped as late since the last time."""
        message = late_feedback_warning(self.join.counters, self._late_feedback_reported)
        if message is not None:
            log.warning(message)
            self._late_feedback_reported = int(self.join.counters["late_feedback"])

    def checkpoint(self, reason: str) -> bool:
        """Write a checkpoint of the current state, then commit offsets and publish; False if it was skipped.

        Called only between records (never in the middle of one), so positions match the saved state.
        """
        from consumers.state.checkpoints import positions_to_plain
        from consumers.runtime.learner_process import write_learner_checkpoint

        self.pipeline.collect(wait=True)  # a learner process: every batch sent is trained and counted
        self._warn_late_feedback()
        now = time.monotonic()
        step = self.learner.steps
        if self.fenced:
            log.warning("checkpoint (%s) skipped: another trainer owns this group's partitions now", reason)
            return False
        if (step == self.last_checkpoint_step and self.positions == self.last_checkpoint_positions
                and not self.publication_pending):
            self.last_checkpoint_at = now
            if reason != "periodic":
                log.info("checkpoint (%s): nothing changed since step %d", reason, step)
            return False
        if not self._flush_dead_letters():
            log.warning("checkpoint (%s) skipped: dead letters not yet acknowledged by Kafka", reason)
            return False
        started = time.perf_counter()
        publish = self.cfg.publish.enabled and step != self.last_published_step
        publication = None
        version = self.version
        if publish:
            version += 1
            manifest_meta = {
                "step": step,
                "watermark_ms": self.join.watermark_ms,
                "offsets": positions_to_plain(self.positions),
                "metrics": _plain(self.metrics.snapshot()),
                "config_hash": self.config_hash,
                "tasks": list(self.tasks),
                "published_at_ms": int(time.time() * 1000),
            }  # + "serving": the learner's serving metadata (write_learner_checkpoint)
            publication = {"manifest": manifest_meta, "version": version, "chunk_size": self.cfg.publish.chunk_bytes,
                           "previous_chunk_count": self.published_chunks,
                           "max_message_bytes": max(1_000_000, self.cfg.publish.chunk_bytes + 64 * 1024)}
        state = self.pipeline.stream_state()
        metadata = {
            "trainer_format": STATE_FORMAT,
            "positions": positions_to_plain(self.positions),
            "join_state": state["join_state"],
            "batcher_state": state["batcher_state"],
            "watermark_ms": self.join.watermark_ms,
            "config_hash": self.config_hash,
            "publish_version": version,
            "published_chunks": self.published_chunks,  # chunk keys the topic may hold; see write_learner_checkpoint
            "published": step == self.last_published_step,  # acknowledged before; this one's: store.publication()
            "trained_samples": self.trained_samples,
            "dead_letters": self.dead_letters,
        }
        if self.ledger is not None:
            self.ledger.commit(step)  # before the checkpoint: a segment without its checkpoint is discarded on start
        if self.pipeline.remote is not None:  # the learner process writes the file: the tensors stay there
            written = self.pipeline.remote.write_checkpoint(str(self.store.directory), self.store.keep_last,
                                                            metadata, publication)
        else:
            written = write_learner_checkpoint(self.learner, self.store, metadata, publication)
        path, messages, chunks = Path(written["path"]), written["messages"], written["chunks"]
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_written(seconds)
        self.last_checkpoint_step = step
        self.last_checkpoint_positions = dict(self.positions)
        self.last_checkpoint_at = time.monotonic()
        log.info("checkpoint (%s) step %d -> %s in %.2f s", reason, step, path.name, seconds)
        self._commit_offsets()
        if publish:
            self.version = version
            # Until Kafka acknowledges it, chunk keys of this publication and of the last one may be on the topic:
            # the next publication tombstones every key beyond its own count up to the larger of the two.
            self.published_chunks = max(self.published_chunks, chunks)
            if self._publish(messages, version, step, checkpointed_at=self.last_checkpoint_at):
                self.published_chunks = chunks
        return True

    def _publication_retry_due(self, now: float) -> bool:
        return self.publication_pending and now - self.last_publish_attempt_at >= self._publish_retry_delay()

    def _publish_retry_delay(self) -> float:
        """Seconds before the next publication attempt: PUBLISH_RETRY_S[0], doubling per failure, at most [1]."""
        low, high = PUBLISH_RETRY_S
        return min(high, low * 2 ** max(0, self.publish_failures - 1))

    def _flush_dead_letters(self, timeout_s: float = 30.0) -> bool:
        """True once Kafka acknowledged every dead letter so far. Refused or failed ones are sent again (once per
        call), so a broker outage delays checkpoints instead of disabling them; until then a crash replays their
        records and dead-letters them again (at least once, never lost)."""
        from kafka.errors import KafkaError

        if not self._pending_dead_letters:
            return True
        for attempt in range(2):
            if attempt:
                for entry in self._pending_dead_letters:
                    entry[0] = self._send_dead_letter(entry[1])
            try:
                self.producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                log.warning("flushing dead letters: %s", exc)
            self._pending_dead_letters = [entry for entry in self._pending_dead_letters
                                          if entry[0] is None or not entry[0].is_done or entry[0].failed()]
            if not self._pending_dead_letters:
                return True
        log.warning("%d dead letters not acknowledged by Kafka yet; they are retried before the next checkpoint",
                    len(self._pending_dead_letters))
        return False

    def _commit_offsets(self, positions: dict[tuple[str, int], int] | None = None) -> None:
        """Commit ``positions`` (default: the current ones, just checkpointed) for lag dashboards.

        A commit refused with FencedInstanceIdError means another trainer with this ``group_instance_id`` took
        the partitions over (kafka-python only disables its heartbeat then): ``fenced`` is set, and the loop
        exits with status 5 before writing anything else.
        """
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import FencedInstanceIdError

        positions = self.positions if positions is None else positions
        assigned = self.consumer.assignment()
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in positions.items()
                   if TopicPartition(t, p) in assigned}
        lag = {}
        for tp in assigned:
            high = self.consumer.highwater(tp)
            if high is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - positions.get((tp.topic, tp.partition), 0))
        self.metrics.consumer_lag(lag)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=5000)  # bounded: a broker away must not hold up a shutdown
        except FencedInstanceIdError:
            self.fenced = True
        except Exception as exc:  # only for lag dashboards: the checkpoint already holds the truth
            log.warning("committing offsets to Kafka failed (lag metrics only, training unaffected): %s", exc)

    def _publish(self, messages: list, version: int, step: int, checkpointed_at: float, timeout_s: float = 60.0) -> bool:
        """Publish ``messages`` (the serving view of ``step``); only an acknowledged publication is recorded as
        done (``store.write_publication``); a failed one is retried with a newer version (``_publication_retry_due``).
        Returns whether Kafka acknowledged every message."""
        started = time.perf_counter()
        topic = self.cfg.kafka.model_topic
        from kafka.errors import KafkaError

        self.last_publish_attempt_at = time.monotonic()
        try:
            futures = [self.producer.send(topic, key=key, value=value, partition=0) for key, value in messages]
            self.producer.flush(timeout=timeout_s)
            failed = [f for f in futures if not f.is_done or f.failed()]
            problem = f"{len(failed)} of {len(futures)} messages not acknowledged" if failed else None
        except KafkaError as exc:  # no metadata within max_block_ms, flush timed out: the broker is away
            problem = str(exc)
        if problem is not None:
            self.unacknowledged_version = version
            self.publication_pending = True
            self.publish_failures += 1
            log.warning("publication of version %d (step %d) failed (%s); retried with a newer version in %.0f s, "
                        "and at the next start if this process stops first", version, step, problem,
                        self._publish_retry_delay())
            return False
        seconds = time.perf_counter() - started
        self.unacknowledged_version = None
        self.publication_pending = False
        self.publish_failures = 0
        self.last_published_step = step
        try:
            self.store.write_publication(version, step)
        except OSError as exc:  # the publication stands; a restart would only publish this step once more
            log.warning("recording publication %d in %s failed: %s", version, self.store.directory, exc)
        self.publication_delay_s.append(time.monotonic() - checkpointed_at)
        self.metrics.published(version, seconds, time.time())
        self.metrics.mark_published_reference()
        log.info("published version %d (%d messages) to %s in %.2f s", version, len(messages), topic, seconds)
        return True

    # ---------------------------------------------------------------------------------- rebalance, health

    def _offsets_at(self, start_ms: int, topics: list[str]) -> dict[tuple[str, int], int]:
        """``--from-time``: per partition without a checkpointed position, the first offset stamped at or after
        ``start_ms`` (the end offset when no record is that recent)."""
        from kafka import TopicPartition

        wanted = [TopicPartition(topic, p) for topic in topics for p in sorted(self.consumer.partitions_for_topic(topic) or ())
                  if (topic, p) not in self.positions]
        if not wanted:
            log.info("--from-time: every known partition resumes from the checkpoint; the time is not used")
            return {}
        found = self.consumer.offsets_for_times({tp: start_ms for tp in wanted})
        missing = [tp for tp in wanted if found.get(tp) is None]
        ends = self.consumer.end_offsets(missing) if missing else {}
        offsets = {(tp.topic, tp.partition): (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in wanted}
        log.info("--from-time %d: partitions without a checkpointed position start at %s", start_ms,
                 {f"{t}-{p}": o for (t, p), o in sorted(offsets.items())})
        return offsets

    def _align_partitions(self) -> None:
        """Pause the partitions more than ``join.max_skew_s`` of event time ahead of the slowest one; resume them
        once it catches up.

        Kafka hands out bytes per partition, not event time: on a backlog, the feedback topic (small events)
        runs far ahead of the impressions, and the join holds every early feedback until its impression comes
        (190k-223k of them over a 1M-event replay in bench/trainer_throughput.py without this). Never waits on
        itself: when no partition that is not ahead has anything left to fetch, every partition is resumed.
        """
        if self.max_skew_ms is None or self.consumer is None:
            return
        _release_drained_records(self.consumer)
        assigned = self.consumer.assignment()
        watermark = self.join.watermark_ms
        ahead: set = set()
        if watermark is not None and assigned:
            limit = watermark + self.lateness_ms + self.max_skew_ms
            for tp in assigned:
                newest = self.join.source_max_ts((tp.topic, tp.partition))
                if newest is not None and newest > limit:
                    ahead.add(tp)
            if not any(self._may_fetch_more(tp) for tp in assigned if tp not in ahead):
                ahead = set()
        if ahead != self.paused:
            if self.paused - ahead:
                self.consumer.resume(*(self.paused - ahead))
            if ahead - self.paused:
                self.consumer.pause(*(ahead - self.paused))
                self.partition_pauses += len(ahead - self.paused)
            log.debug("paused (ahead in event time): %s", sorted(f"{tp.topic}-{tp.partition}" for tp in ahead))
            self.paused = ahead

    def _may_fetch_more(self, tp: Any) -> bool:
        """The partition is not known to be read to its end (its high watermark is unknown before a fetch)."""
        high = self.consumer.highwater(tp)
        return high is None or self.positions.get((tp.topic, tp.partition), 0) < high

    def on_assigned(self, partitions: list) -> None:
        """Seek every newly assigned partition to its checkpointed position (else ``--from-time``'s offset, else
        its beginning)."""
        now = time.monotonic()
        self.paused = {tp for tp in self.paused if tp in self.consumer.assignment() and tp not in partitions}
        if self.first_assigned_at is None:
            self.first_assigned_at = now
        self.last_event_at = now  # "idle" counts from the assignment, not from the (slow) start-up
        for tp in partitions:
            key = (tp.topic, tp.partition)
            position = self.positions.get(key)
            if position is None and key in self.start_offsets:
                # Recorded as the partition's position: the next checkpoint keeps the --from-time start, so a
                # restart (with or without the flag) never goes back to the beginning.
                position = self.positions[key] = self.start_offsets[key]
            if position is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, position)
        self.join.assign([(tp.topic, tp.partition) for tp in self.consumer.assignment()], now)
        log.info("assigned %s", sorted(f"{tp.topic}-{tp.partition}" for tp in partitions))

    def on_revoked(self, partitions: list) -> None:
        """Checkpoint before partitions go away, so their positions match the state that has their events."""
        if partitions and self.consumer is not None:
            self.checkpoint("rebalance")

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) for /healthz: the poll loop is alive."""
        stalled = time.monotonic() - self.last_poll_ok_at
        limit = max(60.0, self.cfg.kafka.max_poll_interval_ms / 1000)
        if stalled > limit:
            return False, f"poll loop stalled for {stalled:.0f} s"
        remote = self.pipeline.remote
        if remote is not None and remote.process.poll() is not None:
            return False, f"the learner process exited with status {remote.process.returncode}"
        unassigned = self.unassigned_since
        if unassigned is not None and time.monotonic() - unassigned > 60.0:
            return False, f"no partition assigned for {time.monotonic() - unassigned:.0f} s"
        return True, f"step {self.learner.steps}, {self.trained_samples} samples trained"

    def _stalled(self, now: float) -> bool:
        """True once no partition has been assigned for ``kafka.stall_exit_s`` (0 disables the check).

        While it waits it says why every 30 s (after 15 s): topics that do not exist are the usual reason.
        """
        if self.consumer.assignment():
            self.unassigned_since = self._unassigned_warned_at = None
            return False
        if self.unassigned_since is None:
            self.unassigned_since = now
        waited = now - self.unassigned_since
        warned = self._unassigned_warned_at
        if waited >= 15.0 and (warned is None or now - warned >= 30.0):
            self._unassigned_warned_at = now
            log.warning("no partition assigned after %.0f s%s", waited, self._missing_topics_hint())
        limit = self.cfg.kafka.stall_exit_s
        return bool(limit) and waited >= limit

    def _missing_topics_hint(self) -> str:
        """``"; topic(s) ... do not exist ..."`` when the subscribed topics are missing, else ``""``."""
        k = self.cfg.kafka
        # The client's cached metadata, not consumer.topics(): that one waits for the broker without a timeout.
        cluster = getattr(self.consumer, "_cluster", None)
        try:
            existing = cluster.topics() if cluster is not None else self.consumer.topics()
        except Exception:  # no metadata yet: nothing to add
            return ""
        missing = [t for t in (k.impressions_topic, k.feedback_topic) if t not in existing]
        if not missing:
            return ""
        return (f"; topic(s) {', '.join(missing)} do not exist on {k.bootstrap} (create them, e.g. 'crossdistil kafka "
                "up' creates the defaults, or point kafka.impressions_topic / kafka.feedback_topic at existing ones)")

    def _request_stop(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current batch, then checkpoint and exit", signum)
        self.stop_requested = True


def _rebalance_listener(trainer: Trainer):
    """A kafka-python rebalance listener that hands over to the trainer (called inside ``poll``, between records)."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: list) -> None:
            trainer.on_revoked(list(revoked))

        def on_partitions_assigned(self, assigned: list) -> None:
            trainer.on_assigned(list(assigned))

    return Listener()


def decode_events_safe(value: Any) -> list:
    """``streamer.events.decode_events``; a tombstone (value None) is a bad message like any other."""
    return decode_record(value)


def _plain(value: Any) -> Any:
    """numpy scalars and tuples into plain msgpack values (metrics snapshots)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience for `python -m consumers.trainer.daemon`
    parser = argparse.ArgumentParser(prog="crossdistil train")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
