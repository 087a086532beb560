"""The river baseline speaks the Learner protocol: prequential predictions, exact state round trip, it learns."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from models.features import FeatureSpec, encode_rows
from models.learner import flatten_state, unflatten_state
from models.metrics import auc
from models.river_baseline import (
    NAMED_DEFAULTS,
    RIVER_CONFIGS,
    RiverConfig,
    RiverLearner,
    RiverServingModel,
    config_for,
)

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")
OPTIMIZERS = ("adagrad", "sgd")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("watch",), hash_buckets=2**10)
MODELS = ("lr", "fm")


def config(model: str, **overrides) -> RiverConfig:
    return RiverConfig(**{"tasks": TASKS, "model": model, "features": SPEC, "seed": 3, **overrides})


def make_batch(start: int, n: int = 48):
    rows = [
        {"user_id": f"u{i % 5}", "item_id": f"i{i % 37}", "features": {"hour": i % 24, "watch": 1000 * (i % 13)},
         "labels": {"click": int(i % 3 != 0), "long_view": int(i % 4 == 1)}}
        for i in range(start, start + n)
    ]
    return encode_rows(rows, SPEC, TASKS)


def signal_rows(n: int, seed: int = 0) -> list[dict]:
    """Items with their own click rate, long_view mostly after a click, watch time tied to long_view."""
    rng = np.random.default_rng(seed)
    item_logit = rng.normal(0.0, 1.5, size=200)
    rows = []
    for _ in range(n):
        item = int(rng.integers(200))
        click = rng.random() < 1 / (1 + np.exp(-item_logit[item]))
        long_view = click and rng.random() < 0.6
        rows.append({"user_id": f"u{rng.integers(50)}", "item_id": f"i{item}",
                     "features": {"hour": int(rng.integers(24)), "watch": float(rng.lognormal(8 + long_view, 1))},
                     "labels": {"click": int(click), "long_view": int(long_view)}})
    return rows


def stream(learner: RiverLearner, rows: list[dict], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Prequential pass: predictions made before each batch is learned, concatenated."""
    parts: dict[str, list] = {task: [] for task in TASKS}
    for lo in range(0, len(rows), batch_size):
        _, predictions = learner.step(encode_rows(rows[lo:lo + batch_size], SPEC, TASKS))
        for task in TASKS:
            parts[task].append(predictions[task].numpy())
    return {task: np.concatenate(parts[task]) for task in TASKS}


@pytest.mark.parametrize("model", MODELS)
def test_step_returns_the_predictions_made_before_the_update(model: str) -> None:
    learner = RiverLearner(config(model))
    learner.step(make_batch(0))
    batch = make_batch(48)
    before = learner.predict(batch)
    losses, predictions = learner.step(batch)
    after = learner.predict(batch)
    for task in TASKS:
        assert predictions[task].dtype == torch.float32 and predictions[task].shape == (48,)
        assert torch.equal(predictions[task], before[task])
        assert not torch.equal(after[task], before[task]), "learning the batch must change its scores"
    assert set(losses) == {"total", "bce/click", "bce/long_view"}
    assert losses["total"] == pytest.approx(losses["bce/click"] + losses["bce/long_view"])


@pytest.mark.parametrize("model", MODELS)
def test_predict_changes_nothing(model: str) -> None:
    learner = RiverLearner(config(model))
    learner.step(make_batch(0))
    state = _saved(learner.state_dict())
    learner.predict(make_batch(1000))  # unseen ids: no weight or latent may appear
    assert _equal_states(_saved(learner.state_dict()), state)


@pytest.mark.parametrize("model", MODELS)
def test_a_sample_seen_twice_scores_higher_for_its_positive_label(model: str) -> None:
    learner = RiverLearner(config(model))
    rows = [{"user_id": "a", "item_id": "b", "features": {"hour": 1, "watch": 5.0}, "labels": {"click": 1}}]
    batch = encode_rows(rows, SPEC, TASKS)
    _, first = learner.step(batch)
    _, second = learner.step(batch)
    assert second["click"].item() > first["click"].item()
    assert second["long_view"].item() < first["long_view"].item()  # its long_view label is 0


@pytest.mark.parametrize("model", MODELS)
def test_same_config_same_stream_gives_identical_predictions(model: str) -> None:
    rows = signal_rows(600)
    first, second = stream(RiverLearner(config(model)), rows), stream(RiverLearner(config(model)), rows)
    for task in TASKS:
        np.testing.assert_array_equal(first[task], second[task])


