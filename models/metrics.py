"""Offline ranking and calibration metrics: pure functions on numpy arrays (used by evaluate, backtest, trainer).

Every function takes labels ``y`` in {0, 1} and scores ``p`` (probabilities, or any monotone score for the
ranking metrics) as 1-D arrays of the same length and returns a float. Ranking metrics return ``nan`` when
they are undefined (one class only), so a caller can tell "undefined" from "bad".

>>> import numpy as np
>>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
>>> gauc(np.array([0, 1, 0, 1]), np.array([0.2, 0.9, 0.7, 0.1]), np.array(["a", "a", "b", "b"]))
0.5
>>> multi_auc(np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 1, 2, 3]))
1.0
>>> round(ndcg_at_k(np.array([2, 0, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2]), np.array(["a", "a", "b", "b"])), 4)
0.8155

``ndcg_at_k`` takes graded relevance (any non-negative numbers) instead of binary labels; ``combined_score``
turns per-task probabilities into one ranking score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

# Clip probabilities away from 0 and 1 so one confident mistake gives a large, finite log loss.
LOG_LOSS_EPS = 1e-7

# The 6 ordered pairs (higher category, lower category) of the 4 CrossDistil label categories.
CATEGORY_PAIRS: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2))


def _as_1d(a: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _rank_average(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` with tied values sharing their average rank (O(n log n))."""
    order = np.argsort(scores)  # quicksort (~3x a stable sort): tied runs get their average rank below anyway
    sorted_scores = scores[order]
    # Boundaries of runs of equal values in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return ranks


