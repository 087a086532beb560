"""The serving daemon's HTTP half: POST /score, GET /healthz, GET /metrics over the model the follower swaps in.

The daemon has two halves that share one reference, :attr:`ModelHolder.current`:

* the **Kafka loop** (:meth:`CheckpointFollower.run`, in the main thread): on start it finds the latest complete
  checkpoint from the end of the serving topic (docs/wire-format.md, "fast path": the last message is a
  manifest whose ``span`` says how far back its chunks start), falling back to reading from the beginning;
  then it follows the topic. Every checkpoint goes through :class:`consumers.state.wire.Reassembler` (chunk and
  payload sha256, format version), then ``safetensors`` and ``ServingModel.from_serving_state`` — nothing is
  unpickled. A rejected or unloadable checkpoint is logged and counted in
  ``crossdistil_serving_reload_failures_total{reason}``; the previous model keeps serving, and ``/healthz`` (still
  ``ok``) adds the last rejection and the count since the last good load (:attr:`ModelHolder.rejections`).
* the **HTTP server** (:func:`serve_api`): an ASGI app on uvicorn (``consumers.runtime.httpd``: timeouts,
  connection cap, strict framing, JSON errors). ``POST /score`` bodies are scored by one scoring thread in
  micro-batches (``consumers.serving.batching``), which reads ``holder.current`` once per batch, so a swap never
  changes the model under a request in flight; the event loop writes the answers.

The request contract of ``POST /score`` is in docs/serving.md; its pure parts are ``consumers.serving.scoring``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.runtime.httpd import ERROR_HANDLERS, HttpLimits, HttpServer, error_body, json_error
from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.batching import Busy, ScoringBatcher
from consumers.serving.follower import ModelHolder
from consumers.serving.openapi import openapi
from consumers.serving.scoring import (  # noqa: F401  (re-exported: the API's public names)
    RequestError,
    check_numeric_features,
    parse_score_request,
    score_impressions,
    validate_impressions,
)

log = logging.getLogger("crossdistil.serving.requests")

_JSON_TYPES = {"application/json"}
DRAIN_LIMIT = 4  # a 413 body up to this many times serving.max_request_bytes is read and dropped


class ApiServer:
    """The running HTTP server of serving (``/score``, ``/healthz``, ``/metrics``): ``.port``, ``.url``,
    ``.close()``, a context manager; ``.batcher`` is its :class:`ScoringBatcher`."""

    def __init__(self, http: HttpServer, batcher: ScoringBatcher) -> None:
        self.http = http
        self.batcher = batcher
        self.bind, self.port, self.url = http.bind, http.port, http.url

    def close(self) -> None:
        """Stop serving, then the scoring thread (idempotent)."""
        self.http.close()
        self.batcher.close()

    def __enter__(self) -> "ApiServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _counted(metrics: ServingMetrics, endpoint: str,
             handler: Callable[[Request], Awaitable[tuple[Response, int]]]) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` answering (response, impressions), counted in ``crossdistil_serving_requests_total``."""

    async def endpoint_function(request: Request) -> Response:
        started = time.perf_counter()
        response, items = await handler(request)
        metrics.request(endpoint, time.perf_counter() - started, response.status_code, items)
        return response

    return endpoint_function


