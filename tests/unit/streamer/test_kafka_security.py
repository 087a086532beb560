"""streamer.kafka_security without a broker: what check_login leaves alone and how a refused login reads.

The exchange itself (PLAIN and SCRAM-SHA-256, accepted and refused) runs against a real broker in
tests/integration/test_security_kafka.py.
"""

from __future__ import annotations

import socket
import threading

import pytest
from kafka.errors import KafkaError

from streamer.kafka_security import LoginRefused, SecurityError, check_login, client_security, connection_failure

ENV = {"CROSSDISTIL_KAFKA_PASSWORD": "s3cret"}


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that counts connections and closes each at once (it speaks no Kafka)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    thread.join(timeout=5)


def test_check_login_does_not_connect_without_sasl(listener) -> None:
    bootstrap, accepted = listener
    check_login(bootstrap, client_security("PLAINTEXT"))
    check_login(bootstrap, {"security_protocol": "SSL"})
    assert accepted == []


def test_check_login_leaves_what_it_cannot_judge_to_the_client(listener) -> None:
    bootstrap, accepted = listener
    options = client_security("SASL_PLAINTEXT", "SCRAM-SHA-256", "alice", env=ENV)
    check_login(bootstrap, options)  # a peer that hangs up: returns, the client will say what is wrong
    assert accepted == [1]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    check_login(f"127.0.0.1:{port}", options)  # nothing listening: returns too


def test_a_refused_login_is_a_kafka_error_and_reads_as_one_sentence() -> None:
    refused = LoginRefused("the broker refused the SASL PLAIN login of user 'alice' (Invalid password): check it")
    assert isinstance(refused, KafkaError)  # every client's `except KafkaError` reports it
    assert str(refused).startswith("the broker refused")  # without kafka-python's "[Error 58] ..." prefix
    # no second probe of the broker, and no hint to change the address it was reached at
    assert connection_failure("127.0.0.1:1", {}, refused, hint="check --to") == f"Kafka at 127.0.0.1:1: {refused}"


def test_sasl_without_a_password_names_the_variable() -> None:
    with pytest.raises(SecurityError, match="CROSSDISTIL_KAFKA_PASSWORD"):
        client_security("SASL_SSL", "PLAIN", "alice", env={})
