"""Kafka throughput with kafka-python: one event per message versus batch envelopes of many events.

For each mode the benchmark encodes the same synthetic events with :mod:`streamer.events`, produces them to a
fresh topic (keyed by user id, as the streamer does), then reads the topic from the beginning with a plain
consumer and decodes every message with ``decode_events``. It reports events/s and MB/s of payload for:

* ``encode``: ``encode`` / ``encode_batch`` alone (no Kafka),
* ``decode``: ``decode_events`` alone (no Kafka),
* ``produce``: ``send`` + ``flush`` of the already-encoded messages (a streamer's Kafka side; with encoding
  it sustains about ``1 / (1/encode + 1/produce)``),
* ``consume_decode``: ``poll`` + ``decode_events`` until every event is back (what a trainer's intake sustains).

Without ``--bootstrap`` it starts its own broker (LocalKafka on a free port, in a temporary directory) and stops
it afterwards. It prints one JSON object on stdout; progress goes to stderr.

kafka-python checksums every record batch with CRC-32C, on produce and (``check_crcs``) on fetch. Without the
optional ``crc32c`` package it does so in pure Python, at roughly 2 MB/s, which then bounds both Kafka stages;
``environment.crc32c`` says which implementation ran.

    python bench/kafka_throughput.py                       # own broker, defaults: ~20 s on a laptop
    python bench/kafka_throughput.py --bootstrap 127.0.0.1:9092 --events 200000 --batch-size 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO_ROOT))

MB = 1_000_000


def synthetic_events(count: int, users: int, items: int, features: int, feedback_ratio: float, seed: int) -> list[dict]:
    """``count`` contract-valid events: impressions, each followed by feedback with probability ``feedback_ratio``."""
    rng = random.Random(seed)
    events: list[dict] = []
    ts_ms = 1_700_000_000_000
    n = 0
    while len(events) < count:
        ts_ms += rng.randint(1, 50)
        impression_id = f"imp-{n}"
        n += 1
        feature_values: dict[str, Any] = {}
        for j in range(features):
            # A realistic mix of categorical strings, ints and floats.
            feature_values[f"f{j}"] = (f"c{rng.randint(0, 999)}", rng.randint(0, 10_000), rng.random())[j % 3]
        events.append({
            "v": 1, "impression_id": impression_id, "ts_ms": ts_ms,
            "user_id": f"u{rng.randint(0, users - 1)}", "item_id": f"i{rng.randint(0, items - 1)}",
            "features": feature_values,
        })
        if len(events) < count and rng.random() < feedback_ratio:
            events.append({"v": 1, "impression_id": impression_id, "ts_ms": ts_ms + rng.randint(100, 5000),
                           "task": "click", "value": 1})
    return events


def encode_messages(events: Sequence[dict], batch_size: int) -> list[tuple[bytes, bytes]]:
    """(key, value) messages: one per event when ``batch_size`` is 1, else batch envelopes of ``batch_size``."""
    from streamer.events import encode, encode_batch

    def key_of(event: dict) -> bytes:
        # Feedback carries no user id; a real streamer keys it by its impression's user. Here the impression id
        # stands in: the partition spread is what matters for throughput.
        return str(event.get("user_id") or event["impression_id"]).encode()

    if batch_size <= 1:
        return [(key_of(e), encode(e)) for e in events]
    return [(key_of(events[i]), encode_batch(events[i:i + batch_size])) for i in range(0, len(events), batch_size)]


def rate(events: int, payload_bytes: int, seconds: float, messages: int) -> dict[str, float]:
    """Throughput figures for one measurement."""
    seconds = max(seconds, 1e-9)
    return {
        "seconds": round(seconds, 4),
        "events_per_s": round(events / seconds, 1),
        "messages_per_s": round(messages / seconds, 1),
        "mb_per_s": round(payload_bytes / MB / seconds, 3),
    }


def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]], producer_config: dict) -> float:
    """Send every message and flush; the seconds it took."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, **producer_config)
    try:
        producer.partitions_for(topic)  # metadata up front, so the clock measures sending only
        start = time.perf_counter()
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=300)
        return time.perf_counter() - start
    finally:
        producer.close()


