"""Specification of the attribution join (consumers/core/join.py): pure, event-time, deterministic."""

from __future__ import annotations

import random

import msgpack
import pytest

from consumers.core.join import AttributionJoin, JoinConfig, JoinedSample

pytestmark = pytest.mark.unit

IMP = ("impressions", 0)
FB = ("feedback", 0)


def imp(impression_id: str, ts_ms: int) -> dict:
    return {"v": 1, "impression_id": impression_id, "ts_ms": ts_ms, "user_id": "u1", "item_id": "it",
            "features": {"f": 1}}


def fb(impression_id: str, ts_ms: int, task: str = "like", value: float = 1) -> dict:
    return {"v": 1, "impression_id": impression_id, "ts_ms": ts_ms, "task": task, "value": value}


def make(**overrides) -> AttributionJoin:
    options = {"attribution_window_s": {"like": 10.0, "finish": 60.0}}
    options.update(overrides)
    return AttributionJoin(JoinConfig(**options))


def ids(samples: list[JoinedSample]) -> list[str]:
    return [s.impression["impression_id"] for s in samples]


def test_in_window_positive_feedback_sets_the_label_and_the_sample_waits_for_the_longest_window():
    join = make()
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("a", 5_000, "like"), IMP)
    join.add_impression(imp("b", 30_000), IMP)
    assert join.emit() == []  # "finish" (60 s) is still open
    join.add_impression(imp("c", 60_001), IMP)
    [sample] = join.emit()
    assert sample.impression["impression_id"] == "a"
    assert sample.labels == {"finish": 0, "like": 1}
    assert sample.reason == "closed"
    assert sample.source == IMP


def test_window_is_closed_only_once_the_watermark_is_strictly_past_it():
    join = make(attribution_window_s={"like": 10.0})
    join.add_impression(imp("a", 0), IMP)
    join.add_impression(imp("b", 10_000), IMP)
    assert join.emit() == []  # feedback stamped exactly 10_000 may still arrive
    join.add_feedback(fb("a", 10_000), IMP)
    join.add_impression(imp("c", 10_001), IMP)
    [sample] = join.emit()
    assert sample.labels == {"like": 1}


def test_non_positive_feedback_is_matched_but_leaves_the_label_at_zero():
    join = make(attribution_window_s={"like": 10.0})
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("a", 1_000, value=0), IMP)
    [sample] = join.flush()
    assert sample.labels == {"like": 0}
    assert join.counters["matched_feedback"] == 1


def test_feedback_outside_the_window_is_counted_and_ignored():
    join = make(attribution_window_s={"like": 10.0}, allowed_lateness_s=100.0)
    join.add_impression(imp("a", 5_000), IMP)
    join.add_feedback(fb("a", 4_999), IMP)  # before the impression
    join.add_feedback(fb("a", 15_001), IMP)  # after the window
    [sample] = join.flush()
    assert sample.labels == {"like": 0}
    assert join.counters["outside_window_feedback"] == 2


def test_feedback_after_its_own_task_window_closed_is_late_even_while_the_impression_is_held():
    join = make()  # like 10 s, finish 60 s
    join.add_impression(imp("a", 0), IMP)
    join.add_impression(imp("b", 20_000), IMP)  # watermark 20_000 closes "like" of a, not "finish"
    join.add_feedback(fb("a", 9_000, "like"), FB)  # in window by time stamp, but its window closed
    join.add_feedback(fb("a", 9_000, "finish"), FB)
    [a, _b] = join.flush()
    assert a.labels == {"finish": 1, "like": 0}
    assert join.counters["late_feedback"] == 1


def test_watermark_is_the_slowest_source_minus_allowed_lateness():
    join = make(allowed_lateness_s=2.0)
    join.add_feedback(fb("x", 20_000), FB)
    join.add_impression(imp("a", 50_000), IMP)
    assert join.watermark_ms == 18_000
    join.add_feedback(fb("y", 90_000), FB)
    assert join.watermark_ms == 48_000


def test_watermark_never_goes_back():
    join = make()
    join.add_impression(imp("a", 50_000), IMP)
    join.add_impression(imp("b", 10_000), ("impressions", 1))  # a new, slower source appears
    assert join.watermark_ms == 50_000


