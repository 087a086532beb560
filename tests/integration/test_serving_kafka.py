"""crossdistil serve against a real broker: pick-up and swap, parity with the Learner, corrupt chunks, start-up
from the end of a long history, and the CLI process (endpoints printed, SIGTERM -> 0).

Checkpoints are published here exactly as the trainer does (``Learner.serving_state()`` -> ``encode_checkpoint``
with the serving metadata under ``"serving"`` -> every message to partition 0 with acks=all, then flush), so
these tests do not need the trainer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from consumers.runtime.config import load_config
from consumers.serving.daemon import ServingDaemon
from consumers.state.wire import encode_checkpoint
from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner
from streamer.topics import ensure_topics

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ("click", "like")
CHUNK = 16 * 1024  # several chunks per checkpoint, so "a corrupt chunk" and "the span" mean something


def impressions(n: int, offset: int = 0) -> list[dict]:
    return [{"impression_id": f"imp{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 13}",
             "item_id": f"item{i % 17}", "features": {"hour": str(i % 24)}} for i in range(offset, offset + n)]


def make_learner(seed: int = 0) -> Learner:
    return Learner(ModelConfig(tasks=TASKS, hidden_dims=(8,), tower_dims=(4,), seed=seed,
                               features=FeatureSpec(categorical=("user_id", "item_id", "hour"), hash_buckets=2048)))


def train(learner: Learner, steps: int) -> None:
    for s in range(steps):
        rows = [dict(e, labels={"click": (i + s) % 2, "like": (i % 3 == 0)})
                for i, e in enumerate(impressions(64, s * 64))]
        learner.step(encode_rows(rows, learner.config.features, TASKS))


def checkpoint_messages(learner: Learner, version: int,
                        previous_chunk_count: int = 0) -> list[tuple[bytes, bytes | None]]:
    """What the trainer produces for one publication of ``learner``."""
    tensors, serving_meta = learner.serving_state()
    metadata = {"step": learner.steps, "watermark_ms": None, "offsets": [], "metrics": {}, "tasks": list(TASKS),
                "serving": dict(serving_meta), "published_at_ms": int(time.time() * 1000)}
    return encode_checkpoint(tensors, metadata, version=version, chunk_size=CHUNK,
                             previous_chunk_count=previous_chunk_count)


class Publisher:
    """Produces messages to partition 0 of the serving topic like the trainer (acks=all, idempotent, flush)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                      max_request_size=16 * 1024 * 1024)

    def send(self, messages: list[tuple[bytes, bytes | None]]) -> None:
        futures = [self.producer.send(self.topic, key=key, value=value, partition=0) for key, value in messages]
        self.producer.flush(timeout=30)
        assert all(f.is_done and f.succeeded() for f in futures), "the broker did not acknowledge every message"

    def close(self) -> None:
        self.producer.close(timeout=10)


@pytest.fixture
def topic(kafka_broker: str, unique_topic: Callable[[str], str]) -> str:
    name = unique_topic("model")
    ensure_topics(kafka_broker, 1, impression_topic=unique_topic("imp"), feedback_topic=unique_topic("fb"),
                  dead_letter_topic=unique_topic("dl"), model_topic=name)
    return name


@pytest.fixture
def publisher(kafka_broker: str, topic: str) -> Iterator[Publisher]:
    pub = Publisher(kafka_broker, topic)
    yield pub
    pub.close()


