"""What ``GET /healthz`` of a replica says about publications it refused: still ``ok`` with the model it serves, and
the last rejection (version, reason, when) with the count since the last good load, so that a probe sees it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.api import ApiServer, serve_api
from consumers.serving.follower import CheckpointFollower, ModelHolder
from consumers.state.wire import encode_checkpoint
from tests.unit.consumers.serving.test_api import request
from tests.unit.consumers.serving.test_follower_damaged_topic import TopicConsumer
from tests.unit.consumers.state.test_learner_state import trained_learner

pytestmark = pytest.mark.unit


class ArrivingTopic(TopicConsumer):
    """The topic at start, then each batch of ``later`` arriving once the follower has read all before it;
    ``on_idle`` runs whenever it has (the follower is then waiting); the last idle sets ``stop``."""

    def __init__(self, messages: list, later: list[list], on_idle: Callable[[], None], stop: threading.Event) -> None:
        super().__init__(messages)
        self.later, self.on_idle, self.stop = list(later), on_idle, stop

    def poll(self, timeout_ms: int = 0) -> dict:
        if self.at < len(self.messages):
            return super().poll(timeout_ms)
        self.on_idle()
        if self.later:
            self.messages += self.later.pop(0)
        else:
            self.stop.set()
        return {}


@pytest.fixture(scope="module")
def model() -> tuple:
    tensors, serving = trained_learner().serving_state()
    return tensors, serving, sum(t.numel() * t.element_size() for t in tensors.values()) // 3


def good(model: tuple, version: int) -> list:
    tensors, serving, chunk_size = model
    return encode_checkpoint(tensors, {"step": version, "serving": serving}, version=version, chunk_size=chunk_size)


def without_serving_state(model: tuple, version: int) -> list:
    """A publication that verifies but is no model (``bad_model``)."""
    tensors, _, chunk_size = model
    return encode_checkpoint(tensors, {"step": version}, version=version, chunk_size=chunk_size)


@pytest.fixture
def replica() -> Iterator[tuple[ApiServer, ModelHolder, ServingMetrics]]:
    holder, metrics = ModelHolder(), ServingMetrics(CollectorRegistry())
    with serve_api(holder, metrics, port=0) as server:
        yield server, holder, metrics


def test_healthz_stays_ok_and_says_the_last_rejection_and_how_many_since_the_last_good_load(model, replica) -> None:
    server, holder, metrics = replica
    stop, bodies = threading.Event(), []
    started = time.time()
    missing_chunk = [m for m in good(model, 3) if m[0] != b"chunk/1"]  # a chunk that never landed
    topic = ArrivingTopic(good(model, 1) + without_serving_state(model, 2), [missing_chunk, good(model, 4)],
                          lambda: bodies.append(request(server.url + "/healthz")), stop)
    CheckpointFollower(topic, "model-updates", holder, metrics, poll_timeout_ms=1).run(stop)
    (status1, at_start), (status2, after_v3), (status3, after_v4) = bodies
    assert status1 == status2 == status3 == 200
    assert at_start["status"] == "ok" and at_start["model_version"] == 1
    assert at_start["rejections_since_load"] == 1
    rejected = at_start["last_rejection"]
    assert (rejected["version"], rejected["reason"]) == (2, "bad_model") and "serving" in rejected["detail"]
    assert started <= rejected["at"] <= time.time()
    assert after_v3["model_version"] == 1 and after_v3["rejections_since_load"] == 2
    assert (after_v3["last_rejection"]["version"], after_v3["last_rejection"]["reason"]) == (3, "missing_chunk")
    # A good load: the count starts again, the last rejection stays (older than loaded_at).
    assert after_v4["model_version"] == 4 and after_v4["rejections_since_load"] == 0
    assert after_v4["last_rejection"] == after_v3["last_rejection"]
    assert after_v4["last_rejection"]["at"] <= after_v4["loaded_at"]


def test_healthz_without_a_model_says_why_the_publications_were_refused(model, replica) -> None:
    server, holder, metrics = replica
    follower = CheckpointFollower(TopicConsumer(without_serving_state(model, 1)), "model-updates", holder, metrics)
    follower.find_latest(threading.Event())
    status, body = request(server.url + "/healthz")
    assert status == 503 and body["error"] == "no_model"
    assert body["rejections_since_load"] == 1 and body["last_rejection"]["reason"] == "bad_model"


def test_healthz_of_a_replica_that_refused_nothing_says_so(replica) -> None:
    server, _, _ = replica
    status, body = request(server.url + "/healthz")
    assert status == 503 and body["rejections_since_load"] == 0 and body["last_rejection"] is None


def test_openapi_describes_every_field_of_healthz(model, replica) -> None:
    server, holder, metrics = replica
    follower = CheckpointFollower(TopicConsumer(good(model, 1) + without_serving_state(model, 2)), "model-updates",
                                  holder, metrics)
    follower.find_latest(threading.Event())
    _, body = request(server.url + "/healthz")
    _, described = request(server.url + "/openapi.json")
    schema = described["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == set(body) == set(schema["properties"])
    last = schema["properties"]["last_rejection"]
    assert set(last["properties"]) == set(body["last_rejection"]) and "null" in last["type"]
