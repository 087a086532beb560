"""The privileged teacher (models/privileged.py): a second model reads outcomes the student never sees, trains as a
model of its own, and only changes the student's BCE target; serving, checkpoints and refusals stay exact."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner
from models.privileged import teacher_config, teacher_spec, teacher_tasks

pytestmark = pytest.mark.unit

TASKS = ("click", "like")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("duration",), hash_buckets=2**10)


def config(**overrides) -> ModelConfig:
    base = dict(tasks=TASKS, features=SPEC, hidden_dims=(16,), tower_dims=(8,), seed=5, rung="mtl",
                privileged=("play", "stay"), privileged_weight=0.5)
    return ModelConfig(**{**base, **overrides})


def rows(start: int, n: int = 64) -> list[dict]:
    return [{"user_id": f"u{i % 7}", "item_id": f"i{i % 23}",
             "features": {"hour": i % 24, "duration": 100 * (i % 9), "play": 30 * (i % 11), "stay": i % 3},
             "labels": {"click": int(i % 3 != 0), "like": int(i % 11 == 2)}}
            for i in range(start, start + n)]


def batches(cfg: ModelConfig, count: int = 4) -> list:
    return [encode_rows(rows(64 * i), teacher_spec(cfg), TASKS) for i in range(count)]


def student_batches(cfg: ModelConfig, count: int = 4) -> list:
    return [encode_rows(rows(64 * i), cfg.features, TASKS) for i in range(count)]


def test_the_teacher_is_the_student_model_reading_the_privileged_columns_too() -> None:
    cfg = config(rung="crossdistil", backbone="mmoe")
    teacher = teacher_config(cfg)
    assert teacher.rung == "mtl" and teacher.privileged == () and teacher.backbone == "mmoe"
    assert teacher.features.numeric == ("duration", "play", "stay")
    assert teacher.features.categorical == SPEC.categorical and teacher.seed == cfg.seed


def test_the_student_starts_where_a_learner_without_a_teacher_starts() -> None:
    plain = Learner(config(privileged=()))
    with_teacher = Learner(config())
    for (name, a), b in zip(plain.model.state_dict().items(), with_teacher.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_with_weight_zero_the_student_trains_exactly_as_without_a_teacher() -> None:
    cfg = config(privileged_weight=0.0)
    plain, with_teacher = Learner(config(privileged=())), Learner(cfg)
    for full, student in zip(batches(cfg), student_batches(cfg)):
        _, expected = plain.step(student)
        _, got = with_teacher.step(full)
        for task in TASKS:
            assert torch.equal(expected[task], got[task])
    for (name, a), b in zip(plain.model.state_dict().items(), with_teacher.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_teacher_trains_as_a_model_of_its_own_and_the_student_learns_from_its_earlier_prediction() -> None:
    cfg = config(privileged_weight={"click": 0.0, "like": 0.8})
    learner, alone = Learner(cfg), Learner(teacher_config(cfg))
    for batch in batches(cfg):
        _, teacher_before = alone.step(batch)  # what the teacher predicted before it learned from the batch
        student = Learner.from_state_dict(learner.state_dict())  # the student's weights before this step
        logits = student.model(student._student_view(batch)).student_logits.detach()
        losses, _ = learner.step(batch)
        y = batch.labels
        target = torch.stack([y[:, 0], 0.2 * y[:, 1] + 0.8 * teacher_before["like"]], dim=1)
        expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=0)
        assert losses["bce/click"] == pytest.approx(float(expected[0]), abs=1e-6)  # click: its label alone
        assert losses["bce/like"] == pytest.approx(float(expected[1]), abs=1e-6)
        assert set(losses) >= {"privileged_bce/click", "privileged_bce/like"}
    # the student's loss never reaches the teacher: it ends where a teacher trained alone ends
    for (name, a), b in zip(alone.model.state_dict().items(), learner.privileged_teacher.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_teacher_learns_only_the_tasks_a_weight_mapping_names() -> None:
    tasks = ("click", "like", "follow")  # follow: an auxiliary task of the student the teacher leaves out
    cfg = config(tasks=tasks, privileged_weight="like:0.8")
    assert teacher_tasks(cfg) == ("like",) and teacher_config(cfg).tasks == ("like",)
    assert teacher_tasks(config(tasks=tasks, privileged_weight=0.5)) == tasks  # one number: every task
    learner, alone = Learner(cfg), Learner(teacher_config(cfg))
    for start in (0, 64, 128):
        labelled = [{**r, "labels": {**r["labels"], "follow": int(i % 5 == 0)}} for i, r in enumerate(rows(start))]
        batch = encode_rows(labelled, teacher_spec(cfg), tasks)
        _, teacher_before = alone.step(encode_rows(rows(start), teacher_spec(cfg), ("like",)))
        student = Learner.from_state_dict(learner.state_dict())
        logits = student.model(student._student_view(batch)).student_logits.detach()
        losses, _ = learner.step(batch)
        y = batch.labels
        target = torch.stack([y[:, 0], 0.2 * y[:, 1] + 0.8 * teacher_before["like"], y[:, 2]], dim=1)
        expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=0)
        for k, task in enumerate(tasks):  # click and follow: their labels alone
            assert losses[f"bce/{task}"] == pytest.approx(float(expected[k]), abs=1e-6), task
        assert {k for k in losses if k.startswith("privileged_bce/")} == {"privileged_bce/like"}
    for (name, a), b in zip(alone.model.state_dict().items(), learner.privileged_teacher.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_holds_the_teacher_and_training_goes_on_exactly() -> None:
    cfg = config()
    data = batches(cfg, 6)
    learner = Learner(cfg)
    for batch in data[:3]:
        learner.step(batch)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    resumed = Learner.from_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.privileged_teacher.steps == learner.privileged_teacher.steps == 3
    for batch in data[3:]:
        _, a = learner.step(batch)
        _, b = resumed.step(batch)
        for task in TASKS:
            assert torch.equal(a[task], b[task])


def test_serving_has_the_students_alone_and_predicts_without_the_privileged_columns() -> None:
    cfg = config()
    learner = Learner(cfg)
    for batch in batches(cfg, 2):
        learner.step(batch)
    tensors, _ = learner.serving_state()
    plain_keys, _ = Learner(config(privileged=())).serving_state()
    assert set(tensors) == set(plain_keys)
    full, student = batches(cfg, 1)[0], student_batches(cfg, 1)[0]
    for task in TASKS:  # a batch with the privileged columns or without: the same student prediction
        assert torch.equal(learner.predict(full)[task], learner.predict(student)[task])


def test_a_batch_without_its_privileged_columns_is_refused_with_the_reason() -> None:
    cfg = config()
    learner = Learner(cfg)
    wrong = encode_rows(rows(0), FeatureSpec(SPEC.categorical, ("duration", "play"), SPEC.hash_buckets), TASKS)
    with pytest.raises(ValueError, match="the 1 numeric features, then the 2 privileged columns"):
        learner.step(wrong)


@pytest.mark.parametrize("overrides, message", [
    (dict(privileged=("duration",)), "features too"),
    (dict(privileged=("play", "play")), "distinct"),
    (dict(privileged_weight=1.5), r"\[0, 1\]"),
    (dict(privileged_weight={"share": 0.5}), "unknown tasks"),
    (dict(privileged_weight="like=0.5"), "TASK:WEIGHT"),
])
def test_bad_settings_are_refused_naming_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_command_line_forms_of_the_options() -> None:
    cfg = config(privileged="play, stay", privileged_weight=["like:0.8", "click:0"])
    assert cfg.privileged == ("play", "stay") and cfg.privileged_weights() == [0.0, 0.8]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert config(privileged_weight="like:0.3").privileged_weights() == [0.0, 0.3]


def test_a_privileged_learner_is_not_captured_as_a_cuda_graph() -> None:
    from models.graphs import not_replayable

    learner = Learner(config())
    learner.device = torch.device("cuda")  # only the reasons are read: nothing runs on a GPU here
    assert "privileged teacher" in not_replayable(learner)


def test_a_gated_blend_waits_until_the_teacher_ranks_better_and_is_checkpointed() -> None:
    gated = config(privileged_gate=True, kd_gate_window=256, kd_gate_every=64)
    learner, plain = Learner(gated), Learner(config(privileged=()))
    full, student = batches(gated, 12), student_batches(gated, 12)
    losses, got = learner.step(full[0])
    _, expected = plain.step(student[0])
    assert losses["privileged_gate/like"] == 0.0  # closed at first: the label alone, as without a teacher
    assert torch.equal(got["like"], expected["like"])
    opened = []
    for batch in full[1:8]:
        losses, _ = learner.step(batch)
        opened.append(losses["privileged_gate/like"])
    assert 1.0 in opened  # like is the play column's: the teacher leads once it has learned that
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # (a copy: a live state_dict shares the optimizers' tensors)
    buffer.seek(0)
    resumed = Learner.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.privileged_gate.open, learner.privileged_gate.open)
    for batch in full[8:]:
        a, pa = learner.step(batch)
        b, pb = resumed.step(batch)
        assert a == b and torch.equal(pa["like"], pb["like"])


def test_a_checkpoint_from_before_the_privileged_teacher_loads() -> None:
    today = config(privileged=(), privileged_weight=ModelConfig().privileged_weight)  # the defaults
    state = Learner(today).state_dict()
    for key in ("privileged", "privileged_weight", "privileged_gate"):
        state["config"].pop(key)  # what a checkpoint written before these options holds
    assert Learner.from_state_dict(state).privileged_teacher is None
    Learner(today).load_state_dict(state)  # a trainer of today restoring it


def test_bce_weight_scales_each_task_s_own_loss_in_the_total() -> None:
    tasks = ("click", "like", "follow")
    cfg = config(tasks=tasks, privileged=(), bce_weight="follow:0.0,like:0.5")
    assert cfg.task_weights("bce_weight") == [1.0, 0.5, 0.0]
    learner = Learner(cfg)
    tower = {k: v.clone() for k, v in learner.model.state_dict().items() if k.startswith("student_towers.2.")}
    labelled = [{**r, "labels": {**r["labels"], "follow": int(i % 5 == 0)}} for i, r in enumerate(rows(0))]
    losses, _ = learner.step(encode_rows(labelled, SPEC, tasks))
    assert losses["total"] == pytest.approx(losses["bce/click"] + 0.5 * losses["bce/like"], rel=1e-5)
    assert tower and all(torch.equal(v, learner.model.state_dict()[k]) for k, v in tower.items())  # no gradient
    with pytest.raises(ValueError, match="bce_weight must be >= 0"):
        config(bce_weight=-1.0)
    with pytest.raises(ValueError, match=r"bce_weight names unknown tasks \['share'\]"):
        config(bce_weight={"share": 0.5})
