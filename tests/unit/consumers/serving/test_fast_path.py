"""POST /score's fast path: checking the impressions in place gives what validate() gives, on valid and invalid input.

``parse_score_request`` checks the JSON-decoded dicts in place with ``streamer.events.check_event`` (the
decoder's own rules) and returns them, and on any problem runs ``validate_impressions``
(``streamer.events.validate`` per item), the reference. These tests run both on the same bodies: same
impressions, or the same error (status, code, message, index, field).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving import api as serving
from consumers.serving.api import RequestError, parse_score_request, serve_api, validate_impressions
from consumers.serving.follower import ModelHolder, ServedModel
from models.config import ModelConfig
from models.features import FeatureSpec
from models.learner import Learner, ServingModel
from streamer.events import DEFAULT_LIMITS, EventError, check_event, validate

pytestmark = pytest.mark.unit


def impression(i: int, **changes: object) -> dict:
    event = {"impression_id": f"imp{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 7}",
             "item_id": f"item{i % 11}", "features": {"hour": str(i % 24), "duration_ms": 1000 * i}}
    event.update(changes)
    return event


def served_model() -> ServedModel:
    config = ModelConfig(tasks=("click", "like"), hidden_dims=(8,), tower_dims=(4,),
                         features=FeatureSpec(categorical=("user_id", "item_id", "hour"), hash_buckets=1024))
    model = ServingModel.from_serving_state(*Learner(config).serving_state())
    return ServedModel(1, model, ("click", "like"), step=0, published_at_s=None, loaded_at_s=time.time())


def post(url: str, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    try:
        connection.request("POST", "/score", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def outcome(run) -> tuple:
    """("ok", impressions) or ("error", status, code, message, index, field)."""
    try:
        return ("ok", run())
    except RequestError as exc:
        return ("error", exc.status, exc.error, exc.message, exc.index, exc.field)


def assert_same_as_reference(items: list) -> None:
    body = json.dumps(items).encode()
    fast = outcome(lambda: parse_score_request(body, max_items=10_000))
    reference = outcome(lambda: validate_impressions(json.loads(body)))
    assert fast == reference


LONG = "x" * (DEFAULT_LIMITS.max_str_bytes // 4 + 1)  # past the fast check's length, within the byte limit
TOO_LONG = "x" * (DEFAULT_LIMITS.max_str_bytes + 1)


@pytest.mark.parametrize("changes", [
    {}, {"v": 1}, {"v": 2}, {"v": True}, {"v": "1"}, {"v": None}, {"ts_ms": "soon"}, {"ts_ms": -1}, {"ts_ms": 2**63},
    {"ts_ms": 1.0}, {"ts_ms": True}, {"user_id": 7}, {"user_id": ""}, {"item_id": None}, {"impression_id": LONG},
    {"impression_id": TOO_LONG}, {"features": []}, {"features": {"": "a"}}, {"features": {"h": True}},
    {"features": {"h": None}}, {"features": {"h": [1]}}, {"features": {"h": 2**64}}, {"features": {"h": -(2**63) - 1}},
    {"features": {"h": LONG}}, {"features": {"h": TOO_LONG}}, {"features": {LONG: 1}}, {"features": {"h": 1.5, "d": 0}},
    {"features": {f"f{i}": i for i in range(DEFAULT_LIMITS.max_features + 1)}}, {"extra": 1}, {"task": "click"},
    {"batch": []},
])
def test_each_kind_of_impression_gets_the_reference_verdict(changes: dict) -> None:
    assert_same_as_reference([impression(0), impression(1, **changes)])


@pytest.mark.parametrize("drop", ["impression_id", "ts_ms", "user_id", "item_id", "features"])
def test_a_missing_field_gets_the_reference_error(drop: str) -> None:
    event = impression(1)
    del event[drop]
    assert_same_as_reference([impression(0), event])


@pytest.mark.parametrize("item", [1, "impression", None, [impression(0)],
                                  {"impression_id": "i", "ts_ms": 1, "task": "click", "value": 1},
                                  {"v": 1, "batch": [impression(0)]}, {}])
def test_items_that_are_not_impressions_get_the_reference_error(item: object) -> None:
    assert_same_as_reference([impression(0), item])


def test_nan_and_infinity_in_features_get_the_reference_error() -> None:
    body = b'[{"impression_id": "i", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": {"h": NaN}}]'
    fast = outcome(lambda: parse_score_request(body, max_items=5))
    assert fast == outcome(lambda: validate_impressions(json.loads(body)))
    assert fast[:3] == ("error", 400, "invalid_impression") and fast[5] == "features['h']"


def test_the_fast_path_adds_the_default_version_and_keeps_an_explicit_one() -> None:
    items = [impression(0), impression(1, v=1)]
    assert all(check_event({"v": 1, **item}) == "impression" for item in items)
    assert parse_score_request(json.dumps(items).encode(), max_items=5) == validate_impressions(items)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**65), max_value=2**65),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                         st.sampled_from(["", "u1", LONG, TOO_LONG]))
json_values = st.recursive(json_scalars,
                           lambda inner: st.one_of(st.lists(inner, max_size=2),
                                                   st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                           max_leaves=4)
field_names = st.sampled_from(["v", "impression_id", "ts_ms", "user_id", "item_id", "features", "task", "value",
                               "batch", "extra"])


@st.composite
def mutated_impressions(draw: st.DrawFn) -> object:
    """A valid impression with a few fields replaced, removed or added: mostly near misses."""
    event: dict = impression(draw(st.integers(0, 50)))
    if draw(st.booleans()):
        event["features"] = draw(st.dictionaries(st.sampled_from(["h", "", "d", LONG]), json_scalars, max_size=3))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(field_names)
        if draw(st.integers(0, 3)) == 0:
            event.pop(name, None)
        else:
            event[name] = draw(json_values)
    return event if draw(st.integers(0, 20)) else draw(json_values)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_impressions(), min_size=1, max_size=4))
def test_fast_path_equals_reference_path_on_generated_input(items: list) -> None:
    body = json.dumps(items).encode()  # NaN and Infinity go out as the literals json.loads accepts
    assert outcome(lambda: parse_score_request(body, max_items=10_000)) == outcome(
        lambda: validate_impressions(json.loads(body)))
    for item in json.loads(body):  # check_event passes exactly the single events validate passes
        event = {"v": 1, **item} if isinstance(item, dict) else item
        verdicts = []
        for check in (check_event, validate):
            try:
                check(dict(event) if isinstance(event, dict) else event)
                verdicts.append(True)
            except EventError:
                verdicts.append(False)
        if not (isinstance(event, dict) and "batch" in event):  # an envelope is validate()'s, not check_event's
            assert verdicts[0] == verdicts[1], event


# -- taking turns


def test_score_requests_take_turns_and_a_stuck_one_holds_the_others_only_briefly() -> None:
    """While one request scores, the next waits for its turn; after SCORING_TURN_WAIT_S it runs anyway."""
    holder = ModelHolder()
    served = served_model()
    holder.swap(served)
    entered, release = threading.Semaphore(0), threading.Event()
    original_forward = served.model.model.forward
    first = threading.Event()

    def forward(*args, **kwargs):
        entered.release()
        if not first.is_set():
            first.set()
            assert release.wait(10)
        return original_forward(*args, **kwargs)

    served.model.model.forward = forward  # type: ignore[method-assign]
    body = json.dumps([impression(0)]).encode()
    with serve_api(holder, ServingMetrics(CollectorRegistry()), port=0) as server:
        results: list[int] = []
        stuck = threading.Thread(target=lambda: results.append(post(server.url, body)[0]), daemon=True)
        stuck.start()
        assert entered.acquire(timeout=10), "the first request never reached the model"
        started = time.monotonic()
        status, answer = post(server.url, body)
        waited = time.monotonic() - started
        assert status == 200 and answer["model_version"] == served.version
        assert serving.SCORING_TURN_WAIT_S <= waited < serving.SCORING_TURN_WAIT_S + 5
        release.set()
        stuck.join(10)
    assert results == [200]
