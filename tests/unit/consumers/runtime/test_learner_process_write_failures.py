"""A checkpoint the learner process cannot write (``model.separate_process``): the same ``OSError`` as a learner in
process raises, errno and message kept, and the learner process alive and training, so that the trainer's retry of
a failed checkpoint (``consumers.trainer.daemon.CheckpointFailures``) applies in this mode too. No broker."""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch

from consumers.runtime.config import load_config
from consumers.runtime.learner_process import LearnerProcessError, RemoteLearner, os_error_from_reply, os_error_reply
from consumers.state.checkpoints import CheckpointStore
from tests.unit.consumers.trainer.test_daemon import trainer

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}",
         "join.attribution_window_s={click = 5, long_view = 30}", "batching.batch_size=64"]
ROWS = [[f"u{i % 7}", f"i{i}", {}, {"click": i % 2, "long_view": (i // 3) % 2}] for i in range(64)]
FILE_SIZE_LIMIT = 64 * 1024  # a checkpoint of SMALL's model is over 100 kB


@pytest.fixture
def one_torch_thread():
    """One torch thread here: only then is a learner process forked (``learner_process.forks_learners``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_one_batch(remote: RemoteLearner) -> int:
    remote.submit_rows(ROWS, None)
    list(remote.answers(wait=True))
    return remote.steps


def test_a_child_oserror_crosses_the_pipe_as_the_same_oserror() -> None:
    for exc in (OSError(errno.ENOSPC, "No space left on device", "/ckpt/.tmp-ckpt-1"),
                OSError(errno.EFBIG, "File too large"),
                NotADirectoryError("checkpoint directory /c cannot be created: /c is a file, not a folder")):
        again = os_error_from_reply(os_error_reply(exc))
        assert type(again) is type(exc) and again.errno == exc.errno and str(again) == str(exc)
        assert again.filename == exc.filename


@pytest.mark.slow
def test_a_checkpoint_over_the_file_size_limit_in_the_learner_process_is_an_oserror_efbig_and_it_trains_on(
        tmp_path: Path, one_torch_thread) -> None:
    cfg = load_config(None, env={}, overrides=SMALL)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, hard))  # the forked child keeps it (`ulimit -f 64`)
    try:
        remote = RemoteLearner(cfg, torch_threads=1, wait_ready=False, fork=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        assert remote.forked
        assert train_one_batch(remote) == 1
        with pytest.raises(OSError) as error:
            remote.write_checkpoint(str(tmp_path), 2, {"positions": []}, None)
        assert not isinstance(error.value, LearnerProcessError)
        assert error.value.errno == errno.EFBIG and str(error.value) == "[Errno 27] File too large"
        assert os.listdir(tmp_path) == []  # the temporary file is removed
        assert train_one_batch(remote) == 2  # the learner process is alive and trains on
    finally:
        remote.close()
    assert remote.process.returncode == 0  # it stopped when asked, not of the failure


@pytest.mark.slow
def test_a_trainer_whose_learner_process_cannot_write_a_checkpoint_logs_it_retries_and_writes_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoints"
    t = trainer(folder, "model.separate_process=true")
    try:
        t.kafka.positions[("impressions", 0)] = 5
        assert t.checkpoint("periodic")
        moved = folder.rename(tmp_path / "moved")
        folder.write_text("in the way")  # the learner process's write fails: the folder is a file
        t.kafka.positions[("impressions", 0)] = 9
        assert not t.checkpoint("periodic")  # an OSError handled as in process, not LearnerProcessError (exit 6)
        assert "could not be written" in caplog.text and "is a file, not a folder" in caplog.text
        assert "the previous checkpoint (step 0) is intact" in caplog.text
        assert isinstance(t.checkpoint_failures.error, FileExistsError)
        healthy, reason = t.health()
        assert healthy and "checkpoints failing for" in reason
        folder.unlink()
        shutil.move(moved, folder)
        assert t.checkpoint("periodic") and t.checkpoint_failures.error is None  # the same learner process writes it
        assert CheckpointStore(folder).latest().metadata["positions"] == [["impressions", 0, 9]]
    finally:
        t.pipeline.close()
