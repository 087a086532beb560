"""crossdistil inspect serving in bounded memory: a version's chunks are held only until its manifest (and of a few
versions at most, as a replica holds them), and only the newest publications' judgements are kept, however many
publications the topic holds (no broker here: tests/integration/test_inspect_serving_kafka.py reads a real topic)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest

from consumers.cli import main
from consumers.tools.inspect import BUFFERED_VERSIONS, Publications, publications, render_serving
from tests.unit.consumers.tools.test_inspect import messages, with_offsets

pytestmark = pytest.mark.unit


def big_publication(version: int) -> list[tuple[bytes, bytes | None]]:
    """A publication of 256 KiB in 4 chunks."""
    import torch

    from consumers.state.wire import encode_checkpoint

    weights = torch.full((64 * 1024,), float(version), dtype=torch.float32)
    return encode_checkpoint({"w": weights}, {"step": version, "tasks": ["click"]}, version=version,
                             chunk_size=64 * 1024)


def topic(versions: int) -> Iterator[tuple[int, bytes, bytes | None]]:
    """The topic's messages made as they are read, as a consumer hands them out."""
    offset = 0
    for version in range(1, versions + 1):
        for key, value in big_publication(version):
            yield offset, key, value
            offset += 1


def test_reading_many_publications_holds_about_one_at_a_time() -> None:
    big_publication(1)  # torch's and the encoder's first-use allocations are not the reader's
    tracemalloc.start()
    try:
        found = publications(topic(40), keep=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(p["version"], p["complete"]) for p in found] == [(40, True), (39, True), (38, True)]
    topic_bytes = sum(len(value) for _, _, value in topic(40))
    assert topic_bytes > 10 * 2**20
    assert peak < topic_bytes / 5, f"peak {peak} bytes while reading a topic of {topic_bytes}"


def test_only_the_newest_publications_are_listed_and_every_one_is_counted() -> None:
    judged = Publications(keep=5)
    for offset, key, value in with_offsets(*(messages(v) for v in range(1, 31)), messages(31)[:-1]):
        judged.add(offset, key, value)
    found = judged.newest()
    assert [(p["version"], p["offset"] is None) for p in found] == [(31, True), (30, False), (29, False),
                                                                     (28, False), (27, False)]
    assert judged.seen == 31 and judged.records == 30 * 5 + 4
    assert len(publications(with_offsets(*(messages(v) for v in range(1, 8))), keep=0)) == 7  # --newest 0: all
    text = render_serving({"topic": "model", "bootstrap": "b:1", "beginning_offset": 0, "end_offset": 154,
                           "records": judged.records, "publications_seen": judged.seen, "publications": found})
    assert "154 records, 31 publications (the newest 5 below; --newest 0 lists all)" in text.splitlines()[0]


def test_chunks_of_more_versions_than_a_replica_holds_without_a_manifest_are_dropped_and_said_so() -> None:
    cut = [messages(v)[:-1] for v in range(1, BUFFERED_VERSIONS + 2)]  # one version more than held, none finished
    late_manifest = messages(1)[-1]
    found = publications(with_offsets(*cut, [late_manifest]))
    first = next(p for p in found if p["version"] == 1 and p["offset"] is not None)
    assert not first["complete"] and first["problem"].startswith("evicted:") and first["chunks_present"] == 4
    assert [p["version"] for p in found if p["offset"] is None] == list(range(BUFFERED_VERSIONS + 1, 1, -1))


def test_newest_must_be_a_count(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["inspect", "serving", "--bootstrap", "b:1", "--newest", "-1"])
    assert "'-1' is not a count of publications" in capsys.readouterr().err
