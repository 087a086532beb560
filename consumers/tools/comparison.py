"""Is configuration B better than A, on the samples both scored, by more than noise?

A backtest scores every configuration on the same samples, so a difference between two configurations' AUCs can be
paired: sample by sample, which of the two ranked it better. ``paired_auc_difference`` gives B's AUC minus A's and a
95% interval from a paired block bootstrap, and ``verdict`` a word for it that never calls an interval containing 0
a win. ``compare_runs`` does it per task (and for the combined score) for each configuration against the first.

The bootstrap, stated as the report states it: the samples, in training order, are cut into ``BLOCKS`` contiguous
blocks (neighbouring samples share users, items and the model's state, so they are not independent draws; blocks
keep that together); each of ``RESAMPLES`` resamples draws that many blocks with replacement (seed ``SEED``), the
same blocks for A and for B (paired). A resample's AUC is taken to first order: each sample's DeLong placement value
(for a positive the share of negatives it outranks, ties one half; for a negative the share of positives that
outrank it) is the AUC's influence of that sample, and a resample's AUC difference is the full difference plus the
sum over its blocks of the difference of the two configurations' influences. That makes a resample cost a sum over
blocks instead of two sorts of the samples (``tests/unit/consumers/tools/test_backtest_comparison.py`` checks the
interval against the bootstrap of exact AUCs).

Each difference also has a two-sided p-value (the AUC's a normal approximation with the bootstrap's standard
error, ``paired_ndcg_difference``'s Student's t with the standard error of the per-user differences), and
``compare_runs`` adjusts them across every comparison of one report by Holm's step-down method (``holm``): a verdict
is ``better`` or ``worse`` only where the raw interval excludes 0 and the Holm-adjusted p-value is at most
``1 - LEVEL``, so that over many configurations and tasks the chance of calling any noise a win stays at most 5%.

>>> import numpy as np
>>> y = np.array([0, 1] * 50); a = np.linspace(0, 1, 100); b = a + 0.5 * y
>>> r = paired_auc_difference(y, a, b)
>>> r["difference"] > 0 and r["interval"][0] > 0 and r["p_value"] < 0.05 and r["verdict"]
'better'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from models.metrics import combined_score, graded_relevance, per_user_ndcg

RESAMPLES = 2000
BLOCKS = 100  # contiguous blocks of the training order; fewer where there are fewer samples
SEED = 0
LEVEL = 0.95
VERDICTS = ("better", "worse", "within noise", "identical", "not comparable")


class Scored(Protocol):
    """What a comparison reads of a replayed configuration (``consumers.tools.backtest.ConfigRun``)."""

    impression_ids: list[str]

    def arrays(self, task: str) -> tuple[np.ndarray, np.ndarray]: ...

    def users(self) -> np.ndarray: ...


def method() -> dict[str, Any]:
    """How the intervals were made, as summary.json's ``comparison.method`` records it (``compare_runs`` adds
    ``adjustment``: how many comparisons its Holm adjustment spans)."""
    return {"statistic": "AUC of the configuration minus the baseline's, on the samples both scored",
            "interval": f"{LEVEL:.0%} percentile interval of a paired block bootstrap: {RESAMPLES} resamples of "
                        f"{BLOCKS} contiguous blocks of the training order (seed {SEED}), each resample's AUC "
                        "difference to first order (DeLong placement values)",
            "p_value": "two-sided: a normal approximation with the bootstrap's standard error (AUC); Student's t "
                       "with users - 1 degrees of freedom and the standard error of the per-user differences "
                       "(NDCG@10)",
            "ndcg10": f"per-user NDCG@10 of the configuration minus the baseline's, averaged over the users that "
                      f"count, with a {LEVEL:.0%} t interval over those users (the mean difference plus or minus "
                      "Student's t quantile for users - 1 degrees of freedom times the per-user differences' "
                      "standard deviation over the square root of their number)",
            "resamples": RESAMPLES, "blocks": BLOCKS, "seed": SEED, "level": LEVEL}


def auc_influence(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """The AUC of scores ``p`` for labels ``y`` (ties count one half; nan with one class only) and each sample's
    first-order share of it: the AUC of a subset of samples is about the AUC plus the sum of their shares
    (DeLong's placement values less the AUC, over the number of positives or negatives); the shares sum to 0.
    One sort of the scores.

    >>> auc, share = auc_influence(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6]))
    >>> auc, share.round(4).tolist()
    (0.75, [0.125, 0.125, -0.125, -0.125])
    """
    positive = np.asarray(y) > 0
    p = np.asarray(p, np.float64)
    m = int(positive.sum())
    n = len(positive) - m
    if m == 0 or n == 0:
        return math.nan, np.zeros(len(p))
    order = np.argsort(p)  # ties form one group below, so the sort need not be stable
    ordered, label = p[order], positive[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # groups of equal scores
    size = np.diff(np.r_[starts, len(p)])
    pos_in = np.add.reduceat(label.astype(np.int64), starts)
    neg_in = size - pos_in
    pos_below, neg_below = np.cumsum(pos_in) - pos_in, np.cumsum(neg_in) - neg_in
    # a positive's placement: the share of negatives below it (ties one half); a negative's: of positives above it
    group = np.repeat(np.arange(len(starts)), size)
    placement = np.empty(len(p))
    placement[order] = np.where(label, ((neg_below + 0.5 * neg_in) / n)[group],
                                ((m - pos_below - 0.5 * pos_in) / m)[group])
    auc = float(placement[positive].mean())
    return auc, np.where(positive, (placement - auc) / m, (placement - auc) / n)


def paired_auc_difference(y: np.ndarray, p_base: np.ndarray, p_other: np.ndarray, *, blocks: int = BLOCKS,
                          resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """``p_other``'s AUC minus ``p_base``'s on the same samples (labels ``y``, in training order) and its ``level``
    interval from a paired block bootstrap (see the module's docstring); ``verdict`` of the two."""
    y = np.asarray(y) > 0
    p_base, p_other = np.asarray(p_base, np.float64), np.asarray(p_other, np.float64)
    out: dict[str, Any] = {"samples": int(len(y)), "positives": int(y.sum())}
    finite = np.isfinite(p_base) & np.isfinite(p_other)
    if not finite.all():  # a diverged model: its AUC would rank nan as a score
        return {**out, "base": None, "other": None, "difference": None, "interval": None,
                "verdict": "not comparable", "why": f"{int((~finite).sum()):,} predictions are not finite"}
    auc_base, share_base = auc_influence(y, p_base)
    auc_other, share_other = auc_influence(y, p_other)
    if math.isnan(auc_base):
        return {**out, "base": None, "other": None, "difference": None, "interval": None,
                "verdict": "not comparable", "why": "the samples hold one class only"}
    difference = auc_other - auc_base
    identical = bool(np.array_equal(p_base, p_other))
    if identical:
        interval, se = [0.0, 0.0], 0.0
    else:
        k = min(blocks, len(y))
        starts = np.linspace(0, len(y), k + 1).astype(np.int64)[:-1]
        block_sums = np.add.reduceat(share_other - share_base, starts)
        drawn = np.random.default_rng(seed).integers(0, k, size=(resamples, k))  # k blocks per resample
        replicates = difference + block_sums[drawn].sum(axis=1)
        low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
        interval, se = [float(low), float(high)], float(np.std(replicates, ddof=1))
    return {**out, "base": auc_base, "other": auc_other, "difference": difference, "interval": interval,
            "se": se, "p_value": 1.0 if identical else p_value(difference, se),
            "verdict": verdict(difference, interval, identical=identical)}


def p_value(difference: float, se: float, df: int | None = None) -> float:
    """Two-sided p-value of ``difference`` against 0 with standard error ``se``: normal, or Student's t with ``df``
    degrees of freedom (a mean over df + 1 independent draws whose spread is estimated from them); 1 without a
    difference, 0 for a difference without any spread.

    >>> round(p_value(1.96, 1.0), 4), round(p_value(2.776, 1.0, df=4), 4), p_value(0.0, 0.0), p_value(0.1, 0.0)
    (0.05, 0.05, 1.0, 0.0)
    """
    if difference == 0:
        return 1.0
    if not se > 0:
        return 0.0
    if df is not None:
        from scipy.special import stdtr  # here: `crossdistil backtest --help` loads no numpy

        return float(2 * stdtr(df, -abs(difference) / se))
    return math.erfc(abs(difference) / se / math.sqrt(2))


def paired_ndcg_difference(relevance: np.ndarray, users: np.ndarray, p_base: np.ndarray, p_other: np.ndarray, *,
                           level: float = LEVEL) -> dict[str, Any]:
    """``p_other``'s per-user NDCG@10 minus ``p_base``'s on the same samples (graded ``relevance``, each sample's
    user), averaged over the users that count (``models.metrics.per_user_ndcg``: the same users for both, whose
    relevance is the same), with a ``level`` t interval over those users: the mean difference plus or minus Student's t
    quantile for users - 1 degrees of freedom (``t_quantile``: 1.98 for 150 users, 2.78 for 5, where the normal's
    1.96 would be too narrow) times the standard deviation of the per-user differences over the square root of their
    number (users taken as independent draws). ``verdict`` of the two, as ``paired_auc_difference``'s."""
    p_base, p_other = np.asarray(p_base, np.float64), np.asarray(p_other, np.float64)
    out: dict[str, Any] = {"samples": int(len(p_base))}
    finite = np.isfinite(p_base) & np.isfinite(p_other)
    if not finite.all():
        return {**out, "users": 0, "base": None, "other": None, "difference": None, "interval": None,
                "verdict": "not comparable", "why": f"{int((~finite).sum()):,} predictions are not finite"}
    _, (base, other) = per_user_ndcg(relevance, [p_base, p_other], users)
    out["users"] = n = int(len(base))
    if n < 2:
        return {**out, "base": None, "other": None, "difference": None, "interval": None,
                "verdict": "not comparable", "why": f"{n} user(s) with predictions of different relevance"}
    differences = other - base
    difference = float(differences.mean())
    identical = bool(np.array_equal(p_base, p_other))
    se = 0.0 if identical else float(differences.std(ddof=1) / math.sqrt(n))
    t = t_quantile(n - 1, level)
    interval = [difference - t * se, difference + t * se]
    return {**out, "base": float(base.mean()), "other": float(other.mean()), "difference": difference,
            "interval": interval, "se": se, "p_value": 1.0 if identical else p_value(difference, se, n - 1),
            "verdict": verdict(difference, interval, identical=identical)}


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The half-width of a two-sided ``level`` interval in standard errors, for a mean whose spread is estimated from
    df + 1 draws: Student's t quantile (the normal's 1.96 as df grows; 2.78 at df = 4, 12.7 at df = 1).

    >>> [round(t_quantile(df), 2) for df in (1, 4, 149, 10**6)]
    [12.71, 2.78, 1.98, 1.96]
    """
    from scipy.special import stdtrit  # here: `crossdistil backtest --help` loads no numpy

    return float(stdtrit(df, (1 + level) / 2))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (one family of comparisons), in their order: the i-th smallest
    times the number of comparisons not yet rejected (m - i + 1), made non-decreasing in that order, at most 1.
    Rejecting every comparison whose adjusted p-value is at most alpha keeps the chance of any false rejection at
    most alpha, whatever the dependence between them.

    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
    """
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for i, index in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - i) * p_values[index]))
        adjusted[index] = running
    return adjusted


