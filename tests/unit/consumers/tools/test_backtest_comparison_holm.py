"""The comparison's statistics on data where the answer is known: Holm's adjustment of a known set of p-values and
its family-wise error rate on null p-values; a report's verdicts taken back where the adjusted p-value is over 5%;
the per-user NDCG@10 of ``models.metrics``; and the paired NDCG@10 interval, which covers the known difference of a
population of users at its stated rate (consumers/tools/comparison.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from consumers.tools import comparison
from models.metrics import graded_relevance, ndcg_at_k, per_user_ndcg

pytestmark = pytest.mark.unit


def test_holm_on_a_known_set_of_p_values() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> made non-decreasing: 0.06 for 0.04
    assert comparison.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # at 5% it rejects 0.005 and 0.01 and stops at 0.03 (0.03 x 2 > 0.05), so 0.04 is not rejected either
    assert [p <= 0.05 for p in comparison.holm([0.01, 0.04, 0.03, 0.005])] == [True, False, False, True]
    assert comparison.holm([0.001, 0.02, 0.019]) == pytest.approx([0.003, 0.038, 0.038])
    assert comparison.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert comparison.holm([0.03]) == [0.03] and comparison.holm([]) == []


def test_holm_keeps_the_chance_of_any_false_win_at_5_percent() -> None:
    # 4,000 families of 10 true null hypotheses (uniform p-values): raw, about 1 - 0.95^10 = 40% of the families
    # have a p-value under 5%; after Holm's adjustment about 5% (at most 5% whatever the dependence)
    p = np.random.default_rng(0).random((4000, 10))
    raw = float((p <= 0.05).any(axis=1).mean())
    adjusted = float(np.mean([min(comparison.holm(list(row))) <= 0.05 for row in p]))
    assert raw > 0.35 and 0.035 < adjusted <= 0.06, (raw, adjusted)


def row(p_value: float, verdict: str = "better") -> dict:
    return {"difference": 0.01 if verdict == "better" else 0.0, "interval": [0.001, 0.02], "p_value": p_value,
            "verdict": verdict}


def test_a_report_s_verdicts_use_the_holm_adjusted_p_value() -> None:
    entries = [{"tasks": {"click": {**row(0.01), "last": row(0.04), "ndcg10": {**row(0.03), "last": row(0.005)}},
                          "like": {"verdict": "not comparable", "why": "labels"}}},
               {"tasks": {"click": {**row(1.0, "identical"), "last": row(1.0, "identical")}}}]
    got = comparison.adjust(entries)
    assert got["method"] == "holm" and got["comparisons"] == 4 and got["level"] == 0.95  # no identical, no n/c
    click = entries[0]["tasks"]["click"]
    assert [click["p_holm"], click["last"]["p_holm"], click["ndcg10"]["p_holm"],
            click["ndcg10"]["last"]["p_holm"]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [click["verdict"], click["last"]["verdict"], click["ndcg10"]["verdict"],
            click["ndcg10"]["last"]["verdict"]] == ["better", "within noise", "within noise", "better"]
    assert {click[k]["verdict_unadjusted"] for k in ("last", "ndcg10")} == {"better"}
    assert entries[1]["tasks"]["click"]["verdict"] == "identical" and "p_holm" not in entries[1]["tasks"]["click"]


def test_the_auc_p_value_is_that_of_the_bootstrap_s_standard_error() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(20_000) < 0.3
    a, b = 1.0 * y + rng.normal(size=len(y)), 1.3 * y + rng.normal(size=len(y))
    got = comparison.paired_auc_difference(y, a, b)
    half_width = (got["interval"][1] - got["interval"][0]) / 2
    assert got["se"] == pytest.approx(half_width / 1.96, rel=0.1)  # the bootstrap is about normal
    assert got["p_value"] == pytest.approx(comparison.p_value(got["difference"], got["se"]))
    assert got["p_value"] < 1e-6 and got["verdict"] == "better"
    same = comparison.paired_auc_difference(y, a, 1.0 * y + rng.normal(size=len(y)))
    assert 0.05 < same["p_value"] < 1 and same["verdict"] == "within noise"


def test_per_user_ndcg_is_what_models_metrics_averages() -> None:
    rng = np.random.default_rng(2)
    n = 5000
    users = rng.integers(0, 400, n)
    relevance = graded_relevance(rng.random(n) < 0.2, rng.random(n) < 0.3)
    scores = np.round(rng.random(n), 2)  # ties, which keep row order
    ids, (values,) = per_user_ndcg(relevance, [scores], users)
    assert np.all(np.diff(ids) > 0) and len(ids) < 400  # some users do not count
    assert values.mean() == pytest.approx(ndcg_at_k(relevance, scores, users), abs=1e-12)


def population(n_users: int = 4000, seed: int = 3) -> tuple[np.ndarray, ...]:
    """Users with 3-30 rows each, graded relevance 0-3, and two scorers of different skill: (users, relevance,
    the baseline's scores, the other's scores)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), rng.integers(3, 31, n_users))
    relevance = rng.choice(4, size=len(users), p=[0.7, 0.15, 0.1, 0.05]).astype(float)
    base = 0.5 * relevance + rng.normal(size=len(users))
    other = 0.6 * relevance + rng.normal(size=len(users))
    return users, relevance, base, other


def drawn_intervals(users_per_draw: int, draws: int) -> tuple[float, list[dict]]:
    """The known difference (the mean per-user NDCG@10 difference over the whole population of users) and
    ``paired_ndcg_difference`` over each of ``draws`` random sets of ``users_per_draw`` of its users (seed 4; the
    sets whose users give no interval left out)."""
    users, relevance, base, other = population()
    _, (on_base, on_other) = per_user_ndcg(relevance, [base, other], users)
    rng = np.random.default_rng(4)
    got = []
    for _ in range(draws):
        drawn = np.isin(users, rng.choice(users.max() + 1, users_per_draw, replace=False))
        got.append(comparison.paired_ndcg_difference(relevance[drawn], users[drawn], base[drawn], other[drawn]))
    return float((on_other - on_base).mean()), [g for g in got if g["interval"] is not None]


