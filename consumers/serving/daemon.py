"""``crossdistil serve``: follow the serving topic, hot-swap verified models, answer POST /score.

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

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from consumers.runtime.telemetry import MetricsServer

if TYPE_CHECKING:
    from consumers.runtime.config import Config
    from consumers.runtime.telemetry import ServingMetrics
    from consumers.state.wire import WireCheckpoint
    from models.learner import ServingModel

log = logging.getLogger("crossdistil.serving")

# The serving topic's max.message.bytes (consumers.runtime.local_kafka.ensure_topics): no valid message is larger.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024 + 64 * 1024


# ------------------------------------------------------------------------------------------ the model slot


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and what a response says about it."""

    version: int
    model: ServingModel
    tasks: tuple[str, ...]
    step: int | None
    published_at_s: float | None
    loaded_at_s: float


class ModelHolder:
    """The single reference that the HTTP threads read and the Kafka loop swaps.

    Assigning an attribute is atomic in CPython, so a swap is one assignment; a request that read
    :attr:`current` keeps its model until it returns, whatever happens to the reference meanwhile.
    """

    def __init__(self) -> None:
        self.current: ServedModel | None = None
        self._swapped = threading.Condition()

    def swap(self, served: ServedModel) -> None:
        """Make ``served`` the model of every request that starts from now on."""
        with self._swapped:
            self.current = served
            self._swapped.notify_all()

    def wait_for_version(self, version: int, timeout_s: float) -> ServedModel | None:
        """Block until a model of at least ``version`` is served (tests and benchmarks); None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._swapped:
            while self.current is None or self.current.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._swapped.wait(left)
            return self.current


def load_checkpoint(checkpoint: WireCheckpoint, device: str = "cpu") -> ServedModel:
    """Build the served model from a verified wire checkpoint; ValueError if it is not a serving state.

    The trainer puts ``Learner.serving_state()``'s metadata under the manifest metadata's ``serving`` key.
    """
    from models.learner import ServingModel
    from models.river_baseline import SERVING_FORMAT as RIVER_FORMAT, RiverServingModel

    serving_meta = checkpoint.metadata.get("serving")
    if not isinstance(serving_meta, Mapping):
        raise ValueError("manifest metadata has no 'serving' map (the students' format, version and config)")
    try:
        if serving_meta.get("format") == RIVER_FORMAT:  # the river baseline: CPU only, no device
            model = RiverServingModel.from_serving_state(checkpoint.tensors, serving_meta)
        else:
            model = ServingModel.from_serving_state(checkpoint.tensors, serving_meta, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # wrong tensor names or shapes, bad config
        raise ValueError(f"cannot build the model: {exc}") from exc
    step = checkpoint.metadata.get("step")
    published_ms = checkpoint.metadata.get("published_at_ms")
    return ServedModel(
        version=checkpoint.version,
        model=model,
        tasks=tuple(model.config.tasks),
        step=step if isinstance(step, int) else None,
        published_at_s=published_ms / 1000 if isinstance(published_ms, (int, float)) else None,
        loaded_at_s=time.time(),
    )


# ------------------------------------------------------------------------------------- following the topic


@dataclass
class FollowerStats:
    """What the Kafka loop did: where it started and how much it read (tests assert on these)."""

    start_path: str = ""  # "fast" (from the last manifest's span), "slow" (from the beginning) or "empty"
    end_offset_at_start: int = 0
    start_offset: int = 0  # where reading for the initial model began
    records_read: int = 0  # every record polled, start-up and following
    startup_records: int = 0  # records read before following began
    rejections: deque[tuple[int | None, str]] = field(default_factory=lambda: deque(maxlen=1000))  # the latest


class CheckpointFollower:
    """Reads the serving topic's single partition and swaps every newer verified model into ``holder``."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        holder: ModelHolder,
        metrics: ServingMetrics,
        *,
        device: str = "cpu",
        max_checkpoint_bytes: int = 1 << 30,
        poll_timeout_ms: int = 200,
        on_swap: Callable[[ServedModel], None] | None = None,
    ) -> None:
        from kafka import TopicPartition

        from consumers.state.wire import Reassembler

        self.consumer = consumer
        self.topic = topic
        self.tp = TopicPartition(topic, 0)
        self.holder = holder
        self.metrics = metrics
        self.device = device
        self.poll_timeout_ms = poll_timeout_ms
        self.on_swap = on_swap
        self.stats = FollowerStats()
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.reassembler = Reassembler(max_payload_bytes=max_checkpoint_bytes, max_message_bytes=MAX_MESSAGE_BYTES)

    # -- start-up

    def find_latest(self, stop: threading.Event) -> None:
        """Load the newest complete checkpoint without replaying the topic's history, then stand at its end.

        Fast path: read the last message; if it is a manifest, read only its ``span`` messages before it.
        Slow path (no manifest last, or the fast path found no complete checkpoint): read from the beginning
        to the end offset seen at start. Either way the consumer ends positioned at that end offset.
        """
        from consumers.state.wire import Reassembler

        self.consumer.assign([self.tp])
        begin = self.consumer.beginning_offsets([self.tp])[self.tp]
        end = self.consumer.end_offsets([self.tp])[self.tp]
        self.stats.end_offset_at_start = end
        if end <= begin:
            self.stats.start_path, self.stats.start_offset = "empty", end
            self.consumer.seek(self.tp, end)
            return
        last = self._read_range(end - 1, end, stop)
        span = _manifest_span(last[-1]) if last else None
        if span is not None:
            start = max(begin, end - 1 - span)
            self.stats.start_path, self.stats.start_offset = "fast", start
            if self._load_first(self._read_range(start, end, stop)):
                self.stats.startup_records = self.stats.records_read
                return
            log.info("the last manifest on %s did not complete a checkpoint; reading the topic from offset %d", self.topic, begin)
            # A fresh reader: the fast path's rejections would otherwise make the replay's chunks look stale.
            self.reassembler = Reassembler(max_payload_bytes=self.max_checkpoint_bytes, max_message_bytes=MAX_MESSAGE_BYTES)
        self.stats.start_path, self.stats.start_offset = "slow", begin
        self._load_first(self._read_range(begin, end, stop))
        self.stats.startup_records = self.stats.records_read

    def _read_range(self, start: int, end: int, stop: threading.Event) -> list[tuple[bytes | None, bytes | None]]:
        """The (key, value) of every record in [start, end) still on the topic (compaction leaves gaps)."""
        self.consumer.seek(self.tp, start)
        messages: list[tuple[bytes | None, bytes | None]] = []
        while self.consumer.position(self.tp) < end and not stop.is_set():
            for record in self.consumer.poll(timeout_ms=self.poll_timeout_ms).get(self.tp, []):
                self.stats.records_read += 1
                if record.offset < end:
                    messages.append((record.key, record.value))
        self.consumer.seek(self.tp, end)  # poll may have fetched past end: what lies there is read when following
        return messages

    def _load_first(self, messages: Sequence[tuple[bytes | None, bytes | None]]) -> bool:
        """Feed ``messages``; swap in the newest checkpoint that verifies and loads. True if one did."""
        loaded = False
        for key, value in messages:
            loaded = self._feed(key, value) or loaded
        return loaded

    # -- following

    def run(self, stop: threading.Event) -> None:
        """Start-up, then follow the topic until ``stop`` is set. The whole Kafka loop of the daemon."""
        self.find_latest(stop)
        while not stop.is_set():
            for record in self.consumer.poll(timeout_ms=self.poll_timeout_ms).get(self.tp, []):
                self.stats.records_read += 1
                self._feed(record.key, record.value)

    def _feed(self, key: bytes | None, value: bytes | None) -> bool:
        """One record through the reassembler; True if it completed a model that is now served."""
        from consumers.state.wire import Rejection, WireCheckpoint

        started = time.perf_counter()
        outcome = self.reassembler.feed(key, value)
        if isinstance(outcome, Rejection):
            self._reject(outcome.version, outcome.reason, outcome.detail)
            return False
        if not isinstance(outcome, WireCheckpoint):
            return False
        try:
            served = load_checkpoint(outcome, self.device)
        except ValueError as exc:
            self._reject(outcome.version, "bad_model", str(exc))
            return False
        previous = self.holder.current
        if previous is not None and served.version <= previous.version:
            return False  # a restart of the reassembler replayed an older version: never go back
        self.holder.swap(served)
        seconds = time.perf_counter() - started
        self.metrics.model_loaded(served.version, served.published_at_s or served.loaded_at_s, seconds)
        log.info("serving model version %d (step %s, tasks %s), verified and loaded in %.3f s",
                 served.version, served.step, ",".join(served.tasks), seconds)
        if self.on_swap is not None:
            self.on_swap(served)
        return True

    def _reject(self, version: int | None, reason: str, detail: str) -> None:
        self.stats.rejections.append((version, reason))
        self.metrics.reload_failed(reason)
        current = self.holder.current
        keeping = f"keeping version {current.version}" if current is not None else "no model served yet"
        log.warning("rejected checkpoint %s on %s: %s (%s); %s",
                    "?" if version is None else version, self.topic, reason, detail, keeping)


