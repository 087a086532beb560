"""Freshness: seconds from a sample's emission by the join (its windows closed in event time) to the step that
trains it (``bench/trainer_throughput.py`` reports the median and p99; target p99 <= max_batch_delay + one step).

Samples leave the join and reach the learner in the same order (the mini-batcher is FIFO), so one queue of
``[samples, emitted at]`` entries, consumed as batches are trained, times every sample without one entry per
sample.

>>> f = Freshness(clock=iter([10.0, 12.5]).__next__)
>>> f.emitted(3, 9.0)
>>> f.trained(2)
>>> f.trained(1)
>>> f.percentiles((0.5, 1.0))
{0.5: 1.0, 1.0: 3.5}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

MAX_ENTRIES = 1_000_000  # (seconds, samples) entries kept: a few per step, not one per sample


class Freshness:
    """Emission times in, trained-batch sizes in, sample-weighted quantiles of the wait out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.waits_s: list[tuple[float, int]] = []  # (seconds, samples)
        self._arrivals: deque[list[float]] = deque()  # [samples, emitted at], FIFO like the batcher

    def emitted(self, samples: int, now: float) -> None:
        """The join handed ``samples`` samples to the batcher at ``now``."""
        self._arrivals.append([samples, now])

    def trained(self, samples: int) -> None:
        """A step trained the next ``samples`` samples (in emission order)."""
        trained_at, remaining = self.clock(), samples
        while remaining and self._arrivals:
            head = self._arrivals[0]
            taken = min(remaining, int(head[0]))
            if len(self.waits_s) < MAX_ENTRIES:
                self.waits_s.append((trained_at - head[1], taken))
            head[0] -= taken
            remaining -= taken
            if head[0] <= 0:
                self._arrivals.popleft()

    def percentiles(self, quantiles: tuple[float, ...] = (0.5, 0.99, 1.0)) -> dict[float, float] | None:
        """Sample-weighted quantiles of the waits (None before the first trained batch)."""
        if not self.waits_s:
            return None
        ordered = sorted(self.waits_s)
        total = sum(n for _, n in ordered)
        out, seen, i = {}, 0, 0
        for q in sorted(quantiles):
            rank = min(total - 1, int(total * q))  # the same rank as sorted(samples)[int(len * q)]
            while seen + ordered[i][1] <= rank:
                seen += ordered[i][1]
                i += 1
            out[q] = ordered[i][0]
        return out
