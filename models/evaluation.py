"""Offline evaluation loops over encoded mini-batches: a time-ordered split and a prequential (test-then-train) pass.

Pure PyTorch and numpy: no Kafka, no files, no printing. The caller encodes the data set once
(``EncodedData``), builds a fresh learner per (configuration, backbone, seed) and passes it to
``run_time_split`` or ``run_prequential``; both return a ``RunResult`` with metrics per window and task and a
training curve. A learner is anything with the ``models.learner.Learner`` verbs ``step`` and ``predict``.

Protocol choices (documented in reports too):

* Time split: events are in time order; the first ``train_fraction`` (80 %) train, the rest test. Within the
  training part every epoch is one pass **in time order** (no shuffling): this is how the model meets the data
  in production (a stream), and it keeps a run deterministic given its seed.
* Prequential: every mini-batch is scored by the model *before* the model learns from it (the predictions that
  ``Learner.step`` returns), so every event is a test event for a model that has not seen it. Metrics are
  reported over all events (``"all"``) and over the last ``tail_fraction`` of them (``"tail"``), where the
  model is warmer. The tail is also scored as serving replicas score it (``"served"``): in ``publications``
  stretches, each by the model as it was at the stretch's start (frozen between publications, as a published
  checkpoint is), with a user's rows grouped per stretch for GAUC and NDCG. A prequential GAUC pools each user's
  rows scored by many states of the model: an input that follows the user's own labels (their online counts)
  raises every later score of the user after a positive, so the rows scored after it outrank it although no
  request ever ranked them together; the ``"served"`` GAUC compares only rows one model state scored. On request
  (``cadence``) the tail is served at several publication counts too (``RunResult.cadence``: AUC, log loss and
  calibration per count), which measures what publishing more often delivers.
* Combined score (``combined_metrics``): the product of the task probabilities, each raised to its weight (1
  by default), i.e. the score a ranker ordering by "every task positive" would use. Its AUC is against "every
  task positive"; its per-user NDCG@10 uses the number of positive tasks as graded relevance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from models.metrics import auc, calibration_ratio, checked_weights, combined_score, log_loss, ndcg_at_k, task_metrics

# Called after every learning step with the number of training events consumed so far in this run.
ProgressCallback = Callable[[int], None]


class StepLearner(Protocol):
    """The two verbs of ``models.learner.Learner`` that evaluation needs (and ``step_async`` where it has it)."""

    def step(self, batch: Any) -> tuple[dict[str, float], dict[str, torch.Tensor]]: ...

    def predict(self, batch: Any) -> dict[str, torch.Tensor]: ...


class _Done:
    """A step already done, with ``PendingStep``'s ``result()``."""

    def __init__(self, result: tuple[dict[str, float], dict[str, torch.Tensor]]) -> None:
        self._result = result

    def result(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return self._result


def issue_step(learner: StepLearner, batch: Any) -> Any:
    """One step whose (losses, predictions) are read later with ``.result()``: ``Learner.step_async`` where the
    learner has it (the loops below read step t's result after issuing step t + 1, so a GPU never waits for the
    host between steps), else the step done at once (the River and Vowpal Wabbit baselines)."""
    step_async = getattr(learner, "step_async", None)
    return step_async(batch) if step_async is not None else _Done(learner.step(batch))


@dataclass
class EncodedData:
    """A whole data set, encoded once and kept in time order, plus what the metrics need in numpy form.

    ``batch`` is one ``models.features.Batch`` holding every row; ``labels`` is [N, K] in ``tasks`` order;
    ``users`` holds the raw user ids (for GAUC); ``ts_ms`` the event times. ``auxiliary``: the last tasks of
    ``tasks``, which the learner learns from but the metrics leave out (``scored_tasks``, ``scored_labels``).
    """

    batch: Any
    tasks: tuple[str, ...]
    labels: np.ndarray
    users: np.ndarray
    ts_ms: np.ndarray
    auxiliary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.tasks, self.auxiliary = tuple(self.tasks), tuple(self.auxiliary)
        if self.auxiliary and (self.tasks[len(self.tasks) - len(self.auxiliary):] != self.auxiliary
                               or len(self.auxiliary) >= len(self.tasks)):
            raise ValueError(f"auxiliary tasks {list(self.auxiliary)} must be the last of the tasks "
                             f"{list(self.tasks)}, after at least one scored task")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def scored_tasks(self) -> tuple[str, ...]:
        """The tasks the metrics report: all but the auxiliary ones."""
        return self.tasks[:len(self.tasks) - len(self.auxiliary)]

    @property
    def scored_labels(self) -> np.ndarray:
        """``labels`` of ``scored_tasks``: [N, K - auxiliary]."""
        return self.labels[:, :len(self.scored_tasks)]

    def rows(self, start: int, stop: int) -> Any:
        """The rows [start, stop) as a Batch (a view where the Batch type allows it)."""
        return slice_batch(self.batch, slice(start, stop), len(self))

    def head(self, n_rows: int) -> EncodedData:
        """The first ``n_rows`` events (in time order) as an EncodedData of their own."""
        return EncodedData(batch=self.rows(0, n_rows), tasks=self.tasks, labels=self.labels[:n_rows],
                           users=self.users[:n_rows], ts_ms=self.ts_ms[:n_rows], auxiliary=self.auxiliary)


def slice_batch(batch: Any, index: slice | torch.Tensor, n_rows: int) -> Any:
    """Select rows of a Batch: every tensor field whose first dimension is ``n_rows`` is indexed, others kept.

    Works for dataclasses and named tuples, so evaluation does not depend on the Batch's exact fields.
    """
    if hasattr(batch, "select"):
        return batch.select(index)

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_rows:
            return value[index]
        return value

    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: take(getattr(batch, f.name)) for f in dataclasses.fields(batch)
                                             if f.init})
    if isinstance(batch, tuple) and hasattr(batch, "_replace"):
        return batch._replace(**{name: take(getattr(batch, name)) for name in batch._fields})
    if isinstance(batch, Mapping):
        return {key: take(value) for key, value in batch.items()}
    raise TypeError(f"don't know how to slice a {type(batch).__name__}; give it a select(index) method")


