"""consumers.tools.rank_replay when a rank fails mid-replay: it leaves the process group, and the parent's error
names it, with its own error (not the other rank's failed collective)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from consumers.runtime.config import load_config
from consumers.tools import rank_replay
from consumers.tools.rank_replay import RankReplayError, replay_ranks
from streamer.stream import stream_dataset
from tests.unit.consumers.runtime.test_ranks import _threads

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # processes of their own

MODEL = "{rung = 'mtl', embedding_dim = 4, hidden_dims = [8], tower_dims = [4], features = {hash_buckets = 1024}}"
FAILING_RECORD = 100  # rank 1's 100th record: past its first meetings with rank 0 (chunks of 32 records)


def _rank_failing_mid_replay(rank: int, *args) -> None:
    """``rank_replay._spawned`` (in the rank's own process), where rank 1 fails on its ``FAILING_RECORD``th record;
    rank 1 then says whether it still holds a process group and gloo's threads (``left-1.json`` in ``$LEFT_DIR``)."""
    if rank == 1:
        decode, calls = rank_replay.decode_record, itertools.count(1)

        def failing(value: bytes):
            if next(calls) == FAILING_RECORD:
                raise ValueError("a record this rank cannot take (the test's)")
            return decode(value)

        rank_replay.decode_record = failing
    try:
        rank_replay._spawned(rank, *args)
    finally:
        if rank == 1:
            deadline = time.monotonic() + 5.0  # a thread is listed until the kernel has reaped it
            while any(name.startswith(("gloo", "pt_gloo")) for name in _threads()) and time.monotonic() < deadline:
                time.sleep(0.05)
            (Path(os.environ["LEFT_DIR"]) / "left-1.json").write_text(json.dumps({
                "initialized": dist.is_initialized(),
                "gloo_threads": [name for name in _threads() if name.startswith(("gloo", "pt_gloo"))]}))


def test_a_rank_failing_mid_replay_leaves_the_group_and_the_parent_names_it_and_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "synthetic.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options={
        "n_events": 1200, "tasks": "click,like", "n_users": 200, "n_items": 100, "seed": 3, "delay_median_s": "1,3",
        "max_delay_s": 10})
    cfg = load_config(None, env={}, overrides=[
        f"model.options={MODEL}", "model.tasks=['click', 'like']", "model.device='cpu'",
        "join.attribution_window_s={click = 3, like = 10}", "batching.batch_size=32", "distributed.timeout_s=120.0"])
    monkeypatch.setattr(rank_replay, "_spawned", _rank_failing_mid_replay)
    monkeypatch.setenv("LEFT_DIR", str(tmp_path))  # the ranks' processes inherit it
    (scratch := tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    with pytest.raises(RankReplayError) as error:
        replay_ranks(f"file://{log}", cfg, 2, partitions=4, chunk=32)
    # torch's spawn keeps the failed rank's pytorch-errorfile-*.pickle: in the replay's folder, removed with it
    assert list(scratch.iterdir()) == [] and tempfile.tempdir == str(scratch)

    message = str(error.value)
    assert message.startswith(f"rank 1/2 failed replaying file://{log}: ValueError: a record this rank cannot take"), \
        message
    assert "rank 1's traceback:" in message and "in failing" in message  # where it failed, from rank 1's process
    assert not multiprocessing.active_children()  # every rank's process ended and was joined
    left = json.loads((tmp_path / "left-1.json").read_text())
    assert left == {"initialized": False, "gloo_threads": []}, left  # its group went with the error
