"""models.evaluation loops, specified with a memorising fake learner so that leaks would show as perfect AUC."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.evaluation import (
    EncodedData,
    default_partners,
    evaluate_predictions,
    run_prequential,
    run_time_split,
    slice_batch,
)

pytestmark = pytest.mark.unit

TASKS = ("finish", "like")


@dataclass
class FakeBatch:
    row_id: torch.Tensor  # [B]
    labels: torch.Tensor  # [B, K]


class MemorisingLearner:
    """Predicts a row's true labels if it has learned from that row, 0.5 otherwise; records what it saw."""

    def __init__(self) -> None:
        self.memory: dict[int, torch.Tensor] = {}
        self.stepped_rows: list[int] = []

    def predict(self, batch: FakeBatch) -> dict[str, torch.Tensor]:
        out = torch.full_like(batch.labels, 0.5)
        for i, row in enumerate(batch.row_id.tolist()):
            if row in self.memory:
                out[i] = self.memory[row]
        return {task: out[:, k] for k, task in enumerate(TASKS)}

    def step(self, batch: FakeBatch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        before = self.predict(batch)
        for row, labels in zip(batch.row_id.tolist(), batch.labels):
            self.memory[row] = labels.clone()
            self.stepped_rows.append(row)
        return {"loss": 1.0}, before


def make_data(n: int = 200, seed: int = 0) -> EncodedData:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, len(TASKS))).astype(np.float32)
    if n >= 8:  # every label category in the first and the last rows
        labels[:4] = [[0, 0], [0, 1], [1, 0], [1, 1]]
        labels[-4:] = [[0, 0], [0, 1], [1, 0], [1, 1]]
    batch = FakeBatch(row_id=torch.arange(n), labels=torch.from_numpy(labels))
    return EncodedData(batch=batch, tasks=TASKS, labels=labels, users=rng.integers(0, 10, size=n),
                       ts_ms=np.arange(n) * 1000)


def test_slice_batch_selects_rows_of_every_row_tensor() -> None:
    data = make_data(10)
    part = slice_batch(data.batch, slice(2, 5), len(data))
    assert part.row_id.tolist() == [2, 3, 4]
    assert part.labels.shape == (3, 2)


def test_default_partners_pair_two_tasks_with_each_other() -> None:
    assert default_partners(["finish", "like"]) == {"finish": "like", "like": "finish"}


def test_time_split_trains_only_on_the_first_80_percent_in_time_order() -> None:
    data = make_data(200)
    learner = MemorisingLearner()
    result = run_time_split(learner, data, default_partners(TASKS), epochs=1, batch_size=32)
    assert learner.stepped_rows == list(range(160))
    assert result.train_events == 160 and result.test_events == 40
    # The test rows were never learned, so the memoriser can only give constant scores there.
    assert result.metrics["test"]["finish"]["auc"] == pytest.approx(0.5)
    assert result.metrics["test"]["finish"]["n"] == 40


def test_time_split_repeats_the_training_part_for_each_epoch_and_records_a_curve() -> None:
    data = make_data(100)
    learner = MemorisingLearner()
    seen: list[int] = []
    result = run_time_split(learner, data, {}, epochs=2, batch_size=16, curve_points=4, on_step=seen.append)
    assert learner.stepped_rows == list(range(80)) * 2
    assert seen[-1] == 160 and seen == sorted(seen)
    assert len(result.curve) == 4 and result.curve[-1]["fraction"] == pytest.approx(1.0)
    assert set(result.curve[0]["auc"]) == set(TASKS)


def test_prequential_scores_each_batch_before_learning_from_it() -> None:
    data = make_data(200)
    result = run_prequential(MemorisingLearner(), data, default_partners(TASKS), batch_size=25)
    # Had the loop scored after the update, the memoriser would reach AUC 1; scored before, it knows nothing.
    assert result.metrics["all"]["finish"]["auc"] == pytest.approx(0.5)
    assert result.metrics["all"]["like"]["n"] == 200
    assert result.metrics["tail"]["like"]["n"] == 40
    assert result.train_events == 200 and len(result.curve) == 10


