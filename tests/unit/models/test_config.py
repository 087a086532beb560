"""ModelConfig as a user writes it: every mistake in an option is one ValueError naming the option, and every
configuration that trains (defaults, presets, every backbone and rung, old checkpoints' values) stays valid."""

from __future__ import annotations

import dataclasses
import math

import pytest

from models.config import BACKBONES, LEGACY_VALUES, PRESETS, RUNGS, ModelConfig
from models.features import FeatureSpec
from models.zoo import learner_config

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")
FLOAT_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.type == "float"]
TASK_WEIGHTS = ("bce_weight", "kd_weight", "aux_weight", "privileged_weight")


def test_an_unknown_option_is_refused_with_the_nearest_and_every_known_key() -> None:
    with pytest.raises(ValueError, match=r"unknown model config keys \['embeding_dim'\] \(did you mean "
                                         r"'embedding_dim'\?\); known: \[.*'embedding_dim'.*\]"):
        learner_config(TASKS, {"rung": "mtl", "embeding_dim": 8})


def test_an_unknown_feature_spec_key_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"unknown features config keys \['categorcal'\]"):
        learner_config(TASKS, {"features": {"categorcal": ["user_id"]}})


def test_the_tasks_and_the_seed_are_not_options_to_misuse() -> None:
    with pytest.raises(ValueError, match="tasks is not a model option"):
        learner_config(TASKS, {"tasks": ["click"]})
    with pytest.raises(ValueError, match="seed must be a whole number"):
        learner_config(TASKS, {"seed": "seven"})


@pytest.mark.parametrize(("given", "widths"), [(64, (64,)), ("64,32", (64, 32)), ("64", (64,)), ([64, 32], (64, 32)),
                                               ([64.0], (64,)), (["64", "32"], (64, 32))])
@pytest.mark.parametrize("name", ["hidden_dims", "tower_dims"])
def test_layer_widths_may_be_one_width_a_list_or_a_command_lines_string(name: str, given, widths) -> None:
    assert getattr(learner_config(TASKS, {name: given}), name) == widths


@pytest.mark.parametrize("given", ["wide", [64, "x"], [64.5], {"a": 64}, None, True])
@pytest.mark.parametrize("name", ["hidden_dims", "tower_dims"])
def test_layer_widths_that_are_not_whole_numbers_are_refused_naming_the_option(name: str, given) -> None:
    with pytest.raises(ValueError, match=f"{name} must be whole layer widths"):
        ModelConfig(**{name: given})


@pytest.mark.parametrize(("options", "named"), [
    ({"embedding_dim": 0}, "embedding_dim"), ({"embedding_dim": -3}, "embedding_dim"),
    ({"embedding_dim": 2.5}, "embedding_dim"), ({"embedding_dim": "big"}, "embedding_dim"),
    ({"hidden_dims": [0]}, "hidden_dims"), ({"hidden_dims": []}, "hidden_dims"),
    ({"tower_dims": [8, -1]}, "tower_dims"),
    ({"backbone": "mmoe", "num_experts": 0}, "num_experts"), ({"backbone": "ple", "ple_levels": 0}, "ple_levels"),
    ({"ple_shared_experts": -1}, "ple_shared_experts and ple_specific_experts"),
    ({"ple_shared_experts": 0, "ple_specific_experts": 0}, "ple_shared_experts and ple_specific_experts"),
    ({"kd_gate_window": 1.5}, "kd_gate_window"), ({"count_half_life": float("inf")}, "count_half_life"),
])
def test_sizes_and_counts_below_one_or_not_whole_are_refused_naming_the_option(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must"):
        ModelConfig(**options)


@pytest.mark.parametrize("value", [0, -1, -1e-3, "fast", float("nan"), float("inf"), None, True])
@pytest.mark.parametrize("name", ["lr", "embedding_lr", "wide_lr"])
def test_a_learning_rate_must_be_a_positive_finite_number(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "0.5"])
def test_no_number_option_takes_nan_infinity_or_text(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "click:nan", {"click": float("inf")}])
@pytest.mark.parametrize("name", TASK_WEIGHTS)
def test_no_task_weight_is_nan_or_infinite(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize("value", ["fast", None, True, ["click:x"]])
@pytest.mark.parametrize("name", TASK_WEIGHTS)
def test_a_task_weight_that_is_not_a_number_is_refused_naming_the_option(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name}: expected a number or TASK:WEIGHT items"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize(("options", "named"), [({"kd_weight": -0.5}, "kd_weight"),
                                                ({"aux_weight": "click:-1"}, "aux_weight"),
                                                ({"quadruplet_margin": -1.0}, "quadruplet_margin")])
def test_negative_distillation_weights_and_margins_are_refused(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must be >= 0"):
        ModelConfig(**options)


@pytest.mark.parametrize(("name", "value"), [("bf16", "yes"), ("sparse_embeddings", 2), ("privileged_gate", None)])
def test_a_switch_is_true_or_false(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be true or false"):
        ModelConfig(**{name: value})


def test_a_command_lines_numbers_for_switches_and_whole_floats_for_counts_are_taken() -> None:
    config = ModelConfig(bf16=1, sparse_embeddings=0, embedding_dim=8.0, kd_warmup_samples=1e5)
    assert (config.bf16, config.sparse_embeddings, config.embedding_dim, config.kd_warmup_samples) == (
        True, False, 8, 100000)
    assert type(config.embedding_dim) is int and type(config.bf16) is bool


@pytest.mark.parametrize(("name", "value"), [("privileged", 5), ("count_features", ["user_id", 3]),
                                             ("wide_crosses", {"user_id": "item_id"}), ("aux_tasks", 1)])
def test_a_list_of_names_that_is_not_one_is_refused_naming_the_option(name: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a list of names"):
        ModelConfig(**{name: value})


def test_partners_that_are_not_a_mapping_or_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="^partners: expected TASK:PARTNER items"):
        ModelConfig(rung="crossdistil", partners=5)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("rung", RUNGS)
def test_every_backbone_and_rung_with_its_defaults_is_valid(backbone: str, rung: str) -> None:
    config = ModelConfig(tasks=TASKS, backbone=backbone, rung=rung)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid(preset: str) -> None:
    assert learner_config(TASKS, {"rung": f"crossdistil@{preset}"}).rung == "crossdistil"


def test_an_old_checkpoints_config_is_valid() -> None:
    saved = {k: v for k, v in ModelConfig().to_dict().items() if k not in LEGACY_VALUES}
    config = ModelConfig.from_dict({**LEGACY_VALUES, **saved})
    assert config.wide == "none" and config.count_features == ()


def test_the_edges_of_each_range_are_valid() -> None:
    config = ModelConfig(tower_dims=(), ple_shared_experts=0, backbone="ple", calibrator_lr=0.0, kd_weight=0,
                         quadruplet_margin=0.0, count_half_life=0, seed=-1, features=FeatureSpec(hash_buckets=2),
                         wide_crosses="user_id*item_id, user_id*hour", lr=1, bce_weight="click:0")
    assert config.tower_dims == () and config.wide_crosses == ("user_id*item_id", "user_id*hour")
    assert math.isclose(config.lr, 1.0)
