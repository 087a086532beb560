"""models.evaluation loops, specified with a memorising fake learner so that leaks would show as perfect AUC."""

from __future__ import annotations

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


def test_evaluate_predictions_uses_the_partner_for_multi_auc() -> None:
    labels = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    result = evaluate_predictions(labels, {"finish": p, "like": p}, np.zeros(4), TASKS, default_partners(TASKS))
    assert result["finish"]["multi_auc"] == pytest.approx(1.0)
    assert result["finish"]["auc"] == pytest.approx(1.0)


def test_time_split_rejects_a_data_set_too_small_to_split() -> None:
    with pytest.raises(ValueError, match="too few"):
        run_time_split(MemorisingLearner(), make_data(1), {}, batch_size=4)
