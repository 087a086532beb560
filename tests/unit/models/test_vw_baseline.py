"""The Vowpal Wabbit peer speaks the Learner protocol: prequential predictions, exact state round trip, it learns."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pytest
import torch

from models.features import FeatureSpec, encode_rows
from models.learner import flatten_state, unflatten_state
from models.metrics import auc
from models.vw_baseline import MISSING_ADVICE, VW_CONFIGS, VWConfig, config_for, require_vowpalwabbit

pytestmark = pytest.mark.unit
needs_vw = pytest.mark.skipif(importlib.util.find_spec("vowpalwabbit") is None,
                              reason="vowpalwabbit is not installed (pip install crossdistil[peers])")

TASKS = ("click", "long_view")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour", "author"), numeric=("watch",), hash_buckets=2**10)


def config(**overrides) -> VWConfig:
    return VWConfig(**{"tasks": TASKS, "features": SPEC, "bits": 16, **overrides})


def learner_for(**overrides):
    from models.vw_baseline import VWLearner

    return VWLearner(config(**overrides))


def make_batch(start: int, n: int = 48):
    rows = [
        {"user_id": f"u{i % 5}", "item_id": f"i{i % 37}",
         "features": {"hour": i % 24, "author": f"a{i % 7}", "watch": 1000 * (i % 13)},
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
                     "features": {"hour": int(rng.integers(24)), "author": f"a{item % 20}",
                                  "watch": float(rng.lognormal(8 + long_view, 1))},
                     "labels": {"click": int(click), "long_view": int(long_view)}})
    return rows


def stream(learner, rows: list[dict], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Prequential pass: predictions made before each batch is learned, concatenated."""
    parts: dict[str, list] = {task: [] for task in TASKS}
    for lo in range(0, len(rows), batch_size):
        _, predictions = learner.step(encode_rows(rows[lo:lo + batch_size], SPEC, TASKS))
        for task in TASKS:
            parts[task].append(predictions[task].numpy())
    return {task: np.concatenate(parts[task]) for task in TASKS}


def _saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@needs_vw
def test_step_returns_the_predictions_made_before_the_update() -> None:
    learner = learner_for()
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


@needs_vw
def test_predict_changes_no_later_score() -> None:
    # VW counts predicted examples in its model file's progress statistics, so the bytes may differ; what scores
    # (weights, adaptive and normalization sums) must not: a learner that also predicted continues identically.
    rows = signal_rows(600)
    predicting, plain = learner_for(interactions=("ui",)), learner_for(interactions=("ui",))
    stream(predicting, rows[:300])
    stream(plain, rows[:300])
    for start in range(1000, 2000, 50):  # unseen ids
        predicting.predict(make_batch(start))
    a, b = stream(predicting, rows[300:]), stream(plain, rows[300:])
    for task in TASKS:
        np.testing.assert_array_equal(a[task], b[task])


@needs_vw
def test_a_sample_seen_twice_scores_higher_for_its_positive_label() -> None:
    learner = learner_for()
    rows = [{"user_id": "a", "item_id": "b", "features": {"hour": 1, "watch": 5.0}, "labels": {"click": 1}}]
    batch = encode_rows(rows, SPEC, TASKS)
    _, first = learner.step(batch)
    _, second = learner.step(batch)
    assert second["click"].item() > first["click"].item()
    assert second["long_view"].item() < first["long_view"].item()  # its long_view label is 0


@needs_vw
def test_features_are_namespaced_user_item_context_side_numeric() -> None:
    learner = learner_for(context_fields=("hour",))
    rows = [{"user_id": "a", "item_id": "b", "features": {"hour": 1, "author": "x", "watch": 5.0}}]
    (line,) = learner.features(encode_rows(rows, SPEC, TASKS))
    assert [part.split()[0] for part in line.split("|")[1:]] == ["u", "i", "c", "s", "n"]
    assert " |c 2_" in line and " |s 3_" in line and " |n 0:" in line


@needs_vw
@pytest.mark.parametrize("interactions", [(), ("ui",)])
def test_state_round_trip_through_safetensors_continues_exactly(interactions: tuple[str, ...]) -> None:
    from safetensors.torch import load, save

    from models.vw_baseline import VWLearner

    rows = signal_rows(900)
    original = learner_for(interactions=interactions)
    stream(original, rows[:500])
    tensors, metadata = flatten_state(original.state_dict())
    restored = VWLearner.from_state_dict(unflatten_state(load(save(tensors, metadata)), metadata))
    assert restored.steps == original.steps
    # VW's model file keeps the adaptive and normalized accumulators: continuing gives bit-identical scores.
    a, b = stream(original, rows[500:]), stream(restored, rows[500:])
    for task in TASKS:
        np.testing.assert_array_equal(a[task], b[task])


@needs_vw
def test_state_loads_with_torch_weights_only() -> None:
    from models.vw_baseline import VWLearner

    learner = learner_for()
    learner.step(make_batch(0))
    restored = VWLearner.from_state_dict(_saved(learner.state_dict()))
    torch.testing.assert_close(restored.predict(make_batch(0)), learner.predict(make_batch(0)), rtol=0, atol=0)


