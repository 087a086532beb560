"""``ModelConfig.aux_tasks``: tasks learnt beside the others, never served (docs/method.md "Auxiliary outcome
tasks")."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel
from models.privileged import teacher_config
from models.zoo import learner_config

pytestmark = pytest.mark.unit

TASKS = ("click", "follow", "like", "comment")
SMALL = dict(embedding_dim=4, hidden_dims=(8,), tower_dims=(4,), features=FeatureSpec(hash_buckets=2**10))


def test_served_tasks_keep_task_order_and_the_config_round_trips() -> None:
    cfg = ModelConfig(tasks=TASKS, aux_tasks="comment, follow")  # a command line's string
    assert cfg.aux_tasks == ("comment", "follow") and cfg.served_tasks == ("click", "like")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(tasks=TASKS).served_tasks == TASKS  # none by default


def test_bad_aux_tasks_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="aux_tasks must name distinct tasks"):
        ModelConfig(tasks=TASKS, aux_tasks=("share",))
    with pytest.raises(ValueError, match="aux_tasks must name distinct tasks"):
        ModelConfig(tasks=TASKS, aux_tasks=("follow", "follow"))
    with pytest.raises(ValueError, match="leave no task to serve"):
        ModelConfig(tasks=("click", "follow"), aux_tasks=("click", "follow"))


def test_default_partners_stay_among_served_tasks_and_among_auxiliary_ones() -> None:
    plain = ModelConfig(tasks=TASKS, rung="crossdistil")
    assert [plain.partner_of(t) for t in TASKS] == ["follow", "like", "comment", "click"]  # as before: cyclic
    cfg = ModelConfig(tasks=TASKS, aux_tasks=("follow", "comment"), rung="crossdistil")
    assert {t: cfg.partner_of(t) for t in TASKS} == {"click": "like", "like": "click",
                                                     "follow": "comment", "comment": "follow"}
    one = ModelConfig(tasks=("click", "follow", "comment"), aux_tasks=("follow", "comment"), rung="crossdistil")
    assert one.partner_of("click") == "follow"  # a kind with one task: the next of all tasks
    explicit = ModelConfig(tasks=TASKS, aux_tasks=("follow",), partners={"click": "follow"}, rung="crossdistil")
    assert explicit.partner_of("click") == "follow"


def test_auxiliary_tasks_train_but_the_serving_model_scores_only_the_served_ones() -> None:
    rows = [{"user_id": f"u{i % 7}", "item_id": f"i{i % 11}", "features": {},
             "labels": {t: (i * (k + 3)) % 5 == 0 for k, t in enumerate(TASKS)}} for i in range(64)]
    learner = Learner(ModelConfig(tasks=TASKS, aux_tasks=("follow", "comment"), rung="crossdistil", **SMALL))
    _, predictions = learner.step(encode_rows(rows, learner.config.features, TASKS))
    assert set(predictions) == set(TASKS)  # the learner's own predictions: every task it learns
    serving = ServingModel.from_serving_state(*learner.serving_state())
    scored = serving.score_rows(rows[:5])
    assert list(scored) == ["click", "like"]
    assert serving.model.served == [0, 2]  # the auxiliary towers are kept, not run
    every = learner.predict(encode_rows(rows[:5], learner.config.features, TASKS))  # the training model's, all
    for task in ("click", "like"):  # equal bits on earlier machines, one float32 ulp apart on this AVX2 one
        torch.testing.assert_close(scored[task], every[task], rtol=0, atol=1e-6)  # (the CPU picks the kernels)


def test_a_privileged_teacher_of_some_tasks_has_no_auxiliary_ones() -> None:
    cfg = ModelConfig(tasks=TASKS, aux_tasks=("follow", "comment"), privileged=("play_ms",),
                      privileged_weight={"like": 0.8})
    assert teacher_config(cfg).tasks == ("like",) and teacher_config(cfg).aux_tasks == ()


def test_a_peer_refuses_aux_tasks_saying_why() -> None:
    with pytest.raises(ValueError, match="aux_tasks: the river_lr peer learns each task alone"):
        learner_config(TASKS, {"rung": "river_lr", "aux_tasks": ["follow"]})


def test_aux_tasks_change_no_step_of_the_plain_multi_task_model() -> None:
    """For ``mtl`` (no partners) ``aux_tasks`` only says what is served: the same losses, step for step."""
    rows = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 9}", "features": {},
             "labels": {t: (i * (k + 2)) % 3 == 0 for k, t in enumerate(TASKS)}} for i in range(96)]
    runs = []
    for aux in ((), ("follow", "comment")):
        torch.manual_seed(0)
        learner = Learner(ModelConfig(tasks=TASKS, aux_tasks=aux, **SMALL))
        runs.append([learner.step(encode_rows(rows[i:i + 32], learner.config.features, TASKS))[0]
                     for i in range(0, 96, 32)])
    assert runs[0] == runs[1]



def test_a_checkpoint_from_before_aux_tasks_loads_and_serves_every_task() -> None:
    learner = Learner(ModelConfig(tasks=TASKS, **SMALL))
    state = learner.state_dict()
    del state["config"]["aux_tasks"]  # as written before the field existed
    restored = Learner.from_state_dict(state)
    assert restored.config.served_tasks == TASKS
    learner.load_state_dict(state)  # the same config: no difference named


def test_partners_from_a_command_line_may_name_auxiliary_tasks() -> None:
    cfg = ModelConfig(tasks=TASKS, aux_tasks=("follow", "comment"), rung="crossdistil",
                      partners=["like:follow", "click:comment"])  # as --model-option partners=like:follow,... gives it
    assert cfg.partner_of("like") == "follow" and cfg.partner_of("click") == "comment"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="expected TASK:PARTNER items such as like:follow"):
        ModelConfig(tasks=TASKS, partners="like")


def test_every_per_task_weight_reads_a_command_lines_items() -> None:
    """--model-option kd_weight=follow:0,comment:0 (a list of TASK:WEIGHT) is a mapping, as bce_weight's is."""
    cfg = ModelConfig(tasks=TASKS, rung="crossdistil", kd_weight=["follow:0", "comment:0"], aux_weight="like:0.5",
                      bce_weight=["follow:0.2"])
    assert cfg.task_weights("kd_weight") == [1.0, 0.0, 1.0, 0.0] and cfg.task_weights("aux_weight")[2] == 0.5
    assert cfg.task_weights("bce_weight") == [1.0, 0.2, 1.0, 1.0]
