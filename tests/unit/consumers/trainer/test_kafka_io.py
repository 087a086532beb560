"""The trainer's Kafka side without a broker: seeks on assignment, pausing by event time, takeovers, stalls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from consumers.core.join import AttributionJoin, JoinConfig
from consumers.runtime.config import load_config
from consumers.trainer.kafka_io import KafkaIO, release_drained_records
from tests.unit.consumers.trainer.fakes import Consumer

pytestmark = pytest.mark.unit

IMP, FB = TopicPartition("impressions", 0), TopicPartition("feedback", 0)


class Metrics:
    def __init__(self) -> None:
        self.lag = None

    def consumer_lag(self, lag) -> None:
        self.lag = lag


def kafka_io(consumer, max_skew_ms=None, **overrides) -> KafkaIO:
    cfg = load_config(None, env={}, overrides=[f"kafka.{k}={v}" for k, v in overrides.items()])
    join = AttributionJoin(JoinConfig({"click": 10.0}))
    return KafkaIO(consumer, cfg.kafka, join, Metrics(), max_skew_ms=max_skew_ms)


def test_assigned_partitions_resume_at_their_position_else_from_time_else_the_beginning() -> None:
    p1 = TopicPartition("impressions", 1)
    io = kafka_io(consumer := Consumer([IMP, FB, p1]))
    io.positions = {("impressions", 0): 42}
    io.start_offsets = {("feedback", 0): 7}
    io.on_assigned([IMP, FB, p1])
    assert consumer.seeks == {IMP: 42, FB: 7, p1: "beginning"}
    assert io.positions[("feedback", 0)] == 7  # kept: a restart never goes back to the beginning
    assert set(io.join._sources) == {("impressions", 0), ("feedback", 0), ("impressions", 1)}


def test_a_revocation_only_asks_the_loop_for_a_checkpoint() -> None:
    io = kafka_io(Consumer([IMP]))
    io.on_revoked([])
    assert not io.revoked
    io.on_revoked([IMP])
    assert io.revoked  # nothing written inside kafka-python's poll: the loop checkpoints after it


def test_commits_export_lag_and_a_refused_commit_means_another_trainer_took_over() -> None:
    from kafka.errors import FencedInstanceIdError

    io = kafka_io(consumer := Consumer([IMP], {IMP: 100}))
    io.positions = {("impressions", 0): 60, ("feedback", 0): 5}  # feedback-0 is not assigned: not committed
    io.commit()
    assert io.metrics.lag == {("impressions", 0): 40} and [list(c) for c in consumer.commits] == [[IMP]]

    def fenced(*_args, **_kwargs):
        raise FencedInstanceIdError()

    consumer.commit = fenced
    io.commit()
    assert io.fenced


def test_polls_keep_the_lag_gauge_live_from_the_read_positions_not_the_last_checkpoint(monkeypatch) -> None:
    import consumers.trainer.kafka_io as kafka_io_module

    clock = [1000.0]
    monkeypatch.setattr(kafka_io_module.time, "monotonic", lambda: clock[0])
    io = kafka_io(consumer := Consumer([IMP, FB], {IMP: 100, FB: 50}))
    io.checkpointed = {("impressions", 0): 10, ("feedback", 0): 0}
    io.positions = {("impressions", 0): 60, ("feedback", 0): 50}
    io.poll(0)
    assert io.metrics.lag == {("impressions", 0): 40, ("feedback", 0): 0}  # read, not checkpointed: 90 / 50 before
    io.positions[("impressions", 0)] = 100
    io.poll(0)
    assert io.metrics.lag[("impressions", 0)] == 40  # refreshed at most every LAG_EXPORT_S
    clock[0] += kafka_io_module.LAG_EXPORT_S
    io.poll(0)
    assert io.metrics.lag == {("impressions", 0): 0, ("feedback", 0): 0}
    consumer.high[FB] = 80  # the next fetch saw new feedback
    clock[0] += kafka_io_module.LAG_EXPORT_S
    io.poll(0)
    assert io.metrics.lag == {("impressions", 0): 0, ("feedback", 0): 30}
    io.metrics = None  # a reader without metrics polls all the same
    clock[0] += kafka_io_module.LAG_EXPORT_S
    io.poll(0)


def test_partitions_ahead_in_event_time_are_paused_until_the_slowest_catches_up() -> None:
    io = kafka_io(consumer := Consumer([IMP, FB], {IMP: 1000, FB: 1000}), max_skew_ms=60_000)
    io.join.assign([("impressions", 0), ("feedback", 0)], now=0.0)

    def event(topic: str, ts_s: float, i: int) -> None:
        if topic == "impressions":
            io.join.add_impression({"impression_id": f"i{i}", "ts_ms": int(ts_s * 1000), "user_id": "u",
                                    "item_id": "x", "features": {}}, ("impressions", 0), now=1.0)
        else:
            io.join.add_feedback({"impression_id": f"i{i}", "ts_ms": int(ts_s * 1000), "task": "click",
                                  "value": 1.0}, ("feedback", 0), now=1.0)
        io.positions[(topic, 0)] = io.positions.get((topic, 0), 0) + 1

    event("impressions", 100, 0)
    event("feedback", 130, 1)  # 30 s ahead: within the 60 s allowed
    io.align()
    assert consumer.paused == set()
    event("feedback", 200, 2)  # 100 s ahead of the impressions' 100 s
    io.align()
    assert consumer.paused == {FB} and io.paused == {FB} and io.partition_pauses == 1
    event("impressions", 150, 3)  # the impressions catch up to within 60 s
    io.align()
    assert consumer.paused == set()
    event("feedback", 400, 4)
    io.align()
    assert consumer.paused == {FB}
    consumer.high[IMP] = io.positions[("impressions", 0)]  # impressions read to their end: nothing to wait for
    io.align()
    assert consumer.paused == set(), "pausing the only partition with data left would wait forever"


def test_without_max_skew_nothing_is_ever_paused() -> None:
    io = kafka_io(consumer := Consumer([IMP, FB], {IMP: 10, FB: 10}))
    io.align()
    assert consumer.paused == set() and io.max_skew_ms is None


def test_a_drained_record_set_of_kafka_python_is_released_so_resumed_partitions_get_their_parked_records() -> None:
    class Records:
        def __init__(self, left: int) -> None:
            self.left = left

        def __bool__(self) -> bool:
            return self.left > 0

    drained, live = Records(0), Records(3)
    stalled = SimpleNamespace(_fetcher=SimpleNamespace(_next_partition_records=drained))
    release_drained_records(stalled)
    assert stalled._fetcher._next_partition_records is None  # kafka-python restores parked records only then
    busy = SimpleNamespace(_fetcher=SimpleNamespace(_next_partition_records=live))
    release_drained_records(busy)
    assert busy._fetcher._next_partition_records is live  # records not handed out yet are never dropped
    release_drained_records(SimpleNamespace())  # another client version without these internals: nothing happens


def test_no_partition_for_stall_exit_s_is_a_stall_and_the_missing_topic_is_named(
        caplog: pytest.LogCaptureFixture) -> None:
    io = kafka_io(Consumer([], topics={"impressions"}), stall_exit_s=300)
    assert not io.stalled(0.0)
    assert not io.stalled(20.0) and "topic(s) feedback do not exist" in caplog.text  # said after 15 s
    assert io.stalled(300.0)
    io.consumer.partitions = {IMP}
    assert not io.stalled(301.0) and io.unassigned_since is None


def test_a_batch_the_client_cannot_decode_is_named_by_topic_partition_and_offset() -> None:
    from kafka.errors import CorruptRecordError, UnsupportedCodecError

    class Unreadable(Consumer):
        def __init__(self, error) -> None:
            super().__init__([IMP], {IMP: 10})
            self.error = error
            self._fetcher = SimpleNamespace(_next_partition_records=SimpleNamespace(topic_partition=IMP,
                                                                                    next_fetch_offset=7))

        def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
            raise self.error

    io = kafka_io(Unreadable(UnsupportedCodecError("Libraries for zstd compression codec not found")))
    assert io.poll(10) == {} and "impressions-0 at offset 7" in io.unreadable and "zstandard" in io.unreadable
    io = kafka_io(Unreadable(CorruptRecordError("Record batch failed crc check")))
    io.poll(10)
    assert "impressions-0 at offset 7" in io.unreadable and "damaged" in io.unreadable


class PartitionedConsumer(Consumer):
    """A consumer that knows the partition counts of its topics and takes a manual assignment."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__([])
        self.counts = counts

    def partitions_for_topic(self, topic: str):
        return set(range(self.counts[topic])) if topic in self.counts else None

    def assign(self, partitions) -> None:
        self.partitions = set(partitions)


