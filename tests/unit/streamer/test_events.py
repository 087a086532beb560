"""The event contract (streamer.events): one behaviour per test."""

from __future__ import annotations

import doctest
import math
from types import MappingProxyType
from typing import Any

import msgpack
import pytest

from streamer import events
from streamer.events import (
    TS_MAX_MS,
    EventError,
    Limits,
    decode,
    decode_events,
    encode,
    encode_batch,
    event_kind,
    validate,
)

pytestmark = pytest.mark.unit


def impression(**overrides: Any) -> dict:
    event = {
        "v": 1,
        "impression_id": "imp-1",
        "ts_ms": 1_700_000_000_000,
        "user_id": "u1",
        "item_id": "item-9",
        "features": {"hour": 13, "device": "ios", "watch_s": 12.5},
    }
    event.update(overrides)
    return event


def feedback(**overrides: Any) -> dict:
    event = {"v": 1, "impression_id": "imp-1", "ts_ms": 1_700_000_000_500, "task": "click", "value": 1.0}
    event.update(overrides)
    return event


def without(event: dict, key: str) -> dict:
    return {k: v for k, v in event.items() if k != key}


def packed(obj: Any) -> bytes:
    """Raw msgpack, bypassing encode's validation, as a hostile or buggy producer would send."""
    return msgpack.packb(obj, use_bin_type=True)


def decode_error(obj_or_bytes: Any, **kwargs: Any) -> EventError:
    data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else packed(obj_or_bytes)
    with pytest.raises(EventError) as info:
        decode(data, **kwargs)
    return info.value


# --- round trips and normalisation -------------------------------------------------------------------------


def test_impression_round_trips():
    assert decode(encode(impression())) == impression()


def test_feedback_round_trips():
    assert decode(encode(feedback())) == feedback()


def test_batch_envelope_round_trips_through_decode():
    envelope = decode(encode_batch([impression(), feedback()]))
    assert envelope == {"v": 1, "batch": [impression(), feedback()]}


def test_feedback_integer_value_is_normalised_to_float():
    decoded = decode(packed(feedback(value=1)))
    assert decoded["value"] == 1.0 and type(decoded["value"]) is float


def test_validate_returns_a_copy_and_leaves_the_input_alone():
    original = feedback(value=2)
    checked = validate(original)
    assert checked is not original
    assert original["value"] == 2 and type(original["value"]) is int


def test_validate_accepts_any_mapping_and_returns_plain_dicts():
    checked = validate(MappingProxyType(impression(features=MappingProxyType({"hour": 1}))))
    assert type(checked) is dict and type(checked["features"]) is dict


def test_validate_accepts_a_tuple_batch_and_returns_a_list():
    checked = validate({"v": 1, "batch": (impression(), feedback())})
    assert checked["batch"] == [impression(), feedback()]


def test_empty_string_feature_value_is_allowed():
    assert decode(encode(impression(features={"tag": ""})))["features"] == {"tag": ""}


def test_empty_features_map_is_allowed():
    assert decode(encode(impression(features={})))["features"] == {}


def test_ts_ms_zero_is_allowed():
    assert decode(encode(feedback(ts_ms=0)))["ts_ms"] == 0


def test_64_bit_integer_extremes_are_allowed_in_features():
    features = {"low": -(2**63), "high": 2**64 - 1}
    assert decode(encode(impression(features=features)))["features"] == features


def test_decode_accepts_bytearray_and_memoryview():
    data = encode(feedback())
    assert decode(bytearray(data)) == decode(memoryview(data)) == feedback()


# --- kinds and constants -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "kind"),
    [(impression(), "impression"), (feedback(), "feedback"), ({"v": 1, "batch": [feedback()]}, "batch")],
)
def test_event_kind_is_told_by_keys(event, kind):
    assert event_kind(event) == kind


def test_event_kind_of_an_unrecognisable_map_is_an_error():
    with pytest.raises(EventError) as info:
        event_kind({"v": 1, "ts_ms": 3})
    assert info.value.reason == "unknown_kind"


