"""Specification of the mini-batcher (consumers/core/batching.py): pure, caller-supplied clock."""

from __future__ import annotations

import msgpack
import pytest

from consumers.core.batching import MiniBatcher
from consumers.core.join import JoinedSample

pytestmark = pytest.mark.unit


def test_full_batches_come_out_as_soon_as_they_are_full():
    batcher = MiniBatcher(batch_size=3)
    out = [batcher.add(i, now=0.0) for i in range(7)]
    assert out == [[], [], [[0, 1, 2]], [], [], [[3, 4, 5]], []]
    assert batcher.waiting == 1


def test_without_a_delay_limit_samples_wait_until_the_batch_is_full():
    batcher = MiniBatcher(batch_size=2)
    batcher.add("a", now=0.0)
    assert batcher.poll(now=1e9) == []
    assert batcher.next_deadline() is None


def test_poll_cuts_a_partial_batch_once_the_oldest_sample_waited_the_delay():
    batcher = MiniBatcher(batch_size=10, max_batch_delay_s=5.0)
    batcher.add("a", now=100.0)
    batcher.add("b", now=103.0)
    assert batcher.next_deadline() == 105.0
    assert batcher.poll(now=104.999) == []
    assert batcher.poll(now=105.0) == [["a", "b"]]
    assert batcher.waiting == 0


def test_add_cuts_the_overdue_batch_before_taking_the_new_sample():
    batcher = MiniBatcher(batch_size=10, max_batch_delay_s=5.0)
    batcher.add("a", now=0.0)
    assert batcher.add("b", now=6.0) == [["a"]]
    assert batcher.next_deadline() == 11.0  # "b" starts a fresh wait


def test_flush_returns_what_waits_and_nothing_when_empty():
    batcher = MiniBatcher(batch_size=4, max_batch_delay_s=60.0)
    assert batcher.flush() == []
    batcher.add_many(["a", "b"], now=0.0)
    assert batcher.flush() == [["a", "b"]]
    assert batcher.flush() == []


def test_the_same_inputs_and_clock_give_the_same_batches():
    def run() -> list[list[int]]:
        batcher = MiniBatcher(batch_size=4, max_batch_delay_s=1.5)
        out = []
        for i in range(50):
            out += batcher.add(i, now=i * 0.7)
            if i % 3 == 0:
                out += batcher.poll(now=i * 0.7 + 0.1)
        return out + batcher.flush()

    first, second = run(), run()
    assert first == second
    assert sorted(x for batch in first for x in batch) == list(range(50))
    assert any(len(batch) < 4 for batch in first[:-1])  # the delay did cut some batches early


def test_state_round_trips_through_msgpack_with_join_samples():
    batcher: MiniBatcher[JoinedSample] = MiniBatcher(batch_size=3, max_batch_delay_s=5.0)
    sample = JoinedSample({"impression_id": "a", "ts_ms": 1}, {"like": 1}, ("impressions", 0), "closed")
    batcher.add(sample, now=10.0)
    blob = msgpack.packb(batcher.state_dict(JoinedSample.to_plain))
    restored: MiniBatcher[JoinedSample] = MiniBatcher(batch_size=3, max_batch_delay_s=5.0)
    restored.load_state_dict(msgpack.unpackb(blob), JoinedSample.from_plain)
    assert restored.next_deadline() == 15.0
    assert restored.flush() == [[sample]]


def test_bad_settings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="batch_size"):
        MiniBatcher(batch_size=0)
    with pytest.raises(ValueError, match="max_batch_delay_s"):
        MiniBatcher(batch_size=1, max_batch_delay_s=-1)


def test_add_many_cuts_the_same_batches_as_adding_one_at_a_time():
    import random

    rng = random.Random(0)
    one, many = MiniBatcher(batch_size=5, max_batch_delay_s=3.0), MiniBatcher(batch_size=5, max_batch_delay_s=3.0)
    now = 0.0
    counter = 0
    for _ in range(300):
        now += rng.choice([0.0, 0.5, 1.0, 4.0])
        samples = list(range(counter, counter + rng.randint(0, 12)))
        counter += len(samples)
        expected = [batch for sample in samples for batch in one.add(sample, now)] if samples else one.poll(now)
        assert many.add_many(samples, now) == expected
        assert many.waiting == one.waiting and many.next_deadline() == one.next_deadline()


def test_poll_with_a_lead_cuts_the_partial_batch_that_early_so_it_trains_within_the_delay():
    batcher = MiniBatcher(batch_size=10, max_batch_delay_s=1.0)
    batcher.add("a", now=100.0)
    assert batcher.poll(now=100.8, lead_s=0.1) == []
    assert batcher.poll(now=100.9, lead_s=0.1) == [["a"]]
