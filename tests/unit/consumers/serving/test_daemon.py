"""``crossdistil serve``'s daemon without a broker: a stop while it connects to Kafka ends it at once."""

from __future__ import annotations

import io
import threading
import time

import pytest
from kafka.errors import KafkaTimeoutError

from consumers.runtime.config import load_config
from consumers.serving.daemon import ServingDaemon

pytestmark = pytest.mark.unit


def test_a_stop_while_connecting_to_kafka_ends_serving_at_once_with_status_0(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_preflight(_bootstrap, _options):  # kafka-python's bootstrap gives up after 10 s
        time.sleep(3)
        raise KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9")

    monkeypatch.setattr("consumers.serving.daemon.preflight", slow_preflight)
    cfg = load_config(None, env={}, overrides=["kafka.bootstrap='127.0.0.1:9'", "serving.port=0"])
    daemon, stop, status = ServingDaemon(cfg, out=io.StringIO()), threading.Event(), []
    thread = threading.Thread(target=lambda: status.append(daemon.run(stop)))
    thread.start()
    assert daemon.ready.wait(30)
    time.sleep(0.2)  # into the connection
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and status == [0]
