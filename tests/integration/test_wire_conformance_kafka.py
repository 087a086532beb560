"""The docs match the bytes: a reader written from docs/ alone (tests/conformance/reader.py) over real publications.

The project's code only produces here (``crossdistil stream``'s function, ``crossdistil train`` and ``crossdistil
serve`` as subprocesses); everything that reads the serving topic, checks a field, hashes a feature or runs the
ONNX graph comes from the conformance reader, which imports nothing of the project. A KuaiRand slice is streamed
once per module; each trainer run has its own group, checkpoint directory and serving topic.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from consumers.runtime.processes import die_with_parent
from tests.conformance import reader
from tests.integration.test_trainer_kafka import REPO, SMALL_MODEL, TASKS, WINDOWS, make_topics, run_trainer
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration

SLICE = 2500  # KuaiRand impressions streamed (the first ones in time)
SCORED = 1000


@pytest.fixture(scope="module")
def kuairand_slice(kafka_broker: str) -> dict[str, str]:
    from streamer.stream import stream_dataset

    source = REPO.parent / "shared" / "data" / "kuairand"
    if not source.is_dir():
        pytest.skip(f"real data not available: {source} does not exist (it lives outside the repository)")
    topics = make_topics(kafka_broker, "conformance-" + uuid.uuid4().hex[:6])
    summary = stream_dataset("kuairand", str(source), f"kafka://{kafka_broker}", limit=SLICE,
                             impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    assert summary["impressions"] == SLICE
    return topics


def train(bootstrap: str, topics: dict[str, str], directory: Path, **model: object) -> str:
    """Run ``crossdistil train`` over the slice until idle, publishing to a serving topic of its own; its name."""
    directory.mkdir(parents=True, exist_ok=True)
    model_topic = f"model-{uuid.uuid4().hex[:8]}"
    onnx = bool(model.pop("onnx", False))
    config = write_trainer_config(directory / "trainer.toml", bootstrap, {**topics, "model": model_topic}, {
        "join.attribution_window_s": WINDOWS,
        "join.idle_timeout_s": 600.0,
        "batching.batch_size": 256,
        "batching.max_batch_delay_s": 2.0,
        "model.tasks": list(TASKS),
        "model.options": {**SMALL_MODEL, **model},
        "checkpoint.dir": str(directory / "checkpoints"),
        "checkpoint.every_steps": 4,
        "checkpoint.every_s": 0.0,
        "publish.onnx": onnx,
    })
    run_trainer(config, directory / "ledger")
    return model_topic


@pytest.fixture(scope="module")
def published(kafka_broker: str, kuairand_slice: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One trainer run (default backbone, no graph): its serving topic as a docs-only reader sees it."""
    topic = train(kafka_broker, kuairand_slice, tmp_path_factory.mktemp("published"))
    records = reader.consume(kafka_broker, topic)
    return {"topic": topic, "records": records, "reader": reader.TopicReader().feed_all(
        (r.key, r.value) for r in records)}


def test_every_publication_of_the_trainer_verifies_by_the_docs_alone(published: dict) -> None:
    topic_reader = published["reader"]
    versions = [c.version for c in topic_reader.accepted]
    manifests = [r for r in published["records"] if r.key == reader.MANIFEST]
    assert len(versions) >= 2 and versions == list(range(1, len(versions) + 1)), versions  # a fresh topic: 1, 2, ...
    assert len(manifests) == len(versions) and not topic_reader.rejections, topic_reader.rejections


def test_every_chunk_and_manifest_has_exactly_the_documented_fields(published: dict) -> None:
    records = published["records"]
    problems = []
    for record in records:
        if record.value is None:
            continue
        fields = msgpack.unpackb(record.value, raw=False)
        problems += reader.manifest_problems(fields) if record.key == reader.MANIFEST else \
            reader.chunk_problems(record.key, fields)
    assert not problems, problems[:10]
    manifest = published["reader"].accepted[-1].manifest
    print(f"\nmetadata of version {manifest['version']}: {sorted(manifest['metadata'])}; metrics of "
          f"{TASKS[0]}: {json.dumps(manifest['metadata']['metrics'][TASKS[0]])[:300]}")