def verdict(difference: float | None, interval: Sequence[float] | None, identical: bool = False) -> str:
    """``better`` or ``worse`` only where the whole interval is on that side of 0; ``within noise`` where it holds 0
    (whatever the difference's size); ``identical`` where the predictions are the same.

    >>> verdict(0.001, [-0.002, 0.004]), verdict(0.01, [0.004, 0.016]), verdict(-0.01, [-0.02, -0.001])
    ('within noise', 'better', 'worse')
    """
    if identical:
        return "identical"
    if difference is None or interval is None:
        return "not comparable"
    if interval[0] > 0:
        return "better"
    if interval[1] < 0:
        return "worse"
    return "within noise"


def aligned(base: Scored, other: Scored) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Positions of the samples both configurations trained on, in ``base``'s training order: (in base, in other,
    what was left out). Configurations replayed as one group trained the same samples in the same order."""
    ids_base, ids_other = base.impression_ids, other.impression_ids
    if ids_base == ids_other:
        everything = np.arange(len(ids_base))
        return everything, everything, {"only_baseline": 0, "only_this": 0}
    where = {impression: i for i, impression in enumerate(ids_other)}
    pairs = [(i, where[impression]) for i, impression in enumerate(ids_base) if impression in where]
    index = np.array(pairs, np.int64).reshape(-1, 2)
    return index[:, 0], index[:, 1], {"only_baseline": len(ids_base) - len(pairs),
                                      "only_this": len(ids_other) - len(pairs)}


def _compare_scores(y: np.ndarray, y_other: np.ndarray, p_base: np.ndarray, p_other: np.ndarray,
                    last_fraction: float) -> dict[str, Any]:
    """One task's (or the combined score's) paired differences over every shared sample and over the last
    ``last_fraction`` of them (``"last"``); where the labels differ, "not comparable" and no ``"last"``."""
    differs = int(np.count_nonzero((y > 0) != (y_other > 0)))
    if differs:  # other join settings attributed other outcomes: not the same question
        why = (f"the labels differ on {differs:,} of {len(y):,} samples (other attribution windows?): the AUCs "
               "are against different outcomes")
        return {"verdict": "not comparable", "why": why, "samples": int(len(y))}
    start = int(len(y) * (1 - last_fraction))
    return {**paired_auc_difference(y, p_base, p_other),
            "last": paired_auc_difference(y[start:], p_base[start:], p_other[start:])}


def _compare_ndcg(relevance: np.ndarray, users: np.ndarray, p_base: np.ndarray, p_other: np.ndarray,
                  last_fraction: float) -> dict[str, Any]:
    """``paired_ndcg_difference`` over every shared sample and over the last ``last_fraction`` of them."""
    start = int(len(users) * (1 - last_fraction))
    return {**paired_ndcg_difference(relevance, users, p_base, p_other),
            "last": paired_ndcg_difference(relevance[start:], users[start:], p_base[start:], p_other[start:])}


def compare_runs(runs: Mapping[str, Scored], tasks: Mapping[str, Sequence[str]],
                 served: Mapping[str, Sequence[str]], last_fraction: float) -> dict[str, Any]:
    """Each configuration against the first (the baseline): per task both predict, and for the combined score of
    the served tasks when both serve the same ones, ``_compare_scores`` on the samples both trained, and (served
    tasks, same served tasks) the per-user NDCG@10 difference (``ndcg10``: relevance 2 y + y_partner, the partner
    the next served task; the combined score's: the number of positive tasks); every comparison's verdict
    Holm-adjusted across all of them (``adjust``); and a one-line ``summary`` of the verdicts."""
    from models.evaluation import default_partners  # lazy: models.evaluation imports torch

    names = list(runs)
    base_name, base = names[0], runs[names[0]]
    out: dict[str, Any] = {"baseline": base_name, "method": method(), "configurations": {}}
    for name in names[1:]:
        other = runs[name]
        in_base, in_other, left_out = aligned(base, other)
        entry: dict[str, Any] = {"samples": int(len(in_base)), **left_out, "tasks": {}}
        columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for task in [t for t in tasks[base_name] if t in tasks[name]]:
            (y, p), (y_other, p_other) = base.arrays(task), other.arrays(task)
            columns[task] = (y[in_base], p[in_base], p_other[in_other])
            entry["tasks"][task] = _compare_scores(y[in_base], y_other[in_other], p[in_base], p_other[in_other],
                                                   last_fraction)
        shared = list(served[base_name])
        same_labels = all("last" in entry["tasks"][t] for t in columns)  # no "last": the labels differ
        if shared and shared == list(served[name]) and all(t in columns for t in shared) and same_labels:
            users = base.users()[in_base]  # the same impressions, so the same users (coded by the baseline)
            partners = default_partners(shared)
            for task in shared:
                partner = columns[partners[task]][0] if task in partners else None
                entry["tasks"][task]["ndcg10"] = _compare_ndcg(graded_relevance(columns[task][0], partner), users,
                                                               columns[task][1], columns[task][2], last_fraction)
            labels = np.stack([columns[t][0] > 0 for t in shared], axis=1)
            p_both = [combined_score(np.stack([columns[t][k] for t in shared], axis=1)) for k in (1, 2)]
            entry["combined"] = _compare_scores(labels.all(axis=1), labels.all(axis=1), *p_both, last_fraction)
            entry["combined"]["ndcg10"] = _compare_ndcg(labels.sum(axis=1), users, *p_both, last_fraction)
        out["configurations"][name] = entry
    out["method"]["adjustment"] = adjust(out["configurations"].values())
    for entry in out["configurations"].values():
        entry["summary"] = summary_line(entry, last_fraction)
    return out


def comparisons(entry: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every paired difference of a configuration's comparison entry: per task and for the combined score, the AUC's
    over every sample and over the last ones, and the NDCG@10's the same."""
    for row in [*entry.get("tasks", {}).values(), *([entry["combined"]] if "combined" in entry else [])]:
        for statistic in (row, row.get("ndcg10")):
            if statistic is not None:
                yield statistic
                if "last" in statistic:
                    yield statistic["last"]


def adjust(entries: Iterable[Mapping[str, Any]], level: float = LEVEL) -> dict[str, Any]:
    """Holm's adjustment (``holm``) across the paired differences of every entry (one report's comparisons), in
    place: each one with a p-value (neither identical nor not comparable) gets ``p_holm`` and ``verdict_unadjusted``
    (the interval's verdict, as before any adjustment), and its ``verdict`` becomes ``within noise`` where the
    adjusted p-value is over ``1 - level``. What ``comparison.method.adjustment`` records."""
    family = [row for entry in entries for row in comparisons(entry)
              if row.get("p_value") is not None and row["verdict"] not in ("identical", "not comparable")]
    for row, adjusted in zip(family, holm([row["p_value"] for row in family])):
        row["p_holm"], row["verdict_unadjusted"] = adjusted, row["verdict"]
        if adjusted > 1 - level:
            row["verdict"] = "within noise"
    if not family:
        return {"method": "holm", "comparisons": 0, "level": level,
                "what": "no paired difference of the report is a test (every one is identical or not comparable): "
                        "there is no p-value to adjust"}
    return {"method": "holm", "comparisons": len(family), "level": level,
            "what": f"Holm's step-down adjustment of the p-values of the report's {len(family)} paired differences "
                    "(AUC and NDCG@10, per task and combined score, over every sample and over the last ones; "
                    "identical and not comparable ones are not tests): a verdict is better or worse only where the "
                    f"{level:.0%} interval excludes 0 and the adjusted p-value is at most {1 - level:.2f}"}


def summary_line(entry: Mapping[str, Any], last_fraction: float) -> str:
    """The tasks by their AUC's verdict, in words: ``better on like (+0.0722; last 20%: within noise); worse on
    long_view (-0.0046); within noise on click``; an interval holding 0 is never a win. With a better or worse
    verdict, the verdict over the last ``last_fraction`` of the samples where it is not the same. Then the NDCG@10
    differences that are better or worse, if any: ``; NDCG@10: better on like (+0.0222)``."""
    rows = {**entry["tasks"], **({"combined score": entry["combined"]} if "combined" in entry else {})}
    by = _by_verdict(rows, last_fraction)
    if rows and len(by["identical"]) == len(rows):
        return "identical predictions on every sample: the change did not change a single score"
    parts = [f"{v} on {', '.join(by[v])}" for v in VERDICTS if by[v]]
    ranked = _by_verdict({task: row["ndcg10"] for task, row in rows.items() if "ndcg10" in row}, last_fraction)
    wins = [f"{v} on {', '.join(ranked[v])}" for v in ("better", "worse") if ranked[v]]
    return ("; ".join(parts) if parts else "no task in common") + (f"; NDCG@10: {'; '.join(wins)}" if wins else "")


def _by_verdict(rows: Mapping[str, Mapping[str, Any]], last_fraction: float) -> dict[str, list[str]]:
    """The rows' names by verdict, a better or worse one with its difference (and the last ones' verdict where it
    is not the same: a win over every prediction may be a faster warm-up only)."""
    by: dict[str, list[str]] = {v: [] for v in VERDICTS}
    for task, row in rows.items():
        shown = task
        if row["verdict"] in ("better", "worse"):
            tail = row["last"]["verdict"]
            also = "" if tail == row["verdict"] else f"; last {last_fraction:.0%}: {tail}"
            shown += f" ({row['difference']:+.4f}{also})"
        by[row["verdict"]].append(shown)
    return by


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_differences(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Per configuration after the first, each effective setting whose value differs from the first's:
    ``{"crossdistil": {"model.options.rung": ["mtl", "crossdistil"]}}`` (``None``: not set on that side).

    >>> config_differences({"a": {"m": {"rung": "mtl", "lr": 1}}, "b": {"m": {"rung": "kd", "lr": 1, "x": 2}}})
    {'b': {'m.rung': ['mtl', 'kd'], 'm.x': [None, 2]}}
    """
    flat = {name: _flat(cfg) for name, cfg in configs.items()}
    names = list(flat)
    base = flat[names[0]] if names else {}
    out = {}
    for name in names[1:]:
        keys = sorted(set(base) | set(flat[name]))
        out[name] = {k: [base.get(k), flat[name].get(k)] for k in keys if base.get(k) != flat[name].get(k)}
    return out
