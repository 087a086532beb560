"""consumers.runtime.telemetry.TrainerMetrics and ServingMetrics: names, labels and values as exported."""

from __future__ import annotations

import json
import math
import re
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.runtime.telemetry import ServingMetrics, TrainerMetrics

pytestmark = pytest.mark.unit

ALLOWED_LABELS = {"task", "role", "window", "reference", "detector", "topic", "partition", "reason", "outcome",
                  "endpoint", "code", "le"}


def families(registry: CollectorRegistry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def value(metrics: TrainerMetrics | ServingMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def a_batch(rng: np.random.Generator, n: int = 256) -> tuple[dict, dict, np.ndarray]:
    labels = {t: rng.integers(0, 2, n) for t in ("click", "like")}
    predictions = {t: np.clip(labels[t] * 0.3 + rng.random(n) * 0.7, 0, 1) for t in ("click", "like")}
    return labels, predictions, rng.integers(0, 30, n)


def test_every_metric_is_prefixed_and_uses_only_the_agreed_labels() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(100, 1000))
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels, predictions, users = a_batch(rng)
        metrics.observe(labels, predictions, users=users)
        metrics.observe(labels, predictions, role="teacher")
    metrics.consumer_lag({("impressions", 0): 3})
    metrics.dead_letter("not_msgpack")
    metrics.events_consumed("feedback", 10)
    metrics.mark_published_reference()
    serving = ServingMetrics(metrics.registry)
    serving.request("/score", 0.003, 200, items=5)
    serving.reload_failed("hash_mismatch")
    found = families(metrics.registry)
    for name, family in found.items():
        assert name.startswith("crossdistil_") or name.startswith("process_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (name, sample.labels)
    for expected in ("crossdistil_auc", "crossdistil_gauc", "crossdistil_log_loss", "crossdistil_calibration_ratio",
                     "crossdistil_positive_rate", "crossdistil_auc_drift", "crossdistil_train_step_seconds",
                     "crossdistil_event_time_lag_seconds", "crossdistil_consumer_lag_messages",
                     "crossdistil_published_model_version", "crossdistil_drift_detections",
                     "crossdistil_serving_request_seconds", "crossdistil_serving_reload_failures"):
        assert expected in found, expected


def test_quality_gauges_have_one_series_per_task_role_and_window() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(100, 1000), baseline_window=5000)
    rng = np.random.default_rng(1)
    labels, predictions, users = a_batch(rng)
    metrics.observe(labels, predictions, users=users)
    windows = {s.labels["window"] for s in families(metrics.registry)["crossdistil_auc"].samples}
    assert windows == {"100", "1000", "5000", "lifetime"}
    for task in ("click", "like"):
        for window in ("100", "1000", "5000", "lifetime"):
            auc = value(metrics, "crossdistil_auc", task=task, role="student", window=window)
            assert 0.5 < auc <= 1.0
        # No teacher series until the trainer observes teacher predictions.
        assert value(metrics, "crossdistil_auc", task=task, role="teacher", window="100") is None
    assert value(metrics, "crossdistil_window_samples", task="click", role="student", window="100") == 100
    assert value(metrics, "crossdistil_window_samples", task="click", role="student", window="1000") == 256


def test_auc_drift_against_the_published_reference_appears_after_a_publication() -> None:
    metrics = TrainerMetrics(["click"], windows=(200,), baseline_window=2000)
    y = np.array([0, 1] * 100)
    metrics.observe({"click": y}, {"click": np.where(y == 1, 0.9, 0.1)})  # AUC 1
    assert value(metrics, "crossdistil_auc_drift", task="click", role="student", window="200",
                 reference="published") is None
    metrics.mark_published_reference()
    metrics.observe({"click": y}, {"click": np.full(200, 0.5)})  # AUC 0.5 over the last 200
    drift = value(metrics, "crossdistil_auc_drift", task="click", role="student", window="200", reference="published")
    assert drift == pytest.approx(-0.5)
    reference = value(metrics, "crossdistil_auc_reference", task="click", role="student", window="200",
                      reference="published")
    assert reference == 1.0
    baseline_drift = value(metrics, "crossdistil_auc_drift", task="click", role="student", window="200",
                           reference="baseline")
    assert baseline_drift == pytest.approx(0.5 - 0.875)  # baseline over all 400 samples


def test_join_counters_become_counter_increments_and_a_decrease_counts_as_a_reset() -> None:
    metrics = TrainerMetrics(["click"], windows=(10,))
    metrics.join_counters({"late_feedback": 3, "orphan_feedback": 0})
    metrics.join_counters({"late_feedback": 5, "orphan_feedback": 2})
    assert value(metrics, "crossdistil_join_events_total", outcome="late_feedback") == 5
    assert value(metrics, "crossdistil_join_events_total", outcome="orphan_feedback") == 2
    metrics.join_counters({"late_feedback": 1})  # a new join started from zero
    assert value(metrics, "crossdistil_join_events_total", outcome="late_feedback") == 6
    # exported from the start
    assert value(metrics, "crossdistil_join_events_total", outcome="evicted_impressions") == 0


def test_event_time_lag_is_wall_clock_minus_watermark_at_scrape_time() -> None:
    now = [1_700_000_100.0]
    metrics = TrainerMetrics(["click"], windows=(10,), clock=lambda: now[0])
    assert math.isnan(value(metrics, "crossdistil_event_time_lag_seconds"))
    metrics.watermark(1_700_000_000_000)
    assert value(metrics, "crossdistil_event_time_lag_seconds") == pytest.approx(100.0)
    now[0] += 30  # a stalled trainer: the lag grows without any update
    assert value(metrics, "crossdistil_event_time_lag_seconds") == pytest.approx(130.0)
    assert value(metrics, "crossdistil_watermark_timestamp_seconds") == pytest.approx(1_700_000_000.0)


def test_consumer_lag_drops_partitions_no_longer_reported() -> None:
    metrics = TrainerMetrics(["click"], windows=(10,))
    metrics.consumer_lag({("impressions", 0): 5, ("impressions", 1): 7})
    metrics.consumer_lag({("impressions", 1): 2})
    assert value(metrics, "crossdistil_consumer_lag_messages", topic="impressions", partition="0") is None
    assert value(metrics, "crossdistil_consumer_lag_messages", topic="impressions", partition="1") == 2


def test_pipeline_calls_update_their_metrics() -> None:
    now = [1_700_000_000.0]
    metrics = TrainerMetrics(["click"], windows=(10,), clock=lambda: now[0])
    metrics.events_consumed("impressions", 100)
    metrics.events_consumed("impressions", 20)
    metrics.dead_letter("missing_field")
    metrics.samples_emitted(64)
    metrics.batch_trained(64, 0.02)
    metrics.checkpoint_written(0.4)
    metrics.published(7, 1.5, 1_699_999_990.0)
    assert value(metrics, "crossdistil_events_consumed_total", topic="impressions") == 120
    assert value(metrics, "crossdistil_dead_letters_total", reason="missing_field") == 1
    assert value(metrics, "crossdistil_samples_emitted_total") == 64
    assert value(metrics, "crossdistil_samples_trained_total") == 64
    assert value(metrics, "crossdistil_train_step_seconds_count") == 1
    assert value(metrics, "crossdistil_train_step_seconds_bucket", le="0.025") == 1
    assert value(metrics, "crossdistil_batch_size_sum") == 64
    assert value(metrics, "crossdistil_checkpoints_total") == 1
    assert value(metrics, "crossdistil_last_checkpoint_timestamp_seconds") == 1_700_000_000.0
    assert value(metrics, "crossdistil_published_model_version") == 7
    assert value(metrics, "crossdistil_published_model_timestamp_seconds") == 1_699_999_990.0
    assert value(metrics, "crossdistil_publish_seconds_sum") == 1.5


def test_unpublished_samples_count_what_the_served_model_has_not_learnt() -> None:
    metrics = TrainerMetrics(["click"], windows=(10,))
    assert value(metrics, "crossdistil_unpublished_samples") == 0  # since the start, before a first publication
    metrics.batch_trained(256, 0.02)
    metrics.batch_trained(100, 0.02)
    assert value(metrics, "crossdistil_unpublished_samples") == 356
    metrics.published(1, 0.5, 1_700_000_000.0)
    assert value(metrics, "crossdistil_unpublished_samples") == 0
    metrics.batch_trained(64, 0.02)
    assert value(metrics, "crossdistil_unpublished_samples") == 64
    assert value(metrics, "crossdistil_samples_trained_total") == 420  # the counter goes on


def test_snapshot_is_plain_json_with_none_for_undefined_values() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(10, 100))
    metrics.observe({"click": np.ones(5)}, {"click": np.full(5, 0.7)})  # one class: AUC undefined
    snapshot = metrics.snapshot()
    json.dumps(snapshot, allow_nan=False)
    assert snapshot["click"]["student"]["auc"]["10"] is None
    assert snapshot["click"]["student"]["positive_rate"]["lifetime"] == 1.0
    assert snapshot["like"] == {"drift_detections": {"adwin": 0, "page_hinkley": 0, "auc_drop": 0}}


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    metrics = TrainerMetrics(["click"], windows=(10,))
    metrics.observe({"click": torch.tensor([0.0, 1.0])}, {"click": torch.tensor([0.2, 0.9], requires_grad=True)})
    assert value(metrics, "crossdistil_auc", task="click", role="student", window="10") == 1.0


