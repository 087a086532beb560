"""The trainer's loop over its units, without a broker: it exits as documented and checkpoints on a rebalance."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointStore
from consumers.trainer.daemon import Trainer
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
