"""The wide (linear) part: learns a linear signal, touches only the batch's rows, saves and serves like the rest."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

import models.wide
from models.config import LEGACY_VALUES, ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel
from models.wide import DEFAULT_WIDE_CROSSES, WidePart, largest_prime_at_most, parse_cross

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("watch",), hash_buckets=2**10)


def config(**overrides) -> ModelConfig:
    base = dict(tasks=TASKS, features=SPEC, hidden_dims=(8,), tower_dims=(4,), seed=3, rung="mtl")
    return ModelConfig(**{**base, **overrides})


def rows(start: int, n: int) -> list[dict]:
    # click depends only on the user (even users click), long_view on the item: a purely linear signal
    return [{"user_id": f"u{i % 20}", "item_id": f"i{(7 * i) % 30}", "features": {"hour": i % 24, "watch": i % 5},
             "labels": {"click": int(i % 20 % 2 == 0), "long_view": int((7 * i) % 30 < 10)}}
            for i in range(start, start + n)]


def batch(start: int, n: int = 64):
    return encode_rows(rows(start, n), SPEC, TASKS)


def test_the_wide_part_alone_learns_a_linear_signal() -> None:
    wide = WidePart(SPEC, len(TASKS), ("user_id*item_id",))
    optimizer = torch.optim.Adagrad(wide.parameters(), lr=0.1, foreach=False)
    for step in range(60):
        b = batch(64 * step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(wide(b.categorical, b.numeric), b.labels)
        optimizer.zero_grad()
        loss.backward()
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            optimizer.step()
    b = batch(10_000)
    accuracy = ((wide(b.categorical, b.numeric) > 0).float() == b.labels).float().mean()
    assert loss.item() < 0.2 and accuracy.item() == 1.0


def test_the_wide_part_speeds_up_the_start_of_the_stream() -> None:
    def mean_early_loss(wide: str) -> float:
        learner = Learner(config(wide=wide))
        return sum(learner.step(batch(64 * i))[0]["total"] for i in range(15)) / 15

    assert mean_early_loss("adagrad") < mean_early_loss("none") - 0.1


def test_a_step_moves_only_the_wide_rows_the_batch_uses_singles_and_crosses() -> None:
    learner = Learner(config())
    wide = learner.model.wide
    b = batch(0)
    before = wide.weight.weight.detach().clone()
    learner.step(b)
    changed = (wide.weight.weight.detach() != before).any(dim=1)
    used = torch.zeros_like(changed)
    used[wide.rows(b.categorical).flatten()] = True
    assert torch.equal(changed, used)
    assert int(used[wide.single_rows:].sum()) > 0  # the crosses have rows of their own, past the single ones


def test_crosses_of_absent_fields_are_left_out_and_a_malformed_cross_is_refused() -> None:
    wide = WidePart(SPEC, 2, ("user_id*item_id", "user_id*tab", "user_id*hour"))
    assert wide.crosses == (("user_id", "item_id"), ("user_id", "hour"))
    assert wide.rows(batch(0).categorical).shape == (64, 3 + 2)
    with pytest.raises(ValueError, match="FIELD\\*FIELD"):
        config(wide_crosses=("user_id",))
    assert parse_cross(" user_id * tab ") == ("user_id", "tab")


def test_a_cross_a_user_wrote_of_a_field_the_data_lacks_is_warned_about_once_and_the_defaults_are_not(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.wide, "_warned_absent", set())  # what earlier tests were warned about
    with caplog.at_level(logging.WARNING, logger="models.wide"):
        WidePart(SPEC, 2, DEFAULT_WIDE_CROSSES)  # hourmin, weekday and tab are not fields of SPEC
        Learner(config())
        assert not caplog.records
        for _ in range(2):  # a grid builds a model per run: said once
            Learner(config(wide_crosses="usr_id*item_id, user_id*hour"))
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(
        "wide_crosses: ['usr_id*item_id'] name(s) no categorical feature of the data (user_id, item_id, hour)")


def test_cross_rows_separate_pairs_that_share_one_side() -> None:
    wide = WidePart(FeatureSpec(categorical=("user_id", "item_id"), hash_buckets=2**16), 1, ("user_id*item_id",))
    users, items = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    crossed = wide.rows(torch.stack([users.flatten() * 613, items.flatten() * 97], dim=1))[:, 2]
    assert largest_prime_at_most(2**16) == 65521 and wide.cross_rows == 65521
    assert crossed.min() >= 2**16 and crossed.unique().numel() > 9_900  # 10,000 pairs, ~75 collisions expected


def test_no_wide_part_means_no_wide_parameters_or_optimizer() -> None:
    learner = Learner(config(wide="none"))
    assert learner.model.wide is None and learner.wide_optimizer is None
    assert "wide_optimizer" not in learner.state_dict()


def test_wide_state_and_its_adagrad_sums_survive_a_checkpoint_and_training_continues_identically() -> None:
    uninterrupted, interrupted = Learner(config()), Learner(config())
    for i in range(3):
        uninterrupted.step(batch(64 * i))
        interrupted.step(batch(64 * i))
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["wide_optimizer"]["state"]  # AdaGrad's per-coordinate sums are in the checkpoint
    resumed = Learner.from_state_dict(state)
    for i in range(3, 6):
        assert uninterrupted.step(batch(64 * i))[0] == resumed.step(batch(64 * i))[0]
    assert torch.equal(uninterrupted.model.wide.weight.weight, resumed.model.wide.weight.weight)


def test_serving_scores_with_the_wide_part_exactly_as_the_learner_predicts() -> None:
    learner = Learner(config(rung="crossdistil"))
    for i in range(3):
        learner.step(batch(64 * i))
    tensors, metadata = learner.serving_state()
    assert {"wide.weight.weight", "wide.numeric", "wide.bias"} <= set(tensors)
    b = batch(5_000)
    served = ServingModel.from_serving_state(tensors, metadata).score(b)
    for task in TASKS:
        assert torch.equal(served[task], learner.predict(b)[task])


def test_a_serving_state_written_before_the_wide_part_still_loads_without_one() -> None:
    learner = Learner(config(wide="none"))
    tensors, metadata = learner.serving_state()
    old = {k: v for k, v in json.loads(metadata["config"]).items() if not k.startswith("wide")}
    serving = ServingModel.from_serving_state(tensors, {**metadata, "config": json.dumps(old)})
    assert serving.model.wide is None and LEGACY_VALUES["wide"] == "none"
