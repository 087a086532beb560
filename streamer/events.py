"""The event contract: what travels on the ``impressions`` and ``feedback`` topics, and how it is checked.

Every Kafka message value is one msgpack map (version ``v`` = 1). There are three kinds:

impression
    ``{"v": 1, "impression_id": str, "ts_ms": int, "user_id": str, "item_id": str, "features": {name: value}}``
    where each feature value is a ``str``, an ``int`` or a finite ``float``.
feedback
    ``{"v": 1, "impression_id": str, "ts_ms": int, "task": str, "value": number}``; ``value > 0`` means a
    positive label for ``task``. ``value`` may be an int or a finite float; it is normalised to ``float``.
batch envelope
    ``{"v": 1, "batch": [event, ...]}`` carries many impressions and/or feedback in one Kafka message. The
    events inside are full events (each with its own ``"v"``); batches do not nest.

Rules
    * Exactly these keys: a missing key is ``missing_field``, an extra key is ``unknown_field``. Extra keys are
      rejected rather than ignored because the contract is versioned: a producer that needs a new field bumps
      ``v``, and a consumer that does not know that version says so (``bad_version``) instead of silently
      dropping data it does not understand. Rejecting also catches typos (``"ts"`` for ``"ts_ms"``) at the
      producer's first message instead of as a quietly empty column. ``v`` is checked before the other keys,
      so a newer-version message is reported as ``bad_version``, not as unknown fields.
    * Ids (``impression_id``, ``user_id``, ``item_id``), ``task`` and feature names are non-empty strings.
      Feature string values may be empty.
    * ``ts_ms`` is event time in milliseconds since the Unix epoch: an int from 0 to ``TS_MAX_MS``
      (9999-12-31T23:59:59.999Z). A larger one is not milliseconds (microseconds since 1970 are ~1.7e15, past it):
      accepted, it would move the join's event-time clock millennia ahead and every later event would be late.
    * ``bool`` is not a number here (``True`` is rejected where an int or float is expected), nor is ``None``.
    * Floats must be finite: NaN and +-inf are rejected (``not_finite``), in ``value`` and in features.
    * Ints must fit msgpack's 64-bit range.
    * The event kind is told by its keys: ``batch`` -> envelope; any of ``user_id``/``item_id``/``features``
      -> impression; any of ``task``/``value`` -> feedback; none of these -> ``unknown_kind``.

Limits (:class:`Limits`, all configurable; decoding hostile bytes is bounded by them)
    ===================  =========  =====================================================================
    ``max_event_bytes``  1 MiB      size of a message that holds one event
    ``max_batch_bytes``  16 MiB     size of a message that holds a batch envelope (checked before unpacking)
    ``max_batch_events`` 100 000    events in one batch (also msgpack's ``max_array_len``)
    ``max_features``     256        features in one impression (msgpack's ``max_map_len`` is this or 16)
    ``max_str_bytes``    1 024      UTF-8 bytes of any string: ids, task, feature names and values
    ===================  =========  =====================================================================

    Nesting depth is fixed by the contract: envelope -> batch array -> event -> features -> scalar, four
    levels; anything deeper fails validation as ``wrong_type``. Before validation, msgpack's C unpacker
    stops at its own stack limit (1 024 levels, reported as ``too_deep``) and every container is bounded by
    the lengths above, so memory and time stay proportional to the (bounded) message size. Unpacking uses
    ``raw=False`` and ``strict_map_key=True``, no object hooks, and no ext types (``max_ext_len=0`` plus an
    ``ext_hook`` that refuses); bytes after the first msgpack object are rejected.

Errors
    Everything that goes wrong is an :class:`EventError` (a ``ValueError``) with ``.field`` (the path inside
    the message: ``"ts_ms"``, ``"features['age']"``, ``"batch[3].ts_ms"``, or None for the whole message),
    ``.reason`` (a short code for dead-letter metrics), ``.kind`` (``"impression"``, ``"feedback"``,
    ``"batch"`` or None), ``.index`` (position in the batch, or None) and ``.event`` (the offending inner
    event as decoded, for dead-lettering one event of a batch; None otherwise). ``str(err)`` reads
    ``"impression.ts_ms: expected an integer, got str"`` for a single event,
    ``"batch[3].ts_ms (impression): ..."`` inside a batch and ``"message: ..."`` for the bytes as a whole.
    ``decode`` raises the first problem; ``decode_events`` never raises and returns one error per bad event
    of a batch (or a single error for a message that is bad as a whole). Reasons:

    ==================  ====================================================================
    ``not_bytes``       ``decode`` was given something that is not bytes
    ``not_msgpack``     undecodable, truncated or empty, invalid UTF-8, ext types, non-string map keys
    ``trailing_bytes``  more bytes after the first msgpack object
    ``too_large``       over a limit: message size, batch length, feature count, string length
    ``too_deep``        nesting beyond the unpacker's stack
    ``unencodable``     ``encode``: msgpack could not pack it (e.g. a lone surrogate in a string)
    ``wrong_type``      a value of the wrong type (including bool for int and a non-map event)
    ``missing_field``   a required key is absent
    ``unknown_field``   a key the contract does not have
    ``unknown_kind``    a map that is neither impression, feedback nor batch
    ``bad_version``     ``v`` is an integer other than ``SCHEMA_VERSION``
    ``empty``           an empty id, task, feature name, or batch
    ``out_of_range``    ``ts_ms`` negative or after the year 9999, or an int beyond 64 bits
    ``future``          ``ts_ms`` after the caller's ``not_after_ms`` (``decode_events``; a consumer's clock bound)
    ``not_finite``      NaN or infinity
    ``nested_batch``    a batch envelope inside a batch
    ==================  ====================================================================

Example
    >>> from streamer.events import decode, decode_events, encode, encode_batch, event_kind
    >>> click = {"v": 1, "impression_id": "i1", "ts_ms": 1700000000500, "task": "click", "value": 1}
    >>> decode(encode(click))["value"]
    1.0
    >>> shown = {"v": 1, "impression_id": "i1", "ts_ms": 1700000000000, "user_id": "u7",
    ...          "item_id": "v42", "features": {"hour": 13, "device": "ios"}}
    >>> [event_kind(e) for e in decode_events(encode_batch([shown, click]))]
    ['impression', 'feedback']
    >>> import msgpack
    >>> decode(msgpack.packb({**shown, "ts_ms": "soon"}))
    Traceback (most recent call last):
    ...
    streamer.events.EventError: impression.ts_ms: expected an integer, got str
    >>> bad = msgpack.packb({"v": 1, "batch": [shown, {**click, "value": float("nan")}]})
    >>> good, err = decode_events(bad)
    >>> err.field, err.reason, err.index
    ('batch[1].value', 'not_finite', 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NoReturn

import msgpack

__all__ = [
    "DEAD_LETTER_TOPIC",
    "DEFAULT_LIMITS",
    "FEEDBACK_TOPIC",
    "IMPRESSION_TOPIC",
    "MODEL_TOPIC",
    "SCHEMA_VERSION",
    "TS_MAX_MS",
    "EventError",
    "EventKind",
    "Limits",
    "check_event",
    "check_events",
    "decode",
    "decode_events",
    "encode",
    "encode_batch",
    "event_kind",
    "validate",
]

SCHEMA_VERSION = 1
IMPRESSION_TOPIC = "impressions"
FEEDBACK_TOPIC = "feedback"
MODEL_TOPIC = "model-updates"
DEAD_LETTER_TOPIC = "dead-letters"

EventKind = Literal["impression", "feedback", "batch"]

_IMPRESSION_KEYS = frozenset({"v", "impression_id", "ts_ms", "user_id", "item_id", "features"})
_FEEDBACK_KEYS = frozenset({"v", "impression_id", "ts_ms", "task", "value"})
_BATCH_KEYS = frozenset({"v", "batch"})
_IMPRESSION_MARKERS = ("user_id", "item_id", "features")
_FEEDBACK_MARKERS = ("task", "value")
# The field order in which problems are reported, so the first problem named is stable.
_IMPRESSION_ORDER = ("v", "impression_id", "ts_ms", "user_id", "item_id", "features")
_FEEDBACK_ORDER = ("v", "impression_id", "ts_ms", "task", "value")

_INT_MIN = -(2**63)  # msgpack int64 ..
_INT_MAX = 2**64 - 1  # .. to uint64
TS_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last millisecond a calendar date can name


@dataclass(frozen=True)
class Limits:
    """Bounds on what :func:`decode` accepts; see the module docstring for what each one bounds."""

    max_event_bytes: int = 1 << 20
    max_batch_bytes: int = 16 << 20
    max_batch_events: int = 100_000
    max_features: int = 256
    max_str_bytes: int = 1024


DEFAULT_LIMITS = Limits()


class EventError(ValueError):
    """A message or event that breaks the contract; the only exception ``decode*`` raises.

    ``str(err)`` is a sentence naming the field and the problem, e.g.
    ``"impression.ts_ms: expected an integer, got str"``.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: str = "invalid",
        kind: str | None = None,
        index: int | None = None,
        event: Any = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason
        self.kind = kind
        self.index = index
        self.event = event


