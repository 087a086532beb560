"""``crossdistil train``: the trainer daemon — Kafka in, CrossDistil updates, checkpoints, serving-topic publications.

The flow (one consumer, one model)::

    poll impressions + feedback  ->  decode_record  ->  Pipeline.ingest  ->  bad: dead-letter topic
                                                                        ->  good: AttributionJoin
                                                                                  (source = (topic, partition))
    Pipeline.train_ready: join.emit()  ->  MiniBatcher (wall clock)  ->  encode_rows  ->  Learner.step (score first,
                          then update)  ->  TrainerMetrics, ledger
    every N steps / T seconds / on shutdown / before a rebalance revokes partitions:
        checkpoint (model + optimizers, join state, batcher state, positions, publish version)
        -> commit the positions to Kafka (only for lag monitoring)  ->  publish the serving view (consumers.state.wire)

Everything between decoding and the metrics is ``consumers.core.pipeline.Pipeline``, shared with ``crossdistil
backtest``: this module is the daemon around it, and the pipeline's clock here is the wall clock
(``time.monotonic``). Its loop only sequences units of their own, each tested without a ``Trainer``:

* ``consumers.trainer.kafka_io``: consumer and producer, assignment, positions, pausing, offsets, takeovers;
* ``consumers.trainer.dead_letters``: the dead-letter queue (what is produced, with which headers);
* ``consumers.trainer.checkpointing``: restore and write a consistent cut (exactly once);
* ``consumers.trainer.publisher``: publication to the serving topic and its retries;
* ``consumers.trainer.freshness``: seconds from a sample's emission by the join to its training step;
* ``consumers.runtime.learner_process``: the learner here or in a process of its own. The records of
one partition in one poll go to the join together (``AttributionJoin.add_events``, up to a batch's worth of
events at a time): they arrived together, so the partition's event-time clock advances once for all of them.

With ``model.separate_process = true`` the learner lives in a child process (``consumers.runtime.learner_process``):
``Learner.step`` of a batch overlaps with the polling, decoding and joining of the next ones, answers come back
in order, and a checkpoint waits for every answer before the child writes the file. Everything below holds in
both modes.

Exactly once: see ``consumers.trainer.checkpointing``. The daemon is the only member of its consumer group
(one model, one trainer; static membership makes a second one take over and the first exit with status 5); a
revoked partition's pending impressions stay in the join and are trained as usual. Publication: see
``consumers.trainer.publisher``; dead letters: ``consumers.trainer.dead_letters``. Trained-sample ledger
(``--ledger DIR``, for audits and tests): ``consumers.state.ledger``; segments are written just before the
checkpoint of the same step, and segments newer than the restored checkpoint are deleted on start, so the
ledger lists exactly the samples inside the restored model.

Finite streams: ``--exit-when-idle SECONDS`` ends the daemon once no event arrived for that long *and* every
assigned partition is at its end offset: the join and the batcher are flushed (every pending impression is
trained with the labels it has), a final checkpoint is written and published, and the process exits 0.
SIGTERM / SIGINT end it the same way without the flush (pending impressions stay in the checkpoint).

Exit status: 0 after a stop or the end of a finite stream; 2 for a configuration error; 3 when Kafka cannot be
reached at start; 4 when no partition was assigned for ``kafka.stall_exit_s`` (a group join stuck in the client,
or a broker gone for good): the daemon checkpoints and exits so that its supervisor (systemd ``Restart=on-failure``,
Kubernetes) starts a fresh process, which resumes from that checkpoint; 5 when another trainer with the same
``group_instance_id`` took the partitions over (no checkpoint: the other one owns the model now); 6 when the
learner process (``model.separate_process``) failed or died (no checkpoint; a restart resumes from the last); 7
when the Kafka client cannot decode a record batch (a compression codec that is not installed, a batch that fails
its checksum): the error names its topic, partition and offset, everything before it is checkpointed, and nothing
is skipped (the client hands out no bytes of such a batch, so there is nothing to dead-letter, and skipping would
lose its events without a trace). A restart by hand (once the codec is installed) retries the batch; the systemd
unit does not restart on 5 or 7 by itself. 9 when the last checkpoint (at a stop or the end of a stream) could
not be written: see below. 10 when the model diverged: its weights or optimizer state hold NaN or infinite values
(a learning rate too high, a loss that overflowed), found when a checkpoint is due; that model is neither
checkpointed nor published, nothing since the last checkpoint is committed to Kafka, and the error names the last
good checkpoint. A restart with the same settings would diverge again on the same events, so the systemd unit does
not restart on 10: lower the learning rate (``model.options.lr`` may change on a restart) and start it again.

A checkpoint that cannot be written (a full disk, a file size limit, a folder made read-only) is an error in the
log naming the step, the file system's reason and the previous checkpoint, which stays intact (the write removes
its temporary file); training goes on, and the checkpoint is tried again after ``CHECKPOINT_RETRY_S[0]`` s,
doubling up to ``CHECKPOINT_RETRY_S[1]`` s (a rebalance tries at once). Nothing is lost: Kafka offsets are
committed only after a checkpoint, and a restart resumes from the previous one and trains the events since then
again, once. ``/healthz`` says since when checkpoints fail. If the last one fails too, the daemon says so on stderr
and exits 9.

Static membership (``kafka.group_instance_id``, on by default): a trainer restarted after a crash gets its
partitions back within seconds instead of after the group's session timeout (measured on the local broker:
5.5 s from restart to assignment, against 45.3 s with dynamic membership and the default 45 s timeout).
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from consumers.core.pipeline import decode_record, future_bound_ms
from consumers.runtime.assembly import build_pipeline
from consumers.runtime.config import BOOTSTRAP_HINT, Config, kafka_client_options
from consumers.runtime.httpd import serve_http
from consumers.runtime.learner_process import LearnerProcessError
from consumers.runtime.processes import tune_gc
from consumers.runtime.stoppable import call_unless_stopped
from consumers.runtime.telemetry import TrainerMetrics
from consumers.state.checkpoints import CheckpointStore
from consumers.state.learner_state import ModelDiverged
from consumers.state.ledger import Ledger
from consumers.state.wire import publication_message_bytes
from consumers.trainer.checkpointing import Checkpointer
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.exits import EXIT_CHECKPOINT_FAILED, EXIT_MODEL_DIVERGED
from consumers.trainer.freshness import Freshness
from consumers.trainer.kafka_io import (
    DeadLetterTopicError,
    KafkaClients,
    KafkaIO,
    ModelTopicError,
    check_model_topic,
    connect,
    new_producer,
    newest_published_version,
)
from consumers.trainer.publisher import Publisher, retry_delay_s
from streamer.events import EventError
from streamer.kafka_security import connection_failure

log = logging.getLogger("crossdistil.trainer")

IN_FLIGHT_POLL_MS = 5  # poll timeout while the learner process holds batches: their answers feed metrics and freshness
CHECKPOINT_RETRY_S = (10.0, 300.0)  # a checkpoint that failed is tried again after 10 s, doubling up to 300 s


class Trainer:
    """The daemon: a pipeline, its Kafka side, dead letters, checkpoints, publication, metrics and freshness."""

    def __init__(self, cfg: Config, exit_when_idle_s: float | None = None, ledger_dir: str | None = None,
                 start_ms: int | None = None, ranks: Any = None) -> None:
        self.cfg = cfg
        self.exit_when_idle_s = exit_when_idle_s
        self.start_ms = start_ms  # --from-time: where partitions without a checkpointed position start
        self.registry = CollectorRegistry()
        self.metrics = TrainerMetrics.from_config(cfg, registry=self.registry)
        self.freshness = Freshness()
        # Folders this start makes: a start that ends before training (Kafka unreachable, a stop) removes them again.
        self.new_folders = missing_folders(cfg.checkpoint.dir, *([ledger_dir] if ledger_dir else []))
        self.ledger = Ledger(ledger_dir, tuple(cfg.model.learnt_tasks)) if ledger_dir else None
        # The one code path shared with the backtest; the live clock is the wall clock.
        # ranks: one rank of several (consumers.trainer.ranked), whose learner steps with the other ranks.
        self.pipeline = build_pipeline(cfg, clock=time.monotonic, metrics=self.metrics, ledger=self.ledger,
                                       on_batch=self._on_batch, on_emitted=self.freshness.emitted, ranks=ranks)
        try:  # one writer per checkpoint directory: a second trainer there is refused (CheckpointDirectoryInUse)
            self.store = CheckpointStore(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last, lock=True)
        except OSError:
            self.pipeline.close()
            raise
        longest_window_s = max(self.pipeline.join.config.attribution_window_s.values(), default=0.0)
        skew_s = longest_window_s if cfg.join.max_skew_s == -1 else cfg.join.max_skew_s
        # The Kafka clients are attached by run(); restore() needs none.
        self.kafka = KafkaIO(None, cfg.kafka, self.pipeline.join, self.metrics,
                             max_skew_ms=int(skew_s * 1000) if skew_s > 0 else None,
                             lateness_ms=int(cfg.join.allowed_lateness_s * 1000))
        self.dead_letters = DeadLetterQueue(None, cfg.kafka.dead_letter_topic)
        self.publisher = Publisher(None, cfg.kafka.model_topic, self.store, self.metrics)
        self.checkpoints = Checkpointer(cfg, self.store, self.pipeline, self.kafka, self.dead_letters,
                                        self.publisher, self.metrics, self.ledger)
        now = time.monotonic()
        self.last_event_at = self.last_poll_ok_at = now
        self.stop_requested = False
        self.exit_status = 0
        self.events_consumed = 0
        self.flush_started_at: float | None = None  # end of a finite stream (exit_when_idle)
        self.drained_at: float | None = None
        self.checkpoint_failures = CheckpointFailures()

    @property
    def learner(self) -> Any:
        """The learner port (``consumers.runtime.learner_process``): ``steps``, checkpoints, liveness."""
        return self.pipeline.learner

    @property
    def trained_samples(self) -> int:
        """Samples trained so far (restored from the checkpoint, so it counts across restarts)."""
        return self.pipeline.trained_samples

    # ------------------------------------------------------------------------------------------ lifecycle

    def restore(self) -> int | None:
        """Restore the newest verified checkpoint (``Checkpointer.restore``); its step or None."""
        step = self.checkpoints.restore()
        if self.pipeline.batcher.waiting:  # a restored partial batch waits from now on
            self.freshness.emitted(self.pipeline.batcher.waiting, time.monotonic())
        return step

    def checkpoint(self, reason: str, final: bool = False) -> bool:
        """Checkpoint, commit offsets, publish (``Checkpointer.write``); False if it was skipped or could not be
        written (an OSError of the file system: logged, tried again later unless ``final``, see the module
        docstring)."""
        failures = self.checkpoint_failures
        try:
            written = self.checkpoints.write(reason)
        except ModelDiverged as exc:  # nothing was written: stop, status 10 (said once: the final checkpoint too)
            if self.exit_status != EXIT_MODEL_DIVERGED:
                say_diverged(exc, self.checkpoints.last_step)
            self.exit_status, self.stop_requested = EXIT_MODEL_DIVERGED, True
            return False
        except OSError as exc:
            failures.failed(exc, time.monotonic())
            log.error("checkpoint (%s) of step %d could not be written in %s: %s; %s; nothing is committed to Kafka "
                      "until a checkpoint lands%s", reason, self.learner.steps, self.store.directory, exc,
                      resume_note(self.checkpoints.last_step, "previous"),
                      "" if final else f"; tried again in {failures.retry_s():.0f} s")
            return False
        if written and failures.error is not None:
            log.info("checkpoint of step %d written after %d failed attempts", self.learner.steps, failures.attempts)
            failures.clear()
        return written

    def _final_checkpoint(self, reason: str) -> None:
        """The checkpoint before the daemon exits; one that cannot be written (``final_checkpoint_problem``) is said
        on stderr, and the exit status becomes ``EXIT_CHECKPOINT_FAILED`` (unless it already says why it stops)."""
        self.checkpoint(reason, final=True)
        unacknowledged = 0 if self.kafka.fenced else self.dead_letters.pending  # fenced: another trainer's now
        why = final_checkpoint_problem(self.checkpoint_failures.error, unacknowledged, self.dead_letters.topic)
        if why is None:
            return
        print(f"crossdistil train: the last checkpoint could not be written in {self.store.directory} ({why}); "
              f"{resume_note(self.checkpoints.last_step, 'previous')}", file=sys.stderr, flush=True)
        if self.exit_status == 0:
            self.exit_status = EXIT_CHECKPOINT_FAILED

    def run(self) -> int:
        """Restore, connect, and train until stopped (SIGTERM/SIGINT; while it connects too: status 0) or idle at the
        end (``exit_when_idle_s``)."""
        tune_gc()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        self.restore()
        try:
            http = (serve_http(self.cfg.metrics.bind, self.cfg.metrics.port, self.registry, self.health)
                    if self.cfg.metrics.port else None)
        except OSError as exc:  # the port is taken (a second trainer?) or the address is not this machine's
            print(f"crossdistil train: {exc}", file=sys.stderr)
            return self._abandon_start(None, 2)
        if http is not None:
            print(f"crossdistil train: metrics at {http.url}/metrics, health at {http.url}/healthz", flush=True)
        else:
            print("crossdistil train: metrics and health endpoints are off (metrics.port = 0)", flush=True)
        k = self.cfg.kafka
        try:
            clients = call_unless_stopped(self._connect, lambda: self.stop_requested, discard=close_clients)
        except DeadLetterTopicError as exc:  # missing, and Kafka refused to make it (2) or could not answer (3)
            print(f"crossdistil train: {exc}", file=sys.stderr)
            return self._abandon_start(http, exc.status)
        except KafkaError as exc:
            failure = connection_failure(k.bootstrap, kafka_client_options(k), exc, hint=BOOTSTRAP_HINT)
            print(f"crossdistil train: {failure}", file=sys.stderr)
            return self._abandon_start(http, 3)
        if clients is None:
            print("crossdistil train: stopped before Kafka was reached; nothing was trained", flush=True)
            return self._abandon_start(http, 0)
        self.kafka.consumer = clients.consumer
        self.publisher.producer = clients.producer
        self.publisher.renew = functools.partial(new_producer, self.cfg.kafka)
        self.dead_letters.producer = clients.dead_letter_producer
        if self.cfg.publish.enabled:
            try:
                continue_versions(self.cfg, self.publisher)
            except ModelTopicError as exc:
                print(f"crossdistil train: {exc}", file=sys.stderr)
                close_clients(clients)
                return self._abandon_start(http, 2)
        if not self._consume():
            self._close(clients, http)
            return self.exit_status
        device = getattr(self.learner, "device", None) or self.cfg.model.device
        graphs = (f" (CUDA graphs: each batch of {self.cfg.batching.batch_size} rows replays one captured step)"
                  if self.cfg.model.cuda_graphs else "")
        print(f"crossdistil train: consuming {k.impressions_topic}, {k.feedback_topic} from {k.bootstrap} "
              f"as group {k.group_id}; checkpoints in {self.store.directory}; the learner trains on {device}{graphs}",
              flush=True)
        try:
            self._loop()
        finally:
            self._close(clients, http)
        print(self._summary(), flush=True)
        if self.kafka.first_assigned_at is not None and self.events_consumed:
            flush_s = self.drained_at - self.flush_started_at if self.drained_at and self.flush_started_at else 0.0
            seconds = self.last_event_at - self.kafka.first_assigned_at + flush_s
            print(f"crossdistil train: consumed {self.events_consumed} events in {seconds:.3f} s (from the first "
                  "assignment to the last event, plus the final flush)", flush=True)
        return self.exit_status

    def _abandon_start(self, http: Any, status: int) -> int:
        """A start that ends before the loop: the endpoint and the learner closed, the folders it made (still
        empty) removed; returns ``status``."""
        if http is not None:
            http.close()
        self.pipeline.close()
        self.store.unlock(remove=self.store.directory in self.new_folders)  # a folder it made goes, lock file too
        for folder in self.new_folders:
            try:
                folder.rmdir()
            except OSError:  # something was written into it after all: it stays
                pass
        return status

    def _connect(self) -> KafkaClients:
        """The Kafka consumer and producers (``kafka_io.connect``)."""
        return connect(self.cfg.kafka)

    def _consume(self) -> bool:
        """Start consuming: join the group (its rebalances assign the partitions); False ends the run."""
        self.kafka.subscribe(self.start_ms)
        return True

    def _close(self, clients: KafkaClients, http: Any) -> None:
        """Close the clients, the endpoint and the learner; a failure to close is logged, never raised over
        how the loop ended."""
        clients.close(timeout_s=10)
        self.publisher.close_renewed(timeout_s=10)
        if http is not None:
            http.close()
        self.pipeline.close()

    def _summary(self) -> str:
        unacknowledged = self.publisher.unacknowledged_version
        return (f"crossdistil train: stopped at step {self.learner.steps}; {self.trained_samples} samples trained, "
                f"{self.pipeline.dead_letters} dead letters, publication version {self.publisher.version}"
                + (f", {self.kafka.partition_pauses} partition pauses (join.max_skew_s)" if self.kafka.max_skew_ms
                   else "")
                + ("" if unacknowledged is None else
                   f" (version {unacknowledged} was not acknowledged by Kafka: "
                   "the next start publishes this step again)"))

    # ------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        """Poll -> ingest -> train what is ready -> checkpoint when due -> exit when done, until stopped."""
        while not self.stop_requested:
            # -- poll --------------------------------------------------------------------------------------
            started = time.monotonic()
            timeout_ms = self._poll_timeout_ms(started)
            polled = self.kafka.poll(timeout_ms)
            if self.kafka.fenced:
                self._exit_fenced()
                return
            if self.kafka.unreadable:
                self._exit_unreadable()
                break
            now = self.last_poll_ok_at = time.monotonic()
            self.learner.check_alive()  # a dead learner process ends the daemon (status 6), idle or not
            # -- ingest, training as batches fill up -------------------------------------------------------
            if self._batch_overdue(now):  # the partial batch whose delay ran out while we polled goes first
                self.pipeline.train_ready(now, self._train_lead_s())
            if polled:
                self._ingest(polled, now)
                now = self.last_event_at = time.monotonic()  # emissions below are timed after a long poll
            self.kafka.align()
            if not polled and self.kafka.caught_up():
                self.pipeline.tick(now)  # decided only when read to the end: idle partitions time out
            # -- train what is ready -----------------------------------------------------------------------
            self.pipeline.train_ready(now, self._train_lead_s())
            # -- checkpoint and publish when due ------------------------------------------------------------
            reason = self._checkpoint_reason(now)
            if reason is not None:
                self.checkpoint(reason)
            # -- exit: the end of a finite stream, or no partition for too long ------------------------------
            if self._idle_at_end(now):
                self._finish_stream(now)
                return
            if self.kafka.stalled(now):
                self._exit_stalled(now)
                break
            if not polled and timeout_ms and time.monotonic() - started < timeout_ms / 4000:
                time.sleep(timeout_ms / 1000)  # kafka-python returns at once while it has no connection
        self._final_checkpoint("shutdown")

    # ------------------------------------------------------------------------------------- loop phases

    def _poll_timeout_ms(self, now: float) -> int:
        """Wait no longer than the partial batch may (max_batch_delay_s holds when the stream pauses), and only
        briefly while the learner process holds batches (their answers feed metrics and freshness)."""
        timeout_ms = self.cfg.kafka.poll_timeout_ms
        deadline = self.pipeline.batcher.next_deadline()
        if deadline is not None:
            timeout_ms = int(min(timeout_ms, max(0.0, (deadline - self._train_lead_s() - now) * 1000)))
        if self.learner.in_flight:
            timeout_ms = min(timeout_ms, IN_FLIGHT_POLL_MS)
        return timeout_ms

    def _ingest(self, polled: dict, now: float) -> None:
        """Every polled record into the pipeline, training each time a batch's worth of events went in (a poll
        can hold hundreds of thousands of events: a sample whose windows closed early is not kept waiting)."""
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

    def _process_records(self, topic: str, partition: int, records: list[Any], start: int, room: int,
                         now: float) -> tuple[int, int]:
        """Decode ``records[start:]`` of one partition until ``room`` events are read, and hand them to the
        pipeline as one message (``AttributionJoin.add_events``: they arrived in one poll, so the partition's
        event-time clock advances once for all of them); bad events go to the dead-letter queue, events stamped more
        than ``join.max_future_s`` after the wall clock too.
        Returns (records taken, events read)."""
        decoded: list[list[Any]] = []
        events: list[Any] = []
        end = start
        not_after = future_bound_ms(self.cfg.join.max_future_s, time.time())  # a producer's clock far ahead
        while end < len(records) and len(events) < room:
            record_events = decode_record(records[end].value, not_after)
            decoded.append(record_events)
            events += record_events
            end += 1
        if self.pipeline.ingest(events, (topic, partition), now):  # rare: find the records the bad events are in
            for record, record_events in zip(records[start:end], decoded):
                for event in record_events:
                    if isinstance(event, EventError):
                        self.dead_letters.add(event, record, topic, partition)
        self.kafka.positions[(topic, partition)] = records[end - 1].offset + 1
        self.events_consumed += len(events)
        return end - start, len(events)

    def _train_lead_s(self) -> float:
        """How much earlier than ``max_batch_delay_s`` a partial batch is cut, so that it is *trained* (and its
        metrics done) within it: the last batch's time from hand-over to metrics, plus one step per batch still
        ahead of it in the learner process; at most half the delay."""
        lead = self.pipeline.last_batch_s + self.pipeline.last_step_s * self.learner.in_flight
        return min(lead, self.cfg.batching.max_batch_delay_s / 2)

    def _batch_overdue(self, now: float) -> bool:
        deadline = self.pipeline.batcher.next_deadline()
        return deadline is not None and now + self._train_lead_s() >= deadline

    def _checkpoint_reason(self, now: float) -> str | None:
        """Why a checkpoint is due now, if one is: partitions revoked, a loss that is not a number (the checkpoint
        checks the model: ``ModelDiverged``), the schedule, or a publication to retry."""
        if self.kafka.revoked:
            self.kafka.revoked = False
            return "rebalance"
        if self.pipeline.non_finite_loss_step is not None:  # the model is checked as a checkpoint is written
            log.warning("the training loss was not a finite number at step %d: checking the model now",
                        self.pipeline.non_finite_loss_step)
            self.pipeline.non_finite_loss_step = None
            return "non-finite loss"
        if self.checkpoint_failures.waiting(now):
            return None  # the last attempt failed: wait before writing a whole checkpoint again
        if self.checkpoints.due(now):
            return "periodic"
        if self.publisher.retry_due(now):
            return "publication retry"
        return None

    def _idle_at_end(self, now: float) -> bool:
        """``--exit-when-idle``: no event for that long (counted from the last assignment at the earliest) and
        every partition read to its end offset."""
        if self.exit_when_idle_s is None:
            return False
        quiet_since = max(self.last_event_at, self.kafka.assigned_at or self.last_event_at)
        return now - quiet_since >= self.exit_when_idle_s and self.kafka.at_end()

    def _finish_stream(self, now: float) -> None:
        """The end of a finite stream: train every pending impression with the labels it has, then checkpoint."""
        log.info("no event for %.1f s and at the end of every partition: flushing and exiting", self.exit_when_idle_s)
        self.flush_started_at = time.monotonic()
        self.pipeline.flush(now)
        self.drained_at = time.monotonic()
        self._final_checkpoint("end of stream")

    def _exit_fenced(self) -> None:
        log.error("another trainer joined group %s with the same group_instance_id and took the partitions over; "
                  "exiting with status 5 without a checkpoint (two trainers must not write one model: give each "
                  "its own kafka.group_id and checkpoint.dir)", self.cfg.kafka.group_id)
        self.exit_status = 5

    def _exit_unreadable(self) -> None:
        log.error("%s; exiting with status 7 after a checkpoint of everything before it", self.kafka.unreadable)
        self.exit_status = 7

    def _exit_stalled(self, now: float) -> None:
        log.error("no partition assigned for %.0f s (kafka.stall_exit_s): the group join is stuck or the broker is "
                  "gone%s; checkpointing and exiting with status 4 so that a supervisor restarts the trainer",
                  now - self.kafka.unassigned_since, self.kafka.missing_topics_hint())
        self.exit_status = 4

    # ------------------------------------------------------------------------------ hooks, health, signals

    def _on_batch(self, samples: list, _labels: Any, _scores: Any, _fired: Any) -> None:
        self.freshness.trained(len(samples))

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) for /healthz: the poll loop and the learner are alive, partitions are assigned."""
        stalled = time.monotonic() - self.last_poll_ok_at
        limit = max(60.0, self.cfg.kafka.max_poll_interval_ms / 1000)
        if stalled > limit:
            return False, f"poll loop stalled for {stalled:.0f} s"
        try:
            self.learner.check_alive()
        except LearnerProcessError as exc:
            return False, str(exc)
        unassigned = self.kafka.unassigned_since
        if unassigned is not None and time.monotonic() - unassigned > 60.0:
            return False, f"no partition assigned for {time.monotonic() - unassigned:.0f} s"
        failing = self.checkpoint_failures.describe(time.monotonic(), self.checkpoints.last_step)
        return True, f"step {self.learner.steps}, {self.trained_samples} samples trained{failing}"

    def _request_stop(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current batch, then checkpoint and exit", signum)
        self.stop_requested = True


class CheckpointFailures:
    """Checkpoints that could not be written since the last one that was (a full disk, a folder made read-only):
    when the first and the last attempt failed, how many did, the last error, and when to try again."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """A checkpoint was written: nothing fails any more."""
        self.first_at = self.last_at = 0.0
        self.attempts = 0
        self.error: OSError | None = None

    def failed(self, exc: OSError, now: float) -> None:
        if self.error is None:
            self.first_at = now
        self.last_at, self.error = now, exc
        self.attempts += 1

    def retry_s(self) -> float:
        """Seconds between attempts: ``CHECKPOINT_RETRY_S[0]``, doubling per failure, at most ``[1]``."""
        return retry_delay_s(self.attempts, CHECKPOINT_RETRY_S)

    def waiting(self, now: float) -> bool:
        """The last attempt failed and the next one is not due yet (a whole checkpoint is not rewritten per poll)."""
        return self.error is not None and now - self.last_at < self.retry_s()

    def describe(self, now: float, last_step: int) -> str:
        """What /healthz adds while checkpoints fail (said, not unhealthy: a restart would not free the disk)."""
        if self.error is None:
            return ""
        return (f"; checkpoints failing for {now - self.first_at:.0f} s ({self.attempts} attempts, last: {self.error}),"
                f" the last one written is step {last_step}")


def say_diverged(exc: ModelDiverged, last_step: int) -> None:
    """Say on stderr and in the log that the model diverged (``ModelDiverged``, raised before anything was written),
    what a restart resumes from and what to change first."""
    message = (f"the model diverged: {exc}. Nothing of it is checkpointed or published, and nothing since the last "
               f"checkpoint is committed to Kafka; {resume_note(last_step, 'last good')}. The same settings would "
               "diverge again on the same events: lower the learning rate (model.options.lr, which may change on a "
               "restart) first")
    log.error("%s; exiting with status %d", message, EXIT_MODEL_DIVERGED)
    print(f"crossdistil train: {message}", file=sys.stderr, flush=True)


def final_checkpoint_problem(error: Any, unacknowledged: int, dead_letter_topic: str) -> str | None:
    """Why the last checkpoint was not written, and what to do, or None: the file system's ``error``, or
    ``unacknowledged`` dead letters (a checkpoint waits until Kafka acknowledged every one, so that none is lost; a
    restart reads their events and dead-letters them again).

    >>> final_checkpoint_problem(None, 2, "dl").split("; ")[0], final_checkpoint_problem(None, 0, "dl")
    ('2 dead letters not acknowledged by Kafka, which a checkpoint waits for', None)
    """
    if error is not None:
        return f"{error}; free space or make the folder writable first"
    if unacknowledged:
        return (f"{unacknowledged} dead letters not acknowledged by Kafka, which a checkpoint waits for; check that "
                f"topic {dead_letter_topic!r} exists and takes writes")
    return None


def resume_note(last_step: int, which: str) -> str:
    """What a restart resumes from when the newest checkpoint is that of ``last_step`` (-1: none), the checkpoint
    called ``which`` ("previous", "last good").

    >>> resume_note(7, "previous")
    'the previous checkpoint (step 7) is intact and a restart resumes from it, training the events since then again'
    >>> resume_note(-1, "last good")
    'there is no earlier checkpoint: a restart starts from the beginning'
    """
    if last_step < 0:
        return "there is no earlier checkpoint: a restart starts from the beginning"
    return (f"the {which} checkpoint (step {last_step}) is intact and a restart resumes from it, training the events "
            "since then again")


def missing_folders(*paths: str) -> list[Path]:
    """The folders of ``paths`` and their parents that do not exist yet, deepest first (what creating them makes)."""
    missing = {folder for path in paths for folder in (Path(path), *Path(path).parents) if not folder.exists()}
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)


def continue_versions(cfg: Config, publisher: Publisher) -> None:
    """Publish above the newest version on the serving topic (another checkpoint directory may have written it);
    a topic that cannot be read now only leaves the checkpoint's version, as before. A missing topic is made first,
    compacted; one too small for a publication's messages is a ``ModelTopicError`` (``kafka_io.check_model_topic``)."""
    check_model_topic(cfg.kafka, publication_message_bytes(cfg.publish.chunk_bytes))
    try:
        publisher.continue_after(newest_published_version(cfg.kafka))
    except KafkaError as exc:
        log.warning("could not read the newest version on %s (%s): publishing above the checkpoint's",
                    cfg.kafka.model_topic, exc)


def close_clients(clients: KafkaClients) -> None:
    """Close the clients that a stop left unused (``call_unless_stopped``'s discard)."""
    clients.close(timeout_s=1)
