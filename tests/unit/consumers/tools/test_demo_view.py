"""The demo's live view (consumers.tools.demo): what it shows from a trainer's /metrics, without starting anything."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from prometheus_client import generate_latest

from consumers.runtime.telemetry import TrainerMetrics
from consumers.tools.demo import Status, parse_samples, plain_line, render

pytestmark = pytest.mark.unit


def status_of(metrics: TrainerMetrics) -> Status:
    status = Status()
    status.update(parse_samples(generate_latest(metrics.registry).decode()), None, 0.0)
    return status


def a_trainer(gated: bool) -> TrainerMetrics:
    metrics = TrainerMetrics(["click", "like"], windows=(100,))
    y = np.array([0, 1] * 50)
    metrics.observe({"click": y, "like": y}, {"click": np.where(y == 1, 0.7, 0.2), "like": np.full(100, 0.5)})
    losses = {"total": 1.0, "bce/click": 0.5, "bce/like": 0.5}
    if gated:
        losses |= {"gate/click": 1.0, "teacher_auc/click": 0.74, "student_auc/click": 0.71,
                   "gate/like": 0.0, "teacher_auc/like": math.nan, "student_auc/like": math.nan}
    metrics.record_learner(losses)
    return metrics


def text_of(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_status_line_shows_each_tasks_trust_gate_and_its_aucs() -> None:
    line = plain_line(status_of(a_trainer(gated=True)))
    assert "click auc=1.000 drift=- kd=on teacher/student=0.740/0.710" in line
    assert "like auc=0.500 drift=- kd=off teacher/student=-/-" in line


def test_the_status_line_of_a_model_without_trust_gate_is_unchanged() -> None:
    line = plain_line(status_of(a_trainer(gated=False)))
    assert "kd=" not in line and "click auc=1.000 drift=- |" in line


def distillation_rows(view: str) -> dict[str, list[str]]:
    """The cells of the distillation table, by task."""
    table = view.split("distillation per task (trust gate)", 1)[1].split("└", 1)[0]
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")]
            for line in table.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in rows}


def test_the_live_view_shows_distillation_per_task_only_for_a_gated_model() -> None:
    gated = text_of(render(status_of(a_trainer(gated=True)), "header", [], ["footer"]))
    assert distillation_rows(gated) == {"click": ["on", "100%", "0.740", "0.710"], "like": ["off", "0%", "-", "-"]}
    plain = text_of(render(status_of(a_trainer(gated=False)), "header", [], ["footer"]))
    assert "distillation" not in plain and "trust gate" not in plain


def test_the_view_shows_the_share_of_labels_dropped_as_late_and_names_the_alert_above_one_percent() -> None:
    from consumers.tools.demo import pipeline_facts

    metrics = a_trainer(gated=False)
    assert dict(pipeline_facts(status_of(metrics)))["late labels"] == "-"  # no feedback yet
    metrics.join_counters({"feedback": 200, "late_feedback": 1})
    assert dict(pipeline_facts(status_of(metrics)))["late labels"] == "0.5% of feedback"
    metrics.join_counters({"feedback": 400, "late_feedback": 100})
    assert dict(pipeline_facts(status_of(metrics)))["late labels"] == "25.0% of feedback (CrossdistilLateFeedback)"


def test_the_view_marks_when_a_detector_fires_and_when_a_quality_alert_starts_firing() -> None:
    metrics = a_trainer(gated=False)
    status = status_of(metrics)
    status.drift_note = "drift injected: click at impression 60,000 (abrupt, magnitude 0.75)"
    assert status.timeline == []
    metrics.drift_detections_total.labels("click", "auc_drop").inc()
    status.update(parse_samples(generate_latest(metrics.registry).decode()), None, status.started_at + 42.0)
    alert = {"labels": {"alertname": "CrossdistilAucDrop", "task": "click", "reference": "baseline"}, "state": "firing"}
    status.update_alerts([alert, {**alert, "state": "pending", "labels": {**alert["labels"], "task": "like"}}],
                         status.started_at + 50.0)
    status.update_alerts([alert], status.started_at + 52.0)  # still firing: no second entry
    assert [(round(t), what) for t, what in status.timeline] == [
        (42, "click: drift detector auc_drop fired (at 100 samples scored)"),
        (50, "click: alert CrossdistilAucDrop firing (baseline, at 100 samples scored)"),
    ]
    assert status.firing() == ["CrossdistilAucDrop(click)"]
    view = text_of(render(status, "header", [], []))
    assert "drift injected: click at impression 60,000" in view and "alert CrossdistilAucDrop firing" in view
    assert "alerts=CrossdistilAucDrop(click)" in plain_line(status)


def test_the_demo_compresses_only_the_quality_alerts_durations() -> None:
    from consumers.tools.demo import ALERT_RULES, demo_alert_rules

    yaml = pytest.importorskip("yaml")
    original = yaml.safe_load(ALERT_RULES.read_text())
    scaled = yaml.safe_load(demo_alert_rules(ALERT_RULES.read_text()))
    rules = {r["alert"]: r for g in scaled["groups"] for r in g["rules"] if "alert" in r}
    before = {r["alert"]: r for g in original["groups"] for r in g["rules"] if "alert" in r}
    assert before["CrossdistilAucDrop"]["for"] == "10m" and rules["CrossdistilAucDrop"]["for"] == "10s"
    assert "[10s]" in rules["CrossdistilDriftDetected"]["expr"]
    assert rules["CrossdistilLateFeedback"] == before["CrossdistilLateFeedback"]  # pipeline alerts unchanged


def test_the_synthetic_drift_flags_become_stream_options_and_bad_ones_are_refused() -> None:
    from consumers.tools.demo import synthetic_options

    options = synthetic_options(120_000)
    assert (options["drift"], options["drift_at"], options["drift_task"], options["drift_magnitude"]) == (
        "abrupt", "60000", "click", "0.75")
    assert synthetic_options(90_000, "recurring", 1.0, "click,like")["drift_at"] == "30000,60000"
    assert "drift_at" not in synthetic_options(1000, "none")
    for bad in (("sideways", 0.5, "click"), ("abrupt", 1.5, "click"), ("abrupt", 0.5, "share")):
        with pytest.raises(ValueError):
            synthetic_options(1000, *bad)


def test_demo_ranks_are_bounded_by_the_partitions_and_prometheus_scrapes_every_rank(tmp_path) -> None:
    import argparse

    from consumers.tools.demo import add_arguments, make_plan, write_prometheus_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="between 1 and 4"):
        make_plan(parser.parse_args(["--dataset", "synthetic", "--ranks", "5", "--out", str(tmp_path)]))
    plan = make_plan(parser.parse_args(["--dataset", "synthetic", "--ranks", "2", "--out", str(tmp_path)]))
    assert plan.ranks == 2
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    plan.ports = {"trainer": 9500, "serving": 9600}
    text = write_prometheus_config(plan).read_text()
    assert '["127.0.0.1:9500", "127.0.0.1:9501"]' in text  # metrics.port + rank


# -- the event-time lag against the replay clock ------------------------------------------------------------
def a_scrape(watermark_s: float) -> dict:
    """A trainer scrape holding only the join's watermark (and the wall-clock lag the demo must not show)."""
    return {"crossdistil_watermark_timestamp_seconds": [({}, watermark_s)],
            "crossdistil_event_time_lag_seconds": [({}, 1701.3 * 86_400)]}


