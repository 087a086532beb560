"""How fast does ``crossdistil serve`` pick up a published checkpoint? Prints one JSON object.

    python bench/serving_pickup.py                       # own broker, 20 publications of the example model
    python bench/serving_pickup.py --bootstrap 127.0.0.1:9092 --checkpoints 50 --hash-buckets 65536

The serving daemon runs as its own process (``python -m consumers.cli serve``), as in production. For each of
``--checkpoints`` versions, this script produces a checkpoint to the serving topic exactly as the trainer does
(every message to partition 0, acks=all, idempotent, then flush), and measures the **pick-up latency**: from the
moment the last message (the manifest) is acknowledged by the broker to the first ``GET /healthz`` that reports
the new ``model_version`` (polled every ``--poll-ms``, so the figure carries up to that much extra). It waits
for the switch before publishing the next version. Target (issue 6): p99 <= 2 s.

The default model is deploy/trainer.example.toml's (3 tasks, MMoE, 2**20 hash buckets x 16 dims: a ~67 MB
payload in 900 kB chunks), the size a real deployment publishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

TASKS = ("click", "long_view", "like")


def progress(message: str) -> None:
    print(f"[serving_pickup] {message}", file=sys.stderr, flush=True)


def git_commit(root: Path) -> str:
    """The short commit of the checkout at ``root``, marked when its tracked files have uncommitted changes."""
    result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+uncommitted changes" if dirty else "")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def example_learner(hash_buckets: int, embedding_dim: int = 16, seed: int = 0, wide: str = "adagrad",
                    counts: bool = True):
    """The model of deploy/trainer.example.toml (students are what serving loads); ``wide="none"`` and
    ``counts=False``: without its wide part (models/wide.py) and online counts (models/counts.py), the model a
    server from before them can load."""
    from models.config import ModelConfig
    from models.features import FeatureSpec
    from models.learner import Learner

    return Learner(ModelConfig(tasks=TASKS, backbone="mmoe", rung="crossdistil", embedding_dim=embedding_dim,
                               hidden_dims=(128,), tower_dims=(64, 32), seed=seed, wide=wide,
                               **({} if counts else {"count_features": ()}),
                               features=FeatureSpec(categorical=("user_id", "item_id", "hour", "weekday"),
                                                    numeric=("duration_ms",), hash_buckets=hash_buckets)))


def checkpoint_messages(learner: Any, version: int, chunk_bytes: int, previous_chunk_count: int = 0,
                        legacy: bool = False) -> list:
    """The trainer's publication of ``learner`` as ``version`` (same metadata layout). ``legacy``: a learner
    without a wide part (``wide="none"``) and online counts published without the ``wide*`` and ``count_*``
    config keys, as before they existed, and without ``embedding_optimizer`` (a training choice: the students
    score the same whatever it is), so that a server from before them loads the checkpoint too (today's reads
    their absence as ``LEGACY_VALUES``)."""
    from consumers.state.wire import encode_checkpoint

    tensors, serving_meta = learner.serving_state()
    if legacy:
        assert learner.config.wide == "none" and not learner.config.count_features, \
            "only a model without a wide part and online counts has a legacy form"
        config = json.loads(serving_meta["config"])
        for key in ("wide", "wide_lr", "wide_crosses", "wide_decay", "embedding_optimizer", "count_features",
                    "count_smoothing", "count_half_life", "count_cross_smoothing", "count_cross_prior"):
            config.pop(key, None)
        serving_meta = {**serving_meta, "config": json.dumps(config, sort_keys=True)}
    metadata = {"step": learner.steps, "watermark_ms": None, "offsets": [], "metrics": {}, "tasks": list(TASKS),
                "serving": dict(serving_meta), "published_at_ms": int(time.time() * 1000)}
    return encode_checkpoint(tensors, metadata, version=version, chunk_size=chunk_bytes,
                             previous_chunk_count=previous_chunk_count,
                             max_message_bytes=max(1_000_000, chunk_bytes + 64 * 1024))


class Publisher:
    """A producer configured like the trainer's."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                      max_request_size=16 * 1024 * 1024)

    def send(self, messages: list) -> float:
        """Produce and flush; return the time.monotonic() at which every message was acknowledged."""
        futures = [self.producer.send(self.topic, key=key, value=value, partition=0) for key, value in messages]
        self.producer.flush(timeout=60)
        acked = time.monotonic()
        if not all(f.is_done and f.succeeded() for f in futures):
            raise RuntimeError("the broker did not acknowledge every message of the publication")
        return acked

    def close(self) -> None:
        self.producer.close(timeout=10)


def start_broker(args: argparse.Namespace, workdir: Path) -> tuple[str, Any]:
    """``--bootstrap`` if given, else a fresh local broker in ``workdir`` (returned so the caller stops it)."""
    if args.bootstrap:
        return args.bootstrap, None
    from consumers.runtime.local_kafka import LocalKafka, free_port

    broker = LocalKafka(port=free_port(), data_dir=workdir / "kafka")
    progress("starting a broker")
    broker.start(timeout_s=180)
    return broker.bootstrap, broker