def test_the_trainer_cuts_its_payload_into_the_documented_chunk_size_and_span(published: dict) -> None:
    records = published["records"]
    for position, record in enumerate(records):
        if record.key != reader.MANIFEST:
            continue
        manifest = msgpack.unpackb(record.value, raw=False)
        mine = records[position - manifest["span"]:position]  # this publication's messages, before compaction
        chunks = [msgpack.unpackb(r.value, raw=False) for r in mine if r.value is not None]
        assert manifest["chunk_size"] == reader.TRAINER_CHUNK_BYTES
        assert [c["index"] for c in chunks] == list(range(manifest["chunks"]))
        assert all(c["version"] == manifest["version"] for c in chunks)
        assert [len(c["data"]) for c in chunks[:-1]] == [reader.TRAINER_CHUNK_BYTES] * (len(chunks) - 1)
        assert sum(len(c["data"]) for c in chunks) == manifest["size"]


def test_an_encoder_written_from_the_docs_produces_the_trainers_bytes(published: dict) -> None:
    records = published["records"]
    for checkpoint in published["reader"].accepted:
        position = next(i for i, r in enumerate(records) if r.key == reader.MANIFEST
                        and msgpack.unpackb(r.value, raw=False)["version"] == checkpoint.version)
        m = checkpoint.manifest
        written = [(r.key, r.value) for r in records[position - m["span"]:position + 1]]
        assert reader.encode(checkpoint.payload, m["metadata"], m["version"], m["chunk_size"], m["span"]) == written


def test_the_payload_is_plain_safetensors_without_metadata_in_its_header(published: dict) -> None:
    checkpoint = published["reader"].accepted[-1]
    header = reader.safetensors_header(checkpoint.payload)
    assert "__metadata__" not in header  # the model's metadata travels in the manifest only
    tensors = checkpoint.tensors()
    assert set(header) == set(tensors) and all(list(tensors[n].shape) == header[n]["shape"] for n in header)


def test_the_fast_path_and_the_printed_minimal_reader_find_the_same_latest_checkpoint(kafka_broker: str,
                                                                                       published: dict) -> None:
    latest = published["reader"].accepted[-1]
    fast = reader.fast_path(kafka_broker, published["topic"])
    assert fast is not None and (fast.version, fast.payload) == (latest.version, latest.payload)
    version, metadata, tensors = reader.minimal_reader_from_docs()([(r.key, r.value) for r in published["records"]])
    assert (version, metadata) == (latest.version, latest.metadata) and set(tensors) == set(latest.tensors())


# ------------------------------------------------------------------------------------------- bad publications


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    """As the docs' writer: all to partition 0, in order, acks=all, idempotent; flushed."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             max_request_size=16 << 20)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value, partition=0)
        producer.flush(timeout=60)
    finally:
        producer.close()


def create_serving_topic(bootstrap: str, topic: str, **configs: str) -> None:
    """One partition, compacted (wire-format.md, "The topic"), plus ``configs``."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
            "cleanup.policy": "compact", "max.message.bytes": str(16 << 20), **configs})])
    finally:
        admin.close()


def republish(checkpoint: reader.Checkpoint, version: int, chunk_size: int = reader.TRAINER_CHUNK_BYTES,
              previous: int = 0) -> list[tuple[bytes, bytes | None]]:
    """A real payload and its metadata published again as ``version`` by the docs' writer."""
    return reader.encode(checkpoint.payload, {**checkpoint.metadata, "step": version}, version, chunk_size, previous)


