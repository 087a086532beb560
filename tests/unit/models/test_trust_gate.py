"""Trust-gated distillation, the KD warm-up, the calibrators' learning rate and old checkpoints (docs/method.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import host
from models.config import LEGACY_VALUES, PRESETS, ModelConfig, split_config_name
from models.features import FeatureSpec, encode_rows
from models.learner import Learner
from models.metrics import auc
from models.trust_gate import TrustGate, _column_aucs_torch, _score_keys, column_aucs
from tests.unit.models.test_learner import saved_and_loaded as round_trip  # torch.save, then load weights_only

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")


def config(**overrides) -> ModelConfig:
    base = dict(tasks=TASKS, features=FeatureSpec(categorical=("user_id", "item_id"), hash_buckets=2**10),
                hidden_dims=(8,), tower_dims=(4,), max_pairs_per_level=16, seed=5, kd_gate_window=64, kd_gate_every=16,
                rung="crossdistil")
    base.update(overrides)
    return ModelConfig(**base)


def batch(start: int, n: int = 32):
    rows = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 23}",
             "labels": {"click": int(i % 3 != 0), "long_view": int(i % 4 == 1)}} for i in range(start, start + n)]
    return encode_rows(rows, config().features, TASKS)


# -- the gate itself ---------------------------------------------------------------------------------------------

def test_the_gate_starts_closed_and_opens_only_where_the_teacher_ranks_better() -> None:
    gate = TrustGate(tasks=2, window=100, margin=0.0, every=8)
    assert gate.open.tolist() == [0.0, 0.0] and not gate.decided(0)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]] * 4)
    perfect, backwards = y.clone(), 1.0 - y
    # task 0: teacher perfect, student backwards; task 1: the other way round.
    gate.update(y, student=torch.stack([backwards[:, 0], perfect[:, 1]], 1),
                teacher=torch.stack([perfect[:, 0], backwards[:, 1]], 1))
    assert gate.open.tolist() == [1.0, 0.0]
    assert gate.teacher_auc.tolist() == [1.0, 0.0] and gate.student_auc.tolist() == [0.0, 1.0]


def test_the_teacher_must_lead_by_more_than_the_margin() -> None:
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    student = torch.tensor([[0.2], [0.1], [0.3], [0.9]])  # AUC 0.5
    teacher = torch.tensor([[0.1], [0.9], [0.2], [0.8]])  # AUC 1.0
    gate = TrustGate(1, window=8, margin=0.4, every=4)
    gate.update(y, student, teacher)
    assert gate.open.tolist() == [1.0]
    gate = TrustGate(1, window=8, margin=0.6, every=4)
    gate.update(y, student, teacher)
    assert gate.open.tolist() == [0.0]


def test_a_window_with_one_class_keeps_the_gate_closed() -> None:
    gate = TrustGate(1, window=8, every=4)
    gate.update(torch.ones(4, 1), torch.rand(4, 1), torch.rand(4, 1))
    assert gate.open.tolist() == [0.0] and not gate.decided(0) and math.isnan(float(gate.teacher_auc[0]))


def test_the_window_keeps_only_the_newest_samples() -> None:
    gate = TrustGate(1, window=4, every=1000)
    for value in range(6):
        gate.update(torch.tensor([[float(value % 2)]]), torch.tensor([[float(value)]]), torch.tensor([[0.0]]))
    assert gate.filled == 4 and sorted(gate.student[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_the_decision_waits_for_every_samples() -> None:
    gate = TrustGate(1, window=64, every=10)
    y, good = torch.tensor([[0.0], [1.0]] * 2), torch.tensor([[0.0], [1.0]] * 2)
    gate.update(y, 1 - good, good)
    assert gate.open.tolist() == [0.0]  # 4 samples < every
    gate.update(torch.cat([y, y]), torch.cat([1 - good, 1 - good]), torch.cat([good, good]))
    assert gate.open.tolist() == [1.0]


# -- in the learner ----------------------------------------------------------------------------------------------

def test_a_closed_gate_removes_distillation_from_the_step() -> None:
    learner = Learner(config())
    assert learner.config.gated and learner.kd_scale().tolist() == [0.0, 0.0]
    losses, _ = learner.step(batch(0))
    assert losses["gate/click"] == 0.0 and losses["kd/click"] > 0  # measured, not applied
    learner.trust_gate.open.fill_(1.0)
    assert learner.kd_scale().tolist() == [1.0, 1.0]


def test_the_learner_reports_the_gates_aucs_once_decided() -> None:
    learner = Learner(config())
    for i in range(4):
        losses, _ = learner.step(batch(32 * i))
    assert learner.trust_gate.decided(0)
    assert 0.0 <= losses["teacher_auc/click"] <= 1.0 and 0.0 <= losses["student_auc/long_view"] <= 1.0
    assert losses["gate/click"] in (0.0, 1.0)


def test_the_gate_is_checkpointed_and_training_resumes_identically() -> None:
    uninterrupted, interrupted = Learner(config()), Learner(config())
    for i in range(3):
        uninterrupted.step(batch(32 * i))
        interrupted.step(batch(32 * i))
    resumed = Learner.from_state_dict(round_trip(interrupted.state_dict()))
    assert torch.equal(resumed.trust_gate.student, interrupted.trust_gate.student)
    for i in range(3, 6):
        assert uninterrupted.step(batch(32 * i))[0] == resumed.step(batch(32 * i))[0]
    assert torch.equal(uninterrupted.trust_gate.open, resumed.trust_gate.open)


def test_kd_warm_up_ramps_alpha_from_zero_with_the_samples_seen() -> None:
    learner = Learner(config(kd_gate="none", kd_warmup_samples=64))
    assert learner.kd_scale().tolist() == [0.0, 0.0]
    learner.step(batch(0))  # 32 samples
    assert learner.kd_scale().tolist() == [0.5, 0.5]
    learner.step(batch(32))
    learner.step(batch(64))
    assert learner.kd_scale().tolist() == [1.0, 1.0]
    assert Learner(config(kd_gate="none")).kd_scale() is None


def test_the_calibrators_get_their_own_learning_rate() -> None:
    learner = Learner(config(calibrator_lr=0.05, lr=0.001))
    groups = learner.dense_optimizer.param_groups
    calibrators = {id(learner.model.calibrator_alpha), id(learner.model.calibrator_bias)}
    assert [g["lr"] for g in groups] == [0.001, 0.05]
    assert {id(p) for p in groups[1]["params"]} == calibrators
    assert not calibrators & {id(p) for p in groups[0]["params"]}
    assert Learner(config()).dense_optimizer.param_groups[1]["lr"] == 0.001  # 0 = the network's lr


def test_a_checkpoint_from_before_the_new_options_loads_with_the_paper_values() -> None:
    old = Learner(config(**LEGACY_VALUES))  # the paper's values, the gate's sizes of the time, no wide part
    old.step(batch(0))
    state = round_trip(old.state_dict())
    for key in LEGACY_VALUES:  # as an older version wrote it
        state["config"].pop(key)
    state.pop("samples")
    restored = Learner.from_state_dict(state)
    assert restored.config == old.config and restored.trust_gate is None
    with pytest.raises(ValueError, match="different model config"):
        Learner(config()).load_state_dict(state)  # today's defaults are not what trained it


def test_presets_are_complete_and_named_configs_resolve() -> None:
    assert set(PRESETS["paper"]) == set(PRESETS["trust"])
    assert split_config_name("crossdistil@paper") == ("crossdistil", PRESETS["paper"])
    with pytest.raises(ValueError, match="unknown preset"):
        split_config_name("crossdistil@nope")
    defaults = ModelConfig()
    assert defaults.rung == "mtl"  # the best measured rung; the teacher options default to the trust preset
    assert all(getattr(defaults, key) == value for key, value in PRESETS["trust"].items())


@pytest.mark.parametrize("bad", [{"kd_gate": "maybe"}, {"teacher_backbone_grad": -1.0}, {"kd_warmup_samples": -5},
                                 {"kd_gate_window": 1}])
def test_bad_options_are_refused_with_their_name(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        config(**bad)


def test_an_optimizer_state_from_before_the_calibrators_own_group_is_split_on_load() -> None:
    old = Learner(config(**LEGACY_VALUES))  # the paper's values, the gate's sizes of the time, no wide part
    old.step(batch(0))
    state = round_trip(old.state_dict())
    network, calibrators = state["dense_optimizer"]["param_groups"]
    state["dense_optimizer"]["param_groups"] = [{**network, "params": network["params"] + calibrators["params"]}]
    restored = Learner.from_state_dict(state)  # as an older version wrote it: one group for every dense parameter
    assert [len(g["params"]) for g in restored.dense_optimizer.param_groups] == [len(network["params"]), 2]
    reference = Learner.from_state_dict(round_trip(old.state_dict()))
    assert restored.step(batch(32))[0] == reference.step(batch(32))[0]


@pytest.mark.parametrize("seed", range(5))
def test_column_aucs_equal_the_numpy_auc_with_ties_and_one_class_columns(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = 500
    labels = (torch.rand(n, 4, generator=generator) < 0.3).float()
    labels[:, 3] = 1.0  # one class only: nan
    scores = torch.randint(0, 40, (n, 4), generator=generator).float() / 7  # many ties
    got = column_aucs(labels, scores)
    for column in range(3):
        assert got[column].item() == pytest.approx(auc(labels[:, column].numpy(), scores[:, column].numpy()),
                                                   abs=1e-12)
    assert math.isnan(got[3].item())


@pytest.mark.parametrize("seed", range(5))
def test_column_aucs_of_a_cpu_are_those_of_the_torch_formula_to_the_last_bit(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = 3000
    labels = (torch.rand(n, 5, generator=generator) < 0.3).float()
    labels[:, 4] = 0.0  # one class only: nan in both
    scores = torch.randn(n, 5, generator=generator) * 3
    scores[:, 1] = torch.randint(-20, 20, (n,), generator=generator).float() / 7  # many ties, both signs
    scores[: n // 2, 2] = 0.0
    scores[n // 2:, 2] = -0.0  # equal scores with different bits: one tied run
    got = column_aucs(labels, scores)  # the numpy path (a CPU)
    reference = _column_aucs_torch(labels, scores.t().contiguous())
    assert torch.equal(got[:4], reference[:4].to(got.dtype)) and got[2].item() == 0.5
    assert math.isnan(got[4].item()) and math.isnan(reference[4].item())


def test_column_aucs_keep_tied_runs_within_their_column() -> None:
    # column 0 ends with a run of 1.0 and column 1 starts with one: two runs, not one across the columns
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    scores = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 2.0]])
    got = column_aucs(labels, scores)
    assert torch.equal(got, _column_aucs_torch(labels, scores.t().contiguous()).to(got.dtype))
    assert got.tolist() == [pytest.approx(auc(labels[:, c].numpy(), scores[:, c].numpy()), abs=1e-12)
                            for c in range(2)]


def test_the_keys_kept_per_ring_row_give_the_aucs_of_the_whole_window_to_the_last_bit() -> None:
    # On a CPU the gate keeps each ring row's sort keys as it is written; every decision must equal column_aucs of
    # the window's buffers (batches that wrap the ring, one larger than the window, ties, a gate loaded mid-way).
    generator = torch.Generator().manual_seed(8)
    gate = TrustGate(tasks=2, window=300, every=50)
    twin = None
    for step, rows in enumerate([40, 70, 130, 90, 350, 60, 299, 5, 120, 80, 200]):
        labels = (torch.rand(rows, 2, generator=generator) < 0.4).float()
        student = torch.randn(rows, 2, generator=generator).round(decimals=1)  # ties
        teacher = torch.randn(rows, 2, generator=generator, dtype=torch.float64)  # stored as float32
        for g in (gate, twin) if twin is not None else (gate,):
            g.update(labels, student, teacher)
            g.decide()
            n = g.filled
            expected = column_aucs(torch.cat([g.labels[:n], g.labels[:n]], dim=1),
                                   torch.cat([g.teacher[:n], g.student[:n]], dim=1)).float()  # as decide keeps them
            got = torch.cat([g.teacher_auc, g.student_auc])
            positive = g.labels[:n].t().numpy() > 0  # and the kept keys are those of the buffers, row for row
            columns = torch.cat([g.teacher[:n], g.student[:n]], dim=1).t().contiguous().numpy()
            assert np.array_equal(g._keys[:, :n], _score_keys(np.concatenate([positive, positive]), columns))
            assert torch.equal(got.isnan(), expected.isnan())
            assert torch.equal(got.nan_to_num(), expected.nan_to_num()), step
        if step == 4:
            twin = TrustGate(tasks=2, window=300, every=50)
            twin.load_state_dict(gate.state_dict())
    assert gate._keys is not None and torch.equal(gate.teacher_auc, twin.teacher_auc)


def test_a_devices_gate_keeps_the_window_and_decides_as_a_cpus_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # A device's gate writes at its cursor tensor, takes the AUCs of the whole window with the unfilled rows left
    # out and applies a decision where it is due: the same buffers, counters and decisions as a CPU's slices, sorts
    # and host counters, update for update (batches smaller than `every`, wrapping the ring, larger than the window,
    # a window still filling, a gate loaded mid-way).
    generator = torch.Generator().manual_seed(3)
    cpu, device, twin = TrustGate(2, window=300, every=50), TrustGate(2, window=300, every=50), None
    for step, rows in enumerate([20, 20, 40, 70, 130, 5, 90, 350, 60, 299, 5, 120, 80, 200, 20, 20]):
        labels = (torch.rand(rows, 2, generator=generator) < 0.4).float()
        student = torch.randn(rows, 2, generator=generator).round(decimals=1)  # ties
        teacher = torch.randn(rows, 2, generator=generator)
        cpu.update(labels, student, teacher)
        monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
        for gate in (device, twin) if twin is not None else (device,):
            gate.update(labels, student, teacher)
        monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", False)
        for gate in (device, twin) if twin is not None else (device,):
            assert (gate.position, gate.filled, gate.since_decision) == (cpu.position, cpu.filled, cpu.since_decision)
            assert [int(gate._cursor), int(gate._filled), int(gate._since)] == [cpu.position, cpu.filled,
                                                                                 cpu.since_decision]
            for name in ("labels", "student", "teacher", "open"):
                assert torch.equal(getattr(gate, name), getattr(cpu, name)), (step, name)
            for name in ("teacher_auc", "student_auc"):
                got, expected = getattr(gate, name), getattr(cpu, name)
                assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(),
                                                                                   expected.nan_to_num()), (step, name)
        if step == 5:
            twin = TrustGate(2, window=300, every=50)
            twin.load_state_dict(cpu.state_dict())
    assert cpu.decided(0) and 0.0 < float(cpu.teacher_auc[0]) < 1.0


def test_the_window_aucs_of_a_device_leave_the_rows_not_yet_filled_out() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = (torch.rand(500, 3, generator=generator) < 0.5).float()
    scores = torch.randn(500, 3, generator=generator).round(decimals=1)
    valid = torch.arange(500) < 321
    got = _column_aucs_torch(labels, scores.t().contiguous(), valid)
    assert torch.equal(got, _column_aucs_torch(labels[:321], scores[:321].t().contiguous()))
    assert torch.equal(got, column_aucs(labels[:321], scores[:321]))