def test_a_source_that_has_delivered_nothing_does_not_hold_the_watermark_by_default():
    join = make()
    join.assign([IMP, FB])
    join.add_impression(imp("a", 50_000), IMP)
    assert join.watermark_ms == 50_000


def test_wait_for_all_partitions_holds_the_watermark_until_every_assigned_source_delivered():
    join = make(wait_for_all_partitions=True)
    join.assign([IMP, FB])
    join.add_impression(imp("a", 50_000), IMP)
    assert join.watermark_ms is None
    join.add_feedback(fb("a", 51_000), FB)
    assert join.watermark_ms == 50_000


def test_an_idle_source_stops_holding_the_watermark_after_the_idle_timeout_and_rejoins_on_data():
    join = make(idle_timeout_s=30.0)
    join.add_feedback(fb("x", 1_000), FB, now=100.0)
    join.add_impression(imp("a", 500_000), IMP, now=100.0)
    assert join.watermark_ms == 1_000
    join.tick(129.0)
    assert join.watermark_ms == 1_000
    join.add_impression(imp("b", 600_000), IMP, now=129.5)
    join.tick(130.0)  # FB silent for 30 s on the caller's clock
    assert join.watermark_ms == 600_000
    assert ids(join.emit()) == ["a"]
    join.add_feedback(fb("y", 700_000), FB, now=131.0)
    join.add_impression(imp("c", 800_000), IMP, now=131.0)
    assert join.watermark_ms == 700_000  # FB holds it again


def test_events_added_without_a_clock_are_timed_at_the_last_tick():
    join = make(idle_timeout_s=30.0)
    join.tick(0.0)
    join.add_feedback(fb("x", 1_000), FB)
    join.add_impression(imp("a", 500_000), IMP)
    join.tick(25.0)
    join.add_feedback(fb("y", 2_000), FB)  # FB active at 25.0
    join.tick(50.0)  # IMP idle (silent since 0.0), FB not (active at 25.0)
    assert join.watermark_ms == 2_000
    join.add_impression(imp("b", 600_000), IMP)  # IMP active again at 50.0
    join.tick(55.0)  # now FB is idle
    assert join.watermark_ms == 600_000


def test_when_every_source_is_idle_the_watermark_stays():
    join = make(idle_timeout_s=10.0)
    join.add_impression(imp("a", 5_000), IMP, now=0.0)
    join.tick(100.0)
    assert join.watermark_ms == 5_000
    assert join.pending_impressions == 1


def test_unseen_assigned_sources_with_wait_for_all_go_idle_after_the_timeout():
    join = make(wait_for_all_partitions=True, idle_timeout_s=10.0)
    join.assign([IMP, FB], now=0.0)
    join.add_impression(imp("a", 500_000), IMP, now=1.0)
    assert join.watermark_ms is None
    join.tick(10.0)
    assert join.watermark_ms == 500_000


def test_a_source_assigned_back_has_its_clock_again_as_after_a_restarts_first_empty_assignment():
    """kafka-python's first assignment of a restored trainer is often empty, the real one follows: the restored
    partitions' clocks hold, so the watermark moves on the next event instead of waiting for every partition's."""
    join = make(wait_for_all_partitions=True, idle_timeout_s=30.0, attribution_window_s={"like": 10.0})
    join.assign([IMP, FB], now=0.0)
    join.add_impression(imp("a", 1_000), IMP, now=1.0)
    join.add_feedback(fb("a", 5_000), FB, now=1.0)
    restored = make(wait_for_all_partitions=True, idle_timeout_s=30.0, attribution_window_s={"like": 10.0})
    restored.load_state_dict(join.state_dict())
    restored.assign([], now=100.0)  # the first, empty assignment
    assert restored.source_max_ts(IMP) is None
    restored.assign([IMP, FB], now=101.0)
    assert (restored.source_max_ts(IMP), restored.source_max_ts(FB)) == (1_000, 5_000)
    restored.add_impression(imp("b", 20_000), IMP, now=102.0)  # FB delivers nothing new
    assert restored.watermark_ms == 5_000
    restored.add_feedback(fb("c", 12_000), FB, now=103.0)
    assert restored.watermark_ms == 12_000 and ids(restored.emit()) == ["a"]
    restored.tick(120.0)  # its idle timer started again at the assignment (101 s), not at the last event (1 s)
    assert FB not in restored._idle