def test_topic_and_version_constants():
    assert (events.IMPRESSION_TOPIC, events.FEEDBACK_TOPIC, events.MODEL_TOPIC, events.DEAD_LETTER_TOPIC) == (
        "impressions",
        "feedback",
        "model-updates",
        "dead-letters",
    )
    assert events.SCHEMA_VERSION == 1


def test_event_error_is_a_value_error():
    assert issubclass(EventError, ValueError)


# --- field rules -------------------------------------------------------------------------------------------


def test_wrong_type_error_names_kind_field_and_problem():
    err = decode_error(impression(ts_ms="soon"))
    assert str(err) == "impression.ts_ms: expected an integer, got str"
    assert (err.field, err.reason, err.kind, err.index) == ("ts_ms", "wrong_type", "impression", None)


@pytest.mark.parametrize("key", ["v", "impression_id", "ts_ms", "user_id", "item_id", "features"])
def test_missing_impression_field_is_named(key):
    err = decode_error(without(impression(), key))
    assert (err.field, err.reason) == (key, "missing_field")


@pytest.mark.parametrize("key", ["v", "impression_id", "ts_ms", "task", "value"])
def test_missing_feedback_field_is_named(key):
    err = decode_error(without(feedback(), key))
    assert (err.field, err.reason) == (key, "missing_field")


def test_unknown_top_level_field_is_rejected_and_named():
    err = decode_error(feedback(campaign="spring"))
    assert (err.field, err.reason) == ("'campaign'", "unknown_field")
    assert "campaign" in str(err)


def test_feedback_and_impression_keys_mixed_are_rejected():
    err = decode_error({**impression(), "task": "click"})
    assert (err.kind, err.reason, err.field) == ("impression", "unknown_field", "'task'")


def test_unsupported_version_is_bad_version():
    err = decode_error(feedback(v=2))
    assert (err.field, err.reason) == ("v", "bad_version")


def test_newer_version_with_new_fields_reports_the_version_not_the_fields():
    assert decode_error(feedback(v=2, campaign="x")).reason == "bad_version"


def test_bool_version_is_wrong_type():
    assert (decode_error(feedback(v=True)).reason, decode_error(feedback(v=True)).field) == ("wrong_type", "v")


def test_bool_ts_ms_is_not_an_integer():
    assert decode_error(feedback(ts_ms=True)).reason == "wrong_type"


def test_float_ts_ms_is_not_an_integer():
    assert decode_error(feedback(ts_ms=1.7e12)).reason == "wrong_type"


def test_bool_feedback_value_is_not_a_number():
    err = decode_error(feedback(value=True))
    assert (err.field, err.reason) == ("value", "wrong_type")


def test_bool_feature_value_is_rejected():
    err = decode_error(impression(features={"new_user": False}))
    assert (err.field, err.reason) == ("features['new_user']", "wrong_type")


def test_string_feedback_value_is_rejected():
    assert decode_error(feedback(value="1")).reason == "wrong_type"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_feedback_value_is_rejected(bad):
    err = decode_error(feedback(value=bad))
    assert (err.field, err.reason) == ("value", "not_finite")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_feature_value_is_rejected(bad):
    err = decode_error(impression(features={"score": bad}))
    assert (err.field, err.reason) == ("features['score']", "not_finite")


@pytest.mark.parametrize("key", ["impression_id", "user_id", "item_id"])
def test_empty_impression_id_fields_are_rejected(key):
    err = decode_error(impression(**{key: ""}))
    assert (err.field, err.reason) == (key, "empty")


def test_empty_task_is_rejected():
    assert (decode_error(feedback(task="")).field, decode_error(feedback(task="")).reason) == ("task", "empty")


def test_integer_id_is_wrong_type():
    err = decode_error(impression(user_id=42))
    assert str(err) == "impression.user_id: expected a string, got int"


def test_binary_id_is_wrong_type():
    err = decode_error(impression(item_id=b"item-9"))
    assert (err.field, err.reason) == ("item_id", "wrong_type")


def test_negative_ts_ms_is_out_of_range():
    err = decode_error(impression(ts_ms=-1))
    assert (err.field, err.reason) == ("ts_ms", "out_of_range")


