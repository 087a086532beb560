"""Property tests of the event decoder: hostile bytes never raise anything but EventError; valid events round-trip."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.events import TS_MAX_MS, EventError, check_events, decode, decode_events, encode, encode_batch, validate

pytestmark = pytest.mark.unit

# deadline=None: the CPU is shared, and a slow example is not a failure of the contract.
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.text(min_size=1, max_size=24)  # hypothesis' text() leaves out lone surrogates
int64ish = st.integers(min_value=-(2**63), max_value=2**64 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
feature_values = st.one_of(st.text(max_size=24), int64ish, finite)

impressions = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "impression_id": ids,
        "ts_ms": st.integers(min_value=0, max_value=TS_MAX_MS),
        "user_id": ids,
        "item_id": ids,
        "features": st.dictionaries(st.text(min_size=1, max_size=12), feature_values, max_size=12),
    }
)
feedbacks = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "impression_id": ids,
        "ts_ms": st.integers(min_value=0, max_value=TS_MAX_MS),
        "task": ids,
        "value": st.one_of(int64ish, finite),
    }
)
valid_events = st.one_of(impressions, feedbacks)
valid_messages = st.one_of(
    valid_events.map(encode),
    st.lists(valid_events, min_size=1, max_size=8).map(encode_batch),
)


def assert_decoders_are_safe(data: bytes) -> None:
    """decode returns a dict or raises EventError; decode_events returns dicts and EventErrors, never raises."""
    try:
        result = decode(data)
    except EventError as err:
        assert isinstance(err.reason, str) and str(err)
    else:
        assert isinstance(result, dict)
        validate(result)  # whatever decodes is a valid contract message
    items = decode_events(data)
    assert items and all(isinstance(item, (dict, EventError)) for item in items)


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message damaged the way networks and buggy producers damage bytes."""
    data = bytearray(draw(valid_messages))
    mutation = draw(st.sampled_from(["bit_flips", "truncate", "splice", "overwrite", "insert"]))
    if mutation == "bit_flips":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "splice":
        other = draw(valid_messages)
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    elif mutation == "overwrite":
        position = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[position : position + len(patch)] = patch
    else:
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# msgpack-shaped junk: maps and arrays of arbitrary scalars, packed without validation
junk_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), int64ish, st.floats(), st.text(max_size=8), st.binary(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def structurally_mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid event with one field replaced, dropped or added (alone or inside a batch), packed unvalidated."""
    event = dict(draw(valid_events))
    mutation = draw(st.sampled_from(["replace", "drop", "add", "feature"]))
    if mutation == "replace":
        event[draw(st.sampled_from(sorted(event)))] = draw(junk_values)
    elif mutation == "drop":
        del event[draw(st.sampled_from(sorted(event)))]
    elif mutation == "add":
        event[draw(st.text(max_size=8))] = draw(junk_values)
    elif "features" in event:
        event["features"] = {**event["features"], draw(st.text(max_size=8)): draw(junk_values)}
    else:
        event["value"] = draw(st.one_of(st.floats(), st.booleans(), st.none()))
    if draw(st.booleans()):
        return msgpack.packb({"v": 1, "batch": [*draw(st.lists(valid_events, max_size=3)), event]}, use_bin_type=True)
    return msgpack.packb(event, use_bin_type=True)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_event_error(data: bytes) -> None:
    assert_decoders_are_safe(data)


@pytest.mark.slow
@FUZZ
@given(mutated_messages())
def test_mutated_valid_messages_only_ever_raise_event_error(data: bytes) -> None:
    assert_decoders_are_safe(data)


@pytest.mark.slow
@FUZZ
@given(junk_values)
def test_arbitrary_msgpack_values_only_ever_raise_event_error(value: Any) -> None:
    assert_decoders_are_safe(msgpack.packb(value, use_bin_type=True))


@ROUND_TRIP
@given(valid_events)
def test_valid_events_round_trip(event: dict) -> None:
    assert decode(encode(event)) == validate(event)


@pytest.mark.slow
@ROUND_TRIP
@given(st.lists(valid_events, min_size=1, max_size=20))
def test_valid_batches_round_trip_through_decode_events(batch: list[dict]) -> None:
    assert decode_events(encode_batch(batch)) == [validate(event) for event in batch]


@pytest.mark.slow
@FUZZ
@given(structurally_mutated_messages())
def test_structurally_mutated_events_only_ever_raise_event_error(data: bytes) -> None:
    assert_decoders_are_safe(data)


def _outcomes(items: list) -> list:
    return [(type(item).__name__, str(item), getattr(item, "reason", None)) if isinstance(item, EventError) else item
            for item in items]


@ROUND_TRIP  # 300 examples: the corners are also named one by one below
@given(st.one_of(valid_messages, mutated_messages(), structurally_mutated_messages()))
def test_the_quick_check_of_unpacked_events_passes_and_fails_as_the_full_one(data: bytes) -> None:
    """``check_events(..., unpacked=True)`` (strings within the limit vouched for, ints from msgpack) names the same
    problems as the per-feature check: each side checks its own unpacking of the same bytes (both check in place)."""
    try:
        full, quick = (msgpack.unpackb(data, raw=False, strict_map_key=False) for _ in range(2))
    except Exception:  # not msgpack: nothing to check
        return
    assert _outcomes(check_events(quick, unpacked=True)) == _outcomes(check_events(full))


@pytest.mark.parametrize("features", [
    {"a": 1e308, "b": 1e308},  # finite, but their sum overflows: the slow way, which passes them
    {"a": float("nan"), "b": "x"}, {"a": float("inf"), "b": float("-inf")}, {"a": True}, {"a": None}, {"": "x"},
    {"a": [1]}, {b"a": "x"}, {"a": "x", "b": 3, "c": 0.5},
])
def test_the_quick_check_handles_the_corners_as_the_full_one(features: dict) -> None:
    def event() -> dict:
        return {"v": 1, "impression_id": "i", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": dict(features)}

    assert _outcomes(check_events(event(), unpacked=True)) == _outcomes(check_events(event()))