def test_scrapes_while_the_trainer_observes_see_consistent_values() -> None:
    metrics = TrainerMetrics(["click"], windows=(500, 2000), baseline_window=10_000)
    rng = np.random.default_rng(2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            while not stop.is_set():
                labels, predictions, users = a_batch(rng, 128)
                metrics.observe(labels, predictions, users=users)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        for _ in range(20):
            text = generate_latest(metrics.registry).decode()
            for match in re.finditer(r'^crossdistil_auc\{[^}]*window="(\d+)"[^}]*\} (\S+)$', text, re.M):
                assert 0.0 <= float(match.group(2)) <= 1.0 or math.isnan(float(match.group(2)))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors and not thread.is_alive()


def test_invalid_configuration_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        TrainerMetrics([], windows=(10,))
    with pytest.raises(ValueError, match="baseline_window"):
        TrainerMetrics(["click"], windows=(10, 100), baseline_window=50)


def test_serving_metrics_record_loads_failures_and_requests() -> None:
    serving = ServingMetrics()
    assert math.isnan(value(serving, "crossdistil_serving_model_version"))
    serving.model_loaded(3, 1_700_000_000.0, 0.25)
    serving.reload_failed("hash_mismatch")
    serving.request("/score", 0.004, 200, items=10)
    serving.request("/score", 0.5, 400)
    assert value(serving, "crossdistil_serving_model_version") == 3
    assert value(serving, "crossdistil_serving_reloads_total") == 1
    assert value(serving, "crossdistil_serving_reload_failures_total", reason="hash_mismatch") == 1
    assert value(serving, "crossdistil_serving_request_seconds_count", endpoint="/score") == 2
    assert value(serving, "crossdistil_serving_requests_total", endpoint="/score", code="400") == 1
    assert value(serving, "crossdistil_serving_scored_items_total") == 10


def test_in_place_snapshot_reads_the_same_values_as_a_scrape_copy() -> None:
    import numpy as np

    metrics = TrainerMetrics(["click"], windows=(50, 200))
    rng = np.random.default_rng(3)
    for _ in range(12):
        y = {"click": (rng.random(32) < 0.4).astype(np.int8)}
        metrics.observe(y, {"click": rng.random(32)}, role="student", users=np.arange(32) % 7)
    copied, _, _ = metrics._quality_state()
    in_place, _, _ = metrics._quality_state(in_place=True)
    assert repr(sorted(copied.items())) == repr(sorted(in_place.items()))  # repr: NaN compares equal to itself
    assert metrics.snapshot()["click"]["student"]["auc"]["200"] == in_place[("click", "student")]["auc"]["200"]


# -- trust-gated distillation (TrainerMetrics.record_learner) ------------------------------------------------

GATED_STEP = {"total": 1.2, "bce/click": 0.6, "kd/click": 0.1, "gate/click": 1.0, "teacher_auc/click": 0.74,
              "student_auc/click": 0.71, "gate/like": 0.0, "teacher_auc/like": 0.62, "student_auc/like": 0.69}


def test_the_trust_gate_report_of_a_step_sets_its_gauges_and_counts_the_step_per_task() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(10,))
    metrics.record_learner(GATED_STEP)
    metrics.record_learner({**GATED_STEP, "gate/click": 0.0})
    assert value(metrics, "crossdistil_kd_gate_open", task="click") == 0.0
    assert value(metrics, "crossdistil_kd_gate_open", task="like") == 0.0
    assert value(metrics, "crossdistil_kd_gate_auc", task="click", role="teacher") == 0.74
    assert value(metrics, "crossdistil_kd_gate_auc", task="like", role="student") == 0.69
    assert value(metrics, "crossdistil_kd_gate_steps_total", task="click", outcome="distilled") == 1
    assert value(metrics, "crossdistil_kd_gate_steps_total", task="click", outcome="skipped") == 1
    assert value(metrics, "crossdistil_kd_gate_steps_total", task="like", outcome="skipped") == 2
    assert value(metrics, "crossdistil_kd_gate_steps_total", task="like", outcome="distilled") is None