def test_the_view_shows_the_event_time_lag_against_the_replay_clock_not_the_wall_clock() -> None:
    from consumers.tools.demo import pipeline_facts

    status = Status(replay_speed=4000.0)
    kuairand_start = 1_649_346_288.0
    status.update(a_scrape(kuairand_start), None, 10.0)
    assert dict(pipeline_facts(status))["lag vs replay clock"] == "0 s"
    # 2 s of wall time at 4000x: the replay clock moved 8,000 s of event time; the watermark 800 s
    status.update(a_scrape(kuairand_start + 800), None, 12.0)
    facts = dict(pipeline_facts(status))
    assert facts["lag vs replay clock"] == "2.0 h" and "event-time lag" not in facts
    assert "1701" not in text_of(render(status, "header", [], []))
    status.replay_ended_at = 13.0  # the stream ended: the replay clock stops there
    status.update(a_scrape(kuairand_start + 12_000), None, 20.0)
    assert dict(pipeline_facts(status))["lag vs replay clock"] == "0 s"


def test_an_unpaced_stream_has_no_replay_clock_and_the_view_says_so() -> None:
    from consumers.tools.demo import pipeline_facts

    status = Status(replay_speed=None)
    status.update(a_scrape(1_649_346_288.0), None, 10.0)
    assert dict(pipeline_facts(status))["lag vs replay clock"] == "none (--speed max)"


# -- the closing summary ----------------------------------------------------------------------------------
def a_plan(tmp_path, *flags: str):
    import argparse

    from consumers.tools.demo import add_arguments, make_plan

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return make_plan(parser.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "run"), *flags]))


def test_the_closing_summary_counts_checkpoint_files_only_and_names_the_logs_of_what_ran(tmp_path) -> None:
    from consumers.tools.demo import closing_lines

    plan = a_plan(tmp_path, "--no-prometheus")
    checkpoints = plan.run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("ckpt-000000000020.cdckpt", "ckpt-000000000040.cdckpt", ".lock", "published.json",
                 "ckpt-000000000010.cdckpt.corrupt"):
        (checkpoints / name).write_bytes(b"")
    lines = closing_lines(plan, Status(), {"stream": "exit 0"}, None, ["trainer", "serving", "stream"], None)
    assert f"[demo] checkpoints  {checkpoints} (2 checkpoints)" in lines
    assert f"[demo] logs         {plan.run_dir / 'logs'} (stream, trainer, serving); " \
           f"Kafka: {plan.kafka_data_dir / 'broker.log'}" in lines


def test_the_closing_auc_line_says_how_many_samples_were_scored_when_fewer_than_the_window() -> None:
    from consumers.tools.demo import auc_line

    metrics = TrainerMetrics(["click", "like"], windows=(2000,))
    y = np.array([0, 1] * 970)
    metrics.observe({"click": y, "like": y}, {"click": np.where(y == 1, 0.7, 0.2), "like": np.full(1940, 0.5)})
    assert auc_line(status_of(metrics)) == "[demo] last AUC over 1,940 samples: click 1.000, like 0.500"
    metrics.observe({"click": y, "like": y}, {"click": np.where(y == 1, 0.7, 0.2), "like": np.full(1940, 0.5)})
    assert auc_line(status_of(metrics)) == "[demo] last AUC over 2,000 samples: click 1.000, like 0.500"


def test_the_help_says_kuairands_span_every_speed_and_the_refresh_default() -> None:
    import argparse

    from consumers.tools.demo import add_arguments, speed_label

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "'realtime' (1x), or 'max' (unpaced) (default: 4000 for KuaiRand, ~5 minutes for its 14 days;" in text
    assert "seconds between scrapes of /metrics (default: 1.0)" in text
    assert [speed_label(s) for s in ("4000", "realtime", "max")] == ["4000x", "realtime", "max"]
