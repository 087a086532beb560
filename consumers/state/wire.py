"""The checkpoint wire format of the serving topic: pure encode and decode, no Kafka.

A checkpoint travels as ``chunk/<i>`` messages carrying slices of one safetensors payload, then one
``manifest`` message that names the version, the chunk count, the payload's sha256 and the model metadata.
Every value is a msgpack map; nothing is pickled. The full specification, written for third-party readers,
is docs/wire-format.md; this module is its reference implementation.

>>> import torch
>>> messages = encode_checkpoint({"w": torch.ones(3)}, {"step": 5}, version=1, chunk_size=64)
>>> [key for key, _ in messages][-1]
b'manifest'
>>> reassembler = Reassembler()
>>> [c.version for c in reassembler.checkpoints(messages)]
[1]
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from consumers.state.tensors import safetensors_bytes

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
PAYLOAD_FORMAT = "safetensors"
MANIFEST_KEY = b"manifest"
CHUNK_KEY_PREFIX = b"chunk/"
DEFAULT_CHUNK_SIZE = 512 * 1024
# Kafka's default max.message.bytes is 1048588; a chunk value adds ~300 bytes of header to its data.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
# The largest message a reader of a serving topic accepts: the topic's max.message.bytes as the trainer makes it
# (streamer.topics.MODEL_MAX_MESSAGE_BYTES, 16 MiB) and a margin for a record's own bytes; no valid message is larger.
SERVING_TOPIC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024 + 64 * 1024
DEFAULT_MAX_VERSIONS = 4  # versions a Reassembler buffers chunks of at once (the oldest beyond are evicted)

_CHUNK_KEY = re.compile(rb"^chunk/(0|[1-9][0-9]{0,8})$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

Message = tuple[bytes, bytes | None]
"""(key, value) as produced to / consumed from the serving topic; value None is a tombstone."""


def publication_message_bytes(chunk_size: int) -> int:
    """The largest message a trainer's publication with chunks of ``chunk_size`` bytes may have (its encoder's
    ``max_message_bytes``): a chunk and its framing, the manifest at least ``DEFAULT_MAX_MESSAGE_BYTES``.

    >>> publication_message_bytes(900_000), publication_message_bytes(4_000_000)
    (1000000, 4065536)
    """
    return max(DEFAULT_MAX_MESSAGE_BYTES, chunk_size + 64 * 1024)


def chunk_key(index: int) -> bytes:
    """The key of chunk ``index``: ``b"chunk/<index in decimal>"``."""
    return CHUNK_KEY_PREFIX + str(index).encode("ascii")


def newer_format(found: Any, current: int) -> bool:
    """Whether ``found``, the format number a file or a message names, is a later one than ``current``, the newest
    this code writes: a newer crossdistil wrote it (an integer above ``current``; a bool, a string or a missing
    number is some other writer's, not a newer format).

    >>> newer_format(3, 2), newer_format(2, 2), newer_format(True, 0), newer_format("3", 2), newer_format(None, 2)
    (True, False, False, False, False)
    """
    return isinstance(found, int) and not isinstance(found, bool) and found > current


def stable_hash(config: Any) -> str:
    """sha256 hex of a plain value as canonical JSON (sorted keys): a config hash for the manifest."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    version: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    previous_chunk_count: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Message]:
    """The messages that publish ``tensors`` as checkpoint ``version``, in the order to produce them.

    ``metadata`` must hold ``step`` (int) and may hold ``watermark_ms`` (int), ``offsets`` (``[[topic,
    partition, next offset], ...]``), ``metrics`` (``{task: {name: number}}``), ``config_hash`` (str) and any
    other plain values. ``version`` must grow with every publication, across restarts too (readers ignore a
    version that is not newer than the last one they accepted). ``previous_chunk_count`` is the chunk count
    of the last checkpoint published to the topic: chunk keys it used beyond this one's count get
    tombstones, so compaction does not keep stale chunks forever.
    """
    return encode_payload(safetensors_bytes(tensors), metadata, version, chunk_size, previous_chunk_count,
                          max_message_bytes)


def encode_payload(
    payload: bytes,
    metadata: Mapping[str, Any],
    version: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    previous_chunk_count: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Message]:
    """``encode_checkpoint`` for an already serialised safetensors ``payload``."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be an integer >= 0, got {version!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    _check_metadata(metadata)
    payload_sha256 = hashlib.sha256(payload).hexdigest()
    count = max(1, math.ceil(len(payload) / chunk_size))
    messages: list[Message] = []
    for index in range(count):
        data = payload[index * chunk_size : (index + 1) * chunk_size]
        value = msgpack.packb(
            {
                "format": FORMAT_VERSION,
                "kind": "chunk",
                "version": version,
                "index": index,
                "count": count,
                "payload_sha256": payload_sha256,
                "chunk_sha256": hashlib.sha256(data).hexdigest(),
                "data": data,
            },
            use_bin_type=True,
        )
        if len(value) > max_message_bytes:
            raise ValueError(
                f"a chunk message would be {len(value)} bytes, over max_message_bytes={max_message_bytes}; "
                f"lower chunk_size (now {chunk_size}) or raise the topic's max.message.bytes"
            )
        messages.append((chunk_key(index), value))
    tombstones = [(chunk_key(index), None) for index in range(count, previous_chunk_count)]
    messages += tombstones
    try:
        manifest = msgpack.packb(
            {
                "format": FORMAT_VERSION,
                "kind": "manifest",
                "version": version,
                "chunks": count,
                "size": len(payload),
                "chunk_size": chunk_size,
                "payload_format": PAYLOAD_FORMAT,
                "payload_sha256": payload_sha256,
                "span": count + len(tombstones),
                "metadata": dict(metadata),
            },
            use_bin_type=True,
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata must hold plain values only (msgpack-able): {exc}") from exc
    if len(manifest) > max_message_bytes:
        raise ValueError(f"the manifest would be {len(manifest)} bytes, over max_message_bytes={max_message_bytes}")
    messages.append((MANIFEST_KEY, manifest))
    return messages


def manifest_version(key: bytes | None, value: bytes | None) -> int | None:
    """The version of a serving-topic message if it is a readable manifest, else None (chunks, tombstones, junk).

    >>> key, value = encode_checkpoint({}, {"step": 3}, version=7)[-1]
    >>> manifest_version(key, value), manifest_version(b"chunk/0", b"..."), manifest_version(MANIFEST_KEY, None)
    (7, None, None)
    """
    if key != MANIFEST_KEY or value is None:
        return None
    try:
        manifest = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:  # not msgpack: not a manifest this code wrote
        return None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    step = metadata.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"metadata['step'] must be an integer >= 0, got {step!r}")
    watermark = metadata.get("watermark_ms")
    if watermark is not None and (not isinstance(watermark, int) or isinstance(watermark, bool)):
        raise ValueError(f"metadata['watermark_ms'] must be an integer or None, got {watermark!r}")
    offsets = metadata.get("offsets", [])
    if not isinstance(offsets, (list, tuple)) or not all(
        isinstance(o, (list, tuple)) and len(o) == 3
        and isinstance(o[0], str) and isinstance(o[1], int) and isinstance(o[2], int)
        for o in offsets
    ):
        raise ValueError("metadata['offsets'] must be a list of [topic, partition, next offset]")
    metrics = metadata.get("metrics", {})
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise ValueError("metadata['metrics'] must map each task to {metric name: number}")
    config_hash = metadata.get("config_hash")
    if config_hash is not None and not isinstance(config_hash, str):
        raise ValueError(f"metadata['config_hash'] must be a string, got {config_hash!r}")


@dataclass(frozen=True)
class WireCheckpoint:
    """A verified checkpoint from the serving topic."""

    version: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    manifest: dict[str, Any]  # the manifest's transport fields (everything but "metadata")
    payload_sha256: str


@dataclass(frozen=True)
class Rejection:
    """Why a message or a checkpoint was rejected. ``reason`` is a short code (see docs/wire-format.md)."""

    version: int | None
    reason: str
    detail: str


@dataclass
class _Assembly:
    payload_sha256: str
    count: int
    chunks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Consumes serving-topic messages in offset order and yields verified, complete checkpoints.

    Chunks are buffered per version (versions may interleave); a ``manifest`` completes its version if every
    chunk is there and the sha256 of the whole payload matches. Only versions newer than the last accepted
    one (``last_version``, initially ``min_version``) are accepted. Memory is bounded by ``max_versions``
    buffered versions of at most ``max_payload_bytes`` each.
    """

    def __init__(
        self,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES + 4096,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        min_version: int = -1,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_message_bytes = max_message_bytes
        self.max_versions = max_versions
        self.last_version = min_version
        self.rejections: deque[Rejection] = deque(maxlen=100)
        self.ignored = 0  # tombstones and chunks of versions not newer than last_version
        self._assemblies: dict[int, _Assembly] = {}

    def checkpoints(self, messages: Iterable[tuple[bytes | None, bytes | None]]) -> Iterator[WireCheckpoint]:
        """Feed ``messages`` in order; yield each verified checkpoint (rejections go to ``rejections``)."""
        for key, value in messages:
            outcome = self.feed(key, value)
            if isinstance(outcome, WireCheckpoint):
                yield outcome

    def feed(self, key: bytes | None, value: bytes | None) -> WireCheckpoint | Rejection | None:
        """Consume one message: a verified checkpoint, a rejection, or None (buffered or ignored)."""
        if value is None:
            self.ignored += 1  # tombstone: only there for compaction
            return None
        if len(value) > self.max_message_bytes:
            return self._reject(None, "oversize", f"message of {len(value)} bytes, limit {self.max_message_bytes}")
        if key == MANIFEST_KEY:
            kind, index = "manifest", None
        else:
            match = _CHUNK_KEY.match(key or b"")
            if match is None:
                return self._reject(None, "unknown_key", f"key {key!r} is neither b'manifest' nor b'chunk/<i>'")
            kind, index = "chunk", int(match.group(1))
        try:
            header = msgpack.unpackb(value, raw=False)
        except Exception as exc:  # any malformed input: msgpack raises several exception types
            return self._reject(None, "not_msgpack", f"{kind} value is not msgpack: {exc}")
        if not isinstance(header, dict):
            return self._reject(None, "bad_header", f"{kind} value is a {type(header).__name__}, expected a map")
        version = header.get("version")
        if header.get("format") != FORMAT_VERSION:
            found = header.get("format")
            return self._reject(version if _is_count(version) else None, "unsupported_format",
                                f"format {found!r}; this reader reads {FORMAT_VERSION}"
                                + (" (a newer crossdistil wrote it: upgrade the readers before the writer)"
                                   if newer_format(found, FORMAT_VERSION) else ""))
        if not _is_count(version):
            return self._reject(None, "bad_header", f"version {version!r} is not an integer >= 0")
        if header.get("kind") != kind:
            return self._reject(version, "key_mismatch", f"key {key!r} carries a {header.get('kind')!r} value")
        if kind == "chunk":
            return self._feed_chunk(index, version, header)
        return self._feed_manifest(version, header)

    def _feed_chunk(self, index: int | None, version: int, header: dict[str, Any]) -> Rejection | None:
        if version <= self.last_version:
            self.ignored += 1
            return None
        count, data, payload_sha256 = header.get("count"), header.get("data"), header.get("payload_sha256")
        if (
            header.get("index") != index
            or not _is_count(count)
            or count < 1
            or not isinstance(data, bytes)
            or not _is_sha256(payload_sha256)
            or not _is_sha256(header.get("chunk_sha256"))
        ):
            return self._reject(version, "bad_header",
                                f"chunk {index}: header fields missing, mistyped or not matching the key")
        if index >= count:
            return self._reject(version, "bad_header", f"chunk index {index} >= chunk count {count}")
        if hashlib.sha256(data).hexdigest() != header["chunk_sha256"]:
            return self._reject(version, "corrupt_chunk",
                                f"chunk {index}: sha256 of its data does not match its header")
        assembly = self._assemblies.get(version)
        if assembly is None or assembly.payload_sha256 != payload_sha256 or assembly.count != count:
            # A new version, or the same version published again with other content: start over.
            if version not in self._assemblies and len(self._assemblies) >= self.max_versions:
                oldest = min(self._assemblies)
                detail = f"more than {self.max_versions} versions in flight; dropped the oldest"
                if version < oldest:
                    return self._reject(version, "evicted", detail)
                del self._assemblies[oldest]
                self._reject(oldest, "evicted", detail)
            assembly = self._assemblies[version] = _Assembly(payload_sha256, count)
        previous = assembly.chunks.get(index)
        assembly.size += len(data) - (len(previous) if previous is not None else 0)
        assembly.chunks[index] = data
        if assembly.size > self.max_payload_bytes:
            del self._assemblies[version]
            return self._reject(version, "oversize", f"chunks exceed max_payload_bytes={self.max_payload_bytes}")
        return None

    def _feed_manifest(self, version: int, header: dict[str, Any]) -> WireCheckpoint | Rejection:
        assembly = self._assemblies.pop(version, None)
        if version <= self.last_version:
            return self._reject(version, "stale_version",
                                f"version {version} is not newer than the accepted {self.last_version}")
        count, size, payload_sha256 = header.get("chunks"), header.get("size"), header.get("payload_sha256")
        metadata = header.get("metadata")
        if (not _is_count(count) or count < 1 or not _is_count(size) or not _is_sha256(payload_sha256)
                or not isinstance(metadata, dict)):
            return self._reject(version, "bad_header",
                                "manifest: chunks, size, payload_sha256 or metadata missing or mistyped")
        if header.get("payload_format") != PAYLOAD_FORMAT:
            return self._reject(version, "unsupported_format", f"payload format {header.get('payload_format')!r}")
        if size > self.max_payload_bytes:
            return self._reject(version, "oversize", f"payload of {size} bytes, limit {self.max_payload_bytes}")
        if assembly is None or assembly.payload_sha256 != payload_sha256 or assembly.count != count:
            return self._reject(version, "missing_chunk", f"none of the {count} chunks of this payload were seen")
        missing = [i for i in range(count) if i not in assembly.chunks]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            return self._reject(version, "missing_chunk", f"{len(missing)} of {count} chunks missing: {shown}")
        payload = b"".join(assembly.chunks[i] for i in range(count))
        if len(payload) != size:
            return self._reject(version, "size_mismatch", f"chunks hold {len(payload)} bytes, the manifest says {size}")
        if hashlib.sha256(payload).hexdigest() != payload_sha256:
            return self._reject(version, "hash_mismatch",
                                "sha256 of the reassembled payload does not match the manifest")
        try:
            from safetensors.torch import load

            tensors = load(payload)
        except Exception as exc:  # a verified payload that is not safetensors: the writer is broken
            return self._reject(version, "bad_payload", f"payload is not valid safetensors: {exc}")
        self.last_version = version
        for stale in [v for v in self._assemblies if v <= version]:
            del self._assemblies[stale]
        manifest = {k: v for k, v in header.items() if k != "metadata"}
        return WireCheckpoint(version, tensors, metadata, manifest, payload_sha256)

    def _reject(self, version: int | None, reason: str, detail: str) -> Rejection:
        rejection = Rejection(version, reason, detail)
        self.rejections.append(rejection)
        return rejection


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256_HEX.match(value) is not None
