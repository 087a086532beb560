"""[ours] The privileged teacher: a second model that reads what the student never can, and teaches it.

Some outcomes of an impression are known only after it, at training time: how long the video played, whether the
user opened the author's profile, how long they stayed there. They cannot be inputs of the served model (they do
not exist when it scores), but they say much about the rarer outcomes (a like follows a long play far more often
than a short one). Privileged features distillation (Xu et al., "Privileged Features Distillation at Taobao
Recommendations", KDD 2020) lets a teacher that also reads them pass that knowledge on: the teacher is the same
model with the ``privileged`` columns as more numeric inputs, trained beside the student on the same batches with
its own BCE, and the student's BCE target for task k becomes

    (1 - lambda_k) * y_k + lambda_k * p_k(teacher),

the teacher's probability taken before it learns from the batch (what a stream would have: the teacher never saw
these labels). A teacher ahead of its student gives a target that is the student's own label with part of its
noise averaged out; the student's expected target is unchanged where the teacher is calibrated. Nothing else of the
student changes: its counts, gates and pair sampling read the labels, its serving is the students alone. With
``privileged_gate`` the blend of task k waits until the teacher's windowed prequential AUC beats the student's (the
trust gate's rule, ``models.trust_gate``): lambda_k counts only while it does.

Batches for such a learner carry the privileged columns after the student's numeric features (``teacher_spec``: the
data set is encoded with the teacher's spec and the student reads the first columns). docs/method.md ("A teacher
that knows more") and reports/kuairand_pure/README.md (§2d, §3c) say what it buys: on KuaiRand-Pure a small gain,
short of issue 13's bars.
"""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig
from models.features import FeatureSpec


def teacher_spec(config: ModelConfig) -> FeatureSpec:
    """The features of the teacher, and of the batches a learner with a privileged teacher takes: the student's,
    then the privileged columns as numeric inputs.

    >>> spec = teacher_spec(ModelConfig(features=FeatureSpec(numeric=("duration_ms",)), privileged=("play_ms",)))
    >>> spec.numeric
    ('duration_ms', 'play_ms')
    """
    spec = config.features
    return FeatureSpec(categorical=spec.categorical, numeric=spec.numeric + config.privileged,
                       hash_buckets=spec.hash_buckets)


def teacher_tasks(config: ModelConfig) -> tuple[str, ...]:
    """The tasks the privileged teacher learns, in the student's order: those a ``privileged_weight`` mapping names
    (a weight of 0 learns without teaching), every task for one number. A student's other tasks (auxiliary
    outcomes, say) stay out of the teacher: on KuaiRand-Pure a teacher that also learnt the six auxiliary tasks of
    ``evaluate --aux-tasks`` taught like worse (reports/kuairand_pure/README.md, §2e).

    >>> teacher_tasks(ModelConfig(tasks=("finish", "like", "follow"), privileged_weight="finish:0.3,like:0.8"))
    ('finish', 'like')
    """
    weights = config.privileged_weight
    tasks = config.learnt_tasks  # a counted task has no tower to teach
    return tuple(t for t in tasks if t in weights) if isinstance(weights, dict) else tasks


def teacher_config(config: ModelConfig) -> ModelConfig:
    """The privileged teacher's model: the student's options (backbone, sizes, wide part, counts, seed), the
    plain multi-task rung (its own BCE per task, no teachers of its own), the privileged columns as inputs, the
    tasks of ``teacher_tasks`` (none of them auxiliary: the teacher is never served)."""
    tasks = teacher_tasks(config)
    weights = {name: {t: w for t, w in value.items() if t in tasks} if isinstance(value, dict) else value
               for name in ("bce_weight", "kd_weight", "aux_weight", "privileged_weight")
               for value in [getattr(config, name)]}  # a mapping keeps the teacher's tasks
    return dataclasses.replace(config, rung="mtl", features=teacher_spec(config), privileged=(),
                               privileged_gate=False, tasks=tasks, partners={}, aux_tasks=(),
                               counted_tasks=(), **weights)
