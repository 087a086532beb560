"""``ModelConfig.counted_tasks``: auxiliary outcomes that are only counted (the online counts' label rates are inputs
of the backbone), with no tower, gate or loss (docs/method.md "Auxiliary outcome tasks")."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.crossdistil import CrossDistilModel
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel
from models.privileged import teacher_config
from models.zoo import learner_config
from tests.gpu_steps import train_without_host_sync

pytestmark = pytest.mark.unit

TASKS = ("click", "follow", "like", "comment")
SMALL = dict(embedding_dim=4, hidden_dims=(8,), tower_dims=(4,), features=FeatureSpec(hash_buckets=2**10))
COUNTED = dict(aux_tasks=("follow", "comment"), counted_tasks=("follow", "comment"))


def rows(n: int, shift: int = 0) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i % 9}", "features": {},
             "labels": {t: (i * (k + 2) + shift * (t in ("follow", "comment"))) % 3 == 0 for k, t in enumerate(TASKS)}}
            for i in range(n)]


def test_counted_tasks_are_auxiliary_and_need_the_counts() -> None:
    cfg = ModelConfig(tasks=TASKS, aux_tasks="follow,comment", counted_tasks="comment")  # command-line strings
    assert cfg.learnt_tasks == ("click", "follow", "like") and cfg.served_tasks == ("click", "like")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="counted_tasks must name distinct tasks of aux_tasks"):
        ModelConfig(tasks=TASKS, counted_tasks=("follow",))  # a counted task is never served: auxiliary too
    with pytest.raises(ValueError, match="they need count_features"):
        ModelConfig(tasks=TASKS, count_features=(), **COUNTED)
    with pytest.raises(ValueError, match="a counted task has no tower"):
        ModelConfig(tasks=TASKS, rung="crossdistil", partners={"click": "follow"}, **COUNTED)
    with pytest.raises(ValueError, match="needs at least two learnt tasks"):
        ModelConfig(tasks=("click", "follow"), aux_tasks=("follow",), counted_tasks=("follow",), rung="aux")


def test_default_partners_are_learnt_tasks() -> None:
    cfg = ModelConfig(tasks=TASKS, rung="crossdistil", **COUNTED)
    assert cfg.partner_of("click") == "like" and cfg.partner_of("like") == "click"
    one = ModelConfig(tasks=TASKS, rung="crossdistil", aux_tasks=("follow", "comment"), counted_tasks=("comment",))
    assert one.partner_of("follow") == "like"  # the only learnt auxiliary task: the next learnt task


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "ple", "cross_stitch"])
def test_a_counted_task_has_no_tower_or_gate_only_wider_counts(backbone: str) -> None:
    """The parameters are those of a model of the learnt tasks alone, but for the inputs the counts add."""
    counted = CrossDistilModel(ModelConfig(tasks=TASKS, backbone=backbone, **COUNTED, **SMALL))
    learnt = CrossDistilModel(ModelConfig(tasks=("click", "like"), backbone=backbone, **SMALL))
    assert len(counted.student_towers) == 2
    assert counted.counts.width == learnt.counts.width + 2 * len(counted.counts.fields)  # a rate per field and task
    shapes = {name: p.shape for name, p in counted.named_parameters()}
    plain = {name: p.shape for name, p in learnt.named_parameters()}
    assert shapes.keys() == plain.keys()
    wider = [n for n in shapes if shapes[n] != plain[n]]  # the first layers, which read the inputs
    assert wider and all(n.startswith("backbone.") for n in wider)
    extra = counted.counts.width - learnt.counts.width
    assert all(shapes[n][1] == plain[n][1] + extra and shapes[n][0] == plain[n][0] for n in wider)


@pytest.mark.parametrize("rung", ["mtl", "crossdistil", "direct_kd"])
def test_a_counted_task_reports_and_predicts_nothing_but_is_counted(rung: str) -> None:
    learner = Learner(ModelConfig(tasks=TASKS, rung=rung, **COUNTED, **SMALL))
    batch = encode_rows(rows(64), learner.config.features, TASKS)
    losses, predictions = learner.step(batch)
    assert set(predictions) == {"click", "like"}
    assert not [name for name in losses if name.endswith(("/follow", "/comment"))]
    assert set(learner.predict(batch)) == {"click", "like"}
    table = learner.model.counts.totals  # the stream's count, then one label sum per task
    assert table.tolist() == [64.0] + batch.labels.sum(0).double().tolist()


def test_counted_labels_reach_the_students_only_through_the_counts() -> None:
    """Two streams that differ only in the counted outcomes: the same first step (no loss reads them), different
    predictions once they have been counted."""
    runs, labels = [], []
    for shift in (0, 1):
        torch.manual_seed(0)
        learner = Learner(ModelConfig(tasks=TASKS, **COUNTED, **SMALL))
        batches = [encode_rows(rows(96, shift)[i:i + 32], learner.config.features, TASKS) for i in range(0, 96, 32)]
        labels.append(torch.cat([b.labels for b in batches]))
        runs.append([learner.step(b) for b in batches])
    assert torch.equal(labels[0][:, [0, 2]], labels[1][:, [0, 2]])
    assert not torch.equal(labels[0][:, [1, 3]], labels[1][:, [1, 3]])
    (first, p0), (again, p1) = runs[0][0], runs[1][0]
    assert first == again and all(torch.equal(p0[t], p1[t]) for t in p0)
    assert not torch.equal(runs[0][1][1]["click"], runs[1][1][1]["click"])


def test_a_counted_tasks_logit_stays_zero_through_training() -> None:
    """No tower, and its wide weights never move (its BCE weighs 0): nothing of the model learns a counted task."""
    torch.manual_seed(0)
    learner = Learner(ModelConfig(tasks=TASKS, **COUNTED, **SMALL))
    for i in range(0, 96, 32):
        learner.step(encode_rows(rows(96)[i:i + 32], learner.config.features, TASKS))
    outputs = learner.model(encode_rows(rows(32), learner.config.features, TASKS))
    assert torch.equal(outputs.student_logits[:, [1, 3]], torch.zeros(32, 2))
    assert outputs.student_logits[:, [0, 2]].abs().sum() > 0


def test_the_serving_model_scores_the_served_tasks_with_the_counts_of_all() -> None:
    learner = Learner(ModelConfig(tasks=TASKS, rung="crossdistil", **COUNTED, **SMALL))
    for i in range(0, 96, 32):
        learner.step(encode_rows(rows(96)[i:i + 32], learner.config.features, TASKS))
    serving = ServingModel.from_serving_state(*learner.serving_state())
    scored = serving.score_rows(rows(5))
    assert list(scored) == ["click", "like"]
    every = learner.predict(encode_rows(rows(5), learner.config.features, TASKS))
    for task in scored:  # equal bits on earlier machines, one float32 ulp apart on an AVX2 one (the CPU picks kernels)
        torch.testing.assert_close(scored[task], every[task], rtol=0, atol=1e-6)
    restored = Learner.from_state_dict(learner.state_dict())
    assert restored.config == learner.config
    assert torch.equal(restored.model.counts.table, learner.model.counts.table)


def test_a_privileged_teacher_and_a_peer_leave_counted_tasks_out() -> None:
    cfg = ModelConfig(tasks=TASKS, privileged=("play_ms",), **COUNTED)
    assert teacher_config(cfg).tasks == ("click", "like") and teacher_config(cfg).counted_tasks == ()
    with pytest.raises(ValueError, match="counted_tasks: the vw peer learns each task alone"):
        learner_config(TASKS, {"rung": "vw", "counted_tasks": ["follow"]})


def test_a_checkpoint_from_before_counted_tasks_loads() -> None:
    learner = Learner(ModelConfig(tasks=TASKS, aux_tasks=("follow",), **SMALL))
    state = learner.state_dict()
    del state["config"]["counted_tasks"]  # as written before the field existed
    assert Learner.from_state_dict(state).config.learnt_tasks == TASKS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")
@pytest.mark.parametrize("rung", ["mtl", "crossdistil"])
def test_a_step_with_counted_tasks_never_waits_for_the_host_on_a_gpu(rung: str) -> None:
    """The learnt tasks' columns are made once per device (in the first steps), so the step stays free of host
    synchronisations (sync_debug_mode "error"), as without counted tasks (tests/unit/models/test_learner.py)."""
    learner = Learner(ModelConfig(tasks=TASKS, rung=rung, backbone="mmoe", **COUNTED, **SMALL), device="cuda")
    batches = [encode_rows(rows(96)[i:i + 32], learner.config.features, TASKS).to("cuda") for i in range(0, 96, 32)]
    learner.step(batches[0])
    train_without_host_sync(learner, batches[1:])
    losses, predictions = learner.step(batches[0])
    assert set(predictions) == {"click", "like"} and all(value == value for value in losses.values())