def test_prequential_metrics_improve_when_the_stream_repeats_itself() -> None:
    data = make_data(100)
    doubled = EncodedData(
        batch=FakeBatch(row_id=torch.cat([data.batch.row_id] * 2), labels=torch.cat([data.batch.labels] * 2)),
        tasks=TASKS, labels=np.concatenate([data.labels] * 2), users=np.concatenate([data.users] * 2),
        ts_ms=np.arange(200),
    )
    result = run_prequential(MemorisingLearner(), doubled, {}, batch_size=10, tail_fraction=0.5)
    # The second half replays rows already learned: the memoriser is perfect there.
    assert result.metrics["tail"]["finish"]["auc"] == pytest.approx(1.0)


class UserRateLearner:
    """Scores a row by its own label (what an ideal ranker of one moment knows) plus 10 per positive of the row's user
    learnt so far: the online counts' user rate in miniature, raising all of a user's later scores after a positive."""

    def __init__(self, users: np.ndarray) -> None:
        self.users = users
        self.positives: dict[int, float] = {}

    def predict(self, batch: FakeBatch) -> dict[str, torch.Tensor]:
        rate = torch.tensor([self.positives.get(int(self.users[r]), 0.0) for r in batch.row_id.tolist()])
        return {task: batch.labels[:, k] + 10.0 * rate for k, task in enumerate(TASKS)}

    def step(self, batch: FakeBatch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        before = self.predict(batch)
        for row, label in zip(batch.row_id.tolist(), batch.labels[:, 0].tolist()):
            user = int(self.users[row])
            self.positives[user] = self.positives.get(user, 0.0) + label
        return {"loss": 1.0}, before


def test_the_served_window_ranks_each_users_rows_as_one_published_model_scored_them() -> None:
    # Each of 5 users: a positive, then negatives, through the tail (the last 40 rows of 80). Prequentially every
    # negative after a user's positive outranks it (+10); a published model scores a stretch at one state.
    n = 80
    users = np.arange(n) % 5
    labels = np.zeros((n, len(TASKS)), dtype=np.float32)
    labels[[40, 41, 42, 43, 44, 60, 61, 62, 63, 64], :] = 1.0  # each user's positive at the start of a stretch
    data = EncodedData(batch=FakeBatch(row_id=torch.arange(n), labels=torch.from_numpy(labels)), tasks=TASKS,
                       labels=labels, users=users, ts_ms=np.arange(n))
    result = run_prequential(UserRateLearner(users), data, {}, batch_size=10, tail_fraction=0.5, publications=2)
    assert result.metrics["tail"]["finish"]["gauc"] < 0.5
    # One state per (user, stretch): the label orders every pair; grouped by user alone, the second stretch's rows
    # (scored after the first's positives were learnt) would outrank the first's.
    assert result.metrics["served"]["finish"]["gauc"] == pytest.approx(1.0)
    assert result.metrics["served"]["finish"]["n"] == 40
    assert result.combined["served"]["ndcg10"] == pytest.approx(1.0)


def test_the_served_window_scores_each_stretch_before_learning_from_it_and_changes_nothing_else() -> None:
    data = make_data(200)
    learner = MemorisingLearner()
    served = run_prequential(learner, data, default_partners(TASKS), batch_size=25, publications=3)
    assert learner.stepped_rows == list(range(200))  # scoring the stretches learnt nothing
    # The stretches start inside batches (160, 173, 186): each scored before its batch is learnt, so unknown rows.
    assert served.metrics["served"]["finish"]["auc"] == pytest.approx(0.5)
    assert served.metrics["served"]["like"]["n"] == 40
    plain = run_prequential(MemorisingLearner(), data, default_partners(TASKS), batch_size=25, publications=0)
    assert "served" not in plain.metrics and "served" not in plain.combined
    assert {w: plain.metrics[w] for w in ("all", "tail")} == {w: served.metrics[w] for w in ("all", "tail")}
    with pytest.raises(ValueError, match="publications"):
        run_prequential(MemorisingLearner(), data, {}, publications=-1)


class UserShareLearner:
    """Scores a row by its user's share of positive rows learnt so far (Laplace-smoothed): a model that only a fresh
    publication can tell about what the stream taught it."""

    def __init__(self, users: np.ndarray) -> None:
        self.users = users
        self.seen: dict[int, list[float]] = {}
        self.stepped_rows: list[int] = []

    def predict(self, batch: FakeBatch) -> dict[str, torch.Tensor]:
        shares = [self.seen.get(int(self.users[r]), [0.0, 0.0]) for r in batch.row_id.tolist()]
        p = torch.tensor([(pos + 1.0) / (n + 2.0) for pos, n in shares])
        return {task: p for task in TASKS}

    def step(self, batch: FakeBatch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        before = self.predict(batch)
        for row, label in zip(batch.row_id.tolist(), batch.labels[:, 0].tolist()):
            self.stepped_rows.append(row)
            counts = self.seen.setdefault(int(self.users[row]), [0.0, 0.0])
            counts[0] += label
            counts[1] += 1.0
        return {"loss": 1.0}, before


def test_the_cadence_serves_the_tail_at_each_publication_count_as_the_served_window_does() -> None:
    # 5 users; nobody positive before the tail (the last 40 of 80 rows), users 0 and 1 positive on every tail row.
    n = 80
    users = np.arange(n) % 5
    labels = np.zeros((n, len(TASKS)), dtype=np.float32)
    labels[40:][np.isin(users[40:], [0, 1])] = 1.0
    data = EncodedData(batch=FakeBatch(row_id=torch.arange(n), labels=torch.from_numpy(labels)), tasks=TASKS,
                       labels=labels, users=users, ts_ms=np.arange(n))
    learner = UserShareLearner(users)
    result = run_prequential(learner, data, {}, batch_size=10, tail_fraction=0.5, cadence=[1, 4, 40])
    assert learner.stepped_rows == list(range(n))  # serving the cadences learnt nothing
    by_count = {c["publications"]: c for c in result.cadence}
    assert [(c["publications"], c["stretches"], c["events_per_publication"]) for c in result.cadence] == [
        (1, 1, 40.0), (4, 4, 10.0), (40, 40, 1.0)]
    # Never updated after the first half: every user looks alike. Published more often, the tail's positives show.
    assert by_count[1]["metrics"]["finish"]["auc"] == pytest.approx(0.5)
    assert by_count[4]["metrics"]["finish"]["auc"] > 0.6
    for count in (1, 4, 40):  # each cadence is the `served` window of a run published that many times
        served = run_prequential(UserShareLearner(users), data, {}, batch_size=10, tail_fraction=0.5,
                                 publications=count).metrics["served"]
        for task in TASKS:
            assert by_count[count]["metrics"][task] == {key: served[task][key]
                                                        for key in ("auc", "log_loss", "calibration")}
    plain = run_prequential(UserShareLearner(users), data, {}, batch_size=10, tail_fraction=0.5)
    assert plain.cadence == [] and json.dumps(plain.metrics) == json.dumps(result.metrics)  # NaN-safe
    with pytest.raises(ValueError, match="cadence"):
        run_prequential(UserShareLearner(users), data, {}, cadence=[0, 4])


def test_evaluate_predictions_uses_the_partner_for_multi_auc() -> None:
    labels = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    result = evaluate_predictions(labels, {"finish": p, "like": p}, np.zeros(4), TASKS, default_partners(TASKS))
    assert result["finish"]["multi_auc"] == pytest.approx(1.0)
    assert result["finish"]["auc"] == pytest.approx(1.0)


def test_time_split_rejects_a_data_set_too_small_to_split() -> None:
    with pytest.raises(ValueError, match="too few"):
        run_time_split(MemorisingLearner(), make_data(1), {}, batch_size=4)
