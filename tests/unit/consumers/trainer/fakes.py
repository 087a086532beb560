"""Stand-ins for kafka-python's clients, each with only what one unit under test touches."""

from __future__ import annotations

import time

from kafka.errors import KafkaError, KafkaTimeoutError


class Future:
    def __init__(self, ok: bool) -> None:
        self.is_done, self._ok = True, ok
        self.exception = None if ok else KafkaError("the broker did not acknowledge it")

    def failed(self) -> bool:
        return not self._ok


class FlakyProducer:
    """Refuses sends (no metadata: the broker is away) or fails them, then works when ``healthy`` is set."""

    def __init__(self, refuse: bool) -> None:
        self.refuse, self.healthy, self.sent = refuse, False, []

    def send(self, topic: str, **message) -> Future:
        if not self.healthy and self.refuse:
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.sent.append((topic, message["value"]))
        return Future(ok=self.healthy)

    def flush(self, timeout: float | None = None) -> None:
        pass


class Consumer:
    """Assignment, high watermarks, pause/resume and seeks, as kafka-python keeps them; polls return nothing."""

    def __init__(self, partitions: list = (), highwater: dict | None = None, topics: set | None = None) -> None:
        self.partitions, self.high, self.paused = set(partitions), dict(highwater or {}), set()
        self.known_topics = topics if topics is not None else {"impressions", "feedback"}
        self.seeks: dict = {}
        self.commits: list = []

    def assignment(self) -> set:
        return set(self.partitions)

    def highwater(self, tp):
        return self.high.get(tp)

    def pause(self, *tps) -> None:
        self.paused |= set(tps)

    def resume(self, *tps) -> None:
        self.paused -= set(tps)

    def seek(self, tp, offset: int) -> None:
        self.seeks[tp] = offset

    def seek_to_beginning(self, tp) -> None:
        self.seeks[tp] = "beginning"

    def topics(self) -> set:
        return set(self.known_topics)

    def commit(self, offsets, timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
        time.sleep(timeout_ms / 1000)
        return {}
