"""streamer.kafka_security without a broker: what check_login and check_listener leave alone, what a plaintext
Kafka answer tells a TLS client, and how a refused login or a wrong listener reads.

The exchanges themselves (PLAIN and SCRAM, accepted and refused; a plaintext client at the TLS listener and a TLS
client at the plaintext one) run against a real broker in tests/integration/test_security_kafka.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest
from kafka.errors import KafkaError

from streamer.kafka_security import LoginRefused, WrongListener, check_listener, check_login, connection_failure
from streamer.kafka_settings import SecurityError, client_security

ENV = {"CROSSDISTIL_KAFKA_PASSWORD": "s3cret"}


@contextlib.contextmanager
def tcp_server(on_connection):
    """A TCP server on 127.0.0.1 that hands each accepted connection to ``on_connection`` (in its accept thread);
    yields its ``host:port``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            on_connection(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (a close alone leaves it blocked in accept)
        server.close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def listener():
    """A TCP server that counts connections and closes each at once (it speaks no Kafka)."""
    accepted: list[int] = []

    def hang_up(conn: socket.socket) -> None:
        accepted.append(1)
        conn.close()

    with tcp_server(hang_up) as bootstrap:
        yield bootstrap, accepted


@pytest.fixture
def plaintext_kafka():
    """A TCP server that answers each request with a Kafka response frame (its correlation id and two zero bytes),
    as a plaintext listener answers ApiVersions; it counts the requests."""
    requests: list[int] = []

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                (size,) = struct.unpack(">i", conn.recv(4, socket.MSG_WAITALL))
                if not 0 < size <= 1 << 20:
                    return  # a TLS hello read as a size: Kafka hangs up on it too
                request = conn.recv(size, socket.MSG_WAITALL)
                (api_key,) = struct.unpack_from(">h", request)
                requests.append(api_key)
                conn.sendall(struct.pack(">i", 6) + request[4:8] + b"\0\0")
            except (OSError, struct.error):
                return  # a TLS hello or a hang-up

    with tcp_server(lambda conn: threading.Thread(target=answer, args=(conn,), daemon=True).start()) as bootstrap:
        yield bootstrap, requests


def test_a_tls_client_at_a_plaintext_kafka_listener_is_told_so_at_once(plaintext_kafka) -> None:
    bootstrap, requests = plaintext_kafka
    for options in ({"security_protocol": "SSL"}, client_security("SASL_SSL", "PLAIN", "alice", env=ENV)):
        with pytest.raises(WrongListener, match="is a plaintext listener, not TLS: set the security protocol"):
            check_listener(bootstrap, options)
    check_listener(bootstrap, {})  # a plaintext client: the answer is all it needs
    check_listener(bootstrap, client_security("SASL_PLAINTEXT", "PLAIN", "alice", env=ENV))
    assert requests == [18] * 4  # ApiVersions, once per check


def test_check_listener_leaves_what_it_cannot_judge_to_the_client(listener) -> None:
    bootstrap, accepted = listener
    for options in ({}, {"security_protocol": "SSL"}):
        check_listener(bootstrap, options)  # a peer that hangs up on Kafka and on TLS: neither, the client says
    assert len(accepted) == 4  # a plaintext client: a request, then a TLS hello; a TLS client: a hello, a request
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    check_listener(f"127.0.0.1:{port}", {})  # nothing listening: returns too


def test_a_wrong_listener_is_a_kafka_error_and_reads_as_one_sentence() -> None:
    wrong = WrongListener("127.0.0.1:1 is a TLS listener: set the security protocol to SSL or SASL_SSL")
    assert isinstance(wrong, KafkaError) and str(wrong).startswith("127.0.0.1:1 is a TLS listener")
    assert connection_failure("127.0.0.1:1", {}, wrong, hint="check --to") == f"Kafka at 127.0.0.1:1: {wrong}"


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


def test_a_server_that_does_not_answer_in_time_gets_no_tls_hello() -> None:
    """A broker still starting (it accepts, it does not answer yet) is not probed with TLS: a TLS listener would
    have hung up on the plaintext request at once."""
    held: list[socket.socket] = []  # kept open, never answered
    try:
        with tcp_server(held.append) as bootstrap:
            check_listener(bootstrap, {}, timeout_s=0.3)
            assert len(held) == 1  # the ApiVersions request only
    finally:
        for conn in held:
            conn.close()