def test_feedback_that_arrives_before_its_impression_is_held_and_matched():
    join = make(attribution_window_s={"like": 10.0})
    join.add_feedback(fb("a", 3_000), FB)
    assert join.early_feedback == 1
    join.add_impression(imp("a", 1_000), IMP)
    [sample] = join.flush()
    assert sample.labels == {"like": 1}
    assert join.counters["early_feedback_matched"] == 1
    assert join.counters["orphan_feedback"] == 0


def test_early_feedback_becomes_orphan_once_the_watermark_passes_its_time_plus_grace():
    join = make(attribution_window_s={"like": 10.0}, early_feedback_grace_s=5.0)
    join.add_feedback(fb("ghost", 3_000), FB)
    join.add_impression(imp("b", 8_000), IMP)
    join.add_feedback(fb("b", 8_000), FB)
    assert join.counters["orphan_feedback"] == 0  # watermark 8_000 == 3_000 + grace: could still match
    join.add_impression(imp("c", 8_001), IMP)
    join.add_feedback(fb("c", 8_001), FB)
    assert join.counters["orphan_feedback"] == 1
    assert join.early_feedback == 0


def test_feedback_for_an_emitted_impression_is_counted_late():
    join = make(attribution_window_s={"like": 10.0})
    join.add_impression(imp("a", 0), IMP)
    join.add_impression(imp("b", 20_000), IMP)
    assert ids(join.emit()) == ["a"]
    join.add_feedback(fb("a", 5_000), IMP)
    assert join.counters["late_feedback"] == 1
    assert join.counters["orphan_feedback"] == 0


def test_duplicate_impressions_are_counted_and_ignored():
    join = make(attribution_window_s={"like": 10.0})
    join.add_impression(imp("a", 0), IMP)
    join.add_impression(imp("a", 1), IMP)
    join.add_impression(imp("b", 20_000), IMP)
    join.add_impression(imp("a", 20_000), IMP)  # again, after "a" was emitted
    assert ids(join.flush()) == ["a", "b"]
    assert join.counters["duplicate_impressions"] == 2


def test_max_pending_emits_the_oldest_impression_early_and_counts_it():
    join = make(max_pending=2)
    for i, ts in enumerate([300, 100, 200]):
        join.add_impression(imp(f"i{i}", ts), IMP)
    [sample] = join.emit()
    assert sample.impression["impression_id"] == "i1"
    assert sample.reason == "evicted"
    assert join.counters["evicted_impressions"] == 1
    assert join.pending_impressions == 2


def test_max_early_feedback_counts_the_oldest_held_feedback_as_orphan():
    join = make(max_early_feedback=2)
    join.add_impression(imp("z", 0), IMP)  # holds the watermark at 0
    for i in range(3):
        join.add_feedback(fb(f"x{i}", 1_000 + i), FB)
    assert join.early_feedback == 2
    assert join.counters["evicted_early_feedback"] == 1
    assert join.counters["orphan_feedback"] == 1
    join.add_impression(imp("x0", 0), IMP)  # its feedback was the one evicted
    join.add_impression(imp("x1", 0), IMP)
    samples = {s.impression["impression_id"]: s.labels["like"] for s in join.flush()}
    assert samples == {"z": 0, "x0": 0, "x1": 1}


def test_feedback_for_an_unknown_task_is_counted_and_ignored():
    join = make()
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("a", 1, task="share"), IMP)
    [sample] = join.flush()
    assert sample.labels == {"finish": 0, "like": 0}
    assert join.counters["unknown_task_feedback"] == 1


def test_closed_samples_come_out_by_time_then_id():
    join = make(attribution_window_s={"like": 1.0})
    for impression_id, ts in [("b", 500), ("c", 100), ("a", 500), ("d", 0)]:
        join.add_impression(imp(impression_id, ts), IMP)
    join.add_impression(imp("z", 10_000), IMP)
    assert ids(join.emit()) == ["d", "c", "a", "b"]


def test_an_impression_arriving_after_its_windows_closed_is_emitted_as_late():
    join = make(attribution_window_s={"like": 10.0})
    join.add_impression(imp("a", 100_000), IMP)
    join.add_feedback(fb("old", 5_000), FB)  # held? no: watermark already past it -> orphan
    join.add_impression(imp("old", 1_000), IMP)
    [sample] = join.emit()
    assert (sample.impression["impression_id"], sample.reason) == ("old", "late")
    assert join.counters["late_impressions"] == 1
    assert join.counters["orphan_feedback"] == 1


