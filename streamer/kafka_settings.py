"""Kafka client security settings (TLS, SASL) for every client of the project, with the password from the environment.

A deployment names the protocol, the mechanism, the user and the CA file in its configuration (or as flags of
``crossdistil stream``); the password is read from an environment variable (``CROSSDISTIL_KAFKA_PASSWORD`` unless
configured otherwise) and never from a file of the repository or a command line, where ``ps`` would show it.
:func:`client_security` turns them into kafka-python client settings, the same for producers, consumers and
admin clients. This module does not import kafka-python, so the commands' flags and the configuration load
without it (``crossdistil --help``); what talks to a broker before a client does is ``streamer.kafka_security``.

>>> options = client_security("SASL_PLAINTEXT", "PLAIN", "alice", env={"CROSSDISTIL_KAFKA_PASSWORD": "s3cret"})
>>> options["sasl_plain_username"], options["sasl_plain_password"]
('alice', 's3cret')
>>> client_security("PLAINTEXT")
{}
"""

from __future__ import annotations

import os
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