def test_a_rank_owns_the_partitions_congruent_to_it_on_both_topics_and_seeks_them() -> None:
    io = kafka_io(consumer := PartitionedConsumer({"impressions": 5, "feedback": 5}))
    io.positions = {("impressions", 3): 11}
    owned = io.assign_static(1, 2)
    assert owned == [("impressions", 1), ("impressions", 3), ("feedback", 1), ("feedback", 3)]
    assert consumer.assignment() == {TopicPartition(t, p) for t, p in owned}
    assert consumer.seeks[TopicPartition("impressions", 3)] == 11
    assert consumer.seeks[TopicPartition("feedback", 1)] == "beginning"
    assert set(io.join._sources) == set(owned)


@pytest.mark.parametrize("counts, world, message", [
    ({"impressions": 4, "feedback": 2}, 2, "4 partitions and feedback 2"),
    ({"impressions": 2, "feedback": 2}, 4, "4 ranks need at least 4 partitions"),
    ({"impressions": 2}, 2, "topic feedback does not exist"),
])
def test_ranks_refuse_topics_that_are_not_co_partitioned_or_too_small(counts, world, message) -> None:
    with pytest.raises(ValueError, match=message):
        kafka_io(PartitionedConsumer(counts)).assign_static(0, world)


def test_no_partition_although_the_topics_have_some_rejoins_the_group_every_10_s(
        caplog: pytest.LogCaptureFixture) -> None:
    class Cluster:  # kafka-python's cached metadata
        def __init__(self, partitions: dict) -> None:
            self.partitions, self.updates = partitions, 0

        def partitions_for_topic(self, topic: str):
            return self.partitions.get(topic)

        def request_update(self) -> None:
            self.updates += 1

    consumer = Consumer([])
    consumer._cluster = Cluster({"impressions": {0}})  # feedback's partitions not known yet
    consumer._coordinator = SimpleNamespace(rejoins=0)
    consumer._coordinator.request_rejoin = lambda: setattr(consumer._coordinator, "rejoins",
                                                           consumer._coordinator.rejoins + 1)
    io = kafka_io(consumer, stall_exit_s=300)
    for now in (0.0, 5.0, 12.0):
        assert not io.stalled(now)
    assert consumer._cluster.updates == 2 and consumer._coordinator.rejoins == 0  # metadata asked for, no rejoin
    consumer._cluster.partitions["feedback"] = {0}
    assert not io.stalled(21.0)
    assert not io.stalled(25.0)  # at most every 10 s
    assert consumer._coordinator.rejoins == 1 and "rejoining the group" in caplog.text
    assert not io.stalled(31.5) and consumer._coordinator.rejoins == 2
    consumer.partitions = {IMP, FB}
    assert not io.stalled(50.0) and consumer._coordinator.rejoins == 2  # assigned: nothing more
    del consumer._coordinator  # another client version without these internals: only the metadata nudge
    consumer.partitions = set()
    assert not io.stalled(100.0) and not io.stalled(120.0)