def test_the_ndcg_interval_covers_the_known_difference_at_its_stated_rate() -> None:
    # each simulation draws 150 users and the interval over those users must cover the known difference about 95%
    # of the time
    known, intervals = drawn_intervals(150, 400)
    covered = [g["interval"][0] <= known <= g["interval"][1] for g in intervals]
    assert len(intervals) == 400 and 0.925 <= np.mean(covered) <= 0.975, np.mean(covered)
    widths = [g["interval"][1] - g["interval"][0] for g in intervals]
    assert 0 < known < np.median(widths)  # a difference the intervals do not resolve every time: a real test


def test_the_ndcg_interval_keeps_its_rate_with_few_users() -> None:
    # 6 users: the per-user differences' spread is itself uncertain, which Student's t (2.57 standard errors for 5
    # degrees of freedom) accounts for and the normal's 1.96 does not
    known, intervals = drawn_intervals(6, 1000)
    covered = [g["interval"][0] <= known <= g["interval"][1] for g in intervals]
    covered_by_the_normal = [abs(g["difference"] - known) <= 1.96 * g["se"] for g in intervals]
    for g in intervals:
        assert g["interval"][1] - g["difference"] == pytest.approx(comparison.t_quantile(g["users"] - 1) * g["se"])
    assert 0.93 <= np.mean(covered) <= 0.975, np.mean(covered)
    assert np.mean(covered_by_the_normal) < 0.925, np.mean(covered_by_the_normal)  # what the t interval fixes


def test_the_ndcg_difference_is_the_difference_of_the_reported_ndcg() -> None:
    users, relevance, base, other = population(300, seed=5)
    got = comparison.paired_ndcg_difference(relevance, users, base, other)
    assert got["base"] == pytest.approx(ndcg_at_k(relevance, base, users), abs=1e-12)
    assert got["other"] == pytest.approx(ndcg_at_k(relevance, other, users), abs=1e-12)
    assert got["difference"] == pytest.approx(got["other"] - got["base"], abs=1e-12)
    assert got["users"] == len(per_user_ndcg(relevance, [base], users)[0])
    same = comparison.paired_ndcg_difference(relevance, users, base, base.copy())
    assert same["verdict"] == "identical" and same["interval"] == [0.0, 0.0]
    one = comparison.paired_ndcg_difference(np.array([1.0, 0.0]), np.array([7, 7]), np.array([0.1, 0.2]),
                                            np.array([0.2, 0.1]))
    assert one["verdict"] == "not comparable" and "1 user(s)" in one["why"]


@dataclass
class Run:
    impression_ids: list[str]
    columns: dict[str, tuple[np.ndarray, np.ndarray]]
    user_codes: np.ndarray

    def arrays(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        return self.columns[task]

    def users(self) -> np.ndarray:
        return self.user_codes


def test_compare_runs_gives_each_task_and_the_combined_score_an_ndcg_difference_in_one_holm_family() -> None:
    users, relevance, base, other = population(200, seed=6)
    rng = np.random.default_rng(7)
    y_click, y_like = relevance > 0, rng.random(len(users)) < 0.3
    ids = [f"i{k}" for k in range(len(users))]
    a = Run(ids, {"click": (y_click, 1 / (1 + np.exp(-base))), "like": (y_like, rng.random(len(users)))}, users)
    b = Run(ids, {"click": (y_click, 1 / (1 + np.exp(-other))), "like": (y_like, rng.random(len(users)))}, users)
    out = comparison.compare_runs({"A": a, "B": b}, {"A": ["click", "like"], "B": ["click", "like"]},
                                  {"A": ["click", "like"], "B": ["click", "like"]}, 0.2)
    entry = out["configurations"]["B"]
    click = entry["tasks"]["click"]["ndcg10"]
    relevance_click = graded_relevance(y_click, y_like)  # the partner of click is like
    assert click["difference"] == pytest.approx(ndcg_at_k(relevance_click, b.columns["click"][1], users)
                                                - ndcg_at_k(relevance_click, a.columns["click"][1], users), abs=1e-12)
    start = int(len(users) * 0.8)
    assert click["last"]["base"] == pytest.approx(ndcg_at_k(relevance_click[start:], a.columns["click"][1][start:],
                                                            users[start:]), abs=1e-12)
    assert "ndcg10" in entry["combined"] and "ndcg10" in entry["tasks"]["like"]
    # 2 tasks and the combined score, AUC and NDCG@10, all and the last 20%: one family of 12
    assert out["method"]["adjustment"]["comparisons"] == 12
    assert all("p_holm" in r for r in comparison.comparisons(entry))


def test_the_verdict_line_names_the_ndcg_wins_and_losses_after_the_auc_s() -> None:
    within = {"verdict": "within noise", "difference": 0.001, "last": {"verdict": "within noise"}}
    better = {"verdict": "better", "difference": 0.0222, "last": {"verdict": "better"}}
    entry = {"tasks": {"click": {**within, "ndcg10": within}, "like": {**within, "ndcg10": better}}}
    assert comparison.summary_line(entry, 0.2) == "within noise on click, like; NDCG@10: better on like (+0.0222)"
    entry["tasks"]["like"]["ndcg10"] = within  # no NDCG verdict to tell: the line is the AUC's alone
    assert comparison.summary_line(entry, 0.2) == "within noise on click, like"