def test_undefined_gate_aucs_are_not_exported_and_do_not_overwrite_a_defined_one() -> None:
    metrics = TrainerMetrics(["click"], windows=(10,))
    before_decision = {"gate/click": 0.0, "teacher_auc/click": math.nan, "student_auc/click": math.nan}
    metrics.record_learner(before_decision)
    assert value(metrics, "crossdistil_kd_gate_open", task="click") == 0.0
    assert "crossdistil_kd_gate_auc" not in {s.name for f in families(metrics.registry).values() for s in f.samples}
    metrics.record_learner(GATED_STEP)
    metrics.record_learner({**before_decision, "teacher_auc/click": 0.8})  # the student's AUC undefined again
    assert value(metrics, "crossdistil_kd_gate_auc", task="click", role="teacher") == 0.8
    assert value(metrics, "crossdistil_kd_gate_auc", task="click", role="student") == 0.71


def test_a_learner_without_trust_gate_exports_no_gate_series() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(10,))
    metrics.record_learner({"total": 0.7, "bce/click": 0.4, "bce/like": 0.3, "kd/click": 0.1})
    samples = {s.name for f in families(metrics.registry).values() for s in f.samples}
    assert not {name for name in samples if name.startswith("crossdistil_kd_gate")}
    assert "kd_gate" not in metrics.snapshot()["click"]