class RunningServing:
    def __init__(self, daemon: ServingDaemon, stop: threading.Event, thread: threading.Thread) -> None:
        self.daemon, self.stop, self.thread = daemon, stop, thread

    @property
    def url(self) -> str:
        assert self.daemon.api is not None
        return self.daemon.api.url

    def wait_version(self, version: int, timeout_s: float = 30.0) -> None:
        served = self.daemon.holder.wait_for_version(version, timeout_s)
        assert served is not None, f"serving did not reach version {version} within {timeout_s} s " \
                                   f"(rejections: {self.daemon.follower and self.daemon.follower.stats.rejections})"

    def wait_rejections(self, count: int, timeout_s: float = 30.0) -> list[tuple[int | None, str]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            follower = self.daemon.follower
            if follower is not None and len(follower.stats.rejections) >= count:
                return list(follower.stats.rejections)
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} rejections within {timeout_s} s")

    def wait_following(self, timeout_s: float = 30.0) -> None:
        """Until start-up is over (the follower exists and has chosen its start path)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            follower = self.daemon.follower
            if follower is not None and follower.stats.start_path:
                return
            time.sleep(0.05)
        raise AssertionError("serving never finished its start-up")


@pytest.fixture
def start_serving(kafka_broker: str, topic: str) -> Iterator[Callable[..., RunningServing]]:
    running: list[RunningServing] = []

    def start(*overrides: str) -> RunningServing:
        cfg = load_config(None, env={}, overrides=[f"kafka.bootstrap={json.dumps(kafka_broker)}",
                                                   f"kafka.model_topic={json.dumps(topic)}", "serving.port=0",
                                                   *overrides])
        daemon = ServingDaemon(cfg, out=io.StringIO())
        stop = threading.Event()
        status: list[int] = []
        thread = threading.Thread(target=lambda: status.append(daemon.run(stop)), daemon=True)
        thread.start()
        assert daemon.ready.wait(30), "the HTTP server never started"
        handle = RunningServing(daemon, stop, thread)
        handle.status = status  # type: ignore[attr-defined]
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.stop.set()
        handle.thread.join(30)
        assert not handle.thread.is_alive(), "serving did not stop"
        assert handle.status == [0]  # type: ignore[attr-defined]


def post_score(url: str, events: list[dict]) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/score", data=json.dumps(events).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def reload_failures(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = get(url + "/metrics")
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "crossdistil_serving_reload_failures_total"}


# -- (a) pick-up and swap


def test_serving_picks_up_a_new_checkpoint_and_swaps(start_serving, publisher: Publisher) -> None:
    serving = start_serving()
    serving.wait_following()
    assert get(serving.url + "/healthz")[0] == 503
    learner = make_learner()
    publisher.send(checkpoint_messages(learner, version=1))
    serving.wait_version(1)
    status, first = post_score(serving.url, impressions(8))
    assert status == 200 and first["model_version"] == 1
    train(learner, 5)
    publisher.send(checkpoint_messages(learner, version=2))
    serving.wait_version(2)
    status, second = post_score(serving.url, impressions(8))
    assert status == 200 and second["model_version"] == 2 and second["step"] == 5
    assert second["probabilities"] != first["probabilities"]
    assert json.loads(get(serving.url + "/healthz")[1])["model_version"] == 2


# -- (b) parity with the Learner


def test_serving_returns_the_learners_probabilities_on_a_probe_batch(start_serving, publisher: Publisher) -> None:
    learner = make_learner(seed=3)
    train(learner, 10)
    publisher.send(checkpoint_messages(learner, version=7))
    serving = start_serving()
    serving.wait_version(7)
    probe = impressions(100, offset=5000)
    status, body = post_score(serving.url, probe)
    assert status == 200
    expected = learner.predict(encode_rows(probe, learner.config.features, TASKS))
    for task in TASKS:
        assert body["probabilities"][task] == expected[task].tolist()  # exact: same float32 values


# -- (c) a corrupted chunk


def corrupt_chunk(messages: list[tuple[bytes, bytes | None]], index: int, *, fix_chunk_hash: bool) -> list:
    """Flip one byte of chunk ``index``'s data; optionally recompute its chunk_sha256 so only the payload hash
    catches it."""
    import hashlib

    key, value = messages[index]
    chunk = msgpack.unpackb(value, raw=False)
    data = bytearray(chunk["data"])
    data[len(data) // 2] ^= 0xFF
    chunk["data"] = bytes(data)
    if fix_chunk_hash:
        chunk["chunk_sha256"] = hashlib.sha256(chunk["data"]).hexdigest()
    return messages[:index] + [(key, msgpack.packb(chunk, use_bin_type=True))] + messages[index + 1:]


def test_a_corrupted_chunk_is_rejected_counted_and_the_previous_version_keeps_serving(start_serving,
                                                                                      publisher: Publisher) -> None:
    learner = make_learner()
    publisher.send(checkpoint_messages(learner, version=1))
    serving = start_serving()
    serving.wait_version(1)
    train(learner, 3)
    good = checkpoint_messages(learner, version=2)
    assert sum(1 for k, _ in good if k.startswith(b"chunk/")) >= 3
    publisher.send(corrupt_chunk(good, 1, fix_chunk_hash=False))  # the chunk's own hash catches it
    rejections = serving.wait_rejections(2)
    assert (2, "corrupt_chunk") in rejections and (2, "missing_chunk") in rejections
    train(learner, 1)
    # only the payload hash
    publisher.send(corrupt_chunk(checkpoint_messages(learner, version=3), 2, fix_chunk_hash=True))
    rejections = serving.wait_rejections(3)
    assert (3, "hash_mismatch") in rejections
    status, body = post_score(serving.url, impressions(4))
    assert status == 200 and body["model_version"] == 1
    assert serving.daemon.holder.current.version == 1
    failures = reload_failures(serving.url)
    assert (failures.get("corrupt_chunk") == 1 and failures.get("missing_chunk") == 1
            and failures.get("hash_mismatch") == 1)
    # The next good publication is served: the rejection did not wedge the reader.
    publisher.send(checkpoint_messages(learner, version=4))
    serving.wait_version(4)


def test_a_manifest_whose_model_does_not_load_is_rejected_as_bad_model(start_serving, publisher: Publisher) -> None:
    learner = make_learner()
    publisher.send(checkpoint_messages(learner, version=1))
    serving = start_serving()
    serving.wait_version(1)
    tensors, serving_meta = learner.serving_state()
    tensors.pop(next(iter(tensors)))  # verified bytes, wrong model: a missing weight
    bad = encode_checkpoint(tensors, {"step": 1, "serving": dict(serving_meta)}, version=2, chunk_size=CHUNK)
    publisher.send(bad)
    assert (2, "bad_model") in serving.wait_rejections(1)
    assert serving.daemon.holder.current.version == 1


# -- (d) start-up at the end of a long history


def test_start_up_reads_only_the_last_checkpoint_of_a_long_history(start_serving, publisher: Publisher) -> None:
    learner = make_learner()
    previous = 0
    for version in range(1, 41):  # the same weights under 40 versions: only the history's length matters
        messages = checkpoint_messages(learner, version=version, previous_chunk_count=previous)
        previous = sum(1 for k, v in messages if k.startswith(b"chunk/") and v is not None)
        publisher.send(messages)
    span = msgpack.unpackb(messages[-1][1], raw=False)["span"]
    serving = start_serving()
    serving.wait_version(40)
    stats = serving.daemon.follower.stats
    assert stats.start_path == "fast"
    assert stats.start_offset == stats.end_offset_at_start - 1 - span
    # The last manifest once, then its span and the manifest again; not the 40 x (span + 1) of the history.
    assert stats.startup_records <= span + 2 < stats.end_offset_at_start // 10


def test_start_up_during_a_publication_falls_back_to_the_beginning_and_finds_the_last_complete_one(
        start_serving, publisher: Publisher) -> None:
    learner = make_learner()
    publisher.send(checkpoint_messages(learner, version=1))
    train(learner, 2)
    publisher.send(checkpoint_messages(learner, version=2))
    in_progress = checkpoint_messages(learner, version=3)
    publisher.send(in_progress[:2])  # the writer is still producing chunks: the last message is not a manifest
    serving = start_serving()
    serving.wait_version(2)
    assert serving.daemon.follower.stats.start_path == "slow"
    publisher.send(in_progress[2:])  # the publication completes: its chunks 0..1 were buffered while following
    serving.wait_version(3)


def test_an_empty_topic_is_not_ready_until_the_first_publication(start_serving, publisher: Publisher) -> None:
    serving = start_serving()
    serving.wait_following()
    assert serving.daemon.follower.stats.start_path == "empty"
    status, body = post_score(serving.url, impressions(1))
    assert status == 503 and body["error"] == "no_model"
    publisher.send(checkpoint_messages(make_learner(), version=1))
    serving.wait_version(1)
    assert get(serving.url + "/healthz")[0] == 200


# -- the command


def test_serve_command_prints_its_endpoints_and_exits_0_on_sigterm(kafka_broker: str, topic: str, publisher: Publisher,
                                                                  tmp_path: Path) -> None:
    from consumers.runtime.local_kafka import free_port

    port = free_port()
    config = tmp_path / "serving.toml"
    config.write_text(f'[kafka]\nbootstrap = "{kafka_broker}"\nmodel_topic = "{topic}"\n[serving]\nport = {port}\n')
    publisher.send(checkpoint_messages(make_learner(), version=5))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve", "--config", str(config)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first_line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/score" in first_line and "/healthz" in first_line and "/metrics" in first_line
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status, body = get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200 and json.loads(body)["model_version"] == 5
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out


def test_serve_command_with_two_workers_serves_one_port_from_two_processes(kafka_broker: str, topic: str,
                                                                          publisher: Publisher, tmp_path: Path) -> None:
    from consumers.runtime.local_kafka import free_port

    port = free_port()
    config = tmp_path / "serving.toml"
    config.write_text(f'[kafka]\nbootstrap = "{kafka_broker}"\nmodel_topic = "{topic}"\n[serving]\nport = {port}\n'
                      "workers = 2\n")
    publisher.send(checkpoint_messages(make_learner(), version=5))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve", "--config", str(config)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        endpoints = []
        while len(endpoints) < 2:  # each worker says where it serves, then that it follows the topic
            line = process.stdout.readline()
            assert line, f"the command ended early: {process.stderr.read()}"
            if "/score" in line:
                endpoints.append(line)
        assert all(f"http://127.0.0.1:{port}/score" in line for line in endpoints)  # both workers bound the port
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2
        deadline = time.monotonic() + 60
        versions: list = []
        while time.monotonic() < deadline and len(versions) < 20:
            try:
                status, body = get(f"http://127.0.0.1:{port}/healthz")  # a new connection each time
            except OSError:
                status = None
            if status == 200:
                versions.append(json.loads(body)["model_version"])
            else:
                versions.clear()  # until both workers hold the model, a connection may land on one without it
                time.sleep(0.1)
        assert versions == [5] * 20
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out and not any(Path(f"/proc/{pid}").exists() for pid in children)


def test_serve_command_says_when_kafka_is_unreachable(tmp_path: Path) -> None:
    from consumers.runtime.local_kafka import free_port

    bootstrap = f"127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "consumers.cli", "serve", "--set", f'kafka.bootstrap="{bootstrap}"',
                             "--set", "serving.port=0", "--set", "kafka.client_options={bootstrap_timeout_ms = 3000}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and bootstrap in result.stderr and "crossdistil kafka up" in result.stderr
    assert "--set kafka.bootstrap=HOST:PORT" in result.stderr  # where to give another address
