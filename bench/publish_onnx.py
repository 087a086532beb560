"""What the ONNX graph costs a publication: bytes and seconds to write a checkpoint and build its messages, with
and without ``publish.onnx``, for the default model; prints one JSON object.

    python bench/publish_onnx.py                      # deploy/trainer.example.toml's model (2**20 x 16 table)
    python bench/publish_onnx.py --hash-buckets 65536 --rounds 5

``consumers.state.learner_state.write_learner_checkpoint`` (the trainer's own call: checkpoint file, serving
state, wire messages) runs ``--rounds`` times each way, alternating, on one trained model; the median seconds and
their ratio are reported (the machine is shared: compare the two sides of one run only). Producing the messages
to Kafka costs in proportion to the bytes, reported too; with ``--bootstrap`` the messages are also produced as the
trainer does (partition 0 of a fresh compacted topic, acks=all, idempotent) and ``to_ack_seconds`` times the whole
publication, from the checkpoint call to the broker's acknowledgement of the manifest.

    python bench/publish_onnx.py --bootstrap 127.0.0.1:9092   # a broker of your own (crossdistil kafka up)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hash-buckets", type=int, default=2**20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bootstrap", default=None, help="also produce every publication to this Kafka broker")
    args = parser.parse_args(argv)

    import torch
    from serving_pickup import example_learner

    from consumers.state.checkpoints import CheckpointStore
    from consumers.state.learner_state import write_learner_checkpoint
    from models.features import encode_rows

    torch.set_num_threads(1)
    learner = example_learner(args.hash_buckets)
    rows = [{"user_id": f"u{i % 97}", "item_id": f"i{i}", "features": {"hour": str(i % 24), "duration_ms": 1000.0 * i},
             "labels": {task: i % 2 for task in learner.config.tasks}} for i in range(256)]
    learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))
    out: dict[str, dict] = {"without": {"seconds": []}, "with_onnx": {"seconds": []}}
    producer, topic = (_producer_and_topic(args.bootstrap) if args.bootstrap else (None, None))
    with tempfile.TemporaryDirectory() as directory:
        store = CheckpointStore(directory, keep_last=1)
        for _ in range(args.rounds):
            for name, onnx in (("without", False), ("with_onnx", True)):
                publication = {"manifest": {"step": learner.steps}, "version": 1, "chunk_size": 900_000,
                               "previous_chunk_count": 0, "max_message_bytes": 1 << 20, "onnx": onnx}
                started = time.perf_counter()
                written = write_learner_checkpoint(learner, store, {}, publication)
                out[name]["seconds"].append(round(time.perf_counter() - started, 3))
                if producer is not None:
                    for key, value in written["messages"]:
                        producer.send(topic, key=key, value=value, partition=0)
                    producer.flush(timeout=120)
                    out[name].setdefault("to_ack_seconds", []).append(round(time.perf_counter() - started, 3))
                out[name]["published_bytes"] = sum(len(v) for _, v in written["messages"] if v is not None)
                out[name]["messages"] = len(written["messages"])
    if producer is not None:
        producer.close()
    for entry in out.values():
        entry["median_s"] = statistics.median(entry["seconds"])
        if "to_ack_seconds" in entry:
            entry["to_ack_median_s"] = statistics.median(entry["to_ack_seconds"])
    if producer is not None:
        out["to_ack_ratio"] = round(out["with_onnx"]["to_ack_median_s"] / out["without"]["to_ack_median_s"], 2)
    print(json.dumps({"benchmark": "publish_onnx", "hash_buckets": args.hash_buckets, "rounds": args.rounds,
                      "model": "deploy/trainer.example.toml's (3 tasks, MMoE, crossdistil, 16-dim embeddings)",
                      "kafka": bool(producer), **out,
                      "time_ratio": round(out["with_onnx"]["median_s"] / out["without"]["median_s"], 2),
                      "bytes_ratio": round(out["with_onnx"]["published_bytes"] / out["without"]["published_bytes"], 2)},
                     indent=2))
    return 0


def _producer_and_topic(bootstrap: str):
    """The trainer's producer settings (consumers.trainer.kafka_io.connect), a fresh compacted 1-partition topic."""
    import uuid

    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"bench-publish-onnx-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact",
                                                                  "max.message.bytes": str(16 << 20)})])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                             max_request_size=16 << 20)
    return producer, topic


if __name__ == "__main__":
    sys.exit(main())
