"""A running model's configuration changed on restart: retuned options restore and are logged, a damaged stream side
or an unreadable file is one clear error (exit 2), and a warm start begins a new model from an old checkpoint's
weights and, by default, from its cut of the stream. No broker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import consumers.runtime.learner_process as learner_process
from consumers.state.checkpoints import CheckpointError, CheckpointStore
from consumers.trainer.checkpointing import Checkpointer, read_checkpoint
from tests.unit.consumers.trainer.fakes import FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import checkpointer, train_one_step

pytestmark = pytest.mark.unit

IMPRESSION = {"v": 1, "user_id": "u", "item_id": "i", "features": {}}
THREE_TASKS = ("model.tasks=['click', 'long_view', 'like']",)


def old_model(folder: Path, *overrides: str) -> Checkpointer:
    """A trainer's checkpoint in ``folder``: one step trained, two impressions pending in the join (one with a click),
    positions on both topics."""
    c = checkpointer(folder, FlakyProducer(refuse=False), *overrides)
    train_one_step(c)
    join = c.pipeline.join
    join.add_events([{**IMPRESSION, "impression_id": f"p{i}", "ts_ms": 1_000 + i} for i in range(2)],
                    ("impressions", 0))
    join.add_events([{"v": 1, "impression_id": "p0", "ts_ms": 1_500, "task": "click", "value": 1}], ("feedback", 0))
    c.kafka.positions = {("impressions", 0): 2, ("feedback", 0): 1}
    assert c.write("shutdown")
    return c


def embedding(c: Checkpointer) -> torch.Tensor:
    return c.pipeline.learner.learner.model.embedding.weight.detach().clone()


# ------------------------------------------------------------------------------------------- a restore


def test_a_restore_with_retuned_options_logs_each_change_and_trains_on_with_the_configured_values(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="crossdistil.trainer"):
        c = checkpointer(tmp_path, FlakyProducer(refuse=False), "model.options.lr=0.0005",
                         "model.options.kd_weight=0.5", "model.seed=3")
        assert c.restore() == 1
    said = [r.getMessage() for r in caplog.records if "retuned on restore" in r.getMessage()]
    assert said == ["ckpt-000000000001.cdckpt: model.options.kd_weight was 1.0, now 0.5 (retuned on restore)",
                    "ckpt-000000000001.cdckpt: model.options.lr was 0.001, now 0.0005 (retuned on restore)",
                    "ckpt-000000000001.cdckpt: model.seed was 0, now 3 (retuned on restore)"]
    learner = c.pipeline.learner.learner
    assert learner.dense_optimizer.param_groups[0]["lr"] == 0.0005 and learner.steps == 1
    assert c.pipeline.join.pending_impressions == 2


@pytest.mark.parametrize("key", ["positions", "publish_version", "join_state"])
def test_a_verified_checkpoint_without_a_stream_key_is_a_checkpoint_error_naming_the_file_and_the_key(
        tmp_path: Path, key: str) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    train_one_step(c)
    metadata = {k: v for k, v in c._metadata(1, 0).items() if k != key}
    written = c.pipeline.learner.write_checkpoint(str(tmp_path), 3, metadata, None)
    with pytest.raises(CheckpointError) as error:
        checkpointer(tmp_path, FlakyProducer(refuse=False)).restore()
    assert str(error.value).startswith(f"{written['path']} verifies but its metadata has no '{key}'")


def test_a_checkpoint_that_cannot_be_read_when_the_learner_loads_it_is_a_checkpoint_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_model(tmp_path)

    def unreadable(_learner, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(learner_process, "load_learner_checkpoint", unreadable)
    with pytest.raises(CheckpointError, match=r"ckpt-000000000001.cdckpt cannot be read \(Permission denied\)"):
        checkpointer(tmp_path, FlakyProducer(refuse=False)).restore()


# ------------------------------------------------------------------------------------------- warm start


def test_a_warm_start_with_a_task_added_carries_the_weights_and_resumes_the_old_cut_of_the_stream(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = old_model(tmp_path / "old")
    with caplog.at_level(logging.INFO, logger="crossdistil.trainer"):
        new = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), *THREE_TASKS,
                           f"checkpoint.warm_start='{tmp_path / 'old'}'")
        assert new.restore() is None  # no checkpoint of this model restored: a new one
    learner = new.pipeline.learner.learner
    assert learner.config.tasks == ("click", "long_view", "like") and learner.steps == 0
    assert torch.equal(embedding(new), embedding(old))
    old_towers = old.pipeline.learner.learner.model.student_towers
    assert all(torch.equal(learner.model.student_towers[i][1].weight, old_towers[i][1].weight) for i in (0, 1))
    # the stream from the old cut: positions, pending impressions (with a label for like), trained-sample count
    assert new.kafka.positions == {("impressions", 0): 2, ("feedback", 0): 1} and new.kafka.checkpointed == {}
    join = new.pipeline.join
    assert join.pending_impressions == 2 and join.tasks == ("click", "like", "long_view")
    assert new.pipeline.trained_samples == old.pipeline.trained_samples
    assert sorted(join.state_dict()["pending"][0][1].items()) == [("click", 1), ("like", 0), ("long_view", 0)]
    assert new.publisher.version == old.publisher.version and not new.publisher.pending
    text = caplog.text
    assert f"warm start: a new model from {old.store.path_for(1)} (step 1 of the old one): carried over" in text
    assert "the 2 samples held at the cut (pending impressions, the partial batch) get the tasks ['like']" in text
    assert "the stream resumes from the old checkpoint's cut" in text
    # its first checkpoint is its own: the next start restores it, not the old model again
    assert new.write("shutdown") and CheckpointStore(tmp_path / "new").steps() == [0]
    again = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), *THREE_TASKS,
                         f"checkpoint.warm_start='{tmp_path / 'old'}'")
    assert again.restore() == 0 and again.kafka.positions == new.kafka.positions


def test_a_warm_start_with_a_fresh_stream_starts_every_partition_as_a_new_trainer_and_takes_a_file_too(
        tmp_path: Path) -> None:
    old = old_model(tmp_path / "old")
    new = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), "checkpoint.warm_start_stream='fresh'",
                       f"checkpoint.warm_start='{old.store.path_for(1)}'", "model.options.hidden_dims=[16]")
    assert new.restore() is None
    assert new.kafka.positions == {} and new.pipeline.join.pending_impressions == 0
    assert torch.equal(embedding(new), embedding(old))


def test_a_warm_start_folder_skips_a_damaged_newer_checkpoint_and_leaves_it_as_it_is(tmp_path: Path) -> None:
    old_model(tmp_path / "old")
    damaged = CheckpointStore(tmp_path / "old").path_for(7)
    damaged.write_bytes(b"\0" * 100)
    assert read_checkpoint(tmp_path / "old").step == 1
    assert damaged.read_bytes() == b"\0" * 100 and not list((tmp_path / "old").glob("*.corrupt"))


@pytest.mark.parametrize("source, problem", [
    ("missing", "missing does not exist"),
    ("empty", "no usable checkpoint in .*empty: none"),
    ("not-a-checkpoint", "not-a-checkpoint: not a crossdistil checkpoint"),
    ("damaged", "no usable checkpoint in .*damaged: only damaged ones"),
    ("ranks", "ranks holds the checkpoints of several ranks: name its rank-0 folder"),
])
def test_a_warm_start_source_that_is_no_checkpoint_is_a_clear_checkpoint_error(
        tmp_path: Path, source: str, problem: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-checkpoint").write_bytes(b"PK\x03\x04 a torch.save zip" + bytes(100))
    CheckpointStore(tmp_path / "damaged").path_for(3).write_bytes(b"\0" * 64)
    (tmp_path / "ranks" / "rank-0").mkdir(parents=True)
    new = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), f"checkpoint.warm_start='{tmp_path / source}'")
    with pytest.raises(CheckpointError, match=problem):
        new.restore()


def test_a_warm_start_from_a_river_peer_or_into_one_is_refused(tmp_path: Path) -> None:
    old_model(tmp_path / "peer", "model.options={rung = 'river_lr'}")
    with pytest.raises(CheckpointError, match="holds another kind of model"):
        checkpointer(tmp_path / "new", FlakyProducer(refuse=False),
                     f"checkpoint.warm_start='{tmp_path / 'peer'}'").restore()
    old_model(tmp_path / "deep")
    with pytest.raises(CheckpointError, match="warm start is for the deep model"):
        checkpointer(tmp_path / "new-peer", FlakyProducer(refuse=False), "model.options={rung = 'river_lr'}",
                     f"checkpoint.warm_start='{tmp_path / 'deep'}'").restore()


def test_resuming_the_stream_of_other_topics_is_refused_and_a_fresh_stream_is_not(tmp_path: Path) -> None:
    old_model(tmp_path / "old")
    other = ("kafka.impressions_topic='imp-v2'", f"checkpoint.warm_start='{tmp_path / 'old'}'")
    with pytest.raises(CheckpointError, match=r"cut from topics \['feedback', 'impressions'\].*warm_start_stream"):
        checkpointer(tmp_path / "new", FlakyProducer(refuse=False), *other).restore()
    fresh = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), *other, "checkpoint.warm_start_stream='fresh'")
    assert fresh.restore() is None and fresh.kafka.positions == {}


def test_warm_start_is_ignored_once_checkpoint_dir_holds_a_checkpoint(tmp_path: Path) -> None:
    old_model(tmp_path / "new")
    c = checkpointer(tmp_path / "new", FlakyProducer(refuse=False), f"checkpoint.warm_start='{tmp_path / 'gone'}'")
    assert c.restore() == 1  # a source that no longer exists does not matter any more


def test_train_with_warm_start_from_no_checkpoint_exits_2_in_one_line_before_kafka(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.consumers.trainer.test_command import one_line_error, train

    attempts: list[str] = []
    monkeypatch.setattr("consumers.trainer.daemon.connect", lambda k, **_: attempts.append(k.bootstrap))
    assert train(tmp_path, "--warm-start", str(tmp_path / "nowhere")) == 2
    assert one_line_error(capfd) == f"crossdistil train: {tmp_path / 'nowhere'} does not exist"
    assert not attempts


# ----------------------------------------------------------------------------------------------- ranks


def round_checkpointer(base: Path, *overrides: str):
    """Rank 0 of two alone (``test_ranked.RankZeroOfTwo``: every collective returns its own values)."""
    from consumers.runtime.assembly import build_pipeline
    from consumers.runtime.config import load_config
    from consumers.trainer.dead_letters import DeadLetterQueue
    from consumers.trainer.kafka_io import KafkaIO
    from consumers.trainer.publisher import Publisher
    from consumers.trainer.ranked import RoundCheckpointer, rank_config
    from tests.unit.consumers.trainer.fakes import Consumer
    from tests.unit.consumers.trainer.test_checkpointing import SMALL
    from tests.unit.consumers.trainer.test_ranked import RankZeroOfTwo

    cfg = rank_config(load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{base}'", *overrides]), 0)
    pipeline = build_pipeline(cfg)
    store = CheckpointStore(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last)
    producer = FlakyProducer(refuse=False)
    return RoundCheckpointer(cfg, store, pipeline, KafkaIO(Consumer(), cfg.kafka, pipeline.join, pipeline.metrics),
                             DeadLetterQueue(producer, cfg.kafka.dead_letter_topic),
                             Publisher(producer, cfg.kafka.model_topic, store, pipeline.metrics), pipeline.metrics,
                             ranks=RankZeroOfTwo(), base_dir=str(base))


def test_ranks_warm_start_rank_0s_model_with_a_fresh_stream_and_refuse_to_resume_a_cut(tmp_path: Path) -> None:
    old = old_model(tmp_path / "old")
    warm = f"checkpoint.warm_start='{tmp_path / 'old'}'"
    ranked = round_checkpointer(tmp_path / "ranks", warm)
    with pytest.raises(CheckpointError, match="with several ranks starts the model from the checkpoint's weights"):
        ranked.restore()
    ranked = round_checkpointer(tmp_path / "ranks", warm, "checkpoint.warm_start_stream='fresh'")
    broadcasts = []
    ranked.pipeline.learner.broadcast_model = lambda: broadcasts.append(embedding(ranked))
    assert ranked.restore() is None
    assert broadcasts and torch.equal(broadcasts[0], embedding(old)) and ranked.kafka.positions == {}


def test_several_ranks_with_a_warm_start_that_resumes_a_cut_are_refused_before_torchrun(monkeypatch, capsys) -> None:
    import argparse

    from consumers.trainer import command

    monkeypatch.setattr(command, "launch_ranks", lambda argv: pytest.fail("torchrun started"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--world-size", "2", "--warm-start", "/old"])) == 2
    assert "set checkpoint.warm_start_stream = \"fresh\"" in capsys.readouterr().err


def test_a_warm_started_models_step_0_is_published_and_stays_so_across_a_restore(tmp_path: Path) -> None:
    """Unlike a new model's step 0 (random weights, never published), a warm start's step 0 is a trained model: its
    first checkpoint is published above the old model's versions, and a restore of that checkpoint knows it."""
    old = old_model(tmp_path / "old")
    new = checkpointer(tmp_path / "new", producer := FlakyProducer(refuse=True),
                       f"checkpoint.warm_start='{tmp_path / 'old'}'")
    assert new.restore() is None and new.pipeline.learner.learner.steps == 0
    assert new.write("shutdown") and new.publisher.pending  # attempted (refused: the broker is away)
    assert new.publisher.unacknowledged_version == old.publisher.version + 1
    restarted = checkpointer(tmp_path / "new", producer, f"checkpoint.warm_start='{tmp_path / 'old'}'")
    assert restarted.restore() == 0 and restarted.warm_started and restarted.publisher.pending
    producer.healthy, producer.refuse = True, False  # the broker is back
    assert restarted.write("publication retry") and not restarted.publisher.pending
    assert restarted.store.publication() == {"version": old.publisher.version + 2, "step": 0}