@pytest.mark.parametrize("make", [impression, feedback])
def test_ts_ms_beyond_the_year_9999_is_out_of_range_and_named_as_a_unit_slip(make) -> None:
    """Microseconds (or nanoseconds) in ts_ms would move the join's clock millennia ahead: every later event late."""
    assert validate(make(ts_ms=TS_MAX_MS))["ts_ms"] == TS_MAX_MS  # 9999-12-31T23:59:59.999Z, still a date
    for ts in (TS_MAX_MS + 1, 1_649_384_170_877_000, 2**63 - 1):
        err = decode_error(make(ts_ms=ts))
        assert (err.field, err.reason) == ("ts_ms", "out_of_range")
        assert str(err).endswith(f"got {ts} (microseconds or nanoseconds?)")


@pytest.mark.parametrize("make", [impression, feedback])
def test_an_event_after_the_callers_bound_is_future_with_its_kind_and_by_how_much(make) -> None:
    """A consumer's clock bound (decode_events' not_after_ms): a producer's clock ahead is one dead letter."""
    bound = 1_700_000_000_000
    assert decode_events(encode(make(ts_ms=bound)), not_after_ms=bound)[0]["ts_ms"] == bound  # the bound passes
    [err] = decode_events(encode(make(ts_ms=bound + 8 * 3_600_000)), not_after_ms=bound)
    assert isinstance(err, EventError)
    assert (err.field, err.reason, err.kind, err.index) == ("ts_ms", "future", make.__name__, None)
    assert str(err) == (f"{make.__name__}.ts_ms: 2023-11-15T06:13:20Z is 8.0 h after the newest time this consumer "
                        "accepts (2023-11-14T22:13:20Z): a producer's clock ahead, or this host's behind?")
    assert "future" not in {getattr(e, "reason", None) for e in decode_events(encode(make(ts_ms=bound + 1)))}


def test_only_the_future_events_of_a_batch_are_bad_and_a_contract_error_comes_first() -> None:
    bound = 1_700_000_000_000
    batch = [impression(ts_ms=bound - 5), feedback(ts_ms=bound + 86_400_000 * 3), impression(ts_ms="x")]
    good, late, bad = decode_events(msgpack.packb({"v": 1, "batch": batch}), not_after_ms=bound)
    assert good == batch[0]
    assert (late.field, late.reason, late.kind, late.index, late.event) == ("batch[1].ts_ms", "future", "feedback", 1,
                                                                            batch[1])
    assert "is 3.0 days after" in str(late)
    assert (bad.field, bad.reason) == ("batch[2].ts_ms", "wrong_type")


def test_features_must_be_a_map():
    err = decode_error(impression(features=[["hour", 13]]))
    assert (err.field, err.reason) == ("features", "wrong_type")


def test_nil_feature_value_is_rejected():
    assert decode_error(impression(features={"city": None})).reason == "wrong_type"


def test_nested_feature_value_is_rejected():
    assert decode_error(impression(features={"tags": ["a", "b"]})).reason == "wrong_type"


def test_empty_feature_name_is_rejected():
    err = decode_error(impression(features={"": 1}))
    assert (err.field, err.reason) == ("features['']", "empty")


def test_integer_beyond_64_bits_is_rejected_by_validate():
    with pytest.raises(EventError) as info:
        encode(impression(features={"huge": 2**64}))
    assert info.value.reason == "out_of_range"


def test_map_that_is_no_known_kind_is_unknown_kind():
    err = decode_error({"v": 1, "impression_id": "imp-1", "ts_ms": 5})
    assert (err.reason, err.kind) == ("unknown_kind", None)


def test_message_that_is_not_a_map_is_wrong_type():
    assert decode_error([1, 2, 3]).reason == "wrong_type"


# --- limits ------------------------------------------------------------------------------------------------


def test_too_many_features_is_too_large_when_validating():
    with pytest.raises(EventError) as info:
        validate(impression(features={f"f{i}": i for i in range(4)}), limits=Limits(max_features=3))
    assert (info.value.field, info.value.reason) == ("features", "too_large")