def build_app(holder: ModelHolder, metrics: ServingMetrics, batcher: ScoringBatcher, *, max_request_bytes: int,
              max_items: int, waiting_for: str) -> Callable:
    """The ASGI app of the serving API (see docs/serving.md for every answer): POST /score as a plain ASGI
    callable, everything else a Starlette app."""

    async def score(scope: dict, receive: Callable, send: Callable) -> None:
        """POST /score as a plain ASGI callable: the hot path skips Starlette's request, response, routing and
        middleware objects; every answer is the one the Starlette route gave."""
        started = time.perf_counter()
        status, items = 500, 0
        try:
            status, payload, headers, items = await score_answer(scope, receive)
            if status != 499:
                await _send(send, status, payload, headers)
        except Exception as exc:  # as Starlette's error handler did: a bug answers a JSON 500, once logged
            log.error("POST /score failed: %r", exc, exc_info=exc)
            await _send(send, 500, error_body("internal", f"the server failed: {exc!r}"), {})
        finally:
            metrics.request("/score", time.perf_counter() - started, status, items)

    async def score_answer(scope: dict, receive: Callable) -> tuple[int, bytes, dict[str, str], int]:
        refused = _header_refusal(_headers(scope), max_request_bytes)
        if refused is not None:
            return refused
        if holder.current is None:
            return _refusal(503, "no_model", f"no model loaded yet (waiting for a checkpoint on {waiting_for}); "
                            "retry later", {"Retry-After": "1"})
        if batcher.full:
            return _BUSY
        with batcher.arriving():
            body = await _read_body(receive)
        if body is None:
            return 499, b"", {}, 0  # nobody to answer; counted as 499 (client closed)
        try:
            answer = batcher.submit_async(body)
        except Busy:
            return _BUSY
        return await answer

    starlette = _starlette_app(holder, metrics, max_request_bytes=max_request_bytes, max_items=max_items,
                               waiting_for=waiting_for)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/score":
            await score(scope, receive, send)
        else:
            await starlette(scope, receive, send)

    return app


def _header_refusal(headers: dict[str, str], max_request_bytes: int) -> tuple[int, bytes, dict[str, str], int] | None:
    """The answer to a POST /score whose headers already refuse it (media type, encoding, length), else None."""
    content_type = headers.get("content-type")
    if content_type is not None:
        media, _, parameters = content_type.partition(";")
        charset = parameters.strip().lower().replace(" ", "")
        if media.strip().lower() not in _JSON_TYPES or charset not in ("", "charset=utf-8"):
            return _refusal(415, "unsupported_media_type", f"Content-Type {content_type!r}: send "
                            "application/json (UTF-8)", field="Content-Type")
    if headers.get("content-encoding", "identity").lower() != "identity":
        return _refusal(415, "unsupported_media_type", "Content-Encoding is not supported; send the body as is",
                        field="Content-Encoding")
    length = headers.get("content-length")
    if length is None:  # chunked: the parser frames it, but the byte limit is checked before reading
        return _refusal(411, "length_required", "POST /score needs a Content-Length header", field="Content-Length")
    if int(length) > max_request_bytes:  # the parser accepted it: digits only
        # The parser reads (and drops) the body so the connection stays usable; one far over the limit
        # is not worth reading: the connection closes instead.
        close = {"Connection": "close"} if int(length) > DRAIN_LIMIT * max_request_bytes else {}
        return _refusal(413, "too_large", f"the body has {length} bytes; the limit is {max_request_bytes} "
                        "(serving.max_request_bytes)", close, field="Content-Length")
    return None


