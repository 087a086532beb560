"""consumers.runtime.httpd.serve_http: /metrics and /healthz over real HTTP on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumers.runtime.httpd import RateLimitFilter, serve_http
from consumers.runtime.telemetry import TrainerMetrics

pytestmark = pytest.mark.unit


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def trainer_metrics() -> TrainerMetrics:
    metrics = TrainerMetrics(["click"], windows=(100,))
    y = np.array([0, 1] * 50)
    metrics.observe({"click": y}, {"click": np.where(y == 1, 0.8, 0.3)})
    return metrics


def test_metrics_endpoint_serves_prometheus_text_on_a_free_port(trainer_metrics: TrainerMetrics) -> None:
    with serve_http("127.0.0.1", 0, trainer_metrics.registry, lambda: (True, "ok")) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        status, content_type, body = get(server.url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("crossdistil_auc", (("role", "student"), ("task", "click"), ("window", "100")))] == 1.0


def test_metrics_endpoint_speaks_openmetrics_when_asked(trainer_metrics: TrainerMetrics) -> None:
    with serve_http("127.0.0.1", 0, trainer_metrics.registry) as server:
        status, content_type, body = get(server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_healthz_answers_200_ok_then_503_with_the_reason() -> None:
    state = {"ok": True, "reason": "ok"}
    with serve_http("127.0.0.1", 0, None, lambda: (state["ok"], state["reason"])) as server:
        assert get(server.url + "/healthz")[::2] == (200, "ok\n")
        state.update(ok=False, reason="poll loop stalled for 120 s")
        assert get(server.url + "/healthz")[::2] == (503, "poll loop stalled for 120 s\n")


def test_a_health_check_that_raises_is_unhealthy_not_a_crash() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with serve_http("127.0.0.1", 0, None, broken) as server:
        status, _, body = get(server.url + "/healthz")
        assert status == 503 and "boom" in body
        assert get(server.url + "/metrics")[0] == 200  # the endpoint survives


def test_unknown_paths_are_404_with_a_hint() -> None:
    with serve_http("127.0.0.1", 0) as server:
        status, _, body = get(server.url + "/nope")
    assert status == 404 and "/metrics" in body


def test_a_taken_port_is_an_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            serve_http("127.0.0.1", port)


def test_close_stops_serving_and_frees_the_port() -> None:
    server = serve_http("127.0.0.1", 0)
    port = server.port
    server.close()
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the port is free again


def test_keep_alive_answers_are_not_held_back_by_nagle() -> None:
    """uvicorn writes headers and body in two sends: without TCP_NODELAY each answer waits ~40 ms for an ACK."""
    with serve_http("127.0.0.1", 0) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok\n"):
                answer += sock.recv(65536)
            latencies.append(time.perf_counter() - started)
    assert sorted(latencies)[5] < 0.02, latencies


def test_rate_limited_logging_lets_one_record_per_kind_through_per_interval_and_drops_tracebacks() -> None:
    clock = {"now": 0.0}
    limiter = RateLimitFilter(interval_s=10, clock=lambda: clock["now"])

    def record(message: str) -> logging.LogRecord:
        try:
            raise ValueError("boom")
        except ValueError:
            return logging.LogRecord("crossdistil.http", logging.ERROR, __file__, 1, message, (), sys.exc_info())

    first = record("bad request from %s")
    assert limiter.filter(first) and first.exc_info is not None  # the first of its kind keeps its traceback
    assert not any(limiter.filter(record("bad request from %s")) for _ in range(99))
    assert limiter.filter(record("another kind"))
    clock["now"] = 10.0
    later = record("bad request from %s")
    assert limiter.filter(later) and later.exc_info is None and "99 more like it" in later.msg
