"""Every learner the product trains, built from one description: a rung of the ladder or an online peer.

``learner_config(tasks, options, seed=...)`` reads the options a user writes (``[model.options]`` of the trainer,
``--configs`` and ``--set`` of ``crossdistil evaluate``) and ``make_learner(config, device)`` builds the learner:

* ``rung`` = a rung of the ablation ladder (``mtl`` ... ``crossdistil``), optionally ``RUNG@PRESET``
  (``models.config.PRESETS``): a ``models.learner.Learner`` of ``ModelConfig(tasks, **preset, **options)``;
* ``rung`` = ``river_lr`` or ``river_fm``: a ``models.river_baseline.RiverLearner`` over the same hashed features
  (``features`` in the options), with ``river.KEY`` options setting fields of its ``RiverConfig``;
* ``rung`` = ``vw`` or ``vw_q``: a ``models.vw_baseline.VWLearner`` (Vowpal Wabbit, an optional dependency:
  ``pip install crossdistil[peers]``), with ``vw.KEY`` options setting fields of its ``VWConfig``.

Options meant for another kind (``river.*`` or ``vw.*`` for a deep rung) are ignored, so one option set can describe
a comparison of every kind. A deep rung's option that ``ModelConfig`` does not have is a ValueError naming the known
ones.

>>> config = learner_config(("click", "like"), {"rung": "crossdistil@trust", "hidden_dims": [8]}, seed=3)
>>> config.rung, config.kd_gate, config.seed
('crossdistil', 'trust', 3)
>>> learner_config(("click",), {"rung": "river_lr", "river.lr": 0.05}).lr
0.05
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from models.config import ModelConfig, from_known_fields, split_config_name, whole_number
from models.features import FeatureSpec
from models.learner import Learner
from models.river_baseline import RIVER_CONFIGS, RiverConfig, RiverLearner, config_for
from models.vw_baseline import VW_CONFIGS, VWConfig, VWLearner
from models.vw_baseline import config_for as vw_config_for


def learner_config(tasks: Sequence[str], options: Mapping[str, Any], *,
                   seed: int = 0) -> ModelConfig | RiverConfig | VWConfig:
    """The configuration ``options`` describe (see the module docstring); ``seed`` unless the options set one."""
    options = dict(options)
    rung = str(options.pop("rung", ""))
    river_options = {k.removeprefix("river."): v for k, v in options.items() if k.startswith("river.")}
    vw_options = {k.removeprefix("vw."): v for k, v in options.items() if k.startswith("vw.")}
    options = {k: v for k, v in options.items() if not k.startswith(("river.", "vw."))}
    seed = whole_number(options.pop("seed", seed), "seed")
    if rung in RIVER_CONFIGS or rung in VW_CONFIGS:
        for key in ("aux_tasks", "counted_tasks"):
            if options.get(key):
                raise ValueError(f"{key}: the {rung} peer learns each task alone and serves them all; list only the "
                                 "tasks to serve in its model.tasks")
        features = options.get("features")
        spec = features if isinstance(features, FeatureSpec) else (
            FeatureSpec.from_dict(features) if isinstance(features, Mapping) else FeatureSpec())
        if rung in VW_CONFIGS:
            return vw_config_for(rung, tuple(tasks), spec, seed, **vw_options)
        return config_for(rung, tuple(tasks), spec, seed, **river_options)
    if "tasks" in options:
        raise ValueError("tasks is not a model option: the tasks are given beside the options (model.tasks, --tasks)")
    preset: dict[str, Any] = {}
    if rung:
        rung, preset = split_config_name(rung)
        options["rung"] = rung
    # a misspelt option is refused naming the known ones, not a TypeError of ModelConfig's constructor
    return from_known_fields(ModelConfig, {"tasks": tuple(tasks), "seed": seed, **preset, **options}, "model")


def make_learner(config: ModelConfig | RiverConfig | VWConfig,
                 device: str = "auto") -> Learner | RiverLearner | VWLearner:
    """A fresh learner of ``config`` (the peers learn on the CPU, one event at a time: ``device`` is not used).
    A VW learner without the vowpalwabbit package raises ImportError saying how to install it."""
    if isinstance(config, RiverConfig):
        return RiverLearner(config)
    if isinstance(config, VWConfig):
        return VWLearner(config)
    return Learner(config, device=device)
