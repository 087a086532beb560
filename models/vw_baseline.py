"""A Vowpal Wabbit peer: one VW logistic regression per task over the same hashed features as the deep model.

    learner = VWLearner(VWConfig(tasks=("click", "long_view"), interactions=("ui",)))
    losses, predictions = learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))

``VWLearner`` has the verbs of ``models.learner.Learner`` (``step``, ``predict``, ``state_dict``,
``load_state_dict``), so ``crossdistil evaluate`` runs it under the same mini-batch protocol as the deep model
and the river baselines: the peer a user would pick first, with VW's own defaults (adaptive, normalized,
invariant per-coordinate updates, ``--learning_rate 0.5``, ``--power_t 0.5``).

Features are exactly what the deep model reads from a ``Batch``, in VW namespaces (a namespace is named by its
first letter, which is what ``-q``/``--interactions`` refer to):

* ``u`` user: the ``user_id`` column; ``i`` item: the ``item_id`` column;
* ``c`` context: the columns named in ``VWConfig.context_fields`` (time of day, tab, ...);
* ``s`` side features: every other categorical column;
* ``n`` numeric: the Batch's numeric columns (signed log1p) as values; VW's normalized updates handle scale.

A categorical column ``j`` with table row ``r`` is the VW feature ``j_r`` (the field index keeps fields apart
within a namespace, as the river baselines key ``j * hash_buckets + r``); VW hashes it into ``2^bits`` weights.

Prequential: ``step`` scores the whole batch, then learns every event of it in batch order, so the predictions
it returns were made before any update. The state is VW's own model format (``Workspace.save``, which in VW 9
keeps the adaptive and normalization accumulators: a restored model continues bit-for-bit), carried as uint8
tensors; never pickle.

vowpalwabbit is an optional dependency (``pip install crossdistil[peers]``); this module imports without it and
fails with that advice when a learner is built.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from models.config import from_known_fields
from models.features import Batch, FeatureSpec
from models.metrics import log_loss

# Names selectable in ``crossdistil evaluate --configs`` -> their VWConfig settings. ``vw`` is VW as a user runs
# it first (no interactions, default learning rate). ``vw_q`` is the best of a declared set of 8 (interactions
# none / ui / ui+uc / ui+us / ui+uc+ic, learning rate 0.5 / 1 / 2) on the validation slice of KuaiRand-Pure
# (reports/peers_kuairand_pure/README.md): user x item alone adds nothing there, user x context does.
NAMED_DEFAULTS: dict[str, dict[str, Any]] = {
    "vw": {},
    "vw_q": {"interactions": ("ui", "uc"), "learning_rate": 1.0},
}
VW_CONFIGS = tuple(NAMED_DEFAULTS)
STATE_FORMAT = "crossdistil-vw-learner"
FORMAT_VERSION = 1
NAMESPACES = ("u", "i", "c", "s", "n")  # user, item, context, side features, numeric
MISSING_ADVICE = "the Vowpal Wabbit peer needs the vowpalwabbit package: pip install crossdistil[peers]"


def require_vowpalwabbit() -> Any:
    """The ``vowpalwabbit`` module, or an ImportError that says how to install it."""
    try:
        import vowpalwabbit
    except ImportError as exc:
        raise ImportError(MISSING_ADVICE) from exc
    return vowpalwabbit


@dataclass
class VWConfig:
    """A VW peer: its learning options, and the features (shared with the deep model).

    ``bits`` is ``-b`` (2^bits weights per task); ``learning_rate`` and ``power_t`` are VW's (defaults 0.5, 0.5);
    ``l1`` / ``l2`` VW's regularisation; ``interactions`` are VW interaction terms over the namespace letters
    ``u i c s n`` (``("ui",)`` is ``-q ui``, ``("uic",)`` a cubic term); ``context_fields`` the categorical columns
    put in namespace ``c`` (the other non-id columns go to ``s``). ``seed`` is VW's ``--random_seed`` (it does not
    change a linear model without random initialisation).

    >>> cfg = VWConfig(tasks=("click", "like"), interactions=("ui",))
    >>> VWConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.arguments()
    '--loss_function logistic --link logistic --bit_precision 24 --learning_rate 0.5 --power_t 0.5 --random_seed 0 \
--interactions ui --quiet'
    """

    tasks: tuple[str, ...] = ("click", "long_view")
    features: FeatureSpec = field(default_factory=FeatureSpec)
    bits: int = 24
    learning_rate: float = 0.5
    power_t: float = 0.5
    l1: float = 0.0
    l2: float = 0.0
    interactions: tuple[str, ...] = ()
    context_fields: tuple[str, ...] = ("hour", "hourmin", "weekday", "tab")
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.interactions = tuple(self.interactions)
        self.context_fields = tuple(self.context_fields)
        if isinstance(self.features, Mapping):
            self.features = FeatureSpec.from_dict(self.features)
        if len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks!r}")
        if not 1 <= self.bits <= 30:
            raise ValueError(f"bits (VW's -b) must be in [1, 30], got {self.bits}")
        if self.learning_rate <= 0 or self.power_t < 0 or self.l1 < 0 or self.l2 < 0:
            raise ValueError("learning_rate must be > 0; power_t, l1 and l2 >= 0")
        for term in self.interactions:
            if len(term) < 2 or set(term) - set(NAMESPACES):
                raise ValueError(f"interaction {term!r}: give two or more namespace letters among {NAMESPACES}")

    def arguments(self) -> str:
        """The VW command line of one task's model (without the initial regressor)."""
        args = ["--loss_function logistic", "--link logistic", f"--bit_precision {self.bits}",
                f"--learning_rate {self.learning_rate!r}", f"--power_t {self.power_t!r}", f"--random_seed {self.seed}"]
        if self.l1:
            args.append(f"--l1 {self.l1!r}")
        if self.l2:
            args.append(f"--l2 {self.l2!r}")
        args += [f"--interactions {term}" for term in self.interactions]
        return " ".join(args + ["--quiet"])

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for checkpoints."""
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["interactions"] = list(self.interactions)
        out["context_fields"] = list(self.context_fields)
        out["features"] = self.features.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VWConfig:
        return from_known_fields(cls, data, "vw")


def namespaces_of(config: VWConfig) -> list[str]:
    """The VW namespace letter of each categorical column of ``config.features``, in column order.

    >>> namespaces_of(VWConfig(features=FeatureSpec(categorical=("user_id", "item_id", "tab", "author_id"))))
    ['u', 'i', 'c', 's']
    """
    ids = {"user_id": "u", "item_id": "i"}
    return [ids.get(name, "c" if name in config.context_fields else "s") for name in config.features.categorical]


def example_lines(batch: Batch, namespaces: Sequence[str]) -> list[str]:
    """VW text lines without a label, one per row of ``batch``; ``namespaces`` from ``namespaces_of``.

    >>> from models.features import encode_rows
    >>> spec = FeatureSpec(categorical=("user_id", "item_id", "tab"), numeric=("duration_ms",), hash_buckets=100)
    >>> batch = encode_rows([{"user_id": "u", "item_id": "i", "features": {"tab": 1, "duration_ms": 0.0}}],
    ...                     spec, ("click",))
    >>> example_lines(batch, ["u", "i", "c"])  # column_row per categorical column, index:value per numeric one
    [' |u 0_37 |i 1_70 |c 2_31 |n 0:0.0']
    """
    categorical = batch.categorical.cpu().numpy().tolist()
    numeric = batch.numeric.cpu().numpy().astype(np.float64).tolist()
    lines = []
    for row, values in zip(categorical, numeric):
        parts: dict[str, list[str]] = {}
        for j, (namespace, r) in enumerate(zip(namespaces, row)):
            parts.setdefault(namespace, []).append(f"{j}_{r}")
        if values:
            parts["n"] = [f"{i}:{v!r}" for i, v in enumerate(values)]
        lines.append("".join(f" |{ns} {' '.join(parts[ns])}" for ns in NAMESPACES if ns in parts))
    return lines


class VWLearner:
    """One VW model per task over the Batch's hashed features, scored and then trained one mini-batch at a time.

    Needs vowpalwabbit (``require_vowpalwabbit``); its behaviour is specified in tests/unit/models/test_vw_baseline.py,
    which skip without it.
    """

    def __init__(self, config: VWConfig) -> None:
        self._vw = require_vowpalwabbit()
        self.config = config
        self.models = {task: self._new_model() for task in config.tasks}
        self.steps = 0
        self._namespaces = namespaces_of(config)

    def _new_model(self, model_bytes: bytes | None = None) -> Any:
        if model_bytes is None:
            return self._vw.Workspace(self.config.arguments())
        # VW reads an initial regressor from a file only: write the bytes to a private temporary file.
        with tempfile.TemporaryDirectory(prefix="crossdistil-vw-") as folder:
            path = os.path.join(folder, "model.vw")
            with open(path, "wb") as out:
                out.write(model_bytes)
            return self._vw.Workspace(f"{self.config.arguments()} --initial_regressor {path}")

    # --- features ---
    def features(self, batch: Batch) -> list[str]:
        """VW text lines without a label (``" |u 0_17 |i 1_5 |s 2_9 ... |n 0:8.5"``), one per row of the batch."""
        return example_lines(batch, self._namespaces)

    # --- the Learner verbs ---
    def _probabilities(self, lines: Sequence[str]) -> dict[str, torch.Tensor]:
        return {task: torch.tensor([model.predict(line) for line in lines], dtype=torch.float32)
                for task, model in self.models.items()}

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Probabilities per task (float32 [B] on CPU). Unlabelled VW examples are not learned: no later score
        changes (VW only counts them in its progress statistics)."""
        return self._probabilities(self.features(batch))

    def step(self, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Score the batch, then learn every event of it (in order). Returns (losses, predictions before update).

        losses: ``"bce/<task>"`` (mean log loss of the pre-update predictions) and ``"total"`` (their sum).
        """
        lines = self.features(batch)
        predictions = self._probabilities(lines)
        labels = batch.labels.cpu().numpy() > 0.5
        losses: dict[str, float] = {}
        for k, (task, model) in enumerate(self.models.items()):
            p = predictions[task].double().clamp(1e-7, 1 - 1e-7).numpy()
            y = labels[:, k]
            losses[f"bce/{task}"] = log_loss(y, p) if len(y) else 0.0
            for line, label in zip(lines, y.tolist()):
                model.learn(("1" if label else "-1") + line)
        self.steps += 1
        return {"total": sum(losses.values()), **losses}, predictions

    # --- state ---
    def state_dict(self) -> dict[str, Any]:
        """The config, the step count and per task VW's model file (uint8 tensor; it keeps the update state)."""
        return {
            "format": STATE_FORMAT,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "models": {task: torch.frombuffer(bytearray(_model_bytes(model)), dtype=torch.uint8)
                       for task, model in self.models.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the saved config must equal this learner's."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a VW learner state (format={state.get('format')!r}, expected {STATE_FORMAT!r})")
        saved, mine = state["config"], self.config.to_dict()
        if saved != mine:
            differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"state was written with a different VW config (keys {differing}); "
                             "build the learner with VWLearner.from_state_dict(state)")
        for model in self.models.values():
            model.finish()
        self.models = {task: self._new_model(state["models"][task].cpu().numpy().tobytes())
                       for task in self.config.tasks}
        self.steps = int(state["steps"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VWLearner:
        """A learner built from the config saved in ``state``, with everything restored."""
        learner = cls(VWConfig.from_dict(state["config"]))
        learner.load_state_dict(state)
        return learner


def _model_bytes(model: Any) -> bytes:
    """VW's model file of ``model`` as bytes (``Workspace.save`` writes to a path only)."""
    with tempfile.TemporaryDirectory(prefix="crossdistil-vw-") as folder:
        path = os.path.join(folder, "model.vw")
        model.save(path)
        with open(path, "rb") as saved:
            return saved.read()


def config_for(name: str, tasks: Sequence[str], features: FeatureSpec, seed: int = 0, **options: Any) -> VWConfig:
    """The VWConfig of an evaluate config name (``vw``, ``vw_q``): its defaults, then ``options``.

    A single interaction may be given as a string (``vw.interactions=ui``); several as a list (``ui,uc``).
    """
    if name not in NAMED_DEFAULTS:
        raise ValueError(f"unknown VW config {name!r}; choose from {sorted(NAMED_DEFAULTS)}")
    known = {f.name for f in fields(VWConfig)} - {"tasks", "features", "seed"}
    if set(options) - known:
        raise ValueError(f"unknown VW options {sorted(set(options) - known)}; known: {sorted(known)}")
    chosen = {**NAMED_DEFAULTS[name], **options}
    for key in ("interactions", "context_fields"):
        if isinstance(chosen.get(key), str):
            chosen[key] = (chosen[key],)
    return VWConfig(tasks=tuple(tasks), features=features, seed=seed, **chosen)
