"""The trainer's loop over its units, without a broker: it exits as documented and checkpoints on a rebalance."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointStore
from consumers.trainer.daemon import Trainer
from consumers.trainer.exits import EXIT_CHECKPOINT_FAILED
from streamer.events import EventError
from tests.unit.consumers.trainer.fakes import Consumer, FlakyProducer

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}"]


def trainer(tmp_path: Path, *overrides: str, consumer=None) -> Trainer:
    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'", "publish.enabled=false",
                                                       "kafka.poll_timeout_ms=20", *overrides])
    t = Trainer(cfg)
    t.kafka.consumer = consumer if consumer is not None else Consumer()
    t.dead_letters.producer = t.publisher.producer = FlakyProducer(refuse=False)
    return t


def test_trainer_without_partitions_for_stall_exit_s_checkpoints_and_exits_4(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    t = trainer(tmp_path, "kafka.stall_exit_s=0.3", consumer=Consumer([], topics={"impressions"}))
    t._loop()
    assert t.exit_status == 4
    assert "no partition assigned" in caplog.text
    assert CheckpointStore(tmp_path, keep_last=2).latest() is not None  # the shutdown checkpoint was written
    healthy, reason = t.health()
    assert healthy  # only 0.3 s without partitions: /healthz waits 60 s before it says so
    t.kafka.unassigned_since -= 120
    healthy, reason = t.health()
    assert not healthy and reason.startswith("no partition assigned for 12"), reason


def test_a_revocation_is_checkpointed_by_the_loop_right_after_the_poll(tmp_path: Path) -> None:
    from kafka import TopicPartition

    t = trainer(tmp_path, consumer=Consumer([TopicPartition("impressions", 0)]))
    t.kafka.positions[("impressions", 0)] = 5  # something new since the last checkpoint
    t.kafka.on_revoked([TopicPartition("impressions", 0)])
    assert t._checkpoint_reason(0.0) == "rebalance" and not t.kafka.revoked
    assert t.checkpoint("rebalance")
    assert CheckpointStore(tmp_path).latest().metadata["positions"] == [["impressions", 0, 5]]


def test_a_stop_request_ends_the_loop_with_a_shutdown_checkpoint(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    t.kafka.positions[("feedback", 1)] = 3
    t.stop_requested = True
    t._loop()
    assert t.exit_status == 0 and CheckpointStore(tmp_path).latest().metadata["positions"] == [["feedback", 1, 3]]


def test_an_unreadable_batch_ends_the_loop_with_status_7_after_a_checkpoint(tmp_path: Path) -> None:
    from kafka.errors import UnsupportedCodecError

    class Unreadable(Consumer):
        def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
            raise UnsupportedCodecError("Libraries for lz4 compression codec not found")

    t = trainer(tmp_path, consumer=Unreadable())
    t.kafka.positions[("impressions", 2)] = 11
    t._loop()
    assert t.exit_status == 7 and "lz4" in t.kafka.unreadable
    assert CheckpointStore(tmp_path).latest().metadata["positions"] == [["impressions", 2, 11]]


def test_a_stop_whose_last_checkpoint_waits_for_dead_letters_exits_9_and_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint waits until Kafka acknowledged every dead letter (none is lost): a stop while the dead-letter topic
    takes no writes writes no last checkpoint, and a supervisor must be able to tell (it exited 0)."""
    t = trainer(tmp_path)
    t.dead_letters.producer = FlakyProducer(refuse=True)  # the dead-letter topic takes no writes
    t.kafka.positions[("impressions", 0)] = 8
    t.dead_letters.add(EventError("bad", reason="not_msgpack"), SimpleNamespace(key=b"k", value=b"\xc1", offset=7),
                       "impressions", 0)
    t._final_checkpoint("shutdown")
    assert t.exit_status == EXIT_CHECKPOINT_FAILED and CheckpointStore(tmp_path).steps() == []
    err = capsys.readouterr().err
    assert "the last checkpoint could not be written" in err and "(1 dead letters not acknowledged by Kafka" in err
    assert "takes writes); there is no earlier checkpoint: a restart starts from the beginning" in err

    t.dead_letters.producer.healthy = True  # the topic is back: the same stop checkpoints and exits 0
    t.exit_status = 0
    t._final_checkpoint("shutdown")
    assert t.exit_status == 0 and CheckpointStore(tmp_path).steps() == [0] and capsys.readouterr().err == ""
