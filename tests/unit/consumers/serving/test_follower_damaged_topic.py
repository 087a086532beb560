"""A replica over a serving topic with broken publications: it keeps the last good model, reports what is wrong
(and only what is), and says what to do about a newer wire format."""

from __future__ import annotations

import threading

import msgpack
import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.follower import CheckpointFollower, ModelHolder
from consumers.state.wire import Reassembler, encode_checkpoint
from tests.unit.consumers.state.test_learner_state import trained_learner

pytestmark = pytest.mark.unit


class Record:
    def __init__(self, offset: int, key: bytes, value: bytes | None) -> None:
        self.offset, self.key, self.value = offset, key, value


class TopicConsumer:
    """The serving topic's partition 0 as a list of (key, value), read as kafka-python's consumer reads it."""

    def __init__(self, messages: list) -> None:
        self.messages, self.at, self.tp = list(messages), 0, TopicPartition("model-updates", 0)

    def assign(self, tps: list) -> None:
        pass

    def beginning_offsets(self, tps: list) -> dict:
        return {self.tp: 0}

    def end_offsets(self, tps: list) -> dict:
        return {self.tp: len(self.messages)}

    def seek(self, tp, offset: int) -> None:
        self.at = offset

    def position(self, tp) -> int:
        return self.at

    def poll(self, timeout_ms: int = 0) -> dict:
        records = [Record(i, *m) for i, m in enumerate(self.messages[self.at:self.at + 3], start=self.at)]
        self.at += len(records)
        return {self.tp: records} if records else {}


@pytest.fixture(scope="module")
def publications() -> list:
    """Versions 1 and 2 of one model, 4 chunks each."""
    tensors, serving = trained_learner().serving_state()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return [encode_checkpoint(tensors, {"step": v, "serving": serving}, version=v, chunk_size=size // 3)
            for v in (1, 2)]


def start(messages: list) -> tuple[CheckpointFollower, ServingMetrics]:
    metrics = ServingMetrics(CollectorRegistry())
    follower = CheckpointFollower(TopicConsumer(messages), "model-updates", ModelHolder(), metrics)
    follower.find_latest(threading.Event())
    return follower, metrics


def failures(metrics: ServingMetrics) -> dict:
    return {s.labels["reason"]: s.value for m in metrics.registry.collect() for s in m.samples
            if s.name == "crossdistil_serving_reload_failures_total"}


def test_a_restart_over_a_broken_newest_publication_reports_only_what_is_broken(publications: list) -> None:
    v1, v2 = publications
    follower, metrics = start(v1 + [m for m in v2 if m[0] != b"chunk/1"])  # chunk/1 of version 2 never landed
    assert follower.holder.current.version == 1 and follower.stats.start_path == "slow"
    # The fast path's window held version 1's manifest without its chunks: not a rejection of version 1.
    assert list(follower.stats.rejections) == [(2, "missing_chunk")]
    assert failures(metrics) == {"missing_chunk": 1.0}


def test_a_publication_of_a_newer_wire_format_is_rejected_naming_its_version_and_the_upgrade() -> None:
    chunk = encode_checkpoint({}, {"step": 1}, version=7)[0]
    header = msgpack.unpackb(chunk[1], raw=False)
    rejection = Reassembler().feed(chunk[0], msgpack.packb({**header, "format": 2}, use_bin_type=True))
    assert rejection.reason == "unsupported_format" and rejection.version == 7
    assert "a newer crossdistil wrote it: upgrade the readers before the writer" in rejection.detail
