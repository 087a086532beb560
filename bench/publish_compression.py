"""What ``kafka.compression`` does to a publication: bytes on the broker and seconds to produce and to read back a
trained default model's checkpoint, per codec, side by side in one run; prints one JSON object.

    python bench/publish_compression.py                       # own broker, none vs lz4 vs zstd, 3 rounds
    python bench/publish_compression.py --codecs none,lz4,gzip --rounds 5 --train-rows 100000

The model is the product's default (`mtl`, default options, 2**20 hash buckets) on KuaiRand-Pure's features
(``mappings/kuairand_pure.toml``), trained on the first ``--train-rows`` events in time order so that its tables hold
what a running trainer's do (rows touched by the stream, the rest as initialised). Its checkpoint's messages are
built once by the trainer's own call (``consumers.state.learner_state.write_learner_checkpoint``); then, for each
round and codec in turn, they are produced as the trainer produces them (partition 0 of a compacted topic of its
own, acks=all, idempotent, the codec as ``compression_type``) and read back from the start by a consumer that
reassembles them as a serving replica does (``consumers.state.wire.Reassembler``, checking the payload's sha256).
Reported per codec: median seconds to the broker's acknowledgement of the last message, median seconds to read
and reassemble, and the bytes the partition's log segments grew by per publication (the broker's own files:
this starts its own broker), with ratios to the first codec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
SOURCE = REPO_ROOT.parent / "shared" / "data" / "kuairand_pure" / "kuairand_pure_20220425_20220508.csv"
CHUNK = 900_000  # publish.chunk_bytes' default


def progress(message: str) -> None:
    print(f"[publish_compression] {message}", file=sys.stderr, flush=True)


def trained_messages(train_rows: int) -> tuple[list, int]:
    """The publication messages of the default model trained on the first ``train_rows`` events, and the
    safetensors payload's size."""
    import torch

    from consumers.state.checkpoints import CheckpointStore
    from consumers.state.learner_state import write_learner_checkpoint
    from consumers.tools.evaluate import feature_spec_for, load_encoded, seeded_learner
    from models.evaluation import score_stream
    from streamer.datasets import open_dataset

    torch.set_num_threads(1)
    dataset = open_dataset("csv", SOURCE, mapping=REPO_ROOT / "mappings" / "kuairand_pure.toml")
    spec = feature_spec_for(dataset, (), 0)
    data = load_encoded(dataset, ["click", "long_view"], spec).head(train_rows)
    learner = seeded_learner(["click", "long_view"], "shared_bottom", "mtl", 0, spec, {}, "cpu")
    progress(f"training the default model on {len(data):,} events")
    score_stream(learner, data, batch_size=256)
    publication = {"manifest": {"step": learner.steps}, "version": 1, "chunk_size": CHUNK, "previous_chunk_count": 0,
                   "max_message_bytes": max(1_000_000, CHUNK + 64 * 1024), "onnx": False}
    with tempfile.TemporaryDirectory() as directory:
        written = write_learner_checkpoint(learner, CheckpointStore(directory, keep_last=1), {}, publication)
    payload = sum(len(v) for k, v in written["messages"] if v is not None and k != b"manifest")
    return written["messages"], payload


def make_topic(bootstrap: str, name: str) -> None:
    """A topic configured as ``crossdistil kafka up`` makes the serving topic: one partition, compacted."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, 1, 1, topic_configs={
            "cleanup.policy": "compact", "max.message.bytes": str(max(1_000_000, CHUNK + 64 * 1024))})])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, messages: list, codec: str) -> float:
    """Seconds from the first send to the acknowledgement of every message, with the trainer's producer settings."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                             max_request_size=16 * 1024 * 1024,
                             compression_type=None if codec == "none" else codec)
    try:
        started = time.perf_counter()
        futures = [producer.send(topic, key=key, value=value, partition=0) for key, value in messages]
        producer.flush(timeout=120)
        seconds = time.perf_counter() - started
        if not all(f.is_done and f.succeeded() for f in futures):
            raise RuntimeError(f"{codec}: the broker did not acknowledge every message")
        return seconds
    finally:
        producer.close(timeout=10)


def read_back(bootstrap: str, topic: str, start: int) -> float:
    """Seconds to read the topic from offset ``start`` (where the publication begins) and reassemble it, as a
    replica does (the payload's sha256 checked)."""
    from kafka import KafkaConsumer, TopicPartition

    from consumers.state.wire import Reassembler

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, start)
        reassembler, found = Reassembler(), 0
        started = time.perf_counter()
        deadline = time.monotonic() + 120
        while not found:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: the publication at offset {start} not read back within 120 s")
            for records in consumer.poll(timeout_ms=500).values():
                found += len(list(reassembler.checkpoints((r.key, r.value) for r in records)))
        return time.perf_counter() - started
    finally:
        consumer.close()


def log_bytes(data_dir: Path, topic: str) -> int:
    """The bytes of the partition's log segments in the broker's own log directory."""
    return sum(f.stat().st_size for f in data_dir.rglob(f"{topic}-0/*.log"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", default="none,lz4,zstd", help="comma-separated; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=60_000)
    args = parser.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not SOURCE.is_file():
        sys.exit(f"needs the KuaiRand-Pure log at {SOURCE}")
    messages, payload = trained_messages(args.train_rows)
    from consumers.runtime.local_kafka import LocalKafka, free_port

    with tempfile.TemporaryDirectory(prefix="publish-compression-") as tmp:
        broker = LocalKafka(port=free_port(), data_dir=Path(tmp) / "kafka")
        broker.start(timeout_s=180)
        try:
            topics = {codec: f"bench-compression-{codec}-{uuid.uuid4().hex[:6]}" for codec in codecs}
            results: dict[str, dict] = {codec: {"produce_s": [], "read_s": []} for codec in codecs}
            for topic in topics.values():
                make_topic(broker.bootstrap, topic)
            for round_ in range(args.rounds):
                for codec in codecs:  # interleaved: the machine's speed drifts between rounds, not within one
                    results[codec]["produce_s"].append(round(produce(broker.bootstrap, topics[codec], messages,
                                                                     codec), 3))
                    results[codec]["read_s"].append(round(read_back(broker.bootstrap, topics[codec],
                                                                    round_ * len(messages)), 3))
                progress(f"round {round_ + 1}/{args.rounds}: "
                         + ", ".join(f"{c} {results[c]['produce_s'][-1]:.2f} s" for c in codecs))
            time.sleep(1.0)  # the segments' bytes are on disk once acknowledged; let the files' sizes settle
            for codec, topic in topics.items():
                entry = results[codec]
                entry["broker_bytes_per_publication"] = log_bytes(broker.data_dir, topic) // args.rounds
                entry["produce_median_s"] = statistics.median(entry["produce_s"])
                entry["read_median_s"] = statistics.median(entry["read_s"])
        finally:
            broker.stop()
    reference = results[codecs[0]]
    ratios = {codec: {"bytes": round(r["broker_bytes_per_publication"] / reference["broker_bytes_per_publication"], 3),
                      "produce_time": round(r["produce_median_s"] / reference["produce_median_s"], 2),
                      "read_time": round(r["read_median_s"] / reference["read_median_s"], 2)}
              for codec, r in results.items()}
    print(json.dumps({"benchmark": "publish_compression", "model": "mtl, default options, 2**20 hash buckets, "
                      "KuaiRand-Pure features", "train_rows": args.train_rows, "rounds": args.rounds,
                      "messages": len(messages), "payload_bytes": payload, "codecs": results,
                      f"ratios_to_{codecs[0]}": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
