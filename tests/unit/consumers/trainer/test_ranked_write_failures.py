"""Ranks whose checkpoint round cannot be written everywhere (a full disk on one rank, rank 0's round record): the
round stays incomplete on every rank alike, nothing is committed, the ranks retry together, and a last round that
fails exits 9 on every rank. The agreement alone over ranks in threads; then two real gloo ranks' trainers."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kafka.structs import TopicPartition

from consumers.runtime.config import load_config
from consumers.runtime.ranks import RankInfo, Ranks
from consumers.state.checkpoints import CheckpointStore
from consumers.state.ledger import read_ledger
from consumers.trainer.ranked import RankTrainer, RoundIncomplete, write_round
from tests.unit.consumers.trainer.fakes import Consumer, FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import SMALL

pytestmark = pytest.mark.unit


def disk_full(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class ThreadRanks:
    """Rank ``rank`` of ``world_size`` ranks that are threads of one process: ``agree`` is the elementwise maximum
    over all of them, as ``Ranks.agree`` (an all-reduce) is over processes. A rank calling it more or fewer times
    than the others breaks the barrier (an error, never a hang)."""

    def __init__(self, rank: int, world_size: int, shared: dict[str, Any]) -> None:
        self.rank, self.world_size, self.shared = rank, world_size, shared
        self.info = RankInfo(rank, world_size)
        self.calls = 0

    def agree(self, values: list[int]) -> list[int]:
        self.calls += 1
        self.shared["values"][self.rank] = list(values)
        self.shared["barrier"].wait()
        agreed = [max(column) for column in zip(*self.shared["values"])]
        self.shared["barrier"].wait()
        return agreed


def write_rounds(world_size: int, failing_parts: set[int], failing_record: bool) -> tuple[list[Any], list[int]]:
    """``write_round`` on ``world_size`` ranks in threads, the ranks in ``failing_parts`` failing to write their
    part, rank 0 its record if ``failing_record``: each rank's outcome (its part's result, or the RoundIncomplete it
    raised) and the rounds recorded."""
    shared = {"values": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=30)}
    outcomes: list[Any] = [None] * world_size
    recorded: list[int] = []

    def rank_thread(rank: int) -> None:
        ranks = ThreadRanks(rank, world_size, shared)

        def write_part() -> str:
            if rank in failing_parts:
                disk_full()
            return f"part of rank {rank}"

        def write_record() -> None:
            if failing_record:
                disk_full()
            recorded.append(7)

        try:
            outcomes[rank] = (write_round(ranks, 7, write_part, write_record), ranks.calls)
        except RoundIncomplete as exc:
            outcomes[rank] = (exc, ranks.calls)

    threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, recorded


def test_a_round_every_rank_wrote_is_recorded_once_by_rank_0() -> None:
    outcomes, recorded = write_rounds(3, failing_parts=set(), failing_record=False)
    assert outcomes == [(f"part of rank {rank}", 2) for rank in range(3)]
    assert recorded == [7]


@pytest.mark.parametrize("failing_parts", [{1}, {0}, {1, 2}])
def test_a_part_that_cannot_be_written_leaves_the_round_incomplete_on_every_rank(failing_parts: set[int]) -> None:
    outcomes, recorded = write_rounds(3, failing_parts, failing_record=False)
    assert recorded == []  # no round record: a restart resumes from the round before
    for rank, (error, calls) in enumerate(outcomes):
        assert isinstance(error, RoundIncomplete) and error.failed == sorted(failing_parts), (rank, error)
        assert calls == 1  # the barrier only: no rank goes on to the record's collective
        if rank in failing_parts:  # its own error, by name
            assert error.error.errno == errno.ENOSPC and "No space left on device" in str(error)
            assert str(error).startswith(f"rank {rank}/3: its part of checkpoint round 7 could not be written")
        else:
            assert error.error is None
            assert str(error).startswith(f"rank {rank}/3: checkpoint round 7 is incomplete: rank ")


def test_a_round_record_that_cannot_be_written_leaves_the_round_incomplete_on_every_rank() -> None:
    outcomes, recorded = write_rounds(3, failing_parts=set(), failing_record=True)
    assert recorded == []
    for rank, (error, calls) in enumerate(outcomes):
        assert isinstance(error, RoundIncomplete) and error.failed == [0] and calls == 2, (rank, error)
    assert "its round record of checkpoint round 7 could not be written" in str(outcomes[0][0])
    assert "rank 0/3 could not write its round record (see its log)" in str(outcomes[1][0])


# ------------------------------------------------------------------------------------- two gloo ranks' trainers


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _rank_with_a_failing_disk(rank: int, init: str, base: str, out: str) -> None:
    """Rank ``rank`` of two trainers (no broker): a round, a round rank 1 cannot write, a round whose record rank 0
    cannot write, a round after the disks recovered, and a stop whose last round rank 1 cannot write; then a restart
    of the rank. What it saw goes to ``out/rank-<r>.json``."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{base}'", "publish.enabled=false",
                                                       "kafka.poll_timeout_ms=20", "distributed.timeout_s=60.0",
                                                       "checkpoint.keep_last=1"])  # each rank keeps 2
    ranks = Ranks(RankInfo(rank, 2), cfg.distributed)
    lines = Lines()
    logging.getLogger("crossdistil.trainer").addHandler(lines)
    logging.getLogger("crossdistil.trainer").setLevel(logging.INFO)
    trainer = RankTrainer(cfg, ranks, ledger_dir=str(Path(base) / "ledger"))
    consumer = Consumer([TopicPartition("impressions", rank)])
    trainer.kafka.consumer = consumer
    trainer.dead_letters.producer = trainer.publisher.producer = FlakyProducer(refuse=False)
    trainer.restore()
    seen: dict[str, Any] = {}

    def checkpoint(attempt: int, position: int) -> bool:
        """One checkpoint of every rank; a trained row in this rank's ledger first, named for the attempt."""
        trainer.kafka.positions[("impressions", rank)] = position
        tasks = trainer.ledger.tasks
        trainer.ledger.add([f"rank-{rank}-attempt-{attempt}"], {t: [1] for t in tasks}, {t: [0.5] for t in tasks})
        commits = len(consumer.commits)
        written = trainer.checkpoint("periodic")
        seen[f"commits {attempt}"] = len(consumer.commits) - commits
        return written

    seen["written 1"] = checkpoint(1, 5)
    if rank == 1:
        trainer.store.write = disk_full
    seen["written 2"] = checkpoint(2, 9)
    seen["failures after 2"] = trainer.checkpoint_failures.attempts
    seen["health after 2"] = trainer.health()[1]
    if rank == 1:
        del trainer.store.write
    else:
        trainer.store.write_round = disk_full
    seen["written 3"] = checkpoint(3, 9)
    seen["failures after 3"] = trainer.checkpoint_failures.attempts
    seen["parts after 3"] = trainer.store.steps()
    seen["recorded after 3"] = CheckpointStore(Path(base) / "rank-0").round()["round"]
    if rank == 0:
        del trainer.store.write_round
    seen["written 4"] = checkpoint(4, 9)
    seen["failures after 4"] = trainer.checkpoint_failures.attempts
    seen["round after 4"] = trainer.checkpoints.round
    if rank == 1:
        trainer.store.write = disk_full
    trainer.kafka.positions[("impressions", rank)] = 12
    trainer.stop_requested = True
    trainer._loop()  # a stop: its last round fails on rank 1
    seen["exit status"] = trainer.exit_status
    seen["log"] = lines.lines
    trainer.store.unlock()

    restarted = RankTrainer(cfg, ranks, ledger_dir=str(Path(base) / "ledger"))  # the next start of this rank
    seen["restored"] = restarted.restore()
    seen["restored positions"] = [list(k) + [v] for k, v in restarted.kafka.positions.items()]
    seen["ledger"] = [row["impression_id"] for row in read_ledger(Path(base) / "ledger" / f"rank-{rank}")]
    restarted.store.unlock()
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(seen))
    ranks.close(together=True)


