"""The serving daemon's HTTP half: POST /score, GET /healthz, GET /metrics over the model the follower swaps in.

The daemon has two halves that share one reference, :attr:`ModelHolder.current`:

* the **Kafka loop** (:meth:`CheckpointFollower.run`, in the main thread): on start it finds the latest complete
  checkpoint from the end of the serving topic (docs/wire-format.md, "fast path": the last message is a
  manifest whose ``span`` says how far back its chunks start), falling back to reading from the beginning;
  then it follows the topic. Every checkpoint goes through :class:`consumers.state.wire.Reassembler` (chunk and
  payload sha256, format version), then ``safetensors`` and ``ServingModel.from_serving_state`` — nothing is
  unpickled. A rejected or unloadable checkpoint is logged and counted in
  ``crossdistil_serving_reload_failures_total{reason}``; the previous model keeps serving.
* the **HTTP server** (:func:`serve_api`, a ``ThreadingHTTPServer``): ``POST /score``, ``GET /healthz``,
  ``GET /metrics``. A request reads ``holder.current`` once and scores with that model, so a swap never changes
  the model under a request in flight.

The request contract of ``POST /score`` is in docs/serving.md. Pure parts (request parsing, scoring) are
unit-tested without Kafka:

>>> parse_score_request(b'[{"impression_id": "i1", "ts_ms": 1, "user_id": "u", "item_id": "x", "features": {}}]',
...                     max_items=10)[0]["v"]
1
>>> try:
...     parse_score_request(b'[{"impression_id": "i1", "ts_ms": "soon", "user_id": "u", "item_id": "x", '
...                         b'"features": {}}]', max_items=10)
... except RequestError as exc:
...     print(exc.status, exc.body()["field"])
400 ts_ms
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson
import torch
from prometheus_client.exposition import choose_encoder

from consumers.runtime.httpd import HttpServer
from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.follower import ModelHolder, ServedModel
from streamer.events import EventError, check_event, event_kind, validate

log = logging.getLogger("crossdistil.serving")


# ---------------------------------------------------------------------------------------------- requests


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
    or 413 (more than ``max_items``).
    """
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
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