class _Invalid(Exception):
    """Internal: a problem found by a checker, before the public error's path and message are built.

    Only raised on the unhappy path, so the happy path builds no exception objects and no strings.
    """

    def __init__(self, field: str | None, reason: str, problem: str, kind: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.problem = problem
        self.kind = kind


def _type_name(value: Any) -> str:
    """The msgpack-ish name of a value's type, for messages."""
    if value is None:
        return "nil"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _short(name: Any) -> str:
    """A key for an error message: repr, cut short so hostile keys do not flood logs."""
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def _str_too_long(text: str, max_bytes: int) -> bool:
    # A char is at most 4 UTF-8 bytes, so only long strings need encoding to count bytes. Decoded
    # strings never get here long (msgpack's max_str_len bounds them); this is for the encode path.
    if len(text) * 4 <= max_bytes:
        return False
    try:
        return len(text.encode("utf-8")) > max_bytes
    except UnicodeEncodeError:
        return False  # a lone surrogate: packb refuses it later, as "unencodable"


def _check_text(value: Any, field: str, limits: Limits) -> None:
    """A non-empty string within the string limit."""
    if type(value) is not str:
        raise _Invalid(field, "wrong_type", f"expected a string, got {_type_name(value)}")
    if not value:
        raise _Invalid(field, "empty", "must not be empty")
    if _str_too_long(value, limits.max_str_bytes):
        raise _Invalid(field, "too_large", f"longer than {limits.max_str_bytes} UTF-8 bytes")


def _check_ts(value: Any) -> None:
    if type(value) is not int:
        raise _Invalid("ts_ms", "wrong_type", f"expected an integer, got {_type_name(value)}")
    if value < 0 or value > TS_MAX_MS:
        unit = " (microseconds or nanoseconds?)" if value > TS_MAX_MS else ""
        raise _Invalid("ts_ms", "out_of_range",
                       f"expected milliseconds since the epoch, 0 to {TS_MAX_MS} (year 9999), got {value}{unit}")


def _check_version(event: dict) -> None:
    if "v" not in event:
        raise _Invalid("v", "missing_field", "missing required field")
    version = event["v"]
    if type(version) is not int:
        raise _Invalid("v", "wrong_type", f"expected an integer, got {_type_name(version)}")
    if version != SCHEMA_VERSION:
        raise _Invalid(
            "v", "bad_version", f"unsupported schema version {version}; this reader understands {SCHEMA_VERSION}"
        )


def _key_problem(event: dict, expected: frozenset, order: tuple[str, ...]) -> NoReturn:
    """Name the first missing key, else the first unknown one. Called only when the key sets differ."""
    for key in order:
        if key not in event:
            raise _Invalid(key, "missing_field", "missing required field")
    unknown = sorted((_short(k) for k in event if k not in expected))
    raise _Invalid(
        unknown[0] if unknown else None,
        "unknown_field",
        f"unknown field (contract v{SCHEMA_VERSION} has only {', '.join(order)}; new fields need a new 'v')",
    )


def _check_feature(name: Any, value: Any, max_bytes: int) -> None:
    """One feature, checked in detail: the slow path that names a problem (or passes a long, legal string)."""
    field = f"features[{_short(name)}]"
    if type(name) is not str:
        raise _Invalid(field, "wrong_type", f"feature names must be strings, got {_type_name(name)}")
    if not name:
        raise _Invalid(field, "empty", "feature names must not be empty")
    if _str_too_long(name, max_bytes):
        raise _Invalid(field, "too_large", f"feature name longer than {max_bytes} UTF-8 bytes")
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise _Invalid(field, "not_finite", f"expected a finite number, got {value}")
    elif kind is int:
        if value < _INT_MIN or value > _INT_MAX:
            raise _Invalid(field, "out_of_range", "integer does not fit in 64 bits")
    elif kind is str:
        if _str_too_long(value, max_bytes):
            raise _Invalid(field, "too_large", f"longer than {max_bytes} UTF-8 bytes")
    else:
        raise _Invalid(field, "wrong_type", f"expected a string, integer or float, got {_type_name(value)}")


_STR = frozenset((str,))
_STR_INT = frozenset((str, int))
_STR_INT_FLOAT = frozenset((str, int, float))


def _check_features(features: Any, limits: Limits, unpacked: bool = False) -> None:
    if type(features) is not dict:
        raise _Invalid("features", "wrong_type", f"expected a map, got {_type_name(features)}")
    if len(features) > limits.max_features:
        raise _Invalid("features", "too_large", f"{len(features)} features, more than the limit {limits.max_features}")
    if unpacked and set(map(type, features)) <= _STR and "" not in features:
        # Unpacked from msgpack with no string over max_str_bytes (``check_events``' ``unpacked``): msgpack holds
        # no integer outside int64..uint64, so what is left is the values' types and the floats' finiteness, in
        # C-level passes (KuaiRand-Pure's events, 36 features an impression, validate ~25 % quicker).
        kinds = set(map(type, features.values()))
        if kinds <= _STR_INT:
            return
        # a sum of floats is finite only if each is (an overflowing sum of finite ones goes the slow way and passes)
        if kinds <= _STR_INT_FLOAT and math.isfinite(sum(v for v in features.values() if type(v) is float)):
            return
    # Hot loop: one cheap test per feature; anything unusual goes to _check_feature for the details.
    # A string of at most max_str_bytes / 4 chars is within max_str_bytes UTF-8 bytes whatever its chars.
    short = limits.max_str_bytes >> 2
    for name, value in features.items():
        if type(name) is str and 0 < len(name) <= short:
            kind = type(value)
            if kind is str:
                if len(value) <= short:
                    continue
            elif kind is float:
                if value - value == 0.0:  # False for NaN and +-inf, without a function call
                    continue
            elif kind is int:
                if _INT_MIN <= value <= _INT_MAX:
                    continue
        _check_feature(name, value, limits.max_str_bytes)


def _check_impression(event: dict, limits: Limits, unpacked: bool = False) -> None:
    if event.keys() != _IMPRESSION_KEYS:
        _key_problem(event, _IMPRESSION_KEYS, _IMPRESSION_ORDER)
    impression_id, ts, user, item = event["impression_id"], event["ts_ms"], event["user_id"], event["item_id"]
    short = limits.max_str_bytes >> 2
    if not (
        type(impression_id) is str
        and 0 < len(impression_id) <= short
        and type(ts) is int
        and 0 <= ts <= TS_MAX_MS
        and type(user) is str
        and 0 < len(user) <= short
        and type(item) is str
        and 0 < len(item) <= short
    ):
        # The detailed checks name the first problem, or pass long strings that are still within the limit.
        _check_text(impression_id, "impression_id", limits)
        _check_ts(ts)
        _check_text(user, "user_id", limits)
        _check_text(item, "item_id", limits)
    _check_features(event["features"], limits, unpacked)


def _check_feedback(event: dict, limits: Limits) -> None:
    """Checks a feedback event and normalises ``value`` to float, in place."""
    if event.keys() != _FEEDBACK_KEYS:
        _key_problem(event, _FEEDBACK_KEYS, _FEEDBACK_ORDER)
    impression_id, ts, task = event["impression_id"], event["ts_ms"], event["task"]
    short = limits.max_str_bytes >> 2
    if not (
        type(impression_id) is str
        and 0 < len(impression_id) <= short
        and type(ts) is int
        and 0 <= ts <= TS_MAX_MS
        and type(task) is str
        and 0 < len(task) <= short
    ):
        _check_text(impression_id, "impression_id", limits)
        _check_ts(ts)
        _check_text(task, "task", limits)
    value = event["value"]
    kind = type(value)
    if kind is float:
        if not value - value == 0.0:
            raise _Invalid("value", "not_finite", f"expected a finite number, got {value}")
    elif kind is int:
        if value < _INT_MIN or value > _INT_MAX:
            raise _Invalid("value", "out_of_range", "integer does not fit in 64 bits")
        event["value"] = float(value)
    else:
        raise _Invalid("value", "wrong_type", f"expected a number, got {_type_name(value)}")


def _check_single(event: Any, limits: Limits, unpacked: bool = False, not_after_ms: int | None = None) -> str:
    """Checks one impression or feedback (in place; a dict). Returns its kind; raises _Invalid. ``unpacked`` and
    ``not_after_ms``: as ``check_events``'."""
    if type(event) is not dict:
        raise _Invalid(None, "wrong_type", f"expected a map, got {_type_name(event)}")
    try:
        version = event.get("v")
        if type(version) is not int or version != SCHEMA_VERSION:
            _check_version(event)
        if "user_id" in event or "item_id" in event or "features" in event:
            _check_impression(event, limits, unpacked)
            kind = "impression"
        elif "task" in event or "value" in event:
            _check_feedback(event, limits)
            kind = "feedback"
        elif "batch" in event:
            raise _Invalid("batch", "nested_batch", "a batch envelope cannot hold another batch", "batch")
        else:
            raise _Invalid(None, "unknown_kind", "neither an impression, a feedback nor a batch envelope")
    except _Invalid as problem:
        if problem.kind is None and problem.reason != "unknown_kind":
            problem.kind = _kind_by_keys(event)
        raise
    if not_after_ms is not None and event["ts_ms"] > not_after_ms:
        _future(event["ts_ms"], not_after_ms, kind)
    return kind


def _kind_by_keys(event: dict) -> str | None:
    if "batch" in event:
        return "batch"
    if any(key in event for key in _IMPRESSION_MARKERS):
        return "impression"
    if any(key in event for key in _FEEDBACK_MARKERS):
        return "feedback"
    return None


def _check_envelope(envelope: dict, limits: Limits) -> list:
    """Checks a batch envelope's own fields (not its events). Returns the batch list; raises _Invalid."""
    try:
        _check_version(envelope)
        if envelope.keys() != _BATCH_KEYS:
            _key_problem(envelope, _BATCH_KEYS, ("v", "batch"))
        batch = envelope["batch"]
        if type(batch) is not list:
            raise _Invalid("batch", "wrong_type", f"expected an array, got {_type_name(batch)}")
        if not batch:
            raise _Invalid("batch", "empty", "a batch must hold at least one event")
        if len(batch) > limits.max_batch_events:
            raise _Invalid(
                "batch", "too_large", f"{len(batch)} events, more than the limit {limits.max_batch_events}"
            )
    except _Invalid as problem:
        problem.kind = "batch"
        raise
    return batch


def _error(problem: _Invalid, index: int | None = None, event: Any = None) -> EventError:
    """The public error for an internal problem, with the batch position folded into the path."""
    field = problem.field
    if index is not None:
        field = f"batch[{index}]" if field is None else f"batch[{index}].{field}"
        where = f"{field} ({problem.kind})" if problem.kind else field
    elif problem.kind and field:
        where = f"{problem.kind}.{field}"
    else:
        where = field or problem.kind or "message"
    return EventError(
        f"{where}: {problem.problem}",
        field=field,
        reason=problem.reason,
        kind=problem.kind,
        index=index,
        event=event,
    )


def _check_batch_events(batch: list, limits: Limits, unpacked: bool) -> None:
    """Every event in a batch, raising the first problem as an EventError."""
    for index, event in enumerate(batch):
        try:
            _check_single(event, limits, unpacked)
        except _Invalid as problem:
            raise _error(problem, index, event) from None


def _copy_event(obj: Any) -> Any:
    """A fresh dict (and features dict) from a Mapping, so validation never mutates the caller's object."""
    if not isinstance(obj, Mapping):
        return obj
    event = dict(obj)
    features = event.get("features")
    if isinstance(features, Mapping):
        event["features"] = dict(features)
    return event


def validate(obj: Any, *, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Checks one impression, feedback or batch envelope; returns a normalised copy.

    Normalised: plain dicts (any Mapping is accepted), a batch as a list, feedback ``value`` as float.
    Raises :class:`EventError` naming the first problem (for a batch, the first bad event).
    """
    event = _copy_event(obj)
    if type(event) is dict and isinstance(event.get("batch"), (list, tuple)):
        event["batch"] = [_copy_event(inner) for inner in event["batch"]]
    return _check_message(event, limits)


def check_event(event: Any, *, limits: Limits = DEFAULT_LIMITS) -> str:
    """Check one impression or feedback event *in place*, as ``decode_events`` does; return its kind.

    No copy (``validate`` returns a normalised copy): for callers that own the dict and check many of them,
    such as ``POST /score`` on dicts fresh from ``json.loads``. A feedback ``value`` given as an integer is
    turned into a float in place. Raises :class:`EventError` (the first problem) and nothing else.

    >>> check_event({"v": 1, "impression_id": "i1", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": {"h": 3}})
    'impression'
    >>> try:
    ...     check_event({"v": 1, "impression_id": "i1", "ts_ms": -1, "user_id": "u", "item_id": "x", "features": {}})
    ... except EventError as exc:
    ...     print(exc.reason, exc)
    out_of_range impression.ts_ms: expected milliseconds since the epoch, 0 to 253402300799999 (year 9999), got -1
    """
    try:
        return _check_single(event, limits)
    except _Invalid as problem:
        raise _error(problem) from None


def _check_message(obj: Any, limits: Limits, unpacked: bool = False) -> dict:
    """Check one event or batch envelope in place; raise the first problem as :class:`EventError`. ``unpacked``:
    as ``check_events``'."""
    if type(obj) is dict and "batch" in obj:
        try:
            batch = _check_envelope(obj, limits)
        except _Invalid as problem:
            raise _error(problem) from None
        _check_batch_events(batch, limits, unpacked)
        return obj
    try:
        _check_single(obj, limits, unpacked)
    except _Invalid as problem:
        raise _error(problem) from None
    return obj


def event_kind(event: Any) -> EventKind:
    """``"impression"``, ``"feedback"`` or ``"batch"``, told by the event's keys (see the module docstring).

    Raises :class:`EventError` (``unknown_kind``) for anything else.
    """
    kind = _kind_by_keys(event) if isinstance(event, Mapping) else None
    if kind is None:
        raise EventError(
            "message: neither an impression, a feedback nor a batch envelope", reason="unknown_kind"
        )
    return kind  # type: ignore[return-value]


def _pack(event: dict, max_bytes: int, what: str) -> bytes:
    try:
        data = msgpack.packb(event, use_bin_type=True)
    except Exception as exc:  # e.g. UnicodeEncodeError from a lone surrogate
        raise EventError(f"{what}: msgpack cannot encode it ({exc})", reason="unencodable", kind=what) from None
    if len(data) > max_bytes:
        raise EventError(
            f"{what}: {len(data)} bytes encoded, more than the limit {max_bytes}", reason="too_large", kind=what
        )
    return data


def encode(event: Mapping, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validates one event (or a batch envelope) and packs it as msgpack; raises :class:`EventError`."""
    checked = validate(event, limits=limits)
    kind = _kind_by_keys(checked) or "message"
    return _pack(checked, limits.max_batch_bytes if kind == "batch" else limits.max_event_bytes, kind)


def encode_batch(events: Iterable[Mapping], *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validates each event and packs them all in one batch envelope; raises :class:`EventError`."""
    envelope = validate({"v": SCHEMA_VERSION, "batch": list(events)}, limits=limits)
    return _pack(envelope, limits.max_batch_bytes, "batch")


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not part of the event contract")


_UNPACK_OPTIONS: dict[Limits, dict[str, Any]] = {}


def _unpack_options(limits: Limits) -> dict[str, Any]:
    options = _UNPACK_OPTIONS.get(limits)
    if options is None:
        options = {
            "raw": False,
            "strict_map_key": True,
            "use_list": True,
            "ext_hook": _refuse_ext,
            "max_str_len": limits.max_str_bytes,
            "max_bin_len": limits.max_str_bytes,  # bin is not in the contract; let validation name it
            "max_array_len": limits.max_batch_events,
            "max_map_len": max(limits.max_features, 16),
            "max_ext_len": 0,
        }
        _UNPACK_OPTIONS[limits] = options
    return options


def _unpack(data: Any, limits: Limits) -> Any:
    """msgpack bytes -> one Python object, within the limits; raises EventError and nothing else."""
    if type(data) is bytes:
        size = len(data)
    elif isinstance(data, (bytearray, memoryview)):
        size = memoryview(data).nbytes
    else:
        raise EventError(f"message: expected bytes, got {_type_name(data)}", reason="not_bytes")
    if size > limits.max_batch_bytes:
        raise EventError(f"message: {size} bytes, more than the limit {limits.max_batch_bytes}", reason="too_large")
    try:
        obj = msgpack.unpackb(data, **_unpack_options(limits))
    except msgpack.ExtraData:
        reason, problem = "trailing_bytes", "extra bytes after the msgpack object"
    except (msgpack.StackError, RecursionError):
        reason, problem = "too_deep", "nested deeper than the decoder allows"
    except Exception as exc:  # msgpack raises ValueError, UnicodeDecodeError, FormatError, TypeError...
        text = str(exc)
        if "max_ext_len" in text or "ext type" in text:
            reason, problem = "not_msgpack", "msgpack ext types are not part of the event contract"
        elif "exceeds max_" in text:
            reason, problem = "too_large", f"a string, array or map is over its limit ({text[:80]})"
        else:
            reason, problem = "not_msgpack", f"not a valid msgpack message ({type(exc).__name__}: {text[:80]})"
    else:
        # The batch limit applies to envelopes only; a single event has the smaller one.
        if size > limits.max_event_bytes and not (type(obj) is dict and "batch" in obj):
            raise EventError(
                f"message: {size} bytes for a single event, more than the limit {limits.max_event_bytes}",
                reason="too_large",
            )
        return obj
    raise EventError(f"message: {problem}", reason=reason)


def decode(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> dict:
    """msgpack bytes -> one validated, normalised event or batch envelope.

    Raises :class:`EventError` (and nothing else) for any problem; for a batch, the first bad event.
    """
    return _check_message(_unpack(data, limits), limits, unpacked=True)


def decode_events(data: bytes, *, limits: Limits = DEFAULT_LIMITS,
                  not_after_ms: int | None = None) -> list[dict | EventError]:
    """msgpack bytes -> the events they carry: a batch envelope is flattened into its events.

    Each item is a validated event or, for a bad one, an :class:`EventError` with ``.index`` and ``.event`` set
    (so a daemon dead-letters only the bad events of a batch). Never raises: a problem with the message as a
    whole (not msgpack, too large, bad envelope) comes back as a one-item list ``[EventError]`` whose
    ``.index`` is None; dead-letter the raw bytes then. ``not_after_ms``: as ``check_events``'.
    """
    try:
        obj = _unpack(data, limits)
    except EventError as err:
        return [err]
    # _unpack refuses strings over max_str_bytes
    return check_events(obj, limits=limits, unpacked=True, not_after_ms=not_after_ms)


def check_events(obj: Any, *, limits: Limits = DEFAULT_LIMITS, unpacked: bool = False,
                 not_after_ms: int | None = None) -> list[dict | EventError]:
    """The events of one message already unpacked: ``decode_events`` without the bytes (checked in place, as
    ``check_event``). A batch envelope is flattened; a bad event comes back as an :class:`EventError`.

    For an object that did not come from bytes within the limits (an event-log record, say), it checks the
    events but not the size of the message they would make: ``decode_events`` does both.

    ``unpacked``: the caller vouches that ``obj`` was unpacked from msgpack and holds no string longer than
    ``limits.max_str_bytes`` UTF-8 bytes (bytes no longer than that, or an unpacker with that ``max_str_len``).
    The same events pass and fail with the same errors; only the features' check is quicker.

    ``not_after_ms``: an event stamped later than this is an error (reason ``future``), e.g. a live consumer's
    wall clock plus the skew it tolerates, so that one producer with a clock far ahead cannot move its
    event-time clock (the contract itself allows any time up to ``TS_MAX_MS``).

    >>> [type(e).__name__ for e in check_events({"v": 1, "batch": [{"v": 1, "impression_id": "i1", "ts_ms": 5,
    ...                                                            "task": "click", "value": 1}, {"v": 2}]})]
    ['dict', 'EventError']
    """
    if type(obj) is dict and "batch" in obj:
        try:
            batch = _check_envelope(obj, limits)
        except _Invalid as problem:
            return [_error(problem)]
        out: list[dict | EventError] = []
        append = out.append
        for index, event in enumerate(batch):
            try:
                _check_single(event, limits, unpacked, not_after_ms)
            except _Invalid as problem:
                append(_error(problem, index, event))
            else:
                append(event)
        return out
    try:
        _check_single(obj, limits, unpacked, not_after_ms)
    except _Invalid as problem:
        return [_error(problem)]
    return [obj]


def _future(ts_ms: int, not_after_ms: int, kind: str) -> NoReturn:
    """Raise the problem of an event stamped after ``not_after_ms``, saying by how much and when, in UTC.

    >>> click = {"v": 1, "impression_id": "i1", "ts_ms": 1_700_003_600_000, "task": "click", "value": 1}
    >>> [str(e) for e in check_events(click, not_after_ms=1_700_000_000_000)][0][:66]
    'feedback.ts_ms: 2023-11-14T23:13:20Z is 1.0 h after the newest tim'
    >>> check_events(click, not_after_ms=1_700_003_600_000)[0]["ts_ms"]  # the bound itself is accepted
    1700003600000
    """
    ahead_s = (ts_ms - not_after_ms) / 1000.0
    ahead = (f"{ahead_s / 86400:,.1f} days" if ahead_s >= 86400 else f"{ahead_s / 3600:.1f} h" if ahead_s >= 3600
             else f"{ahead_s:.1f} s")
    raise _Invalid("ts_ms", "future", f"{_utc(ts_ms)} is {ahead} after the newest time this consumer accepts "
                                      f"({_utc(not_after_ms)}): a producer's clock ahead, or this host's behind?", kind)


def _utc(ts_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC time to the second, for messages."""
    return datetime.fromtimestamp(ts_ms // 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
