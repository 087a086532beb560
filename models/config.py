"""Model configuration: plain values, one dataclass, round-trips through a dict of plain types.

Every switch of the ablation ladder (docs/method.md) is one field here (``rung``); every weight of the
total loss (alpha_k, beta_k) is a field, per task or shared.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.counts import CROSS_PRIORS, DEFAULT_COUNT_FEATURES
from models.features import FeatureSpec
from models.wide import DEFAULT_WIDE_CROSSES, parse_cross

BACKBONES = ("shared_bottom", "mmoe", "ple", "cross_stitch")
# The ablation ladder of docs/method.md, plus direct student-to-student distillation.
RUNGS = ("mtl", "aux", "kd", "cal", "crossdistil", "direct_kd")
CORRECTIONS = ("clamp", "mix", "none")
PAIR_MODES = ("adjacent", "all")
KD_GATES = ("none", "trust")
WIDE_OPTIMIZERS = ("none", "adagrad", "ftrl")

# Named option sets of a rung, written ``RUNG@PRESET`` (``crossdistil evaluate --configs crossdistil@trust``).
# Each preset sets every option on which the presets differ, so a name means the same whatever the defaults are.
PRESETS: dict[str, dict[str, Any]] = {
    # docs/method.md as the paper has it: teachers on the ranking loss alone, pushing the shared backbone.
    "paper": {"teacher_task_weight": 0.0, "teacher_backbone_grad": 1.0, "teacher_partner_input": False,
              "teacher_residual": False, "quadruplet_partner_weight": 1.0, "calibrator_lr": 0.0,
              "kd_warmup_samples": 0, "kd_gate": "none"},
    # [ours] teachers refine the task (BCE + L_aux) on a stopped backbone; distil only while a teacher ranks better.
    "trust": {"teacher_task_weight": 1.0, "teacher_backbone_grad": 0.0, "teacher_partner_input": False,
              "teacher_residual": False, "quadruplet_partner_weight": 1.0, "calibrator_lr": 0.0,
              "kd_warmup_samples": 0, "kd_gate": "trust"},
}


def split_config_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"crossdistil@trust"`` -> ``("crossdistil", PRESETS["trust"])``; a plain rung -> (rung, {}).

    >>> split_config_name("mtl")
    ('mtl', {})
    >>> split_config_name("crossdistil@trust")[1]["kd_gate"]
    'trust'
    """
    rung, sep, preset = name.partition("@")
    if not sep:
        return rung, {}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} in {name!r}; presets: {', '.join(PRESETS)}")
    return rung, dict(PRESETS[preset])

# The options only teachers, calibrators and distillation read: a run of rung mtl is the same whatever they are.
TEACHER_OPTIONS = frozenset({
    "partners", "kd_weight", "aux_weight", "kd_temperature", "quadruplet_pairs", "quadruplet_same_user",
    "quadruplet_margin", "max_pairs_per_level", "correction", "correction_margin", "correction_mix",
    "teacher_task_weight", "teacher_backbone_grad", "teacher_partner_input", "teacher_residual",
    "quadruplet_partner_weight", "calibrator_lr", "kd_warmup_samples", "kd_gate", "kd_gate_margin", "kd_gate_window",
    "kd_gate_every",
})

# What a saved config without a key (written before the key existed) meant: the behaviour of that time.
# Learner.load_state_dict fills these in, so an old checkpoint is compared with what actually trained it.
LEGACY_VALUES: dict[str, Any] = {
    "teacher_task_weight": 0.0, "teacher_backbone_grad": 1.0, "teacher_partner_input": False,
    "teacher_residual": False, "quadruplet_partner_weight": 1.0,
    "calibrator_lr": 0.0, "kd_warmup_samples": 0, "kd_gate": "none", "kd_gate_margin": 0.0,
    "kd_gate_window": 20000, "kd_gate_every": 2048,
    "wide": "none", "wide_lr": 0.1, "wide_crosses": [], "wide_decay": 1.0, "embedding_optimizer": "adam",
    "count_features": [], "count_smoothing": 5.0, "count_half_life": 0,
    "count_cross_smoothing": 0.0, "count_cross_prior": "stream",
    "privileged": [], "privileged_weight": 0.8, "privileged_gate": False,  # no privileged teacher
    "bce_weight": 1.0, "aux_tasks": [],  # every task served
    "counted_tasks": [],  # every task has its tower
}