def score_impressions(served: ServedModel, impressions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The /score response for ``impressions`` scored by ``served`` (probabilities per task, in request order)."""
    with torch.inference_mode():
        probabilities = served.model.score_rows(impressions)
    return {
        "model_version": served.version,
        "step": served.step,
        "tasks": list(served.tasks),
        "impression_ids": [event["impression_id"] for event in impressions],
        "probabilities": {task: probabilities[task].tolist() for task in served.tasks},
    }


# -------------------------------------------------------------------------------------------------- HTTP


class ApiServer(HttpServer):
    """The running HTTP server of serving (``/score``, ``/healthz``, ``/metrics``): ``.port``, ``.url``,
    ``.close()``, a context manager; the same handle as the trainer's metrics server."""


_ROUTES = {"/score": "POST", "/healthz": "GET", "/metrics": "GET"}
# How long a /score request waits for its turn before it runs anyway, side by side (see serve_api).
SCORING_TURN_WAIT_S = 0.5


class ScoreHandler(BaseHTTPRequestHandler):
    """One request of the serving API. :func:`serve_api` makes a subclass bound to its holder, metrics and limits
    (class attributes below), one per server."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # With Nagle on, a response written in two sends waits for the client's delayed ACK (40 ms on Linux) on
    # every keep-alive request. Buffered writes (flushed in _send) make most responses one send; a body over
    # the buffer still takes two, so Nagle stays off.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024
    holder: ModelHolder
    metrics: ServingMetrics
    max_request_bytes: int
    max_items: int
    waiting_for: str
    # One /score request parses, scores and answers at a time. Under the GIL, threads that score side by side
    # do not run in parallel: they pass the GIL back and forth at every torch op and socket call, and each time
    # one waits up to sys.getswitchinterval() (5 ms) to get it back, so every request ends late. Taking turns
    # ends each one as soon as its own CPU work is done (measured at 4 clients: p90 18 -> 14 ms, p99 24 ->
    # 19.5 ms). The wait for a turn is bounded (SCORING_TURN_WAIT_S) so one stuck request cannot stall the others.
    scoring_turn: threading.Lock

    def do_GET(self) -> None:  # http.server's name
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        started = time.perf_counter()
        path = self.path.split("?", 1)[0]
        endpoint = path if path in _ROUTES else "other"
        items = 0
        try:
            if path not in _ROUTES:
                raise RequestError(404, "not_found",
                                   f"no endpoint {path}; try POST /score, GET /healthz or GET /metrics")
            if method != _ROUTES[path]:
                raise RequestError(405, "method_not_allowed", f"{path} takes {_ROUTES[path]}, not {method}")
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(200, encoder(self.metrics.registry), content_type)
            elif path == "/healthz":
                self._healthz()
            else:
                items = self._score()
        except RequestError as exc:
            if exc.status == 413:
                self.close_connection = True  # the unread body would be taken for the next request
            self._send_json(exc.status, exc.body(), allow=_ROUTES.get(path) if exc.status == 405 else None)
            code = exc.status
        except Exception as exc:  # a bug must answer 500, not drop the connection
            log.exception("%s %s failed", method, path)
            self._send_json(500, {"error": "internal", "message": f"scoring failed: {exc!r}"})
            code = 500
        else:
            code = 200
        self.metrics.request(endpoint, time.perf_counter() - started, code, items)

    def _healthz(self) -> None:
        served = self.holder.current
        if served is None:
            raise RequestError(503, "no_model",
                               f"not ready: no model loaded yet (waiting for a checkpoint on {self.waiting_for})")
        self._send_json(200, {"status": "ok", "model_version": served.version, "step": served.step,
                              "tasks": list(served.tasks), "loaded_at": served.loaded_at_s})

    def _read_body(self) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError(411, "length_required", "POST /score needs a Content-Length header")
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            self.close_connection = True
            raise RequestError(400, "bad_length", f"Content-Length {length_header!r} is not a byte count")
        if length > self.max_request_bytes:
            raise RequestError(413, "too_large", f"the body has {length} bytes; "
                               f"the limit is {self.max_request_bytes} (serving.max_request_bytes)")
        return self.rfile.read(length)

    def _score(self) -> int:
        body = self._read_body()
        served = self.holder.current  # read once: this request finishes on this model, whatever swaps meanwhile
        if served is None:
            raise RequestError(503, "no_model",
                               f"no model loaded yet (waiting for a checkpoint on {self.waiting_for}); retry later")
        # Take turns for the CPU part (see scoring_turn); the turn is released even if the request fails.
        has_turn = self.scoring_turn.acquire(timeout=SCORING_TURN_WAIT_S)
        try:
            impressions = parse_score_request(body, self.max_items)
            self._send_json(200, score_impressions(served, impressions))
        finally:
            if has_turn:
                self.scoring_turn.release()
        return len(impressions)

    def _send_json(self, code: int, body: Mapping[str, Any], allow: str | None = None) -> None:
        headers = {"Allow": allow} if allow else {}
        if code == 503:
            headers["Retry-After"] = "1"
        self._send(code, orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE), "application/json", headers)

    def _send(self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()  # inside the scoring turn: the response leaves before the next request runs

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would drown the log
        pass


def serve_api(
    holder: ModelHolder,
    metrics: ServingMetrics,
    *,
    bind: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 4 * 1024 * 1024,
    max_items: int = 10_000,
    waiting_for: str = "the serving topic",
) -> ApiServer:
    """Serve POST /score, GET /healthz and GET /metrics from a daemon thread; OSError naming the address if taken."""
    handler = type("BoundScoreHandler", (ScoreHandler,), {
        "holder": holder, "metrics": metrics, "max_request_bytes": max_request_bytes, "max_items": max_items,
        "waiting_for": waiting_for, "scoring_turn": threading.Lock(),
    })
    return ApiServer.start(bind, port, handler, what="/score", settings="serving.port or serving.bind",
                           thread_prefix="serving")