def make_topic(bootstrap: str) -> str:
    """A fresh serving topic (one partition, compacted, 16 MiB messages), as ``crossdistil kafka up`` makes it."""
    from streamer.topics import ensure_topics

    tag = uuid.uuid4().hex[:8]
    topic = f"bench-model-{tag}"
    ensure_topics(bootstrap, 1, impression_topic=f"bench-imp-{tag}", feedback_topic=f"bench-fb-{tag}",
                  dead_letter_topic=f"bench-dl-{tag}", model_topic=topic)
    return topic


def start_serving(bootstrap: str, topic: str, workdir: Path, torch_threads: int = 1, *, root: Path = REPO_ROOT,
                  name: str = "serving", options: dict[str, int] | None = None) -> tuple[subprocess.Popen, str]:
    """``crossdistil serve`` of the checkout at ``root`` (default: this one) as a child process on a free loopback
    port; returns it and its base URL. Its configuration and log are ``workdir/<name>.toml`` and ``.log``;
    ``options`` are more ``[serving]`` keys."""
    from consumers.runtime.local_kafka import free_port

    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(f'[kafka]\nbootstrap = "{bootstrap}"\nmodel_topic = "{topic}"\npoll_timeout_ms = 200\n'
                      f'[serving]\nbind = "127.0.0.1"\nport = {port}\ntorch_threads = {torch_threads}\n'
                      + "".join(f"{key} = {value}\n" for key, value in (options or {}).items()))
    log = open(workdir / f"{name}.log", "w")
    environment = {**os.environ, "PYTHONPATH": str(root)}  # that checkout's packages, whatever is installed
    process = subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve", "--config", str(config),
                                "--log-level", "WARNING"],
                               cwd=root, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"crossdistil serve exited with {process.returncode}; see {workdir / (name + '.log')}")
        if healthz(url) is not None:
            return process, url
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("crossdistil serve did not answer /healthz within 120 s")


def healthz(url: str) -> dict | None:
    """The /healthz JSON (``{}`` when not ready), or None when nothing listens yet."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        exc.read()
        return {}
    except OSError:
        return None


def stop_serving(process: subprocess.Popen) -> int:
    process.terminate()  # SIGTERM: the daemon exits 0
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--checkpoints", type=int, default=20, help="publications to time")
    parser.add_argument("--hash-buckets", type=int, default=2**20,
                        help="embedding rows (payload ~ rows x dim x 4 bytes)")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--chunk-bytes", type=int, default=900_000, help="the trainer's publish.chunk_bytes")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="/healthz polling interval")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up on one version after this many seconds")
    args = parser.parse_args()

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="serving-pickup-"))
    bootstrap, broker = start_broker(args, workdir)
    process = None
    publisher = None
    try:
        topic = make_topic(bootstrap)
        learner = example_learner(args.hash_buckets, args.embedding_dim)
        publisher = Publisher(bootstrap, topic)
        process, url = start_serving(bootstrap, topic, workdir)
        progress(f"serving at {url}; publishing {args.checkpoints} checkpoints to {topic}")
        latencies, from_first_send, payload_bytes, chunks, previous = [], [], 0, 0, 0
        first_load_s = None
        # Version 0 warms up (serving's first model build pays for lazy imports and allocator growth): reported apart.
        for version in range(0, args.checkpoints + 1):
            messages = checkpoint_messages(learner, version, args.chunk_bytes, previous)  # encoding is not timed
            chunks = sum(1 for key, value in messages if value is not None and key.startswith(b"chunk/"))
            payload_bytes = sum(len(v) for _, v in messages if v is not None)
            previous = chunks
            sent = time.monotonic()
            acked = publisher.send(messages)
            deadline = acked + args.timeout
            while True:
                now = time.monotonic()
                if (healthz(url) or {}).get("model_version") == version:
                    break
                if now > deadline:
                    raise RuntimeError(f"version {version} not served {args.timeout} s after its publication; see "
                                       f"{workdir / 'serving.log'}")
                time.sleep(args.poll_ms / 1000)
            progress(f"version {version}: served {(now - acked) * 1000:.0f} ms after the last ack")
            if version == 0:
                first_load_s = now - acked
                continue
            latencies.append(now - acked)
            from_first_send.append(now - sent)
        report = {
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "load_avg": os.getloadavg()},
            "checkpoints": args.checkpoints,
            "message_bytes": payload_bytes,
            "chunks": chunks,
            "chunk_bytes": args.chunk_bytes,
            "hash_buckets": args.hash_buckets,
            "poll_ms": args.poll_ms,
            "first_load_seconds": round(first_load_s, 4),
            "pickup_seconds": {"median": round(percentile(latencies, 50), 4),
                               "p99": round(percentile(latencies, 99), 4),
                               "max": round(max(latencies), 4), "min": round(min(latencies), 4)},
            "from_first_send_seconds": {"median": round(percentile(from_first_send, 50), 4),
                                        "p99": round(percentile(from_first_send, 99), 4)},
            "target_p99_seconds": 2.0,
            "meets_target": percentile(latencies, 99) <= 2.0,
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if process is not None:
            progress(f"serving exited with {stop_serving(process)}")
        if publisher is not None:
            publisher.close()
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