def test_flush_emits_everything_and_turns_held_feedback_into_orphans():
    join = make()
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("never", 0), FB)
    samples = join.flush()
    assert [(s.impression["impression_id"], s.reason) for s in samples] == [("a", "flushed")]
    assert join.counters["orphan_feedback"] == 1
    assert join.pending_impressions == 0 and join.early_feedback == 0


def test_memory_of_emitted_ids_is_bounded_by_event_time():
    join = make(attribution_window_s={"like": 1.0}, completed_retention_s=1.0)
    for i in range(1_000):
        join.add_impression(imp(f"i{i}", i * 1_000), IMP)
    join.emit()
    assert len(join.state_dict()["completed"]) <= 3
    join.add_feedback(fb("i0", 500), FB)  # forgotten: an orphan, no longer "late"
    assert join.counters["orphan_feedback"] == 1


def test_memory_of_emitted_ids_is_bounded_by_count():
    join = make(attribution_window_s={"like": 0.0}, max_pending=10, max_completed=5, completed_retention_s=1e6)
    for i in range(100):
        join.add_impression(imp(f"i{i}", i), IMP)
    assert len(join.state_dict()["completed"]) == 5


def test_config_rejects_bad_values_with_a_clear_message():
    with pytest.raises(ValueError, match="attribution window of task 'like'"):
        JoinConfig(attribution_window_s={"like": -1})
    with pytest.raises(ValueError, match="empty"):
        JoinConfig(attribution_window_s={})
    with pytest.raises(ValueError, match="max_pending"):
        JoinConfig(attribution_window_s={"like": 1}, max_pending=0)


def test_loading_state_for_other_tasks_is_refused():
    state = make().state_dict()
    with pytest.raises(ValueError, match="tasks"):
        make(attribution_window_s={"like": 1.0}).load_state_dict(state)


# ------------------------------------------------------------------------------------ whole-stream properties


