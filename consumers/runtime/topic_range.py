"""Reading one partition's offsets ``[start, end)`` without a consumer group: the loop a serving replica starts with
(``consumers.serving.follower``) and ``crossdistil inspect serving`` reads the serving topic with.

A generator, so a reader keeps only what it needs of each record as it comes (the replica's reassembler, inspect's
judgement of each publication) instead of the whole range: a serving topic's uncompacted tail can hold hundreds of
publications of megabytes each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any


def read_range(consumer: Any, tp: Any, start: int, end: int, *, stop: threading.Event | None = None,
               poll_timeout_ms: int = 200) -> Iterator[Any]:
    """Every record of ``tp`` (a kafka-python ``TopicPartition`` assigned to ``consumer``) in ``[start, end)`` still
    on the topic (compaction leaves gaps), in offset order: seek to ``start``, poll until the position reaches
    ``end`` or ``stop`` is set. Once read through, the consumer stands at ``end`` (a poll may have fetched past it:
    what lies there is read again by whoever reads on). Nothing is committed."""
    consumer.seek(tp, start)
    while consumer.position(tp) < end and not (stop is not None and stop.is_set()):
        for record in consumer.poll(timeout_ms=poll_timeout_ms).get(tp, []):
            if record.offset < end:
                yield record
    consumer.seek(tp, end)
