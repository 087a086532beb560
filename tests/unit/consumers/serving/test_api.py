"""consumers.serving.api without Kafka: request parsing, scoring, and the HTTP API over real loopback HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.api import ApiServer, RequestError, parse_score_request, serve_api
from consumers.serving.follower import ModelHolder, ServedModel
from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel

pytestmark = pytest.mark.unit

TASKS = ("click", "like")


def impression(i: int, **changes: object) -> dict:
    event = {"impression_id": f"imp{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 7}",
             "item_id": f"item{i % 11}", "features": {"hour": str(i % 24)}}
    event.update(changes)
    return event


def served_model(seed: int = 0, version: int = 1) -> tuple[Learner, ServedModel]:
    config = ModelConfig(tasks=TASKS, hidden_dims=(8,), tower_dims=(4,), seed=seed,
                         features=FeatureSpec(categorical=("user_id", "item_id", "hour"), hash_buckets=1024))
    learner = Learner(config)
    model = ServingModel.from_serving_state(*learner.serving_state())
    return learner, ServedModel(version, model, TASKS, step=learner.steps, published_at_s=None, loaded_at_s=time.time())


def request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, text, kind = exc.code, exc.read().decode(), exc.headers["Content-Type"]
    return status, json.loads(text) if kind == "application/json" else text


@pytest.fixture
def api() -> Iterator[tuple[ApiServer, ModelHolder, ServingMetrics]]:
    holder = ModelHolder()
    metrics = ServingMetrics(CollectorRegistry())
    with serve_api(holder, metrics, port=0, max_request_bytes=64 * 1024, max_items=50) as server:
        yield server, holder, metrics


# -- parsing


def test_missing_v_defaults_to_schema_version_1() -> None:
    assert [e["v"] for e in parse_score_request(json.dumps([impression(0)]).encode(), max_items=5)] == [1]


def test_an_invalid_impression_names_its_index_and_field() -> None:
    body = json.dumps([impression(0), impression(1, user_id=7)]).encode()
    with pytest.raises(RequestError) as caught:
        parse_score_request(body, max_items=5)
    assert (caught.value.status, caught.value.index, caught.value.field) == (400, 1, "user_id")
    assert "impressions[1]" in caught.value.message


def test_a_feedback_event_is_not_an_impression() -> None:
    body = json.dumps([{"impression_id": "i", "ts_ms": 1, "task": "click", "value": 1}]).encode()
    with pytest.raises(RequestError, match="feedback event") as caught:
        parse_score_request(body, max_items=5)
    assert caught.value.status == 400 and caught.value.index == 0


@pytest.mark.parametrize("body, error", [(b"{not json", "invalid_json"), (b'{"a": 1}', "not_a_list"), (b"[]", "empty"),
                                         (b"[1]", "invalid_impression"), (b"\xff\xfe", "invalid_json")])
def test_malformed_bodies_are_400_with_a_code(body: bytes, error: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_score_request(body, max_items=5)
    assert (caught.value.status, caught.value.error) == (400, error)


def test_too_many_items_is_413() -> None:
    with pytest.raises(RequestError) as caught:
        parse_score_request(json.dumps([impression(i) for i in range(6)]).encode(), max_items=5)
    assert caught.value.status == 413 and "limit is 5" in caught.value.message


# -- HTTP


def test_healthz_and_score_are_503_until_a_model_is_loaded_then_200(api) -> None:
    server, holder, _ = api
    status, body = request(server.url + "/healthz")
    assert status == 503 and body["error"] == "no_model"
    status, body = request(server.url + "/score", "POST", json.dumps([impression(0)]).encode())
    assert status == 503 and body["error"] == "no_model"
    holder.swap(served_model(version=4)[1])
    status, body = request(server.url + "/healthz")
    assert status == 200 and body["model_version"] == 4 and body["tasks"] == list(TASKS)


def test_score_returns_the_models_probabilities_per_task_and_its_version(api) -> None:
    server, holder, _ = api
    learner, served = served_model(version=3)
    holder.swap(served)
    events = [impression(i) for i in range(20)]
    status, body = request(server.url + "/score", "POST", json.dumps(events).encode())
    assert (status == 200 and body["model_version"] == 3
            and body["impression_ids"] == [e["impression_id"] for e in events])
    expected = learner.predict(encode_rows(events, learner.config.features, TASKS))
    for task in TASKS:
        assert body["probabilities"][task] == expected[task].tolist()  # float32 -> JSON double -> exact


@pytest.mark.parametrize("method, path, status", [("GET", "/nope", 404), ("GET", "/score", 405),
                                                   ("POST", "/metrics", 405), ("DELETE", "/healthz", 405)])
def test_unknown_paths_are_404_and_wrong_methods_405(api, method: str, path: str, status: int) -> None:
    server, _, _ = api
    got, body = request(server.url + path, method, b"[]" if method == "POST" else None)
    assert got == status and body["message"]


def test_a_body_over_the_byte_limit_is_413_without_reading_it(api) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    status, body = request(server.url + "/score", "POST", b"[" + b" " * (64 * 1024) + b"]")
    assert status == 413 and body["error"] == "too_large"


def test_invalid_json_and_invalid_impressions_are_400_naming_index_and_field(api) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    status, body = request(server.url + "/score", "POST", b"[{")
    assert status == 400 and body["error"] == "invalid_json"
    events = [impression(0), impression(1), impression(2, ts_ms="yesterday")]
    status, body = request(server.url + "/score", "POST", json.dumps(events).encode())
    assert status == 400 and (body["index"], body["field"]) == (2, "ts_ms")


def test_requests_are_counted_in_metrics_by_endpoint_and_code(api) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    request(server.url + "/score", "POST", json.dumps([impression(0), impression(1)]).encode())
    request(server.url + "/score", "POST", b"[{")
    status, text = request(server.url + "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("crossdistil_serving_requests_total", (("code", "200"), ("endpoint", "/score")))] == 1
    assert samples[("crossdistil_serving_requests_total", (("code", "400"), ("endpoint", "/score")))] == 1
    assert samples[("crossdistil_serving_scored_items_total", ())] == 2


def test_keep_alive_connection_serves_several_requests(api) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps([impression(0)]).encode()
    for _ in range(3):
        connection.request("POST", "/score", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["model_version"] == 1
    connection.close()


def test_a_request_in_flight_finishes_on_the_model_it_started_with() -> None:
    """The swap replaces one reference: a batch that read it keeps scoring with the old model, and the next
    batch (a request queued behind the one in flight) scores with the new one."""
    holder = ModelHolder()
    _, old = served_model(seed=0, version=1)
    _, new = served_model(seed=1, version=2)
    holder.swap(old)
    entered, release = threading.Event(), threading.Event()
    original_forward = old.model.model.forward

    def slow_forward(*args, **kwargs):
        entered.set()
        assert release.wait(10)
        return original_forward(*args, **kwargs)

    old.model.model.forward = slow_forward  # type: ignore[method-assign]
    metrics = ServingMetrics(CollectorRegistry())
    with serve_api(holder, metrics, port=0) as server:
        results: dict = {}

        def score_once(name: str) -> None:
            results[name] = request(server.url + "/score", "POST", json.dumps([impression(0)]).encode())

        first = threading.Thread(target=score_once, args=("first",), daemon=True)
        first.start()
        assert entered.wait(10), "the request never reached the model"
        holder.swap(new)
        second = threading.Thread(target=score_once, args=("second",), daemon=True)
        second.start()
        deadline = time.monotonic() + 10
        while server.batcher.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # the second request is queued behind the first
        release.set()
        first.join(10)
        second.join(10)
    assert results["first"][0] == 200 and results["first"][1]["model_version"] == 1
    assert results["second"][0] == 200 and results["second"][1]["model_version"] == 2
    with torch.inference_mode():
        expected = old.model.score_rows([impression(0)])
    assert results["first"][1]["probabilities"]["click"] == expected["click"].tolist()


def test_wait_for_version_returns_none_at_its_deadline() -> None:
    holder = ModelHolder()
    started = time.monotonic()
    assert holder.wait_for_version(1, timeout_s=0.2) is None
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("length, status", [("-5", 400), ("many", 400), (None, 411)])
def test_a_missing_or_bad_content_length_is_refused_at_once(api, length: str | None, status: int) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/score")
    if length is not None:
        connection.putheader("Content-Length", length)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == status and json.loads(response.read())["error"] in {"bad_request", "length_required"}
    connection.close()


def test_openapi_describes_score_with_this_servers_limits(api) -> None:
    server, _, _ = api
    status, body = request(server.url + "/openapi.json")
    score = body["paths"]["/score"]["post"]
    assert status == 200 and body["openapi"].startswith("3.")
    assert score["requestBody"]["content"]["application/json"]["schema"]["maxItems"] == 50
    assert {"200", "400", "413", "503"} <= set(score["responses"])


def test_a_body_declared_far_over_the_limit_is_refused_and_the_connection_closed(api) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/score")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(100 * 64 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert json.loads(response.read())["error"] == "too_large"
    connection.close()


def test_a_bug_on_the_score_path_is_a_json_500_counted_and_the_server_keeps_answering(api, monkeypatch) -> None:
    server, holder, _ = api
    holder.swap(served_model()[1])

    def broken(body: bytes) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.batcher, "submit_async", broken)
    status, answer = request(server.url + "/score", "POST", json.dumps([impression(0)]).encode())
    assert status == 500 and answer["error"] == "internal" and "a bug" in answer["message"]
    monkeypatch.undo()
    assert request(server.url + "/score", "POST", json.dumps([impression(0)]).encode())[0] == 200
    status, text = request(server.url + "/metrics")
    assert 'crossdistil_serving_requests_total{code="500",endpoint="/score"} 1.0' in text
