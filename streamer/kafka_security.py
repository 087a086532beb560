"""Kafka client security settings (TLS, SASL) for every client of the project, with the password from the environment.

A deployment names the protocol, the mechanism, the user and the CA file in its configuration (or as flags of
``crossdistil stream``); the password is read from an environment variable (``CROSSDISTIL_KAFKA_PASSWORD`` unless
configured otherwise) and never from a file of the repository or a command line, where ``ps`` would show it.
:func:`client_security` turns them into kafka-python client settings, the same for producers, consumers and
admin clients.

>>> options = client_security("SASL_PLAINTEXT", "PLAIN", "alice", env={"CROSSDISTIL_KAFKA_PASSWORD": "s3cret"})
>>> options["sasl_plain_username"], options["sasl_plain_password"]
('alice', 's3cret')
>>> client_security("PLAINTEXT")
{}
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_ENV = "CROSSDISTIL_KAFKA_PASSWORD"


class SecurityError(ValueError):
    """Security settings that cannot work (unknown protocol, SASL without a user or a password, ...)."""


def client_security(protocol: str = "PLAINTEXT", mechanism: str = "PLAIN", username: str = "", cafile: str = "",
                    password_env: str = PASSWORD_ENV, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """kafka-python settings for ``protocol`` (empty for PLAINTEXT); raises :class:`SecurityError` saying what
    is missing. ``cafile``: the PEM file of the CA that signed the brokers' certificates (empty: the system's)."""
    env = os.environ if env is None else env
    protocol = (protocol or "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise SecurityError(f"security protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    options: dict[str, Any] = {}
    if protocol == "PLAINTEXT":
        return options
    options["security_protocol"] = protocol
    if protocol in ("SSL", "SASL_SSL"):
        if cafile:
            if not os.path.isfile(cafile):
                raise SecurityError(f"the CA file {cafile} does not exist")
            options["ssl_cafile"] = cafile
        options["ssl_check_hostname"] = True
    if protocol.startswith("SASL"):
        mechanism = (mechanism or "PLAIN").upper()
        if mechanism not in MECHANISMS:
            raise SecurityError(f"SASL mechanism {mechanism!r} is not one of {', '.join(MECHANISMS)}")
        if not username:
            raise SecurityError(f"{protocol} needs a user name (sasl_username)")
        password = env.get(password_env)
        if not password:
            raise SecurityError(f"{protocol} needs the password in the environment variable {password_env} "
                                "(never in a configuration file)")
        options.update(sasl_mechanism=mechanism, sasl_plain_username=username, sasl_plain_password=password)
    return options


COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")


def add_client_arguments(parser: Any) -> None:
    """The Kafka client flags of the commands that take no configuration file (``stream``, ``backtest``)."""
    group = parser.add_argument_group("Kafka security (the SASL password comes from $" + PASSWORD_ENV + ")")
    group.add_argument("--security-protocol", default="PLAINTEXT", type=str.upper, choices=PROTOCOLS,
                       help="default: %(default)s")
    group.add_argument("--sasl-mechanism", default="PLAIN", type=str.upper, choices=MECHANISMS,
                       help="default: %(default)s")
    group.add_argument("--sasl-username", default="", metavar="NAME", help="SASL user name")
    group.add_argument("--ssl-cafile", default="", metavar="PEM",
                       help="CA certificate of the brokers (default: the system's)")


def client_options_from_args(args: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`client_security` of the flags of :func:`add_client_arguments`; raises :class:`SecurityError`."""
    return client_security(args.security_protocol, args.sasl_mechanism, args.sasl_username, args.ssl_cafile,
                           env=env)


def connection_failure(bootstrap: str, options: Mapping[str, Any], error: BaseException,
                       diagnosis: str | None = None) -> str:
    """The message of a client that could not bootstrap: what failed, why (``diagnosis``, by default
    :func:`diagnose_connection`'s), what to do."""
    if diagnosis is None:
        diagnosis = diagnose_connection(bootstrap, options)
    if diagnosis.startswith("nothing accepts"):
        diagnosis += " (start a local one with 'crossdistil kafka up')"
    return f"Kafka at {bootstrap} is not reachable ({type(error).__name__}): {diagnosis}"


def diagnose_connection(bootstrap: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> str:
    """Why a client with ``options`` could not bootstrap from ``bootstrap``, in one sentence that says what to change.

    kafka-python reports every failure the same way ("Unable to bootstrap"), and a broker that refuses a SASL login
    just closes the connection. This probes the first server with plain sockets: is anything listening, does the
    TLS handshake pass with the configured CA (or does a plaintext client face a TLS listener), and, when TLS is
    fine, the login is what failed.
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    protocol = str(options.get("security_protocol", "PLAINTEXT")).upper()
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError) as exc:
        return f"nothing accepts connections at {where} ({exc}): is Kafka up, and is this its address?"
    user = options.get("sasl_plain_username")
    login = (f"the broker refused the SASL {options.get('sasl_mechanism', 'PLAIN')} login of user {user!r}: check "
             f"the password (${PASSWORD_ENV}, or the variable kafka.password_env names) and the user name")
    with sock:
        if protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=options.get("ssl_cafile") or None)
            context.check_hostname = bool(options.get("ssl_check_hostname", True))
            try:
                with context.wrap_socket(sock, server_hostname=host):
                    pass
            except ssl.SSLCertVerificationError as exc:
                return (f"the TLS certificate of {where} is not trusted ({exc.verify_message}): point ssl_cafile at "
                        "the PEM of the CA that signed it")
            except (ssl.SSLError, OSError) as exc:
                return f"{where} did not complete a TLS handshake ({exc}): is it the {protocol} listener?"
            return login if protocol == "SASL_SSL" else f"TLS to {where} works, but Kafka did not answer over it"
        if _speaks_tls(sock, host):
            return (f"{where} is a TLS listener: set the security protocol to SSL or SASL_SSL "
                    "(kafka.security_protocol, or --security-protocol) and its CA file")
    return login if protocol == "SASL_PLAINTEXT" else f"Kafka did not answer at {where}: is it the {protocol} listener?"


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
