"""Ranking metrics: per-user NDCG@k and the combined score, against hand-computed values and a per-user reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import EncodedData, combined_metrics, combined_weights_for, run_prequential, run_time_split
from models.metrics import combined_score, graded_relevance, ndcg_at_k, task_metrics

pytestmark = pytest.mark.unit

LOG2_3 = math.log2(3)


def reference_ndcg(relevance: np.ndarray, scores: np.ndarray, users: np.ndarray, k: int) -> float:
    """The definition, one user at a time (stable sort for tied scores)."""
    values = []
    for user in np.unique(users):
        rel = relevance[users == user].astype(float)
        if len(rel) < 2 or rel.min() == rel.max():
            continue
        discount = 1.0 / np.log2(np.arange(len(rel)) + 2.0)
        order = np.argsort(-scores[users == user], kind="stable")
        dcg = ((2 ** rel[order] - 1) * discount)[:k].sum()
        idcg = ((2 ** np.sort(rel)[::-1] - 1) * discount)[:k].sum()
        values.append(dcg / idcg)
    return float(np.mean(values)) if values else float("nan")


def test_ndcg_of_the_perfect_ranking_is_one() -> None:
    assert ndcg_at_k([3, 2, 1, 0], [0.9, 0.7, 0.5, 0.1], ["u"] * 4) == pytest.approx(1.0)


def test_ndcg_of_a_reversed_ranking_matches_the_hand_computed_value() -> None:
    # Relevances 0, 1, 2 ranked worst first. DCG = 0/1 + 1/log2(3) + 3/2; IDCG = 3/1 + 1/log2(3) + 0/2.
    expected = (1 / LOG2_3 + 3 / 2) / (3 + 1 / LOG2_3)
    assert ndcg_at_k([0, 1, 2], [0.9, 0.5, 0.1], ["u"] * 3) == pytest.approx(expected)


def test_ndcg_breaks_tied_scores_by_row_order() -> None:
    # All scores tie: the order is the row order, so a relevant first row is perfect and a relevant last row is not.
    assert ndcg_at_k([1, 0], [0.5, 0.5], ["u", "u"]) == pytest.approx(1.0)
    assert ndcg_at_k([0, 1], [0.5, 0.5], ["u", "u"]) == pytest.approx(1 / LOG2_3)


def test_ndcg_skips_single_row_and_constant_relevance_users() -> None:
    users = ["a", "a", "b", "c", "c"]
    # a: reversed (1/log2 3); b: one row; c: constant relevance. Only a counts.
    assert ndcg_at_k([0, 1, 1, 2, 2], [0.9, 0.1, 0.5, 0.3, 0.4], users) == pytest.approx(1 / LOG2_3)


def test_ndcg_is_nan_when_no_user_counts() -> None:
    assert math.isnan(ndcg_at_k([1, 1, 0], [0.2, 0.1, 0.3], ["a", "a", "b"]))
    assert math.isnan(ndcg_at_k([], [], []))


def test_ndcg_averages_users_without_weighting_them_by_their_rows() -> None:
    # a: 4 rows ranked perfectly; b: 2 rows reversed. Unweighted mean of 1 and 1/log2(3).
    users = ["a"] * 4 + ["b"] * 2
    value = ndcg_at_k([1, 1, 0, 0, 0, 1], [0.9, 0.8, 0.2, 0.1, 0.9, 0.1], users)
    assert value == pytest.approx((1 + 1 / LOG2_3) / 2)


def test_ndcg_counts_only_the_first_k_ranks() -> None:
    # The only relevant row is ranked 3rd: NDCG@2 = 0, NDCG@3 = 1/log2(4) = 0.5.
    rel, scores, users = [0, 0, 1], [0.9, 0.8, 0.1], ["u"] * 3
    assert ndcg_at_k(rel, scores, users, k=2) == pytest.approx(0.0)
    assert ndcg_at_k(rel, scores, users, k=3) == pytest.approx(0.5)


def test_ndcg_matches_the_per_user_definition_on_random_data() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(1, 80))
        users, rel = rng.integers(0, 8, n), rng.integers(0, 4, n)
        scores = rng.integers(0, 6, n) / 5  # many ties
        k = int(rng.integers(1, 12))
        expected = reference_ndcg(rel, scores, users, k)
        got = ndcg_at_k(rel, scores, users, k=k)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_ndcg_rejects_negative_relevance_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k([-1, 1], [0.1, 0.2], ["u", "u"])
    with pytest.raises(ValueError, match="differ in length"):
        ndcg_at_k([1, 0], [0.1], ["u", "u"])


def test_ndcg_takes_well_under_a_second_on_an_evaluation_window() -> None:
    import time

    rng = np.random.default_rng(0)
    n = 45_000
    users = np.array([f"user{u}" for u in rng.integers(0, 20_000, n)])
    started = time.perf_counter()
    value = ndcg_at_k(rng.integers(0, 4, n), rng.random(n), users)
    assert time.perf_counter() - started < 0.5 and 0.0 < value < 1.0


def test_graded_relevance_is_the_label_category_or_the_label_alone() -> None:
    assert graded_relevance([1, 1, 0, 0], [1, 0, 1, 0]).tolist() == [3, 2, 1, 0]
    assert graded_relevance([1, 0, 1], None).tolist() == [1, 0, 1]


def test_task_metrics_ndcg_uses_the_partner_as_the_lower_grade() -> None:
    # One user; the score orders (y, partner) = (1,0), (1,1), (0,1), (0,0): relevances 2, 3, 1, 0.
    y, partner = np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6])
    dcg = 3 + 7 / LOG2_3 + 1 / 2
    idcg = 7 + 3 / LOG2_3 + 1 / 2
    assert task_metrics(y, p, np.zeros(4), partner)["ndcg10"] == pytest.approx(dcg / idcg)
    assert task_metrics(y, p, np.zeros(4), None)["ndcg10"] == pytest.approx(1.0)  # binary: both positives first


def test_combined_score_is_the_weighted_product_of_probabilities() -> None:
    p = np.array([[0.5, 0.2], [0.9, 0.9], [1.0, 0.0]])
    assert combined_score(p) == pytest.approx([0.1, 0.81, 1e-7])  # a zero is clipped, not log(0)
    assert combined_score(p, [2.0, 0.0]) == pytest.approx([0.25, 0.81, 1.0])
    assert combined_score(p, [0.5, 1.0]) == pytest.approx([math.sqrt(0.5) * 0.2, math.sqrt(0.9) * 0.9, 1e-7])


def test_combined_score_checks_its_weights() -> None:
    with pytest.raises(ValueError, match="one weight per task"):
        combined_score(np.full((2, 2), 0.5), [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        combined_score(np.full((2, 2), 0.5), [1.0, -1.0])
    with pytest.raises(ValueError, match="2 tasks"):
        combined_weights_for(("a", "b"), [1.0, 2.0, 3.0])


def test_combined_auc_is_against_every_task_positive() -> None:
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    # Only row 0 has both tasks positive; it has the highest product (0.72) -> AUC 1.
    predictions = {"a": np.array([0.9, 0.95, 0.1, 0.3]), "b": np.array([0.8, 0.3, 0.9, 0.2])}
    result = combined_metrics(labels, predictions, np.zeros(4), ("a", "b"))
    assert result["auc"] == pytest.approx(1.0)
    assert result["weights"] == [1.0, 1.0]
    # Weight 0 on b ranks by a alone: row 1 (0.95, not every task positive) outranks row 0 -> AUC 2/3.
    assert combined_metrics(labels, predictions, np.zeros(4), ("a", "b"), [1.0, 0.0])["auc"] == pytest.approx(2 / 3)


def test_combined_ndcg_grades_rows_by_their_number_of_positive_tasks() -> None:
    labels = np.array([[1, 1], [1, 0], [0, 0]])  # relevances 2, 1, 0
    users = np.array(["u", "u", "u"])
    in_order = {"a": np.array([0.9, 0.5, 0.1]), "b": np.array([0.9, 0.5, 0.1])}
    assert combined_metrics(labels, in_order, users, ("a", "b"))["ndcg10"] == pytest.approx(1.0)
    reversed_ = {"a": np.array([0.1, 0.5, 0.9]), "b": np.array([0.1, 0.5, 0.9])}
    expected = (1 / LOG2_3 + 3 / 2) / (3 + 1 / LOG2_3)
    assert combined_metrics(labels, reversed_, users, ("a", "b"))["ndcg10"] == pytest.approx(expected)


class OracleLearner:
    """Predicts every row's true labels (softened), so the combined score ranks "both positive" rows first."""

    def predict(self, batch: dict) -> dict:
        return {task: batch["labels"][:, k] * 0.8 + 0.1 for k, task in enumerate(("a", "b"))}

    def step(self, batch: dict) -> tuple[dict, dict]:
        return {"loss": 0.0}, self.predict(batch)


