"""Every Kafka compression codec is readable: records written with none, gzip, snappy, lz4 and zstd train.

A producer that is not ours may compress its batches with any codec; kafka-python can read zstd, lz4 and snappy
only when their libraries are installed (pyproject.toml). The events go through a real broker and are read
back by the project's Kafka reader (the backtest's range consumer, the same kafka-python consumer the trainer and
serving use) into the trainer's pipeline.
"""

from __future__ import annotations

import uuid

import msgpack
import pytest

from consumers.tools import backtest
from streamer.topics import ensure_topics

pytestmark = pytest.mark.integration

CODECS = (None, "gzip", "snappy", "lz4", "zstd")
IMPRESSIONS = 300


def events(prefix: str) -> list[tuple[str, bytes, bytes]]:
    """(topic kind, key, value): impressions, each with a click 1 s later for every third one."""
    out = []
    for i in range(IMPRESSIONS):
        user = f"u{i % 17}"
        ts = 1_650_000_000_000 + 1000 * i
        impression = {"v": 1, "impression_id": f"{prefix}-{i}", "ts_ms": ts, "user_id": user,
                      "item_id": f"i{i % 41}", "features": {}}
        out.append(("impressions", user.encode(), msgpack.packb(impression)))
        if i % 3 == 0:
            feedback = {"v": 1, "impression_id": f"{prefix}-{i}", "ts_ms": ts + 1000, "task": "click", "value": 1}
            out.append(("feedback", user.encode(), msgpack.packb(feedback)))
    return out


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c or "none")
def test_records_compressed_with_every_codec_are_read_and_trained(kafka_broker: str, codec: str | None,
                                                                  tmp_path) -> None:
    from kafka import KafkaProducer

    tag = uuid.uuid4().hex[:6]
    topics = {"impressions": f"cz-imp-{tag}", "feedback": f"cz-fb-{tag}"}
    ensure_topics(kafka_broker, 1, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=f"cz-dl-{tag}", model_topic=f"cz-model-{tag}")
    producer = KafkaProducer(bootstrap_servers=kafka_broker, compression_type=codec, linger_ms=20)
    for kind, key, value in events(tag):
        producer.send(topics[kind], key=key, value=value)
    producer.flush(30)
    producer.close()

    config_file = tmp_path / "backtest.toml"
    config_file.write_text(
        f'[kafka]\nbootstrap = "{kafka_broker}"\nimpressions_topic = "{topics["impressions"]}"\n'
        f'feedback_topic = "{topics["feedback"]}"\n'
        '[join]\nattribution_window_s = {click = 60}\n[batching]\nbatch_size = 64\nmax_batch_delay_s = 1e9\n'
        '[model]\ntasks = ["click"]\ndevice = "cpu"\n'
        'options = {embedding_dim = 4, hidden_dims = [8], tower_dims = [4], features = {hash_buckets = 1024}}\n'
        '[metrics]\nport = 0\n')
    configs = backtest.build_configs([str(config_file)], None, [])
    records, _ = backtest.kafka_records(kafka_broker, [topics["impressions"], topics["feedback"]])
    run = next(iter(backtest.run_backtest(records, configs, sample_every=100).runs.values()))
    labels = run.arrays("click")[0]
    assert len(run.impression_ids) == IMPRESSIONS
    assert int(labels.sum()) == IMPRESSIONS // 3  # every click joined: nothing lost to the codec