class Metadata:
    """kafka-python's cached cluster metadata: the brokers (none before the first answer), the topics, and when it
    was last refreshed (kafka-python's clock: time.monotonic() in ms)."""

    def __init__(self, partitions: dict, brokers: tuple = (1,), refreshed_ms: float = float("inf")) -> None:
        self.partitions, self._brokers = partitions, list(brokers)
        self._last_successful_refresh_ms = refreshed_ms

    def brokers(self) -> list:
        return self._brokers

    def topics(self) -> set:
        return set(self.partitions)

    def partitions_for_topic(self, topic: str):
        return self.partitions.get(topic)

    def request_update(self) -> None:
        pass


def test_a_missing_input_topic_is_named_at_once_with_the_command_that_creates_it_like_the_other(
        caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer([])
    consumer._cluster = Metadata({"impressions": {0, 1, 2}})
    io = kafka_io(consumer, stall_exit_s=300, bootstrap="'b:9092'")
    assert not io.stalled(0.0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "topic(s) feedback do not exist on b:9092" in said[0]
    assert "never creates its input topics" in said[0] and "reads them as soon as they exist" in said[0]
    assert ("'kafka-topics.sh --bootstrap-server b:9092 --create --topic feedback --partitions 3'" in said[0]
            and "3 partitions (as impressions has)" in said[0])
    assert not io.stalled(10.0) and len(caplog.records) == 1  # then every 30 s, as any wait without partitions
    assert not io.stalled(31.0) and len(caplog.records) == 2


def test_while_an_input_topic_is_missing_metadata_is_asked_for_once_a_second_then_at_the_clients_pace_again() -> None:
    consumer = Consumer([])
    consumer._cluster = Metadata({"impressions": {0, 1}})  # the broker said feedback does not exist
    consumer._cluster.config = {"retry_backoff_ms": 100}  # kafka-python's cluster metadata: 10 requests a second
    io = kafka_io(consumer, stall_exit_s=300)
    io.stalled(0.0)
    assert consumer._cluster.config["retry_backoff_ms"] == 1000
    consumer._cluster.partitions["feedback"] = {0, 1}  # made: seen at the next request, within a second
    io.stalled(0.5)
    assert consumer._cluster.config["retry_backoff_ms"] == 100  # a rebalance or a broker restart is not slowed
    consumer._cluster.partitions.pop("feedback")
    io.stalled(1.0)
    consumer.partitions = {IMP}
    io.stalled(1.5)
    assert consumer._cluster.config["retry_backoff_ms"] == 100


def test_before_the_first_metadata_no_topic_is_said_to_be_missing(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer([])
    consumer._cluster = Metadata({}, brokers=())  # nothing heard from the broker yet: every topic looks absent
    io = kafka_io(consumer, stall_exit_s=300)
    assert not io.stalled(0.0) and not io.stalled(5.0) and not caplog.records
    assert not io.stalled(16.0)
    assert [r.getMessage() for r in caplog.records] == ["no partition assigned after 16 s"]


def test_metadata_from_before_the_subscription_says_no_topic_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    """The bootstrap's metadata names the brokers and no topic: right after subscribing every topic looks absent."""
    consumer = Consumer([])
    consumer._cluster = Metadata({}, refreshed_ms=0.0)
    consumer.subscribe = lambda topics, listener: None
    io = kafka_io(consumer, stall_exit_s=300)
    io.subscribe()
    assert not io.stalled(0.0) and not io.stalled(5.0) and not caplog.records
    consumer._cluster._last_successful_refresh_ms = float("inf")  # the answer to the subscription's request
    assert not io.stalled(6.0) and "topic(s) impressions, feedback do not exist" in caplog.text


def test_from_time_with_an_input_topic_not_made_yet_starts_the_known_ones_at_the_time_and_says_the_rest_will(
        caplog: pytest.LogCaptureFixture) -> None:
    consumer = PartitionedConsumer({"impressions": 2})
    consumer.offsets_for_times = lambda query: {tp: SimpleNamespace(offset=7) for tp in query}
    consumer.subscribe = lambda topics, listener: None
    io = kafka_io(consumer)
    with caplog.at_level("INFO", logger="crossdistil.trainer"):
        io.subscribe(start_ms=1_700_000_000_000)
    assert io.start_offsets == {("impressions", 0): 7, ("impressions", 1): 7}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "topic(s) feedback do not exist yet; once made, their partitions start at the time too" in caplog.text


class TimedConsumer(PartitionedConsumer):
    """Answers offsets_for_times with ``at_time`` per partition (None: no record that recent), or fails while
    ``away``; ends at ``end``."""

    def __init__(self, counts: dict[str, int], at_time: dict, end: int = 0) -> None:
        super().__init__(counts)
        self.at_time, self.end, self.away, self.asked = at_time, end, False, []
        self.subscribe = lambda topics, listener: None

    def offsets_for_times(self, query: dict) -> dict:
        from kafka.errors import KafkaTimeoutError

        self.asked.append(query)
        if self.away:
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 5000 ms")
        return {tp: None if self.at_time.get(tp) is None else SimpleNamespace(offset=self.at_time[tp]) for tp in query}

    def end_offsets(self, partitions: list, timeout_ms: int | None = None) -> dict:
        return {tp: self.end for tp in partitions}

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
        return {}


def test_a_partition_of_a_topic_made_after_a_from_time_start_begins_at_the_time_not_at_its_beginning() -> None:
    consumer = TimedConsumer({}, at_time={IMP: 5, FB: None}, end=9)  # no topic yet when the trainer starts
    io = kafka_io(consumer)
    io.subscribe(start_ms=1_700_000_000_000)
    assert io.start_offsets == {}
    consumer.partitions = {IMP, FB}  # the topics are made: the group assigns their partitions inside a poll
    io.on_assigned([IMP, FB])
    assert consumer.paused == {IMP, FB} and consumer.seeks == {}  # nothing fetched, nothing looked up inside poll
    io.poll(0)
    assert consumer.asked == [{IMP: 1_700_000_000_000, FB: 1_700_000_000_000}]
    assert consumer.seeks == {IMP: 5, FB: 9}  # FB: no record that recent yet, so its end
    assert io.positions == {("impressions", 0): 5, ("feedback", 0): 9}  # kept by the next checkpoint
    assert consumer.paused == set() and io.awaiting_start == set()


def test_a_late_partition_whose_offset_cannot_be_looked_up_stays_paused_until_it_can() -> None:
    consumer = TimedConsumer({}, at_time={IMP: 5})
    io = kafka_io(consumer)
    io.subscribe(start_ms=1_700_000_000_000)
    consumer.partitions = {IMP}
    io.on_assigned([IMP])
    consumer.away = True
    io.poll(0)
    assert consumer.paused == {IMP} and consumer.seeks == {} and io.awaiting_start == {IMP}
    consumer.away = False
    io.poll(0)
    assert consumer.seeks == {IMP: 5} and consumer.paused == set()


def test_without_from_time_a_late_partition_is_read_from_its_beginning() -> None:
    consumer = TimedConsumer({}, at_time={IMP: 5})
    io = kafka_io(consumer)
    io.subscribe()
    consumer.partitions = {IMP}
    io.on_assigned([IMP])
    io.poll(0)
    assert consumer.seeks == {IMP: "beginning"} and consumer.paused == set() and consumer.asked == []