# What a restart may change in a model's configuration (docs/operations.md, "Changing a running model"). Every field
# of ModelConfig is in exactly one of the two sets (tests/unit/models/test_config_resume.py fails on a field in
# neither: classify a new field when adding it).
#
# RETUNABLE: how the model learns from here on, not what it is: the checkpoint's tensors keep their shapes and
# meaning, so a restored model trains on with the configured values (Learner.load_state_dict: the optimizers' param
# groups take the configured learning rates, the losses read the configured weights). A trust gate switched on by
# ``kd_gate`` starts with an empty window (closed until its first decision); ``seed`` only initialises a new model.
RETUNABLE_OPTIONS = frozenset({
    "lr", "embedding_lr", "wide_lr", "calibrator_lr",  # learning rates (param groups)
    "bce_weight", "kd_weight", "aux_weight", "teacher_task_weight", "quadruplet_partner_weight",  # loss weights
    "privileged_weight",
    "kd_temperature", "quadruplet_pairs", "quadruplet_same_user", "quadruplet_margin", "max_pairs_per_level",
    "correction", "correction_margin", "correction_mix", "teacher_backbone_grad",  # the loss terms' form and cost
    "kd_warmup_samples", "kd_gate", "kd_gate_margin", "kd_gate_every",  # when to distil
    "bf16", "seed",  # precision of the forward pass; the initialisation of a new model
})
# STRUCTURAL: what the model is: its tensors' shapes (tasks, features, sizes, backbone, rung's towers), what its
# inputs and outputs mean (partners, served tasks, the counts' smoothing and forgetting, a residual or label-aware
# teacher) or the form of its optimizer state (embedding_optimizer, wide, wide_decay's optimizer, sparse gradients, the
# trust gate's window). A change is a new model: refused on restore; ``checkpoint.warm_start`` starts one from the old
# model's weights where they still fit (models/warm_start.py).
STRUCTURAL_OPTIONS = frozenset({
    "tasks", "partners", "aux_tasks", "counted_tasks", "backbone", "rung", "features",
    "embedding_dim", "hidden_dims", "tower_dims", "num_experts", "ple_shared_experts", "ple_specific_experts",
    "ple_levels", "teacher_partner_input", "teacher_residual", "kd_gate_window",
    "wide", "wide_crosses", "wide_decay",
    "count_features", "count_smoothing", "count_half_life", "count_cross_smoothing", "count_cross_prior",
    "privileged", "privileged_gate", "embedding_optimizer", "sparse_embeddings",
})