def oracle_data(n: int = 100) -> EncodedData:
    import torch

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(n, 2)).astype(np.float32)
    return EncodedData(batch={"labels": torch.from_numpy(labels)}, tasks=("a", "b"), labels=labels,
                       users=rng.integers(0, 5, n), ts_ms=np.arange(n))


def test_time_split_and_prequential_results_carry_the_combined_metrics_per_window() -> None:
    split = run_time_split(OracleLearner(), oracle_data(), {}, batch_size=16, combined_weights=[1.0, 2.0])
    assert set(split.combined) == {"test"}
    assert split.combined["test"]["auc"] == pytest.approx(1.0)
    assert split.combined["test"]["weights"] == [1.0, 2.0]
    prequential = run_prequential(OracleLearner(), oracle_data(), {}, batch_size=16, publications=2)
    assert set(prequential.combined) == {"all", "tail", "served"}
    assert prequential.combined["tail"]["ndcg10"] == pytest.approx(1.0)
    assert prequential.combined["served"]["ndcg10"] == pytest.approx(1.0)


def test_runs_refuse_wrong_combined_weights_before_training() -> None:
    class Untrainable(OracleLearner):
        def step(self, batch: dict) -> tuple[dict, dict]:
            raise AssertionError("trained before checking the weights")

    with pytest.raises(ValueError, match="1 given for 2 tasks"):
        run_prequential(Untrainable(), oracle_data(), {}, combined_weights=[1.0])
