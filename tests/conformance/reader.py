"""A reader of the serving topic written only from docs/wire-format.md and docs/features.md.

It plays the outside team of issue 19: no import of the project (``consumers``, ``models``, ``streamer``;
``tests/unit/test_conformance_reader_imports.py`` checks), only kafka-python, msgpack, safetensors, numpy and
hashlib (onnxruntime in the tests that run the graph). Every rule below cites the section of the docs it comes
from; where the bytes disagree with a doc, the doc is what gets fixed, never this reader.

* ``TopicReader``: "Reading" and "Rejection codes" of wire-format.md, as a stateful reader of ``(key, value)``.
* ``encode``: "Writing" of wire-format.md (the trainer's messages must come out byte-identical).
* ``slow_path`` / ``fast_path`` / ``consume``: "Finding the latest checkpoint", with plain kafka-python.
* ``manifest_problems`` / ``chunk_problems``: the field tables, every documented field and type.
* ``feature_row`` / ``graph_inputs``: docs/features.md, the inputs of the published ONNX graph.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

DOCS = Path(__file__).resolve().parents[2] / "docs"
WIRE_DOC = DOCS / "wire-format.md"

FORMAT = 1
MANIFEST = b"manifest"
CHUNK_KEY = re.compile(rb"^chunk/(0|[1-9][0-9]*)$")  # "decimal, no leading zeros"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # "lowercase hex sha256"
TRAINER_CHUNK_BYTES = 900_000  # "The trainer publishes chunks of 900,000 bytes"
CODES = ("oversize", "unknown_key", "not_msgpack", "bad_header", "unsupported_format", "key_mismatch",
         "corrupt_chunk", "missing_chunk", "size_mismatch", "hash_mismatch", "bad_payload", "stale_version",
         "evicted")


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and SHA256_HEX.match(value) is not None


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the manifest map as published and the payload's bytes."""

    version: int
    manifest: dict[str, Any]
    payload: bytes

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest["metadata"]

    def tensors(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        return load(self.payload)


@dataclass(frozen=True)
class Rejection:
    code: str
    version: int | None
    detail: str = ""


@dataclass
class _Buffer:
    sha: str
    count: int
    chunks: dict[int, bytes] = field(default_factory=dict)


class TopicReader:
    """wire-format.md, "Reading": feed messages in offset order; verified checkpoints come out, in version order.

    Every rejection is one of the documented codes, checked in the order the docs define them.
    """

    def __init__(self, max_versions: int = 4, max_payload_bytes: int = 1 << 30,
                 max_message_bytes: int = 16 << 20, last_version: int = -1) -> None:
        self.max_versions = max_versions
        self.max_payload_bytes = max_payload_bytes
        self.max_message_bytes = max_message_bytes
        self.last_version = last_version
        self.accepted: list[Checkpoint] = []
        self.rejections: list[Rejection] = []
        self._buffers: dict[int, _Buffer] = {}

    def feed_all(self, messages: Any) -> TopicReader:
        for key, value in messages:
            self.feed(key, value)
        return self

    def feed(self, key: bytes | None, value: bytes | None) -> Checkpoint | Rejection | None:
        if value is None:  # "a tombstone ... readers skip it"
            return None
        if len(value) > self.max_message_bytes:
            return self._reject("oversize", None, f"{len(value)} bytes")
        if key == MANIFEST:
            kind, index = "manifest", None
        else:
            match = CHUNK_KEY.match(key or b"")
            if match is None:
                return self._reject("unknown_key", None, repr(key))
            kind, index = "chunk", int(match.group(1))
        try:
            m = msgpack.unpackb(value, raw=False)
        except Exception as exc:
            return self._reject("not_msgpack", None, str(exc))
        if not isinstance(m, dict):
            return self._reject("bad_header", None, "not a map")
        if m.get("format") != FORMAT:
            return self._reject("unsupported_format", None, f"format {m.get('format')!r}")
        version = m.get("version")
        if not _is_int(version):
            return self._reject("bad_header", None, f"version {version!r}")
        if m.get("kind") != kind:
            return self._reject("key_mismatch", version, f"{key!r} carries kind {m.get('kind')!r}")
        return self._chunk(index, version, m) if kind == "chunk" else self._manifest(version, m)

    def _chunk(self, index: int, version: int, m: dict) -> Rejection | None:
        if version <= self.last_version:  # "drop buffers of versions at or below the last accepted one"
            return None
        data, count = m.get("data"), m.get("count")
        if (m.get("index") != index or not _is_int(count, 1) or not isinstance(data, bytes)
                or not _is_sha(m.get("payload_sha256")) or not _is_sha(m.get("chunk_sha256")) or index >= count):
            return self._reject("bad_header", version, f"chunk {index}")
        if hashlib.sha256(data).hexdigest() != m["chunk_sha256"]:
            return self._reject("corrupt_chunk", version, f"chunk {index}")
        buffer = self._buffers.get(version)
        if buffer is None or buffer.sha != m["payload_sha256"] or buffer.count != count:
            if version not in self._buffers and len(self._buffers) >= self.max_versions:
                oldest = min(self._buffers)
                if version < oldest:
                    return self._reject("evicted", version, "older than every buffered version")
                del self._buffers[oldest]
                self._reject("evicted", oldest, "the oldest buffered version")
            buffer = self._buffers[version] = _Buffer(m["payload_sha256"], count)
        buffer.chunks[index] = data
        if sum(map(len, buffer.chunks.values())) > self.max_payload_bytes:
            del self._buffers[version]
            return self._reject("oversize", version, "buffered chunks")
        return None

    def _manifest(self, version: int, m: dict) -> Checkpoint | Rejection:
        buffer = self._buffers.pop(version, None)
        if version <= self.last_version:
            return self._reject("stale_version", version, f"accepted {self.last_version}")
        chunks, size, sha = m.get("chunks"), m.get("size"), m.get("payload_sha256")
        if not _is_int(chunks, 1) or not _is_int(size) or not _is_sha(sha) or not isinstance(m.get("metadata"), dict):
            return self._reject("bad_header", version, "manifest fields")
        if m.get("payload_format") != "safetensors":
            return self._reject("unsupported_format", version, f"payload_format {m.get('payload_format')!r}")
        if size > self.max_payload_bytes:
            return self._reject("oversize", version, f"size {size}")
        if buffer is None or buffer.sha != sha or buffer.count != chunks:
            return self._reject("missing_chunk", version, "no chunk of this payload")
        missing = [i for i in range(chunks) if i not in buffer.chunks]
        if missing:
            return self._reject("missing_chunk", version, f"chunks {missing}")
        payload = b"".join(buffer.chunks[i] for i in range(chunks))
        if len(payload) != size:
            return self._reject("size_mismatch", version, f"{len(payload)} != {size}")
        if hashlib.sha256(payload).hexdigest() != sha:
            return self._reject("hash_mismatch", version)
        try:
            safetensors_header(payload)
            from safetensors.numpy import load

            load(payload)
        except Exception as exc:
            return self._reject("bad_payload", version, str(exc))
        self.last_version = version
        self._buffers = {v: b for v, b in self._buffers.items() if v > version}
        checkpoint = Checkpoint(version, m, payload)
        self.accepted.append(checkpoint)
        return checkpoint

    def _reject(self, code: str, version: int | None, detail: str = "") -> Rejection:
        rejection = Rejection(code, version, detail)
        self.rejections.append(rejection)
        return rejection


def safetensors_header(payload: bytes) -> dict[str, Any]:
    """wire-format.md: "a little-endian 8-byte header length, a JSON header, then the raw tensor bytes"."""
    (length,) = struct.unpack("<Q", payload[:8])
    if length > len(payload) - 8:
        raise ValueError(f"header length {length} beyond the payload")
    return json.loads(payload[8:8 + length])


# ------------------------------------------------------------------------------------------------ writing


def encode(payload: bytes, metadata: dict[str, Any], version: int, chunk_size: int,
           previous_chunk_count: int = 0) -> list[tuple[bytes, bytes | None]]:
    """wire-format.md, "Writing" and the field tables (maps packed in the tables' field order)."""
    sha = hashlib.sha256(payload).hexdigest()
    count = max(1, math.ceil(len(payload) / chunk_size))
    messages: list[tuple[bytes, bytes | None]] = []
    for i in range(count):
        data = payload[i * chunk_size:(i + 1) * chunk_size]
        messages.append((b"chunk/%d" % i, msgpack.packb(
            {"format": FORMAT, "kind": "chunk", "version": version, "index": i, "count": count,
             "payload_sha256": sha, "chunk_sha256": hashlib.sha256(data).hexdigest(), "data": data},
            use_bin_type=True)))
    tombstones = [(b"chunk/%d" % j, None) for j in range(count, previous_chunk_count)]
    messages += tombstones
    messages.append((MANIFEST, msgpack.packb(
        {"format": FORMAT, "kind": "manifest", "version": version, "chunks": count, "size": len(payload),
         "chunk_size": chunk_size, "payload_format": "safetensors", "payload_sha256": sha,
         "span": count + len(tombstones), "metadata": metadata}, use_bin_type=True)))
    return messages


# ------------------------------------------------------------------------------------------------ fields


CHUNK_FIELDS = ("format", "kind", "version", "index", "count", "payload_sha256", "chunk_sha256", "data")
MANIFEST_FIELDS = ("format", "kind", "version", "chunks", "size", "chunk_size", "payload_format", "payload_sha256",
                   "span", "metadata")


def chunk_problems(key: bytes, m: dict[str, Any]) -> list[str]:
    """Departures of one chunk map from wire-format.md's "Chunk map" table."""
    problems = []
    if tuple(m) != CHUNK_FIELDS:
        problems.append(f"fields {list(m)}, documented {list(CHUNK_FIELDS)}")
    match = CHUNK_KEY.match(key)
    if match is None or m.get("index") != int(match.group(1)):
        problems.append(f"key {key!r} and index {m.get('index')!r}")
    if not (m.get("format") == FORMAT and m.get("kind") == "chunk" and _is_int(m.get("version"))
            and _is_int(m.get("count"), 1) and _is_sha(m.get("payload_sha256")) and isinstance(m.get("data"), bytes)
            and m.get("chunk_sha256") == hashlib.sha256(m.get("data") or b"").hexdigest()):
        problems.append(f"chunk {key!r}: a field has the wrong value or type")
    return problems


def manifest_problems(m: dict[str, Any]) -> list[str]:
    """Departures of one manifest map from wire-format.md's "Manifest map" table and its ``metadata`` paragraph."""
    problems = []
    if tuple(m) != MANIFEST_FIELDS:
        problems.append(f"fields {list(m)}, documented {list(MANIFEST_FIELDS)}")
    types = {"format": m.get("format") == FORMAT, "kind": m.get("kind") == "manifest",
             "version": _is_int(m.get("version")), "chunks": _is_int(m.get("chunks"), 1),
             "size": _is_int(m.get("size")), "chunk_size": _is_int(m.get("chunk_size"), 1),
             "payload_format": m.get("payload_format") == "safetensors",
             "payload_sha256": _is_sha(m.get("payload_sha256")),
             "span": _is_int(m.get("span")), "metadata": isinstance(m.get("metadata"), dict)}
    problems += [f"manifest field {name}: {m.get(name)!r}" for name, ok in types.items() if not ok]
    if isinstance(m.get("metadata"), dict):
        problems += metadata_problems(m["metadata"])
    return problems


METADATA_FIELDS = ("step", "watermark_ms", "offsets", "metrics", "config_hash", "tasks", "published_at_ms", "serving")
ROLES = ("student", "teacher")
METRICS = ("auc", "gauc", "log_loss", "calibration_ratio", "positive_rate", "samples", "auc_drift")
WINDOWS = ("10000", "100000", "1000000", "lifetime")


def metadata_problems(md: dict[str, Any]) -> list[str]:
    """The trainer's ``metadata`` as wire-format.md describes it, field by field."""
    problems = []
    if tuple(md) != METADATA_FIELDS:
        problems.append(f"metadata fields {list(md)}, documented {list(METADATA_FIELDS)}")
    if not _is_int(md.get("step")):
        problems.append(f"step {md.get('step')!r}")
    if md.get("watermark_ms") is not None and not _is_int(md["watermark_ms"]):
        problems.append(f"watermark_ms {md['watermark_ms']!r}")
    offsets = md.get("offsets")
    if not isinstance(offsets, list) or not all(
            isinstance(o, list) and len(o) == 3 and isinstance(o[0], str) and _is_int(o[1]) and _is_int(o[2])
            for o in offsets):
        problems.append(f"offsets {offsets!r}")
    problems += metrics_problems(md.get("metrics"), md.get("tasks"))
    if not _is_sha(md.get("config_hash")):
        problems.append(f"config_hash {md.get('config_hash')!r}")
    serving = md.get("serving")
    if not isinstance(serving, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in serving.items()):
        problems.append("serving is not a map of strings")
    else:
        if (serving.get("format"), serving.get("version")) != ("crossdistil-students", "1") or \
                not serving.get("steps", "").isdigit():
            problems.append(f"serving format, version or steps: {[serving.get(k) for k in ('format', 'version')]}")
        config = json.loads(serving.get("config", "null"))
        if not isinstance(config, dict) or not {"categorical", "numeric", "hash_buckets"} <= set(
                config.get("features") or {}):
            problems.append("serving.config has no feature spec under features")
        elif md.get("config_hash") != config_hash(serving["config"]):
            problems.append("config_hash is not the documented hash of serving.config")
        elif config.get("tasks") != md.get("tasks"):
            problems.append(f"tasks {md.get('tasks')!r} differ from the model's {config.get('tasks')!r}")
    if not isinstance(md.get("tasks"), list) or not all(isinstance(t, str) for t in md["tasks"]):
        problems.append(f"tasks {md.get('tasks')!r}")
    if not _is_int(md.get("published_at_ms")) or abs(md["published_at_ms"] / 1000 - time.time()) > 86_400:
        problems.append(f"published_at_ms {md.get('published_at_ms')!r}")
    return problems


def metrics_problems(metrics: Any, tasks: Any) -> list[str]:
    """``metrics``: task -> role -> metric -> window -> number or null, plus task -> ``drift_detections`` ->
    detector -> count (and ``kd_gate`` -> field -> value)."""
    if not isinstance(metrics, dict) or set(metrics) != set(tasks or ()):
        return [f"metrics tasks {sorted(metrics) if isinstance(metrics, dict) else metrics!r} != tasks {tasks!r}"]
    problems = []
    for task, by_role in metrics.items():
        for role, by_metric in by_role.items():
            if role == "drift_detections":
                if not all(isinstance(k, str) and _is_int(v) for k, v in by_metric.items()):
                    problems.append(f"metrics.{task}.drift_detections {by_metric!r}")
                continue
            if role == "kd_gate":
                continue
            if role not in ROLES:
                problems.append(f"metrics.{task}: undocumented role {role!r}")
                continue
            for metric, by_window in by_metric.items():
                windows = {w.split("/")[0] if metric == "auc_drift" else w for w in by_window}
                if metric not in METRICS or not windows <= set(WINDOWS):
                    problems.append(f"metrics.{task}.{role}: undocumented {metric!r} {sorted(windows)}")
                if not isinstance(by_window, dict) or not all(isinstance(w, str) and (v is None or isinstance(
                        v, (int, float))) for w, v in by_window.items()):
                    problems.append(f"metrics.{task}.{role}.{metric} {by_window!r}")
        if "student" not in by_role or "auc" not in by_role["student"] or "log_loss" not in by_role["student"]:
            problems.append(f"metrics.{task} has no student auc and log_loss: {sorted(by_role)}")
    return problems


def config_hash(config_json: str) -> str:
    """wire-format.md: sha256 of the model configuration as canonical JSON (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(json.loads(config_json), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ Kafka


@dataclass(frozen=True)
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


def _consumer(bootstrap: str):
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                         max_partition_fetch_bytes=32 << 20, fetch_max_bytes=64 << 20)


def consume(bootstrap: str, topic: str, start: int | None = None, stop: int | None = None,
            timeout_s: float = 60.0) -> list[Record]:
    """Partition 0 of ``topic`` from ``start`` (default: the beginning) up to ``stop`` (default: the end now)."""
    from kafka import TopicPartition

    consumer = _consumer(bootstrap)
    tp = TopicPartition(topic, 0)
    try:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp] if stop is None else stop
        if start is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, start)
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} up to offset {end} in {timeout_s} s")
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                if record.offset < end:
                    records.append(Record(record.offset, record.key, record.value))
        return records
    finally:
        consumer.close()


def end_offset(bootstrap: str, topic: str) -> int:
    from kafka import TopicPartition

    consumer = _consumer(bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def slow_path(bootstrap: str, topic: str) -> TopicReader:
    """"Slow path": read from the beginning; ``.accepted`` holds every verified checkpoint, ``[-1]`` the latest."""
    return TopicReader().feed_all((r.key, r.value) for r in consume(bootstrap, topic))


def fast_path(bootstrap: str, topic: str) -> Checkpoint | None:
    """"Fast path": the last message; if it is a manifest, the ``span`` messages before it. None: use the slow path."""
    end = end_offset(bootstrap, topic)
    if end == 0:
        return None
    (last,) = consume(bootstrap, topic, start=end - 1, stop=end)
    if last.key != MANIFEST or last.value is None:
        return None
    span = msgpack.unpackb(last.value, raw=False).get("span")
    if not _is_int(span):
        return None
    reader = TopicReader().feed_all((r.key, r.value) for r in consume(bootstrap, topic, start=max(0, end - 1 - span),
                                                                       stop=end))
    return reader.accepted[-1] if reader.accepted else None


def minimal_reader_from_docs():
    """The function printed in wire-format.md, "A complete minimal reader", exactly as printed."""
    text = WIRE_DOC.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def latest_checkpoint" in b)
    namespace: dict[str, Any] = {}
    exec(compile(block, str(WIRE_DOC), "exec"), namespace)  # the project's own documentation
    return namespace["latest_checkpoint"]


# ------------------------------------------------------------------------------------------------ features


def feature_row(field_name: str, value: Any, hash_buckets: int) -> int:
    """docs/features.md, "Categorical fields": blake2b (digest_size 8) of UTF-8 ``field=str(value)``, read as
    little-endian unsigned 64-bit, modulo the table size; a missing value is the empty string."""
    text = "" if value is None else str(value)
    digest = hashlib.blake2b(f"{field_name}={text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % hash_buckets


def field_value(impression: dict[str, Any], name: str) -> Any:
    """docs/features.md, "Where each field comes from": user_id and item_id from the top level, others from features."""
    if name in ("user_id", "item_id"):
        return impression.get(name)
    return (impression.get("features") or {}).get(name)


def graph_inputs(impressions: list[dict[str, Any]], contract: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs as features.md and the published contract (``metadata.serving.onnx``) define them."""
    inputs = {spec["name"]: spec for spec in contract["inputs"]}
    categorical, numeric = inputs["categorical"], inputs["numeric"]
    buckets = categorical["hash_buckets"]
    rows = np.array([[feature_row(name, field_value(imp, name), buckets) for name in categorical["fields"]]
                     for imp in impressions], dtype=np.int64).reshape(len(impressions), len(categorical["fields"]))
    raw = np.array([[float(field_value(imp, name) or 0) for name in numeric["fields"]] for imp in impressions],
                   dtype=np.float32).reshape(len(impressions), len(numeric["fields"]))
    return {"categorical": rows, "numeric": raw}
