"""A model that diverged in training (its weights NaN) is neither checkpointed nor published: the trainer says so,
names the last good checkpoint and exits with status 10, so that a restart resumes from that checkpoint once the
learning rate is lowered (a restart with the same settings would diverge again on the same events)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from consumers.core.join import JoinedSample
from consumers.state.checkpoints import CheckpointStore
from consumers.state.learner_state import ModelDiverged, write_learner_checkpoint
from consumers.trainer.daemon import EXIT_MODEL_DIVERGED, Trainer
from tests.unit.consumers.state.test_learner_state import trained_learner
from tests.unit.consumers.trainer.test_daemon import trainer

pytestmark = pytest.mark.unit

DIVERGING = ("model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, lr = 1e30, "
             "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}")


def batch(t: Trainer, n: int, offset: int) -> list[JoinedSample]:
    tasks = t.cfg.model.learnt_tasks
    return [JoinedSample({"impression_id": f"i{i + offset}", "ts_ms": i, "user_id": f"u{i % 5}",
                          "item_id": f"v{i + offset}", "features": {}},
                         {task: (i + j) % 2 for j, task in enumerate(tasks)}, ("impressions", 0), "closed")
            for i in range(n)]


@pytest.mark.parametrize("separate_process", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_diverged_model_is_not_checkpointed_nor_published_and_the_trainer_exits_10(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], separate_process: bool) -> None:
    t = trainer(tmp_path, DIVERGING, "publish.enabled=true", f"model.separate_process={str(separate_process).lower()}")
    try:
        diverge(t, tmp_path, capsys)
    finally:
        t.pipeline.close()


def diverge(t: Trainer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t.publisher.producer.healthy = True  # Kafka acknowledges
    t.kafka.positions[("impressions", 0)] = 5
    assert t.checkpoint("periodic")  # step 0: a good model (a new model's step 0 is not published)
    published = len(t.publisher.producer.sent)
    assert published == 0 and t.cfg.publish.enabled  # a publication would be sent
    for k in range(3):  # a learning rate of 1e30: the loss is NaN from the second step on
        t.pipeline.train_batch(batch(t, 16, 100 * k))
    t.pipeline.collect(wait=True)
    assert t.pipeline.non_finite_loss_step == 2 and not t.checkpoints.due(time.monotonic())
    t.kafka.positions[("impressions", 0)] = 9
    assert t._checkpoint_reason(time.monotonic()) == "non-finite loss"  # at once, not at the next scheduled one
    assert not t.checkpoint("non-finite loss")
    assert t.exit_status == EXIT_MODEL_DIVERGED and t.stop_requested
    err = capsys.readouterr().err
    assert "the model diverged: the model of step 3 holds values that are not finite numbers" in err
    assert "the last good checkpoint (step 0) is intact" in err and "model.options.lr" in err
    assert len(t.publisher.producer.sent) == published  # nothing of it reached the serving topic
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt-000000000000.cdckpt"]
    assert CheckpointStore(tmp_path).latest().metadata["positions"] == [["impressions", 0, 5]]  # nothing committed
    t._loop()  # stopped: the final checkpoint finds the same model, and says nothing more
    assert t.exit_status == EXIT_MODEL_DIVERGED and capsys.readouterr().err == ""
    assert CheckpointStore(tmp_path).steps() == [0]


def test_the_gates_statistics_may_be_nan_the_weights_may_not(tmp_path: Path) -> None:
    """A trust gate's AUCs are NaN until measured: not a divergence. One NaN in an optimizer moment is."""
    learner = trained_learner()
    store = CheckpointStore(tmp_path, keep_last=2)
    write_learner_checkpoint(learner, store, {"positions": []}, None)
    moment = next(iter(learner.dense_optimizer.state.values()))["exp_avg_sq"]
    with torch.no_grad():
        moment.view(-1)[0] = float("inf")
    with pytest.raises(ModelDiverged, match=r"/dense_optimizer/state/\d+/exp_avg_sq \(1 of "):
        write_learner_checkpoint(learner, store, {"positions": []}, None)
    assert store.steps() == [3]
