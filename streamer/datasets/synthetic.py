"""The ``synthetic`` adapter: latent-factor users and items, K correlated tasks, injectable drift.

Generated lazily in time order, in fixed-size chunks, so memory stays constant in ``n_events``; the same
options and seed give the identical stream on every call and every machine (numpy ``default_rng``).

Model. Users u and items v have latent factors (dimension ``dim``); every item also has one shared factor
and one factor per task. Task k's logit for (u, i) is

    logit_k = bias_k + scale * (sqrt(rho) * <u, v_shared(i)> + sqrt(1 - rho) * <u, v_k(i)>) / sqrt(dim)

so the logits of two tasks have correlation ``rho`` (= ``correlation``) over random pairs; labels are
Bernoulli(sigmoid(logit_k)). Users are drawn uniformly, items by Zipf-like popularity. Impressions arrive
as a Poisson process (``rate_per_s`` per second of event time) from ``start_ms``.

Drift. At each drift point (``drift_at``: event indices; or ``drift_at_ms``: event times), the drifted tasks
(``drift_task``: one name or several, comma-separated) change concept and their bias moves by ``drift_bias``.
``drift=abrupt`` switches at the point; ``drift=gradual`` blends the old and new logits linearly over
``drift_width`` events (or ms when the points are times), starting at the point; ``drift=recurring`` switches
abruptly back and forth between the original concept and the drifted one at each point (A, B, A, B, ...).

How far the concept moves is ``drift_magnitude`` m in [0, 1]: the task's latent term becomes

    (1 - 2m) * old + 2 * sqrt(m (1 - m)) * fresh          (fresh: independent item factors, same variance)

so the new logits correlate ``1 - 2m`` with the old ones. m = 0: no change; 0.1: barely visible; 0.5: a new,
unrelated concept (a model's AUC falls to about 0.5); 1: the ranking is reversed (a label flip when the bias is
0: a model's AUC a becomes about 1 - a). Right after an abrupt drift, a model with AUC a ranks at about
``0.5 + (a - 0.5) (1 - 2m)``. Without ``drift_magnitude`` (the original generator, kept bit for bit) the task's
own item factors are redrawn and the shared ones kept, so the logits keep correlation ``correlation``.

Feedback delays (event time) are log-normal per task, median ``delay_median_s`` (one value, or one per task),
spread ``delay_sigma``, capped at ``max_delay_s`` (which bounds the streamer's pending-feedback memory).

Features: categorical ``item_category`` (one of ``n_categories`` per item) and ``hour`` (of the event time,
UTC); numeric ``duration_s`` (per item, log-normal). The labels depend on the factors only.

Options (``--option key=value``; all optional):

    n_events=100000  n_users=1000  n_items=5000  dim=8  tasks=2 (a count, or names: "click,like")
    correlation=0.5  scale=3.0  biases=0.0 (one value or one per task, comma-separated)
    drift=none|abrupt|gradual|recurring  drift_at=500000[,800000]  drift_at_ms=...  drift_width=10000
    drift_task=<first task>[,<task>...]  drift_magnitude=<unset>  drift_bias=-1.5  seed=0  rate_per_s=100
    start_ms=1700000000000
    delay_median_s=5,60 (per task; default 2 for the first task, 30 for the others)  delay_sigma=1.0
    max_delay_s=3600  n_categories=20  zipf=1.1

>>> ds = SyntheticDataset(n_events=3, seed=1)
>>> [r.impression_id for r in ds.interactions()]
['syn-0', 'syn-1', 'syn-2']
>>> [r.labels for r in ds.interactions()] == [r.labels for r in SyntheticDataset(n_events=3, seed=1).interactions()]
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamer.datasets.base import DatasetError, Interaction

CHUNK = 4096
DRIFT_TYPES = ("none", "abrupt", "gradual", "recurring")


def _floats(value: Any, n: int, key: str) -> list[float]:
    """One number for all tasks, or one per task (comma-separated string or list)."""
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise DatasetError(f"synthetic option {key}={value!r} is not a number or a comma-separated list") from None
    if len(numbers) == 1:
        return numbers * n
    if len(numbers) != n:
        raise DatasetError(f"synthetic option {key} has {len(numbers)} values for {n} tasks")
    return numbers


class SyntheticDataset:
    """A seeded latent-factor stream with K correlated tasks and optional drift (options: module docstring)."""

    def __init__(
        self,
        n_events: int = 100_000,
        n_users: int = 1_000,
        n_items: int = 5_000,
        dim: int = 8,
        tasks: int | str | tuple[str, ...] = 2,
        correlation: float = 0.5,
        scale: float = 3.0,
        biases: Any = 0.0,
        drift: str = "none",
        drift_at: Any = None,
        drift_at_ms: Any = None,
        drift_width: float = 10_000,
        drift_task: str | None = None,
        drift_bias: float = -1.5,
        drift_magnitude: float | None = None,
        seed: int = 0,
        rate_per_s: float = 100.0,
        start_ms: int = 1_700_000_000_000,
        delay_median_s: Any = None,
        delay_sigma: float = 1.0,
        max_delay_s: float = 3600.0,
        n_categories: int = 20,
        zipf: float = 1.1,
    ) -> None:
        self.name = "synthetic"
        self.tasks = self._task_names(tasks)
        k = len(self.tasks)
        self.n_events = int(n_events)
        self.n_interactions = self.n_events
        self.n_users, self.n_items, self.dim = int(n_users), int(n_items), int(dim)
        if min(self.n_users, self.n_items, self.dim) < 1 or self.n_events < 0:
            raise DatasetError("synthetic: n_users, n_items and dim must be >= 1 and n_events >= 0")
        self.correlation = float(correlation)
        if not 0.0 <= self.correlation <= 1.0:
            raise DatasetError(f"synthetic: correlation={correlation} must lie in [0, 1]")
        self.scale = float(scale)
        self.biases = np.array(_floats(biases, k, "biases"))
        if drift not in DRIFT_TYPES:
            raise DatasetError(f"synthetic: drift={drift!r} must be one of {', '.join(DRIFT_TYPES)}")
        self.drift = drift
        if drift != "none" and (drift_at is None) == (drift_at_ms is None):
            raise DatasetError("synthetic: drift needs exactly one of drift_at (event indices) or drift_at_ms (times)")
        self.drift_in_time = drift_at_ms is not None
        points = drift_at_ms if self.drift_in_time else drift_at
        self.drift_points = sorted(_points(points)) if drift != "none" else []
        self.drift_width = float(drift_width)
        self.drift_tasks = tuple(t.strip() for t in (drift_task or self.tasks[0]).split(",") if t.strip())
        unknown = [t for t in self.drift_tasks if t not in self.tasks]
        if unknown or not self.drift_tasks:
            raise DatasetError(f"synthetic: drift_task={drift_task!r} is not one of {', '.join(self.tasks)}")
        self.drift_task = self.drift_tasks[0]
        self.drift_bias = float(drift_bias)
        self.drift_magnitude = None if drift_magnitude is None else float(drift_magnitude)
        if self.drift_magnitude is not None and not 0.0 <= self.drift_magnitude <= 1.0:
            raise DatasetError(f"synthetic: drift_magnitude={drift_magnitude} must lie in [0, 1] (0 = no change, "
                               "0.5 = an unrelated concept, 1 = the ranking reversed)")
        self.seed = int(seed)
        self.rate_per_s = float(rate_per_s)
        self.start_ms = int(start_ms)
        medians = delay_median_s if delay_median_s is not None else [2.0] + [30.0] * (k - 1)
        self.delay_median_s = np.array(_floats(medians, k, "delay_median_s"))
        self.delay_sigma = float(delay_sigma)
        self.max_delay_ms = int(float(max_delay_s) * 1000)
        self.n_categories = int(n_categories)
        self.zipf = float(zipf)
        self.categorical_features = ("item_category", "hour")
        self.numeric_features = ("duration_s",)

    @staticmethod
    def _task_names(tasks: int | str | tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(tasks, (tuple, list)):
            names = tuple(tasks)
        elif isinstance(tasks, int) or (isinstance(tasks, str) and tasks.strip().isdigit()):
            names = tuple(f"task{i}" for i in range(int(tasks)))
        else:
            names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not names or len(set(names)) != len(names):
            raise DatasetError(f"synthetic: tasks={tasks!r} must be a count >= 1 or distinct names")
        return names

    # -- the world: fixed at construction from the seed -------------------------------------------------
    def _world(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1])
        k, d = len(self.tasks), self.dim
        regimes = len(self.drift_points) + 1
        popularity = 1.0 / np.arange(1, self.n_items + 1) ** self.zipf
        return {
            "users": rng.standard_normal((self.n_users, d)),
            "shared": rng.standard_normal((self.n_items, d)),
            # task_items[r, k]: item factors of task k in drift regime r (only the drifted task changes)
            "task_items": rng.standard_normal((regimes, k, self.n_items, d)),
            "popularity": popularity / popularity.sum(),
            "category": rng.integers(0, self.n_categories, self.n_items),
            "duration_s": np.round(rng.lognormal(math.log(20.0), 0.6, self.n_items), 1),
            "item_order": rng.permutation(self.n_items),  # popularity rank -> item id
        }

    def _logits(self, world: dict[str, np.ndarray], users: np.ndarray, items: np.ndarray, regime: int) -> np.ndarray:
        """Task logits [n, K] of (user, item) pairs in drift regime ``regime`` (0 = before any drift)."""
        u = world["users"][users]
        shared = np.einsum("nd,nd->n", u, world["shared"][items])
        # A recurring drift alternates between the original concept (0) and the drifted one (1).
        concept = regime % 2 if self.drift == "recurring" else regime
        out = np.empty((len(users), len(self.tasks)))
        for k, task in enumerate(self.tasks):
            drifted = task in self.drift_tasks and concept > 0
            magnitude = self.drift_magnitude
            r = concept if drifted and magnitude is None else 0
            own = np.einsum("nd,nd->n", u, world["task_items"][r, k][items])
            mix = math.sqrt(self.correlation) * shared + math.sqrt(1.0 - self.correlation) * own
            if drifted and magnitude is not None:
                fresh = np.einsum("nd,nd->n", u, world["task_items"][concept, k][items])
                mix = (1.0 - 2.0 * magnitude) * mix + 2.0 * math.sqrt(magnitude * (1.0 - magnitude)) * fresh
            bias = self.biases[k] + (self.drift_bias * concept if drifted else 0.0)
            out[:, k] = bias + self.scale * mix / math.sqrt(self.dim)
        return out

    def _drift_logits(self, world: dict[str, np.ndarray], users: np.ndarray, items: np.ndarray,
                      where: np.ndarray) -> np.ndarray:
        """Logits with drift applied; ``where`` is event index or event time, in the drift points' unit."""
        logits = self._logits(world, users, items, 0)
        for r, point in enumerate(self.drift_points, start=1):
            if self.drift in ("abrupt", "recurring"):
                weight = (where >= point).astype(float)
            else:
                weight = np.clip((where - point) / max(self.drift_width, 1e-9), 0.0, 1.0)
            if weight.any():
                new = self._logits(world, users, items, r)
                logits = (1.0 - weight)[:, None] * logits + weight[:, None] * new
        return logits

    def interactions(self) -> Iterator[Interaction]:
        """Yield ``n_events`` interactions in time order, chunk by chunk (constant memory)."""
        world = self._world()
        rng = np.random.default_rng([self.seed, 2])
        tasks = self.tasks
        mean_gap_ms = 1000.0 / self.rate_per_s
        now_ms = float(self.start_ms)
        log_medians = np.log(self.delay_median_s * 1000.0)
        for start in range(0, self.n_events, CHUNK):
            n = min(CHUNK, self.n_events - start)
            times = now_ms + np.cumsum(rng.exponential(mean_gap_ms, n))
            now_ms = float(times[-1])
            ts = np.floor(times).astype(np.int64)
            users = rng.integers(0, self.n_users, n)
            items = world["item_order"][rng.choice(self.n_items, n, p=world["popularity"])]
            where = ts.astype(float) if self.drift_in_time else np.arange(start, start + n, dtype=float)
            logits = self._drift_logits(world, users, items, where)
            labels = rng.random((n, len(tasks))) < 1.0 / (1.0 + np.exp(-logits))
            delays = np.minimum(np.exp(log_medians + self.delay_sigma * rng.standard_normal((n, len(tasks)))),
                                self.max_delay_ms).astype(np.int64)
            for j in range(n):
                item = int(items[j])
                ts_ms = int(ts[j])
                row_labels = {t: int(labels[j, k]) for k, t in enumerate(tasks)}
                yield Interaction(
                    impression_id=f"syn-{start + j}",
                    user_id=f"u{users[j]}",
                    item_id=f"i{item}",
                    ts_ms=ts_ms,
                    features={
                        "item_category": f"c{world['category'][item]}",
                        "hour": str((ts_ms // 3_600_000) % 24),
                        "duration_s": float(world["duration_s"][item]),
                    },
                    labels=row_labels,
                    feedback_delay_ms={t: int(delays[j, k]) for k, t in enumerate(tasks) if row_labels[t]},
                )


def _points(value: Any) -> list[float]:
    """Drift points: a number, a list of numbers, or comma-separated numbers."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        return [float(p) for p in parts if str(p).strip()]
    except ValueError:
        raise DatasetError(f"synthetic: drift points {value!r} are not comma-separated numbers") from None


def open_synthetic(**options: Any) -> SyntheticDataset:
    """Build a synthetic data set from string or typed options (the CLI passes strings)."""
    typed: dict[str, Any] = {}
    ints = {"n_events", "n_users", "n_items", "dim", "seed", "start_ms", "n_categories"}
    floats = {"correlation", "scale", "drift_width", "drift_bias", "drift_magnitude", "rate_per_s", "delay_sigma",
              "max_delay_s", "zipf"}
    if "drift_tasks" in options:  # the plural reads better with several tasks
        options = {("drift_task" if k == "drift_tasks" else k): v for k, v in options.items()}
    for key, value in options.items():
        try:
            if key in ints:
                typed[key] = int(float(value))
            elif key in floats:
                typed[key] = float(value)
            else:
                typed[key] = value
        except (TypeError, ValueError):
            raise DatasetError(f"synthetic option {key}={value!r} is not a number") from None
    try:
        return SyntheticDataset(**typed)
    except TypeError as exc:
        raise DatasetError(f"synthetic: {exc}; the options are listed in streamer/datasets/synthetic.py") from None