def test_fm_seed_sets_the_latent_init_and_lr_ignores_it() -> None:
    rows = signal_rows(300)
    fm = [stream(RiverLearner(config("fm", seed=s)), rows)["click"] for s in (0, 1)]
    lr = [stream(RiverLearner(config("lr", seed=s)), rows)["click"] for s in (0, 1)]
    assert not np.array_equal(fm[0], fm[1])
    np.testing.assert_array_equal(lr[0], lr[1])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("model", MODELS)
def test_state_round_trip_through_safetensors_continues_exactly(model: str, optimizer: str) -> None:
    from safetensors.torch import load, save

    rows = signal_rows(900)
    original = RiverLearner(config(model, optimizer=optimizer))
    stream(original, rows[:500])
    tensors, metadata = flatten_state(original.state_dict())
    restored = RiverLearner.from_state_dict(unflatten_state(load(save(tensors, metadata)), metadata))
    assert restored.steps == original.steps
    # Continuing on new data (new ids too: the FM's RNG state must match) gives bit-identical scores.
    a, b = stream(original, rows[500:]), stream(restored, rows[500:])
    for task in TASKS:
        np.testing.assert_array_equal(a[task], b[task])


def test_adagrad_accumulators_are_exported_as_tensors_one_per_weight_and_latent_vector() -> None:
    learner = RiverLearner(config("fm", optimizer="adagrad"))
    stream(learner, signal_rows(300))
    exported = learner.state_dict()["models"]["click"]
    assert exported["weight_g2_keys"].dtype == torch.int64 and exported["weight_g2"].dtype == torch.float64
    assert set(exported["weight_g2_keys"].tolist()) == set(exported["keys"].tolist())
    # One accumulator per (feature, factor), not river's one per factor shared by every feature.
    assert exported["latent_g2"].shape == exported["latents"].shape
    assert set(exported["latent_g2_keys"].tolist()) == set(exported["latent_keys"].tolist())
    assert (exported["latent_g2"] > 0).any()
    lr = RiverLearner(config("lr", optimizer="adagrad"))
    lr.step(make_batch(0))
    lr_exported = lr.state_dict()["models"]["click"]
    assert lr_exported["g2"].shape == lr_exported["keys"].shape


def test_sgd_state_has_no_accumulators_and_adagrad_refuses_it() -> None:
    sgd = RiverLearner(config("lr", optimizer="sgd"))
    sgd.step(make_batch(0))
    state = sgd.state_dict()
    assert not any(key.endswith("g2") for key in state["models"]["click"])
    state["config"]["optimizer"] = "adagrad"
    with pytest.raises(ValueError, match="lacks AdaGrad accumulators"):
        RiverLearner.from_state_dict(state)


def test_a_state_saved_before_the_optimizer_field_is_read_as_sgd() -> None:
    learner = RiverLearner(config("lr", optimizer="sgd"))
    stream(learner, signal_rows(300))
    state = learner.state_dict()
    del state["config"]["optimizer"], state["config"]["latent_lr"]  # as written by the SGD-only version
    restored = RiverLearner.from_state_dict(state)
    assert restored.config.optimizer == "sgd"
    torch.testing.assert_close(restored.predict(make_batch(0)), learner.predict(make_batch(0)), rtol=0, atol=0)


def test_adagrad_beats_one_sgd_step_for_frequent_and_rare_features_alike() -> None:
    # Many always-present context columns next to rare ids: the case where one SGD step cannot serve both.
    spec = FeatureSpec(categorical=("user_id", "item_id") + tuple(f"ctx{c}" for c in range(20)), hash_buckets=2**12)
    rng = np.random.default_rng(5)
    item_logit = rng.normal(0.0, 1.5, size=300)
    rows = []
    for _ in range(8000):
        item = int(rng.integers(300))
        click = int(rng.random() < 1 / (1 + np.exp(-item_logit[item])))
        rows.append({"user_id": f"u{rng.integers(100)}", "item_id": f"i{item}",
                     "features": {f"ctx{c}": int(rng.integers(2)) for c in range(20)}, "labels": {"click": click}})
    labels = np.array([r["labels"]["click"] for r in rows])
    scores = {}
    for optimizer in OPTIMIZERS:
        learner = RiverLearner(RiverConfig(tasks=("click",), features=spec, optimizer=optimizer, lr=0.1))
        parts = [learner.step(encode_rows(rows[lo:lo + 256], spec, ("click",)))[1]["click"].numpy()
                 for lo in range(0, len(rows), 256)]
        scores[optimizer] = auc(labels[4000:], np.concatenate(parts)[4000:])
    assert scores["adagrad"] > scores["sgd"] + 0.02, scores


