"""An online baseline from river: one logistic regression or factorization machine per task, same hashed features.

    learner = RiverLearner(RiverConfig(tasks=("click", "long_view"), model="lr"))
    losses, predictions = learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))

``RiverLearner`` has the verbs of ``models.learner.Learner`` (``step``, ``predict``, ``state_dict``,
``load_state_dict``, ``serving_state``), so evaluation, the backtest and the trainer can run it in place of the
deep model and users see what the multi-task network buys them on their own data.

Features are exactly what the deep model reads from a ``Batch``: every hashed categorical column ``j`` with
table row ``r`` becomes the one-hot feature ``j * hash_buckets + r`` (an int key, so the weights export as
one int64 tensor); every numeric column ``i`` (signed log1p in the Batch) becomes feature ``-(i + 1)``, standardised
with running statistics updated after each step, as the deep model's ``RunningNormalizer`` does.

Learning is per event (river's ``learn_one``, one step per event, in batch order) after the whole batch has been
scored, so ``step`` returns predictions made before any update (prequential). river's ``learn_many`` averages
the gradient over the batch, which divides the step of every one-hot weight by the batch size; it is not used.

The optimizer is per-coordinate AdaGrad (``optim.AdaGrad``), not one SGD step size for every weight. Every event
carries one value of each of the C categorical columns (C = 36 on KuaiRand-Pure), and their frequencies differ by
orders of magnitude: a tab or an age range is in a large share of the events, a user or a video id in a few
hundred. With plain SGD one step size has to serve both: large enough for the ids, it moves the logit of every
event by C times the step and the frequent weights oscillate; small enough for those, the ids barely learn. Plain
SGD peaked at 0.686 tail AUC (step 0.003) on KuaiRand-Pure's validation slice where AdaGrad reaches 0.732, next to
Vowpal Wabbit's adaptive, normalized updates (reports/peers_kuairand_pure/README.md). ``optimizer = "sgd"`` keeps
the old rule (and a checkpoint written before this field existed is read as SGD, which trained it).

For the FM, river hands the latent optimizer each latent vector as a dict keyed by factor index, so a stateful
river optimizer would share one accumulator per factor across all features; AdaGrad here keeps one accumulator
per (feature, factor) instead (``_FMClassifier._update_latents``), which is AdaGrad of the latent matrix.

The state is exported as tensors and plain types (no pickled river objects): weights, latent factors,
intercepts, optimizer iteration counts and AdaGrad accumulators, the latent initializer's RNG state and the
normaliser, so a learner restored from ``state_dict`` continues bit-for-bit like the original.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from river import optim

from models.config import from_known_fields
from models.features import Batch, FeatureSpec, encode_rows
from models.metrics import log_loss

RIVER_MODELS = ("lr", "fm")
RIVER_OPTIMIZERS = ("adagrad", "sgd")
# Names selectable in ``crossdistil evaluate --configs``: config name -> RiverConfig.model.
RIVER_CONFIGS = {"river_lr": "lr", "river_fm": "fm"}
# Settings of the named configs, chosen on the validation slice of KuaiRand-Pure (the first 80 % of its events,
# prequential, tail = their last 10 %; reports/peers_kuairand_pure/README.md): AdaGrad step 0.2 beats 0.1 and
# 0.3 (and every SGD step) for the LR, and a slower intercept (0.001) is as good as 0.01 or better; the FM's
# latents learn best at 0.01 (0.05 is 0.001-0.002 AUC worse, SGD latents at 0.05 diverge).
NAMED_DEFAULTS = {
    "river_lr": {"optimizer": "adagrad", "lr": 0.2, "intercept_lr": 0.001},
    "river_fm": {"optimizer": "adagrad", "lr": 0.2, "latent_lr": 0.01, "intercept_lr": 0.001},
}
# A config saved before a field existed is read with the value that trained it.
LEGACY_VALUES = {"optimizer": "sgd"}
STATE_FORMAT = "crossdistil-river-learner"
SERVING_FORMAT = "crossdistil-river"
FORMAT_VERSION = "1"


@dataclass
class RiverConfig:
    """A river baseline: which model per task, its optimisation, and the features (shared with the deep model).

    ``optimizer`` is the update rule of the weights and latents: ``adagrad`` (per-coordinate steps
    ``lr / sqrt(sum of squared gradients)``) or ``sgd`` (one constant step ``lr``). ``lr`` is the step of the
    weights, ``latent_lr`` that of the FM's latent factors (0 = ``lr``), ``intercept_lr`` the (constant, SGD) step
    of the bias; ``l2`` regularises weights (and latents). ``seed`` only matters for ``fm`` (latent init); ``lr``
    models are deterministic whatever the seed.

    >>> cfg = RiverConfig(tasks=("click", "like"), model="fm")
    >>> RiverConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    tasks: tuple[str, ...] = ("click", "long_view")
    model: str = "lr"
    features: FeatureSpec = field(default_factory=FeatureSpec)
    optimizer: str = "adagrad"
    lr: float = 0.05
    latent_lr: float = 0.0
    intercept_lr: float = 0.01
    l2: float = 0.0
    n_factors: int = 8
    latent_init_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if isinstance(self.features, Mapping):
            self.features = FeatureSpec.from_dict(self.features)
        if len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks!r}")
        if self.model not in RIVER_MODELS:
            raise ValueError(f"model must be one of {RIVER_MODELS}, got {self.model!r}")
        if self.optimizer not in RIVER_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {RIVER_OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr <= 0 or self.latent_lr < 0 or self.intercept_lr < 0 or self.l2 < 0:
            raise ValueError("lr must be > 0, latent_lr, intercept_lr and l2 >= 0")
        if self.n_factors < 1 or self.latent_init_std <= 0:
            raise ValueError("n_factors must be >= 1 and latent_init_std > 0")

    @property
    def served_tasks(self) -> tuple[str, ...]:
        """The tasks a published river model scores: all of them (it learns no auxiliary tasks)."""
        return self.tasks

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for checkpoints and serving metadata."""
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["features"] = self.features.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiverConfig:
        """The inverse of ``to_dict``; a field missing from ``data`` (an older checkpoint) gets its LEGACY_VALUES."""
        return from_known_fields(cls, {**LEGACY_VALUES, **data}, "river")

    def make_optimizer(self, lr: float) -> optim.base.Optimizer:
        """A fresh river optimizer of this config's rule with step ``lr``."""
        optim = _river()[2]
        return optim.AdaGrad(lr) if self.optimizer == "adagrad" else optim.SGD(lr)


def _river() -> tuple[Any, Any, Any]:
    """river's ``facto``, ``linear_model`` and ``optim``, imported on first use: importing river costs ~1.4 s (it loads
    scipy), which every process that imports this module for ``RiverConfig`` or ``RiverServingModel`` alone (the
    learner process, the serving daemon, ``crossdistil evaluate`` of deep rungs) would otherwise pay at start."""
    from river import facto, linear_model, optim

    return facto, linear_model, optim


@cache
def _fm_classifier() -> type:
    """``_FMClassifier``: defined on first use, river's class being its base (see ``_river``)."""
    facto, _, optim = _river()

    class _FMClassifier(facto.FMClassifier):
        """river's FMClassifier with two changes that keep its learning rule, and per-feature AdaGrad for latents.

        * The pairwise term is computed in O(p k) (``0.5 * sum_f[(sum_j v_jf x_j)^2 - sum_j v_jf^2 x_j^2]``)
          instead of river's loop over the p (p - 1) / 2 pairs: the same value, summed in another order.
        * Scoring never creates latent factors: river's defaultdict would draw a random vector for an unseen
          feature during ``predict_proba_one`` (a prediction that changes the model). Here an unseen feature has
          no interaction until it is learned; ``learn_one`` draws the vectors first (in feature order), so learning
          sees them exactly as river does.
        * With an ``optim.AdaGrad`` latent optimizer, each latent vector has its own accumulator ``latent_g2[j]``
          (river would key AdaGrad's state by factor index only, shared by every feature). Other optimizers
          (stateless SGD) go through river's update unchanged.
        """

        @property
        def latent_g2(self) -> dict[int, np.ndarray]:
            """AdaGrad's squared-gradient sum of each learned latent vector (created on first use: river's ``clone``
            and ``repr`` read ``__init__``'s signature, which stays river's)."""
            return self.__dict__.setdefault("_latent_g2", {})

        @latent_g2.setter
        def latent_g2(self, value: dict[int, np.ndarray]) -> None:
            self.__dict__["_latent_g2"] = value

        def _calculate_interactions(self, x: dict) -> float:
            vectors = [(self.latents[j], xj) for j, xj in x.items() if j in self.latents]
            if len(vectors) < 2:
                return 0.0
            weighted = np.stack([v * xj for v, xj in vectors])
            total = weighted.sum(axis=0)
            return float(0.5 * (np.dot(total, total) - np.sum(weighted * weighted)))

        def learn_one(self, x: dict, y: Any, w: float = 1.0) -> None:
            for j in x:
                self.latents[j]  # draws the latent vector of a new feature, in feature order
            super().learn_one(x, y, w)

        def _update_latents(self, x: dict, g_loss: float) -> None:
            if not isinstance(self.latent_optimizer, optim.AdaGrad):
                super()._update_latents(x, g_loss)
                return
            v, l1, l2 = self.latents, self.l1_latent, self.l2_latent
            lr, eps = self.latent_optimizer.learning_rate, self.latent_optimizer.eps
            total = sum(v[j] * xj for j, xj in x.items())  # from the latents before this update, as river does
            for j, xj in x.items():
                vj = v[j]
                gradient = g_loss * (xj * total - vj * xj**2) + l1 * np.sign(vj) + l2 * vj
                g2 = self.latent_g2.get(j)
                g2 = gradient**2 if g2 is None else g2 + gradient**2
                self.latent_g2[j] = g2
                v[j] = vj - lr / (g2 + eps) ** 0.5 * gradient
                self.latent_optimizer.n_iterations += 1  # river counts one step per latent vector

    return _FMClassifier


class RiverLearner:
    """One river model per task over the Batch's hashed features, trained one mini-batch at a time.

    >>> learner = RiverLearner(RiverConfig(tasks=("click",)))
    >>> rows = [{"user_id": "u", "item_id": str(i), "labels": {"click": i % 2}} for i in range(4)]
    >>> losses, predictions = learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))
    >>> sorted(losses), predictions["click"].tolist()
    (['bce/click', 'total'], [0.5, 0.5, 0.5, 0.5])
    """

    def __init__(self, config: RiverConfig) -> None:
        self.config = config
        self.models = {task: self._new_model(k) for k, task in enumerate(config.tasks)}
        n_numeric = len(config.features.numeric)
        # Running mean / sum of squared deviations (Chan et al.) of the Batch's numeric columns.
        self.numeric_count = 0
        self.numeric_mean = np.zeros(n_numeric, dtype=np.float64)
        self.numeric_m2 = np.zeros(n_numeric, dtype=np.float64)
        self.steps = 0

    def _new_model(self, k: int) -> Any:
        _, linear_model, optim = _river()
        c = self.config
        if c.model == "lr":
            return linear_model.LogisticRegression(optimizer=c.make_optimizer(c.lr), l2=c.l2,
                                                   intercept_lr=c.intercept_lr)
        return _fm_classifier()(
            n_factors=c.n_factors, weight_optimizer=c.make_optimizer(c.lr),
            latent_optimizer=c.make_optimizer(c.latent_lr or c.lr),
            l2_weight=c.l2, l2_latent=c.l2, intercept_lr=c.intercept_lr,
            latent_initializer=optim.initializers.Normal(sigma=c.latent_init_std, seed=c.seed + k),
        )

    # --- features ---
    def features(self, batch: Batch) -> list[dict[int, float]]:
        """The river feature dicts of a batch: one-hot hashed categoricals plus standardised numerics."""
        buckets = self.config.features.hash_buckets
        categorical = batch.categorical.cpu().numpy()
        keys = (categorical + np.arange(categorical.shape[1], dtype=np.int64) * buckets).tolist()
        if categorical.shape[1] == 0 or batch.numeric.shape[1] == 0:
            return [dict.fromkeys(row, 1.0) for row in keys]
        numeric = ((batch.numeric.cpu().numpy().astype(np.float64) - self.numeric_mean) / self._numeric_std()).tolist()
        numeric_keys = [-(i + 1) for i in range(len(numeric[0]))]
        out = []
        for row, values in zip(keys, numeric):
            x = dict.fromkeys(row, 1.0)
            x.update(zip(numeric_keys, values))
            out.append(x)
        return out

    def _numeric_std(self) -> np.ndarray:
        if self.numeric_count < 2:
            return np.ones_like(self.numeric_mean)
        return np.sqrt(np.maximum(self.numeric_m2 / self.numeric_count, 1e-12))

    def _update_numeric(self, numeric: torch.Tensor) -> None:
        values = numeric.cpu().numpy().astype(np.float64)
        n = values.shape[0]
        if n == 0 or values.shape[1] == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.numeric_count + n
        delta = mean - self.numeric_mean
        self.numeric_mean = self.numeric_mean + delta * (n / total)
        self.numeric_m2 = self.numeric_m2 + m2 + delta**2 * (self.numeric_count * n / total)
        self.numeric_count = total

    # --- the Learner verbs ---
    def _probabilities(self, xs: list[dict[int, float]]) -> dict[str, torch.Tensor]:
        return {
            task: torch.tensor([model.predict_proba_one(x)[True] for x in xs], dtype=torch.float32)
            for task, model in self.models.items()
        }

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Probabilities per task (float32 [B] on CPU); changes nothing."""
        return self._probabilities(self.features(batch))

    def step(self, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Score the batch, then learn every event of it (in order). Returns (losses, predictions before update).

        losses: ``"bce/<task>"`` (mean log loss of the pre-update predictions) and ``"total"`` (their sum).
        """
        xs = self.features(batch)
        predictions = self._probabilities(xs)
        labels = batch.labels.cpu().numpy() > 0.5
        losses: dict[str, float] = {}
        for k, (task, model) in enumerate(self.models.items()):
            p = predictions[task].double().clamp(1e-7, 1 - 1e-7).numpy()
            y = labels[:, k]
            losses[f"bce/{task}"] = log_loss(y, p) if len(y) else 0.0
            for x, label in zip(xs, y.tolist()):
                model.learn_one(x, label)
        self._update_numeric(batch.numeric)
        self.steps += 1
        return {"total": sum(losses.values()), **losses}, predictions

    # --- state ---
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly: per task weights (and latents), optimizer counts and AdaGrad accumulators,
        RNG, normaliser.

        Tensors and plain types only (``models.learner.flatten_state`` carries it through safetensors).
        """
        return {
            "format": STATE_FORMAT,
            "version": int(FORMAT_VERSION),
            "config": self.config.to_dict(),
            "models": {task: _export_model(model) for task, model in self.models.items()},
            "numeric": {
                "count": self.numeric_count,
                "mean": torch.from_numpy(self.numeric_mean.copy()),
                "m2": torch.from_numpy(self.numeric_m2.copy()),
            },
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the saved config must equal this learner's."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a river learner state (format={state.get('format')!r}, expected {STATE_FORMAT!r})")
        saved, mine = RiverConfig.from_dict(state["config"]).to_dict(), self.config.to_dict()
        if saved != mine:
            differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"state was written with a different river config (keys {differing}); "
                             "build the learner with RiverLearner.from_state_dict(state)")
        self.models = {task: self._new_model(k) for k, task in enumerate(self.config.tasks)}
        for task, model in self.models.items():
            _import_model(model, state["models"][task])
        numeric = state["numeric"]
        self.numeric_count = int(numeric["count"])
        self.numeric_mean = numeric["mean"].double().numpy().copy()
        self.numeric_m2 = numeric["m2"].double().numpy().copy()
        self.steps = int(state["steps"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RiverLearner:
        """A learner built from the config saved in ``state``, with everything restored."""
        learner = cls(RiverConfig.from_dict(state["config"]))
        learner.load_state_dict(state)
        return learner

    def serving_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Scoring weights and metadata, ready for ``safetensors.torch.save``; ``RiverServingModel`` reads them.

        Tensors per task ``<task>/keys`` (int64), ``<task>/weights`` (float64), ``<task>/intercept``, for ``fm``
        also ``<task>/latent_keys`` and ``<task>/latents`` [L, k]; plus the normaliser ``numeric/mean``,
        ``numeric/std``. Metadata ``{"format": "crossdistil-river", "version": "1", "config", "steps"}``.
        """
        tensors: dict[str, torch.Tensor] = {}
        for task, model in self.models.items():
            exported = _export_model(model)
            for name in ("keys", "weights", "intercept", "latent_keys", "latents"):
                if name in exported:
                    tensors[f"{task}/{name}"] = exported[name].contiguous()
        tensors["numeric/mean"] = torch.from_numpy(self.numeric_mean.copy())
        tensors["numeric/std"] = torch.from_numpy(self._numeric_std().copy())
        metadata = {
            "format": SERVING_FORMAT,
            "version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "steps": str(self.steps),
        }
        return tensors, metadata


def _export_model(model: Any) -> dict[str, Any]:
    """A river LR or FM as tensors and plain values (dict insertion order kept: it is the summation order)."""
    _, linear_model, optim = _river()
    if isinstance(model, linear_model.LogisticRegression):
        weights = model._weights.to_dict()
        return {
            "kind": "lr",
            "keys": torch.tensor(list(weights), dtype=torch.int64),
            "weights": torch.tensor(list(weights.values()), dtype=torch.float64),
            "intercept": torch.tensor(float(model.intercept), dtype=torch.float64),
            "iterations": int(model.optimizer.n_iterations),
            **_export_accumulators(model.optimizer, "g2"),
        }
    rng_kind, rng_keys, rng_pos, has_gauss, cached = model.latent_initializer._rng.get_state()
    latent_keys = list(model.latents)
    latent_state = {}
    if isinstance(model.latent_optimizer, optim.AdaGrad):
        g2_keys = list(model.latent_g2)
        latent_state = {"latent_g2_keys": torch.tensor(g2_keys, dtype=torch.int64),
                        "latent_g2": torch.from_numpy(np.stack([model.latent_g2[j] for j in g2_keys]) if g2_keys
                                                      else np.zeros((0, model.n_factors))).to(torch.float64)}
    return {
        "kind": "fm",
        "keys": torch.tensor(list(model.weights), dtype=torch.int64),
        "weights": torch.tensor([float(w) for w in model.weights.values()], dtype=torch.float64),
        "intercept": torch.tensor(float(model.intercept), dtype=torch.float64),
        "latent_keys": torch.tensor(latent_keys, dtype=torch.int64),
        "latents": torch.from_numpy(np.stack([model.latents[j] for j in latent_keys]) if latent_keys
                                    else np.zeros((0, model.n_factors))).to(torch.float64),
        "weight_iterations": int(model.weight_optimizer.n_iterations),
        "latent_iterations": int(model.latent_optimizer.n_iterations),
        **_export_accumulators(model.weight_optimizer, "weight_g2"),
        **latent_state,
        "rng": {"kind": str(rng_kind), "keys": torch.from_numpy(rng_keys.astype(np.int64)), "pos": int(rng_pos),
                "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def _export_accumulators(optimizer: optim.base.Optimizer, name: str) -> dict[str, torch.Tensor]:
    """AdaGrad's squared-gradient sums as ``<name>_keys`` (int64) and ``<name>`` (float64); nothing for SGD."""
    optim = _river()[2]
    if not isinstance(optimizer, optim.AdaGrad):
        return {}
    return {f"{name}_keys": torch.tensor(list(optimizer.g2), dtype=torch.int64),
            f"{name}": torch.tensor(list(optimizer.g2.values()), dtype=torch.float64)}


def _import_accumulators(optimizer: optim.base.Optimizer, state: Mapping[str, Any], name: str) -> None:
    """The inverse of ``_export_accumulators``: an AdaGrad optimizer needs its sums, SGD must not get any."""
    optim = _river()[2]
    has_state = f"{name}_keys" in state
    if isinstance(optimizer, optim.AdaGrad) != has_state:
        raise ValueError(f"state {'has' if has_state else 'lacks'} AdaGrad accumulators {name!r} but this learner's "
                         f"optimizer is {type(optimizer).__name__}")
    if has_state:
        optimizer.g2.update(zip(state[f"{name}_keys"].tolist(), state[name].double().tolist()))


def _import_model(model: Any, state: Mapping[str, Any]) -> None:
    """Set a freshly built river model to an exported state (the inverse of ``_export_model``)."""
    from river import utils

    _, linear_model, optim = _river()

    keys = state["keys"].tolist()
    weights = state["weights"].double().tolist()
    if isinstance(model, linear_model.LogisticRegression):
        if state["kind"] != "lr":
            raise ValueError(f"state holds a {state['kind']!r} model, this learner builds 'lr'")
        model._weights = utils.VectorDict(dict(zip(keys, weights)))
        model.intercept = float(state["intercept"])
        model.optimizer.n_iterations = int(state["iterations"])
        _import_accumulators(model.optimizer, state, "g2")
        return
    if state["kind"] != "fm":
        raise ValueError(f"state holds a {state['kind']!r} model, this learner builds 'fm'")
    model.weights = collections.defaultdict(model.weight_initializer, zip(keys, weights))
    model.latents = model._init_latents()
    for j, vector in zip(state["latent_keys"].tolist(), state["latents"].double().numpy()):
        model.latents[j] = vector.copy()
    model.intercept = float(state["intercept"])
    model.weight_optimizer.n_iterations = int(state["weight_iterations"])
    model.latent_optimizer.n_iterations = int(state["latent_iterations"])
    _import_accumulators(model.weight_optimizer, state, "weight_g2")
    if isinstance(model.latent_optimizer, optim.AdaGrad) != ("latent_g2_keys" in state):
        raise ValueError("state and learner disagree on whether the latents have AdaGrad accumulators")
    if "latent_g2_keys" in state:
        model.latent_g2 = {j: g2.copy() for j, g2 in zip(state["latent_g2_keys"].tolist(),
                                                         state["latent_g2"].double().numpy())}
    rng = state["rng"]
    model.latent_initializer._rng.set_state((rng["kind"], rng["keys"].numpy().astype(np.uint32), int(rng["pos"]),
                                             int(rng["has_gauss"]), float(rng["cached_gaussian"])))


class RiverServingModel:
    """Scores from ``RiverLearner.serving_state()`` with numpy only (no river, no pickle).

    Equal to ``RiverLearner.predict`` up to float rounding (sums run in another order).

    >>> learner = RiverLearner(RiverConfig(tasks=("click",)))
    >>> serving = RiverServingModel.from_serving_state(*learner.serving_state())
    >>> serving.score_rows([{"user_id": "u", "item_id": "i"}])["click"].tolist()
    [0.5]
    """

    def __init__(self, config: RiverConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        self.mean = tensors["numeric/mean"].double().numpy()
        self.std = tensors["numeric/std"].double().numpy()
        self.tasks: dict[str, dict[str, Any]] = {}
        for task in config.tasks:
            entry: dict[str, Any] = {
                "weights": dict(zip(tensors[f"{task}/keys"].tolist(), tensors[f"{task}/weights"].double().tolist())),
                "intercept": float(tensors[f"{task}/intercept"]),
            }
            if f"{task}/latents" in tensors:
                rows = tensors[f"{task}/latent_keys"].tolist()
                entry["latent_row"] = {j: r for r, j in enumerate(rows)}
                entry["latents"] = np.vstack([tensors[f"{task}/latents"].double().numpy(),
                                              np.zeros((1, config.n_factors))])  # last row: unseen feature
            self.tasks[task] = entry

    @classmethod
    def from_serving_state(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> RiverServingModel:
        if metadata.get("format") != SERVING_FORMAT or metadata.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a river serving state (format={metadata.get('format')!r}, "
                             f"version={metadata.get('version')!r}); expected {SERVING_FORMAT!r} {FORMAT_VERSION!r}")
        return cls(RiverConfig.from_dict(json.loads(metadata["config"])), tensors)

    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Probabilities per task, float32 [B] on CPU."""
        buckets = self.config.features.hash_buckets
        categorical = batch.categorical.cpu().numpy()
        keys = categorical + np.arange(categorical.shape[1], dtype=np.int64) * buckets
        numeric = (batch.numeric.cpu().numpy().astype(np.float64) - self.mean) / self.std
        all_keys = np.concatenate([keys, np.broadcast_to(-(np.arange(numeric.shape[1]) + 1), numeric.shape)], axis=1)
        values = np.concatenate([np.ones(keys.shape), numeric], axis=1)
        out = {}
        for task, entry in self.tasks.items():
            weights = entry["weights"]
            w = np.array([[weights.get(j, 0.0) for j in row] for row in all_keys.tolist()]).reshape(values.shape)
            logit = entry["intercept"] + (w * values).sum(axis=1)
            if "latents" in entry:
                unseen = len(entry["latents"]) - 1
                rows = np.array([[entry["latent_row"].get(j, unseen) for j in row] for row in all_keys.tolist()],
                                dtype=np.int64).reshape(values.shape)
                v = entry["latents"][rows] * values[:, :, None]  # [B, p, k]
                logit = logit + 0.5 * ((v.sum(axis=1) ** 2).sum(axis=1) - (v * v).sum(axis=(1, 2)))
            out[task] = torch.from_numpy(1.0 / (1.0 + np.exp(-logit))).float()
        return out

    def score_rows(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Encode rows as the trainer does (``models.features.encode_rows``) and score them."""
        return self.score(encode_rows(rows, self.config.features, self.config.tasks))


def config_for(name: str, tasks: Sequence[str], features: FeatureSpec, seed: int = 0,
               **options: Any) -> RiverConfig:
    """The RiverConfig of an evaluate config name (``river_lr``, ``river_fm``): its defaults, then ``options``."""
    if name not in RIVER_CONFIGS:
        raise ValueError(f"unknown river config {name!r}; choose from {sorted(RIVER_CONFIGS)}")
    known = {f.name for f in fields(RiverConfig)} - {"tasks", "model", "features", "seed"}
    if set(options) - known:
        raise ValueError(f"unknown river options {sorted(set(options) - known)}; known: {sorted(known)}")
    chosen = {**NAMED_DEFAULTS[name], **options}
    return RiverConfig(tasks=tuple(tasks), model=RIVER_CONFIGS[name], features=features, seed=seed, **chosen)
