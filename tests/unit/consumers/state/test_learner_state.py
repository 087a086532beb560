"""The learner's part of a trainer checkpoint: exact round trips, and checkpoints of the previous format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.runtime.assembly import model_config
from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointError, CheckpointStore
from consumers.state.learner_state import (
    CHECKPOINT_FORMAT,
    check_format,
    learner_state,
    load_learner_checkpoint,
    write_learner_checkpoint,
)
from consumers.state.tensors import non_finite_tensors
from models.features import encode_rows
from models.learner import Learner

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}"]


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i + offset}", "features": {},
             "labels": {"click": i % 2, "long_view": (i // 2) % 2}} for i in range(n)]


def trained_learner() -> Learner:
    learner = Learner(model_config(load_config(None, env={}, overrides=SMALL)))
    for k in range(3):
        learner.step(encode_rows(rows(16, 100 * k), learner.config.features, learner.config.tasks))
    return learner


def assert_same_next_step(a: Learner, b: Learner) -> None:
    probe = encode_rows(rows(16, 1000), a.config.features, a.config.tasks)
    losses_a, predictions_a = a.step(probe)
    losses_b, predictions_b = b.step(probe)
    assert losses_a == losses_b
    for task in a.config.tasks:
        assert torch.equal(predictions_a[task], predictions_b[task])


def test_the_learner_survives_a_checkpoint_file_exactly(tmp_path: Path) -> None:
    learner = trained_learner()
    written = write_learner_checkpoint(learner, CheckpointStore(tmp_path, keep_last=2), {"positions": []}, None)
    assert written["messages"] == [] and written["chunks"] == 0
    checkpoint = CheckpointStore(tmp_path).latest()
    assert checkpoint.step == 3 and checkpoint.metadata["trainer_format"] == CHECKPOINT_FORMAT
    restored = Learner(learner.config)
    assert load_learner_checkpoint(restored, written["path"]) == 3
    assert_same_next_step(learner, restored)


def test_a_checkpoint_of_trainer_format_1_still_restores_the_same_learner(tmp_path: Path) -> None:
    """Format 1 put each tensor as {"__tensor__": name} into the msgpack skeleton (tuples became lists)."""
    learner = trained_learner()
    tensors: dict[str, torch.Tensor] = {}

    def v1(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {k: v1(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [v1(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    skeleton = v1(learner.state_dict(), "learner")
    CheckpointStore(tmp_path).write(learner.steps, tensors, {"trainer_format": 1, "learner": skeleton})
    checkpoint = CheckpointStore(tmp_path).latest()
    check_format(checkpoint)
    restored = Learner.from_state_dict(learner_state(checkpoint.metadata, checkpoint.tensors))
    assert_same_next_step(learner, restored)


def test_a_checkpoint_directory_of_something_else_is_refused_with_its_format(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).write(1, {}, {"trainer_format": 99})
    with pytest.raises(CheckpointError, match="trainer_format 99"):
        check_format(CheckpointStore(tmp_path).latest())


@pytest.mark.parametrize(("values", "expected"), [
    ([1.0, float("nan"), 2.0], "w (1 of 3 values)"),
    ([float("inf"), 1.0, float("-inf")], "w (2 of 3 values)"),  # their sum is NaN
    ([float("-inf"), 0.0], "w (1 of 2 values)"),
    ([3e38, 3e38, -1.0], None),  # finite values whose float32 sum overflows are finite
    ([], None),
])
def test_non_finite_values_are_found_and_counted_whatever_their_sum(values: list[float], expected: str | None) -> None:
    assert non_finite_tensors({"w": torch.tensor(values, dtype=torch.float32), "ids": torch.tensor([1])}) == expected