@needs_vw
def test_state_of_another_config_is_refused_with_the_differing_keys() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        learner_for(learning_rate=1.0).load_state_dict(learner_for().state_dict())


@needs_vw
@pytest.mark.parametrize("interactions", [(), ("ui",)])
def test_learns_a_stream_with_signal(interactions: tuple[str, ...]) -> None:
    rows = signal_rows(6000, seed=1)
    predictions = stream(learner_for(interactions=interactions), rows)
    labels = {task: np.array([r["labels"].get(task, 0) for r in rows]) for task in TASKS}
    tail = slice(3000, None)
    for task in TASKS:
        assert auc(labels[task][tail], predictions[task][tail]) > 0.6, task


@needs_vw
def test_same_config_same_stream_gives_identical_predictions() -> None:
    rows = signal_rows(600)
    first, second = stream(learner_for(interactions=("ui",)), rows), stream(learner_for(interactions=("ui",)), rows)
    for task in TASKS:
        np.testing.assert_array_equal(first[task], second[task])


def test_config_names_options_and_bad_values_are_named() -> None:
    assert set(VW_CONFIGS) == {"vw", "vw_q"}
    assert config_for("vw_q", TASKS, SPEC).interactions == ("ui", "uc")
    assert config_for("vw", TASKS, SPEC).interactions == ()
    assert config_for("vw", TASKS, SPEC, interactions="uc", bits=20).arguments().count("--interactions uc") == 1
    assert VWConfig.from_dict(config(interactions=("ui", "uc")).to_dict()) == config(interactions=("ui", "uc"))
    with pytest.raises(ValueError, match="namespace letters"):
        VWConfig(interactions=("ux",))
    with pytest.raises(ValueError, match="bits"):
        VWConfig(bits=40)
    with pytest.raises(ValueError, match="unknown VW options"):
        config_for("vw", TASKS, SPEC, hidden_dims=[8])
    with pytest.raises(ValueError, match="vw_xx"):
        config_for("vw_xx", TASKS, SPEC)


def test_a_missing_vowpalwabbit_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vowpalwabbit", None)  # import of a None entry raises ImportError
    with pytest.raises(ImportError, match=r"pip install crossdistil\[peers\]"):
        require_vowpalwabbit()
    from models.vw_baseline import VWLearner

    with pytest.raises(ImportError, match="peers"):
        VWLearner(config())
    assert "crossdistil[peers]" in MISSING_ADVICE
    from consumers.tools.evaluate import parse_configs

    with pytest.raises(ValueError, match=r"--configs vw: .*pip install crossdistil\[peers\]"):
        parse_configs("mtl,vw")


@needs_vw
def test_evaluate_builds_vw_learners_with_vw_options_only() -> None:
    from consumers.tools.evaluate import seeded_learner as evaluate_learner
    from models.vw_baseline import VWLearner

    options = {"vw.learning_rate": 0.3, "vw.bits": 12, "lr": 0.003}  # lr= is the deep model's
    learner = evaluate_learner(TASKS, "shared_bottom", "vw_q", 4, SPEC, options, "cpu")
    assert isinstance(learner, VWLearner)
    assert (learner.config.learning_rate, learner.config.bits, learner.config.interactions) == (0.3, 12, ("ui", "uc"))
    with pytest.raises(ValueError, match="unknown VW options"):
        evaluate_learner(TASKS, "shared_bottom", "vw", 0, SPEC, {"vw.hidden_dims": [8]}, "cpu")


def test_evaluate_knows_the_vw_config_names() -> None:
    from consumers.tools import evaluate

    assert set(evaluate.VW_CONFIGS) == set(VW_CONFIGS)
    assert "vw" not in evaluate.LADDER  # the default --configs stays the ladder
    with pytest.raises(ValueError, match="unknown"):
        evaluate.parse_configs("vw@paper")


@needs_vw
def test_evaluate_accepts_the_vw_configs_when_vowpalwabbit_is_installed() -> None:
    from consumers.tools import evaluate

    assert evaluate.parse_configs("vw,vw_q,river_lr") == ["vw", "vw_q", "river_lr"]


@needs_vw
def test_evaluate_runs_the_vw_peers_under_the_same_protocol(tmp_path) -> None:
    import argparse
    import json

    from consumers.tools import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([
        "--dataset", "synthetic", "--source", "-", "--option", "n_events=1500", "--configs", "vw,vw_q", "--seeds", "1",
        "--mode", "both", "--hash-buckets", "4096", "--threads", "1", "--device", "cpu", "--curve-points", "2",
        "--model-option", "vw.bits=16", "--out", str(tmp_path),
    ])
    assert evaluate.run(args) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["config"], r["mode"]) for r in runs) == sorted(
        (c, m) for c in ("vw", "vw_q") for m in ("split", "prequential"))
    assert all(0.0 <= r["metrics"]["tail" if r["mode"] == "prequential" else "test"][t]["auc"] <= 1.0
               for r in runs for t in r["tasks"])
