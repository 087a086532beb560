"""The live trainer says, at its checkpoints, when a task's labels are not arriving (Checkpointer._warn_late with
consumers.core.join.task_labels_warning): feedback for task names the model does not have, a task without positives."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.core.join import MIN_SAMPLES_WITHOUT_POSITIVE
from tests.unit.consumers.trainer.fakes import FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import checkpointer, train_one_step

pytestmark = pytest.mark.unit

IMPRESSION = {"v": 1, "user_id": "u", "item_id": "i", "features": {}}


def feedback(task: str, n: int, ts_ms: int = 0) -> list[dict]:
    return [{"v": 1, "impression_id": f"x{k}", "ts_ms": ts_ms, "task": task, "value": 1} for k in range(n)]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "task" in r.getMessage()]


def test_feedback_for_a_task_the_model_does_not_have_is_said_once_per_checkpoint_with_the_nearest_task(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))  # model.tasks = click, long_view
    join = c.pipeline.join
    join.add_events(feedback("clik", 30) + feedback("click", 10), ("feedback", 0))
    train_one_step(c)
    with caplog.at_level("WARNING"):
        c.write("interval")
        c.write("shutdown")  # nothing new since: not said again
    [said] = warnings_of(caplog)
    assert said.startswith("30 feedback events for task names the model does not have were ignored (30 of 40 "
                           "feedback events so far, 75.0%): 'clik' 30 (did you mean 'click'?). The producer must name")
    caplog.clear()
    join.add_events(feedback("clik", 5), ("feedback", 0))
    with caplog.at_level("WARNING"):
        c.write("periodic")
    [said] = warnings_of(caplog)
    assert said.startswith("5 feedback events") and "(35 of 45" in said


def test_an_outcome_the_windows_name_beside_model_tasks_is_left_out_on_purpose_and_not_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False),
                     "join.attribution_window_s={click = 60, long_view = 900, like = 900}")
    c.pipeline.join.add_events(feedback("like", 50), ("feedback", 0))
    train_one_step(c)
    with caplog.at_level("WARNING"):
        c.write("interval")
    assert warnings_of(caplog) == []
    counters = c.pipeline.join.counters  # counted (and exported) apart: the unknown-task alert does not read them
    assert (counters["ignored_task_feedback"], counters["unknown_task_feedback"]) == (50, 0)


def test_a_task_without_a_positive_label_for_many_samples_is_said_with_what_to_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    join = c.pipeline.join
    n = MIN_SAMPLES_WITHOUT_POSITIVE
    join.add_events([{**IMPRESSION, "impression_id": f"x{k}", "ts_ms": 0} for k in range(n)], ("impressions", 0))
    join.add_events(feedback("long_view", n, ts_ms=1), ("impressions", 0))  # long_view gets its positives
    join.add_events([{**IMPRESSION, "impression_id": "later", "ts_ms": 10_000_000}], ("impressions", 0))
    assert len(join.emit()) == n
    train_one_step(c)
    with caplog.at_level("WARNING"):
        c.write("interval")
        c.write("shutdown")  # no sample since: not said again
    [said] = warnings_of(caplog)
    assert said.startswith(f"no positive label for 'click' in the last {n:,} samples (none so far)")
    assert "producer's feedback and in model.tasks" in said and "join.attribution_window_s.click (3600 s" in said
    assert "long_view" not in said


def test_a_restarted_trainer_says_only_what_is_new_since_its_checkpoint(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The process that wrote the checkpoint warned of its counts then: its successor does not repeat the totals."""
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    c.pipeline.join.add_events(feedback("clik", 30), ("feedback", 0))
    c.pipeline.join._counters["late_feedback"] = 3  # as if 3 of them had come after their windows
    train_one_step(c)
    with caplog.at_level("WARNING"):
        c.write("shutdown")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m[:20] for m in said if not m.startswith("publication")] == ["3 feedback events ar", "30 feedback events f"]
    caplog.clear()
    restarted = checkpointer(tmp_path, FlakyProducer(refuse=False))
    assert restarted.restore() is not None
    train_one_step(restarted)
    with caplog.at_level("WARNING"):
        restarted.write("periodic")
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and not r.getMessage().startswith("publication")] == []
        restarted.pipeline.join.add_events(feedback("clik", 4), ("feedback", 0))
        restarted.write("periodic")
    [said] = warnings_of(caplog)
    assert said.startswith("4 feedback events for task names the model does not have were ignored (34 of 34")
