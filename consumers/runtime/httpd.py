"""HTTP for the daemons: uvicorn (httptools) on a daemon thread, with the limits a public endpoint needs.

``HttpServer.start(bind, port, app, ...)`` serves any ASGI app (serving's API: ``consumers.serving.api.build_app``);
``serve_http`` serves a Prometheus registry at ``/metrics`` and a health callback at ``/healthz`` (the trainer's
endpoint). Both get the same connection handling, :class:`GuardedProtocol` over uvicorn's httptools protocol:

* strict framing (llhttp): a bad request line, a malformed or duplicate ``Content-Length``, or
  ``Content-Length`` with ``Transfer-Encoding`` is a 400 and the connection is closed; a body the app did not
  read is still consumed by the parser, so the next request on a keep-alive connection starts where it should;
* timeouts (:class:`HttpLimits`): the request line and headers must arrive within ``header_timeout_s`` of the
  connection opening or of the previous response, a body within ``body_timeout_s`` of its headers (else a 408
  and the connection closes), an idle keep-alive connection closes after ``keep_alive_s``, and a response the
  client does not read within ``write_timeout_s`` drops its connection. Writing never blocks the event loop:
  one client that does not read its answers holds only its own connection;
* limits: ``max_url_bytes`` (414), ``max_header_bytes`` (431), ``max_connections`` (beyond it each request is
  answered 503 with ``Retry-After`` and the connection closes), the listen ``backlog``;
* every answer the server itself makes is JSON ``{"error": <code>, "message": <sentence>}``, and what it logs
  about clients is rate-limited (:class:`RateLimitFilter`), without tracebacks.

>>> limits = HttpLimits()
>>> limits.header_timeout_s, limits.max_connections
(10.0, 512)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("crossdistil.http")


@dataclass(frozen=True)
class HttpLimits:
    """Timeouts and limits of one HTTP server (documented in docs/serving.md, "HTTP")."""

    header_timeout_s: float = 10.0  # request line + headers, from connection or previous response
    body_timeout_s: float = 30.0  # the whole body, from the end of the headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    write_timeout_s: float = 10.0  # a response the client does not take within this drops the connection
    backlog: int = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)
    max_connections: int = 512  # open connections; beyond: 503 + Retry-After, connection closed
    max_url_bytes: int = 8192  # request target; beyond: 414
    max_header_bytes: int = 32768  # all header names and values; beyond: 431


def error_body(error: str, message: str, **extra: Any) -> bytes:
    """The JSON error body every server answer uses: ``{"error", "message", ...}`` and a newline."""
    return orjson.dumps({"error": error, "message": message, **extra}, option=orjson.OPT_APPEND_NEWLINE)


def json_error(status: int, error: str, message: str, headers: Mapping[str, str] | None = None,
               **extra: Any) -> Response:
    """A Starlette response with :func:`error_body`."""
    return Response(error_body(error, message, **extra), status, headers=dict(headers or {}),
                    media_type="application/json")


class RateLimitFilter(logging.Filter):
    """Lets one record per message template through every ``interval_s``; the next one that passes says how many
    were dropped. Tracebacks are dropped from every record (a hostile client must not grow the log by
    kilobytes per request); the first record of each template keeps its traceback."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = self.clock()
        with self._lock:
            first = key not in self._last
            if not first and now - self._last[key] < self.interval_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._last[key] = now
            dropped = self._dropped.pop(key, 0)
        if not first:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {self.interval_s:g} s not logged)"
        return True


