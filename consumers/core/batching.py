"""Mini-batching: samples in, batches of ``batch_size`` out, or smaller ones when samples wait too long.

Pure and deterministic. Time comes from the caller, in seconds, on one clock per batcher:

* live trainer: the wall clock (``time.monotonic()``), so a quiet stream still trains within
  ``max_batch_delay_s`` of a sample's arrival;
* backtest: event time, e.g. ``join.watermark_ms / 1000`` after each step of the replay, so a replay makes the
  same batches however fast it runs.

A sample's *arrival* is the ``now`` passed with it to ``add``. A batch is cut when it holds ``batch_size``
samples, or as soon as a call sees that its oldest sample has waited ``max_batch_delay_s`` or longer (``add``
cuts the overdue batch *before* appending the new sample, as a timely ``poll`` would have). ``next_deadline()``
tells a poll loop how long it may block. ``max_batch_delay_s=None`` disables the time limit.

>>> batcher = MiniBatcher(batch_size=2, max_batch_delay_s=5.0)
>>> batcher.add("a", now=0.0), batcher.add("b", now=1.0)
([], [['a', 'b']])
>>> batcher.add("c", now=2.0), batcher.poll(now=6.9), batcher.poll(now=7.0)
([], [], [['c']])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class MiniBatcher(Generic[T]):
    """Groups samples into batches of ``batch_size``, or earlier after ``max_batch_delay_s`` of waiting."""

    def __init__(self, batch_size: int, max_batch_delay_s: float | None = None) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_batch_delay_s is not None and not (
            isinstance(max_batch_delay_s, (int, float)) and math.isfinite(max_batch_delay_s) and max_batch_delay_s >= 0
        ):
            raise ValueError(f"max_batch_delay_s must be None or a finite number >= 0, got {max_batch_delay_s!r}")
        self.batch_size = batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self._waiting: list[T] = []
        self._oldest_at: float | None = None  # arrival of the oldest waiting sample

    def add(self, sample: T, now: float) -> list[list[T]]:
        """Add one sample arriving at ``now``; returns the batch this completes, if any (a list of 0 or 1)."""
        batches = self.poll(now)
        if not self._waiting:
            self._oldest_at = now
        self._waiting.append(sample)
        if len(self._waiting) >= self.batch_size:
            batches.append(self._cut())
        return batches

    def add_many(self, samples: Iterable[T], now: float) -> list[list[T]]:
        """``add`` for every sample, all arriving at ``now`` (the same batches, cut in slices rather than one by one).

        >>> MiniBatcher(batch_size=2).add_many("abcde", now=0.0)
        [['a', 'b'], ['c', 'd']]
        """
        batches = self.poll(now)
        pending = samples if isinstance(samples, list) else list(samples)
        start, size = 0, self.batch_size
        while start < len(pending):
            if not self._waiting:
                self._oldest_at = now
            take = min(size - len(self._waiting), len(pending) - start)
            self._waiting += pending[start:start + take]
            start += take
            if len(self._waiting) >= size:
                batches.append(self._cut())
        return batches

    def poll(self, now: float, lead_s: float = 0.0) -> list[list[T]]:
        """The waiting samples as one batch if the oldest has waited ``max_batch_delay_s - lead_s`` or longer.

        ``lead_s``: how long the caller expects training the batch to take, so that it is trained, not just
        cut, within ``max_batch_delay_s`` of its oldest sample's arrival (the live trainer passes its recent
        step time; a replay passes nothing).
        """
        deadline = self.next_deadline()
        if deadline is not None and now + lead_s >= deadline:
            return [self._cut()]
        return []

    def flush(self) -> list[list[T]]:
        """Whatever is waiting, as one batch (none if nothing waits)."""
        return [self._cut()] if self._waiting else []

    def next_deadline(self) -> float | None:
        """When (on the caller's clock) the waiting samples become a batch by time; None if never."""
        if not self._waiting or self.max_batch_delay_s is None:
            return None
        assert self._oldest_at is not None
        return self._oldest_at + self.max_batch_delay_s

    @property
    def waiting(self) -> int:
        """Samples not yet in a batch."""
        return len(self._waiting)

    def state_dict(self, sample_to_plain: Callable[[T], Any] = lambda s: s) -> dict[str, Any]:
        """The waiting samples and their clock as plain values (``JoinedSample.to_plain`` for join samples).

        A trainer that checkpoints only at batch boundaries (after ``flush()``) stores an empty batcher.
        """
        return {"waiting": [sample_to_plain(s) for s in self._waiting], "oldest_at": self._oldest_at}

    def load_state_dict(self, state: dict[str, Any], sample_from_plain: Callable[[Any], T] = lambda p: p) -> None:
        """Restore ``state_dict()`` output."""
        self._waiting = [sample_from_plain(p) for p in state["waiting"]]
        self._oldest_at = state["oldest_at"] if self._waiting else None

    def _cut(self) -> list[T]:
        batch = self._waiting
        self._waiting = []
        self._oldest_at = None
        return batch
