"""Serving loads a published river baseline like a CrossDistil model: same wire format, same scores."""

from __future__ import annotations

import pytest
import torch

from consumers.serving.follower import load_checkpoint
from consumers.state.wire import Reassembler, encode_checkpoint
from models.features import FeatureSpec, encode_rows
from models.river_baseline import RiverLearner, config_for

pytestmark = pytest.mark.unit

TASKS = ("click", "like")
SPEC = FeatureSpec(categorical=("user_id", "item_id"), hash_buckets=1024)


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"user_id": f"u{i % 7}", "item_id": f"item{i % 11}", "features": {},
             "labels": {"click": int(i % 3 == 0), "like": int(i % 5 == 0)}} for i in range(offset, offset + n)]


def test_a_published_river_baseline_is_served_with_the_learners_scores():
    learner = RiverLearner(config_for("river_lr", TASKS, SPEC))
    for k in range(5):
        learner.step(encode_rows(rows(32, 32 * k), SPEC, TASKS))
    tensors, serving_meta = learner.serving_state()
    messages = encode_checkpoint(tensors, {"step": 5, "serving": serving_meta}, version=1)
    (checkpoint,) = list(Reassembler().checkpoints(messages))
    served = load_checkpoint(checkpoint)
    probe = encode_rows(rows(16, 1000), SPEC, TASKS)
    expected = learner.predict(probe)
    scored = served.model.score(probe)
    for task in TASKS:
        assert torch.allclose(scored[task].float(), expected[task].float(), atol=1e-6)
