"""POST /score's fast path: checking the impressions in place gives what validate() gives, on valid and invalid input.

``parse_score_request`` checks the JSON-decoded dicts (``load_json``) in place with
``streamer.events.check_event`` (the decoder's own rules) and returns them, and on any problem runs
``validate_impressions`` (``streamer.events.validate`` per item), the reference. These tests run both on the
same bodies: same impressions, or the same error (status, code, message, index, field).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.serving.scoring import RequestError, load_json, parse_score_request, validate_impressions
from streamer.events import DEFAULT_LIMITS, EventError, check_event, validate

pytestmark = pytest.mark.unit


def impression(i: int, **changes: object) -> dict:
    event = {"impression_id": f"imp{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 7}",
             "item_id": f"item{i % 11}", "features": {"hour": str(i % 24), "duration_ms": 1000 * i}}
    event.update(changes)
    return event


def outcome(run) -> tuple:
    """("ok", impressions) or ("error", status, code, message, index, field)."""
    try:
        return ("ok", run())
    except RequestError as exc:
        return ("error", exc.status, exc.error, exc.message, exc.index, exc.field)


def assert_same_as_reference(items: list) -> None:
    body = json.dumps(items).encode()
    fast = outcome(lambda: parse_score_request(body, max_items=10_000))
    reference = outcome(lambda: validate_impressions(load_json(body)))
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


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinity_in_features_are_invalid_json(literal: bytes) -> None:
    body = b'[{"impression_id": "i", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": {"h": ' + literal + b'}}]'
    assert outcome(lambda: parse_score_request(body, max_items=5))[:3] == ("error", 400, "invalid_json")


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


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_impressions(), min_size=1, max_size=4))
def test_fast_path_equals_reference_path_on_generated_input(items: list) -> None:
    body = json.dumps(items).encode()  # NaN and Infinity go out as literals: invalid JSON for both paths
    assert outcome(lambda: parse_score_request(body, max_items=10_000)) == outcome(
        lambda: validate_impressions(load_json(body)))
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
