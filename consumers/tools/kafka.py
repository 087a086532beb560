"""``crossdistil kafka up|down|status``: a local single-node Kafka broker (``consumers.runtime.local_kafka``)
with the project's topics (``streamer.topics``)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from consumers.runtime.local_kafka import DEFAULT_PORT, LocalKafka, LocalKafkaError, default_data_dir
from streamer.kafka_settings import PASSWORD_ENV, SecurityError

# streamer.topics.DEFAULT_PARTITIONS, for the help: importing it loads kafka-python, which building the parser
# (crossdistil --help) does not need; tests/unit/consumers/tools/test_kafka_cli.py checks that they agree.
DEFAULT_PARTITIONS_SHOWN = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crossdistil kafka``."""
    parser.add_argument("action", choices=("up", "down", "status"), help="start, stop, or report on the local broker")
    parser.add_argument("--port", type=int, default=None,
                        help=f"client port (default: the data dir's last port, else {DEFAULT_PORT})")
    parser.add_argument("--data-dir", default=None,
                        help=f"broker state, logs and pid file (default: {default_data_dir()})")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions of the impressions, feedback and dead-letters topics (up only; default: "
                             f"{DEFAULT_PARTITIONS_SHOWN})")
    parser.add_argument("--no-topics", action="store_true", help="do not create the default topics (up only)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for the broker to start or stop (default: %(default)g)")
    parser.add_argument("--delete-data", action="store_true", help="after stopping, delete the data dir (down only)")
    parser.add_argument("--sasl-ssl-port", type=int, default=None, metavar="PORT",
                        help="up: also listen with TLS and SASL on PORT (certificates made in the data dir): "
                             "PLAIN, and SCRAM-SHA-256/512 with the password a new data dir is formatted with")
    parser.add_argument("--sasl-user", default="", metavar="NAME",
                        help=f"up: the SASL user of that listener; its password is read from ${PASSWORD_ENV}")


def run(args: argparse.Namespace) -> int:
    """``crossdistil kafka up|down|status``."""
    # lazy: kafka-python's admin client, which building the parser (crossdistil --help) does not need
    from streamer.topics import DEFAULT_PARTITIONS, TopicError, ensure_topics

    try:
        broker = LocalKafka(port=args.port, data_dir=args.data_dir, **_secure_listener(args))
        if args.action == "status":
            status = broker.status()
            print(status.describe() if status.running else _not_running(status.data_dir, args))
            return 0 if status.running else 3
        if args.action == "down":
            stopped = broker.stop(timeout_s=args.timeout)
            print(f"Kafka at {broker.bootstrap} stopped" if stopped
                  else f"Kafka was not running (data dir {broker.data_dir})")
            if args.delete_data and broker.data_dir.exists():
                shutil.rmtree(broker.data_dir)
                print(f"deleted {broker.data_dir}")
            return 0
        if not broker.status().running:
            print(f"starting Kafka at {broker.bootstrap} (data dir {broker.data_dir}) ...", file=sys.stderr)
        started = broker.start(timeout_s=args.timeout)
        status = broker.status()
        print(status.describe() if started else f"already running: {status.describe()}")
        if broker.sasl_ssl_port is not None:
            print(f"SASL_SSL listener at {broker.secure_bootstrap} (user {args.sasl_user!r}); clients trust "
                  f"{broker.ca_file} (ssl_cafile)")
        if not args.no_topics:
            partitions = DEFAULT_PARTITIONS if args.partitions is None else args.partitions
            topics = ensure_topics(broker.bootstrap, partitions=partitions)
            print("topics: " + ", ".join(f"{name} ({state})" for name, state in topics.items()))
        return 0
    except (LocalKafkaError, TopicError, SecurityError) as exc:
        print(f"crossdistil kafka {args.action}: {exc}", file=sys.stderr)
        return 1


def _not_running(data_dir: str, args: argparse.Namespace) -> str:
    """What ``status`` says of a broker that is not running: the command that starts it names the same broker (the
    ``--data-dir`` and ``--port`` given, so the suggestion does not start the default one instead)."""
    up = ["crossdistil", "kafka", "up"]
    if args.data_dir is not None:
        up += ["--data-dir", args.data_dir]
    if args.port is not None:
        up += ["--port", str(args.port)]
    return f"Kafka is not running (data dir {data_dir}); start it with: {shlex.join(up)}"


def _secure_listener(args: argparse.Namespace) -> dict:
    """``LocalKafka`` arguments of ``--sasl-ssl-port`` / ``--sasl-user`` (the password from the environment)."""
    if args.sasl_ssl_port is None:
        return {}
    if args.action != "up":
        raise SecurityError("--sasl-ssl-port applies to 'up'")
    password = os.environ.get(PASSWORD_ENV, "")
    if not args.sasl_user or not password:
        raise SecurityError(f"--sasl-ssl-port needs --sasl-user NAME and the password in ${PASSWORD_ENV}")
    return {"sasl_ssl_port": args.sasl_ssl_port, "users": {args.sasl_user: password}}