def flip_a_byte(messages: list[tuple[bytes, bytes | None]], index: int) -> list[tuple[bytes, bytes | None]]:
    """The same messages with one byte of chunk ``index``'s data flipped (its chunk_sha256 left as it was)."""
    key, value = messages[index]
    chunk = msgpack.unpackb(value, raw=False)
    chunk["data"] = chunk["data"][:100] + bytes([chunk["data"][100] ^ 0xFF]) + chunk["data"][101:]
    return messages[:index] + [(key, msgpack.packb(chunk, use_bin_type=True))] + messages[index + 1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``crossdistil serve`` as a subprocess on a free port, spoken to only through the documented HTTP API."""

    def __init__(self, bootstrap: str, topic: str, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli", "serve", "--set", f"kafka.bootstrap={bootstrap}",
             "--set", f"kafka.model_topic={topic}", "--set", f"serving.port={port}"],
            cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def score(self, impressions: list[dict]) -> dict:
        request = urllib.request.Request(self.url + "/score", data=json.dumps(impressions).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())

    def wait_for(self, condition, what: str, timeout_s: float = 120.0):
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"serve exited:\n{self.log.read_text(errors='replace')[-3000:]}"
            try:
                found = condition()
            except OSError:  # not listening yet
                found = None
            if found:
                return found
            assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def version(self) -> int | None:
        status, body = self.get("/healthz")
        return json.loads(body).get("model_version") if status == 200 else None

    def failures(self, reason: str) -> float:
        """``crossdistil_serving_reload_failures_total{reason}`` (docs/monitoring.md) from the Prometheus text."""
        status, body = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                   if line.startswith("crossdistil_serving_reload_failures_total{") and f'reason="{reason}"' in line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_a_corrupt_chunk_and_a_stale_version_are_rejected_and_the_previous_model_kept(
        kafka_broker: str, published: dict, tmp_path: Path) -> None:
    real = published["reader"].accepted[-1]
    topic = f"model-bad-{uuid.uuid4().hex[:8]}"
    create_serving_topic(kafka_broker, topic)
    first, corrupt, stale, third = republish(real, 1), flip_a_byte(republish(real, 2), 1), republish(real, 1), \
        republish(real, 3)

    produce(kafka_broker, topic, first)
    serve = Serve(kafka_broker, topic, tmp_path / "serve.log")
    try:
        serve.wait_for(lambda: serve.version() == 1, "version 1")
        produce(kafka_broker, topic, corrupt + stale)
        serve.wait_for(lambda: serve.failures("missing_chunk") >= 1, "missing_chunk rejection")
        serve.wait_for(lambda: serve.failures("stale_version") >= 1, "stale_version rejection")
        assert serve.version() == 1 and serve.failures("corrupt_chunk") >= 1  # the previous model kept
        produce(kafka_broker, topic, third)
        serve.wait_for(lambda: serve.version() == 3, "version 3")
    finally:
        serve.stop()

    topic_reader = reader.slow_path(kafka_broker, topic)
    assert [c.version for c in topic_reader.accepted] == [1, 3]
    assert [(r.code, r.version) for r in topic_reader.rejections] == [
        ("corrupt_chunk", 2), ("missing_chunk", 2), ("stale_version", 1)]
    assert reader.minimal_reader_from_docs()((r.key, r.value) for r in reader.consume(kafka_broker, topic))[0] == 3


@pytest.mark.slow
def test_after_compaction_a_fresh_reader_finds_the_latest_checkpoint_and_no_stale_chunk(
        kafka_broker: str, published: dict) -> None:
    real = published["reader"].accepted[-1]
    small = -(-real.manifest["size"] // reader.TRAINER_CHUNK_BYTES)
    chunk_size = -(-real.manifest["size"] // (small + 3))  # version 1 in 3 more chunks than the later ones
    topic = f"model-compact-{uuid.uuid4().hex[:8]}"
    # Segments roll at the first message after 300 ms, and the cleaner takes any dirty closed segment at once.
    create_serving_topic(kafka_broker, topic, **{"segment.ms": "300", "min.cleanable.dirty.ratio": "0.001",
                                                 "delete.retention.ms": "1000", "min.compaction.lag.ms": "0"})
    publications = [republish(real, 1, chunk_size)]
    big = publications[0][-1][1]
    publications.append(republish(real, 2, previous=msgpack.unpackb(big, raw=False)["chunks"]))
    publications += [republish(real, 3), republish(real, 4)]
    assert [v is None for _, v in publications[1]].count(True) == 3  # tombstones for the 3 chunk keys left over
    for messages in publications:
        produce(kafka_broker, topic, messages)
        time.sleep(0.5)  # so that the next publication starts a new segment
    produced = sum(map(len, publications))

    def versions_on_topic() -> set:
        return {msgpack.unpackb(r.value, raw=False)["version"] for r in reader.consume(kafka_broker, topic) if r.value}

    deadline = time.monotonic() + 180  # the broker's cleaner wakes every 15 s (log.cleaner.backoff.ms)
    while 1 in versions_on_topic():
        assert time.monotonic() < deadline, "the log cleaner did not compact the serving topic in 180 s"
        time.sleep(2)
    records = reader.consume(kafka_broker, topic)
    print(f"\ncompacted: {len(records)} of {produced} messages left, versions {sorted(versions_on_topic())}")
    assert len(records) < produced
    assert not [r.key for r in records if r.value is not None and r.key.startswith(b"chunk/")
                and int(r.key[6:]) >= small], "a stale chunk survived its tombstone"
    topic_reader = reader.slow_path(kafka_broker, topic)
    assert topic_reader.accepted[-1].version == 4 and not topic_reader.rejections, topic_reader.rejections
    assert reader.fast_path(kafka_broker, topic).version == 4
    assert reader.minimal_reader_from_docs()((r.key, r.value) for r in records)[0] == 4

    produce(kafka_broker, topic, republish(real, 5)[:-1])  # a publication cut short: chunks, no manifest
    assert reader.fast_path(kafka_broker, topic) is None  # the last message is not a manifest: slow path
    assert reader.slow_path(kafka_broker, topic).accepted[-1].version == 4


# ------------------------------------------------------------------------------------------- the ONNX graph


def impressions_to_score(bootstrap: str, topic: str, n: int) -> list[dict]:
    """``n`` impressions of the slice as the event contract has them, then made hostile: unseen ids, missing
    fields, extreme numerics."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    events = []
    for message in consumer:
        event = msgpack.unpackb(message.value, raw=False)
        if isinstance(event, dict) and "item_id" in event:
            events.append(event)
        if len(events) >= n:
            break
    consumer.close()
    assert len(events) == n
    extremes = [1e30, -1e30, 0.0, 3.5e9, -7.25, 1e-30, 2**53]
    for i, event in enumerate(events):
        event["features"] = dict(event.get("features") or {})
        event.pop("v", None)
        if i % 7 == 0:
            event["user_id"], event["item_id"] = f"unseen-user-{i}", f"unseen-item-{i}"
        if i % 5 == 0:
            for name in ("hour", "duration_ms"):
                event["features"].pop(name, None)
        if i % 9 == 0:
            event["features"] = {}
        if i % 11 == 0:
            event["features"]["duration_ms"] = extremes[i % len(extremes)]
    return events


BACKBONES = ["shared_bottom", "mmoe", "ple", "cross_stitch"]


@pytest.fixture(scope="module")
def onnx_models(kafka_broker: str, kuairand_slice: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Serve]]]:
    """One trainer per backbone, publishing its graph, then a ``crossdistil serve`` of each serving topic, all four
    at once (each is mostly start-up and waiting; one after the other they took ~20 s a backbone): backbone ->
    (its serving topic, its serve)."""
    directory = tmp_path_factory.mktemp("onnx")
    with concurrent.futures.ThreadPoolExecutor(len(BACKBONES)) as pool:
        runs = {backbone: pool.submit(train, kafka_broker, kuairand_slice, directory / backbone,
                                      backbone=backbone, onnx=True) for backbone in BACKBONES}
        topics = {backbone: run.result() for backbone, run in runs.items()}
    serves: dict[str, Serve] = {}
    try:
        for backbone, topic in topics.items():
            serves[backbone] = Serve(kafka_broker, topic, directory / f"serve-{backbone}.log")
        yield {backbone: (topics[backbone], serves[backbone]) for backbone in BACKBONES}
    finally:
        for serve in serves.values():
            serve.process.terminate()  # all at once, then each waited for
        for serve in serves.values():
            serve.stop()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_onnxruntime_on_the_graph_fetched_off_the_topic_answers_as_serve_does(
        kafka_broker: str, kuairand_slice: dict[str, str], onnx_models: dict[str, tuple[str, Serve]],
        backbone: str) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime runs the graph (the peers extra)")
    topic, serve = onnx_models[backbone]
    checkpoint = reader.slow_path(kafka_broker, topic).accepted[-1]
    contract = json.loads(checkpoint.metadata["serving"]["onnx"])
    graph = checkpoint.tensors()[contract["tensor"]]
    session = onnxruntime.InferenceSession(graph.tobytes(), providers=["CPUExecutionProvider"])
    impressions = impressions_to_score(kafka_broker, kuairand_slice["impressions"], SCORED)
    (probabilities,) = session.run(["probabilities"], reader.graph_inputs(impressions, contract))
    tasks = contract["outputs"][0]["tasks"]
    assert probabilities.shape == (SCORED, len(TASKS)) and tasks == list(TASKS)

    serve.wait_for(lambda: serve.version() == checkpoint.version, f"version {checkpoint.version}")
    answer = serve.score(impressions)
    assert answer["model_version"] == checkpoint.version
    served = np.array([answer["probabilities"][task] for task in tasks], dtype=np.float64).T
    gap = float(np.abs(probabilities.astype(np.float64) - served).max())
    spread = float(served.std())
    print(f"\n{backbone}: version {checkpoint.version}, graph {graph.nbytes} bytes, max |onnxruntime - /score| "
          f"= {gap:.2e} over {SCORED} impressions x {len(tasks)} tasks (probabilities' std {spread:.3f})")
    assert gap <= 1e-5
    assert spread > 1e-3  # the model tells impressions apart: a constant answer would match trivially
    inputs = reader.graph_inputs(impressions, contract)
    inputs["categorical"] = np.roll(inputs["categorical"], 1, axis=0)  # each impression with its neighbour's ids
    (misfed,) = session.run(["probabilities"], inputs)
    assert float(np.abs(misfed - served).max()) > 100 * 1e-5  # the comparison sees a wrong input
