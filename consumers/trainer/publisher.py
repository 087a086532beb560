"""Publication of checkpoints to the serving topic, and its retries.

A checkpoint's serving view (``consumers.state.wire`` messages, built with the checkpoint) is published after
the checkpoint is written, so only an acknowledged publication is recorded as done (``published.json`` in the
checkpoint directory, ``CheckpointStore.write_publication``). One that fails (broker away, messages not
acknowledged) is retried with a newer version after ``PUBLISH_RETRY_S[0]`` s, doubling up to
``PUBLISH_RETRY_S[1]`` s, even when nothing else changed; a trainer stopped or killed before that publishes the
restored step again as soon as it starts. Serving therefore always ends up with the newest checkpointed model.

A publication the broker refuses for good (not retriable: a message over the topic's ``max.message.bytes`` after
someone lowered it) is a fatal error of kafka-python's idempotent producer, which then fails every later send (see
``kafka_io.KafkaClients``): with ``renew`` set, the publisher closes that producer and makes a new one
(``kafka_io.new_producer``) for the retry, so publications resume once the cause is fixed, without a restart.

Versions only grow: the next version is one more than the newest ever attempted (kept in checkpoints and in
the publication record) and than the newest on the topic (read at start: ``kafka_io.newest_published_version``),
so serving never sees a version twice, even from a trainer started with a new checkpoint directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka.errors import KafkaError

from consumers.runtime.logs import close_quietly

log = logging.getLogger("crossdistil.trainer")

PUBLISH_RETRY_S = (10.0, 300.0)  # a failed publication is retried after 10 s, doubling up to 300 s


def retry_delay_s(failures: int, bounds: tuple[float, float]) -> float:
    """Seconds before the next attempt after ``failures`` failed ones in a row: ``bounds[0]``, doubling per failure,
    at most ``bounds[1]`` (a publication's retries, and the daemon's of a checkpoint that could not be written).

    >>> [retry_delay_s(n, (10.0, 300.0)) for n in (0, 1, 2, 3, 6)]
    [10.0, 10.0, 20.0, 40.0, 300.0]
    """
    low, high = bounds
    return min(high, low * 2 ** max(0, failures - 1))


class Publisher:
    """Sends publications to ``topic`` with ``producer`` and keeps the version bookkeeping.

    ``version``: the last version attempted; ``published_chunks``: chunk keys the topic may hold (the next
    publication tombstones those beyond its own count); ``last_published_step``: the step of the last
    acknowledged publication (-1: none); ``pending``: the current step's publication still has to land.
    """

    def __init__(self, producer: Any, topic: str, store: Any, metrics: Any) -> None:
        self.producer = producer
        self.topic = topic
        self.store = store
        self.metrics = metrics
        self.version = 0
        self.published_chunks = 0
        self.last_published_step = -1
        self.pending = False
        self.failures = 0
        self.unacknowledged_version: int | None = None  # the last attempt failed (None: it did not)
        self.last_attempt_at = float("-inf")
        self.delays_s: list[float] = []  # seconds from each checkpoint to its acknowledged publication
        self.renew: Callable[[], Any] | None = None  # a new producer, after one failed for good
        self.renewed = 0  # producers made again

    def restore(self, version: int, published_chunks: int, step: int, acknowledged: bool, enabled: bool) -> None:
        """Take over the bookkeeping of a restored checkpoint of ``step``: was its publication acknowledged?"""
        self.version = version
        self.published_chunks = published_chunks
        self.last_published_step = step if acknowledged else -1
        self.pending = enabled and not acknowledged

    def continue_after(self, newest_on_topic: int) -> None:
        """Publish above ``newest_on_topic`` (the newest version any trainer published on the topic): versions
        never repeat on a topic, even for a trainer started from a new checkpoint directory."""
        if newest_on_topic > self.version:
            log.info("the serving topic %s already holds version %d: publishing from version %d on", self.topic,
                     newest_on_topic, newest_on_topic + 1)
            self.version = newest_on_topic

    def _renew_producer(self, error: BaseException) -> None:
        """Replace a producer that a non-retriable error made useless (kafka-python: every later send fails), if
        ``renew`` is set; a new one that cannot be made leaves the old one (the next failure tries again)."""
        if self.renew is None:
            return
        try:
            fresh = self.renew()
        except KafkaError as exc:
            log.warning("could not make a new producer for publications (%s); retried after the next failure", exc)
            return
        old, self.producer = self.producer, fresh
        self.renewed += 1
        log.warning("publications' producer failed for good (%s: %s): closed, and a new one made for the retry",
                    type(error).__name__, error)
        close_quietly("failed producer", lambda: old.close(timeout=1), log)  # the new one is in place either way

    def close_renewed(self, timeout_s: float = 10.0) -> None:
        """Close the producer ``renew`` made, if any (the first one is its maker's to close)."""
        if self.renewed:
            close_quietly("producer", lambda: self.producer.close(timeout=timeout_s), log)

    def retry_delay(self) -> float:
        """Seconds before the next attempt: ``PUBLISH_RETRY_S[0]``, doubling per failure, at most ``[1]``."""
        return retry_delay_s(self.failures, PUBLISH_RETRY_S)

    def retry_due(self, now: float) -> bool:
        return self.pending and now - self.last_attempt_at >= self.retry_delay()

    def send(self, messages: list, version: int, step: int, chunks: int, checkpointed_at: float,
             timeout_s: float = 60.0) -> bool:
        """Publish ``messages`` (the serving view of ``step``, ``chunks`` chunk keys) as ``version``; True once
        Kafka acknowledged every message, which is then recorded (``store.write_publication``)."""
        self.version = version
        # Until Kafka acknowledges it, chunk keys of this publication and of the last one may be on the topic.
        self.published_chunks = max(self.published_chunks, chunks)
        started = time.perf_counter()
        self.last_attempt_at = time.monotonic()
        try:
            futures = [self.producer.send(self.topic, key=key, value=value, partition=0) for key, value in messages]
            self.producer.flush(timeout=timeout_s)
            failed = [f for f in futures if not f.is_done or f.failed()]
            problem = f"{len(failed)} of {len(futures)} messages not acknowledged" if failed else None
            refused = next((f.exception for f in failed if f.is_done and f.exception is not None), None)
            if refused is not None:  # the broker's answer, e.g. MessageSizeTooLargeError
                problem += f": {type(refused).__name__}: {refused}"
                if not getattr(refused, "retriable", False):
                    self._renew_producer(refused)
        except KafkaError as exc:  # no metadata within max_block_ms, flush timed out: the broker is away
            problem = str(exc)
        if problem is not None:
            self.unacknowledged_version = version
            self.pending = True
            self.failures += 1
            log.warning("publication of version %d (step %d) failed (%s); retried with a newer version in %.0f s, "
                        "and at the next start if this process stops first", version, step, problem,
                        self.retry_delay())
            return False
        seconds = time.perf_counter() - started
        self.unacknowledged_version = None
        self.pending = False
        self.failures = 0
        self.last_published_step = step
        self.published_chunks = chunks
        try:
            self.store.write_publication(version, step)
        except OSError as exc:  # the publication stands; a restart would only publish this step once more
            log.warning("recording publication %d in %s failed: %s", version, self.store.directory, exc)
        self.delays_s.append(time.monotonic() - checkpointed_at)
        self.metrics.published(version, seconds, time.time())
        self.metrics.mark_published_reference()
        log.info("published version %d (%d messages) to %s in %.2f s", version, len(messages), self.topic, seconds)
        return True
