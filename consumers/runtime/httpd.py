"""HTTP for the daemons: a threaded server on a daemon thread, and the /metrics + /healthz endpoint.

``HttpServer.start`` serves any handler (the serving daemon's API subclasses it); ``serve_http`` serves a
Prometheus registry at ``/metrics`` and a health callback at ``/healthz``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class HttpServer:
    """A running HTTP endpoint served from a daemon thread: ``.port``, ``.url``, ``.close()``."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.bind, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and wait for the server thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    @classmethod
    def start(cls, bind: str, port: int, handler: type[BaseHTTPRequestHandler], *, what: str, settings: str,
              thread_prefix: str):
        """Bind ``handler`` on ``bind:port`` and serve it from a daemon thread ``<thread_prefix>-http-<port>``.

        Raises OSError naming ``what`` is served, the address and the ``settings`` to change (e.g. "metrics.port
        or metrics.bind") when it cannot bind.
        """
        try:
            server = ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve {what} on {bind}:{port}: {exc.strerror}; set {settings}") from exc
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name=f"{thread_prefix}-http-{server.server_address[1]}",
                                  daemon=True)
        thread.start()
        return cls(server, thread)

    def __enter__(self) -> "HttpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_http(
    bind: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    health: Callable[[], tuple[bool, str]] | None = None,
) -> HttpServer:
    """Serve ``registry`` at ``/metrics`` (Prometheus text or OpenMetrics, by Accept header) and ``health`` at
    ``/healthz`` (200 "ok", or 503 with the reason) from a daemon thread. ``port=0`` picks a free port
    (``handle.port``). Raises OSError (with the address in the message) when the port is taken."""
    registry = registry if registry is not None else CollectorRegistry()
    health = health or (lambda: (True, "ok"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    encoder, content_type = choose_encoder(self.headers.get("Accept"))
                    body, code = encoder(registry), 200
                except Exception as exc:  # a failing collector must not kill the endpoint
                    body, code, content_type = f"collecting metrics failed: {exc!r}\n".encode(), 500, "text/plain"
            elif path == "/healthz":
                try:
                    ok, reason = health()
                except Exception as exc:
                    ok, reason = False, f"health check raised {exc!r}"
                body, code, content_type = ((("ok" if ok else reason) + "\n").encode(), 200 if ok else 503,
                                            "text/plain; charset=utf-8")
            else:
                body, code, content_type = b"not found: try /metrics or /healthz\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: keep logs quiet
            pass

    return HttpServer.start(bind, port, Handler, what="metrics", settings="metrics.port or metrics.bind",
                               thread_prefix="metrics")