# uvicorn's own logger: client mistakes ("Invalid HTTP request received.") are warnings there, one per request.
_uvicorn_log = logging.getLogger("uvicorn.error")
_uvicorn_log.setLevel(logging.WARNING)  # "Started server process", "Shutting down": not news for a daemon
_uvicorn_log.addFilter(RateLimitFilter())
log.addFilter(RateLimitFilter())


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the server refuses (status, code, sentence)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the timeouts and limits of :class:`HttpLimits` and JSON errors.

    ``limits`` is set per server by :meth:`HttpServer.start` (a subclass per server).
    """

    limits: HttpLimits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # the cap is ours (JSON 503), not uvicorn's plain-text one
        self.access_log = False  # one line per request would drown the log (metrics count requests)
        self._real_app = self.app
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0

    # -- timers: one deadline at a time (headers, then body), plus one while writing is paused

    def _arm(self, seconds: float, status: int, error: str, message: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, status, error, message)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, status: int, error: str, message: str) -> None:
        self._deadline = None
        if self.cycle is not None and self.cycle.response_started:
            self.transport.abort()  # answered already (e.g. 404 before its body): just stop waiting for the body
        else:
            self._refuse(status, error, message)

    def _refuse(self, status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        """Answer ``status`` with a JSON error and close the connection (the request cannot be trusted)."""
        if self.transport.is_closing():
            return
        body = error_body(error, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for name, value in (headers or {}).items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() sees a disconnect; its send() is dropped
            self.cycle.message_event.set()
        self.transport.close()

    # -- connection and parser callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrade_not_supported", "this server speaks HTTP/1.1 only; no protocol upgrade")
        except httptools.HttpParserError as exc:
            refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            if refused is None:
                log.warning("refused a malformed HTTP request from %s: %s", self._peer(), exc)
                self._refuse(400, "bad_request", f"malformed HTTP request: {exc}")
            else:
                self._refuse(refused.status, refused.error, refused.message)

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "?"

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise _Refused(414, "uri_too_long", f"the request target is over {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes:
            raise _Refused(431, "headers_too_large", f"the headers are over {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        busy = len(self.connections) > self.limits.max_connections
        self.app = _busy_app if busy else self._real_app
        if busy:
            log.warning("over %d connections: answering 503", self.limits.max_connections)
        self._arm(self.limits.body_timeout_s, 408, "body_timeout",
                  f"the body did not arrive within {self.limits.body_timeout_s:g} s")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle.response_complete:  # answered before its body (404, 413): the next request's clock starts
            self._await_next_request()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.cycle.more_body:  # else the body (or the next request) is still arriving
            self._await_next_request()

    def _await_next_request(self) -> None:
        if not self.transport.is_closing():
            self._arm(self.limits.header_timeout_s, 408, "header_timeout",
                      f"no complete request line and headers within {self.limits.header_timeout_s:g} s")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.limits.write_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_expired(self) -> None:
        self._write_deadline = None
        log.warning("dropped a connection from %s that did not read its response within %g s", self._peer(),
                    self.limits.write_timeout_s)
        self.transport.abort()


async def _busy_app(scope: dict, receive: Callable, send: Callable) -> None:
    body = error_body("busy", "too many connections; retry shortly")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HttpServer:
    """A running HTTP endpoint served by uvicorn from a daemon thread: ``.port``, ``.url``, ``.close()``."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket) -> None:
        self._server = server
        self._thread = thread
        self.bind, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and wait for the server thread (idempotent)."""
        self._server.should_exit = True
        self._server.force_exit = True  # do not wait for clients that keep connections open
        self._thread.join(timeout=10)

    @classmethod
    def start(cls, bind: str, port: int, app: Callable, *, what: str, settings: str, thread_prefix: str,
              limits: HttpLimits | None = None, reuse_port: bool = False):
        """Bind ``bind:port`` and serve the ASGI ``app`` from a daemon thread ``<thread_prefix>-http-<port>``.

        Raises OSError naming ``what`` is served, the address and the ``settings`` to change (e.g. "metrics.port
        or metrics.bind") when it cannot bind. ``reuse_port``: several processes may serve one port
        (SO_REUSEPORT; the kernel spreads connections over them).
        """
        limits = limits or HttpLimits()
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
        # uvicorn writes the headers and the body of a response in two sends, so with Nagle on every keep-alive
        # answer waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((bind, port))
            sock.listen(limits.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot serve {what} on {bind}:{port}: {exc.strerror}; set {settings}") from exc
        protocol = type("Protocol", (GuardedProtocol,), {"limits": limits})
        config = uvicorn.Config(app, http=protocol, loop="asyncio", lifespan="off", log_config=None,
                                access_log=False, server_header=False, backlog=limits.backlog,
                                # no X-Forwarded-For rewriting: a daemon behind no proxy, and a middleware less
                                # per request
                                proxy_headers=False,
                                timeout_keep_alive=int(max(1, limits.keep_alive_s)), timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                  name=f"{thread_prefix}-http-{sock.getsockname()[1]}")
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not server.started:
            server.should_exit = True
            raise OSError(f"cannot serve {what} on {bind}:{port}: the HTTP server did not start")
        return cls(server, thread, sock)

    def __enter__(self) -> "HttpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _not_found(request: Request, exc: Exception) -> Response:
    return json_error(404, "not_found", f"no endpoint {request.url.path}; try GET /metrics or GET /healthz")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        return json_error(405, "method_not_allowed",
                          f"{request.url.path} takes {headers.get('Allow', 'GET')}, not {request.method}", headers)
    return json_error(exc.status_code, "http_error", str(exc.detail), headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
    return json_error(500, "internal", f"the server failed: {exc!r}")


ERROR_HANDLERS: dict[Any, Callable] = {404: _not_found, HTTPException: _http_error, Exception: _internal_error}


def serve_http(
    bind: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    health: Callable[[], tuple[bool, str]] | None = None,
    *,
    limits: HttpLimits | None = None,
) -> HttpServer:
    """Serve ``registry`` at ``/metrics`` (Prometheus text or OpenMetrics, by Accept header) and ``health`` at
    ``/healthz`` (200 "ok", or 503 with the reason) from a daemon thread. ``port=0`` picks a free port
    (``handle.port``). Raises OSError (with the address in the message) when the port is taken."""
    registry = registry if registry is not None else CollectorRegistry()
    health = health or (lambda: (True, "ok"))

    def metrics(request: Request) -> Response:  # sync: Starlette runs it in its thread pool, off the event loop
        try:
            encoder, content_type = choose_encoder(request.headers.get("accept"))
            return Response(encoder(registry), 200, media_type=content_type)
        except Exception as exc:  # a failing collector must not kill the endpoint
            log.error("collecting metrics failed: %r", exc)
            return json_error(500, "collect_failed", f"collecting metrics failed: {exc!r}")

    def healthz(request: Request) -> Response:
        try:
            ok, reason = health()
        except Exception as exc:
            ok, reason = False, f"health check raised {exc!r}"
        return PlainTextResponse(("ok" if ok else reason) + "\n", 200 if ok else 503)

    app = Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz)],
                    exception_handlers=ERROR_HANDLERS)
    return HttpServer.start(bind, port, app, what="metrics", settings="metrics.port or metrics.bind",
                            thread_prefix="metrics", limits=limits)
