"""Checkpoints read by the learner process (``model.separate_process``): a warm start there, and a checkpoint that
cannot be read or loaded is the error it is in process (exit 2), not a failed learner process (exit 6). No broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import consumers.runtime.learner_process as learner_process
from consumers.runtime.config import load_config
from consumers.runtime.learner_process import LearnerProcessError, RemoteLearner
from consumers.state.checkpoints import CheckpointError, CheckpointStore
from consumers.state.learner_state import learner_state
from tests.unit.consumers.runtime.test_learner_process_write_failures import (  # noqa: F401
    SMALL,
    one_torch_thread,
    train_one_batch,
)
from tests.unit.consumers.trainer.fakes import FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import checkpointer
from tests.unit.consumers.trainer.test_checkpointing_model_changes import THREE_TASKS, old_model

pytestmark = pytest.mark.unit


@pytest.mark.slow
def test_a_checkpoint_the_learner_process_cannot_read_or_load_is_that_oserror_or_valueerror_and_it_lives_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread) -> None:  # noqa: F811
    failures = [PermissionError(13, "Permission denied", "/ckpt/ckpt-1"), ValueError("checkpoint was written with a "
                                                                                    "different model config")]

    def load(_learner, _path):
        raise failures.pop(0)

    monkeypatch.setattr(learner_process, "load_learner_checkpoint", load)  # in the forked child too
    remote = RemoteLearner(load_config(None, env={}, overrides=SMALL), torch_threads=1, fork=True)
    try:
        assert remote.forked
        with pytest.raises(PermissionError) as unreadable:
            remote.load_checkpoint("/ckpt/ckpt-1")
        assert not isinstance(unreadable.value, LearnerProcessError) and unreadable.value.filename == "/ckpt/ckpt-1"
        with pytest.raises(ValueError, match="different model config") as refused:
            remote.load_checkpoint("/ckpt/ckpt-1")
        assert "raised in the learner process" in refused.value.__notes__[0]
        assert train_one_batch(remote) == 1  # alive and training
    finally:
        remote.close()


@pytest.mark.slow
def test_a_trainer_with_a_learner_process_warm_starts_there_and_maps_checkpoint_failures_to_checkpoint_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = old_model(tmp_path / "old")
    old_embedding = old.pipeline.learner.learner.model.embedding.weight.detach().clone()
    separate = "model.separate_process=true"
    new = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), separate, *THREE_TASKS,
                       f"checkpoint.warm_start='{tmp_path / 'old'}'")
    try:
        assert new.restore() is None and new.kafka.positions == old.kafka.positions
        assert new.write("shutdown")  # written by the learner process: the warm-started model's tensors
    finally:
        new.pipeline.close()
    written = CheckpointStore(tmp_path / "new").latest()
    state = learner_state(written.metadata, written.tensors)
    assert state["config"]["tasks"] == ["click", "long_view", "like"] and state["steps"] == 0
    assert torch.equal(state["model"]["embedding.weight"], old_embedding)

    # A checkpoint of another kind of model: the learner process's ValueError, as in process (exit 2, not 6)
    old_model(tmp_path / "peer", "model.options={rung = 'river_lr'}")
    peer = checkpointer(tmp_path / "peer", FlakyProducer(refuse=False), separate)
    try:
        with pytest.raises(CheckpointError, match="cannot be loaded into the configured model"):
            peer.restore()
    finally:
        peer.pipeline.close()

    # A file that verified and is gone when the learner process reads it: its OSError, as in process
    original = RemoteLearner.load_checkpoint

    def vanishing(self, path):
        Path(path).rename(Path(path).with_suffix(".moved"))
        return original(self, path)

    monkeypatch.setattr(RemoteLearner, "load_checkpoint", vanishing)
    gone = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), separate, *THREE_TASKS)
    try:
        with pytest.raises(CheckpointError, match=r"ckpt-000000000000.cdckpt cannot be read \(No such file"):
            gone.restore()
        assert train_one_batch_of(gone) == 1  # the learner process lives on
    finally:
        gone.pipeline.close()


def train_one_batch_of(c) -> int:
    rows = [[f"u{i % 7}", f"i{i}", {}, {"click": i % 2, "long_view": 0, "like": 1}] for i in range(16)]
    c.pipeline.learner.submit_rows(rows, None)
    list(c.pipeline.learner.answers(wait=True))
    return c.pipeline.learner.steps
