"""Checkpoints and publication, from the units alone: retries, restarts, tombstones, skipped checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.runtime.assembly import build_pipeline
from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointError, CheckpointStore
from consumers.trainer.checkpointing import Checkpointer
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.kafka_io import KafkaIO
from consumers.trainer.publisher import Publisher
from models.features import encode_rows
from streamer.events import EventError
from tests.unit.consumers.trainer.fakes import Consumer, FlakyProducer

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}"]


def rows(n: int) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i}", "features": {},
             "labels": {"click": i % 2, "long_view": (i // 2) % 2}} for i in range(n)]


def checkpointer(tmp_path: Path, producer, *overrides: str) -> Checkpointer:
    """The trainer's checkpoint unit over a fresh pipeline, a consumer with no partitions and ``producer``."""
    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'", *overrides])
    pipeline = build_pipeline(cfg)
    store = CheckpointStore(tmp_path, keep_last=3)
    kafka = KafkaIO(Consumer(), cfg.kafka, pipeline.join, pipeline.metrics)
    return Checkpointer(cfg, store, pipeline, kafka, DeadLetterQueue(producer, cfg.kafka.dead_letter_topic),
                        Publisher(producer, cfg.kafka.model_topic, store, pipeline.metrics), pipeline.metrics)


def train_one_step(c: Checkpointer) -> None:
    learner = c.pipeline.learner.learner
    learner.step(encode_rows(rows(16), learner.config.features, learner.config.tasks))


def test_a_failed_publication_is_retried_and_a_restart_publishes_the_step_again(tmp_path: Path) -> None:
    c = checkpointer(tmp_path, producer := FlakyProducer(refuse=True))
    train_one_step(c)
    assert c.write("shutdown")  # the checkpoint is written; its publication is refused
    assert c.publisher.pending and c.publisher.unacknowledged_version == 1
    assert c.store.publication() is None
    assert not c.publisher.retry_due(c.publisher.last_attempt_at + 5)  # backs off 10 s
    assert c.publisher.retry_due(c.publisher.last_attempt_at + 10)

    # The process stops here. The next one restores step 1 and publishes it again, though nothing changed.
    restarted = checkpointer(tmp_path, producer)
    assert restarted.restore() == 1
    assert restarted.publisher.pending and restarted.publisher.retry_due(0.0)
    producer.healthy, producer.refuse = True, False  # the broker is back
    assert restarted.write("publication retry")
    assert not restarted.publisher.pending and restarted.publisher.unacknowledged_version is None
    assert restarted.store.publication() == {"version": 2, "step": 1}  # a newer version than the failed attempt
    assert not restarted.write("periodic")  # acknowledged and unchanged: nothing more to do

    # A third start finds the publication recorded: nothing is published again.
    third = checkpointer(tmp_path, producer)
    assert third.restore() == 1
    assert not third.publisher.pending and third.publisher.version == 2 and third.publisher.last_published_step == 1


def test_chunks_of_the_last_acknowledged_publication_are_tombstoned_after_a_failed_smaller_one(tmp_path: Path) -> None:
    c = checkpointer(tmp_path, producer := FlakyProducer(refuse=False))
    c.publisher.published_chunks = 40  # as if the last acknowledged publication had 40 chunks
    train_one_step(c)
    assert c.write("periodic") and c.publisher.pending  # sent, not acknowledged
    topic = c.publisher.topic
    attempted = sum(1 for t, value in producer.sent if t == topic and value is not None) - 1
    assert 0 < attempted < 40 and c.publisher.published_chunks == 40  # any of the 40 keys may still be there

    producer.healthy = True
    producer.sent.clear()
    assert c.write("publication retry") and not c.publisher.pending
    assert sum(1 for t, value in producer.sent if t == topic and value is None) == 40 - attempted
    assert c.publisher.published_chunks == attempted  # acknowledged: the exact count


def test_a_checkpoint_waits_for_its_dead_letters_and_positions_come_back_on_restore(tmp_path: Path) -> None:
    from types import SimpleNamespace

    c = checkpointer(tmp_path, producer := FlakyProducer(refuse=True))
    c.kafka.positions = {("impressions", 0): 8}
    c.dead_letters.add(EventError("bad", reason="not_msgpack"), SimpleNamespace(key=b"k", value=b"\xc1", offset=7),
                       "impressions", 0)
    assert not c.write("periodic")  # its record would be skipped for good by a checkpoint now
    assert c.store.latest() is None
    producer.refuse = False
    producer.healthy = True
    assert c.write("periodic")
    restarted = checkpointer(tmp_path, producer)
    assert restarted.restore() == 0 and restarted.kafka.positions == {("impressions", 0): 8}


