"""models.metrics against hand-computed values and a brute-force pairwise reference (ties count 1/2)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from models import metrics
from models.metrics import auc, calibration_ratio, gauc, label_categories, log_loss, multi_auc, task_metrics

pytestmark = pytest.mark.unit


def brute_force_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Every (positive, negative) pair: 1 if ordered right, 1/2 if tied, 0 if wrong."""
    pos = p[y == 1]
    neg = p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_hand_computed_small_case() -> None:
    # Pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, 0.1) right, (0.8, 0.4) right -> 3/4.
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_counts_ties_as_one_half() -> None:
    assert auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    # pos {0.5, 0.9}, neg {0.5, 0.1}: (0.5,0.5)=1/2, (0.5,0.1)=1, (0.9,0.5)=1, (0.9,0.1)=1 -> 3.5/4.
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)


def test_auc_perfect_and_reversed() -> None:
    y = np.array([0, 1, 0, 1, 1])
    p = np.array([0.1, 0.8, 0.2, 0.9, 0.7])
    assert auc(y, p) == 1.0
    assert auc(y, -p) == 0.0


def test_auc_is_nan_with_one_class() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1  # both classes present
    p = rng.integers(0, 20, size=n) / 20.0  # coarse grid -> many ties
    assert auc(y, p) == pytest.approx(brute_force_auc(y, p), abs=1e-12)


def test_auc_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        auc([0, 1], [0.1, 0.2, 0.3])


def test_gauc_weights_users_by_impressions_and_skips_one_class_users() -> None:
    y = np.array([0, 1, 0, 1, 0, 1, 1, 1])
    p = np.array([0.2, 0.9, 0.6, 0.5, 0.4, 0.8, 0.1, 0.3])
    users = np.array(["a", "a", "b", "b", "b", "b", "c", "c"])
    # a: AUC 1 over 2 impressions; b: pos {0.5, 0.8} vs neg {0.6, 0.4}: 3/4 over 4 impressions; c skipped.
    expected = (1.0 * 2 + 0.75 * 4) / 6
    assert gauc(y, p, users) == pytest.approx(expected)


def test_gauc_matches_per_user_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(7)
    n = 600
    users = rng.integers(0, 30, size=n)
    y = rng.integers(0, 2, size=n)
    p = rng.integers(0, 10, size=n) / 10.0
    total, weight = 0.0, 0
    for u in np.unique(users):
        m = users == u
        value = brute_force_auc(y[m], p[m])
        if not math.isnan(value):
            total += value * m.sum()
            weight += m.sum()
    assert gauc(y, p, users) == pytest.approx(total / weight, abs=1e-12)


def test_gauc_is_nan_when_no_user_has_both_classes() -> None:
    assert math.isnan(gauc([1, 0], [0.1, 0.2], ["a", "b"]))


def test_label_categories_follow_the_crossdistil_order() -> None:
    assert label_categories([1, 1, 0, 0], [1, 0, 1, 0]).tolist() == [3, 2, 1, 0]


def test_multi_auc_is_one_for_a_perfect_four_level_order() -> None:
    assert multi_auc([0.1, 0.2, 0.6, 0.7, 0.8, 0.95], [0, 0, 1, 2, 2, 3]) == pytest.approx(1.0)


def test_multi_auc_averages_the_pairs_and_skips_empty_ones() -> None:
    # Only categories 0, 2, 3 occur: pairs (2,0), (3,0), (3,2). Scores put category 3 below 2 -> that pair is 0.
    p = np.array([0.1, 0.9, 0.5])
    cats = np.array([0, 2, 3])
    assert multi_auc(p, cats) == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_multi_auc_matches_brute_force_over_the_six_pairs() -> None:
    rng = np.random.default_rng(3)
    cats = rng.integers(0, 4, size=300)
    p = rng.integers(0, 15, size=300) / 15.0 + 0.05 * cats
    values = []
    for high, low in [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2)]:
        m = (cats == high) | (cats == low)
        values.append(brute_force_auc((cats[m] == high).astype(int), p[m]))
    assert multi_auc(p, cats) == pytest.approx(np.mean(values), abs=1e-12)


def test_multi_auc_is_nan_with_a_single_category() -> None:
    assert math.isnan(multi_auc([0.1, 0.2], [2, 2]))


def test_log_loss_known_values_and_clipping() -> None:
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert log_loss([1], [0.8]) == pytest.approx(-math.log(0.8))
    # A confident mistake is large but finite thanks to clipping.
    value = log_loss([1], [0.0])
    assert math.isfinite(value) and value == pytest.approx(-math.log(metrics.LOG_LOSS_EPS))


def test_calibration_ratio_is_mean_prediction_over_base_rate() -> None:
    assert calibration_ratio([1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]) == pytest.approx(1.0)
    assert calibration_ratio([1, 1, 0, 0], [0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.5)
    assert math.isnan(calibration_ratio([0, 0], [0.1, 0.2]))


def test_task_metrics_names_every_metric() -> None:
    y = np.array([0, 1, 1, 0])
    result = task_metrics(y, np.array([0.2, 0.7, 0.6, 0.4]), np.array([1, 1, 2, 2]), np.array([1, 1, 0, 0]))
    assert set(result) == {"auc", "gauc", "multi_auc", "ndcg10", "log_loss", "calibration", "n", "positive_rate"}
    assert result["auc"] == 1.0 and result["n"] == 4
    assert math.isnan(task_metrics(y, y * 0.5, np.zeros(4), None)["multi_auc"])


def test_module_doctests_pass() -> None:
    result = doctest.testmod(metrics)
    assert result.failed == 0 and result.attempted > 0


def test_gauc_reads_users_of_any_hashable_kind_alike() -> None:
    """The trainer hands users over as an object array (str or int ids mixed per stream)."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, 40, size=500)
    y, p = rng.integers(0, 2, size=500), rng.integers(0, 7, size=500) / 7.0
    as_objects = np.array([f"u{u}" for u in users], dtype=object)
    assert gauc(y, p, as_objects) == pytest.approx(gauc(y, p, users), abs=1e-12)