def test_too_many_features_is_too_large_when_decoding():
    err = decode_error(impression(features={f"f{i}": i for i in range(300)}))
    assert err.reason == "too_large"


def test_string_over_the_byte_limit_is_too_large_when_decoding():
    err = decode_error(impression(user_id="u" * 17), limits=Limits(max_str_bytes=16))
    assert err.reason == "too_large"


def test_string_limit_counts_utf8_bytes_not_characters():
    with pytest.raises(EventError) as info:
        validate(impression(user_id="é" * 9), limits=Limits(max_str_bytes=16))  # 9 chars, 18 bytes
    assert (info.value.field, info.value.reason) == ("user_id", "too_large")


def test_string_at_the_byte_limit_is_accepted():
    limits = Limits(max_str_bytes=16)
    assert decode(encode(impression(user_id="é" * 8), limits=limits), limits=limits)["user_id"] == "é" * 8


def test_single_event_over_the_event_size_limit_is_too_large():
    limits = Limits(max_event_bytes=100)
    err = decode_error(packed(impression(features={"tag": "x" * 200})), limits=limits)
    assert err.reason == "too_large"


def test_batch_may_exceed_the_single_event_size_limit():
    limits = Limits(max_event_bytes=100)
    data = encode_batch([impression()] * 5, limits=limits)
    assert len(data) > 100
    assert len(decode(data, limits=limits)["batch"]) == 5


def test_message_over_the_batch_size_limit_is_refused_before_unpacking():
    limits = Limits(max_batch_bytes=1000)
    err = decode_error(b"\xc1" * 1001, limits=limits)  # not msgpack at all: the size check came first
    assert err.reason == "too_large"


def test_batch_longer_than_the_limit_is_too_large():
    limits = Limits(max_batch_events=3)
    with pytest.raises(EventError) as info:
        validate({"v": 1, "batch": [feedback()] * 4}, limits=limits)
    assert (info.value.field, info.value.reason) == ("batch", "too_large")


def test_encode_refuses_an_event_whose_bytes_exceed_the_limit():
    with pytest.raises(EventError) as info:
        encode(impression(features={f"f{i}": "x" * 200 for i in range(10)}), limits=Limits(max_event_bytes=1000))
    assert info.value.reason == "too_large"


def test_deep_nesting_is_too_deep():
    err = decode_error(b"\x91" * 5000 + b"\x00")
    assert err.reason == "too_deep"


# --- hostile bytes -----------------------------------------------------------------------------------------


def test_non_bytes_input_is_not_bytes():
    with pytest.raises(EventError) as info:
        decode("not bytes")  # type: ignore[arg-type]
    assert info.value.reason == "not_bytes"


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x85\xa1v"], ids=["empty", "reserved-byte", "truncated"])
def test_undecodable_bytes_are_not_msgpack(data):
    assert decode_error(data).reason == "not_msgpack"


def test_trailing_bytes_are_rejected():
    err = decode_error(encode(feedback()) + b"\x00")
    assert err.reason == "trailing_bytes"


def test_invalid_utf8_string_is_not_msgpack():
    # fixstr of length 2 holding an invalid UTF-8 sequence, as the map's first key
    data = b"\x81\xa2\xff\xfe\x01"
    assert decode_error(data).reason == "not_msgpack"


def test_ext_type_is_refused():
    data = packed(feedback(value=msgpack.ExtType(7, b"abcd")))
    assert decode_error(data).reason == "not_msgpack"


def test_msgpack_timestamp_is_refused():
    data = packed(feedback(ts_ms=msgpack.Timestamp(1, 0)))
    assert decode_error(data).reason == "not_msgpack"


def test_integer_map_key_is_not_msgpack():
    assert decode_error({1: 2}).reason == "not_msgpack"


def test_lone_surrogate_cannot_be_encoded():
    with pytest.raises(EventError) as info:
        encode(impression(user_id="\ud800"))
    assert info.value.reason == "unencodable"


# --- batches -----------------------------------------------------------------------------------------------