def test_a_checkpoint_of_another_model_is_refused_with_the_settings_that_resume_it(tmp_path: Path) -> None:
    """A changed structural option (an edit, or a new default after an upgrade) is said option by option, with what
    to set to train the checkpoint's model on, before the learner is touched; retunable options changed beside it
    are said to be so (they need not be set back); setting the structural ones back resumes."""
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    train_one_step(c)
    assert c.write("shutdown")
    changed = ("model.options.embedding_lr=0.2", "model.options.aux_tasks=['long_view']")
    with pytest.raises(CheckpointError) as refused:
        checkpointer(tmp_path, FlakyProducer(refuse=False), *changed).restore()
    message = str(refused.value)
    assert "holds a model configured otherwise" in message
    assert "aux_tasks: [] in the checkpoint, [\"long_view\"] here" in message
    assert "embedding_lr: 0.05 in the checkpoint, 0.2 here (retunable)" in message
    assert "model.options.aux_tasks = []" in message and "model.options.embedding_lr = 0.05" not in message
    assert "Retunable on restart, so these may keep the values configured here: model.options.embedding_lr" in message
    assert f"checkpoint.warm_start = \"{c.store.path_for(1)}\"" in message
    resumed = checkpointer(tmp_path, FlakyProducer(refuse=False), "model.options.embedding_lr=0.2",
                           "model.options.aux_tasks=[]")
    assert resumed.restore() == 1
    assert resumed.pipeline.learner.learner.embedding_optimizer.param_groups[0]["lr"] == 0.2


def test_a_checkpoint_of_another_kind_of_model_is_refused_with_the_learners_reason(tmp_path: Path) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    train_one_step(c)
    assert c.write("shutdown")
    with pytest.raises(CheckpointError, match="cannot be loaded into the configured model: .*point checkpoint.dir"):
        checkpointer(tmp_path, FlakyProducer(refuse=False), "model.options.rung='river_lr'").restore()


def test_late_impressions_and_late_feedback_are_said_in_the_log_once_per_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    join = c.pipeline.join
    impression = {"v": 1, "user_id": "u", "item_id": "i", "features": {}}
    join.add_events([{**impression, "impression_id": "now", "ts_ms": 10_000_000}], ("impressions", 0))
    join.add_events([{**impression, "impression_id": "old", "ts_ms": 0}], ("impressions", 0))  # its windows closed
    assert join.counters["late_impressions"] == 1
    train_one_step(c)
    with caplog.at_level("WARNING", logger="consumers.trainer.checkpointing"):
        c.write("interval")
        c.write("shutdown")  # nothing late since: no second warning
    said = [r.getMessage() for r in caplog.records if "impressions arrived after" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 impressions arrived after the event-time watermark")


def test_a_new_models_step_0_is_checkpointed_but_never_published(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A new trainer stopped before its first step would publish its random initialisation above the model serving
    has (replicas would score at random where they had a model, or where they should say 503)."""
    c = checkpointer(tmp_path, producer := FlakyProducer(refuse=False))
    producer.healthy = True
    c.kafka.positions = {("impressions", 0): 3}  # something to checkpoint: the positions moved
    with caplog.at_level("INFO", logger="crossdistil.trainer"):
        assert c.write("shutdown")
    assert c.store.steps() == [0] and producer.sent == [] and not c.publisher.pending
    assert c.publisher.version == 0 and c.store.publication() is None
    assert "checkpoint of step 0 not published: the new model has trained no batch yet" in caplog.text

    # Restored, step 0 is not an unacknowledged publication to send again; the first step's checkpoint is published.
    restarted = checkpointer(tmp_path, producer)
    assert restarted.restore() == 0 and not restarted.publisher.pending
    assert not restarted.write("periodic")  # nothing changed, nothing to publish
    train_one_step(restarted)
    assert restarted.write("periodic") and producer.sent
    assert restarted.store.publication() == {"version": 1, "step": 1}
