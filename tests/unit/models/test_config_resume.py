"""What a restart may change in a model's configuration: every ``ModelConfig`` field classified once, in one place
(``models.config.RETUNABLE_OPTIONS`` / ``STRUCTURAL_OPTIONS``), and the reference shows it."""

from __future__ import annotations

import dataclasses

import pytest

from models.config import RETUNABLE_OPTIONS, STRUCTURAL_OPTIONS, ModelConfig, retunable, split_differences

pytestmark = pytest.mark.unit

FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def test_every_model_option_is_classified_retunable_or_structural_once() -> None:
    unclassified = sorted(FIELDS - RETUNABLE_OPTIONS - STRUCTURAL_OPTIONS)
    assert not unclassified, (f"ModelConfig fields {unclassified} are neither in RETUNABLE_OPTIONS nor in "
                              "STRUCTURAL_OPTIONS (models/config.py): say whether a restart may change them")
    assert not RETUNABLE_OPTIONS & STRUCTURAL_OPTIONS
    assert not (RETUNABLE_OPTIONS | STRUCTURAL_OPTIONS) - FIELDS, "a classified option that is no field"


@pytest.mark.parametrize("option", ["lr", "embedding_lr", "wide_lr", "calibrator_lr", "kd_weight", "aux_weight",
                                    "bce_weight", "kd_warmup_samples", "kd_gate_margin", "kd_temperature"])
def test_learning_rates_loss_weights_warm_ups_and_gate_margins_are_retunable(option: str) -> None:
    assert retunable(option)


@pytest.mark.parametrize("option", ["tasks", "features", "backbone", "rung", "embedding_dim", "hidden_dims",
                                    "tower_dims", "count_features", "wide", "wide_crosses", "embedding_optimizer",
                                    "aux_tasks", "counted_tasks", "kd_gate_window"])
def test_what_shapes_the_model_or_its_optimizer_state_is_structural(option: str) -> None:
    assert not retunable(option)


def test_an_option_unknown_to_this_version_is_structural() -> None:
    retuned, structural = split_differences({"lr": (0.01, 0.001), "from_the_future": (1, None)})
    assert retuned == {"lr": (0.01, 0.001)} and structural == {"from_the_future": (1, None)}


def test_the_model_options_reference_says_which_options_a_restart_may_change() -> None:
    from consumers.runtime.config import model_options_markdown

    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[3].strip()
            for line in model_options_markdown().splitlines()[2:] if line.startswith("| `") and "rung =" not in line}
    assert rows["lr"] == "retunable" and rows["backbone"] == "structural"
    assert set(rows) == FIELDS - {"tasks", "seed"}  # model.tasks and model.seed are settings of their own