def default_partners(tasks: Sequence[str]) -> dict[str, str]:
    """Each task's partner for the label categories: the next task in the list, cyclically (the other one for K=2)."""
    return {task: tasks[(i + 1) % len(tasks)] for i, task in enumerate(tasks)} if len(tasks) > 1 else {}


def evaluate_predictions(
    labels: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    users: np.ndarray,
    tasks: Sequence[str],
    partners: Mapping[str, str],
) -> dict[str, dict[str, float]]:
    """Metrics per task (``models.metrics.task_metrics``) of probabilities ``predictions[task]`` against ``labels``."""
    column = {task: i for i, task in enumerate(tasks)}
    result = {}
    for task in tasks:
        partner = partners.get(task)
        y_partner = labels[:, column[partner]] if partner in column else None
        result[task] = task_metrics(labels[:, column[task]], predictions[task], users, y_partner)
    return result


def combined_metrics(
    labels: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    users: np.ndarray,
    tasks: Sequence[str],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Metrics of the combined score prod_k p_k^w_k (``models.metrics.combined_score``) over ``tasks``.

    ``auc``: against "every task positive"; ``ndcg10``: per-user NDCG@10 with relevance = the number of
    positive tasks; ``weights``: the weights used (1 per task by default).
    """
    w = combined_weights_for(tasks, weights)
    positive = np.asarray(labels) > 0
    if positive.ndim != 2 or positive.shape[1] != len(tasks):
        raise ValueError(f"labels must be [N, {len(tasks)}] (one column per task), got shape {positive.shape}")
    score = combined_score(np.stack([np.asarray(predictions[task], dtype=np.float64) for task in tasks], axis=1), w)
    return {"auc": auc(positive.all(axis=1), score), "ndcg10": ndcg_at_k(positive.sum(axis=1), score, users, k=10),
            "weights": w}


def combined_weights_for(tasks: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """The combined score's weights as floats, one per task (1 each when ``weights`` is None); checked by
    ``models.metrics.checked_weights``, so a bad set fails before training instead of after it."""
    return checked_weights(weights, len(tasks)).tolist()


def split_boundary(n_events: int, train_fraction: float) -> int:
    """The first test row of a time split of ``n_events`` rows: the first ``train_fraction`` train."""
    return int(n_events * train_fraction)


def tail_start(n_events: int, tail_fraction: float) -> int:
    """The first row of the prequential ``"tail"`` window: the last ``tail_fraction`` of rows (at least one)."""
    return n_events - max(1, int(round(n_events * tail_fraction)))


def served_stretches(tail: int, n_events: int, publications: int) -> np.ndarray:
    """The bounds of the ``"served"`` window's stretches: ``publications`` equal stretches of rows [tail, n_events)
    (fewer where the tail has fewer rows), as ``publications + 1`` sorted row numbers; [] for none.

    >>> served_stretches(80, 100, 4).tolist(), served_stretches(98, 100, 4).tolist()
    ([80, 85, 90, 95, 100], [98, 99, 100])
    """
    if publications <= 0 or n_events <= tail:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(tail, n_events, min(publications, n_events - tail) + 1).astype(np.int64))


def cadence_metrics(publications: int, bounds: np.ndarray, labels: np.ndarray, served: Mapping[str, np.ndarray],
                    tasks: Sequence[str]) -> dict[str, Any]:
    """The tail served at one publication cadence (``bounds``: its stretches, ``served_stretches``; ``labels`` and
    ``served`` the tail's rows): per task its AUC, log loss and calibration ratio. No GAUC: it would group a user's
    rows per stretch, so its groups, not only its scores, would change with the cadence."""
    return {"publications": publications, "stretches": len(bounds) - 1,
            "events_per_publication": round(len(labels) / max(1, len(bounds) - 1), 1),
            "metrics": {task: {"auc": auc(labels[:, k], served[task]), "log_loss": log_loss(labels[:, k], served[task]),
                               "calibration": calibration_ratio(labels[:, k], served[task])}
                        for k, task in enumerate(tasks)}}


def user_stretches(users: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """A group per (user, stretch) of rows whose stretches start at ``bounds`` (row 0 = ``bounds[0]``): the rows
    one published model scored for one user, as int64 ids (GAUC and NDCG group by them).

    >>> user_stretches(np.array(["a", "b", "a", "a"]), np.array([0, 2, 4])).tolist()
    [0, 2, 1, 1]
    """
    _, user = np.unique(np.asarray(users), return_inverse=True)
    stretch = np.searchsorted(bounds, np.arange(len(user)), side="right") - 1
    return user.astype(np.int64) * max(1, len(bounds) - 1) + stretch


def _to_numpy(predictions: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    return {task: predictions[task].detach().float().reshape(-1).cpu().numpy() for task in tasks}


def predict_in_chunks(learner: StepLearner, data: EncodedData, start: int, stop: int,
                      chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """Probabilities of the scored tasks (``data.scored_tasks``) for rows [start, stop), in chunks so memory stays
    bounded."""
    tasks = data.scored_tasks
    parts: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    for lo in range(start, stop, chunk_size):
        with torch.no_grad():
            chunk = _to_numpy(learner.predict(data.rows(lo, min(stop, lo + chunk_size))), tasks)
        for task in tasks:
            parts[task].append(chunk[task])
    return {task: np.concatenate(parts[task]) if parts[task] else np.zeros(0) for task in tasks}


class LossMeans:
    """Mean of each value a learner reports per step, over the steps where it was finite (a trust gate's AUC is
    undefined until its first decision)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: Mapping[str, float]) -> None:
        for name, value in losses.items():
            value = float(value)
            if np.isfinite(value):
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


@dataclass
class RunResult:
    """What one run measured.

    ``metrics[window][task][metric]``: windows are ``"test"`` for the time split, ``"all"`` and ``"tail"`` for
    the prequential pass. ``curve`` is a list of points ``{"events": n, "fraction": f, "auc": {task: v}}``:
    test AUC against training events for the split, windowed prequential AUC for the prequential pass.
    ``losses`` are the mean training losses (as named by the learner) of the last epoch or the pass.
    ``combined[window]`` are the combined score's metrics (``combined_metrics``) in each window. ``cadence``
    (prequential, on request): per publication count, the tail as served at that cadence (``cadence_metrics``).
    """

    mode: str
    metrics: dict[str, dict[str, dict[str, float]]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    train_events: int = 0
    test_events: int = 0
    seconds: float = 0.0
    combined: dict[str, dict[str, Any]] = field(default_factory=dict)
    cadence: list[dict[str, Any]] = field(default_factory=list)


def _curve_marks(n_steps: int, points: int) -> set[int]:
    """Step indices (1-based, after which to measure) spread evenly over ``n_steps``; always includes the last."""
    if n_steps <= 0 or points <= 0:
        return set()
    return {max(1, round(n_steps * i / points)) for i in range(1, points + 1)}


def run_time_split(
    learner: StepLearner,
    data: EncodedData,
    partners: Mapping[str, str],
    *,
    epochs: int = 1,
    batch_size: int = 256,
    train_fraction: float = 0.8,
    curve_points: int = 10,
    on_step: ProgressCallback | None = None,
    combined_weights: Sequence[float] | None = None,
) -> RunResult:
    """Train on the first ``train_fraction`` of events (time order, ``epochs`` passes), test on the rest.

    The curve measures test AUC at ``curve_points`` evenly spaced moments of training. ``combined_weights``
    are the weights of the combined score (1 per task by default).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    tasks = data.scored_tasks
    combined_weights = combined_weights_for(tasks, combined_weights)  # fail before training, not after
    started = time.perf_counter()
    n = len(data)
    n_train = split_boundary(n, train_fraction)
    if n_train == 0 or n_train == n:
        raise ValueError(f"{n} events are too few for a {train_fraction:.0%} time split")
    steps_per_epoch = -(-n_train // batch_size)
    marks = _curve_marks(steps_per_epoch * epochs, curve_points)
    test_labels = data.scored_labels[n_train:]
    test_users = data.users[n_train:]
    curve: list[dict[str, Any]] = []
    loss_sums = LossMeans()
    step_index = 0
    for epoch in range(epochs):
        loss_sums = LossMeans()
        pending = None  # the step issued last, read after the next is issued (issue_step)
        for lo in range(0, n_train, batch_size):
            issued = issue_step(learner, data.rows(lo, min(n_train, lo + batch_size)))
            if pending is not None:
                loss_sums.add(pending.result()[0])
            pending = issued
            step_index += 1
            events_seen = epoch * n_train + min(n_train, lo + batch_size)
            if on_step is not None:
                on_step(events_seen)
            if step_index in marks:
                predictions = predict_in_chunks(learner, data, n_train, n)
                curve.append({
                    "events": events_seen,
                    "fraction": step_index / (steps_per_epoch * epochs),
                    "auc": {task: m["auc"] for task, m in
                            evaluate_predictions(test_labels, predictions, test_users, tasks, {}).items()},
                })
        if pending is not None:
            loss_sums.add(pending.result()[0])
    predictions = predict_in_chunks(learner, data, n_train, n)
    metrics = {"test": evaluate_predictions(test_labels, predictions, test_users, tasks, partners)}
    combined = {"test": combined_metrics(test_labels, predictions, test_users, tasks, combined_weights)}
    return RunResult(
        mode="split",
        metrics=metrics,
        combined=combined,
        curve=curve,
        losses=loss_sums.means(),
        train_events=n_train * epochs,
        test_events=n - n_train,
        seconds=time.perf_counter() - started,
    )


def score_stream(learner: StepLearner, data: EncodedData, *, batch_size: int, stretches: Sequence[np.ndarray] = (),
                 on_step: ProgressCallback | None = None) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]],
                                                                     LossMeans]:
    """One prequential pass: every row's score from the model before it learns the row's batch, and for each set
    of bounds in ``stretches`` (``served_stretches``: one publication cadence each) the rows [bounds[i],
    bounds[i + 1]) scored whole by the model as it is before the batch where stretch i starts (serving's frozen
    model; {} for a set without stretches); with the means of the losses the steps reported."""
    tasks, n = data.scored_tasks, len(data)
    parts: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    served: list[dict[str, list[np.ndarray]]] = [{task: [] for task in tasks} for _ in stretches]
    loss_sums = LossMeans()

    def read(pending: Any, hi: int) -> None:
        losses, scored_before_update = pending.result()
        chunk = _to_numpy(scored_before_update, tasks)
        for task in tasks:
            parts[task].append(chunk[task])
        loss_sums.add(losses)
        if on_step is not None:
            on_step(hi)

    published = [0] * len(stretches)  # stretches of each set scored so far
    pending = None  # (the step issued last, its end): read after the next is issued (issue_step)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        for k, bounds in enumerate(stretches):
            while published[k] < len(bounds) - 1 and bounds[published[k]] < hi:
                i = published[k]
                scored = predict_in_chunks(learner, data, int(bounds[i]), int(bounds[i + 1]))
                for task in tasks:
                    served[k][task].append(scored[task])
                published[k] += 1
        issued = issue_step(learner, data.rows(lo, hi))
        if pending is not None:
            read(*pending)
        pending = issued, hi
    if pending is not None:
        read(*pending)
    return ({task: np.concatenate(parts[task]) for task in tasks},
            [{task: np.concatenate(p) for task, p in into.items() if p} for into in served], loss_sums)


def run_prequential(
    learner: StepLearner,
    data: EncodedData,
    partners: Mapping[str, str],
    *,
    batch_size: int = 256,
    tail_fraction: float = 0.2,
    curve_points: int = 10,
    on_step: ProgressCallback | None = None,
    combined_weights: Sequence[float] | None = None,
    publications: int = 0,
    cadence: Sequence[int] = (),
) -> RunResult:
    """One pass in time order; every mini-batch is scored before the learner updates on it.

    The curve is the AUC of those scores within each of ``curve_points`` consecutive windows of events.
    ``combined_weights`` are the weights of the combined score (1 per task by default). ``publications`` > 0 adds
    the ``"served"`` window (module docstring): before the step of the batch where a stretch of the tail starts,
    the whole stretch is scored by the model as it is then (one more forward pass over the tail, no learning).
    ``cadence``: publication counts whose served tails are also scored, for ``RunResult.cadence`` (one forward pass
    over the tail each): how much of what the model learns in the tail a given publication cadence delivers.
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    if publications < 0:
        raise ValueError(f"publications must be >= 0 (0: no served window), got {publications}")
    if any(count < 1 for count in cadence):
        raise ValueError(f"cadence: every publication count must be >= 1, got {list(cadence)}")
    tasks, labels = data.scored_tasks, data.scored_labels
    combined_weights = combined_weights_for(tasks, combined_weights)  # fail before training, not after
    started = time.perf_counter()
    n = len(data)
    tail = tail_start(n, tail_fraction)
    stretches = served_stretches(tail, n, publications)
    cadences = [served_stretches(tail, n, count) for count in cadence]
    predictions, served, loss_sums = score_stream(learner, data, batch_size=batch_size,
                                                  stretches=[stretches, *cadences], on_step=on_step)
    served_predictions = served[0]
    tail_predictions = {t: p[tail:] for t, p in predictions.items()}
    metrics = {
        "all": evaluate_predictions(labels, predictions, data.users, tasks, partners),
        "tail": evaluate_predictions(labels[tail:], tail_predictions, data.users[tail:], tasks, partners),
    }
    combined = {
        "all": combined_metrics(labels, predictions, data.users, tasks, combined_weights),
        "tail": combined_metrics(labels[tail:], tail_predictions, data.users[tail:], tasks, combined_weights),
    }
    if publications:
        groups = user_stretches(data.users[tail:], stretches - tail)
        metrics["served"] = evaluate_predictions(labels[tail:], served_predictions, groups, tasks, partners)
        combined["served"] = combined_metrics(labels[tail:], served_predictions, groups, tasks, combined_weights)
    curve = []
    bounds = np.linspace(0, n, max(1, curve_points) + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        window = evaluate_predictions(labels[lo:hi], {t: p[lo:hi] for t, p in predictions.items()},
                                      data.users[lo:hi], tasks, {})
        curve.append({"events": int(hi), "fraction": hi / n, "auc": {task: m["auc"] for task, m in window.items()}})
    return RunResult(
        mode="prequential",
        metrics=metrics,
        combined=combined,
        curve=curve,
        losses=loss_sums.means(),
        train_events=n,
        test_events=n,
        seconds=time.perf_counter() - started,
        cadence=[cadence_metrics(count, bounds, labels[tail:], scored, tasks)
                 for count, bounds, scored in zip(cadence, cadences, served[1:]) if len(bounds)],
    )
