"""The pure half of ``POST /score``: reading a request body into impressions, and the errors a client gets.

No HTTP and no threads here (``consumers.serving.api`` and ``consumers.serving.batching`` are those); every
function raises :class:`RequestError`, a 4xx naming what is wrong, for anything a client can send.

>>> parse_score_request(b'[{"impression_id": "i1", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": {}}]',
...                     max_items=10)[0]["v"]
1
>>> try:
...     parse_score_request(b'[{"impression_id": "i1", "ts_ms": "soon", "user_id": "u", "item_id": "x", '
...                         b'"features": {}}]', max_items=10)
... except RequestError as exc:
...     print(exc.status, exc.body()["field"])
400 ts_ms
>>> try:
...     check_numeric_features([{"features": {"duration_ms": "nan"}}], ("duration_ms",))
... except RequestError as exc:
...     print(exc.status, exc.body()["field"])
400 features['duration_ms']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import torch

from streamer.events import EventError, check_event, event_kind, validate


class RequestError(Exception):
    """A request the daemon refuses: HTTP ``status`` and a JSON body naming what is wrong."""

    def __init__(self, status: int, error: str, message: str, *, index: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.index = index
        self.field = field

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``error`` (a code), ``message`` (a sentence), ``index`` and ``field`` if known."""
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.index is not None:
            body["index"] = self.index
        if self.field is not None:
            body["field"] = self.field
        return body


def parse_score_request(body: bytes, max_items: int) -> list[dict]:
    """Decode and validate a POST /score body: a JSON list of impressions (``v`` optional, default 1).

    Raises :class:`RequestError` 400 (not JSON, not a list, empty, an invalid impression: its index and field)
    or 413 (more than ``max_items``). The JSON is read by :func:`load_json`.
    """
    items = load_json(body)
    if not isinstance(items, list):
        raise RequestError(400, "not_a_list",
                           f"the body must be a JSON list of impressions, got a {type(items).__name__}")
    if not items:
        raise RequestError(400, "empty", "the list of impressions is empty; send at least one")
    if len(items) > max_items:
        raise RequestError(413, "too_many_items",
                           f"{len(items)} impressions in one request; the limit is {max_items} (serving.max_items)")
    # The usual request: the dicts are ours, fresh from json.loads, so they are checked in place with the
    # decoder's own rules (no copies) and returned; an impression checked in place equals what validate()
    # returns. On any problem, validate_impressions() runs from the start and names the error.
    try:
        for item in items:
            if type(item) is not dict:
                break
            if "v" not in item:
                item["v"] = 1
            if check_event(item) != "impression":
                break
        else:
            return items
    except EventError:
        pass
    return validate_impressions(items)


def validate_impressions(items: Sequence[Any]) -> list[dict]:
    """Each item through ``streamer.events.validate`` as an impression (``v`` default 1): normalised copies.

    The reference path of :func:`parse_score_request` (its fast path returns the same); raises
    :class:`RequestError` 400 naming the first bad impression's index and field.
    """
    impressions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(400, "invalid_impression",
                               f"impressions[{index}] is a {type(item).__name__}, expected an object", index=index)
        event = item if "v" in item else {"v": 1, **item}
        try:
            event = validate(event)
            kind = event_kind(event)
        except EventError as exc:
            field = exc.field.split(".", 1)[1] if exc.field and exc.field.startswith("impression.") else exc.field
            raise RequestError(400, "invalid_impression", f"impressions[{index}]: {exc}", index=index,
                               field=field) from None
        if kind != "impression":
            raise RequestError(400, "invalid_impression",
                               f"impressions[{index}] is a {kind} event; /score takes impressions "
                               "(impression_id, ts_ms, user_id, item_id, features)", index=index)
        impressions.append(event)
    return impressions


def load_json(body: bytes) -> Any:
    """The body as JSON, strictly: UTF-8 only (no BOM, no UTF-16/32), no NaN or Infinity literals, no lone
    surrogates, numbers that fit a double (an integer beyond 64 bits is read as a float: JSON has one number
    type). Anything else is :class:`RequestError` 400 ``invalid_json``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid UTF-8 JSON: {exc}") from None


def check_numeric_features(impressions: Sequence[dict], numeric: Sequence[str]) -> None:
    """The served model's numeric features must be JSON numbers: a string is never read as a number
    (``"nan"``, ``" 12 "``, ``"1_000"`` would be, by ``float()``). Non-finite floats are already refused by
    the event contract. Raises :class:`RequestError` 400 naming the impression and the feature."""
    if not numeric:
        return
    for index, event in enumerate(impressions):
        features = event["features"]
        for name in numeric:
            value = features.get(name)
            if value is not None and type(value) not in (int, float):
                field = f"features[{name!r}]"
                raise RequestError(400, "invalid_impression",
                                   f"impressions[{index}].{field}: a numeric feature of the served model; expected "
                                   f"a JSON number, got {type(value).__name__}", index=index, field=field)


def score_impressions(served: Any, impressions: Sequence[dict]) -> dict[str, Any]:
    """The /score response for ``impressions`` scored alone by ``served`` (a ``ServedModel``): probabilities
    per task, in request order. The daemon scores batches of requests (``consumers.serving.batching``); this is
    the reference a batch's answers are compared with."""
    with torch.inference_mode():
        probabilities = served.model.score_rows(impressions)
    return {
        "model_version": served.version,
        "step": served.step,
        "tasks": list(served.tasks),
        "impression_ids": [event["impression_id"] for event in impressions],
        "probabilities": {task: probabilities[task].tolist() for task in served.tasks},
    }
