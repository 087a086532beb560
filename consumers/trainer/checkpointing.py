"""The trainer's checkpoints: one consistent cut of the model, the stream state and the positions, then its
publication.

The checkpoint is the only truth. ``positions`` in it are, per (topic, partition), the offset after the last
record whose events went into the join; every event before a position is inside the join state (pending
impressions, early feedback), the batcher state (the partial batch) or the model weights, and none after it is.
A checkpoint is only taken between records, after everything polled so far has been processed and every batch
handed to the learner has been answered, so the three always agree. On start the newest checkpoint that
verifies is restored and every assigned partition resumes at its position, so events consumed after that
checkpoint are replayed and trained once.

Order of a checkpoint: dead letters acknowledged (else it is skipped: their records must be replayed) ->
ledger segment -> checkpoint file (by whichever process holds the learner) -> offsets committed for lag
dashboards -> publication (``consumers.trainer.publisher``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumers.core.join import late_feedback_warning, late_impressions_warning, task_labels_warning
from consumers.core.pipeline import Pipeline
from consumers.runtime.assembly import model_config
from consumers.runtime.config import Config, toml_value
from consumers.state.checkpoints import CheckpointError, CheckpointStore, positions_from_plain, positions_to_plain
from consumers.state.learner_state import check_format, saved_config
from consumers.state.wire import stable_hash
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.kafka_io import KafkaIO
from consumers.trainer.publisher import Publisher
from models.config import ModelConfig, config_differences

log = logging.getLogger("crossdistil.trainer")


def plain(value: Any) -> Any:
    """numpy scalars and tuples into plain msgpack values (metrics snapshots)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def check_model(meta: Mapping[str, Any], config: Any, path: Any) -> None:
    """Raise ``CheckpointError`` when the checkpoint's model (``meta``'s learner config) is not the configured
    ``ModelConfig``: which options differ, and the settings that train it on (a new default after an upgrade, or an
    option changed by mistake), instead of a traceback from the learner. The river and VW peers check their own."""
    saved = saved_config(meta)
    settable = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(config, ModelConfig) or not isinstance(saved, Mapping) or set(saved) - settable:
        return  # a peer's checkpoint, or a peer configured: the learner's own load says what differs
    differing = config_differences(saved, config)
    if not differing:
        return
    lines = [f"  {key}: {toml_value(was) if was is not None else '(absent)'} in the checkpoint, "
             f"{toml_value(now) if now is not None else '(unknown to this version)'} here"
             for key, (was, now) in differing.items()]
    where = {"tasks": "model.tasks", "seed": "model.seed"}
    settings = [f"  {where.get(key, 'model.options.' + key)} = {toml_value(was)}"
                for key, (was, now) in differing.items() if key in settable and was is not None]
    resume = ["To train it on, configure it as it was (the file's [model] tables, or --set KEY=VALUE):", *settings]
    raise CheckpointError("\n".join([f"{path} holds a model configured otherwise:", *lines,
                                     *(resume if settings else []),
                                     "To start a new model instead, point checkpoint.dir at an empty directory."]))