def random_stream(seed: int, n: int = 3_000) -> list[tuple[str, dict, tuple]]:
    """Impressions on 2 partitions, feedback on 2 partitions, out of order, duplicates, early feedback."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        ts = i * 200 + rng.randint(0, 3_000)
        partition = rng.randint(0, 1)
        events.append((ts + rng.randint(0, 1_500), "imp", imp(f"i{i}", ts), ("impressions", partition)))
        if rng.random() < 0.02:
            events.append((ts + 2_000, "imp", imp(f"i{i}", ts), ("impressions", partition)))
        for task, window in (("like", 10_000), ("finish", 60_000)):
            if rng.random() < 0.4:
                fts = ts + rng.randint(-500, window + 5_000)
                arrival = fts + rng.randint(-3_000, 3_000)  # may arrive before its impression
                events.append((arrival, "fb", fb(f"i{i}", fts, task, rng.choice([0, 1, 1])), ("feedback", partition)))
        if rng.random() < 0.05:
            events.append((ts, "fb", fb(f"ghost{i}", ts, "like"), ("feedback", partition)))
    events.sort(key=lambda e: e[0])
    return [(kind, event, source) for _, kind, event, source in events]


def run(join: AttributionJoin, stream, emit_every: int) -> list[list]:
    out = []
    for n, (kind, event, source) in enumerate(stream, 1):
        (join.add_impression if kind == "imp" else join.add_feedback)(event, source)
        if n % emit_every == 0:
            out += [s.to_plain() for s in join.emit()]
    return out + [s.to_plain() for s in join.flush()]


CONFIG = {"attribution_window_s": {"like": 10.0, "finish": 60.0}, "allowed_lateness_s": 2.0, "max_pending": 200}


def test_output_does_not_depend_on_when_emit_is_called():
    stream = random_stream(1)
    once = run(AttributionJoin(JoinConfig(**CONFIG)), stream, emit_every=10**9)
    often = run(AttributionJoin(JoinConfig(**CONFIG)), stream, emit_every=1)
    assert once == often
    assert sum(s[1]["like"] for s in once) > 100  # the stream does exercise labels


def test_every_impression_is_emitted_exactly_once():
    stream = random_stream(2)
    join = AttributionJoin(JoinConfig(**CONFIG))
    samples = run(join, stream, emit_every=7)
    emitted = [s[0]["impression_id"] for s in samples]
    assert len(emitted) == len(set(emitted)) == 3_000
    counters = join.counters
    assert counters["emitted"] == 3_000
    assert counters["evicted_impressions"] > 0 and counters["early_feedback_matched"] > 0


def test_state_round_trip_through_msgpack_resumes_exactly():
    stream = random_stream(3)
    reference_join = AttributionJoin(JoinConfig(**CONFIG))
    reference = run(reference_join, stream, emit_every=13)

    first = AttributionJoin(JoinConfig(**CONFIG))
    cut = len(stream) // 2
    out: list = []  # samples before the cut, then after the restore
    for n, (kind, event, source) in enumerate(stream[:cut], 1):
        (first.add_impression if kind == "imp" else first.add_feedback)(event, source)
        if n % 13 == 0:
            out += [s.to_plain() for s in first.emit()]
    blob = msgpack.packb(first.state_dict(), use_bin_type=True)
    resumed = AttributionJoin(JoinConfig(**CONFIG))
    resumed.load_state_dict(msgpack.unpackb(blob, raw=False))
    for n, (kind, event, source) in enumerate(stream[cut:], cut + 1):
        (resumed.add_impression if kind == "imp" else resumed.add_feedback)(event, source)
        if n % 13 == 0:
            out += [s.to_plain() for s in resumed.emit()]
    out += [s.to_plain() for s in resumed.flush()]

    def normalise(samples):  # tuples -> lists
        return msgpack.unpackb(msgpack.packb(samples), raw=False)

    assert normalise(out) == normalise(reference)
    assert resumed.counters == reference_join.counters


def test_add_events_of_one_message_each_is_the_same_as_one_event_at_a_time():
    stream = random_stream(4)
    one_by_one = run(AttributionJoin(JoinConfig(**CONFIG)), stream, emit_every=1)
    join = AttributionJoin(JoinConfig(**CONFIG))
    as_messages = []
    for _kind, event, source in stream:
        join.add_events([event], source)
        as_messages += [s.to_plain() for s in join.emit()]
    assert as_messages + [s.to_plain() for s in join.flush()] == one_by_one


def test_events_of_one_message_are_not_judged_against_a_watermark_moved_by_the_same_message():
    # One event at a time, i2 (ts 70 s) closes i1's windows before i1's feedback (ts 5 s) is read: late.
    message = [imp("i1", 0), imp("i2", 70_000), fb("i1", 5_000, "like", 1)]
    one_by_one = make()
    for event in message:
        (one_by_one.add_feedback if "task" in event else one_by_one.add_impression)(event, IMP)
    together = make()
    together.add_events(message, IMP)
    assert [s.labels for s in one_by_one.emit()] == [{"finish": 0, "like": 0}]
    assert one_by_one.counters["late_feedback"] == 1
    assert [s.labels for s in together.emit()] == [{"finish": 0, "like": 1}]
    assert together.counters["late_feedback"] == 0
    assert together.watermark_ms == one_by_one.watermark_ms == 70_000


def test_messages_of_many_events_emit_every_impression_exactly_once():
    stream = random_stream(5)
    join = AttributionJoin(JoinConfig(**CONFIG))
    out = []
    for start in range(0, len(stream), 37):  # cut the stream into messages, each from the source of its first event
        chunk = stream[start:start + 37]
        by_source: dict = {}
        for _kind, event, source in chunk:
            by_source.setdefault(source, []).append(event)
        for source, events in by_source.items():
            join.add_events(events, source)
        out += [s.to_plain() for s in join.emit()]
    out += [s.to_plain() for s in join.flush()]
    emitted = [s[0]["impression_id"] for s in out]
    assert len(emitted) == len(set(emitted)) == 3_000
    assert join.counters["emitted"] == 3_000


def test_late_feedback_is_said_once_per_report_with_its_share_and_what_to_do() -> None:
    from consumers.core.join import late_feedback_warning

    message = late_feedback_warning({"feedback": 27_484, "late_feedback": 6_339}, 0)
    assert message.startswith("6339 feedback events arrived after their impression had been emitted and were dropped")
    assert "23.1%" in message and "join.attribution_window_s" in message and "event-time order" in message
    assert late_feedback_warning({"feedback": 27_484, "late_feedback": 6_339}, 6_339) is None
    assert late_feedback_warning({"feedback": 10}, 0) is None  # a join that never judged anything late
