"""Peak memory of ``crossdistil inspect serving`` on a serving topic with many publications: the former reading (the
whole topic read into a list, then judged) and today's (judged as it is read: consumers.tools.inspect.Publications),
side by side in one run, each in a fresh process, alternating; prints one JSON object.

    python bench/inspect_memory.py [--bootstrap 127.0.0.1:9092] [--publications 100] [--payload-mib 1]
    python bench/inspect_memory.py --fetch-mib 1,4,16     # today's reading at each fetch size, side by side

Without ``--bootstrap`` it starts a local broker in a temporary folder. Per run: the tracemalloc peak (Python's
allocations: the records, chunks and judgements) and the process's peak RSS (ru_maxrss, which also holds the
interpreter, kafka-python, torch loaded by the safetensors check, and the allocator's slack).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def publish(bootstrap: str, topic: str, publications: int, payload_mib: float, chunk_kib: int) -> int:
    """``publications`` versions of a ``payload_mib`` model in ``chunk_kib`` chunks; the topic's bytes."""
    import torch
    from kafka import KafkaProducer

    from consumers.state.wire import encode_checkpoint
    from streamer.topics import MODEL_MAX_MESSAGE_BYTES, create_model_topic

    create_model_topic(bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 * 1024 * 1024, linger_ms=5)
    total = 0
    try:
        for version in range(1, publications + 1):
            weights = torch.randn(int(payload_mib * 2**20) // 4, generator=torch.Generator().manual_seed(version))
            for key, value in encode_checkpoint({"w": weights}, {"step": version, "tasks": ["click"]}, version=version,
                                                chunk_size=chunk_kib * 1024, max_message_bytes=MODEL_MAX_MESSAGE_BYTES):
                producer.send(topic, key=key, value=value, partition=0)
                total += len(value)
        producer.flush()
    finally:
        producer.close()
    return total


def former(bootstrap: str, topic: str) -> dict[str, Any]:
    """The reading before: every (offset, key, value) of the topic in a list, then judged (read_range's former body)."""
    from kafka import KafkaConsumer, TopicPartition

    from consumers.tools.inspect import MAX_MESSAGE_BYTES, publications
    from streamer.topics import honour_auto_create

    consumer = honour_auto_create(KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, allow_auto_create_topics=False,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES, fetch_max_bytes=4 * MAX_MESSAGE_BYTES))
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
        consumer.seek(tp, begin)
        records = []
        while consumer.position(tp) < end:
            for record in consumer.poll(timeout_ms=200).get(tp, []):
                if record.offset < end:
                    records.append((record.offset, record.key, record.value))
    finally:
        consumer.close(autocommit=False)
    found = publications(records)
    return {"records": len(records), "publications": len(found), "complete": sum(p["complete"] for p in found)}


def consumers_fetch_mib() -> float:
    from consumers.tools.inspect import FETCH_BYTES

    return FETCH_BYTES / 2**20


def today(bootstrap: str, topic: str) -> dict[str, Any]:
    """The command as a user runs it (``--json``, its default ``--newest``)."""
    from consumers.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["inspect", "serving", "--bootstrap", bootstrap, "--topic", topic, "--json"])
    report = json.loads(out.getvalue())
    assert status == 0, report
    return {"records": report["records"], "publications": report["publications_seen"],
            "complete": sum(p["complete"] for p in report["publications"]), "listed": len(report["publications"])}


def measure(mode: str, bootstrap: str, topic: str) -> dict[str, Any]:
    """One reading in this process: what it found, its tracemalloc peak and the process's peak RSS."""
    # Imports are not the reading's memory: the Kafka client, and torch (the check of a payload's safetensors).
    import kafka  # noqa: F401
    import safetensors.torch  # noqa: F401

    import consumers.cli  # noqa: F401
    import consumers.tools.inspect  # noqa: F401

    started = time.perf_counter()
    tracemalloc.start()
    if mode.startswith("today@"):  # today's reading with fetches of another size (MiB)
        consumers.tools.inspect.FETCH_BYTES = int(float(mode.split("@")[1]) * 2**20)
    found = (former if mode == "former" else today)(bootstrap, topic)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"mode": mode, **found, "tracemalloc_peak_mib": round(peak / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--publications", type=int, default=100)
    parser.add_argument("--payload-mib", type=float, default=1.0)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="readings of each kind, alternating")
    parser.add_argument("--fetch-mib", default="",
                        help="also today's reading with fetches of these sizes (MiB, comma-separated; the command's "
                             "own: consumers.tools.inspect.FETCH_BYTES)")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "BOOTSTRAP", "TOPIC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    modes = ["former", "today"] + [f"today@{size}" for size in args.fetch_mib.split(",") if size]
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as workdir:
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            from consumers.runtime.local_kafka import LocalKafka, free_port

            broker = LocalKafka(port=free_port(), data_dir=Path(workdir) / "kafka")
            broker.start(timeout_s=180)
            bootstrap = broker.bootstrap
        try:
            topic = f"bench-inspect-{uuid.uuid4().hex[:8]}"
            topic_bytes = publish(bootstrap, topic, args.publications, args.payload_mib, args.chunk_kib)
            runs = []
            for _ in range(args.rounds):
                for mode in modes:
                    done = subprocess.run([sys.executable, __file__, "--measure", mode, bootstrap, topic], check=True,
                                          capture_output=True, text=True, cwd=REPO_ROOT,
                                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        finally:
            if broker is not None:
                broker.stop()

    def worst(mode: str, key: str) -> float:
        return max(r[key] for r in runs if r["mode"] == mode)

    def median_seconds(mode: str) -> float:
        return statistics.median(r["seconds"] for r in runs if r["mode"] == mode)

    print(json.dumps({
        "publications": args.publications, "payload_mib": args.payload_mib, "chunk_kib": args.chunk_kib,
        "topic_mib": round(topic_bytes / 2**20, 1), "cores": os.cpu_count(), "runs": runs,
        "fetch_mib": {"today": consumers_fetch_mib()},
        "tracemalloc_peak_mib": {m: worst(m, "tracemalloc_peak_mib") for m in modes},
        "peak_rss_mib": {m: worst(m, "peak_rss_mib") for m in modes},
        "median_seconds": {m: median_seconds(m) for m in modes},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
