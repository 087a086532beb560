"""Specification of the serving-topic wire format (consumers/state/wire.py, docs/wire-format.md)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.state.wire import (
    MANIFEST_KEY,
    Reassembler,
    Rejection,
    WireCheckpoint,
    chunk_key,
    encode_checkpoint,
    encode_payload,
    stable_hash,
)

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[4] / "docs" / "wire-format.md"


def model(seed: int, size: int = 300) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"tower.like.weight": torch.randn(size, generator=generator), "step_count": torch.tensor([seed])}


def metadata(step: int) -> dict:
    return {
        "step": step,
        "watermark_ms": 1_700_000_000_000 + step,
        "offsets": [["impressions", 0, 10 * step], ["feedback", 0, 5 * step]],
        "metrics": {"like": {"auc": 0.71}, "finish": {"auc": 0.66}},
        "config_hash": stable_hash({"lr": 0.01}),
    }


def publish(version: int, chunk_size: int = 256, **kwargs) -> list[tuple[bytes, bytes | None]]:
    return encode_checkpoint(model(version), metadata(version), version=version, chunk_size=chunk_size, **kwargs)


def outcomes(reassembler: Reassembler, messages) -> list:
    return [o for o in (reassembler.feed(k, v) for k, v in messages) if o is not None]


def rewrite(value: bytes, **changes) -> bytes:
    fields = msgpack.unpackb(value, raw=False)
    fields.update(changes)
    return msgpack.packb(fields, use_bin_type=True)


def test_round_trip_gives_back_tensors_and_metadata_exactly():
    messages = publish(3)
    [checkpoint] = outcomes(Reassembler(), messages)
    assert isinstance(checkpoint, WireCheckpoint)
    assert checkpoint.version == 3
    assert checkpoint.metadata == metadata(3)
    for name, tensor in model(3).items():
        assert torch.equal(checkpoint.tensors[name], tensor)
    assert checkpoint.manifest["chunks"] == len(messages) - 1 > 3


def test_messages_are_chunks_in_order_then_the_manifest_last():
    messages = publish(1)
    keys = [key for key, _ in messages]
    assert keys == [chunk_key(i) for i in range(len(keys) - 1)] + [MANIFEST_KEY]
    assert all(value is not None and len(value) < 256 + 400 for _, value in messages[:-1])


def test_a_corrupted_chunk_is_rejected_and_its_checkpoint_never_accepted():
    messages = publish(1)
    key, value = messages[1]
    fields = msgpack.unpackb(value, raw=False)
    data = bytearray(fields["data"])
    data[0] ^= 1
    messages[1] = (key, rewrite(value, data=bytes(data)))
    results = outcomes(Reassembler(), messages)
    assert [(r.reason, r.version) for r in results] == [("corrupt_chunk", 1), ("missing_chunk", 1)]


def test_a_payload_that_does_not_match_its_hash_is_rejected_even_with_consistent_chunk_hashes():
    messages = publish(1)
    key, value = messages[0]
    data = bytearray(msgpack.unpackb(value, raw=False)["data"])
    data[-1] ^= 1
    messages[0] = (key, rewrite(value, data=bytes(data), chunk_sha256=hashlib.sha256(bytes(data)).hexdigest()))
    [rejection] = outcomes(Reassembler(), messages)
    assert rejection.reason == "hash_mismatch"


def test_a_missing_chunk_rejects_the_checkpoint_and_says_which():
    messages = publish(1)
    del messages[2]
    [rejection] = outcomes(Reassembler(), messages)
    assert rejection.reason == "missing_chunk"
    assert "chunks missing: 2" in rejection.detail


def test_a_manifest_without_any_chunk_is_rejected():
    [rejection] = outcomes(Reassembler(), publish(1)[-1:])
    assert rejection.reason == "missing_chunk"


def test_interleaved_versions_are_reassembled_separately():
    first, second = publish(1), publish(2)
    chunks_1, manifest_1 = first[:-1], first[-1]
    chunks_2, manifest_2 = second[:-1], second[-1]
    interleaved = [m for pair in zip(chunks_2, chunks_1) for m in pair]  # same keys, different versions
    interleaved += chunks_2[len(chunks_1) :] + chunks_1[len(chunks_2) :]
    accepted = [o.version for o in outcomes(Reassembler(), interleaved + [manifest_1, manifest_2])]
    assert accepted == [1, 2]


def test_what_a_compacted_topic_keeps_yields_the_latest_checkpoint():
    compacted: dict[bytes, bytes | None] = {}  # last value per key, in first-write order, like compaction
    previous = 0
    for version in (1, 2, 3):
        messages = encode_checkpoint(model(version, size=300 - 80 * version), metadata(version), version,
                                     chunk_size=256, previous_chunk_count=previous)
        previous = len([k for k, v in messages if k != MANIFEST_KEY and v is not None])
        for key, value in messages:
            compacted[key] = value
    reassembler = Reassembler()
    accepted = [c.version for c in reassembler.checkpoints(compacted.items())]
    assert accepted == [3]
    assert list(reassembler.rejections) == []


def test_a_smaller_checkpoint_sends_tombstones_for_the_chunk_keys_it_no_longer_uses():
    messages = publish(1, previous_chunk_count=12)
    chunk_count = msgpack.unpackb(messages[-1][1], raw=False)["chunks"]
    tombstones = [key for key, value in messages if value is None]
    assert tombstones == [chunk_key(i) for i in range(chunk_count, 12)]
    assert msgpack.unpackb(messages[-1][1], raw=False)["span"] == 12


def test_the_manifest_span_locates_the_checkpoint_from_the_end_of_the_topic():
    topic = publish(1) + publish(2, previous_chunk_count=0)
    span = msgpack.unpackb(topic[-1][1], raw=False)["span"]
    tail = topic[len(topic) - 1 - span :]
    assert [c.version for c in Reassembler().checkpoints(tail)] == [2]


def test_versions_not_newer_than_the_accepted_one_are_ignored_or_rejected_as_stale():
    reassembler = Reassembler()
    assert [c.version for c in reassembler.checkpoints(publish(5))] == [5]
    results = outcomes(reassembler, publish(4))
    assert [r.reason for r in results] == ["stale_version"]
    assert reassembler.last_version == 5


def test_a_version_published_again_with_other_content_uses_the_latest_chunks():
    interrupted = publish(1)[:2]  # writer crashed mid-publication ...
    retried = encode_checkpoint(model(99), metadata(1), version=1, chunk_size=256)  # ... and reused the version
    [checkpoint] = outcomes(Reassembler(), interrupted + retried)
    assert torch.equal(checkpoint.tensors["tower.like.weight"], model(99)["tower.like.weight"])


def test_oversize_is_refused_by_the_writer_and_by_the_reader():
    with pytest.raises(ValueError, match="max_message_bytes"):
        encode_checkpoint(model(1), metadata(1), version=1, chunk_size=10_000, max_message_bytes=1_000)
    messages = publish(1)
    assert outcomes(Reassembler(max_message_bytes=100), messages[:1])[0].reason == "oversize"
    results = outcomes(Reassembler(max_payload_bytes=1_000), messages)
    assert {r.reason for r in results} == {"oversize"}
    assert not any(isinstance(r, WireCheckpoint) for r in results)


def test_a_verified_payload_that_is_not_safetensors_is_rejected():
    messages = encode_payload(b"\x80\x04 not safetensors, maybe a pickle", {"step": 1}, version=1)
    [rejection] = outcomes(Reassembler(), messages)
    assert rejection.reason == "bad_payload"


def test_foreign_and_malformed_messages_are_rejected_with_a_reason():
    reassembler = Reassembler()
    chunk_value = publish(1)[0][1]
    assert reassembler.feed(b"something-else", b"x").reason == "unknown_key"
    assert reassembler.feed(b"chunk/0", b"\xc1").reason == "not_msgpack"
    assert reassembler.feed(b"chunk/0", msgpack.packb([1, 2])).reason == "bad_header"
    assert reassembler.feed(b"chunk/0", rewrite(chunk_value, format=2)).reason == "unsupported_format"
    assert reassembler.feed(b"manifest", chunk_value).reason == "key_mismatch"
    assert reassembler.feed(b"chunk/1", chunk_value).reason == "bad_header"  # header says index 0
    assert reassembler.feed(b"chunk/0", None) is None  # tombstones are skipped
    assert len(reassembler.rejections) == 6


def test_too_many_versions_in_flight_evicts_the_oldest():
    reassembler = Reassembler(max_versions=2)
    for version in (1, 2, 3):
        reassembler.feed(*publish(version)[0])
    assert [(r.version, r.reason) for r in reassembler.rejections] == [(1, "evicted")]


def test_the_writer_refuses_metadata_without_a_step_or_with_wrong_types():
    with pytest.raises(ValueError, match="step"):
        encode_checkpoint(model(1), {}, version=1)
    with pytest.raises(ValueError, match="offsets"):
        encode_checkpoint(model(1), {"step": 1, "offsets": {"impressions": 3}}, version=1)
    with pytest.raises(ValueError, match="version"):
        encode_checkpoint(model(1), {"step": 1}, version=-1)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from([b"manifest", b"chunk/0", b"chunk/7", b"x"]), value=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(key, value):
    outcome = Reassembler().feed(key, value)
    assert outcome is None or isinstance(outcome, (Rejection, WireCheckpoint))


# --------------------------------------------------------------------------------- the documented reader


def documented_reader():
    text = DOC.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def latest_checkpoint" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)  # our own documentation
    return namespace["latest_checkpoint"]


def test_the_reader_printed_in_the_docs_reads_the_latest_checkpoint():
    latest_checkpoint = documented_reader()
    broken = publish(3)
    del broken[1]
    version, meta, tensors = latest_checkpoint(publish(1) + publish(2) + broken)
    assert (version, meta) == (2, metadata(2))
    assert torch.equal(tensors["tower.like.weight"], model(2)["tower.like.weight"])


def test_the_documented_reader_skips_a_manifest_without_size_or_metadata():
    latest_checkpoint = documented_reader()
    for field in ("size", "metadata"):
        broken = publish(2)
        manifest = msgpack.unpackb(broken[-1][1], raw=False)
        del manifest[field]
        broken[-1] = (b"manifest", msgpack.packb(manifest, use_bin_type=True))
        assert latest_checkpoint(publish(1) + broken)[0] == 1, field


def test_the_documented_reader_skips_a_verified_payload_that_is_not_safetensors():
    latest_checkpoint = documented_reader()
    not_safetensors = encode_payload(b"\xff" * 40, metadata(2), version=2, chunk_size=16)
    assert latest_checkpoint(publish(1) + not_safetensors)[0] == 1


def test_the_documented_reader_skips_another_payload_format():
    latest_checkpoint = documented_reader()
    npz = publish(2)
    npz[-1] = (b"manifest", rewrite(npz[-1][1], payload_format="npz"))
    assert latest_checkpoint(publish(1) + npz)[0] == 1


def test_the_documented_reader_buffers_a_bounded_number_of_versions():
    latest_checkpoint = documented_reader()
    # chunks of 10 unfinished versions, then version 3 completes: only the newest few stay buffered, so 3 is gone
    unfinished = [m for v in range(3, 13) for m in publish(v)[:-1]]
    assert latest_checkpoint(publish(1) + unfinished + publish(3)[-1:])[0] == 1
    assert latest_checkpoint(publish(1) + unfinished + publish(12)[-1:])[0] == 12


def test_a_reader_of_the_serving_topic_accepts_every_message_the_topic_can_hold() -> None:
    from consumers.state.wire import SERVING_TOPIC_MAX_MESSAGE_BYTES
    from streamer.topics import MODEL_MAX_MESSAGE_BYTES

    # the topic's max.message.bytes bounds a record batch; the reader's limit is its value's, with a margin
    assert MODEL_MAX_MESSAGE_BYTES < SERVING_TOPIC_MAX_MESSAGE_BYTES <= MODEL_MAX_MESSAGE_BYTES + (1 << 20)
