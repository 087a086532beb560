"""Read a whole topic in the integration tests: every record up to the end offsets it has when the read starts.

Reading to the end offsets, instead of iterating a consumer until ``consumer_timeout_ms`` of silence, ends as soon
as the last record is in (each read by timeout waited those seconds for nothing).
"""

from __future__ import annotations

import time
from typing import Any


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0, **options: Any) -> list[Any]:
    """The ``ConsumerRecord``s of every partition of ``topic`` (partition by partition, in offset order); fails the
    test if they are not all read within ``timeout_s``. ``options``: more kafka-python consumer settings."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **options)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records: dict[int, list[Any]] = {tp.partition: [] for tp in partitions}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"{topic} not read to its end offsets {ends} within {timeout_s} s"
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition] += [r for r in batch if r.offset < ends[tp]]
    finally:
        consumer.close()
    return [r for p in sorted(records) for r in records[p]]
