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

Changing the model (docs/operations.md). A checkpoint restores into the configured model when their
``ModelConfig``s differ in retunable options only (``models.config.RETUNABLE_OPTIONS``: learning rates, loss weights,
...): each change is logged ("was X, now Y") and the model trains on with the configured values. A structural
difference is refused (``check_model``, exit 2). Warm start (``checkpoint.warm_start``, only while
``checkpoint.dir`` holds no checkpoint): a new model of the configured structure is initialised from the weights of
another checkpoint wherever they still fit (``models.warm_start``), with fresh optimizers and step 0; with
``checkpoint.warm_start_stream = "resume"`` (the default) it trains on from that checkpoint's cut (positions, pending
impressions, the partial batch; tasks added or removed in their labels), so no event is lost or trained twice
across the change; with ``"fresh"`` the partitions start as a new trainer's. The old checkpoint is only read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from consumers.core.join import late_feedback_warning, late_impressions_warning, task_labels_warning
from consumers.core.pipeline import Pipeline
from consumers.runtime.assembly import model_config
from consumers.runtime.config import WARM_START_RANKS_RESUME, Config, toml_value
from consumers.state.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    checkpoint_step,
    positions_from_plain,
    positions_to_plain,
    publication_acknowledged,
    read_checkpoint_file,
    untrained,
)
from consumers.state.learner_state import check_format, saved_config
from consumers.state.wire import publication_message_bytes, stable_hash
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.kafka_io import KafkaIO
from consumers.trainer.publisher import Publisher
from models.config import ModelConfig, config_differences, split_differences
from models.warm_start import describe

log = logging.getLogger("crossdistil.trainer")

# What the stream side of a trainer checkpoint must hold (``Checkpointer._metadata``; ``published`` and
# ``trained_samples`` are optional: older checkpoints lack them).
STREAM_KEYS = ("positions", "join_state", "batcher_state", "publish_version", "published_chunks")


