"""``crossdistil serve``'s daemon: the HTTP server (``consumers.serving.api``) and the Kafka loop
(``consumers.serving.follower``) around one :class:`~consumers.serving.follower.ModelHolder`.

The Kafka loop runs in the calling thread and the HTTP server in its own; a request reads ``holder.current``
once and scores with that model, so a swap never changes the model under a request in flight.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from consumers.runtime.config import BOOTSTRAP_HINT, Config, kafka_client_options
from consumers.runtime.httpd import HttpLimits
from consumers.runtime.stoppable import call_unless_stopped
from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.api import ApiServer, serve_api
from consumers.serving.follower import MAX_MESSAGE_BYTES, CheckpointFollower, ModelHolder, ServedModel
from streamer.kafka_security import connection_failure, preflight
from streamer.topics import honour_auto_create

log = logging.getLogger("crossdistil.serving")


class ServingDaemon:
    """The whole daemon without signal handling, so tests and benchmarks can run it in a thread.

    ``run(stop)`` returns the exit status: 0 after ``stop`` is set (also while it connects to Kafka), 3 if Kafka is
    unreachable at start.
    """

    def __init__(self, cfg: Config, on_swap: Callable[[ServedModel], None] | None = None, out: Any = None,
                 reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.reuse_port = reuse_port  # one of several worker processes on one port (SO_REUSEPORT)
        self.holder = ModelHolder()
        self.metrics = ServingMetrics(CollectorRegistry())
        self.on_swap = on_swap
        self.out = out if out is not None else sys.stdout
        self.api: ApiServer | None = None
        self.follower: CheckpointFollower | None = None
        self.ready = threading.Event()  # set once the HTTP server listens (tests read .api.url after it)

    def run(self, stop: threading.Event) -> int:
        """Serve until ``stop`` is set."""
        k, s = self.cfg.kafka, self.cfg.serving
        limits = HttpLimits(header_timeout_s=s.header_timeout_s, body_timeout_s=s.body_timeout_s,
                            keep_alive_s=s.keep_alive_s, write_timeout_s=s.write_timeout_s, backlog=s.backlog,
                            max_connections=s.max_connections)
        self.api = serve_api(self.holder, self.metrics, bind=s.bind, port=s.port, max_request_bytes=s.max_request_bytes,
                             max_items=s.max_items, waiting_for=f"topic {k.model_topic} at {k.bootstrap}",
                             limits=limits, batch_window_s=s.batch_window_ms / 1000, max_queued=s.max_queued,
                             reuse_port=self.reuse_port)
        url = self.api.url
        print(f"crossdistil serve: POST {url}/score, health at {url}/healthz, metrics at {url}/metrics",
              file=self.out, flush=True)
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
            # The shared [kafka] client settings (security, client_options) that a consumer accepts.
            options.update({key: v for key, v in kafka_client_options(k).items()
                            if key in KafkaConsumer.DEFAULT_CONFIG})
            options["group_id"], options["enable_auto_commit"] = None, False  # serving never joins the trainer's group
            try:
                consumer = call_unless_stopped(lambda: connect(k.bootstrap, options), stop.is_set,
                                               discard=lambda unused: unused.close(autocommit=False))
            except KafkaError as exc:
                failure = connection_failure(k.bootstrap, options, exc,
                                             hint=BOOTSTRAP_HINT)
                print(f"crossdistil serve: {failure}", file=sys.stderr)
                return 3
            if consumer is None:  # stopped while connecting (kafka-python's bootstrap takes up to 10 s to give up)
                return 0
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


def connect(bootstrap: str, options: dict[str, Any]) -> KafkaConsumer:
    """Serving's consumer of ``options``, after the preflight checks (a wrong listener or a refused SASL login is
    said at once, not after kafka-python's 10 s); ``KafkaError`` when Kafka cannot be reached."""
    preflight(bootstrap, options)
    return honour_auto_create(KafkaConsumer(**options))