def test_one_trainer_refuses_what_several_ranks_wrote_instead_of_starting_from_scratch(tmp_path: Path) -> None:
    """``crossdistil train`` without --world-size on a ranks' checkpoint.dir found no checkpoint of its own and
    trained every partition again from its beginning; pointed at rank-0, it resumed only rank 0's partitions."""
    for rank in (0, 1):
        CheckpointStore(tmp_path / f"rank-{rank}").write(4, {}, {"rank": rank, "world_size": 2, "round": 3})
    with pytest.raises(CheckpointError, match=r"holds the checkpoints of 2 ranks \(rank-0, rank-1\), none of one "
                                              r"trainer; resume them with crossdistil train --world-size 2, or start "
                                              rf"one trainer's model .* checkpoint.warm_start = '{tmp_path}/rank-0'"):
        checkpointer(tmp_path, FlakyProducer(refuse=False)).restore()
    with pytest.raises(CheckpointError, match=r"ckpt-000000000004.cdckpt is rank 0's part of a checkpoint round of 2 "
                                              r"ranks: its stream state covers only that rank's partitions"):
        checkpointer(tmp_path / "rank-0", FlakyProducer(refuse=False)).restore()
    fresh = tmp_path / "fresh"
    (fresh / "rank-0").mkdir(parents=True)  # an empty folder of that name is not a round
    assert checkpointer(fresh, FlakyProducer(refuse=False)).restore() is None