def _manifest_span(message: tuple[bytes | None, bytes | None]) -> int | None:
    """``span`` of a manifest message, or None if the message is not a readable manifest."""
    import msgpack

    from consumers.state.wire import MANIFEST_KEY

    key, value = message
    if key != MANIFEST_KEY or value is None or len(value) > MAX_MESSAGE_BYTES:
        return None
    try:
        manifest = msgpack.unpackb(value, raw=False)
    except Exception:  # any malformed value: msgpack raises several exception types
        return None
    span = manifest.get("span") if isinstance(manifest, dict) else None
    return span if isinstance(span, int) and not isinstance(span, bool) and span >= 0 else None


# ---------------------------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the daemon refuses: HTTP ``status`` and a JSON body naming what is wrong."""

    def __init__(self, status: int, error: str, message: str, *, index: int | None = None, field: str | None = None) -> None:
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
    from streamer.events import EventError, check_event

    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise RequestError(400, "not_a_list", f"the body must be a JSON list of impressions, got a {type(items).__name__}")
    if not items:
        raise RequestError(400, "empty", "the list of impressions is empty; send at least one")
    if len(items) > max_items:
        raise RequestError(413, "too_many_items", f"{len(items)} impressions in one request; the limit is {max_items} (serving.max_items)")
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
    from streamer.events import EventError, event_kind, validate

    impressions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(400, "invalid_impression", f"impressions[{index}] is a {type(item).__name__}, expected an object",
                               index=index)
        event = item if "v" in item else {"v": 1, **item}
        try:
            event = validate(event)
            kind = event_kind(event)
        except EventError as exc:
            field = exc.field.split(".", 1)[1] if exc.field and exc.field.startswith("impression.") else exc.field
            raise RequestError(400, "invalid_impression", f"impressions[{index}]: {exc}", index=index, field=field) from None
        if kind != "impression":
            raise RequestError(400, "invalid_impression",
                               f"impressions[{index}] is a {kind} event; /score takes impressions "
                               "(impression_id, ts_ms, user_id, item_id, features)", index=index)
        impressions.append(event)
    return impressions


