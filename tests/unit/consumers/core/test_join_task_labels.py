"""The join's account of each task's labels (consumers/core/join.py): feedback for task names it does not have, by
name; positive labels per task and the samples since the last one; kept in its state; said by task_labels_warning."""

from __future__ import annotations

import msgpack
import pytest

from consumers.core.join import (
    MAX_UNKNOWN_TASKS,
    MIN_SAMPLES_WITHOUT_POSITIVE,
    AttributionJoin,
    JoinConfig,
    task_labels_warning,
)

pytestmark = pytest.mark.unit

IMP = ("impressions", 0)
FB = ("feedback", 0)


def imp(impression_id: str, ts_ms: int) -> dict:
    return {"v": 1, "impression_id": impression_id, "ts_ms": ts_ms, "user_id": "u1", "item_id": "it", "features": {}}


def fb(impression_id: str, ts_ms: int, task: str, value: float = 1) -> dict:
    return {"v": 1, "impression_id": impression_id, "ts_ms": ts_ms, "task": task, "value": value}


def make() -> AttributionJoin:
    return AttributionJoin(JoinConfig(attribution_window_s={"click": 10.0, "like": 60.0}))


def test_feedback_for_unknown_task_names_is_counted_by_name_up_to_a_bound_and_the_rest_together():
    join = make()
    for n in range(MAX_UNKNOWN_TASKS + 3):
        for _ in range(2):
            join.add_feedback(fb("a", 0, f"task{n}"), FB)
    join.add_feedback(fb("a", 0, "task0"), FB)  # a name already counted is counted on, whatever came since
    labels = join.task_labels.report(join.counters)
    assert labels["unknown"] == {f"task{n}": 3 if n == 0 else 2 for n in range(MAX_UNKNOWN_TASKS)}
    assert labels["unknown_other"] == 6  # 3 later names, 2 events each
    assert join.counters["unknown_task_feedback"] == 2 * (MAX_UNKNOWN_TASKS + 3) + 1


def test_positive_labels_are_counted_per_task_with_the_samples_emitted_since_the_last_one():
    join = make()
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("a", 1_000, "like"), IMP)  # in window
    join.add_feedback(fb("b", 2_000, "click"), IMP)  # before its impression: held, then matched
    join.add_impression(imp("b", 1_500), IMP)
    join.add_feedback(fb("a", 2_000, "click", value=0), IMP)  # a 0 is no positive
    join.add_impression(imp("c", 200_000), IMP)
    assert len(join.emit()) == 2
    labels = join.task_labels.report(join.counters)
    assert labels["positives"] == {"click": 1, "like": 1}
    assert labels["since_positive"] == {"click": 0, "like": 1}  # a (like) was emitted first, then b (click)
    assert labels["emitted"] == 2 and labels["window_s"] == {"click": 10.0, "like": 60.0}


def test_task_labels_survive_a_state_round_trip_through_msgpack():
    join = make()
    join.add_impression(imp("a", 0), IMP)
    join.add_feedback(fb("a", 1_000, "like"), FB)
    join.add_feedback(fb("a", 1_000, "clik"), FB)
    join.add_impression(imp("b", 100_000), IMP)
    join.emit()
    resumed = make()
    resumed.load_state_dict(msgpack.unpackb(msgpack.packb(join.state_dict(), use_bin_type=True), raw=False))
    assert resumed.task_labels.report(resumed.counters) == join.task_labels.report(join.counters)
    assert resumed.task_labels.report(resumed.counters)["unknown"] == {"clik": 1}


def test_a_join_state_saved_before_task_labels_were_kept_still_loads_and_counts_from_the_restore():
    join = make()
    for i in range(5):
        join.add_impression(imp(f"i{i}", i * 100_000), IMP)
    join.add_feedback(fb("i0", 0, "clik"), FB)
    assert len(join.emit()) == 4
    state = join.state_dict()
    del state["unknown_tasks"], state["task_positives"]  # what the code before them saved (format 1 as well)
    resumed = make()
    resumed.load_state_dict(state)
    labels = resumed.task_labels.report(resumed.counters)
    assert labels["unknown"] == {} and labels["unknown_other"] == 0
    # 4 samples were emitted before, but without a record of their labels none is counted as 'without a positive'
    assert labels["since_positive"] == {"click": 0, "like": 0}
    assert resumed.counters == join.counters


LABELS = {"unknown": {}, "unknown_other": 0, "ignored": [], "positives": {"click": 5, "like": 5},
          "since_positive": {"click": 0, "like": 0}, "window_s": {"click": 60.0, "like": 900.0},
          "feedback": 1_000, "emitted": 20_000}


def test_the_warning_names_unknown_task_names_new_since_the_last_report_with_the_nearest_task():
    first = {**LABELS, "unknown": {"clik": 900, "hate": 10}}
    message = task_labels_warning(first, None)
    assert message.startswith("910 feedback events for task names the model does not have were ignored (910 of 1,000")
    assert "'clik' 900 (did you mean 'click'?), 'hate' 10." in message
    assert "model.tasks does ('click', 'like')" in message
    later = {**LABELS, "unknown": {"clik": 950, "hate": 10}, "feedback": 2_000}
    assert "50 feedback events" in task_labels_warning(later, first)
    assert "'hate'" not in task_labels_warning(later, first)  # none since the report
    assert task_labels_warning(first, first) is None


def test_outcomes_left_out_on_purpose_are_counted_apart_and_not_reported():
    join = AttributionJoin(JoinConfig(attribution_window_s={"click": 60.0}, ignored_tasks=("hate",)))
    for task in ["hate"] * 300 + ["clik"] * 2:
        join.add_feedback({"impression_id": "i1", "ts_ms": 0, "task": task, "value": 1}, "p0")
    counters = join.counters
    assert (counters["ignored_task_feedback"], counters["unknown_task_feedback"], counters["feedback"]) == (300, 2, 302)
    labels = join.task_labels.report(counters)
    assert labels["ignored"] == ["hate"] and labels["unknown"] == {"hate": 300, "clik": 2}  # names of both kinds
    message = task_labels_warning(labels, None)
    assert message.startswith("2 feedback events") and "(2 of 302" in message and "hate" not in message
    assert task_labels_warning({**labels, "ignored": ["hate", "clik"]}, None) is None
    with pytest.raises(ValueError, match=r"ignored_tasks \['click'\] are tasks of the join too"):
        JoinConfig(attribution_window_s={"click": 60.0}, ignored_tasks=("click",))


def test_a_task_without_a_positive_for_the_minimum_of_samples_is_said_while_samples_come():
    quiet = {**LABELS, "since_positive": {"click": MIN_SAMPLES_WITHOUT_POSITIVE - 1, "like": 0}}
    assert task_labels_warning(quiet, None) is None  # fewer samples: a rare task has none by chance
    starved = {**LABELS, "since_positive": {"click": MIN_SAMPLES_WITHOUT_POSITIVE, "like": 0}}
    message = task_labels_warning(starved, None)
    assert message.startswith(f"no positive label for 'click' in the last {MIN_SAMPLES_WITHOUT_POSITIVE:,} samples "
                              "(5 before them)")
    assert "join.attribution_window_s.click (60 s" in message and "'like'" not in message
    assert task_labels_warning(starved, starved) is None  # no sample since that report: not said again
    more = {**starved, "emitted": starved["emitted"] + 500,
            "since_positive": {"click": MIN_SAMPLES_WITHOUT_POSITIVE + 500, "like": 0}}
    assert "in the last 10,500 samples" in task_labels_warning(more, starved)