def test_state_loads_with_torch_weights_only() -> None:
    learner = RiverLearner(config("fm"))
    learner.step(make_batch(0))
    restored = RiverLearner.from_state_dict(_saved(learner.state_dict()))
    torch.testing.assert_close(restored.predict(make_batch(0)), learner.predict(make_batch(0)), rtol=0, atol=0)


def test_state_of_another_config_is_refused_with_the_differing_keys() -> None:
    learner = RiverLearner(config("lr"))
    with pytest.raises(ValueError, match="lr"):
        RiverLearner(config("lr", lr=0.5)).load_state_dict(learner.state_dict())


@pytest.mark.parametrize("model", MODELS)
def test_serving_state_scores_like_the_learner(model: str) -> None:
    from safetensors.torch import load, save

    learner = RiverLearner(config(model))
    stream(learner, signal_rows(400))
    tensors, metadata = learner.serving_state()
    serving = RiverServingModel.from_serving_state(load(save(tensors, metadata)), metadata)
    batch = make_batch(0, 64)  # partly unseen ids
    expected, got = learner.predict(batch), serving.score(batch)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_learns_a_stream_with_signal(model: str) -> None:
    rows = signal_rows(6000, seed=1)
    predictions = stream(RiverLearner(config(model)), rows)
    labels = {task: np.array([r["labels"].get(task, 0) for r in rows]) for task in TASKS}
    tail = slice(3000, None)
    for task in TASKS:
        assert auc(labels[task][tail], predictions[task][tail]) > 0.6, task


def test_config_names_map_to_models_and_bad_values_are_named() -> None:
    assert config_for("river_fm", TASKS, SPEC, seed=2).model == "fm"
    assert config_for("river_lr", TASKS, SPEC).optimizer == NAMED_DEFAULTS["river_lr"]["optimizer"] == "adagrad"
    assert config_for("river_lr", TASKS, SPEC, optimizer="sgd").optimizer == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        RiverConfig(optimizer="adam")
    assert set(RIVER_CONFIGS) == {"river_lr", "river_fm"}
    assert RiverConfig.from_dict(config("fm").to_dict()) == config("fm")
    with pytest.raises(ValueError, match="model"):
        RiverConfig(model="tree")
    with pytest.raises(ValueError, match="unknown river config keys"):
        RiverConfig.from_dict({"hidden_dims": [8]})
    with pytest.raises(ValueError, match="river_xx"):
        config_for("river_xx", TASKS, SPEC)


def _saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    return a == b


def test_evaluate_knows_the_river_config_names() -> None:
    from consumers.tools import evaluate

    assert set(evaluate.RIVER_CONFIGS) == set(RIVER_CONFIGS)
    assert "river_lr" not in evaluate.LADDER  # the default --configs stays the ladder


def test_evaluate_builds_river_learners_with_river_options_only() -> None:
    from consumers.tools.evaluate import seeded_learner as evaluate_learner

    options = {"river.lr": 0.3, "lr": 0.003}  # lr= is the deep model's, river.lr= the baseline's
    learner = evaluate_learner(TASKS, "shared_bottom", "river_fm", 4, SPEC, options, "cpu")
    assert isinstance(learner, RiverLearner)
    assert (learner.config.model, learner.config.lr, learner.config.seed) == ("fm", 0.3, 4)
    with pytest.raises(ValueError, match="unknown river options"):
        evaluate_learner(TASKS, "shared_bottom", "river_lr", 0, SPEC, {"river.hidden_dims": [8]}, "cpu")


def test_evaluate_runs_mtl_and_river_side_by_side(tmp_path) -> None:
    import argparse
    import json

    from consumers.tools import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([
        "--dataset", "synthetic", "--source", "-", "--option", "n_events=1500", "--configs", "mtl,river_lr,river_fm",
        "--seeds", "1", "--mode", "both", "--hash-buckets", "4096", "--threads", "1", "--device", "cpu",
        "--model-option", "hidden_dims=8,", "--model-option", "tower_dims=4,", "--curve-points", "2",
        "--out", str(tmp_path),
    ])
    assert evaluate.run(args) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["config"], r["mode"]) for r in runs) == sorted(
        (c, m) for c in ("mtl", "river_lr", "river_fm") for m in ("split", "prequential"))
    report = (tmp_path / "report.md").read_text()
    assert "| shared_bottom | river_fm |" in report