def score_impressions(served: ServedModel, impressions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The /score response for ``impressions`` scored by ``served`` (probabilities per task, in request order)."""
    import torch

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


class ApiServer(MetricsServer):
    """The running HTTP server of serving (``/score``, ``/healthz``, ``/metrics``): ``.port``, ``.url``,
    ``.close()``, a context manager; the same handle as the trainer's metrics server."""


_ROUTES = {"/score": "POST", "/healthz": "GET", "/metrics": "GET"}
# How long a /score request waits for its turn before it runs anyway, side by side (see serve_api).
SCORING_TURN_WAIT_S = 0.5


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
    import orjson
    from prometheus_client.exposition import choose_encoder

    # One /score request parses, scores and answers at a time. Under the GIL, threads that score side by side
    # do not run in parallel: they pass the GIL back and forth at every torch op and socket call, and each
    # time one waits up to sys.getswitchinterval() (5 ms) to get it back, so every request ends late. Taking
    # turns ends each one as soon as its own CPU work is done (measured at 4 clients: p90 18 -> 14 ms, p99
    # 24 -> 19.5 ms). The wait for a turn is bounded so that one stuck request cannot stall the others.
    scoring_turn = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
        # With Nagle on, a response written in two sends waits for the client's delayed ACK (40 ms on Linux)
        # on every keep-alive request. Buffered writes (flushed in _send) make most responses one send; a
        # body over the buffer still takes two, so Nagle stays off.
        disable_nagle_algorithm = True
        wbufsize = 64 * 1024

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._route("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._route("DELETE")

        def _route(self, method: str) -> None:
            started = time.perf_counter()
            path = self.path.split("?", 1)[0]
            endpoint = path if path in _ROUTES else "other"
            items = 0
            try:
                if path not in _ROUTES:
                    raise RequestError(404, "not_found", f"no endpoint {path}; try POST /score, GET /healthz or GET /metrics")
                if method != _ROUTES[path]:
                    raise RequestError(405, "method_not_allowed", f"{path} takes {_ROUTES[path]}, not {method}")
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept"))
                    self._send(200, encoder(metrics.registry), content_type)
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
            metrics.request(endpoint, time.perf_counter() - started, code, items)

        def _healthz(self) -> None:
            served = holder.current
            if served is None:
                raise RequestError(503, "no_model", f"not ready: no model loaded yet (waiting for a checkpoint on {waiting_for})")
            self._send_json(200, {"status": "ok", "model_version": served.version, "step": served.step,
                                  "tasks": list(served.tasks), "loaded_at": served.loaded_at_s})

        def _score(self) -> int:
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
            if length > max_request_bytes:
                raise RequestError(413, "too_large", f"the body has {length} bytes; the limit is {max_request_bytes} (serving.max_request_bytes)")
            body = self.rfile.read(length)
            served = holder.current  # read once: this request finishes on this model, whatever swaps meanwhile
            if served is None:
                raise RequestError(503, "no_model", f"no model loaded yet (waiting for a checkpoint on {waiting_for}); retry later")
            # Take turns for the CPU part (see scoring_turn); the turn is released even if the request fails.
            has_turn = scoring_turn.acquire(timeout=SCORING_TURN_WAIT_S)
            try:
                impressions = parse_score_request(body, max_items)
                self._send_json(200, score_impressions(served, impressions))
            finally:
                if has_turn:
                    scoring_turn.release()
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

    return ApiServer.start(bind, port, Handler, what="/score", settings="serving.port or serving.bind", thread_prefix="serving")


# ------------------------------------------------------------------------------------------------ daemon


class ServingDaemon:
    """The whole daemon without signal handling, so tests and benchmarks can run it in a thread.

    ``run(stop)`` returns the exit status: 0 after ``stop`` is set, 3 if Kafka is unreachable at start.
    """

    def __init__(self, cfg: Config, on_swap: Callable[[ServedModel], None] | None = None, out: Any = None) -> None:
        from prometheus_client import CollectorRegistry

        from consumers.runtime.telemetry import ServingMetrics

        self.cfg = cfg
        self.holder = ModelHolder()
        self.metrics = ServingMetrics(CollectorRegistry())
        self.on_swap = on_swap
        self.out = out if out is not None else sys.stdout
        self.api: ApiServer | None = None
        self.follower: CheckpointFollower | None = None
        self.ready = threading.Event()  # set once the HTTP server listens (tests read .api.url after it)

    def run(self, stop: threading.Event) -> int:
        """Serve until ``stop`` is set."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        k, s = self.cfg.kafka, self.cfg.serving
        self.api = serve_api(self.holder, self.metrics, bind=s.bind, port=s.port, max_request_bytes=s.max_request_bytes,
                             max_items=s.max_items, waiting_for=f"topic {k.model_topic} at {k.bootstrap}")
        url = self.api.url
        print(f"crossdistil serve: POST {url}/score, health at {url}/healthz, metrics at {url}/metrics", file=self.out, flush=True)
        self.ready.set()
        try:
            options = {
                "bootstrap_servers": k.bootstrap, "group_id": None, "enable_auto_commit": False,
                # Reconnect within seconds after a broker restart (kafka-python backs off up to 30 s by default).
                "reconnect_backoff_max_ms": 2000,
                # A checkpoint chunk may be as large as the topic allows; fetch a whole one at a time.
                "max_partition_fetch_bytes": MAX_MESSAGE_BYTES, "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES,
                "allow_auto_create_topics": False,  # an auto-created model topic would lack compaction
                # A position that falls out of range (topic recreated, retention) replays from the start: the
                # reassembler skips versions it already has, while "latest" could miss a whole publication.
                "auto_offset_reset": "earliest",
            }
            # The shared [kafka] client_options (security settings, ...) that a consumer accepts.
            options.update({key: v for key, v in k.client_options.items() if key in KafkaConsumer.DEFAULT_CONFIG})
            options["group_id"], options["enable_auto_commit"] = None, False  # serving never joins the trainer's group
            try:
                consumer = KafkaConsumer(**options)
            except KafkaError as exc:
                print(f"crossdistil serve: Kafka at {k.bootstrap} is not reachable ({exc}); start one with "
                      "'crossdistil kafka up' or set kafka.bootstrap (--set kafka.bootstrap=HOST:PORT)", file=sys.stderr)
                return 3
            try:
                if not self._wait_for_topic(consumer, k.model_topic, stop):
                    return 0
                print(f"crossdistil serve: following {k.model_topic} at {k.bootstrap}", file=self.out, flush=True)
                self.follower = CheckpointFollower(
                    consumer, k.model_topic, self.holder, self.metrics, device=s.device,
                    max_checkpoint_bytes=s.max_checkpoint_bytes,
                    poll_timeout_ms=k.poll_timeout_ms, on_swap=self.on_swap,
                )
                self.follower.run(stop)
            finally:
                consumer.close(autocommit=False)
        finally:
            self.api.close()
        return 0

    def _wait_for_topic(self, consumer: Any, topic: str, stop: threading.Event) -> bool:
        """Wait until ``topic`` exists (serving may start before the trainer made it); False if stopped first."""
        warned = False
        while not stop.is_set():
            if consumer.partitions_for_topic(topic):
                return True
            if not warned:
                log.warning("topic %s does not exist yet; waiting (create it with 'crossdistil kafka up')", topic)
                warned = True
            stop.wait(1.0)
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil serve``."""
    from consumers.runtime.config import add_config_arguments

    add_config_arguments(parser, "deploy/serving.example.toml", "serving.port=9501")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def check_serving_config(cfg: Config) -> None:
    """Raise ConfigError if a ``[serving]`` value is out of range."""
    from consumers.runtime.config import ConfigError

    s = cfg.serving
    for name in ("max_request_bytes", "max_items", "max_checkpoint_bytes"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"serving.{name}: must be > 0, got {getattr(s, name)}")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serving.port: must be 0..65535, got {s.port}")
    if s.torch_threads < 0:
        raise ConfigError(f"serving.torch_threads: must be >= 0, got {s.torch_threads}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil serve``; returns the exit status (0 on SIGTERM/SIGINT)."""
    from consumers.runtime.config import ConfigError, load_config, to_toml

    from consumers.runtime import logs

    logs.configure(str(args.log_level))  # the Kafka client's repeated complaints during an outage are folded
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        check_serving_config(cfg)
    except ConfigError as exc:
        print(f"crossdistil serve: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(to_toml(cfg))
        return 0
    import torch

    if cfg.serving.torch_threads:
        torch.set_num_threads(cfg.serving.torch_threads)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = ServingDaemon(cfg).run(stop)
    except OSError as exc:
        print(f"crossdistil serve: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        print("crossdistil serve: stopped", flush=True)
    return status
