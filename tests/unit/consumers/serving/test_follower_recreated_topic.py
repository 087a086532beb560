"""A replica whose serving topic is deleted and created again (a trainer on a new checkpoint.dir then publishes from
version 1): the new topic's newest publication is served, whatever its version; within one topic's life a version
that is not newer stays refused, and the refusal says what to do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.follower import CheckpointFollower, ModelHolder
from consumers.state.wire import encode_checkpoint
from tests.unit.consumers.serving.test_follower_damaged_topic import TopicConsumer
from tests.unit.consumers.state.test_learner_state import trained_learner

pytestmark = pytest.mark.unit


class Cluster:
    """kafka-python's cluster metadata, as far as the topic's id goes."""

    def __init__(self, topic_id: str) -> None:
        self.id = topic_id

    def topic_id(self, topic: str) -> str:
        return self.id


class RecreatableTopic(TopicConsumer):
    """Partition 0 of a serving topic read as kafka-python reads it, which can be deleted and created again: the new
    log starts at offset 0, and the consumer's position past its end is reset to its beginning (auto_offset_reset
    earliest). ``topic_id``: None for a kafka-python that does not know topic ids."""

    def __init__(self, messages: list, topic_id: str | None) -> None:
        super().__init__(messages)
        self.lock = threading.Lock()
        if topic_id is not None:
            self._cluster = Cluster(topic_id)

    def recreate(self, messages: list, topic_id: str | None, reset_position: bool = True) -> None:
        with self.lock:
            self.messages = list(messages)
            if reset_position:
                self.at = 0
            if topic_id is not None:
                self._cluster.id = topic_id

    def append(self, messages: list) -> None:
        with self.lock:
            self.messages += messages

    def end_offsets(self, tps: list) -> dict:
        with self.lock:
            return super().end_offsets(tps)

    def poll(self, timeout_ms: int = 0) -> dict:
        with self.lock:
            polled = super().poll(timeout_ms)
        if not polled:
            time.sleep(0.005)  # as a poll with nothing to fetch waits
        return polled


@pytest.fixture(scope="module")
def publish() -> Callable[[int, int], list]:
    """The messages of publication ``version`` of a trained model, its step ``step`` (which tells the models apart)."""
    tensors, serving = trained_learner().serving_state()
    return lambda version, step: encode_checkpoint(tensors, {"step": step, "serving": serving}, version=version)


class Following:
    """A follower's Kafka loop in a thread over ``topic``."""

    def __init__(self, topic: RecreatableTopic) -> None:
        self.follower = CheckpointFollower(topic, "model-updates", ModelHolder(), ServingMetrics(CollectorRegistry()),
                                           poll_timeout_ms=5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.follower.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
            time.sleep(0.01)

    def serves(self, version: int, step: int) -> bool:
        current = self.follower.holder.current
        return current is not None and (current.version, current.step) == (version, step)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("topic_id", ["id-a", None], ids=["topic-id", "offsets-only"])
def test_a_recreated_topic_serves_its_newest_publication_whatever_its_version(publish, topic_id) -> None:
    topic = RecreatableTopic(publish(1, 10) + publish(2, 20), topic_id)
    following = Following(topic)
    try:
        following.wait(lambda: following.serves(2, 20), "the old topic's version 2")
        topic.recreate(publish(1, 100), "id-b" if topic_id else None)  # a new trainer: versions start again
        following.wait(lambda: following.serves(1, 100), "the new topic's version 1")
        assert following.follower.stats.topic_recreations == 1
        topic.append(publish(2, 200))
        following.wait(lambda: following.serves(2, 200), "the new topic's version 2")
        topic.append(publish(2, 999))  # within the new topic's life, a version that is not newer stays refused
        following.wait(lambda: len(following.follower.stats.rejections) == 1, "the rejection of a repeated version")
        assert list(following.follower.stats.rejections) == [(2, "stale_version")]
        assert following.serves(2, 200) and following.follower.stats.topic_recreations == 1
    finally:
        following.close()


def test_a_log_that_goes_back_under_the_same_topic_id_is_no_new_topic_and_the_refusal_says_what_to_do(
        publish) -> None:
    """Offsets that go back with an unchanged id are a truncated log (an unclean leader election): the older versions
    on it stay refused; the rejection (in /healthz) tells an operator who did recreate the topic to restart."""
    topic = RecreatableTopic(publish(1, 10) + publish(2, 20), "id-a")
    following = Following(topic)
    try:
        following.wait(lambda: following.serves(2, 20), "version 2")
        topic.recreate(publish(1, 100), "id-a")
        following.wait(lambda: following.follower.holder.rejections[1] == 1, "the rejection of version 1")
        last, _ = following.follower.holder.rejections
        assert (last.version, last.reason) == (1, "stale_version")
        assert "was deleted and created again, restart this replica" in last.detail
        assert following.serves(2, 20) and following.follower.stats.topic_recreations == 0
    finally:
        following.close()


def test_a_recreated_topic_still_empty_serves_its_first_publication_when_it_comes(publish) -> None:
    """Found by its id before anything is on it: the old model stays until the new trainer's first publication."""
    topic = RecreatableTopic(publish(3, 30), "id-a")
    following = Following(topic)
    try:
        following.wait(lambda: following.serves(3, 30), "version 3")
        topic.recreate([], "id-b")
        following.wait(lambda: following.follower.stats.topic_recreations == 1, "the recreation")
        assert following.serves(3, 30)
        topic.append(publish(1, 100))
        following.wait(lambda: following.serves(1, 100), "the new topic's version 1")
    finally:
        following.close()