class Checkpointer:
    """Restores and writes the trainer's checkpoints in ``store`` over its units.

    ``last_step`` / ``last_at``: the step and (monotonic) time of the last checkpoint written or restored.
    """

    def __init__(self, cfg: Config, store: CheckpointStore, pipeline: Pipeline, kafka: KafkaIO,
                 dead_letters: DeadLetterQueue, publisher: Publisher, metrics: Any, ledger: Any = None) -> None:
        self.cfg = cfg
        self.metrics = metrics  # consumers.runtime.telemetry.TrainerMetrics
        self.store = store
        self.pipeline = pipeline
        self.kafka = kafka
        self.dead_letters = dead_letters
        self.publisher = publisher
        self.ledger = ledger
        # The model's configuration only: two trainers of the same model on other topics or brokers hash alike.
        self.config_hash = stable_hash(model_config(cfg).to_dict())
        self.last_step = -1
        self.last_at = time.monotonic()
        self._late_reported = {"late_feedback": 0, "late_impressions": 0}  # the counts at the last log warnings
        self._labels_reported: dict[str, Any] | None = None  # the join's task_labels report at the last warning

    # --------------------------------------------------------------------------------------------- restore

    def restore(self) -> int | None:
        """Load the newest verified checkpoint into the learner, the pipeline, the positions and the publisher;
        its step, or None when there is none (every partition then starts from its beginning)."""
        checkpoint = self.store.latest(with_tensors=False)  # the learner reads its tensors from the file itself
        if checkpoint is None:
            if self.ledger is not None:
                self.ledger.discard_after(None)
            log.info("no checkpoint in %s: starting from scratch, every partition from its beginning",
                     self.store.directory)
            return None
        check_format(checkpoint)
        meta = checkpoint.metadata
        check_model(meta, model_config(self.cfg), checkpoint.path)
        try:
            self.pipeline.learner.load_checkpoint(str(checkpoint.path))
        except ValueError as exc:  # another kind of model (a river or VW peer's state, or one configured)
            raise CheckpointError(f"{checkpoint.path} cannot be loaded into the configured model: {exc}. To start a "
                                  "new model instead, point checkpoint.dir at an empty directory.") from exc
        self._restore_stream(meta, checkpoint.step)
        if self.publisher.pending:
            log.info("the publication of step %d was never acknowledged by Kafka: publishing it again", checkpoint.step)
        if self.ledger is not None:
            dropped = self.ledger.discard_after(checkpoint.step)
            if dropped:
                log.info("ledger: discarded segments %s newer than the restored checkpoint", dropped)
        log.info("restored %s: step %d, %d pending impressions, %d waiting samples, positions %s", checkpoint.path,
                 checkpoint.step, self.pipeline.join.pending_impressions, self.pipeline.batcher.waiting,
                 meta["positions"])
        return checkpoint.step

    def _restore_stream(self, meta: Mapping[str, Any], step: int) -> None:
        """The stream side of a checkpoint of learner step ``step``: join, batcher, positions and the publisher's
        bookkeeping (the learner's side is loaded by the caller)."""
        self.pipeline.load_stream_state(meta)  # the saved clocks belong to the dead process: rebased to now
        # The process that wrote it warned of its counts when it wrote it (write: _warn_late first): say only what
        # is new since, not the totals again as if they were.
        counters = self.pipeline.join.counters
        self._late_reported = {name: int(counters[name]) for name in self._late_reported}
        self._labels_reported = self.pipeline.join.task_labels.report(counters)
        self.kafka.positions = positions_from_plain(meta["positions"])
        self.kafka.checkpointed = dict(self.kafka.positions)
        self.last_step = step
        # The checkpoint is written before its publication is attempted: the store's publication record says
        # whether it landed. If not, this step is published again as soon as the loop starts.
        version = int(meta["publish_version"])
        record = self.store.publication()
        acknowledged = bool(meta.get("published")) or (
            record is not None and record["step"] == step and record["version"] >= version)
        if record is not None:
            version = max(version, record["version"])
        self.publisher.restore(version, int(meta["published_chunks"]), step, acknowledged, self.cfg.publish.enabled)

    # ----------------------------------------------------------------------------------------------- write

    def due(self, now: float) -> bool:
        """``checkpoint.every_steps`` steps or ``checkpoint.every_s`` seconds since the last one."""
        c = self.cfg.checkpoint
        steps = self.pipeline.learner.steps - max(self.last_step, 0)
        if c.every_steps and steps >= c.every_steps:
            return True
        return bool(c.every_s) and now - self.last_at >= c.every_s

    def write(self, reason: str) -> bool:
        """Write a checkpoint of the current state, then commit offsets and publish; False if it was skipped.

        Called only between records (never in the middle of one), so positions match the saved state.
        """
        self.pipeline.collect(wait=True)  # every batch handed to the learner is trained and counted
        self._warn_late()
        step = self.pipeline.learner.steps
        if self.kafka.fenced:
            log.warning("checkpoint (%s) skipped: another trainer owns this group's partitions now", reason)
            return False
        if step == self.last_step and self.kafka.positions == self.kafka.checkpointed and not self.publisher.pending:
            self.last_at = time.monotonic()
            if reason != "periodic":
                log.info("checkpoint (%s): nothing changed since step %d", reason, step)
            return False
        if not self.dead_letters.flush():
            log.warning("checkpoint (%s) skipped: dead letters not yet acknowledged by Kafka", reason)
            return False
        started = time.perf_counter()
        publish = self.cfg.publish.enabled and step != self.publisher.last_published_step
        version = self.publisher.version + 1 if publish else self.publisher.version
        if self.ledger is not None:
            self.ledger.commit(step)  # before the checkpoint: a segment without its checkpoint is discarded on start
        written = self.pipeline.learner.write_checkpoint(
            str(self.store.directory), self.store.keep_last, self._metadata(step, version),
            self._publication(step, version) if publish else None)
        seconds = time.perf_counter() - started
        log.info("checkpoint (%s) step %d -> %s in %.2f s", reason, step, Path(written["path"]).name, seconds)
        self._written(step, seconds, version if publish else None, written)
        return True

    def _written(self, step: int, seconds: float, publish_version: int | None, written: Mapping[str, Any]) -> None:
        """After a checkpoint of ``step`` is durable: its bookkeeping, offsets committed for lag dashboards, and its
        publication as ``publish_version`` (None: not published)."""
        self.metrics.checkpoint_written(seconds)
        self.last_step = step
        self.kafka.checkpointed = dict(self.kafka.positions)
        self.last_at = time.monotonic()
        self.kafka.commit()
        if publish_version is not None:
            self.publisher.send(written["messages"], publish_version, step, written["chunks"],
                                checkpointed_at=self.last_at)

    def _metadata(self, step: int, version: int) -> dict[str, Any]:
        """The checkpoint's stream side (``consumers.state.learner_state`` adds the learner's)."""
        state = self.pipeline.stream_state()
        return {
            "positions": positions_to_plain(self.kafka.positions),
            "join_state": state["join_state"],
            "batcher_state": state["batcher_state"],
            "watermark_ms": self.pipeline.join.watermark_ms,
            "config_hash": self.config_hash,
            "publish_version": version,
            "published_chunks": self.publisher.published_chunks,  # chunk keys the topic may hold
            "published": step == self.publisher.last_published_step,  # acknowledged before; this one's: the record
            "trained_samples": self.pipeline.trained_samples,
            "dead_letters": self.pipeline.dead_letters,
        }

    def _publication(self, step: int, version: int) -> dict[str, Any]:
        """What the learner's process needs to build the serving-topic messages of this checkpoint."""
        manifest = {
            "step": step,
            "watermark_ms": self.pipeline.join.watermark_ms,
            "offsets": positions_to_plain(self.kafka.positions),
            "metrics": plain(self.metrics.snapshot()),
            "config_hash": self.config_hash,
            "tasks": list(self.pipeline.tasks),
            "published_at_ms": int(time.time() * 1000),
        }  # + "serving": the learner's serving metadata (write_learner_checkpoint)
        chunk_bytes = self.cfg.publish.chunk_bytes
        return {"manifest": manifest, "version": version, "chunk_size": chunk_bytes,
                "previous_chunk_count": self.publisher.published_chunks,
                "max_message_bytes": max(1_000_000, chunk_bytes + 64 * 1024), "onnx": self.cfg.publish.onnx}

    def _warn_late(self) -> None:
        """Say in the log, at most once per checkpoint each, that labels were dropped as late, or impressions
        trained without them, or a task's labels are not arriving (feedback for task names the model does not have,
        or a task without a positive label for many samples), since the last time."""
        join = self.pipeline.join
        counters = join.counters
        for counter, warning in (("late_feedback", late_feedback_warning),
                                 ("late_impressions", late_impressions_warning)):
            message = warning(counters, self._late_reported[counter])
            if message is not None:
                log.warning(message)
                self._late_reported[counter] = int(counters[counter])
        labels = join.task_labels.report(counters)
        message = task_labels_warning(labels, self._labels_reported)
        if message is not None:
            log.warning(message)
            self._labels_reported = labels