@dataclass
class ModelConfig:
    """Everything that defines a CrossDistil model and its training step.

    ``partners`` maps each task to its partner task j = partner(k); empty means "the other task" for K = 2
    and "the next task, cyclically" for K > 2. ``kd_weight`` is alpha_k and ``aux_weight`` beta_k: one number
    for all tasks or a mapping task -> weight. ``aux_tasks`` are tasks learnt beside the others but never served
    (docs/method.md "Auxiliary outcome tasks"): ``served_tasks`` are the rest. ``counted_tasks`` are auxiliary tasks
    that are only counted: their labels feed the online counts' rates (``count_features``), with no tower and no
    loss; ``learnt_tasks`` are the rest.

    >>> cfg = ModelConfig(tasks=("click", "long_view"), backbone="mmoe", rung="crossdistil")
    >>> cfg.partner_of("click")
    'long_view'
    >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    tasks: tuple[str, ...] = ("click", "long_view")
    partners: dict[str, str] = field(default_factory=dict)
    # tasks of ``tasks`` learnt as auxiliary outcomes: trained and checkpointed like the others, but not served,
    # not exported, not watched for drift by default and left out of a backtest's combined score; () = none
    aux_tasks: tuple[str, ...] = ()
    # tasks of ``aux_tasks`` that are only counted: each user's and item's rate of their label is an input of the
    # backbone (count_features), but they have no tower, no gate and no loss, so they cost the step almost nothing;
    # () = every task is learnt (docs/method.md "Auxiliary outcome tasks")
    counted_tasks: tuple[str, ...] = ()
    backbone: str = "shared_bottom"
    # mtl: the best measured rung (reports/kuairand_pure/README.md: no CrossDistil variant beats it); choose
    # "crossdistil" (with the trust-gate options below) or "crossdistil@paper" knowingly.
    rung: str = "mtl"
    features: FeatureSpec = field(default_factory=FeatureSpec)

    # sizes
    embedding_dim: int = 16
    hidden_dims: tuple[int, ...] = (128,)  # shared bottom, each expert, each cross-stitch column
    tower_dims: tuple[int, ...] = (64, 32)
    num_experts: int = 4  # MMoE
    ple_shared_experts: int = 2
    ple_specific_experts: int = 1
    ple_levels: int = 1

    # loss terms (names as in docs/method.md)
    bce_weight: float | dict[str, float] = 1.0  # w_k: weight of task k's own BCE, e.g. "follow:0.2" (1 for the others)
    kd_weight: float | dict[str, float] = 1.0  # alpha_k
    aux_weight: float | dict[str, float] = 1.0  # beta_k
    kd_temperature: float = 1.0  # T
    quadruplet_pairs: str = "adjacent"
    quadruplet_same_user: bool = False
    quadruplet_margin: float = 0.0
    max_pairs_per_level: int = 4096  # caps L_aux cost at O(batch)
    correction: str = "clamp"
    correction_margin: float = 0.0  # m
    correction_mix: float = 0.5  # lambda

    # making the teacher worth learning from (docs/method.md, "Beyond the paper"; all [ours])
    teacher_task_weight: float = 1.0  # gamma: teacher loss gamma * BCE(r_k, y_k) + beta_k * L_aux,k (0 = paper)
    teacher_backbone_grad: float = 0.0  # scale of the teacher towers' gradient into the backbone (1 = paper)
    teacher_partner_input: bool = False  # the teacher tower of k also reads the partner's label y_j (training only)
    teacher_residual: bool = False  # r_k = stopgrad(s_k) + tower_k: the teacher refines its student's score
    quadruplet_partner_weight: float = 1.0  # weight of level pairs decided by the partner's label only
    calibrator_lr: float = 0.0  # Adam learning rate of the Platt calibrators (0 = lr)
    kd_warmup_samples: int = 0  # alpha_k ramps linearly from 0 over this many training samples
    kd_gate: str = "trust"  # distil task k only while its teacher's recent AUC beats its student's ("none" = paper)
    kd_gate_margin: float = 0.0  # the teacher must lead by more than this AUC
    kd_gate_window: int = 20000  # samples in the prequential AUC window of teacher and student
    kd_gate_every: int = 2048  # re-decide the gate after this many samples

    # the wide (linear) part beside the towers (models/wide.py; docs/method.md "The wide part")
    wide: str = "adagrad"  # its optimizer ("adagrad" or "ftrl"); "none" = no wide part (the deep model alone)
    wide_lr: float = 0.05  # AdaGrad step of the wide weights (chosen on the validation slice of kuairand_pure)
    # "field*field" crosses; those of absent fields are skipped (with a warning unless of the default)
    wide_crosses: tuple[str, ...] = DEFAULT_WIDE_CROSSES
    wide_decay: float = 1.0  # the wide optimizer's sums of squared gradients forget by this factor per step (1 = never)

    # online counts and label rates per value of these fields, inputs of the deep part (models/counts.py)
    # categorical fields or crosses of two ("user_id*tab"); absent ones are skipped (with a warning unless of the
    # default); () = none
    count_features: tuple[str, ...] = DEFAULT_COUNT_FEATURES
    count_smoothing: float = 5.0  # a: a value seen n times reads (positives + a * prior) / (n + a)
    count_half_life: int = 0  # the counts forget half of themselves every this many rows (0 = never)
    count_cross_smoothing: float = 0.0  # a of the crosses' cells (0 = count_smoothing)
    # a cross's rate smoothed towards, and read as its difference from, the stream's rate ("stream") or its first
    # counted field's ("field": the user's rate for "user_id*tab")
    count_cross_prior: str = "stream"

    # [ours] a privileged teacher (models/privileged.py; docs/method.md "A teacher that knows more"): a second model
    # that also reads these numeric outcomes, known only after the impression (dwell times, profile visits), trains
    # beside the student; the student's BCE target becomes (1 - lambda_k) * y_k + lambda_k * the teacher's prediction.
    # Serving never sees them. () = none.
    privileged: tuple[str, ...] = ()
    privileged_weight: float | dict[str, float] = 0.8  # lambda_k: one number, or task -> weight (0 else); chosen on
    # the validation slice of kuairand_pure (reports/kuairand_pure/README.md §2d)
    # blend task k only while the teacher's windowed prequential AUC beats the student's (the trust gate's rule, with
    # kd_gate_window, kd_gate_every and kd_gate_margin); False = from the first batch
    privileged_gate: bool = False

    # optimisation
    lr: float = 1e-3
    # the embedding table: per-row AdaGrad at 0.05 (chosen on the validation slice of kuairand_pure, issue 18);
    # "adam" = SparseAdam (Adam when not sparse), the earlier default, at 0.01 then
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.05
    sparse_embeddings: bool = True  # sparse gradients: only touched rows move; False = dense (benchmark baseline)
    seed: int = 0
    bf16: bool = False  # bf16 autocast of the forward pass (CUDA, or a CPU with bf16 matrix units)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.partners = _partner_items(self.partners)
        # names and sizes as given, or as a command line writes them: "user_id, item_id", "64,32", a lone 64
        for name in ("aux_tasks", "counted_tasks", "wide_crosses", "count_features", "privileged"):
            setattr(self, name, _names(getattr(self, name), name))
        for name in ("hidden_dims", "tower_dims"):
            setattr(self, name, _dims(getattr(self, name), name))
        for name in ("bce_weight", "kd_weight", "aux_weight", "privileged_weight"):  # "like:0.8,finish:0" too
            setattr(self, name, _task_weight_items(getattr(self, name), name))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                setattr(self, f.name, whole_number(value, f.name))
            elif f.type == "bool" and type(value) is int and value in (0, 1):  # a command line's bf16=1
                setattr(self, f.name, bool(value))
        if isinstance(self.features, Mapping):
            self.features = from_known_fields(FeatureSpec, self.features, "features")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration is not usable."""
        if (len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks)
                or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ValueError(f"tasks must be distinct and non-empty names, got {self.tasks!r}")
        self._validate_types()
        self._validate_sizes()
        if set(self.aux_tasks) - set(self.tasks) or len(set(self.aux_tasks)) != len(self.aux_tasks):
            raise ValueError(f"aux_tasks must name distinct tasks of {self.tasks}, got {self.aux_tasks!r}")
        if not self.served_tasks:
            raise ValueError(f"aux_tasks {self.aux_tasks!r} leave no task to serve: at least one task must not be "
                             "auxiliary")
        self._validate_counted()
        _choice("backbone", self.backbone, BACKBONES)
        _choice("rung", self.rung, RUNGS)
        _choice("correction", self.correction, CORRECTIONS)
        _choice("quadruplet_pairs", self.quadruplet_pairs, PAIR_MODES)
        if self.uses_partner and len(self.learnt_tasks) < 2:
            raise ValueError(f"rung {self.rung!r} needs at least two learnt tasks (a partner per task); use rung='mtl'")
        for task, partner in self.partners.items():
            if task not in self.learnt_tasks or partner not in self.learnt_tasks or task == partner:
                raise ValueError(f"partners: {task!r} -> {partner!r} must map a task to another learnt task of "
                                 f"{self.learnt_tasks} (a counted task has no tower)")
        for name in ("bce_weight", "kd_weight", "aux_weight", "privileged_weight"):
            value = getattr(self, name)
            if isinstance(value, dict) and set(value) - set(self.tasks):
                raise ValueError(f"{name} names unknown tasks {sorted(set(value) - set(self.tasks))}")
            if not all(math.isfinite(w) for w in self.task_weights(name)):
                raise ValueError(f"{name} must be finite for every task, got {value!r}")
        for name in ("kd_weight", "aux_weight"):  # a negative alpha_k or beta_k would train away from the teacher
            if any(w < 0.0 for w in self.task_weights(name)):
                raise ValueError(f"{name} must be >= 0 for every task, got {getattr(self, name)!r}")
        if self.kd_temperature <= 0:
            raise ValueError("kd_temperature must be > 0")
        if self.correction_margin < 0 or not 0.0 <= self.correction_mix <= 1.0:
            raise ValueError("correction_margin must be >= 0 and correction_mix in [0, 1]")
        if self.quadruplet_margin < 0:
            raise ValueError(f"quadruplet_margin must be >= 0, got {self.quadruplet_margin}")
        if self.max_pairs_per_level < 1:
            raise ValueError("max_pairs_per_level must be >= 1")
        _choice("kd_gate", self.kd_gate, KD_GATES)
        for name in ("teacher_task_weight", "teacher_backbone_grad", "quadruplet_partner_weight", "calibrator_lr",
                     "kd_gate_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_warmup_samples < 0:
            raise ValueError("kd_warmup_samples must be >= 0")
        if self.kd_gate_window < 2 or self.kd_gate_every < 1:
            raise ValueError("kd_gate_window must be >= 2 and kd_gate_every >= 1")
        _choice("wide", self.wide, WIDE_OPTIMIZERS)
        _choice("embedding_optimizer", self.embedding_optimizer, ("adam", "adagrad"))
        for name in ("lr", "embedding_lr", "wide_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a learning rate > 0, got {getattr(self, name)}")
        if not 0.0 < self.wide_decay <= 1.0:
            raise ValueError(f"wide_decay must be in (0, 1], got {self.wide_decay}")
        for cross in self.wide_crosses:
            parse_cross(cross)
        for cross in (f for f in self.count_features if "*" in f):
            parse_cross(cross, "count_features")
        if len(set(self.privileged)) != len(self.privileged) or not all(self.privileged):
            raise ValueError(f"privileged must name distinct columns, got {self.privileged!r}")
        both = set(self.privileged) & set(self.features.categorical + self.features.numeric)
        if both:
            raise ValueError(f"privileged columns {sorted(both)} are features too: an outcome known only after the "
                             "impression cannot be an input of the served model")
        if any(w < 0.0 for w in self.task_weights("bce_weight")):
            raise ValueError(f"bce_weight must be >= 0 for every task, got {self.bce_weight!r}")
        if any(not 0.0 <= w <= 1.0 for w in self.privileged_weights()):
            raise ValueError(f"privileged_weight must be in [0, 1] for every task, got {self.privileged_weight!r}")
        if self.count_smoothing <= 0 or self.count_half_life < 0 or self.count_cross_smoothing < 0:
            raise ValueError(f"count_smoothing must be > 0, count_half_life and count_cross_smoothing >= 0, got "
                             f"{self.count_smoothing}, {self.count_half_life}, {self.count_cross_smoothing}")
        if self.count_cross_prior not in CROSS_PRIORS:
            raise ValueError(f"count_cross_prior must be one of {CROSS_PRIORS}, got {self.count_cross_prior!r}")

    def _validate_types(self) -> None:
        """Every plain field of the type it is declared with (a string for a size or a learning rate would reach
        torch, which fails later or trains nothing), every number finite."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name} must be a whole number, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if not isinstance(self.features, FeatureSpec):
            raise ValueError(f"features must be a FeatureSpec or a mapping of its fields, got {self.features!r}")

    def _validate_sizes(self) -> None:
        """Layer widths and counts of experts and levels: each at least one (torch takes 0 and fails at the first
        batch); PLE may do without shared or without task-specific experts, not without both."""
        if not self.hidden_dims:
            raise ValueError("hidden_dims must name at least one layer width, e.g. 128 or 256,128")
        for name in ("hidden_dims", "tower_dims"):
            if not all(d >= 1 for d in getattr(self, name)):
                raise ValueError(f"{name} must be layer widths >= 1, got {list(getattr(self, name))}")
        for name in ("embedding_dim", "num_experts", "ple_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.ple_shared_experts, self.ple_specific_experts) < 0 or (
                self.ple_shared_experts + self.ple_specific_experts < 1):
            raise ValueError(f"ple_shared_experts and ple_specific_experts must be >= 0 with at least one expert in "
                             f"all, got {self.ple_shared_experts} and {self.ple_specific_experts}")

    def _validate_counted(self) -> None:
        if set(self.counted_tasks) - set(self.aux_tasks) or len(set(self.counted_tasks)) != len(self.counted_tasks):
            raise ValueError(f"counted_tasks must name distinct tasks of aux_tasks {self.aux_tasks} (a counted task "
                             f"is never served: list it in aux_tasks too), got {self.counted_tasks!r}")
        if self.counted_tasks and not self.count_features:
            raise ValueError(f"counted_tasks {self.counted_tasks!r} reach the model only through the online counts' "
                             "rates: they need count_features")

    # --- derived switches: one place that says what each rung turns on ---
    @property
    def uses_partner(self) -> bool:
        return self.rung != "mtl"

    @property
    def has_teachers(self) -> bool:
        """Auxiliary (teacher) towers with the quadruplet loss."""
        return self.rung in ("aux", "kd", "cal", "crossdistil")

    @property
    def distills(self) -> bool:
        return self.rung in ("kd", "cal", "crossdistil", "direct_kd")

    @property
    def calibrates(self) -> bool:
        return self.rung in ("cal", "crossdistil")

    @property
    def gated(self) -> bool:
        """Trust-gated distillation from the teachers (needs teachers and a distilling rung)."""
        return self.kd_gate == "trust" and self.has_teachers and self.distills

    @property
    def correction_mode(self) -> str:
        """Error correction applies only on the full rung; lower rungs distill the raw teacher."""
        return self.correction if self.rung == "crossdistil" else "none"

    @property
    def served_tasks(self) -> tuple[str, ...]:
        """The tasks a published model scores, in task order: all but ``aux_tasks``."""
        return tuple(t for t in self.tasks if t not in self.aux_tasks)

    @property
    def learnt_tasks(self) -> tuple[str, ...]:
        """The tasks with a tower and a loss, in task order: all but ``counted_tasks``."""
        return tuple(t for t in self.tasks if t not in self.counted_tasks)

    def partner_of(self, task: str) -> str:
        """``partners[task]``, else the next task cyclically among its own kind (served, learnt auxiliary or
        counted), so a served task learns its partner order from another served one; a kind with one task takes the
        next of the learnt tasks (a counted task's partner is never used: it has no tower)."""
        if task in self.partners:
            return self.partners[task]
        if task in self.counted_tasks:
            kind = self.counted_tasks
        else:
            kind = tuple(t for t in self.learnt_tasks if t in self.aux_tasks) if task in self.aux_tasks \
                else self.served_tasks
        group = kind if len(kind) > 1 else self.learnt_tasks if task in self.learnt_tasks else self.tasks
        i = group.index(task)
        return group[(i + 1) % len(group)]

    def task_weights(self, name: str, missing: float = 1.0) -> list[float]:
        """w_k (``bce_weight``), alpha_k (``kd_weight``), beta_k (``aux_weight``) or lambda_k (``privileged_weight``)
        as a list in task order; a task that a mapping leaves out gets ``missing``."""
        value = getattr(self, name)
        if isinstance(value, dict):
            return [float(value.get(t, missing)) for t in self.tasks]
        return [float(value)] * len(self.tasks)

    def privileged_weights(self) -> list[float]:
        """lambda_k of the privileged teacher in task order (a task a mapping leaves out: 0, its own label alone)."""
        return self.task_weights("privileged_weight", missing=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, dicts, str, numbers), for checkpoints and serving metadata."""
        out = asdict(self)
        out["features"] = self.features.to_dict()
        for key in ("tasks", "aux_tasks", "counted_tasks", "hidden_dims", "tower_dims", "wide_crosses",
                    "count_features", "privileged"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_known_fields(cls, data, "model")


def whole_number(value: Any, option: str) -> int:
    """``value`` as an int: an integer, or a float without a fraction (TOML's ``8.0``, a command line's ``1e5``);
    anything else is a ValueError naming ``option``.

    >>> whole_number(8, "embedding_dim"), whole_number(1e5, "kd_warmup_samples")
    (8, 100000)
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{option} must be a whole number, got {value!r}")
    return int(value)


def _names(value: str | Sequence[str], option: str) -> tuple[str, ...]:
    """Names (of columns, tasks or crosses) as a tuple; a command line's ``"user_id, item_id"`` split at its commas;
    ``option`` names the setting in the error.

    >>> _names("play_time_ms, is_follow", "privileged"), _names(["user_id"], "count_features")
    (('play_time_ms', 'is_follow'), ('user_id',))
    """
    if isinstance(value, str):
        return tuple(f.strip() for f in value.split(",") if f.strip())
    if not isinstance(value, Sequence) or not all(isinstance(f, str) for f in value):
        raise ValueError(f"{option} must be a list of names or a comma-separated string of them, got {value!r}")
    return tuple(value)


def _dims(value: int | str | Sequence[int], option: str) -> tuple[int, ...]:
    """Layer widths as a tuple: a list, one width alone, or a command line's ``"64,32"``; ``option`` names the
    setting in the error (whether each width is >= 1 is ``ModelConfig.validate``'s to say).

    >>> _dims(64, "hidden_dims"), _dims("64, 32", "tower_dims"), _dims([8.0], "tower_dims")
    ((64,), (64, 32), (8,))
    """
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    elif not isinstance(value, Sequence):
        value = [value]
    try:
        return tuple(whole_number(int(item) if isinstance(item, str) else item, option) for item in value)
    except ValueError:
        raise ValueError(f"{option} must be whole layer widths such as 64 or 64,32, got {value!r}") from None


def _task_weight_items(value: Any, option: str) -> float | dict[str, float]:
    """A per-task weight as given: a number, a mapping, or a command line's ``"like:0.8,finish:0"`` (a string, or
    the list ``--model-option`` makes of it) as a mapping; ``option`` names the setting in the error.

    >>> _task_weight_items(["like:0.8", "finish:0"], "kd_weight"), _task_weight_items(0.3, "kd_weight")
    ({'like': 0.8, 'finish': 0.0}, 0.3)
    """
    expected = f"{option}: expected a number or TASK:WEIGHT items such as like:0.8, got {value!r}"
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        pairs = [str(item).partition(":") for item in value]
        if not all(sep and task.strip() for task, sep, _ in pairs):
            raise ValueError(expected)
        value = {task.strip(): weight for task, _, weight in pairs}
    try:
        if isinstance(value, Mapping):
            return {str(k): _weight(v) for k, v in value.items()}
        return _weight(value)
    except (TypeError, ValueError):
        raise ValueError(expected) from None


def _weight(value: Any) -> float:
    """One weight as a float: a number, or a number written as text; not a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _partner_items(value: Any) -> dict[str, str]:
    """``partners`` as given: a mapping, or a command line's ``"like:follow,finish:long_view"`` (a string, or the list
    ``--model-option`` makes of it).

    >>> _partner_items("like:follow, finish:long_view"), _partner_items({"click": "like"})
    ({'like': 'follow', 'finish': 'long_view'}, {'click': 'like'})
    """
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        pairs = [str(item).partition(":") for item in value]
        if not all(sep and task.strip() and partner.strip() for task, sep, partner in pairs):
            raise ValueError(f"partners: expected TASK:PARTNER items such as like:follow, got {value!r}")
        return {task.strip(): partner.strip() for task, _, partner in pairs}
    if not isinstance(value, Mapping):
        raise ValueError(f"partners: expected TASK:PARTNER items such as like:follow, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """A ValueError naming the allowed values and, for a typo, the nearest one.

    >>> _choice("rung", "crossdistl", ("mtl", "crossdistil"))
    Traceback (most recent call last):
    ...
    ValueError: rung must be one of mtl, crossdistil; got 'crossdistl' (did you mean 'crossdistil'?)
    """
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}{hint}")


def config_differences(saved: Mapping[str, Any], config: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Keys on which a saved ``ModelConfig.to_dict()`` (a checkpoint's) differs from ``config``, each as (saved value,
    value of ``config``); a key the saver did not know means its ``LEGACY_VALUES`` value.

    >>> config_differences({**ModelConfig().to_dict(), "lr": 0.01}, ModelConfig())
    {'lr': (0.01, 0.001)}
    """
    saved, mine = {**LEGACY_VALUES, **saved}, config.to_dict()
    return {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}


def retunable(key: str) -> bool:
    """Whether option ``key`` may differ between a checkpoint and the model restored from it (``RETUNABLE_OPTIONS``);
    a key this version does not know is not.

    >>> retunable("lr"), retunable("tasks"), retunable("a_future_option")
    (True, False, False)
    """
    return key in RETUNABLE_OPTIONS


def split_differences(differing: Mapping[str, tuple[Any, Any]]) -> tuple[dict[str, tuple[Any, Any]],
                                                                         dict[str, tuple[Any, Any]]]:
    """``config_differences``' output split into (retunable, structural) differences, each in the same order.

    >>> split_differences({"lr": (0.01, 0.001), "tasks": (["click"], ["click", "like"])})
    ({'lr': (0.01, 0.001)}, {'tasks': (['click'], ['click', 'like'])})
    """
    return ({k: v for k, v in differing.items() if retunable(k)},
            {k: v for k, v in differing.items() if not retunable(k)})


def from_known_fields(cls: type, data: Mapping[str, Any], what: str) -> Any:
    """``cls(**data)`` for a dataclass, with a ValueError naming the keys it does not have (with the nearest known
    key where one is close: a typo) and those it has.

    >>> from_known_fields(ModelConfig, {"embeding_dim": 8}, "model")
    Traceback (most recent call last):
    ...
    ValueError: unknown model config keys ['embeding_dim'] (did you mean 'embedding_dim'?); known: [...]
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        guesses = [match for key in unknown for match in difflib.get_close_matches(key, sorted(known), n=1)]
        hint = f" (did you mean {', '.join(map(repr, guesses))}?)" if guesses else ""
        raise ValueError(f"unknown {what} config keys {unknown}{hint}; known: {sorted(known)}")
    return cls(**data)