def plain(value: Any) -> Any:
    """numpy scalars and tuples into plain msgpack values (metrics snapshots)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def option_setting(key: str) -> str:
    """The configuration setting of ``ModelConfig`` option ``key``.

    >>> option_setting("lr"), option_setting("tasks")
    ('model.options.lr', 'model.tasks')
    """
    return {"tasks": "model.tasks", "seed": "model.seed"}.get(key, f"model.options.{key}")


# The options a deep model (``ModelConfig``) has: a saved config with any other key is a peer's or a newer version's.
MODEL_OPTIONS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def unknown_options(saved: Any) -> list[str] | None:
    """The options of a checkpoint's saved learner config (``saved_config``) that ``ModelConfig`` does not have:
    ``[]`` for a deep model's config, the option names for a newer version's or a peer's, None where there is no
    config to read (a peer that keeps none).

    >>> unknown_options({"backbone": "mmoe", "lr": 0.01}), unknown_options({"n_models": 3}), unknown_options(None)
    ([], ['n_models'], None)
    """
    if not isinstance(saved, Mapping):
        return None
    return sorted(set(saved) - MODEL_OPTIONS)


def check_model(meta: Mapping[str, Any], config: Any, path: Any) -> dict[str, tuple[Any, Any]]:
    """The options in which the checkpoint's model (``meta``'s learner config) and the configured ``ModelConfig``
    differ, when they are all retunable (``models.config.RETUNABLE_OPTIONS``): each is logged ("was X, now Y") and the
    restored model trains on with the configured value. Raise ``CheckpointError`` when any is structural: which options
    differ, which of them may differ, and the settings that train the checkpoint's model on (a new default after an
    upgrade, or an option changed by mistake), instead of a traceback from the learner. The river and VW peers check
    their own."""
    saved = saved_config(meta)
    if not isinstance(config, ModelConfig) or unknown_options(saved) != []:
        return {}  # a peer's checkpoint, or a peer configured: the learner's own load says what differs
    differing = config_differences(saved, config)
    retuned, structural = split_differences(differing)
    if structural:
        lines = [f"  {key}: {toml_value(was) if was is not None else '(absent)'} in the checkpoint, "
                 f"{toml_value(now) if now is not None else '(unknown to this version)'} here"
                 + (" (retunable)" if key in retuned else "")
                 for key, (was, now) in differing.items()]
        settings = [f"  {option_setting(key)} = {toml_value(was)}"
                    for key, (was, now) in structural.items() if key in MODEL_OPTIONS and was is not None]
        resume = ["To train it on, configure it as it was (the file's [model] tables, or --set KEY=VALUE):", *settings]
        retunable = [f"Retunable on restart, so these may keep the values configured here: "
                     f"{', '.join(option_setting(key) for key in retuned)}"] if retuned else []
        raise CheckpointError("\n".join([
            f"{path} holds a model configured otherwise:", *lines, *(resume if settings else []), *retunable,
            "To start a new model instead, point checkpoint.dir at an empty directory (with checkpoint.warm_start = "
            f"{toml_value(str(path))} the new model starts from this one's weights wherever they still fit, "
            "docs/operations.md)."]))
    for key, (was, now) in retuned.items():
        log.info("%s: %s was %s, now %s (retuned on restore)", Path(str(path)).name, option_setting(key),
                 toml_value(was) if was is not None else "(absent)", toml_value(now))
    return retuned


def check_stream(meta: Mapping[str, Any], path: Any) -> None:
    """Raise ``CheckpointError`` naming ``path`` and the key when a checkpoint's metadata lacks one of the stream
    side's keys (``STREAM_KEYS``): a file that verifies but was not written whole by a trainer."""
    missing = [key for key in STREAM_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{path} verifies but its metadata has no {', '.join(map(repr, missing))} (the stream "
                              "side of a trainer checkpoint: positions, join and batcher state, publication): it was "
                              "not written by a trainer; restore checkpoint.dir from a backup, or start a new model "
                              "from an empty one")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path`` that holds a model (its metadata: the learner reads the tensors itself), read without
    changing anything there (``read_checkpoint_file``): a checkpoint file, or the newest checkpoint file of a folder
    that verifies (a damaged newer one is skipped with a warning and left as it is: the folder may be another
    trainer's). ``CheckpointError`` saying why there is none: a path that does not exist, is not a checkpoint, cannot
    be used (unreadable, a newer format, a rank's part without the model), or a folder of several ranks (their model
    is in rank-0)."""
    path = Path(path)
    if path.is_dir():
        files = sorted((entry for entry in path.iterdir() if checkpoint_step(entry.name) is not None), reverse=True)
        if not files and (path / "rank-0").is_dir():
            raise CheckpointError(f"{path} holds the checkpoints of several ranks: name its rank-0 folder, whose files "
                                  "hold the model")
        damaged = []
        for file in files:
            try:
                return read_checkpoint_file(file, model=True)
            except CheckpointError as exc:
                if not exc.damaged:
                    raise
                log.warning("skipping unusable checkpoint %s (left as it is): %s", file, exc.problem)
                damaged.append(str(exc))
        found = f"only damaged ones ({'; '.join(damaged)})" if damaged else "none (no ckpt-*.cdckpt file)"
        raise CheckpointError(f"no usable checkpoint in {path}: {found}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return read_checkpoint_file(path, model=True)


def retasked_stream(meta: Mapping[str, Any], tasks: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's stream side (join and batcher state) for a model of ``tasks``: the labels of the samples it
    holds (pending impressions, samples ready, the partial batch) get each task of ``tasks`` (0 for a task the old
    model did not have: its feedback before the cut was ignored then) and lose the others; early feedback of a task
    left out is dropped. Returns (the metadata with the converted states, what changed: ``added`` and ``removed`` tasks,
    ``samples`` held, ``dropped_feedback``).

    >>> join = {"window_ms": {"click": 1000}, "pending": [[{"impression_id": "i"}, {"click": 1}, ["imp", 0]]],
    ...         "early": [["j", "click", 5, 1, 0]], "ready": [], "task_positives": {"click": [1, 0]}}
    >>> meta, changed = retasked_stream({"join_state": join, "batcher_state": {"waiting": []}}, ["click", "like"])
    >>> meta["join_state"]["pending"][0][1], changed["added"], changed["samples"]
    ({'click': 1, 'like': 0}, ['like'], 1)
    """
    join, batcher = dict(meta["join_state"]), dict(meta["batcher_state"])
    saved = list(join.get("window_ms") or {})
    changed = {"added": [t for t in tasks if t not in saved], "removed": [t for t in saved if t not in tasks],
               "samples": 0, "dropped_feedback": 0}
    if not changed["added"] and not changed["removed"]:
        return dict(meta), changed

    def labels(old: Mapping[str, Any]) -> dict[str, int]:
        return {task: int(old.get(task, 0)) for task in tasks}

    join["window_ms"] = {task: join["window_ms"].get(task, 0) for task in tasks}  # the configured windows apply
    join["pending"] = [[event, labels(old), source] for event, old, source in join.get("pending", [])]
    join["ready"] = [[impression, labels(old), source, reason] for impression, old, source, reason in
                     join.get("ready", [])]
    early = list(join.get("early", []))
    join["early"] = [entry for entry in early if entry[1] in tasks]
    if isinstance(join.get("task_positives"), Mapping):
        join["task_positives"] = {t: v for t, v in join["task_positives"].items() if t in tasks}
    batcher["waiting"] = [[impression, labels(old), source, reason] for impression, old, source, reason in
                          batcher.get("waiting", [])]
    changed["samples"] = len(join["pending"]) + len(join["ready"]) + len(batcher["waiting"])
    changed["dropped_feedback"] = len(early) - len(join["early"])
    return {**meta, "join_state": join, "batcher_state": batcher}, changed


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
        self.warm_started = False  # the model started from another's weights (checkpointed: "warm_started")
        self._untrained_said = False
        self._late_reported = {"late_feedback": 0, "late_impressions": 0}  # the counts at the last log warnings
        self._labels_reported: dict[str, Any] | None = None  # the join's task_labels report at the last warning

    # --------------------------------------------------------------------------------------------- restore

    def restore(self) -> int | None:
        """Load the newest verified checkpoint into the learner, the pipeline, the positions and the publisher;
        its step, or None when there is none (every partition then starts from its beginning, unless
        ``checkpoint.warm_start`` names a checkpoint to start the new model from: ``warm_start``)."""
        # The learner reads its tensors from the file itself; a rank's part of a round holds none.
        checkpoint = self.store.latest(with_tensors=False, model=True)
        self._check_not_ranks(checkpoint)
        if checkpoint is None:
            if self.ledger is not None:
                self.ledger.discard_after(None)
            if self.cfg.checkpoint.warm_start:
                self.warm_start(self.cfg.checkpoint.warm_start)
                return None
            log.info("no checkpoint in %s: starting from scratch, every partition from its beginning",
                     self.store.directory)
            return None
        check_format(checkpoint)
        meta = checkpoint.metadata
        check_model(meta, model_config(self.cfg), checkpoint.path)
        self._load_learner(checkpoint.path)
        self._restore_stream(meta, checkpoint.step, checkpoint.path)
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

    def _load_learner(self, path: Path, warm: bool = False) -> dict[str, Any] | None:
        """The learner's side of the checkpoint file at ``path``, loaded wherever the learner lives (``warm``: a new
        model started from its weights; that report). A file that does not load or cannot be read is a
        ``CheckpointError`` (exit 2), in process and from a learner process alike."""
        learner = self.pipeline.learner
        try:
            if warm:
                return learner.warm_start(str(path))
            learner.load_checkpoint(str(path))
            return None
        except OSError as exc:  # a file that verified moments ago: permissions, an I/O error
            raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}); make it readable and start again "
                                  "(it is left as it is)") from exc
        except ValueError as exc:  # another kind of model (a river or VW peer's state, or one configured)
            what = "start the configured model" if warm else "be loaded into the configured model"
            instead = ("" if warm else " To start a new model instead, point checkpoint.dir at an empty directory.")
            raise CheckpointError(f"{path} cannot {what}: {exc}.{instead}") from exc

    def _check_not_ranks(self, checkpoint: Checkpoint | None) -> None:
        """Refuse (``CheckpointError``, exit 2) what several ranks wrote, which one trainer cannot resume: a
        ``checkpoint.dir`` of ranks' folders and none of its own (a fresh start would train every partition again from
        its beginning), or rank 0's part of a round (its stream state covers only that rank's partitions)."""
        folder = self.store.directory
        ranks = sorted(entry.name for entry in folder.glob("rank-*")
                       if entry.is_dir() and any(checkpoint_step(f.name) is not None for f in entry.iterdir()))
        world = int(checkpoint.metadata.get("world_size", 1) or 1) if checkpoint is not None else len(ranks)
        if (checkpoint is None and not ranks) or world <= 1:
            return
        what = (f"{folder} holds the checkpoints of {len(ranks)} ranks ({', '.join(ranks)}), none of one trainer"
                if checkpoint is None else f"{checkpoint.path} is rank 0's part of a checkpoint round of {world} "
                "ranks: its stream state covers only that rank's partitions")
        raise CheckpointError(f"{what}; resume them with crossdistil train --world-size {world}, or start one "
                              f"trainer's model from them in a new checkpoint.dir with checkpoint.warm_start = "
                              f"'{folder if checkpoint is not None else folder / 'rank-0'}' and "
                              "checkpoint.warm_start_stream = 'fresh'")

    def _restore_stream(self, meta: Mapping[str, Any], step: int, path: Any = "the checkpoint") -> None:
        """The stream side of a checkpoint of learner step ``step`` (file ``path``): join, batcher, positions and the
        publisher's bookkeeping (the learner's side is loaded by the caller), ``check_stream``'d here for one trainer
        and each rank alike."""
        check_stream(meta, path)
        self._load_stream(meta, path)
        self.last_step = step
        self.warm_started = bool(meta.get("warm_started", False))
        # Not acknowledged: this step is published again as soon as the loop starts (an untrained one never is).
        version = int(meta["publish_version"])
        record = self.store.publication()
        acknowledged = publication_acknowledged(meta, record, step) or untrained(step, self.warm_started)
        if record is not None:
            version = max(version, record["version"])
        self.publisher.restore(version, int(meta["published_chunks"]), step, acknowledged, self.cfg.publish.enabled)

    def _load_stream(self, meta: Mapping[str, Any], path: Any) -> None:
        """Join, batcher, trained-sample count and positions of a checkpoint's metadata (``check_stream``'d)."""
        try:
            self.pipeline.load_stream_state(meta)  # the saved clocks belong to the dead process: rebased to now
            positions = positions_from_plain(meta["positions"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its stream state cannot be restored ({type(exc).__name__}: {exc}); "
                                  "restore checkpoint.dir from a backup, or start a new model from an empty one"
                                  ) from exc
        # The process that wrote it warned of its counts when it wrote it (write: _warn_late first): say only what
        # is new since, not the totals again as if they were.
        counters = self.pipeline.join.counters
        self._late_reported = {name: int(counters[name]) for name in self._late_reported}
        self._labels_reported = self.pipeline.join.task_labels.report(counters)
        self.kafka.positions = positions
        self.kafka.checkpointed = dict(self.kafka.positions)

    # ------------------------------------------------------------------------------------------ warm start

    def warm_start(self, source: str) -> dict[str, Any]:
        """Start the new model (``checkpoint.dir`` holds no checkpoint) from the checkpoint at ``source``, a file or a
        folder (its newest verified checkpoint, ``read_checkpoint``): the learner copies every tensor that still
        fits (``models.warm_start``), its optimizers start fresh; with ``checkpoint.warm_start_stream = "resume"`` the
        stream goes on from that checkpoint's cut (``retasked_stream``), with ``"fresh"`` as a new trainer's. The
        report of what was carried over, also logged. ``CheckpointError`` (exit 2) for a source that is not a
        checkpoint, is damaged, holds a river or VW peer's model, or (resume) read other topics or only one rank's
        partitions."""
        mode = self.cfg.checkpoint.warm_start_stream
        checkpoint = read_checkpoint(source)
        check_format(checkpoint)
        meta, path = checkpoint.metadata, checkpoint.path
        self._check_warm_source(meta, path, resume=mode == "resume")
        if mode == "resume":
            check_stream(meta, path)
            meta, changed = retasked_stream(meta, self.cfg.model.tasks)
        report = self._load_learner(path, warm=True)
        self.warm_started = True
        log.info("warm start: a new model from %s (step %d of the old one): %s", path, checkpoint.step,
                 describe(report))
        if mode == "resume":
            self._load_stream(meta, path)
            self.kafka.checkpointed = {}  # nothing of this model is checkpointed (or committed) yet
            if changed["added"] or changed["removed"]:
                log.info("warm start: the %d samples held at the cut (pending impressions, the partial batch) get the "
                         "tasks %s (label 0: their feedback before the cut was ignored) and lose %s; %d early feedback "
                         "events of tasks left out dropped", changed["samples"], changed["added"] or "none",
                         changed["removed"] or "none", changed["dropped_feedback"])
            log.info("warm start: the stream resumes from the old checkpoint's cut (checkpoint.warm_start_stream = "
                     "resume): %d pending impressions, %d waiting samples, positions %s",
                     self.pipeline.join.pending_impressions, self.pipeline.batcher.waiting, meta["positions"])
        else:
            log.info("warm start: checkpoint.warm_start_stream = fresh: every partition starts as a new trainer's "
                     "does, from its beginning or from --from-time where it is given")
        # Versions only grow on a serving topic: above the old model's (the topic's newest is read at connect too).
        self.publisher.restore(int(meta.get("publish_version", 0) or 0), int(meta.get("published_chunks", 0) or 0),
                               -1, True, self.cfg.publish.enabled)
        return report

    def warm_start_ranks(self, ranks: Any) -> None:
        """``checkpoint.warm_start`` for several ranks (``consumers.trainer.ranked``, no complete round yet): rank 0's
        learner starts from the checkpoint's weights, which the broadcast that follows gives every rank; the stream
        starts fresh (a one-trainer checkpoint's cut holds every partition's join state in one, which ranks cannot
        split), so ``warm_start_stream`` must be "fresh". Every rank calls it; every rank fails alike."""
        if self.cfg.checkpoint.warm_start_stream != "fresh":
            raise CheckpointError(WARM_START_RANKS_RESUME)
        problem = None
        if ranks.rank == 0:
            try:
                self.warm_start(self.cfg.checkpoint.warm_start)
            except CheckpointError as exc:
                problem = exc
        if ranks.agree([problem is not None])[0]:
            raise problem or CheckpointError(f"{ranks.info.label}: rank 0 could not start the model from "
                                             f"{self.cfg.checkpoint.warm_start} (its log says why)")

    def _check_warm_source(self, meta: Mapping[str, Any], path: Path, resume: bool) -> None:
        """Refuse (``CheckpointError``) a warm start the source checkpoint cannot give: another kind of model, or
        (``resume``) a stream cut of other topics or of one rank's partitions (``read_checkpoint`` refused a rank's
        file without the model)."""
        configured = model_config(self.cfg)
        if not isinstance(configured, ModelConfig):
            raise CheckpointError(f"checkpoint.warm_start: the configured model ({type(configured).__name__}) learns "
                                  "one event at a time from scratch; warm start is for the deep model "
                                  "(models.learner.Learner): remove checkpoint.warm_start")
        world = meta.get("world_size", 1)
        saved = saved_config(meta)
        unknown = unknown_options(saved)
        if unknown != []:
            kind = ("a model of another version of crossdistil (options this one does not know: "
                    f"{unknown})" if unknown and "backbone" in saved else
                    "another kind of model (a river or VW peer's)")
            raise CheckpointError(f"{path} holds {kind}: it cannot start the configured model")
        if not resume:
            return
        if world != 1:
            raise CheckpointError(f"{path} is rank 0's part of a checkpoint round of {world} ranks: its stream state "
                                  "covers rank 0's partitions only. Set checkpoint.warm_start_stream = \"fresh\" (the "
                                  "new model's partitions start from their beginning, or from --from-time)")
        k = self.cfg.kafka
        read = sorted({topic for topic, _ in positions_from_plain(meta.get("positions") or [])})
        others = [topic for topic in read if topic not in (k.impressions_topic, k.feedback_topic)]
        if others:
            raise CheckpointError(f"{path} was cut from topics {read}, this trainer reads {k.impressions_topic!r} and "
                                  f"{k.feedback_topic!r}: its positions and pending impressions belong to those. "
                                  "Configure the same topics, or set checkpoint.warm_start_stream = \"fresh\" (every "
                                  "partition from its beginning, or from --from-time)")

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
        publish = self.publishes(step)
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

    def publishes(self, step: int) -> bool:
        """Whether the checkpoint of learner step ``step`` is published: publication is on, the step is not published
        yet, and the model has learnt something. A new model at step 0 (from scratch, not warm-started) is its random
        initialisation: published, it would replace the model serving replicas have (the topic's newest, maybe
        another trainer's) with random scores, or answer with them where a replica should say 503 until a model
        comes. Its checkpoint is still written (positions, dead letters); its first step's checkpoint is published."""
        if not self.cfg.publish.enabled or step == self.publisher.last_published_step:
            return False
        if untrained(step, self.warm_started):
            if not self._untrained_said:
                log.info("checkpoint of step 0 not published: the new model has trained no batch yet (serving keeps "
                         "the model it has); the first checkpoint after a step is")
                self._untrained_said = True
            return False
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
            "warm_started": self.warm_started,
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
                "max_message_bytes": publication_message_bytes(chunk_bytes), "onnx": self.cfg.publish.onnx}

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