def auc(y: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from ranks (Mann-Whitney U), O(n log n). Returns ``nan`` if ``y`` holds only one class.

    >>> auc([1, 0], [0.5, 0.5])
    0.5
    """
    y = _as_1d(y, "y").astype(bool)
    p = _as_1d(p, "p").astype(np.float64)
    if len(y) != len(p):
        raise ValueError(f"y and p differ in length: {len(y)} != {len(p)}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(p)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gauc(y: ArrayLike, p: ArrayLike, users: ArrayLike) -> float:
    """Group AUC: per-user AUC weighted by the user's number of impressions; one-class users are skipped.

    Returns ``nan`` if no user has both classes.

    >>> gauc([0, 1, 1, 1], [0.1, 0.9, 0.3, 0.4], ["a", "a", "b", "b"])  # user b has one class only
    1.0
    """
    y = _as_1d(y, "y")
    p = _as_1d(p, "p")
    users = _as_1d(users, "users")
    if not (len(y) == len(p) == len(users)):
        raise ValueError(f"y, p and users differ in length: {len(y)}, {len(p)}, {len(users)}")
    if len(y) == 0:
        return float("nan")
    # Vectorised: one lexsort by (user, score), no Python loop over users (a 100k window of the trainer's
    # quality metrics may hold tens of thousands of them); runs of equal (user, score) share their average rank.
    y = y.astype(bool)
    p = p.astype(np.float64)
    order = np.lexsort((p, users))
    g, s, yy = users[order], p[order], y[order]
    n = len(g)
    group_start_flags = np.r_[True, g[1:] != g[:-1]]
    group_id = np.cumsum(group_start_flags) - 1
    group_starts = np.flatnonzero(group_start_flags)
    run_starts = np.flatnonzero(group_start_flags | np.r_[True, s[1:] != s[:-1]])
    run_ends = np.r_[run_starts[1:], n]
    rank_in_group = np.repeat((run_starts + run_ends + 1) / 2.0, run_ends - run_starts) - group_starts[group_id]
    n_groups = len(group_starts)
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(group_id, weights=yy, minlength=n_groups)
    n_neg = size - n_pos
    pos_rank_sum = np.bincount(group_id, weights=rank_in_group * yy, minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    u = pos_rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0
    return float(np.sum(u / (n_pos[valid] * n_neg[valid]) * size[valid]) / np.sum(size[valid]))


def ndcg_at_k(relevance: ArrayLike, scores: ArrayLike, users: ArrayLike, k: int = 10) -> float:
    """Mean per-user NDCG@k of ``scores`` against graded ``relevance`` (non-negative), unweighted over users.

    Per user, rows are ranked by score descending (tied scores keep row order);
    DCG@k = sum over the first k ranks i = 0, 1, ... of (2^rel_i - 1) / log2(i + 2), IDCG@k is the DCG@k of the
    ideal order (relevance descending), and NDCG@k = DCG@k / IDCG@k. Only users with at least 2 rows whose
    relevance is not constant count: the others score 1 under any ranking and would only dilute differences.
    Returns ``nan`` when no user counts. Vectorised (two sorts, no loop over users: ``per_user_ndcg``).

    >>> ndcg_at_k([1, 0], [0.2, 0.8], ["u", "u"])  # reversed: DCG = 1/log2(3), IDCG = 1
    0.6309297535714575
    >>> ndcg_at_k([1, 1, 0], [0.5, 0.2, 0.9], ["u", "u", "v"])  # u is constant, v has one row: nobody counts
    nan
    """
    relevance = _as_1d(relevance, "relevance").astype(np.float64)
    scores = _as_1d(scores, "scores").astype(np.float64)
    users = _as_1d(users, "users")
    if not (len(relevance) == len(scores) == len(users)):
        raise ValueError(f"relevance, scores and users differ in length: {len(relevance)}, {len(scores)}, {len(users)}")
    if k < 1:
        raise ValueError(f"k must be a positive number of ranks, got {k}")
    if len(relevance) == 0:
        return float("nan")
    if (relevance < 0).any():
        raise ValueError("relevance must be non-negative (gains are 2^rel - 1)")
    _, (values,) = per_user_ndcg(relevance, [scores], users, k)
    return float(np.mean(values)) if len(values) else float("nan")


def per_user_ndcg(relevance: np.ndarray, score_columns: Sequence[ArrayLike], users: np.ndarray, k: int = 10
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each counting user's NDCG@k (``ndcg_at_k``'s definition: its mean over the users is ``ndcg_at_k``) for each of
    ``score_columns`` on the same rows: (the users that count, in ascending order; per column, their NDCG@k). The
    users and the ideal order depend on the relevance only, so they are sorted once for every column. No checks:
    ``ndcg_at_k`` checks its inputs.

    >>> per_user_ndcg(np.array([1, 0, 1, 1]), [np.array([0.2, 0.8, 0.5, 0.4])], np.array([7, 7, 8, 8]))
    (array([7]), [array([0.63092975])])
    """
    relevance = np.asarray(relevance, np.float64)
    user_ids, user_index = np.unique(np.asarray(users), return_inverse=True)
    user_index = user_index.reshape(-1)
    # Ideal order: by user, relevance descending. A user counts when its first and last relevance differ.
    ideal = np.lexsort((-relevance, user_index))
    ideal_users = user_index[ideal]
    starts = np.flatnonzero(np.r_[True, ideal_users[1:] != ideal_users[:-1]])
    ends = np.r_[starts[1:], len(ideal)]
    counting = ideal_users[starts[relevance[ideal[starts]] != relevance[ideal[ends - 1]]]]
    rank = np.arange(len(ideal)) - np.repeat(starts, ends - starts)  # every order groups the users alike
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    idcg = np.bincount(ideal_users, weights=(np.exp2(relevance[ideal]) - 1.0) * discount, minlength=len(user_ids))
    values = []
    for column in score_columns:
        ranked = np.lexsort((-np.asarray(column, np.float64), user_index))  # stable: tied scores stay in row order
        dcg = np.bincount(user_index[ranked], weights=(np.exp2(relevance[ranked]) - 1.0) * discount,
                          minlength=len(user_ids))
        values.append(dcg[counting] / idcg[counting])
    return user_ids[counting], values


def combined_score(probabilities: ArrayLike, weights: ArrayLike | None = None, eps: float = LOG_LOSS_EPS) -> np.ndarray:
    """One score per row from K task probabilities: prod_k p_k^w_k, computed as exp(sum_k w_k log p_k).

    ``probabilities`` is [N, K]; ``weights`` (K non-negative numbers) default to 1 each. Probabilities are
    clipped to [eps, 1] first, so a zero gives a tiny score instead of log(0).

    >>> combined_score([[0.5, 0.2], [1.0, 0.1]]).round(6).tolist()
    [0.1, 0.1]
    >>> combined_score([[0.5, 0.2]], weights=[2, 0]).round(6).tolist()
    [0.25]
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be an [N, K] array, got shape {p.shape}")
    return np.exp(np.log(np.clip(p, eps, 1.0)) @ checked_weights(weights, p.shape[1]))


def checked_weights(weights: ArrayLike | None, tasks: int | None) -> np.ndarray:
    """The combined score's weights as floats: finite, non-negative, one per task when ``tasks`` is given (1 each
    when ``weights`` is None). The one check of ``combined_score``, evaluation and ``--combined-weights``.

    >>> checked_weights(None, 2).tolist(), checked_weights([2, 0.5], 2).tolist()
    ([1.0, 1.0], [2.0, 0.5])
    """
    if weights is None:
        if tasks is None:
            raise ValueError("give the weights or the number of tasks")
        return np.ones(tasks)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if tasks is not None and w.shape != (tasks,):
        raise ValueError(f"combined-score weights: give one weight per task, {w.size} given for {tasks} tasks")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    return w


def label_categories(y_task: ArrayLike, y_partner: ArrayLike) -> np.ndarray:
    """CrossDistil's 4 ordered categories of (task label, partner label): (1,1)->3, (1,0)->2, (0,1)->1, (0,0)->0.

    >>> label_categories([1, 1, 0, 0], [1, 0, 1, 0]).tolist()
    [3, 2, 1, 0]
    """
    y_task = _as_1d(y_task, "y_task").astype(np.int64)
    y_partner = _as_1d(y_partner, "y_partner").astype(np.int64)
    return 2 * (y_task > 0) + (y_partner > 0)


def graded_relevance(y_task: ArrayLike, y_partner: ArrayLike | None) -> np.ndarray:
    """Relevance of a task's rows for NDCG: the label category 2 * y_task + y_partner, or y_task without a partner.

    >>> graded_relevance([1, 1, 0, 0], [1, 0, 1, 0]).tolist(), graded_relevance([1, 0], None).tolist()
    ([3, 2, 1, 0], [1, 0])
    """
    if y_partner is not None:
        return label_categories(y_task, y_partner)
    return (_as_1d(y_task, "y_task") > 0).astype(np.int64)


def multi_auc(p: ArrayLike, categories: ArrayLike) -> float:
    """Mean AUC of ``p`` over the 6 ordered pairs of categories (higher category as positive); empty pairs skipped.

    Measures the fine-grained order the auxiliary task is meant to teach. Returns ``nan`` if fewer than two
    categories occur.
    """
    p = _as_1d(p, "p").astype(np.float64)
    categories = _as_1d(categories, "categories")
    if len(p) != len(categories):
        raise ValueError(f"p and categories differ in length: {len(p)} != {len(categories)}")
    values = []
    for high, low in CATEGORY_PAIRS:
        mask = (categories == high) | (categories == low)
        in_high = categories[mask] == high
        if in_high.all() or not in_high.any():
            continue
        values.append(auc(in_high, p[mask]))
    return float(np.mean(values)) if values else float("nan")


def log_loss(y: ArrayLike, p: ArrayLike, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy of probabilities ``p`` clipped to [eps, 1 - eps].

    >>> round(log_loss([1, 0], [0.5, 0.5]), 6)
    0.693147
    """
    y = _as_1d(y, "y").astype(np.float64)
    p = np.clip(_as_1d(p, "p").astype(np.float64), eps, 1.0 - eps)
    if len(y) != len(p):
        raise ValueError(f"y and p differ in length: {len(y)} != {len(p)}")
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration_ratio(y: ArrayLike, p: ArrayLike) -> float:
    """mean(p) / mean(y): 1 is calibrated on average, > 1 over-predicts. ``nan`` if there is no positive.

    >>> calibration_ratio([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])
    2.0
    """
    y = _as_1d(y, "y").astype(np.float64)
    p = _as_1d(p, "p").astype(np.float64)
    if len(y) != len(p):
        raise ValueError(f"y and p differ in length: {len(y)} != {len(p)}")
    mean_y = y.mean() if len(y) else 0.0
    if mean_y == 0:
        return float("nan")
    return float(p.mean() / mean_y)


def task_metrics(y: np.ndarray, p: np.ndarray, users: np.ndarray, y_partner: np.ndarray | None) -> dict[str, float]:
    """All metrics of one task under one naming scheme: auc, gauc, multi_auc, ndcg10, log_loss, calibration, n,
    positive_rate.

    ``multi_auc`` is ``nan`` when the task has no partner (``y_partner`` None). ``ndcg10`` is the per-user
    NDCG@10 of ``p`` with graded relevance = the label category 2 * y + y_partner (just y without a partner).
    """
    y = np.asarray(y)
    p = np.asarray(p)
    relevance = graded_relevance(y, y_partner)
    return {
        "auc": auc(y, p),
        "gauc": gauc(y, p, users),
        "multi_auc": multi_auc(p, relevance) if y_partner is not None else float("nan"),
        "ndcg10": ndcg_at_k(relevance, p, users, k=10),
        "log_loss": log_loss(y, p),
        "calibration": calibration_ratio(y, p),
        "n": int(len(y)),
        "positive_rate": float(np.mean(y)) if len(y) else float("nan"),
    }
