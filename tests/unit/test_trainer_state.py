"""The trainer's glue that needs no broker: learner state through a checkpoint file, join clock rebase, ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.state.checkpoints import CheckpointStore
from consumers.runtime.config import load_config
from consumers.core.join import AttributionJoin
from consumers.state.ledger import Ledger, read_ledger
from consumers.trainer.daemon import flatten_state, join_config, model_config, rebase_join_clock, unflatten_state
from models.features import encode_rows
from models.learner import Learner

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}"]


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i + offset}", "features": {},
             "labels": {"click": i % 2, "long_view": (i // 2) % 2}} for i in range(n)]


def test_learner_state_survives_a_checkpoint_file_exactly(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides=SMALL)
    learner = Learner(model_config(cfg))
    spec, tasks = learner.config.features, learner.config.tasks
    for k in range(3):
        learner.step(encode_rows(rows(16, 100 * k), spec, tasks))
    tensors, skeleton = flatten_state(learner.state_dict(), "learner")
    store = CheckpointStore(tmp_path, keep_last=2)
    store.write(learner.steps, tensors, {"learner": skeleton})
    loaded = store.latest()
    restored = Learner(model_config(cfg))
    restored.load_state_dict(unflatten_state(loaded.metadata["learner"], loaded.tensors))
    probe = encode_rows(rows(16, 1000), spec, tasks)
    losses_a, predictions_a = learner.step(probe)
    losses_b, predictions_b = restored.step(probe)
    assert losses_a == losses_b
    for task in tasks:
        assert torch.equal(predictions_a[task], predictions_b[task])


def test_rebased_join_state_does_not_mark_partitions_idle_after_a_long_downtime() -> None:
    cfg = load_config(None, env={}, overrides=["join.idle_timeout_s=10", "join.attribution_window_s={click=1, long_view=1}"])
    join = AttributionJoin(join_config(cfg))
    sources = [("impressions", 0), ("impressions", 1)]
    join.assign(sources, now=0.0)
    join.add_impression({"impression_id": "a", "ts_ms": 1_000, "user_id": "u", "item_id": "i", "features": {}},
                        sources[0], now=1.0)
    join.add_impression({"impression_id": "b", "ts_ms": 1_000, "user_id": "u", "item_id": "i", "features": {}},
                        sources[1], now=1.0)
    state = join.state_dict()
    restarted = AttributionJoin(join_config(cfg))
    restarted.load_state_dict(rebase_join_clock(state, now=1_000.0))  # the process was down for 999 s
    restarted.tick(1_001.0)
    restarted.add_impression({"impression_id": "c", "ts_ms": 100_000, "user_id": "u", "item_id": "i",
                              "features": {}}, sources[0], now=1_001.0)
    assert restarted.watermark_ms == 1_000  # partition 1 still holds it back
    assert restarted.emit() == []


def test_ledger_keeps_only_segments_up_to_the_restored_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, ("click",))
    ledger.add(["a", "b"], {"click": [1, 0]}, {"click": [0.9, 0.1]})
    ledger.commit(2)
    ledger.add(["c"], {"click": [1]}, {"click": [0.5]})
    ledger.commit(3)  # its checkpoint never landed
    ledger.add(["d"], {"click": [0]}, {"click": [0.5]})  # never committed
    assert Ledger(tmp_path, ("click",)).discard_after(2) == [3]
    assert [(r["impression_id"], r["label/click"]) for r in read_ledger(tmp_path)] == [("a", 1), ("b", 0)]


def test_model_section_builds_the_model_config() -> None:
    cfg = load_config(None, env={}, overrides=SMALL + ["model.seed=7"])
    model = model_config(cfg)
    assert model.tasks == ("click", "long_view") and model.seed == 7 and model.features.hash_buckets == 1024


def test_freshness_percentiles_weigh_each_entry_by_its_samples() -> None:
    import random

    from consumers.trainer.daemon import Trainer

    trainer = object.__new__(Trainer)  # only the freshness record is needed
    trainer.freshness_s = []
    assert trainer.freshness_percentiles() is None
    rng = random.Random(1)
    trainer.freshness_s = [(rng.random(), rng.randint(1, 50)) for _ in range(300)]
    flat = sorted(seconds for seconds, n in trainer.freshness_s for _ in range(n))
    got = trainer.freshness_percentiles((0.5, 0.99, 1.0))
    assert got == {0.5: flat[len(flat) // 2], 0.99: flat[int(len(flat) * 0.99)], 1.0: flat[-1]}


class _NeverAssigned:
    """A consumer whose group join never completes (kafka-python's stall after a restart, as seen in CI)."""

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
        import time

        time.sleep(timeout_ms / 1000)
        return {}

    def assignment(self) -> set:
        return set()

    def topics(self) -> set:
        return {"impressions"}  # the feedback topic was never created


def test_trainer_without_partitions_for_stall_exit_s_checkpoints_and_exits_4(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    from consumers.trainer.daemon import Trainer

    cfg = load_config(None, env={}, overrides=SMALL + [
        f"checkpoint.dir='{tmp_path}'", "kafka.stall_exit_s=0.3", "kafka.poll_timeout_ms=20", "publish.enabled=false"])
    trainer = Trainer(cfg)
    trainer.consumer = _NeverAssigned()
    trainer._loop()
    assert trainer.exit_status == 4
    assert "topic(s) feedback do not exist" in caplog.text  # the likely reason is named
    assert CheckpointStore(tmp_path, keep_last=2).latest() is not None  # the shutdown checkpoint was written
    healthy, reason = trainer.health()
    assert healthy  # only 0.3 s without partitions: /healthz waits 60 s before it says so
    trainer.unassigned_since -= 120
    healthy, reason = trainer.health()
    assert not healthy and reason.startswith("no partition assigned for 12"), reason


class _Future:
    def __init__(self, ok: bool) -> None:
        self.is_done, self._ok = True, ok

    def failed(self) -> bool:
        return not self._ok


class _FlakyProducer:
    """Refuses sends (no metadata: the broker is away) or fails them, then works when ``healthy`` is set."""

    def __init__(self, refuse: bool) -> None:
        self.refuse, self.healthy, self.sent = refuse, False, []

    def send(self, topic: str, **message) -> _Future:
        from kafka.errors import KafkaTimeoutError

        if not self.healthy and self.refuse:
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.sent.append((topic, message["value"]))
        return _Future(ok=self.healthy)

    def flush(self, timeout: float | None = None) -> None:
        pass


@pytest.mark.parametrize("refuse", [True, False], ids=["send-refused", "send-failed"])
def test_dead_letters_of_a_broker_outage_are_retried_and_never_dropped(tmp_path: Path, refuse: bool) -> None:
    from types import SimpleNamespace

    from consumers.trainer.daemon import Trainer
    from streamer.events import EventError

    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'"])
    trainer = Trainer(cfg)
    trainer.producer = producer = _FlakyProducer(refuse)
    record = SimpleNamespace(key=b"u1", value=b"\xc1", offset=7)
    trainer._dead_letter(EventError("not msgpack", reason="not_msgpack"), record, "impressions", 0)
    assert not trainer._flush_dead_letters(timeout_s=0.1)  # not acknowledged: the checkpoint must wait
    assert not trainer._flush_dead_letters(timeout_s=0.1)  # ... and keeps waiting, without losing it
    assert len(trainer._pending_dead_letters) == 1
    producer.healthy = True
    assert trainer._flush_dead_letters(timeout_s=0.1)  # retried once the broker is back
    assert trainer._pending_dead_letters == [] and producer.sent[-1] == (cfg.kafka.dead_letter_topic, b"\xc1")


def test_kafka_client_repeats_are_folded_and_the_daemons_own_lines_are_not() -> None:
    import logging

    from consumers.runtime.logs import RepeatFilter

    now = [0.0]
    fold = RepeatFilter(window_s=60.0, clock=lambda: now[0])

    def shown(name: str, msg: str) -> bool:
        return fold.filter(logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None))

    outage = [shown("kafka.net.connection", "Connection lost: %s") for now[0] in (0.0, 0.5, 1.0, 30.0)]
    assert outage == [True, False, False, False]
    assert all(shown("crossdistil.trainer", "checkpoint failed") for now[0] in (31.0, 31.1))  # never folded
    assert shown("kafka.cluster", "No node available")  # another kind of message: shown at once
    now[0] = 61.0
    record = logging.LogRecord("kafka.net.connection", logging.ERROR, __file__, 1, "Connection lost: %s", None, None)
    assert fold.filter(record) and "[3 similar messages in the last 61 s not shown]" in record.msg


class _NoAssignment:
    """A consumer with no partitions: checkpoints commit nothing (lag metrics only)."""

    def assignment(self) -> set:
        return set()


def test_a_failed_publication_is_retried_and_a_restart_publishes_the_step_again(tmp_path: Path) -> None:
    from consumers.trainer.daemon import Trainer
    from models.features import encode_rows

    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'"])
    trainer = Trainer(cfg)
    trainer.consumer, trainer.producer = _NoAssignment(), (producer := _FlakyProducer(refuse=True))
    spec, tasks = trainer.learner.config.features, trainer.learner.config.tasks
    trainer.learner.step(encode_rows(rows(16), spec, tasks))
    assert trainer.checkpoint("shutdown")  # the checkpoint is written; its publication is refused
    assert trainer.publication_pending and trainer.unacknowledged_version == 1
    store = CheckpointStore(tmp_path, keep_last=3)
    assert store.publication() is None
    assert not trainer._publication_retry_due(trainer.last_publish_attempt_at + 5)  # backs off 10 s
    assert trainer._publication_retry_due(trainer.last_publish_attempt_at + 10)

    # The process stops here. The next one restores step 1 and publishes it again, though nothing changed.
    restarted = Trainer(cfg)
    assert restarted.restore() == 1
    assert restarted.publication_pending and restarted._publication_retry_due(0.0)
    restarted.consumer, restarted.producer = _NoAssignment(), producer
    producer.healthy, producer.refuse = True, False  # the broker is back
    assert restarted.checkpoint("publication retry")
    assert not restarted.publication_pending and restarted.unacknowledged_version is None
    assert store.publication() == {"version": 2, "step": 1}  # a newer version than the failed attempt
    assert any(topic == cfg.kafka.model_topic for topic, _ in producer.sent)
    assert not restarted.checkpoint("periodic")  # acknowledged and unchanged: nothing more to do

    # A third start finds the publication recorded: nothing is published again.
    third = Trainer(cfg)
    assert third.restore() == 1
    assert not third.publication_pending and third.version == 2 and third.last_published_step == 1


def test_chunks_of_the_last_acknowledged_publication_are_tombstoned_after_a_failed_smaller_one(tmp_path: Path) -> None:
    from consumers.trainer.daemon import Trainer

    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'"])
    trainer = Trainer(cfg)
    trainer.consumer, trainer.producer = _NoAssignment(), (producer := _FlakyProducer(refuse=False))
    trainer.published_chunks = 40  # as if the last acknowledged publication had 40 chunks
    trainer.learner.step(encode_rows(rows(16), trainer.learner.config.features, trainer.learner.config.tasks))
    assert trainer.checkpoint("periodic") and trainer.publication_pending  # sent, not acknowledged
    attempted = sum(1 for topic, value in producer.sent if topic == cfg.kafka.model_topic and value is not None) - 1
    assert 0 < attempted < 40 and trainer.published_chunks == 40  # any of the 40 keys may still be on the topic

    producer.healthy = True
    producer.sent.clear()
    assert trainer.checkpoint("publication retry") and not trainer.publication_pending
    tombstones = sum(1 for topic, value in producer.sent if topic == cfg.kafka.model_topic and value is None)
    assert tombstones == 40 - attempted
    assert trainer.published_chunks == attempted  # acknowledged: the exact count

class _PausingConsumer:
    """Assignment, high watermarks and pause/resume, as kafka-python keeps them."""

    def __init__(self, partitions: list, highwater: dict) -> None:
        self.partitions, self.high, self.paused = set(partitions), highwater, set()

    def assignment(self) -> set:
        return set(self.partitions)

    def highwater(self, tp):
        return self.high.get(tp)

    def pause(self, *tps) -> None:
        self.paused |= set(tps)

    def resume(self, *tps) -> None:
        self.paused -= set(tps)


def test_partitions_ahead_in_event_time_are_paused_until_the_slowest_catches_up(tmp_path: Path) -> None:
    from kafka import TopicPartition

    from consumers.trainer.daemon import Trainer

    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'", "join.max_skew_s=-1",
                                                       "join.attribution_window_s={click = 10, long_view = 60}"])
    trainer = Trainer(cfg)
    assert trainer.max_skew_ms == 60_000  # -1: the longest window
    imp, fb = TopicPartition("impressions", 0), TopicPartition("feedback", 0)
    trainer.consumer = consumer = _PausingConsumer([imp, fb], {imp: 1000, fb: 1000})
    trainer.join.assign([("impressions", 0), ("feedback", 0)], now=0.0)

    def event(topic: str, ts_s: float, i: int) -> None:
        if topic == "impressions":
            trainer.join.add_impression({"impression_id": f"i{i}", "ts_ms": int(ts_s * 1000), "user_id": "u",
                                         "item_id": "x", "features": {}}, ("impressions", 0), now=1.0)
        else:
            trainer.join.add_feedback({"impression_id": f"i{i}", "ts_ms": int(ts_s * 1000), "task": "click",
                                       "value": 1.0}, ("feedback", 0), now=1.0)
        trainer.positions[(topic, 0)] = trainer.positions.get((topic, 0), 0) + 1

    event("impressions", 100, 0)
    event("feedback", 130, 1)  # 30 s ahead: within the 60 s allowed
    trainer._align_partitions()
    assert consumer.paused == set()
    event("feedback", 200, 2)  # 100 s ahead of the impressions' 100 s
    trainer._align_partitions()
    assert consumer.paused == {fb} and trainer.paused == {fb}
    event("impressions", 150, 3)  # the impressions catch up to within 60 s
    trainer._align_partitions()
    assert consumer.paused == set()
    event("feedback", 400, 4)
    trainer._align_partitions()
    assert consumer.paused == {fb}
    consumer.high[imp] = trainer.positions[("impressions", 0)]  # impressions read to their end: nothing to wait for
    trainer._align_partitions()
    assert consumer.paused == set(), "pausing the only partition with data left would wait forever"

    off = Trainer(load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'"]))
    assert off.max_skew_ms is None  # the default: never pause


def test_a_drained_record_set_of_kafka_python_is_released_so_resumed_partitions_get_their_parked_records() -> None:
    from types import SimpleNamespace

    from consumers.trainer.daemon import _release_drained_records

    class Records:
        def __init__(self, left: int) -> None:
            self.left = left

        def __bool__(self) -> bool:
            return self.left > 0

    drained, live = Records(0), Records(3)
    stalled = SimpleNamespace(_fetcher=SimpleNamespace(_next_partition_records=drained))
    _release_drained_records(stalled)
    assert stalled._fetcher._next_partition_records is None  # kafka-python restores parked records only then
    busy = SimpleNamespace(_fetcher=SimpleNamespace(_next_partition_records=live))
    _release_drained_records(busy)
    assert busy._fetcher._next_partition_records is live  # records not handed out yet are never dropped
    _release_drained_records(SimpleNamespace())  # another client version without these internals: nothing happens
