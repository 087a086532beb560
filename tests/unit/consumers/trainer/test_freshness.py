"""Freshness: sample-weighted quantiles of the wait from emission to training."""

from __future__ import annotations

import random

import pytest

from consumers.trainer.freshness import Freshness

pytestmark = pytest.mark.unit


def test_freshness_percentiles_weigh_each_entry_by_its_samples() -> None:
    freshness = Freshness()
    assert freshness.percentiles() is None
    rng = random.Random(1)
    freshness.waits_s = [(rng.random(), rng.randint(1, 50)) for _ in range(300)]
    flat = sorted(seconds for seconds, n in freshness.waits_s for _ in range(n))
    got = freshness.percentiles((0.5, 0.99, 1.0))
    assert got == {0.5: flat[len(flat) // 2], 0.99: flat[int(len(flat) * 0.99)], 1.0: flat[-1]}


def test_batches_consume_emissions_in_order_across_entries() -> None:
    clock = iter([5.0, 6.0]).__next__
    freshness = Freshness(clock=clock)
    freshness.emitted(2, 1.0)
    freshness.emitted(2, 3.0)
    freshness.trained(3)  # at 5.0: two samples waited 4 s, one waited 2 s
    freshness.trained(1)  # at 6.0: the last one waited 3 s
    assert sorted(freshness.waits_s) == [(2.0, 1), (3.0, 1), (4.0, 2)]
