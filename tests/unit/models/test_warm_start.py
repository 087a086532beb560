"""Changing a model's configuration: a restore takes retuned options (the optimizers really use the new learning
rates), and a warm start carries an old model's tensors into a new structure wherever they still mean the same."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner
from tests.unit.models.test_learner import saved_and_loaded

pytestmark = pytest.mark.unit

FEATURES = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("watch",), hash_buckets=2**10)


def config(tasks=("click", "long_view"), **overrides) -> ModelConfig:
    base = dict(tasks=tasks, features=FEATURES, hidden_dims=(16,), tower_dims=(8,), num_experts=2,
                max_pairs_per_level=16, seed=11, rung="crossdistil", backbone="mmoe", calibrator_lr=0.01)
    return ModelConfig(**{**base, **overrides})


def batch(cfg: ModelConfig, start: int = 0, n: int = 64):
    rows = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 37}",
             "features": {"hour": i % 24, "watch": 1000 * (i % 13), "tab": i % 3, "weekday": i % 7},
             "labels": {"click": int(i % 3 != 0), "long_view": int(i % 4 == 1), "like": int(i % 5 == 2)}}
            for i in range(start, start + n)]
    return encode_rows(rows, cfg.features, cfg.tasks)


def trained(cfg: ModelConfig, steps: int = 4) -> Learner:
    learner = Learner(cfg)
    for s in range(steps):
        learner.step(batch(cfg, 64 * s))
    return learner


def params(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in learner.model.state_dict().items()}


# ------------------------------------------------------------------------------------ a retuned restore


def test_a_restored_learner_trains_on_with_the_configured_learning_rates_not_the_saved_ones() -> None:
    state = trained(config()).state_dict()
    same = Learner(config())
    same.load_state_dict(saved_and_loaded(state))  # a copy each: a loaded optimizer state is the tensors given
    halved = Learner(config(lr=5e-4, embedding_lr=0.025, wide_lr=0.025, calibrator_lr=0.005))
    halved.load_state_dict(saved_and_loaded(state))  # retunable differences only: no error
    groups = halved.dense_optimizer.param_groups
    assert (groups[0]["lr"], groups[1]["lr"]) == (5e-4, 0.005)  # the network's, then the calibrators'
    assert halved.embedding_optimizer.param_groups[0]["lr"] == 0.025
    assert halved.wide_optimizer.param_groups[0]["lr"] == 0.025
    assert same.dense_optimizer.param_groups[0]["lr"] == 1e-3  # the saved value where nothing changed

    # One step on the same batch from the same state: every update is half as large (Adam's and AdaGrad's steps
    # are proportional to their learning rate, given the same moments and gradient).
    before = params(same)
    assert all(torch.equal(before[name], t) for name, t in params(halved).items())
    step = batch(config(), 1000)
    same.step(step)
    halved.step(step)
    after_same, after_halved = params(same), params(halved)
    for name in ("backbone.experts.0.0.weight", "student_towers.0.1.weight", "embedding.weight",
                 "wide.weight.weight", "calibrator_alpha"):
        moved = after_same[name] - before[name]
        assert moved.abs().sum() > 0, name
        torch.testing.assert_close(after_halved[name] - before[name], moved / 2, rtol=1e-4, atol=1e-7, msg=name)


def test_retuned_loss_weights_and_a_trust_gate_switched_on_apply_from_the_restore() -> None:
    state = saved_and_loaded(trained(config(kd_gate="none")).state_dict())
    restored = Learner(config(kd_gate="trust", kd_weight={"click": 0.3}, aux_weight=0.5, kd_gate_margin=0.01))
    restored.load_state_dict(state)
    alpha, beta, _, _ = restored.model.loss_weights(torch.device("cpu"))
    assert alpha.tolist() == pytest.approx([0.3, 1.0]) and beta.tolist() == [0.5, 0.5]
    assert restored.trust_gate is not None and restored.trust_gate.filled == 0  # a new gate: an empty window
    assert restored.trust_gate.margin == 0.01 and restored.steps == 4
    restored.step(batch(restored.config, 5000))


def test_a_structural_difference_is_refused_naming_it_and_the_retunable_ones_beside_it() -> None:
    state = saved_and_loaded(trained(config(), steps=1).state_dict())
    with pytest.raises(ValueError, match=r"keys \['hidden_dims'\].*retunable, so they may differ: \['lr'\]"):
        Learner(config(hidden_dims=(32,), lr=0.01)).load_state_dict(state)


# ------------------------------------------------------------------------------------------- warm start


def test_a_task_added_before_the_others_keeps_their_towers_gates_and_columns_and_starts_its_own_fresh() -> None:
    old = trained(config())
    new_config = config(tasks=("like", "click", "long_view"))
    new = Learner(new_config)
    fresh = params(new)
    report = new.warm_start(saved_and_loaded(old.state_dict()))
    was, now = params(old), params(new)
    assert torch.equal(now["embedding.weight"], was["embedding.weight"])
    for tensor in ("backbone.experts.0.0.bias", "backbone.experts.1.0.bias"):
        assert torch.equal(now[tensor], was[tensor])
    # towers and gates by task, not by index: click's was tower 0 and is tower 1 now; like's is new
    for kind in ("student_towers", "teacher_towers"):
        for old_i, new_i in ((0, 1), (1, 2)):
            assert torch.equal(now[f"{kind}.{new_i}.1.weight"], was[f"{kind}.{old_i}.1.weight"])
        assert torch.equal(now[f"{kind}.0.1.weight"], fresh[f"{kind}.0.1.weight"])  # like's: as initialised
        assert not torch.equal(now[f"{kind}.0.1.weight"], was[f"{kind}.0.1.weight"])
    # gates: students 0..K-1 then teachers K..2K-1; old (click, long_view), new (like, click, long_view)
    for old_h, new_h in ((0, 1), (1, 2), (2, 4), (3, 5)):
        assert torch.equal(now[f"backbone.gates.{new_h}.bias"], was[f"backbone.gates.{old_h}.bias"])
    assert torch.equal(now["backbone.gates.0.bias"], fresh["backbone.gates.0.bias"])
    # a column per task: the wide part, the calibrators, the counts' label sums, the first layers' rate inputs
    assert torch.equal(now["wide.weight.weight"][:, 1:], was["wide.weight.weight"])
    assert torch.equal(now["wide.weight.weight"][:, 0], fresh["wide.weight.weight"][:, 0])
    assert torch.equal(now["calibrator_alpha"][1:], was["calibrator_alpha"])
    assert torch.equal(now["counts.table"][..., [0, 2, 3]], was["counts.table"])
    assert not now["counts.table"][..., 1].any()  # like counted from now on
    assert report["partly"]["backbone.experts.0.0.weight"] == [16 * (now["backbone.experts.0.0.weight"].shape[1] - 2)
                                                               , now["backbone.experts.0.0.weight"].numel()]
    assert {"student_towers.0.1.weight", "teacher_towers.0.1.weight", "backbone.gates.0.weight",
            "backbone.gates.3.weight"} <= set(report["new"])
    assert report["unused"] == []
    # a new learner otherwise: fresh optimizers, step 0, and it trains
    assert new.steps == 0 and new.samples == 0 and not new.dense_optimizer.state
    assert not any(state["sum"].any() for state in new.embedding_optimizer.state.values())  # AdaGrad's sums: zero
    new.step(batch(new_config))
    assert new.steps == 1


def test_a_feature_added_keeps_the_embeddings_and_the_first_layers_columns_of_the_others() -> None:
    old = trained(config(backbone="shared_bottom"))
    spec = FeatureSpec(categorical=("user_id", "item_id", "hour", "weekday"), numeric=("watch",),
                       hash_buckets=2**10)
    new = Learner(config(backbone="shared_bottom", features=spec))
    fresh = params(new)
    report = new.warm_start(old.state_dict())
    was, now = params(old), params(new)
    assert torch.equal(now["embedding.weight"], was["embedding.weight"])  # the same table: rows hashed by value
    assert torch.equal(now["normalizer.mean"], was["normalizer.mean"])  # the same numeric fields
    first_old, first_new = was["backbone.bottom.0.weight"], now["backbone.bottom.0.weight"]
    d = 16  # embedding_dim: inputs are user, item, hour (, weekday) embeddings, watch, then the counts
    assert torch.equal(first_new[:, :3 * d], first_old[:, :3 * d])
    assert torch.equal(first_new[:, 3 * d:4 * d], fresh["backbone.bottom.0.weight"][:, 3 * d:4 * d])  # weekday's
    assert torch.equal(first_new[:, 4 * d:], first_old[:, 3 * d:])  # watch and the counts, one place later
    assert report["partly"]["backbone.bottom.0.weight"][0] == first_old.numel()
    for tower in ("student_towers.0.1.weight", "teacher_towers.1.1.weight", "wide.weight.weight", "counts.table"):
        assert torch.equal(now[tower], was[tower]), tower


def test_another_backbone_starts_fresh_and_keeps_the_embeddings_wide_part_counts_and_towers() -> None:
    old = trained(config(backbone="shared_bottom"))
    new = Learner(config(backbone="ple", ple_levels=2))
    fresh = params(new)
    report = new.warm_start(old.state_dict())
    was, now = params(old), params(new)
    for name in now:
        if name.startswith("backbone."):
            assert torch.equal(now[name], fresh[name]), name
            assert name in report["new"]
        else:
            assert torch.equal(now[name], was[name]), name
    assert set(report["unused"]) == {"backbone.bottom.0.weight", "backbone.bottom.0.bias"}
    values = report["values"]
    assert values["carried"] + values["new"] == sum(t.numel() for t in now.values())


def test_new_numeric_fields_or_another_table_size_start_the_tensors_that_depend_on_them_fresh() -> None:
    old = trained(config())
    numerics = Learner(config(features=FeatureSpec(categorical=FEATURES.categorical, numeric=("watch", "tab"),
                                                   hash_buckets=2**10)))
    fresh = params(numerics)
    report = numerics.warm_start(old.state_dict())
    for name in ("normalizer.count", "normalizer.mean", "normalizer.m2"):  # one count for every field
        assert name in report["new"] and torch.equal(numerics.model.state_dict()[name], fresh[name])
    assert torch.equal(numerics.model.wide.numeric[0], old.model.wide.numeric[0])  # watch's wide weights are kept
    buckets = Learner(config(features=FeatureSpec(categorical=FEATURES.categorical, numeric=FEATURES.numeric,
                                                  hash_buckets=2**11)))
    report = buckets.warm_start(old.state_dict())
    assert {"embedding.weight", "wide.weight.weight", "counts.table"} <= set(report["new"])


def test_a_warm_started_model_checkpoints_and_resumes_like_any_other() -> None:
    new = Learner(config(tasks=("click", "like")))
    new.warm_start(trained(config()).state_dict())
    new.step(batch(new.config))
    resumed = Learner.from_state_dict(saved_and_loaded(new.state_dict()))
    assert resumed.steps == 1 and all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                                         new.model.state_dict().values()))


def test_a_state_that_is_not_a_crossdistil_models_cannot_start_one() -> None:
    from models.river_baseline import RiverLearner, config_for

    peer = RiverLearner(config_for("river_lr", ("click", "long_view"), FEATURES, 0))
    with pytest.raises(ValueError, match="not the state of a CrossDistil model"):
        Learner(config()).warm_start(peer.state_dict())
