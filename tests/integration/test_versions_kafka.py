"""Versions never repeat on a serving topic: a trainer started from a new checkpoint directory on a topic that
already holds publications continues above the newest one, and serving accepts every publication in order."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from consumers.runtime.config import load_config
from consumers.state.wire import Reassembler, manifest_version
from tests.integration.test_trainer_kafka import TASKS, make_topics, run_trainer, write_config
from tests.topic_reader import read_topic as topic_records

pytestmark = pytest.mark.integration


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    return [(m.key, m.value) for m in topic_records(bootstrap, topic, max_partition_fetch_bytes=32 << 20)]


def test_a_trainer_with_a_new_checkpoint_dir_publishes_above_the_versions_on_its_topic(kafka_broker: str,
                                                                                        tmp_path: Path) -> None:
    from streamer.stream import stream_dataset

    topics = make_topics(kafka_broker, "versions-" + uuid.uuid4().hex[:6])
    stream_dataset("synthetic", None, f"kafka://{kafka_broker}", options={"n_events": 3000, "tasks": ",".join(TASKS)},
                   impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    versions = []
    for run in ("first", "second"):  # the second: a new checkpoint.dir and group, the same serving topic
        directory = tmp_path / run
        directory.mkdir()
        config = write_config(directory / "trainer.toml", kafka_broker, topics, every_steps=3)
        assert load_config(config, env={}).checkpoint.dir == str(directory / "checkpoints")
        run_trainer(config, directory / "ledger")
        versions.append([v for v in (manifest_version(k, v) for k, v in read_topic(kafka_broker, topics["model"]))
                         if v is not None])
    first, both = versions
    second = both[len(first):]
    assert first and second, versions
    assert first == list(range(1, len(first) + 1))  # a fresh topic starts at 1
    assert second[0] == first[-1] + 1 and second == sorted(second), versions  # continued above, never repeated
    reassembler = Reassembler()
    accepted = [c.version for c in reassembler.checkpoints(read_topic(kafka_broker, topics["model"]))]
    assert accepted == both and not reassembler.rejections, reassembler.rejections
