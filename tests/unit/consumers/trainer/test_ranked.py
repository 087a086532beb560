"""consumers.trainer.ranked without other ranks: each rank's configuration, and restores that must be refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from consumers.runtime.assembly import build_pipeline
from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointError, CheckpointStore
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.kafka_io import KafkaIO
from consumers.trainer.publisher import Publisher
from consumers.trainer.ranked import RoundCheckpointer, rank_config
from tests.unit.consumers.trainer.fakes import Consumer, FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import SMALL, train_one_step

pytestmark = pytest.mark.unit


class RankZeroOfTwo:
    """Rank 0 of 2 alone: every collective returns this rank's own values (the others would agree)."""

    rank, world_size, info = 0, 2, SimpleNamespace(label="rank 0/2")

    def agree(self, values):
        return list(values)


def round_checkpointer(base: Path) -> RoundCheckpointer:
    cfg = rank_config(load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{base}'"]), 0)
    pipeline = build_pipeline(cfg)
    store = CheckpointStore(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last)
    producer = FlakyProducer(refuse=False)
    kafka = KafkaIO(Consumer(), cfg.kafka, pipeline.join, pipeline.metrics)
    return RoundCheckpointer(cfg, store, pipeline, kafka, DeadLetterQueue(producer, cfg.kafka.dead_letter_topic),
                             Publisher(producer, cfg.kafka.model_topic, store, pipeline.metrics), pipeline.metrics,
                             ranks=RankZeroOfTwo(), base_dir=str(base))


def test_each_rank_has_its_own_store_and_metrics_port_and_only_rank_0_publishes() -> None:
    cfg = load_config(None, env={}, overrides=["checkpoint.dir='/ck'", "metrics.port=9400", "checkpoint.keep_last=1"])
    zero, one = rank_config(cfg, 0), rank_config(cfg, 1)
    assert (zero.checkpoint.dir, one.checkpoint.dir) == ("/ck/rank-0", "/ck/rank-1")
    assert (zero.metrics.port, one.metrics.port) == (9400, 9401)
    assert (zero.publish.enabled, one.publish.enabled) == (True, False)
    assert zero.checkpoint.keep_last == 2  # the round being written and the last complete one
    assert rank_config(load_config(None, env={}, overrides=["metrics.port=0"]), 1).metrics.port == 0


def test_ranks_refuse_a_one_rank_trainers_checkpoints(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).write(3, {}, {"trainer_format": 2})
    with pytest.raises(CheckpointError, match="checkpoints of a one-rank trainer"):
        round_checkpointer(tmp_path).restore()


def test_ranks_refuse_rounds_written_by_another_number_of_ranks(tmp_path: Path) -> None:
    CheckpointStore(tmp_path / "rank-0").write_round({"round": 4, "world_size": 3})
    with pytest.raises(CheckpointError, match="written by 3 ranks, this group has 2"):
        round_checkpointer(tmp_path).restore()


def test_a_round_record_that_cannot_be_read_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "rank-0").mkdir()
    (tmp_path / "rank-0" / "round.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="round.json is unreadable"):
        round_checkpointer(tmp_path).restore()


def test_world_size_checks_the_configuration_once_before_starting_any_rank(monkeypatch, capsys) -> None:
    import argparse

    from consumers.trainer import command

    launched: list[list[str]] = []
    monkeypatch.setattr(command, "launch_ranks", lambda argv, run_dir=None, exit_on_stop=0: launched.append(argv) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)

    def run(*flags: str) -> int:
        return command.run(parser.parse_args(["--world-size", "2", *flags]))

    assert run("--set", "distributed.mode='bogus'") == 2
    assert run("--set", "model.options={backbone = 'nope'}") == 2
    assert run("--from-time", "yesterday-ish") == 2
    assert run("--check-config") == 0 and "[distributed]" in capsys.readouterr().out
    assert launched == []  # none of the above started torchrun
    monkeypatch.setattr(command.sys, "argv", ["crossdistil", "train", "--world-size", "2", "--ledger", "L"])
    assert run() == 0
    assert launched and launched[0][:4] == ["--standalone", "--nproc-per-node", "2", "--max-restarts"]
    assert launched[0][-4:] == ["consumers.cli", "train", "--ledger", "L"]


class RankZeroWriting(RankZeroOfTwo):
    """Rank 0 of 2 writing rounds alone: a gather returns this rank's part only."""

    def gather_plain(self, value):
        return [value]


def test_rank_0_checkpoints_a_new_models_step_0_but_publishes_only_from_its_first_step(tmp_path: Path) -> None:
    """As one trainer (``Checkpointer.publishes``): a new model's step 0 is its random initialisation."""
    c = round_checkpointer(tmp_path)
    c.ranks = RankZeroWriting()
    c.pipeline.learner.mode = "sync"  # a ranked learner's; the rank's own part is written the same way
    c.publisher.producer.healthy = True
    c.kafka.positions = {("impressions", 0): 3}
    assert c.write("shutdown") and c.round == 1 and c.publisher.producer.sent == [] and c.publisher.version == 0
    train_one_step(c)
    assert c.write("periodic") and c.round == 2 and c.publisher.producer.sent and c.publisher.version == 1

