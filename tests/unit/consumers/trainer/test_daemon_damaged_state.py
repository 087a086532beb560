"""The trainer when its own state is damaged or its disk misbehaves: one clear line or a logged error, the previous
checkpoint intact, never a silent start from scratch (which would train every partition again)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import consumers.state.checkpoints as checkpoints
from consumers.state.checkpoints import CheckpointDirectoryInUse, CheckpointStore
from tests.lock_holder import lock_held_by_another_process
from tests.unit.consumers.trainer.test_command import DEAD, SMALL, no_kafka, one_line_error, train  # noqa: F401
from tests.unit.consumers.trainer.test_daemon import trainer

pytestmark = pytest.mark.unit



def disk_full(_fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_folder_of_damaged_checkpoints_stops_the_start_in_one_line_with_status_2(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], no_kafka: list[str]) -> None:  # noqa: F811
    store = CheckpointStore(tmp_path / "checkpoints")
    store.write(4, {}, {"trainer_format": 2})
    store.path_for(4).write_bytes(b"\0" * 4096)  # a file system crash
    assert train(tmp_path) == 2
    error = one_line_error(capfd)
    assert error.startswith("crossdistil train: no usable checkpoint in ") and "ckpt-000000000004.cdckpt" in error
    assert not no_kafka  # stopped before anything connected, let alone read a partition from its beginning


def test_a_checkpoint_that_cannot_be_written_is_logged_retried_later_and_the_previous_one_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    t = trainer(tmp_path, "checkpoint.every_s=1")
    t.kafka.positions[("impressions", 0)] = 5
    assert t.checkpoint("periodic")
    t.kafka.positions[("impressions", 0)] = 9
    with monkeypatch.context() as m:
        m.setattr(checkpoints.os, "fsync", disk_full)
        assert not t.checkpoint("periodic")  # no traceback out of the loop
    assert "could not be written" in caplog.text and "No space left on device" in caplog.text
    assert "the previous checkpoint (step 0) is intact" in caplog.text
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt-000000000000.cdckpt"]  # no temp file left
    failed_at = t.checkpoint_failures.last_at
    assert t.checkpoints.due(failed_at + 5) and t._checkpoint_reason(failed_at + 5) is None  # not at every poll
    assert "checkpoints failing for" in t.health()[1]
    assert t._checkpoint_reason(failed_at + 10) == "periodic"
    assert t.checkpoint("periodic") and t.checkpoint_failures.error is None  # the disk has room again
    assert CheckpointStore(tmp_path).latest().metadata["positions"] == [["impressions", 0, 9]]


def test_a_last_checkpoint_that_cannot_be_written_is_said_and_the_exit_status_is_9(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    t = trainer(tmp_path)
    t.kafka.positions[("feedback", 1)] = 3
    t.stop_requested = True
    monkeypatch.setattr(checkpoints.os, "fsync", disk_full)
    t._loop()
    assert t.exit_status == 9
    assert "the last checkpoint could not be written" in capsys.readouterr().err
    assert CheckpointStore(tmp_path).steps() == [] and os.listdir(tmp_path) == [".lock"]


def test_a_second_trainer_on_the_same_checkpoint_folder_is_refused(tmp_path: Path) -> None:
    with lock_held_by_another_process(tmp_path), pytest.raises(CheckpointDirectoryInUse,
                                                               match="in use by another trainer"):
        trainer(tmp_path)
