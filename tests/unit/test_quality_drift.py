"""Drift detection: ADWIN and PageHinkley fire on an abrupt loss change within a bounded delay, and stay quiet on
a stationary stream; the drifted task's AUC-drift gauges go negative, the other task's stay near zero."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.drift import DETECTORS, LossDriftDetectors, detection_delay, per_sample_log_loss
from consumers.metrics import TrainerMetrics

pytestmark = pytest.mark.unit

BATCH = 256
# Bound on the detection delay asserted below, in samples (measured delays are printed with -s; see report).
MAX_DELAY_SAMPLES = 6_000


def predictions_and_labels(rng: np.random.Generator, n: int, informative: bool) -> tuple[np.ndarray, np.ndarray]:
    """A model with AUC ~0.8 on its data; after a drift its scores no longer relate to the labels, and the
    positive rate moves (as the synthetic generator's drift does: new item factors, bias shift)."""
    logit = rng.normal(0, 1.5, n)
    p = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.8, n))))
    if informative:
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    else:
        new_logit = rng.normal(-1.5, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-new_logit))).astype(np.int64)
    return y, p


def test_detectors_stay_quiet_on_a_stationary_loss_stream() -> None:
    rng = np.random.default_rng(0)
    detectors = LossDriftDetectors()
    fired = []
    for _ in range(300_000 // BATCH):
        y, p = predictions_and_labels(rng, BATCH, informative=True)
        fired += detectors.update(per_sample_log_loss(y, p))
    assert fired == []
    assert detectors.detections == dict.fromkeys(DETECTORS, 0)


@pytest.mark.parametrize("chunk", [1, 8])
def test_both_detectors_fire_soon_after_an_abrupt_loss_increase(chunk: int) -> None:
    rng = np.random.default_rng(1)
    detectors = LossDriftDetectors(chunk=chunk)
    change_at = 100_000
    fired_at: dict[str, list[int]] = {name: [] for name in DETECTORS}
    for start in range(0, 150_000, BATCH):
        y, p = predictions_and_labels(rng, BATCH, informative=start < change_at)
        for name in detectors.update(per_sample_log_loss(y, p)):
            fired_at[name].append(start + BATCH)  # detected at the latest by the end of this batch
    for name in DETECTORS:
        assert [i for i in fired_at[name] if i < change_at] == [], f"{name} fired before the change"
        delay = detection_delay(fired_at[name], change_at)
        print(f"chunk={chunk} {name}: delay {delay} samples")
        assert delay is not None and delay <= MAX_DELAY_SAMPLES, f"{name}: delay {delay}"


def test_trainer_metrics_flag_only_the_drifted_task_and_its_auc_drift_goes_negative() -> None:
    rng = np.random.default_rng(2)
    now = [1_700_000_000.0]
    metrics = TrainerMetrics(["drifted", "steady"], windows=(2_000, 10_000), baseline_window=50_000, clock=lambda: now[0])
    change_at = 60_000
    fired: list[tuple[int, str, str]] = []
    for start in range(0, 80_000, BATCH):
        labels, predictions = {}, {}
        for task in ("drifted", "steady"):
            informative = task == "steady" or start < change_at
            labels[task], predictions[task] = predictions_and_labels(rng, BATCH, informative)
        fired += [(start, task, detector) for task, detector in metrics.observe(labels, predictions)]
        now[0] += 1.0
        if start // BATCH == change_at // BATCH - 10:
            metrics.mark_published_reference()  # a checkpoint published shortly before the drift
    assert {task for _, task, _ in fired} == {"drifted"}
    assert min(start for start, _, _ in fired) >= change_at - BATCH
    snapshot = metrics.snapshot()
    drift = snapshot["drifted"]["student"]["auc_drift"]
    steady = snapshot["steady"]["student"]["auc_drift"]
    assert drift["2000/published"] < -0.15 and drift["2000/baseline"] < -0.1
    assert abs(steady["2000/published"]) < 0.05 and abs(steady["2000/baseline"]) < 0.05
    assert snapshot["drifted"]["drift_detections"]["adwin"] >= 1
    assert snapshot["steady"]["drift_detections"] == {"adwin": 0, "page_hinkley": 0}
    # The counter and the last-detection time are exported.
    registry = metrics.registry
    assert registry.get_sample_value("crossdistil_drift_detections_total", {"task": "drifted", "detector": "adwin"}) >= 1
    assert registry.get_sample_value(
        "crossdistil_drift_last_detection_timestamp_seconds", {"task": "drifted", "detector": "adwin"}
    ) > 1_700_000_000.0
    assert registry.get_sample_value(
        "crossdistil_auc_drift", {"task": "drifted", "role": "student", "window": "2000", "reference": "published"}
    ) < -0.15


def test_chunked_losses_carry_over_between_batches() -> None:
    detectors = LossDriftDetectors(chunk=8)
    detectors.update(np.full(5, 0.5))
    detectors.update(np.full(5, 0.5))
    assert detectors.samples_seen == 10
    with pytest.raises(ValueError, match="chunk"):
        LossDriftDetectors(chunk=0)
