"""Before a command's first Kafka client: is the broker's listener the one the client's security settings
(``streamer.kafka_settings``) expect, and does it accept the SASL login (:func:`preflight`); and when a client could
not bootstrap, why, in one sentence (:func:`connection_failure`, :func:`diagnose_connection`).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Mapping
from typing import Any

from kafka.errors import KafkaConnectionError, KafkaError, SaslAuthenticationFailedError
from kafka.net.sasl import get_sasl_mechanism  # kafka-python's PLAIN and SCRAM token exchanges

from streamer.kafka_settings import PASSWORD_ENV


def connection_failure(bootstrap: str, options: Mapping[str, Any], error: BaseException,
                       diagnosis: str | None = None, hint: str = "") -> str:
    """The message of a client that could not bootstrap: what failed, why (``diagnosis``, by default
    :func:`diagnose_connection`'s), what to do (``hint``: where the command takes another address, appended unless
    the broker was reached and refused the login)."""
    if isinstance(error, PreflightError):  # preflight's answer is the diagnosis (no second probe), the address fine
        return f"Kafka at {bootstrap}: {error}"
    if diagnosis is None:
        diagnosis = diagnose_connection(bootstrap, options)
    if diagnosis.startswith("nothing accepts"):
        diagnosis += " (start a local one with 'crossdistil kafka up')"
    message = f"Kafka at {bootstrap} is not reachable ({type(error).__name__}): {diagnosis}"
    return f"{message}; {hint}" if hint else message


def diagnose_connection(bootstrap: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> str:
    """Why a client with ``options`` could not bootstrap from ``bootstrap``, in one sentence that says what to change.

    kafka-python reports every failure the same way ("Unable to bootstrap"), and a broker that refuses a SASL login
    just closes the connection. This probes the first server with plain sockets: is anything listening, does the
    TLS handshake pass with the configured CA (or does a plaintext client face a TLS listener), and, when TLS is
    fine, the login is what failed.
    """
    host, port = _first_server(bootstrap)
    protocol = str(options.get("security_protocol", "PLAINTEXT")).upper()
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError) as exc:
        return f"nothing accepts connections at {where} ({exc}): is Kafka up, and is this its address?"
    login = _refused_login(options)
    with sock:
        if protocol in ("SSL", "SASL_SSL"):
            try:
                with _tls_context(options).wrap_socket(sock, server_hostname=host):
                    pass
            except ssl.SSLCertVerificationError as exc:
                return (f"the TLS certificate of {where} is not trusted ({exc.verify_message}): point ssl_cafile at "
                        "the PEM of the CA that signed it")
            except (ssl.SSLError, OSError) as exc:
                return f"{where} did not complete a TLS handshake ({exc}): is it the {protocol} listener?"
            return login if protocol == "SASL_SSL" else f"TLS to {where} works, but Kafka did not answer over it"
        if _speaks_tls(sock, host):
            return _tls_listener(where)
    return login if protocol == "SASL_PLAINTEXT" else f"Kafka did not answer at {where}: is it the {protocol} listener?"


class PreflightError(KafkaError):
    """:func:`preflight`: the broker was reached and showed what is wrong (a kafka-python ``KafkaError``, so a
    client's ``except KafkaError`` branch reports it as it reports a failed bootstrap); ``str()`` is the sentence."""

    def __str__(self) -> str:  # the sentence alone (kafka-python's errors prefix their code and class)
        return str(self.args[0]) if self.args else ""


class LoginRefused(PreflightError, SaslAuthenticationFailedError):
    """:func:`check_login`: the broker answered the SASL exchange with an error."""


class WrongListener(PreflightError, KafkaConnectionError):
    """:func:`check_listener`: the listener speaks TLS to a plaintext client, or plaintext Kafka to a TLS one."""


def preflight(bootstrap: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> None:
    """Before a command's first Kafka client: :func:`check_listener`, then :func:`check_login` (each raises its
    ``PreflightError`` when it is sure, and returns otherwise)."""
    check_listener(bootstrap, options, timeout_s)
    check_login(bootstrap, options, timeout_s)


_API_VERSIONS = 18  # version 0: an empty body, answered by every Kafka broker (also Kafka 4.x)


def check_listener(bootstrap: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> None:
    """Raise :class:`WrongListener` when the first bootstrap server's listener does not speak the protocol of
    ``options``: a plaintext client (PLAINTEXT, SASL_PLAINTEXT) at a server that gives no Kafka answer in plaintext
    and completes a TLS handshake, or a TLS client (SSL, SASL_SSL) at one whose TLS handshake fails and that gives a
    Kafka answer in plaintext. Return otherwise, also when it cannot tell (nothing listening, a certificate that
    is not trusted: the client and :func:`diagnose_connection` say those).

    kafka-python retries either mismatch until its bootstrap timeout (10 s here) and then reports "Unable to
    bootstrap". A plaintext client's check sends a Kafka request first (ApiVersions), so a plaintext listener sees
    only what a client sends it; TLS bytes go only to a server that did not answer it.
    """
    protocol = str(options.get("security_protocol", "PLAINTEXT")).upper()
    host, port = _first_server(bootstrap)
    where = f"{host}:{port}"
    try:
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            if _answers_kafka(host, port, timeout_s) is not False:
                return  # a Kafka answer, or none in time (a broker still starting: a TLS one hangs up at once)
            with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
                if _speaks_tls(sock, host):
                    raise WrongListener(_tls_listener(where))
            return
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            try:
                with _tls_context(options).wrap_socket(sock, server_hostname=host):
                    return
            except ssl.SSLCertVerificationError:
                return  # TLS it is: a certificate the client will not trust either (it says so)
            except (ssl.SSLError, OSError):
                pass
        if _answers_kafka(host, port, timeout_s) is True:
            raise WrongListener(f"{where} is a plaintext listener, not TLS: set the security protocol to PLAINTEXT or "
                                "SASL_PLAINTEXT (kafka.security_protocol, or --security-protocol), or use the "
                                "broker's TLS listener")
    except (OSError, ValueError):
        return


def _answers_kafka(host: str, port: str, timeout_s: float) -> bool | None:
    """Whether the server answers a Kafka ApiVersions request in plaintext (None: no answer within ``timeout_s``)."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            _request(sock, _API_VERSIONS, 0, b"")
            return True
    except TimeoutError:
        return None
    except (OSError, ValueError, struct.error):
        return False


_SASL_HANDSHAKE, _SASL_AUTHENTICATE = 17, 36  # Kafka API keys; version 1 of each (both kept by Kafka 4.x)


def check_login(bootstrap: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> None:
    """Raise :class:`LoginRefused`, saying which user and what to check, when the first bootstrap server refuses
    the SASL login of ``options`` (kafka-python client settings); return otherwise, also when it cannot tell.

    kafka-python 3.0.12 treats a refused login like a broker that is away: it retries until its bootstrap timeout
    (10 s here) and then reports "Unable to bootstrap". This exchange (SaslHandshake, then SaslAuthenticate with
    kafka-python's own mechanism for the tokens: PLAIN or SCRAM) takes one connection and a fraction of a second
    (0.04-0.35 s against the local TLS broker, a refusal the slowest: the broker delays it), so a wrong
    password ends a command at once with the broker's reason. Anything else that goes wrong here (nothing
    listening, TLS, an unexpected answer) is left to the client and :func:`diagnose_connection`.
    """
    protocol = str(options.get("security_protocol", "PLAINTEXT")).upper()
    if not protocol.startswith("SASL"):
        return
    host, port = _first_server(bootstrap)
    name = str(options.get("sasl_mechanism", "PLAIN")).upper()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            sock = _tls_context(options).wrap_socket(raw, server_hostname=host) if protocol == "SASL_SSL" else raw
            with sock:
                answer = _request(sock, _SASL_HANDSHAKE, 1, _string(name))
                if struct.unpack_from(">h", answer)[0] != 0:
                    return  # e.g. the mechanism is not enabled: the client says so
                mechanism = get_sasl_mechanism(name)(host=host, **{**options, "sasl_mechanism": name})
                correlation = 2
                while not mechanism.is_done():
                    token = mechanism.auth_bytes()
                    answer = _request(sock, _SASL_AUTHENTICATE, 1, struct.pack(">i", len(token)) + token,
                                      correlation)
                    correlation += 1
                    code = struct.unpack_from(">h", answer)[0]
                    reason, offset = _read_string(answer, 2)  # SaslAuthenticate v1: error code, message, bytes
                    if code != 0:
                        raise LoginRefused(_refused_login(options, reason or f"error {code}"))
                    (size,) = struct.unpack_from(">i", answer, offset)
                    mechanism.receive(answer[offset + 4:offset + 4 + max(size, 0)])
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        # ssl.SSLError and timeouts are OSErrors; a short or odd answer (also a SCRAM message the mechanism cannot
        # parse) a struct.error, ValueError or KeyError
        return


def _request(sock: socket.socket, api_key: int, version: int, body: bytes, correlation: int = 1) -> bytes:
    """One request (header v1: key, version, correlation id, client id) and its answer's body past the correlation
    id."""
    header = struct.pack(">hhi", api_key, version, correlation) + _string("crossdistil-login-check")
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    (size,) = struct.unpack(">i", _read_exactly(sock, 4))
    answer = _read_exactly(sock, size)
    if struct.unpack_from(">i", answer)[0] != correlation:
        raise ValueError("an answer to another request")
    return answer[4:]


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            raise ValueError("the broker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _read_string(data: bytes, offset: int) -> tuple[str | None, int]:
    """A nullable string at ``offset`` and the offset past it."""
    (size,) = struct.unpack_from(">h", data, offset)
    if size < 0:
        return None, offset + 2
    return data[offset + 2:offset + 2 + size].decode(errors="replace"), offset + 2 + size


def _first_server(bootstrap: str) -> tuple[str, str]:
    """(host, port) of the first server of a bootstrap list (``[::1]:9092`` without its brackets)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", port


def _tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context a kafka-python client with ``options`` uses: their CA file (or the system's), host names
    checked unless ``ssl_check_hostname`` is false."""
    context = ssl.create_default_context(cafile=options.get("ssl_cafile") or None)
    context.check_hostname = bool(options.get("ssl_check_hostname", True))
    return context


def _refused_login(options: Mapping[str, Any], reason: str | None = None) -> str:
    """The sentence for a refused SASL login of ``options``' user (with the broker's ``reason`` when it gave one)."""
    mechanism = str(options.get("sasl_mechanism", "PLAIN")).upper()
    because = f" ({reason})" if reason else ""
    return (f"the broker refused the SASL {mechanism} login of user {options.get('sasl_plain_username')!r}{because}: "
            f"check the password (${PASSWORD_ENV}, or the variable kafka.password_env names) and the user name")


def _tls_listener(where: str) -> str:
    """The sentence for a plaintext client at the TLS listener ``where`` (check_listener, diagnose_connection)."""
    return (f"{where} is a TLS listener: set the security protocol to SSL or SASL_SSL (kafka.security_protocol, or "
            "--security-protocol) and its CA file")


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the server completes a TLS handshake (any certificate: this only tells TLS from plaintext)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False