def test_the_snapshot_holds_the_trust_gate_as_plain_values() -> None:
    metrics = TrainerMetrics(["click", "like"], windows=(10,))
    metrics.record_learner({**GATED_STEP, "teacher_auc/like": math.nan})
    snapshot = metrics.snapshot()
    json.dumps(snapshot, allow_nan=False)
    assert snapshot["click"]["kd_gate"] == {"open": 1.0, "teacher_auc": 0.74, "student_auc": 0.71,
                                            "distilled_steps": 1, "skipped_steps": 0}
    assert snapshot["like"]["kd_gate"]["teacher_auc"] is None


def test_a_snapshot_of_some_metrics_has_those_and_the_auc_with_the_same_values() -> None:
    rng = np.random.default_rng(4)
    metrics = TrainerMetrics(["click"], windows=(50, 200))
    for _ in range(6):
        metrics.observe({"click": rng.random(64) < 0.3}, {"click": rng.random(64)}, users=rng.integers(0, 9, 64))
    full = metrics.snapshot(gauc=False)["click"]["student"]
    some = metrics.snapshot(gauc=False, metrics=("log_loss",))["click"]["student"]
    assert set(some) == {"auc", "log_loss", "auc_drift"}
    assert some == {k: full[k] for k in some}
    with pytest.raises(KeyError, match="unknown metrics"):
        metrics.snapshot(metrics=("auc", "accuracy"))


def test_drift_detectors_watch_only_the_drift_tasks() -> None:
    from consumers.runtime.config import ConfigError, load_config

    metrics = TrainerMetrics(["click", "like"], windows=(64,), drift_tasks=["click"],
                             auc_drop_options={"window": 1000, "reference": 1000, "min_drop": 0.01, "z": 0})
    rng = np.random.default_rng(4)
    for _ in range(12):
        labels, predictions, users = a_batch(rng)
        metrics.observe(labels, predictions, users=users)
    assert value(metrics, "crossdistil_drift_samples_total", task="click") == 12 * 256
    assert value(metrics, "crossdistil_drift_samples_total", task="like") is None  # not watched, not exported
    assert value(metrics, "crossdistil_drift_detections_total", task="like", detector="adwin") is None
    assert value(metrics, "crossdistil_quality_samples_total", task="like", role="student") == 12 * 256  # still scored
    assert "drift_detections" in metrics.snapshot()["click"] and "drift_detections" not in metrics.snapshot()["like"]
    with pytest.raises(ValueError, match=r"drift_tasks \['share'\] are not among the tasks"):
        TrainerMetrics(["click"], drift_tasks=["share"])
    cfg = load_config(None, env={}, overrides=['model.tasks=["click", "like"]', 'metrics.drift_tasks=["click"]'])
    assert TrainerMetrics.from_config(cfg).drift_tasks == ("click",)
    cfg = load_config(None, env={}, overrides=['model.tasks=["click", "follow", "like"]',
                                               'model.options.aux_tasks=["follow"]'])
    assert TrainerMetrics.from_config(cfg).drift_tasks == ("click", "like")  # auxiliary tasks: not by default
    assert TrainerMetrics.from_config(cfg).tasks == ("click", "follow", "like")  # but scored
    cfg = load_config(None, env={}, overrides=['model.tasks=["click", "follow", "like"]',
                                               'model.options.aux_tasks=["follow"]',
                                               'model.options.counted_tasks=["follow"]'])
    counted = TrainerMetrics.from_config(cfg)
    assert counted.tasks == ("click", "like") and counted.counted_tasks == ("follow",)
    # a counted task's positives are a series from the start (0), so rate() sees it before its first positive
    assert value(counted, "crossdistil_counted_positives_total", task="follow") == 0
    assert value(metrics, "crossdistil_counted_positives_total", task="follow") is None
    with pytest.raises(ConfigError, match=r"metrics.drift_tasks: \['share'\] are not tasks of model.tasks"):
        load_config(None, env={}, overrides=['metrics.drift_tasks=["share"]'])