def test_decode_events_flattens_a_batch_in_order():
    events_in = [impression(impression_id=f"i{i}") for i in range(3)] + [feedback()]
    assert decode_events(encode_batch(events_in)) == events_in


def test_decode_events_of_a_single_event_is_a_one_item_list():
    assert decode_events(encode(feedback())) == [feedback()]


def test_decode_events_keeps_good_events_and_reports_each_bad_one():
    bad_value = feedback(value=math.nan)
    bad_ts = impression(ts_ms="later")
    items = decode_events(packed({"v": 1, "batch": [impression(), bad_value, feedback(), bad_ts]}))
    assert items[0] == impression() and items[2] == feedback()
    assert [(e.index, e.field, e.reason, e.kind) for e in (items[1], items[3])] == [
        (1, "batch[1].value", "not_finite", "feedback"),
        (3, "batch[3].ts_ms", "wrong_type", "impression"),
    ]


def test_decode_events_error_carries_the_bad_inner_event_for_dead_lettering():
    bad = feedback(task="")
    items = decode_events(packed({"v": 1, "batch": [feedback(), bad]}))
    assert items[1].event == bad
    assert msgpack.unpackb(packed(items[1].event)) == bad


def test_decode_events_returns_message_level_failure_as_one_error():
    items = decode_events(b"\xc1garbage")
    assert len(items) == 1 and isinstance(items[0], EventError)
    assert (items[0].reason, items[0].index) == ("not_msgpack", None)


def test_decode_events_returns_a_bad_single_event_as_one_error():
    (err,) = decode_events(packed(feedback(value="yes")))
    assert isinstance(err, EventError) and err.field == "value"


def test_decode_events_reports_a_bad_envelope_as_one_error():
    (err,) = decode_events(packed({"v": 1, "batch": [feedback()], "producer": "x"}))
    assert (err.kind, err.reason, err.field) == ("batch", "unknown_field", "'producer'")


def test_decode_raises_on_the_first_bad_event_of_a_batch():
    err = decode_error({"v": 1, "batch": [feedback(), feedback(ts_ms=-5), feedback(task="")]})
    assert (err.field, err.reason, err.index) == ("batch[1].ts_ms", "out_of_range", 1)
    assert str(err) == ("batch[1].ts_ms (feedback): expected milliseconds since the epoch, 0 to 253402300799999 "
                        "(year 9999), got -5")


def test_nested_batch_is_rejected():
    err = decode_error({"v": 1, "batch": [{"v": 1, "batch": [feedback()]}]})
    assert (err.field, err.reason) == ("batch[0].batch", "nested_batch")


def test_empty_batch_is_rejected():
    err = decode_error({"v": 1, "batch": []})
    assert (err.field, err.reason) == ("batch", "empty")


def test_batch_that_is_not_an_array_is_wrong_type():
    assert decode_error({"v": 1, "batch": {"0": feedback()}}).reason == "wrong_type"


def test_batch_envelope_with_bad_version_is_bad_version():
    err = decode_error({"v": 3, "batch": [feedback()]})
    assert (err.kind, err.reason) == ("batch", "bad_version")


def test_inner_event_that_is_not_a_map_is_wrong_type():
    (err,) = decode_events(packed({"v": 1, "batch": ["click"]}))
    assert (err.field, err.reason) == ("batch[0]", "wrong_type")


def test_encode_batch_validates_every_event():
    with pytest.raises(EventError) as info:
        encode_batch([feedback(), feedback(), impression(item_id="")])
    assert (info.value.field, info.value.reason) == ("batch[2].item_id", "empty")


def test_encode_batch_refuses_a_nested_envelope():
    with pytest.raises(EventError) as info:
        encode_batch([{"v": 1, "batch": [feedback()]}])
    assert info.value.reason == "nested_batch"


def test_encode_validates_before_packing():
    with pytest.raises(EventError):
        encode(feedback(value=math.inf))


# --- documentation -----------------------------------------------------------------------------------------


def test_module_docstring_examples_run():
    result = doctest.testmod(events, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