@pytest.mark.slow  # two processes of their own
def test_two_ranks_retry_a_round_one_cannot_write_together_and_never_disagree_whether_it_is_complete(
        tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = tmp_path / "checkpoints"
    mp.spawn(_rank_with_a_failing_disk, args=(str(tmp_path / "init"), str(base), str(tmp_path)), nprocs=2,
             join=True)
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, s in enumerate(seen):
        # Round 1 lands; attempt 2 (rank 1's disk full) and 3 (rank 0's round record) are incomplete on both ranks:
        # nothing committed to Kafka; attempt 4, the next retry, lands as round 4 (a failed round's number is not
        # used again); the stop's round fails again on rank 1: status 9 on both.
        assert [s[f"written {a}"] for a in (1, 2, 3, 4)] == [True, False, False, True], (rank, s)
        assert [s[f"commits {a}"] for a in (1, 2, 3, 4)] == [1, 0, 0, 1], (rank, s)
        assert (s["failures after 2"], s["failures after 3"], s["failures after 4"]) == (1, 2, 0)
        assert "checkpoints failing for" in s["health after 2"]
        assert s["recorded after 3"] == 1  # round.json names round 1 still: a restart now would resume from it
        assert 1 in s["parts after 3"], (rank, s)  # two incomplete rounds later, round 1's part is still there
        assert s["round after 4"] == 4 and s["exit status"] == 9, (rank, s)
        failed = [line for line in s["log"] if "could not be written in" in line]
        assert len(failed) == 3 and all("nothing is committed to Kafka until a checkpoint lands" in line
                                        for line in failed), (rank, failed)
        # A restart resumes from round 4, the last complete one, its positions and its ledger rows.
        assert s["restored"] == 4 and s["restored positions"] == [["impressions", rank, 9]], (rank, s)
        assert s["ledger"] == [f"rank-{rank}-attempt-{a}" for a in (1, 2, 3, 4)], (rank, s)
    zero, one = (s["log"] for s in seen)
    assert any("rank 1/2: its part of checkpoint round 2 could not be written ([Errno 28] No space left on device)"
               in line for line in one), one
    assert any("rank 0/2: checkpoint round 2 is incomplete: rank 1/2 could not write its part (see its log)" in line
               for line in zero), zero
    assert any("rank 0/2: its round record of checkpoint round 3 could not be written" in line for line in zero), zero
    assert any("rank 1/2: checkpoint round 3 is incomplete: rank 0/2 could not write its round record" in line
               for line in one), one
    assert json.loads((base / "rank-0" / "round.json").read_text())["round"] == 4
    assert CheckpointStore(base / "rank-0").steps()[-1] == 5  # the stop's part of rank 0, of an incomplete round


def _rank_whose_model_diverges(rank: int, init: str, base: str, out: str) -> None:
    """Rank ``rank`` of two trainers (no broker): a round, then rank 1's replica diverges (a weight NaN), a round is
    due, then a stop. What it saw goes to ``out/rank-<r>.json``."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{base}'", "publish.enabled=false",
                                                       "kafka.poll_timeout_ms=20", "distributed.timeout_s=60.0"])
    ranks = Ranks(RankInfo(rank, 2), cfg.distributed)
    trainer = RankTrainer(cfg, ranks)
    trainer.kafka.consumer = Consumer([TopicPartition("impressions", rank)])
    trainer.dead_letters.producer = trainer.publisher.producer = FlakyProducer(refuse=False)
    trainer.restore()
    seen: dict[str, Any] = {}
    trainer.kafka.positions[("impressions", rank)] = 5
    seen["written 1"] = trainer.checkpoint("periodic")
    if rank == 1:
        with torch.no_grad():
            next(trainer.learner.learner.model.parameters()).view(-1)[0] = float("nan")
    trainer.kafka.positions[("impressions", rank)] = 9
    seen["written 2"] = trainer.checkpoint("periodic")
    seen["exit status"], seen["stop"] = trainer.exit_status, trainer.stop_requested
    trainer.stop_requested = True  # (it is already, unless the divergence went unseen)
    trainer._loop()  # the final round finds the same model on every rank
    seen["final exit status"] = trainer.exit_status
    seen["parts"] = trainer.store.steps()
    trainer.store.unlock()
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(seen))
    ranks.close(together=True)


@pytest.mark.slow  # two processes of their own
def test_a_model_that_diverged_on_one_rank_is_written_by_no_rank_and_every_rank_exits_10(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = tmp_path / "checkpoints"
    mp.spawn(_rank_whose_model_diverges, args=(str(tmp_path / "init"), str(base), str(tmp_path)), nprocs=2,
             join=True)
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, s in enumerate(seen):
        assert (s["written 1"], s["written 2"], s["stop"]) == (True, False, True), (rank, s)
        assert s["exit status"] == s["final exit status"] == 10, (rank, s)
        assert s["parts"] == [1], (rank, s)  # no part of a later round on any rank
    assert json.loads((base / "rank-0" / "round.json").read_text())["round"] == 1
    err = capfd.readouterr().err
    assert "the model diverged: the model of step 0 holds values that are not finite numbers: /model/" in err
    assert "diverged on another rank (see its log)" in err