def consume_and_decode(bootstrap: str, topic: str, messages: int, timeout_s: float) -> tuple[float, int, int]:
    """Read ``messages`` messages from the start of ``topic`` and decode them: (seconds, good events, bad events)."""
    from kafka import KafkaConsumer, TopicPartition

    from streamer.events import EventError, decode_events

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        seen = good = bad = 0
        start = time.perf_counter()
        deadline = start + timeout_s
        while seen < messages:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"consumed {seen} of {messages} messages from {topic} within {timeout_s} s")
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                for record in records:
                    seen += 1
                    for event in decode_events(record.value):
                        if isinstance(event, EventError):
                            bad += 1
                        else:
                            good += 1
        return time.perf_counter() - start, good, bad
    finally:
        consumer.close()


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """A fresh topic with ``partitions`` partitions, ready for use."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": 1}})
        admin.wait_for_topics([topic], timeout_ms=30_000)
    finally:
        admin.close()


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Remove the benchmark's topics from a broker that is not ours."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics(list(topics))
    finally:
        admin.close()


def measure_mode(bootstrap: str, events: Sequence[dict], batch_size: int, args: argparse.Namespace,
                 producer_config: dict, topics: list[str]) -> dict[str, Any]:
    """Encode, decode, produce and consume-plus-decode ``events`` with messages of ``batch_size`` events."""
    from streamer.events import decode_events

    start = time.perf_counter()
    messages = encode_messages(events, batch_size)
    encode_s = time.perf_counter() - start
    payload = sum(len(value) for _, value in messages)
    start = time.perf_counter()
    decoded = sum(len(decode_events(value)) for _, value in messages)
    decode_s = time.perf_counter() - start
    assert decoded == len(events), (decoded, len(events))

    topic = f"bench-{batch_size}-{uuid.uuid4().hex[:8]}"
    topics.append(topic)
    create_topic(bootstrap, topic, args.partitions)
    produce_s = produce(bootstrap, topic, messages, producer_config)
    consume_s, good, bad = consume_and_decode(bootstrap, topic, len(messages), args.timeout)
    if good != len(events) or bad:
        raise RuntimeError(f"batch size {batch_size}: decoded {good} good and {bad} bad events, expected "
                           f"{len(events)} good")
    return {
        "events_per_message": batch_size,
        "messages": len(messages),
        "payload_bytes": payload,
        "bytes_per_event": round(payload / len(events), 1),
        "encode": rate(len(events), payload, encode_s, len(messages)),
        "decode": rate(len(events), payload, decode_s, len(messages)),
        "produce": rate(len(events), payload, produce_s, len(messages)),
        "consume_decode": rate(len(events), payload, consume_s, len(messages)),
    }


@contextmanager
def broker(bootstrap: str | None, timeout_s: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """The given broker, or a fresh LocalKafka on a free port that is stopped and deleted afterwards."""
    if bootstrap:
        yield bootstrap, {"kind": "external"}
        return
    from consumers.runtime.local_kafka import LocalKafka, free_port

    with tempfile.TemporaryDirectory(prefix="crossdistil-bench-kafka-") as data_dir:
        local = LocalKafka(port=free_port(), data_dir=data_dir)
        print(f"starting a local broker at {local.bootstrap} ...", file=sys.stderr)
        start = time.perf_counter()
        local.start(timeout_s=timeout_s)
        info = {"kind": "own LocalKafka", "startup_s": round(time.perf_counter() - start, 2)}
        try:
            yield local.bootstrap, info
        finally:
            local.stop()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start a LocalKafka on a free port)")
    parser.add_argument("--events", type=int, default=20_000, help="events per mode (default 20000)")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch envelope (default 100)")
    parser.add_argument("--features", type=int, default=8, help="features per impression (default 8)")
    parser.add_argument("--feedback-ratio", type=float, default=0.5,
                        help="feedback events per impression (default 0.5)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each benchmark topic (default 4)")
    parser.add_argument("--acks", default="1", help="producer acks: 0, 1 or all (default 1)")
    parser.add_argument("--linger-ms", type=int, default=5, help="producer linger.ms (default 5)")
    parser.add_argument("--compression", default=None,
                        help="producer compression: gzip, lz4, zstd, snappy (default none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds allowed for broker start and each consume")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one JSON object."""
    args = parse_args(argv)
    import kafka
    import kafka.record.util as record_util

    events = synthetic_events(args.events, users=1000, items=5000, features=args.features,
                              feedback_ratio=args.feedback_ratio, seed=args.seed)
    producer_config = {
        "acks": args.acks if args.acks == "all" else int(args.acks),
        "linger_ms": args.linger_ms,
        "batch_size": 256 * 1024,
        "max_request_size": 16 * 1024 * 1024,
        "compression_type": args.compression,
    }
    topics: list[str] = []
    with broker(args.bootstrap, args.timeout) as (bootstrap, broker_info):
        try:
            # Warm-up: the broker's JIT and the client's connections, so the first mode is not charged for them.
            measure_mode(bootstrap, events[:1000], 1, args, producer_config, topics)
            modes = {}
            for name, batch_size in (("single", 1), ("batch", args.batch_size)):
                print(f"measuring {name} ({batch_size} event(s) per message) ...", file=sys.stderr)
                modes[name] = measure_mode(bootstrap, events, batch_size, args, producer_config, topics)
        finally:
            if broker_info["kind"] == "external" and topics:
                delete_topics(bootstrap, topics)

    single, batch = modes["single"], modes["batch"]
    report = {
        "benchmark": "kafka_throughput",
        "bootstrap": bootstrap,
        "broker": broker_info,
        "events": len(events),
        "features_per_impression": args.features,
        "feedback_ratio": args.feedback_ratio,
        "partitions": args.partitions,
        "producer": {k: v for k, v in producer_config.items()},
        "modes": modes,
        "batch_speedup": {
            stage: round(batch[stage]["events_per_s"] / single[stage]["events_per_s"], 2)
            for stage in ("encode", "decode", "produce", "consume_decode")
        },
        "environment": {
            "python": platform.python_version(),
            "kafka_python": kafka.__version__,
            # kafka-python picks the C crc32c package when importable, else its pure-Python fallback.
            "crc32c": "c (crc32c package)" if getattr(record_util, "crc32c_c", None) else "pure python",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