def _starlette_app(holder: ModelHolder, metrics: ServingMetrics, *, max_request_bytes: int, max_items: int,
                   waiting_for: str) -> Starlette:
    """Everything but POST /score: /healthz, /metrics, /openapi.json, and the JSON 404s and 405s."""

    async def healthz(request: Request) -> tuple[Response, int]:
        served, rejections = holder.current, _rejections(holder)
        if served is None:
            return json_error(503, "no_model", f"not ready: no model loaded yet (waiting for a checkpoint on "
                              f"{waiting_for})", {"Retry-After": "1"}, **rejections), 0
        return Response(_dumps({"status": "ok", "model_version": served.version, "step": served.step,
                                "tasks": list(served.tasks), "loaded_at": served.loaded_at_s, **rejections}),
                        media_type="application/json"), 0

    async def metrics_text(request: Request) -> tuple[Response, int]:
        encoder, content_type = choose_encoder(request.headers.get("accept"))
        body = await asyncio.to_thread(encoder, metrics.registry)  # collecting is CPU work: off the event loop
        return Response(body, media_type=content_type), 0

    description = _dumps(openapi(max_request_bytes, max_items))

    async def openapi_json(request: Request) -> tuple[Response, int]:
        return Response(description, media_type="application/json"), 0

    async def not_found(request: Request, exc: Exception) -> Response:
        metrics.request("other", 0.0, 404, 0)
        return json_error(404, "not_found", f"no endpoint {request.url.path}; try POST /score, GET /healthz or "
                          "GET /metrics (described at GET /openapi.json)")

    async def http_error(request: Request, exc: Exception) -> Response:  # 405 with Allow, mostly
        response = await ERROR_HANDLERS[HTTPException](request, exc)
        metrics.request(request.url.path, 0.0, response.status_code, 0)
        return response

    # POST /score goes to ``score``; other methods on /score still reach this route for their 405 with Allow.
    routes = [Route("/score", _counted(metrics, "/score", _unreachable), methods=["POST"]),
              Route("/healthz", _counted(metrics, "/healthz", healthz), methods=["GET"]),
              Route("/metrics", _counted(metrics, "/metrics", metrics_text), methods=["GET"]),
              Route("/openapi.json", _counted(metrics, "/openapi.json", openapi_json), methods=["GET"])]
    starlette = Starlette(routes=routes,
                          exception_handlers={**ERROR_HANDLERS, 404: not_found, HTTPException: http_error})
    return starlette


def _rejections(holder: ModelHolder) -> dict[str, Any]:
    """What /healthz says of refused publications: still healthy (the replica serves its model), but a probe sees
    that newer ones do not load, and why."""
    last, since_load = holder.rejections
    described = None if last is None else {"version": last.version, "reason": last.reason, "detail": last.detail,
                                            "at": last.at_s}
    return {"rejections_since_load": since_load, "last_rejection": described}


async def _unreachable(request: Request) -> tuple[Response, int]:
    raise AssertionError("POST /score is answered by build_app's score(), before Starlette's routing")


def _headers(scope: dict) -> dict[str, str]:
    """The request's headers by lower-case name (uvicorn gives them lower-cased; a repeated one: the last)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


async def _read_body(receive: Callable) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send(send: Callable, status: int, payload: bytes, headers: dict[str, str]) -> None:
    """One JSON answer: status, Content-Type, Content-Length, ``headers``, the body."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _refusal(status: int, error: str, message: str, headers: dict[str, str] | None = None,
             **extra: Any) -> tuple[int, bytes, dict[str, str], int]:
    return status, error_body(error, message, **extra), headers or {}, 0


_BUSY = _refusal(503, "busy", "too many requests waiting to be scored; retry shortly", {"Retry-After": "1"})


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)


def serve_api(
    holder: ModelHolder,
    metrics: ServingMetrics,
    *,
    bind: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 4 * 1024 * 1024,
    max_items: int = 10_000,
    waiting_for: str = "the serving topic",
    limits: HttpLimits | None = None,
    batch_window_s: float = 0.002,
    max_queued: int = 64,
    reuse_port: bool = False,
) -> ApiServer:
    """Serve POST /score, GET /healthz and GET /metrics from a daemon thread; OSError naming the address if taken.

    ``batch_window_s`` and ``max_queued``: see :class:`ScoringBatcher`; ``limits``: see :class:`HttpLimits`.
    """
    batcher = ScoringBatcher(holder, max_items=max_items, window_s=batch_window_s, max_queued=max_queued,
                             waiting_for=waiting_for)
    app = build_app(holder, metrics, batcher, max_request_bytes=max_request_bytes, max_items=max_items,
                    waiting_for=waiting_for)
    try:
        http = HttpServer.start(bind, port, app, what="/score", settings="serving.port or serving.bind",
                                thread_prefix="serving", limits=limits, reuse_port=reuse_port)
    except OSError:
        batcher.close()
        raise
    return ApiServer(http, batcher)
