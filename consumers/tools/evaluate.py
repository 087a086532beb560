"""``crossdistil evaluate``: offline training and evaluation of model configurations on a data set.

Runs every (task set, backbone, configuration, seed) combination with a time-ordered split, a prequential
pass, or both (``models.evaluation``), and writes to ``--out``:

* ``results.json`` — every number: per run its tasks, configuration, backbone, seed, mode, metrics per window
  and task, the combined score's metrics per window, training curve, mean losses and time;
* ``report.md`` — Markdown tables of mean ± std over seeds (AUC, GAUC, Multi-AUC, NDCG@10, log loss,
  calibration) per task, configuration and backbone, the combined score's AUC and NDCG@10, and the per-seed
  paired differences of each configuration to ``mtl``;
* ``auc_curve.png`` — AUC against training progress, one line per configuration, mean over seeds.

The data set is read and encoded once per task set and reused by every configuration and seed.
The combined score is prod_k p_k^w_k over the tasks (``--combined-weights``, 1 each by default): its AUC is
against "every task positive", its per-user NDCG@10 uses the number of positive tasks as relevance.
``--validation`` tunes settings without touching the test split: only the first ``--train-fraction`` of events
are used; split mode trains on the first 90 % of them and tests on the last 10 %, and the prequential tail
window is their last 10 % (``evaluation_rows``).
``--from-results A.json B.json`` re-renders the report from earlier results (e.g. runs made in parallel).

Example::

    crossdistil evaluate --dataset kuairand --source ../shared/data/kuairand \\
        --tasks click,long_view --tasks long_view,like --backbone shared_bottom,mmoe,ple,cross_stitch \\
        --configs mtl,aux,kd,cal,crossdistil,direct_kd --seeds 5 --mode split --out reports/kuairand
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.runtime.paths import check_output_folder
from streamer.datasets import open_dataset

RUN_LOG = "runs.partial.jsonl"  # a grid's finished runs, one per line, until results.json is written

BACKBONES = ("shared_bottom", "mmoe", "ple", "cross_stitch")
LADDER = ("mtl", "aux", "kd", "cal", "crossdistil", "direct_kd")
# Online baselines from river (models.river_baseline): one LR / FM per task over the same hashed features.
RIVER_CONFIGS = ("river_lr", "river_fm")
# Vowpal Wabbit peers (models.vw_baseline, optional: pip install crossdistil[peers]); vw.KEY=VALUE sets a VWConfig.
VW_CONFIGS = ("vw", "vw_q")
CONFIGS = LADDER + RIVER_CONFIGS + VW_CONFIGS
MODES = ("split", "prequential", "both")
# Columns of the main table, in order: (metric key in results.json, header).
TABLE_METRICS = (("auc", "AUC"), ("gauc", "GAUC"), ("multi_auc", "Multi-AUC"), ("ndcg10", "NDCG@10"),
                 ("log_loss", "LogLoss"), ("calibration", "Calib"))
# Paired differences to mtl: per-task metrics, then the combined score's (metric key, header).
DIFF_TASK_METRICS = (("auc", "ΔAUC"), ("multi_auc", "ΔMulti-AUC"), ("ndcg10", "ΔNDCG@10"))
DIFF_COMBINED_METRICS = (("auc", "Δ combined AUC"), ("ndcg10", "Δ combined NDCG@10"))
# A paired difference is bold in the report where a two-sided paired t-test over its seeds rejects "no difference"
# at this level (Student's t with n - 1 degrees of freedom: 2.78 standard errors for 5 seeds, not the normal's 1.96)
SIGNIFICANCE = 0.95
# --validation: the share of the validation slice that is its test part (split) and its tail (prequential).
VALIDATION_TEST_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``crossdistil evaluate``."""
    parser.add_argument("--dataset", help="adapter name: kuairand, icme2019, csv, synthetic")
    parser.add_argument("--source", help="file or folder the adapter reads (e.g. ../shared/data/kuairand; the "
                                         "synthetic adapter reads none)")
    parser.add_argument("--mapping", help="column mapping file (TOML) for the csv adapter")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="adapter option, repeatable (passed to streamer.datasets.open_dataset)")
    parser.add_argument("--tasks", action="append", default=[], metavar="T1,T2",
                        help="comma-separated tasks; repeat the flag to evaluate several task sets "
                             "(default: the data set's first two tasks)")
    parser.add_argument("--aux-tasks", default="", metavar="T1,T2",
                        help="comma-separated tasks of the data set the models also learn but the report leaves out "
                             "(auxiliary outcomes, e.g. follow,comment): each --tasks set is learnt with them; the "
                             "configurations are reported as CONFIG[aux] unless --variant names them")
    parser.add_argument("--counted-tasks", default="", metavar="T1,T2",
                        help="comma-separated tasks of the data set the models only count: each user's and item's "
                             "rate of their label is an input (model option counted_tasks), with no tower and no "
                             "loss, and the report leaves them out; reported as CONFIG[counted] unless --variant "
                             "names them")
    parser.add_argument("--backbone", default="shared_bottom",
                        help=f"comma-separated backbones among {','.join(BACKBONES)} (default shared_bottom)")
    parser.add_argument("--configs", default=",".join(LADDER),
                        help=f"comma-separated rungs of the ablation ladder among {','.join(LADDER)}, and river "
                             f"baselines {','.join(RIVER_CONFIGS)}, VW peers {','.join(VW_CONFIGS)} (default: the "
                             "ladder); RUNG@PRESET applies a "
                             "named option set of models.config.PRESETS, e.g. crossdistil@paper, crossdistil@trust")
    parser.add_argument("--seeds", default="5",
                        help="a count N (seeds 0..N-1) or a comma-separated list such as 3,7,11 (default 5)")
    parser.add_argument("--mode", choices=MODES, default="split",
                        help="split: first 80%% of events by time train, last 20%% test; prequential: score each "
                             "mini-batch before learning from it; both (default split)")
    parser.add_argument("--out", required=True,
                        help="output folder for results.json, report.md and auc_curve.png (required)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training part in split mode (default 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="mini-batch size (default 256)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when available), cpu, cuda[:N] (default auto)")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="time split boundary (default 0.8)")
    _add_prequential_arguments(parser)
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="models.config.ModelConfig field override, repeatable, e.g. kd_weight=0.5, "
                             "quadruplet_pairs=all, lr=0.003, hidden_dims=64,32; river.KEY=VALUE sets a "
                             "models.river_baseline.RiverConfig field of the river configs, e.g. river.lr=0.05; "
                             "vw.KEY=VALUE a models.vw_baseline.VWConfig field, e.g. vw.interactions=ui")
    parser.add_argument("--exclude-feature", action="append", default=[], metavar="NAME",
                        help="drop a feature column of the data set from the model input (repeatable)")
    parser.add_argument("--hash-buckets", type=int, default=0,
                        help="rows of the shared hashed embedding table (0 = models.features.FeatureSpec's default)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N events in time order (0 = all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads of each run (0 = torch's default; with --jobs, the cores shared out)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in a process of its own (default 1); every run is seeded "
                             "alone, so the results are those of --jobs 1 whatever the order they finish in")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted evaluate of the same grid into the same --out: the runs it "
                             f"finished (kept one per line in OUT/{RUN_LOG} as each finishes) are not run again")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each full batch's training step as one CUDA graph (models/graphs.py): a CUDA "
                             "device; the river and VW peers train as they do")
    parser.add_argument("--combined-weights", default="", metavar="W1,W2",
                        help="weights w_k of the combined score prod_k p_k^w_k, one per task (default: 1 each)")
    parser.add_argument("--validation", action="store_true",
                        help="choose settings without touching the test split: use only the first --train-fraction "
                             "of events; split mode trains on the first 90%% of them and tests on the last 10%%, "
                             "prequential's tail window is their last 10%% (--tail-fraction is ignored)")
    parser.add_argument("--title", default="", help="title of report.md (default: the data set's name)")
    parser.add_argument("--baseline", default="mtl", metavar="CONFIG",
                        help="the configuration the report's paired differences are taken to, as the report names "
                             "it (default mtl; e.g. mtl[aux] to compare variants that all learn auxiliary tasks)")
    parser.add_argument("--variant", default="",
                        help="name of this command's --model-option set: configurations are reported as "
                             "CONFIG[VARIANT], so runs of several commands merged with --from-results stay apart; "
                             "mtl keeps its name as the common baseline when the options leave it as it is (teacher, "
                             "distillation and gate options only)")
    parser.add_argument("--from-results", nargs="+", metavar="RESULTS_JSON",
                        help="do not train: merge these results.json files and write the report to --out")


def _add_prequential_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the prequential pass's windows: its tail, curve, ``served`` window and cadences."""
    parser.add_argument("--tail-fraction", type=float, default=0.2,
                        help="prequential metrics are also reported over this last share of events (default 0.2)")
    parser.add_argument("--curve-points", type=int, default=10, help="points of the AUC curve per run (default 10)")
    parser.add_argument("--publications", type=int, default=4,
                        help="prequential window `served`: the tail scored by the model published this many times "
                             "over it, frozen in between, as serving scores it (default 4; 0: none)")
    parser.add_argument("--cadence", default="", metavar="N,N,...",
                        help="publication counts (e.g. 1,4,16,64): the prequential tail also served at each, its AUC, "
                             "log loss and calibration beside the prequential tail's: what publishing more often "
                             "buys (1: a model never updated after the first part; default: none)")


# ---------------------------------------------------------------------------------------------------------------
# Parsing of flag values


def parse_list(text: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    """Split a comma-separated flag value; reject names outside ``allowed`` with the list of valid ones."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{what}: give at least one value")
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise ValueError(f"{what}: unknown {unknown}; choose from {','.join(allowed)}")
    return items


def parse_cadence(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16] (sorted, each once); ``""`` -> []."""
    try:
        counts = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--cadence: expected comma-separated publication counts such as 1,4,16, got {text!r}") \
            from None
    if counts and counts[0] < 1:
        raise ValueError(f"--cadence: every publication count must be >= 1, got {text!r}")
    return counts


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> [0, 1, 2, 3, 4]; ``"3,7"`` -> [3, 7]."""
    try:
        listed = [int(item) for item in text.split(",") if item.strip()] if "," in text else None
        count = int(text) if listed is None else len(listed)
    except ValueError:
        raise ValueError(f"--seeds: expected a count or a comma-separated list of integers, got {text!r}") from None
    if listed is not None:
        if len(set(listed)) < len(listed):
            raise ValueError(f"--seeds {text}: a seed is listed twice (the same run twice would narrow every "
                             "standard error)")
        return listed
    if count < 1:
        raise ValueError("--seeds: the count must be >= 1")
    return list(range(count))


def parse_value(text: str) -> Any:
    """A flag value as bool, int, float, a list (when it has commas) or a string."""
    if "," in text:
        return [parse_value(item) for item in text.split(",") if item.strip()]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pairs(items: Iterable[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_weights(text: str) -> list[float] | None:
    """``--combined-weights``: ``"1,0.5"`` -> [1.0, 0.5]; ``""`` -> None (1 per task)."""
    if not text.strip():
        return None
    from models.metrics import checked_weights  # lazy: the CLI starts without torch

    try:
        return checked_weights([float(item) for item in text.split(",") if item.strip()], None).tolist()
    except ValueError as exc:
        raise ValueError(f"--combined-weights: expected comma-separated non-negative numbers such as 1,0.5, got "
                         f"{text!r} ({exc})") from None


@dataclass(frozen=True)
class EvaluationRows:
    """Which events a run uses (rows [0, ``limit``) in time order) and how the two modes divide them."""

    events: int  # rows encoded
    limit: int  # rows used at all
    train_fraction: float  # split mode: the first share of the used rows trains, the rest tests
    tail_fraction: float  # prequential: the "tail" window is the last share of the used rows
    validation: bool

    def ranges(self) -> dict[str, Any]:
        """The row ranges, [start, stop), as results.json's protocol records them."""
        from models.evaluation import split_boundary, tail_start  # lazy: the CLI starts without torch

        boundary = split_boundary(self.limit, self.train_fraction)
        return {"events": self.events, "used": [0, self.limit], "split_train": [0, boundary],
                "split_test": [boundary, self.limit], "prequential_tail": [tail_start(self.limit, self.tail_fraction),
                                                                           self.limit]}


def evaluation_rows(n_events: int, train_fraction: float, tail_fraction: float, validation: bool) -> EvaluationRows:
    """All ``n_events`` with the given fractions, or with ``validation`` only the events before the test split
    (the first ``train_fraction``), divided 90/10 for the split and with their last 10 % as the prequential tail.

    >>> evaluation_rows(1000, 0.8, 0.2, validation=True).ranges()["split_test"]
    [720, 800]
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    if not validation:
        return EvaluationRows(n_events, n_events, train_fraction, tail_fraction, validation=False)
    from models.evaluation import split_boundary  # lazy: the CLI starts without torch

    limit = split_boundary(n_events, train_fraction)
    if limit < 2:
        raise ValueError(f"--validation: the first {train_fraction:.0%} of {n_events} events is {limit} event(s), "
                         "too few to divide; use more events (--limit) or a larger --train-fraction")
    return EvaluationRows(n_events, limit, 1.0 - VALIDATION_TEST_FRACTION, VALIDATION_TEST_FRACTION, validation=True)


# ---------------------------------------------------------------------------------------------------------------
# Data and models


def load_encoded(dataset: Any, tasks: Sequence[str], spec: Any, limit: int = 0, columnar: bool = True) -> Any:
    """Read the data set once (time order), keep the first ``limit`` events if set, and encode every row. A CSV or
    TSV file of the ``csv`` adapter is read as columns (``streamer.datasets.columnar``: the same arrays, bit for bit,
    ~10x faster) unless ``columnar`` is False or only its rows can read it."""
    # lazy: numpy, torch and the models load only when a grid runs (the CLI starts without torch)
    import numpy as np

    from models.evaluation import EncodedData
    from models.features import encode_rows
    from streamer.datasets.columnar import read_columns

    columns = read_columns(dataset) if columnar else None
    if columns is not None:
        return _encoded_columns(columns.head(limit) if limit else columns, tasks, spec, dataset.name)
    interactions = []
    privileged = bool(getattr(dataset, "privileged_features", ()))
    for interaction in dataset.interactions():
        if privileged and interaction.privileged:  # a privileged teacher's inputs (models.privileged.teacher_spec)
            interaction = dataclasses.replace(interaction, features={**interaction.features, **interaction.privileged})
        interactions.append(interaction)
        if limit and len(interactions) >= limit:
            break
    if not interactions:
        raise ValueError(f"data set {dataset.name!r} yielded no interactions")
    batch = encode_rows(interactions, spec, tasks)
    return EncodedData(
        batch=batch,
        tasks=tuple(tasks),
        labels=batch.labels.numpy().copy(),
        users=np.array([i.user_id for i in interactions]),
        ts_ms=np.array([i.ts_ms for i in interactions], dtype=np.int64),
    )


def _encoded_columns(columns: Any, tasks: Sequence[str], spec: Any, name: str) -> Any:
    """``load_encoded`` of a data set read as columns (``streamer.datasets.columnar.TabularColumns``)."""
    # lazy: numpy, torch and the models load only when a grid runs (the CLI starts without torch)
    import numpy as np

    from models.evaluation import EncodedData
    from models.features import batch_from_columns, encode_factorized

    if not len(columns):
        raise ValueError(f"data set {name!r} yielded no interactions")
    n = len(columns)
    labels = np.stack([columns.labels[t] if t in columns.labels else np.zeros(n, dtype=np.int64) for t in tasks],
                      axis=1) if tasks else np.zeros((n, 0))
    factorized = {field: (column.values, column.codes) for field, column in columns.categorical.items()}
    factorized.update(user_id=(columns.user_id.values, columns.user_id.codes),
                      item_id=(columns.item_id.values, columns.item_id.codes))
    # a mapping's privileged columns are numeric columns that only a privileged teacher's spec names
    arrays = encode_factorized(factorized, {**columns.numeric, **columns.privileged}, (labels > 0).astype(np.float32),
                               (columns.user_id.values, columns.user_id.codes), spec)
    batch = batch_from_columns(arrays, tasks)
    return EncodedData(batch=batch, tasks=tuple(tasks), labels=batch.labels.numpy().copy(),
                       users=columns.user_id.strings(), ts_ms=columns.ts_ms)


def _specs(args: argparse.Namespace, dataset: Any, configs: Sequence[str], model_options: dict) -> tuple[Any, Any]:
    """The students' feature spec and the spec the data is encoded with (``privileged_spec``). Without
    ``--variant``, a privileged teacher or ``--aux-tasks`` name the variant (``privileged``, ``aux``,
    ``privileged+aux``): never the plain ``mtl`` of the paired differences."""
    spec = feature_spec_for(dataset, args.exclude_feature, args.hash_buckets)
    data_spec = privileged_spec(dataset, spec, model_options.get("privileged"), configs)
    named = (["privileged"] * (data_spec is not spec) + ["aux"] * bool(args.aux_tasks)
             + ["counted"] * bool(args.counted_tasks))
    if named and not args.variant:
        args.variant = "+".join(named)
    return spec, data_spec


def privileged_spec(dataset: Any, spec: Any, privileged: Any, configs: Sequence[str] = ()) -> Any:
    """The spec the data is encoded with: ``spec``, or with ``--model-option privileged=...`` the privileged
    teacher's (``models.privileged.teacher_spec``: those columns after the numeric features). A ValueError where a
    name is not one of the mapping's ``privileged`` columns, or a peer of ``configs`` would be given the teacher."""
    from models.config import ModelConfig  # lazy: the CLI starts without torch
    from models.privileged import teacher_spec

    if not privileged:
        return spec
    peers = [c for c in configs if c in RIVER_CONFIGS + VW_CONFIGS]
    if peers:
        raise ValueError(f"--model-option privileged: a privileged teacher is the deep model's; run {peers} without "
                         "it (a separate evaluate, merged with --from-results)")
    config = ModelConfig(features=spec, privileged=privileged)  # the names as the learner will read them
    available = tuple(getattr(dataset, "privileged_features", ()))
    missing = [name for name in config.privileged if name not in available]
    if missing:
        raise ValueError(f"--model-option privileged: {missing} are not privileged columns of {dataset.name!r} (a "
                         f"csv mapping's `privileged` list: outcomes known only after the impression); it has "
                         f"{list(available) or 'none'}")
    return teacher_spec(config)


def feature_spec_for(dataset: Any, exclude: Sequence[str], hash_buckets: int = 0) -> Any:
    """user and item ids plus the data set's own feature columns, minus ``exclude``."""
    from models.features import FeatureSpec  # lazy: the CLI starts without torch

    unknown = set(exclude) - set(dataset.categorical_features) - set(dataset.numeric_features)
    if unknown:
        raise ValueError(f"--exclude-feature: {sorted(unknown)} are not features of {dataset.name!r}; it has "
                         f"{list(dataset.categorical_features) + list(dataset.numeric_features)}")
    categorical = ("user_id", "item_id") + tuple(f for f in dataset.categorical_features if f not in exclude)
    numeric = tuple(f for f in dataset.numeric_features if f not in exclude)
    if hash_buckets:
        return FeatureSpec(categorical=categorical, numeric=numeric, hash_buckets=hash_buckets)
    return FeatureSpec(categorical=categorical, numeric=numeric)


def parse_configs(text: str) -> list[str]:
    """``--configs``: rungs of the ladder, river baselines, or ``RUNG@PRESET`` (models.config.PRESETS)."""
    from models.config import split_config_name  # lazy: the CLI starts without torch

    names = parse_list(text, None, "--configs")
    for name in names:
        rung, _ = split_config_name(name)  # raises on an unknown preset
        if rung not in CONFIGS or (rung in RIVER_CONFIGS + VW_CONFIGS and rung != name):
            raise ValueError(f"--configs: unknown {name!r}; choose from {','.join(CONFIGS)}, or RUNG@PRESET")
    if set(names) & set(VW_CONFIGS):  # an optional dependency: say so before the data is read, not after
        from models.vw_baseline import require_vowpalwabbit  # lazy: torch loads only when a VW peer is asked for

        try:
            require_vowpalwabbit()
        except ImportError as exc:
            raise ValueError(f"--configs {','.join(sorted(set(names) & set(VW_CONFIGS)))}: {exc}") from None
    return names


def variant_name(config: str, variant: str, options: Iterable[str] = ()) -> str:
    """``crossdistil@trust`` with variant ``kd0.3`` -> ``crossdistil@trust[kd0.3]``; no variant: unchanged.

    ``mtl`` keeps its name (the common baseline of the paired differences) unless the variant's ``options`` (the
    ``--model-option`` keys) change it: any option of the deep model but the teacher and distillation ones
    (``models.config.TEACHER_OPTIONS``), e.g. ``wide=none``.
    """
    if not variant:
        return config
    if config == "mtl":
        from models.config import TEACHER_OPTIONS  # lazy: the CLI starts without torch

        deep = [k for k in options if not k.startswith(("river.", "vw."))]
        if all(k in TEACHER_OPTIONS for k in deep):
            return config
    return f"{config}[{variant}]"


def seeded_learner(tasks: Sequence[str], backbone: str, rung: str, seed: int, spec: Any,
                   model_options: dict[str, Any], device: str, aux_tasks: Sequence[str] = ()) -> Any:
    """A fresh learner for one run (``models.zoo``: a rung, ``RUNG@PRESET``, a river baseline or a VW peer), with
    torch's and numpy's global generators seeded so that a run repeats exactly. ``aux_tasks`` (of ``tasks``) are
    the model's ``ModelConfig.aux_tasks``; a peer learns every task alone, so for it they are tasks like the rest."""
    # lazy: torch and the models load only when a grid runs (the CLI starts without torch)
    import numpy as np
    import torch

    from models.zoo import make_learner

    torch.manual_seed(seed)
    np.random.seed(seed)
    return make_learner(run_config(tasks, backbone, rung, seed, spec, model_options, aux_tasks), device)


def _check_run_configs(task_sets: Sequence[tuple[list[str], list[str]]], backbones: Sequence[str],
                       configs: Sequence[str], seed: int, spec: Any, model_options: dict[str, Any]) -> None:
    """Every run's learner configuration built once, before any data is read: a bad model option (a misspelt key,
    a size out of range) is a ValueError now, not when the first run with it starts after the encoding."""
    for (tasks, aux), backbone, config in itertools.product(task_sets, backbones, configs):
        run_config(tasks + aux, backbone, config, seed, spec, model_options, aux)


def run_config(tasks: Sequence[str], backbone: str, rung: str, seed: int, spec: Any, model_options: dict[str, Any],
               aux_tasks: Sequence[str] = ()) -> Any:
    """The configuration of one run's learner (``seeded_learner``'s); a ValueError names a bad model option."""
    from models.zoo import learner_config  # lazy: the CLI starts without torch

    options = {"backbone": backbone, **model_options, "rung": rung, "features": spec}
    if rung in RIVER_CONFIGS + VW_CONFIGS:  # no backbone, no device: peers learn on the CPU, one event at a time
        options.pop("backbone")
        options.pop("counted_tasks", None)  # learnt like the rest
    elif aux_tasks:
        options["aux_tasks"] = tuple(aux_tasks)
    return learner_config(tasks, options, seed=seed)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write None instead, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _progress(console: Any) -> Any:
    """The grid's progress display: description, bar, count, elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate every combination; returns the results.json document."""
    import torch  # lazy: torch and the models below load only when a grid runs (the CLI starts without torch)
    from rich.console import Console

    from models.learner import resolve_device

    if not args.dataset:  # --source is the adapter's to ask for (open_dataset): the synthetic one reads none
        raise ValueError("--dataset is required (or --from-results), with --source for a data set read from files")
    backbones = parse_list(args.backbone, BACKBONES, "--backbone")
    configs = parse_configs(args.configs)
    seeds = parse_seeds(args.seeds)
    modes = ["split", "prequential"] if args.mode == "both" else [args.mode]
    model_options = parse_pairs(args.model_option, "--model-option")
    combined_weights = parse_weights(args.combined_weights)
    for reserved in ("tasks", "aux_tasks", "counted_tasks", "backbone", "rung", "features", "seed"):
        if reserved in model_options or f"river.{reserved}" in model_options or f"vw.{reserved}" in model_options:
            raise ValueError(f"--model-option {reserved}=...: set it with its own flag")
    if args.counted_tasks:  # auxiliary tasks (_aux_tasks) that the model only counts
        model_options["counted_tasks"] = _counted_tasks(args)
    _check_counts(args)
    if parse_cadence(args.cadence) and args.mode == "split":
        raise ValueError("--cadence serves the tail of a prequential pass: use --mode prequential or both")
    if _threads_per_run(args):
        torch.set_num_threads(_threads_per_run(args))
    threads = torch.get_num_threads()  # of each run (the last bits of a run depend on them)
    device = str(resolve_device(args.device))
    if args.cuda_graphs and not device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs: CUDA graphs need a CUDA device (--device cuda, or auto on a machine with a "
                         f"GPU); the device is {device}")
    console = Console(stderr=True)
    dataset = _open(args)
    task_sets = _task_sets(args, dataset, combined_weights)
    spec, data_spec = _specs(args, dataset, configs, model_options)
    renaming = list(model_options) + (["aux_tasks"] if _aux_tasks(args) else [])  # what makes mtl a variant
    _check_run_configs(task_sets, backbones, configs, seeds[0], spec, model_options)

    plan = GridPlan(args, spec, data_spec, model_options, combined_weights, device, renaming)
    log = RunLog(Path(args.out), {"dataset": dataset.name, "source": args.source, "device": device,
                                  "threads": threads,
                                  "protocol": _protocol(args, spec, model_options, combined_weights, {})},
                 args.resume, console) if args.out else None
    runs: list[dict[str, Any]] = []
    row_ranges: dict[str, Any] = {}
    started = time.perf_counter()
    combos = [(m, b, c, s) for m in modes for b in backbones for c in configs for s in seeds]
    for tasks, aux in task_sets:
        task_runs, row_ranges = _task_set_runs(plan, log, dataset, tasks, aux, combos, console)
        runs += task_runs  # row_ranges: the same for every task set, they all read the same events
    kept = log.outside(runs) if log is not None else []
    if log is not None:
        log.close()
    if kept:
        console.log(f"--resume: {len(kept)} finished run(s) in {args.out} are not of this grid; results.json and the "
                    "report keep them after this grid's")
    command = "crossdistil evaluate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["evaluate"] else sys.argv[1:])
    return {
        "dataset": dataset.name,
        "source": args.source,
        **({"commands": [*log.commands, command], "kept_runs": len(kept)} if kept else {"command": command}),
        "protocol": _protocol(args, spec, model_options, combined_weights, row_ranges),
        "environment": {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                        "threads": threads,
                        "cuda_graphs": bool(args.cuda_graphs), "jobs": args.jobs},
        "seconds": time.perf_counter() - started,
        **({"earlier_runs": earlier} if (earlier := len(log.done) if log is not None else 0) else {}),
        "runs": runs + kept,
    }


def _open(args: argparse.Namespace) -> Any:
    """The data set of ``--dataset``, ``--source``, ``--mapping`` and ``--option``."""
    return open_dataset(args.dataset, args.source, mapping=args.mapping, **parse_pairs(args.option, "--option"))


def _run_key(tasks: Sequence[str], mode: str, backbone: str, config: str, seed: int) -> str:
    """What names one run of a grid: its task set, mode, backbone, configuration (as reported) and seed."""
    return json.dumps([list(tasks), mode, backbone, config, seed])


def _comparable(header: dict[str, Any]) -> dict[str, Any]:
    """A grid's header without what depends on the events read (the validation slice's row ranges)."""
    protocol = {k: v for k, v in header.get("protocol", {}).items() if k != "validation_rows"}
    return {**header, "protocol": protocol}


def _record_key(record: dict[str, Any]) -> str:
    return _run_key(record["tasks"], record["mode"], record["backbone"], record["config"], record["seed"])


class RunLog:
    """``OUT/runs.partial.jsonl``: the grid's header, then every finished run as one JSON line, written and synced as
    it finishes, so an interrupted grid loses no finished run. ``--resume`` reads them back (``done``, by run key)
    when the header (data set, source, device, threads, protocol) is the same, or, with no such file, the runs of a
    finished grid's ``OUT/results.json`` (to add seeds or configurations to it); without ``--resume`` an old log
    with finished runs is refused (they would be lost; one with none is replaced). A resumed grid never drops a
    finished run: those outside it (``outside``) stay in results.json after its own. ``run`` removes the file once
    results.json is written."""

    def __init__(self, out: Path, header: dict[str, Any], resume: bool, console: Any) -> None:
        self.path = out / RUN_LOG
        header = _comparable(json.loads(json.dumps(_clean(header))))  # as it reads back
        self.done: dict[str, dict[str, Any]] = {}
        self.commands: list[str] = []  # the commands of a finished results.json resumed, if any
        if resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            saved = json.loads(lines[0]) if lines else {}
            self.commands = saved.pop("commands", [])  # of the runs it kept from a results.json, if any
            self._check(saved, header, self.path)
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the line a crash cut short: that run runs again
                    continue
                self.done[_record_key(record)] = record
        elif resume and (out / "results.json").exists():
            doc = json.loads((out / "results.json").read_text())
            env = doc.get("environment", {})
            self._check(_comparable({"dataset": doc.get("dataset"), "source": doc.get("source"),
                                     "device": env.get("device"), "threads": env.get("threads"),
                                     "protocol": doc.get("protocol", {})}), header, out / "results.json")
            self.done = {_record_key(r): r for r in doc["runs"]}
            self.commands = doc.get("commands") or [doc.get("command", "")]
        elif resume:
            console.log(f"--resume: no {self.path} and no results.json; running the whole grid")
        elif self.path.exists() and (finished := len(self.path.read_text().splitlines()) - 1) > 0:
            raise ValueError(f"{out} holds {finished} finished run(s) of a grid that did not finish ({self.path}): "
                             "--resume continues it (with the same settings); to start over, remove that file or "
                             "choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")  # header and the kept runs written again: no line cut short stays
        for line in [{**header, "commands": self.commands} if self.commands else header, *self.done.values()]:
            self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    @staticmethod
    def _check(saved: dict[str, Any], header: dict[str, Any], path: Path) -> None:
        if saved != header:
            keys = sorted(k for k in set(saved) | set(header) if saved.get(k) != header.get(k))
            raise ValueError(f"--resume: {path} was written by another grid (it differs in {keys}); rerun that "
                             "grid's command with --resume, or leave --resume out to start again")

    def outside(self, runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The finished runs read back that are not among ``runs`` (the grid's), in the order they were written."""
        grid = {_record_key(r) for r in runs}
        return [r for k, r in self.done.items() if k not in grid]

    def add(self, record: dict[str, Any]) -> None:
        """One finished run, on disk before the next starts."""
        import os

        self.file.write(json.dumps(_clean(record)) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class GridPlan:
    """What every run of a grid shares besides its data: sent once to each process of ``--jobs``."""

    args: argparse.Namespace
    spec: Any  # the students' feature spec
    data_spec: Any  # the spec the data is encoded with (a privileged teacher's columns too)
    model_options: dict[str, Any]
    combined_weights: Any
    device: str
    renaming: list[str]  # the options that make mtl a variant


def _check_counts(args: argparse.Namespace) -> None:
    """The grid's counts and sizes in their ranges, before anything loads (a batch of 0 divided by zero; 0 epochs
    or a negative one wrote the report of an untrained model)."""
    for flag, value, least, meaning in (("--jobs", args.jobs, 1, ""), ("--batch-size", args.batch_size, 1, ""),
                                        ("--epochs", args.epochs, 1, ""),
                                        ("--curve-points", args.curve_points, 0, " (0: no curve)"),
                                        ("--publications", args.publications, 0, " (0: no `served` window)"),
                                        ("--limit", args.limit, 0, " (0: every event)"),
                                        ("--threads", args.threads, 0, " (0: torch's choice)")):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}{meaning}, got {value}")


def _threads_per_run(args: argparse.Namespace) -> int:
    """torch threads of each run: ``--threads``, or with ``--jobs`` the machine's cores shared out (0: torch's)."""
    import os

    if args.threads or args.jobs <= 1:
        return args.threads
    return max(1, (os.cpu_count() or 1) // args.jobs)


def _task_set_data(plan: GridPlan, dataset: Any, tasks: list[str], aux: list[str]) -> tuple[Any, EvaluationRows]:
    """The encoded events of one task set (its auxiliary tasks last) and their rows (the validation slice alone with
    ``--validation``)."""
    args = plan.args
    data = dataclasses.replace(load_encoded(dataset, tasks + aux, plan.data_spec, args.limit), auxiliary=tuple(aux))
    rows = evaluation_rows(len(data), args.train_fraction, args.tail_fraction, args.validation)
    return (data.head(rows.limit) if rows.validation else data), rows


def _one_run(plan: GridPlan, tasks: list[str], aux: list[str], data: Any, rows: EvaluationRows,
             combo: tuple[str, str, str, int], on_step: Any) -> tuple[dict[str, Any], str]:
    """One run of ``combo`` (mode, backbone, config, seed): its results.json record and its log line."""
    mode, backbone, rung, seed = combo
    args = plan.args
    learner = seeded_learner(tasks + aux, backbone, rung, seed, plan.spec, plan.model_options, plan.device, aux)
    if args.cuda_graphs and hasattr(learner, "use_cuda_graphs"):  # a ValueError says why it cannot
        learner.use_cuda_graphs()
    result = _run_one(args, mode, learner, data, rows, plan.combined_weights, on_step=on_step)
    window = "test" if mode == "split" else "tail"
    aucs = " ".join(f"{t}={result.metrics[window][t]['auc']:.4f}" for t in tasks)
    line = f"{mode} {backbone} {rung} seed {seed}: {window} AUC {aucs} ({result.seconds:.1f}s)"
    return {"tasks": list(tasks), **({"aux_tasks": aux} if aux else {}),
            "config": variant_name(rung, args.variant, plan.renaming),
            "backbone": backbone, "seed": seed, **dataclasses.asdict(result)}, line


def _task_set_runs(plan: GridPlan, log: RunLog | None, dataset: Any, tasks: list[str], aux: list[str],
                   combos: list[tuple], console: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run of ``combos`` on one task set, in the grid's order (those ``log`` has from an interrupted grid are
    not run again), and the task set's row ranges."""
    t0 = time.perf_counter()
    data, rows = _task_set_data(plan, dataset, tasks, aux)
    console.log(f"{dataset.name}: {len(data)} events encoded for tasks {tasks + aux} in "
                f"{time.perf_counter() - t0:.1f}s")
    if rows.validation:
        console.log(f"validation: rows [0, {rows.limit}) of {rows.events}; the test split is not used")
    keys = [_run_key(tasks, mode, backbone, variant_name(rung, plan.args.variant, plan.renaming), seed)
            for mode, backbone, rung, seed in combos]
    done = {k: log.done[k] for k in keys if log is not None and k in log.done}
    todo = [c for c, k in zip(combos, keys) if k not in done]
    if done:
        console.log(f"--resume: {len(done)} of {len(combos)} runs of {','.join(tasks)} were finished; running the "
                    f"other {len(todo)}")
    with _progress(console) as progress:
        bar = progress.add_task(",".join(tasks), total=sum(_run_events(rows, plan, c) for c in combos))
        offset = sum(_run_events(rows, plan, c) for c, k in zip(combos, keys) if k in done)
        sink = log.add if log is not None else (lambda record: None)
        if plan.args.jobs > 1 and todo:
            new = _runs_in_processes(plan, tasks, aux, todo, progress, bar, offset, sink)
        else:
            new = _runs_in_turn(plan, tasks, aux, data, rows, todo, progress, bar, offset, sink)
    finished = {**done, **{_record_key(r): r for r in new}}
    return [finished[k] for k in keys], rows.ranges()


def _runs_in_turn(plan: GridPlan, tasks: list[str], aux: list[str], data: Any, rows: EvaluationRows,
                  combos: list[tuple], progress: Any, bar: Any, offset: int, sink: Any) -> list[dict[str, Any]]:
    """``combos`` run one after the other in this process; their records, each also given to ``sink`` as it
    finishes (``offset``: the events of the runs already done, for the progress bar)."""
    records, base = [], offset
    for combo in combos:
        progress.update(bar, description=f"{','.join(tasks)} {' '.join(map(str, combo[:3]))} seed {combo[3]}")
        record, line = _one_run(plan, tasks, aux, data, rows, combo,
                                on_step=lambda events, base=base: progress.update(bar, completed=base + events))
        progress.console.log(line)
        sink(record)
        records.append(record)
        base += _run_events(rows, plan, combo)
    return records


def _runs_in_processes(plan: GridPlan, tasks: list[str], aux: list[str], combos: list[tuple], progress: Any,
                       bar: Any, offset: int, sink: Any) -> list[dict[str, Any]]:
    """``combos`` run by ``--jobs`` processes (``_worker_start``, ``_worker_run``); their records in the order of
    ``combos``, each given to ``sink`` as it finishes. The processes report their progress through a queue that a
    thread here reads into ``bar`` (``offset``: the events of the runs already done)."""
    import multiprocessing
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's thread pools
    queue = context.Queue()
    done: dict[int, int] = {}

    def follow() -> None:
        for index, events in iter(queue.get, None):
            done[index] = events
            progress.update(bar, completed=offset + sum(done.values()))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    progress.update(bar, description=f"{','.join(tasks)}: {len(combos)} runs, {plan.args.jobs} at a time")
    records: list[Any] = [None] * len(combos)
    with ProcessPoolExecutor(min(plan.args.jobs, len(combos)), mp_context=context, initializer=_worker_start,
                             initargs=(plan, tasks, aux, queue)) as pool:
        futures = {pool.submit(_worker_run, i, combo): i for i, combo in enumerate(combos)}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: f.exception() is not None):  # kept before raising
                    records[futures[future]], line = future.result()  # a run's error is raised here
                    progress.console.log(line)
                    sink(records[futures[future]])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            queue.put(None)
            reader.join(10)
    return records


_WORKER: dict[str, Any] = {}  # a --jobs process's plan, data and progress queue (_worker_start)


def _worker_start(plan: GridPlan, tasks: list[str], aux: list[str], queue: Any) -> None:
    """A ``--jobs`` process: its torch threads, and the task set's events read and encoded once (the same arrays as
    the parent's: reading and encoding are deterministic)."""
    import torch

    if _threads_per_run(plan.args):
        torch.set_num_threads(_threads_per_run(plan.args))
    data, rows = _task_set_data(plan, _open(plan.args), tasks, aux)
    _WORKER.update(plan=plan, tasks=tasks, aux=aux, data=data, rows=rows, queue=queue)


def _worker_run(index: int, combo: tuple[str, str, str, int]) -> tuple[dict[str, Any], str]:
    """Run ``combo`` in a ``--jobs`` process; its events trained so far go to the parent at most twice a second."""
    w = _WORKER
    last = [0.0]

    def on_step(events: int) -> None:
        if time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            w["queue"].put((index, events))

    record, line = _one_run(w["plan"], w["tasks"], w["aux"], w["data"], w["rows"], combo, on_step)
    w["queue"].put((index, _run_events(w["rows"], w["plan"], combo)))
    return record, line


def _run_events(rows: EvaluationRows, plan: GridPlan, combo: tuple) -> int:
    """The events a finished run of ``combo`` trained on (what the progress bar counts for it)."""
    ranges = rows.ranges()
    return ranges["split_train"][1] * plan.args.epochs if combo[0] == "split" else rows.limit


def _task_sets(args: argparse.Namespace, dataset: Any, combined_weights: Any) -> list[tuple[list[str], list[str]]]:
    """Each ``--tasks`` set with the ``--aux-tasks`` it also learns (those of the set itself left out). A ValueError
    names a task the data set lacks or combined weights that do not fit a set."""
    from models.evaluation import combined_weights_for  # lazy: the CLI starts without torch

    aux, counted = _aux_tasks(args), _counted_tasks(args)
    task_sets = [parse_list(t, None, "--tasks") for t in args.tasks] or [list(dataset.tasks[:2])]
    flags = [("--aux-tasks", [t for t in aux if t not in counted]), ("--counted-tasks", counted)]
    for flag, names in [("--tasks", tasks) for tasks in task_sets] + flags:
        missing = [t for t in names if t not in dataset.tasks]
        if missing:
            raise ValueError(f"{flag}: {missing} are not tasks of {dataset.name!r}; it has {list(dataset.tasks)}")
    for tasks in task_sets:
        scored = [t for t in counted if t in tasks]
        if scored:
            raise ValueError(f"--counted-tasks: {scored} are in --tasks {tasks}: a task the report scores is learnt, "
                             "not only counted")
        try:
            combined_weights_for(tasks, combined_weights)
        except ValueError as exc:
            raise ValueError(f"--combined-weights: {exc}") from None
    return [(tasks, [t for t in dict.fromkeys(aux) if t not in tasks]) for tasks in task_sets]


def _aux_tasks(args: argparse.Namespace) -> list[str]:
    """The ``--aux-tasks`` as given, then the ``--counted-tasks`` (auxiliary too: never scored); empty: none."""
    aux = parse_list(args.aux_tasks, None, "--aux-tasks") if args.aux_tasks else []
    return list(dict.fromkeys(aux + _counted_tasks(args)))


def _counted_tasks(args: argparse.Namespace) -> list[str]:
    """The ``--counted-tasks`` as given (empty: none)."""
    return parse_list(args.counted_tasks, None, "--counted-tasks") if args.counted_tasks else []


def _run_one(args: argparse.Namespace, mode: str, learner: Any, data: Any, rows: EvaluationRows,
             combined_weights: Any, on_step: Any) -> Any:
    """One time-split or prequential run of ``learner`` (``models.evaluation``)."""
    from models.evaluation import default_partners, run_prequential, run_time_split  # lazy: no torch for --help

    partners = default_partners(data.scored_tasks)
    device = getattr(learner, "device", None)
    if device is not None and device.type == "cuda":  # the data set on the GPU once: no copy from the host per step
        data = dataclasses.replace(data, batch=data.batch.to(device))
    if mode == "split":
        return run_time_split(learner, data, partners, epochs=args.epochs, batch_size=args.batch_size,
                              train_fraction=rows.train_fraction, curve_points=args.curve_points,
                              on_step=on_step, combined_weights=combined_weights)
    return run_prequential(learner, data, partners, batch_size=args.batch_size, tail_fraction=rows.tail_fraction,
                           curve_points=args.curve_points, on_step=on_step, combined_weights=combined_weights,
                           publications=args.publications, cadence=parse_cadence(args.cadence))


def _protocol(args: argparse.Namespace, spec: Any, model_options: dict, combined_weights: Any,
              row_ranges: dict) -> dict[str, Any]:
    """The protocol block of results.json: what every run of the grid shared."""
    return {
        "train_fraction": args.train_fraction,
        "tail_fraction": VALIDATION_TEST_FRACTION if args.validation else args.tail_fraction, "epochs": args.epochs,
        "publications": args.publications,
        **({"cadence": parse_cadence(args.cadence)} if args.cadence else {}),
        "batch_size": args.batch_size, "within_train_order": "time order, no shuffling",
        "features": spec.to_dict(), "model_options": model_options, "limit": args.limit,
        "aux_tasks": _aux_tasks(args),
        "combined_weights": combined_weights,  # None: 1 per task
        "validation": bool(args.validation),
        **({"validation_rows": row_ranges, "validation_test_fraction": VALIDATION_TEST_FRACTION}
           if args.validation else {}),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
    return mean, math.sqrt(var)


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _groups(runs: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], str]]:
    return list(dict.fromkeys((tuple(r["tasks"]), r["mode"]) for r in runs))


def render_report(doc: dict[str, Any], title: str = "", baseline: str = "mtl") -> str:
    """The Markdown report of a results.json document: one section per (task set, mode, window), with paired
    differences to ``baseline`` where a section has it and another configuration.

    Results written before a metric existed (no ``ndcg10``, no ``combined``) render it as "–".
    """
    runs = doc["runs"]
    lines = [f"# {title or 'Evaluation: ' + str(doc.get('dataset', ''))}", ""]
    commands = doc.get("commands") or [doc.get("command", "")]
    lines += ["Produced by:", "", "```", *commands, "```", ""]
    lines += _kept_lines(runs, doc.get("kept_runs", 0))
    lines += _protocol_lines(doc.get("protocol", {}))
    auxiliary = {r["config"]: r["aux_tasks"] for r in runs if r.get("aux_tasks")}
    if auxiliary:  # per configuration: a merged report's protocol is its first file's
        lines += ["Auxiliary tasks (learnt beside the tasks of each section, never scored): " + "; ".join(
            f"`{config}`: {', '.join(tasks)}" for config, tasks in auxiliary.items()) + ".", ""]
    for tasks, mode in _groups(runs):
        group = [r for r in runs if tuple(r["tasks"]) == tasks and r["mode"] == mode]
        for window in _windows(group, mode):
            lines += _window_section(group, tasks, mode, window, baseline)
        lines += _gate_section(group, tasks, mode)
        lines += _cadence_section(group, tasks)
    env = doc.get("environment", {})
    if env:
        lines += [f"Environment: {json.dumps(env, sort_keys=True)}; {_time_line(doc, runs)}.", ""]
    return "\n".join(lines)


def _time_line(doc: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The report's time: the command's, and where ``--resume`` took finished runs from earlier commands, the runs'
    own times too (the command's alone would count only the runs it ran).

    >>> _time_line({"seconds": 12.3}, [])
    'total 12 s'
    >>> _time_line({"seconds": 12.3, "earlier_runs": 2}, [{"seconds": 30.0}, {"seconds": 40.4}, {"seconds": 11.0}])
    'the command took 12 s, 2 of the 3 runs finished by earlier commands; the runs took 81 s in all'
    """
    earlier = doc.get("earlier_runs", 0)
    if not earlier:
        return f"total {doc.get('seconds', 0):.0f} s"
    return (f"the command took {doc.get('seconds', 0):.0f} s, {earlier} of the {len(runs)} runs finished by earlier "
            f"commands; the runs took {sum(r.get('seconds', 0) for r in runs):.0f} s in all")


def _kept_lines(runs: list[dict[str, Any]], kept: int) -> list[str]:
    """Which runs the report covers when ``--resume`` kept finished runs outside the last command's grid (the last
    ``kept`` of ``runs``): how many of each, and the kept ones by task set, mode, backbone and configuration."""
    if not kept:
        return []
    cells: dict[str, list[int]] = {}
    for r in runs[-kept:]:
        cells.setdefault(f"{','.join(r['tasks'])} {r['mode']} {r['backbone']} {r['config']}", []).append(r["seed"])
    listed = "; ".join(f"`{cell}` seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, sorted(seeds)))}"
                       for cell, seeds in cells.items())
    return [f"**{len(runs)} runs: the {len(runs) - kept} of the last command's grid and {kept} finished earlier in "
            f"this folder, outside that grid, kept by `--resume`** ({listed}).", ""]


def _windows(group: list[dict[str, Any]], mode: str) -> list[str]:
    """The windows a (task set, mode) section reports: ``served`` where every run has it (results from before it, or
    of ``--publications 0``, do not)."""
    if mode == "split":
        return ["test"]
    return ["all", "tail"] + (["served"] if all("served" in r["metrics"] for r in group) else [])


def _protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """What the runs shared and how to read the tables."""
    lines: list[str] = []
    if protocol.get("validation"):
        ranges = protocol.get("validation_rows", {})
        used, events = ranges.get("used", ["?", "?"]), ranges.get("events", "?")
        lines += [f"**Validation slice: rows {used[0]}..{used[1]} (end exclusive) of {events}; the test split was "
                  f"not used.** Split mode trains on rows {_span(ranges.get('split_train'))} and tests on rows "
                  f"{_span(ranges.get('split_test'))}; the prequential tail window is rows "
                  f"{_span(ranges.get('prequential_tail'))}.", ""]
    if protocol:
        lines += [f"Protocol: {json.dumps(protocol, sort_keys=True)}", ""]
    if protocol.get("validation"):
        test_share = protocol.get("validation_test_fraction", VALIDATION_TEST_FRACTION)
        split_text = f"train on the first {1 - test_share:.0%} of the validation slice in time order, test on the rest"
    else:
        split_text = (f"train on the first {protocol.get('train_fraction', 0.8):.0%} of events in time order, "
                      "test on the rest")
    return lines + [f"Cells are mean ± sample std over seeds. Split mode: {split_text}. "
                    "Prequential: every mini-batch scored before the model learns from it. Calib = mean(p)/mean(y). "
                    "NDCG@10: mean over users (with at least 2 events of different relevance) of the NDCG of the "
                    "task's score in the user's first 10, relevance 2·y + y_partner. Combined score: prod_k p_k^w_k; "
                    "its AUC is against every task positive, its NDCG@10 uses the number of positive tasks as "
                    "relevance." + _served_text(protocol.get("publications")), ""]


def _served_text(publications: int | None) -> str:
    """The legend of the prequential ``served`` window, where the grid had one."""
    if not publications:
        return ""
    return (f" Window `served`: the tail scored as serving replicas score it, the model published {publications} "
            "times over it (equal stretches of rows) and frozen in between; its GAUC and NDCG@10 rank a user's rows "
            "within one stretch (one state of the model), where `tail` pools a user's rows over every state the model "
            "passed through, so an input that follows the user's own labels (online counts) moves them apart.")


def _cells(group: list[dict], backbones: list[str], configs: list[str]) -> Iterable[tuple[str, str, list[dict]]]:
    """(backbone, config, its runs) for every pair that has runs, in table order."""
    for backbone in backbones:
        for config in configs:
            cell = [r for r in group if r["backbone"] == backbone and r["config"] == config]
            if cell:
                yield backbone, config, cell


def _window_section(group: list[dict], tasks: tuple[str, ...], mode: str, window: str,
                    baseline: str = "mtl") -> list[str]:
    """One (task set, mode, window): a table per task, the combined score, paired differences to ``baseline``."""
    backbones = _ordered((r["backbone"] for r in group), BACKBONES)
    configs = _ordered((r["config"] for r in group), CONFIGS)
    seeds = sorted({r["seed"] for r in group})
    lines = [f"## Tasks {', '.join(tasks)} — {mode}, window `{window}` ({len(seeds)} seeds)", ""]
    for task in tasks:
        header = ["backbone", "config"] + [name for _, name in TABLE_METRICS]
        lines += [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backbone, config, cell in _cells(group, backbones, configs):
            values = [_fmt(*_mean_std([_task_metric(r, window, task, key) for r in cell]),
                           digits=2 if key == "calibration" else 4) for key, _ in TABLE_METRICS]
            lines.append(f"| {backbone} | {config} | " + " | ".join(values) + " |")
        lines.append("")
    with_combined = [r for r in group if _combined_metric(r, window, "weights") is not None]
    if with_combined:
        weights = " · ".join(f"p_{t}^{w:g}" for t, w in zip(tasks, with_combined[0]["combined"][window]["weights"]))
        lines += [f"### Combined score {weights}", "",
                  "| backbone | config | AUC (all tasks positive) | NDCG@10 (number of positive tasks) |",
                  "|---|---|---|---|"]
        for backbone, config, cell in _cells(with_combined, backbones, configs):
            values = [_fmt(*_mean_std([_combined_metric(r, window, key) for r in cell])) for key in ("auc", "ndcg10")]
            lines.append(f"| {backbone} | {config} | " + " | ".join(values) + " |")
        lines.append("")
    if baseline in configs and len(configs) > 1:
        lines += _paired_differences(group, tasks, window, backbones, configs, len(seeds), baseline)
    return lines


def _gate_section(group: list[dict], tasks: tuple[str, ...], mode: str) -> list[str]:
    """The trust gate of the gated configurations (``models.trust_gate``): per task, the share of training steps
    that distilled and the teacher's and the student's windowed AUC at the gate's decisions (means of the runs'
    per-step values, ``RunResult.losses``), mean ± std over seeds; nothing when no run reported a gate."""
    gated = [r for r in group if any(f"gate/{task}" in r.get("losses", {}) for task in tasks)]
    if not gated:
        return []
    backbones = _ordered((r["backbone"] for r in gated), BACKBONES)
    configs = _ordered((r["config"] for r in gated), CONFIGS)
    lines = [f"### Trust gate — {mode}", "",
             "Share of training steps that distilled (the gate open: the teacher's windowed prequential AUC above "
             "the student's), and the two AUCs at the gate's decisions (mean over the steps); where the share is 0 "
             "no distillation reached the student.", "",
             "| backbone | config | task | share of steps distilling | teacher AUC | student AUC |",
             "|---|---|---|---|---|---|"]
    for backbone, config, cell in _cells(gated, backbones, configs):
        for task in tasks:
            values = [_fmt(*_mean_std([r["losses"].get(f"{key}/{task}", math.nan) for r in cell]),
                           digits=2 if key == "gate" else 4) for key in ("gate", "teacher_auc", "student_auc")]
            lines.append(f"| {backbone} | {config} | {task} | " + " | ".join(values) + " |")
    return lines + [""]


def _cadence_section(group: list[dict], tasks: tuple[str, ...]) -> list[str]:
    """``--cadence``: per task, the tail's AUC served at each publication count beside the prequential tail's (every
    batch scored by the model of just before it: publishing after every step), mean ± std over seeds; nothing for
    runs without it."""
    runs = [r for r in group if r.get("cadence")]
    if not runs:
        return []
    counts = sorted({c["publications"] for r in runs for c in r["cadence"]})
    backbones = _ordered((r["backbone"] for r in runs), BACKBONES)
    configs = _ordered((r["config"] for r in runs), CONFIGS)
    events = {c["publications"]: c["events_per_publication"] for r in runs for c in r["cadence"]}
    lines = ["### Publication cadence — prequential tail", "",
             "The tail scored as serving scores it with the model published N times over it (frozen in between; N = "
             "1: never updated after the first part), against the prequential tail (the model of just before each "
             "batch). AUC, mean ± std over seeds; events per publication: "
             + ", ".join(f"N = {n}: {events[n]:,.0f}" for n in counts) + ".", ""]
    for task in tasks:
        header = ["backbone", "config"] + [f"N = {n}" for n in counts] + ["prequential tail"]
        lines += [f"#### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backbone, config, cell in _cells(runs, backbones, configs):
            served = {n: [c["metrics"][task]["auc"] for r in cell for c in r["cadence"] if c["publications"] == n]
                      for n in counts}
            values = [_fmt(*_mean_std(served[n])) for n in counts]
            values.append(_fmt(*_mean_std([_task_metric(r, "tail", task, "auc") for r in cell])))
            lines.append(f"| {backbone} | {config} | " + " | ".join(values) + " |")
        lines.append("")
    return lines


def _paired_differences(group: list[dict], tasks: tuple[str, ...], window: str, backbones: list[str],
                        configs: list[str], n_seeds: int, baseline: str = "mtl") -> list[str]:
    """Each config minus ``baseline`` on the same backbone and seed, per metric."""
    lines = [f"Paired differences to `{baseline}` (same backbone and seed), mean ± std over seeds, "
             f"window `{window}` ({n_seeds} seed{'' if n_seeds == 1 else 's'}); {_paired_rule(n_seeds)}", ""]
    header = (["backbone", "config"] + [f"{name} {t}" for _, name in DIFF_TASK_METRICS for t in tasks]
              + [name for _, name in DIFF_COMBINED_METRICS])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []  # (backbone, config, each column's differences over the seeds)
    for backbone, config, cell in _cells(group, backbones, [c for c in configs if c != baseline]):
        base = {r["seed"]: r for r in group if r["backbone"] == backbone and r["config"] == baseline}
        cell = [r for r in cell if r["seed"] in base]
        if not cell:
            continue
        columns = [[_sub(_task_metric(r, window, task, key), _task_metric(base[r["seed"]], window, task, key))
                    for r in cell] for key, _ in DIFF_TASK_METRICS for task in tasks]
        columns += [[_sub(_combined_metric(r, window, key), _combined_metric(base[r["seed"]], window, key))
                     for r in cell] for key, _ in DIFF_COMBINED_METRICS]
        rows.append((backbone, config, columns))
    p_values = {(i, j): _paired_p_value(d) for i, (_, _, columns) in enumerate(rows) for j, d in enumerate(columns)}
    tested = [key for key, p in p_values.items() if p is not None]
    from consumers.tools.comparison import holm  # lazy: it loads numpy, which `crossdistil evaluate --help` does not

    adjusted = dict(zip(tested, holm([p_values[key] for key in tested])))
    for i, (backbone, config, columns) in enumerate(rows):
        out = [_fmt_diff(d, p_values[i, j], adjusted.get((i, j))) for j, d in enumerate(columns)]
        lines.append(f"| {backbone} | {config} | " + " | ".join(out) + " |")
    return lines + [""]


def _paired_rule(n_seeds: int) -> str:
    """The paired table's sentence on what bold means.

    >>> "(t = 2.78 for 5 seeds)" in _paired_rule(5), "(no test with one seed)" in _paired_rule(1)
    (True, True)
    """
    quantile = f"t = {t_critical(n_seeds):.2f} for {n_seeds} seeds" if n_seeds > 1 else "no test with one seed"
    return (f"**bold** where a two-sided paired t-test rejects no difference at {1 - SIGNIFICANCE:.0%}: |mean| > t "
            f"std/sqrt(n), t the Student quantile for n - 1 degrees of freedom ({quantile}), each cell tested on its "
            "own; † where it still does after Holm's adjustment over all the table's cells (the chance that any † "
            f"of the table is noise at most {1 - SIGNIFICANCE:.0%}):")


def _span(bounds: Sequence[int] | None) -> str:
    return f"{bounds[0]}..{bounds[1]}" if bounds else "?"


def _task_metric(run: dict[str, Any], window: str, task: str, key: str) -> Any:
    """A run's per-task metric, or None when its results predate the metric."""
    return run["metrics"][window][task].get(key)


def _combined_metric(run: dict[str, Any], window: str, key: str) -> Any:
    """A run's combined-score metric, or None when its results predate the combined score."""
    return (run.get("combined") or {}).get(window, {}).get(key)


def _sub(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return float("nan")
    return a - b


def _fmt_diff(diffs: Sequence[float], p_value: float | None = None, p_holm: float | None = None) -> str:
    """A paired table's cell: mean ± std of ``diffs``, bold where ``p_value`` (``_paired_p_value``'s) rejects no
    difference at ``SIGNIFICANCE``, then † where ``p_holm`` (the same adjusted over the table) does too."""
    mean, std = _mean_std(diffs)
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:+.4f} ± {std:.4f}"
    alpha = 1 - SIGNIFICANCE
    text = f"**{text}**" if p_value is not None and p_value <= alpha else text
    return text + "†" if p_holm is not None and p_holm <= alpha else text


def _paired_p_value(diffs: Sequence[float]) -> float | None:
    """Two-sided p-value of a paired t-test of the finite ``diffs`` against 0 (Student's t, n - 1 degrees of
    freedom); None where there is no test: fewer than 2 differences, or no spread among them.

    >>> round(_paired_p_value([0.01, 0.02, 0.03]), 4), _paired_p_value([0.01, 0.01]), _paired_p_value([0.1])
    (0.0742, None, None)
    """
    mean, std = _mean_std(diffs)
    n = sum(1 for d in diffs if d is not None and math.isfinite(d))
    if n < 2 or not std > 0:
        return None
    from consumers.tools.comparison import p_value  # lazy: it loads numpy, which `crossdistil evaluate --help` does not

    return p_value(mean, std / math.sqrt(n), n - 1)


def t_critical(n: int, level: float = SIGNIFICANCE) -> float:
    """How many standard errors (std / sqrt(n)) a mean of ``n`` paired differences must lie from 0 for a two-sided
    t-test at ``level`` to call it a difference: Student's t quantile with n - 1 degrees of freedom (few seeds leave
    the standard deviation itself uncertain, so the normal's 1.96, or 2, would call noise a difference far more often
    than 1 in 20 times: with 5 seeds |t| > 2 happens 12% of the time when nothing differs).

    >>> [round(t_critical(n), 2) for n in (2, 3, 5, 10, 1000)]
    [12.71, 4.3, 2.78, 2.26, 1.96]
    """
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 paired differences, got {n}")
    from consumers.tools.comparison import t_quantile  # lazy: it loads numpy, which `evaluate --help` does not

    return t_quantile(n - 1, level)


def plot_curves(doc: dict[str, Any], path: Path) -> None:
    """AUC against training progress: one panel per (task set, mode, task) x backbone, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if r.get("curve")]
    panels = [(tasks, mode, task) for tasks, mode in _groups(runs) for task in tasks]
    backbones = _ordered((r["backbone"] for r in runs), BACKBONES)
    configs = _ordered((r["config"] for r in runs), CONFIGS)
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), len(backbones), figsize=(4 * len(backbones), 3 * len(panels)),
                             squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (tasks, mode, task) in enumerate(panels):
        for col, backbone in enumerate(backbones):
            ax = axes[row][col]
            for i, config in enumerate(configs):
                cell = [r for r in runs if tuple(r["tasks"]) == tasks and r["mode"] == mode
                        and r["backbone"] == backbone and r["config"] == config]
                if not cell:
                    continue
                xs = [p["fraction"] for p in cell[0]["curve"]]
                ys = []
                for k in range(len(xs)):
                    ys.append(_mean_std([r["curve"][k]["auc"][task] for r in cell if len(r["curve"]) > k])[0])
                ax.plot(xs, ys, label=config, color=colors[i % len(colors)], linewidth=1.2)
            what = "test AUC" if mode == "split" else "prequential AUC (window)"
            ax.set_title(f"{task} ({'/'.join(tasks)}) — {backbone}", fontsize=9)
            ax.set_ylabel(what, fontsize=8)
            ax.grid(alpha=0.3)
            if row == len(panels) - 1:
                ax.set_xlabel("share of training done", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], out: Path, title: str = "", baseline: str = "mtl") -> None:
    """results.json, report.md (paired differences to ``baseline``) and auc_curve.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_clean(doc), indent=1, sort_keys=False) + "\n")
    (out / "report.md").write_text(render_report(doc, title, baseline))
    plot_curves(doc, out / "auc_curve.png")


def merge_results(paths: Sequence[str]) -> dict[str, Any]:
    """One document from several results.json files (runs concatenated, commands listed)."""
    docs = [_results_doc(p) for p in paths]
    merged = dict(docs[0])
    merged["commands"] = [c for d in docs for c in (d.get("commands") or [d.get("command", "")])]
    merged.pop("command", None)
    if len(docs) > 1:  # the kept runs are the last of docs[0] only, not of the runs merged
        merged.pop("kept_runs", None)
    merged["runs"] = [r for d in docs for r in d["runs"]]
    merged["seconds"] = sum(d.get("seconds", 0) for d in docs)
    merged.pop("earlier_runs", None)
    if earlier := sum(d.get("earlier_runs", 0) for d in docs):
        merged["earlier_runs"] = earlier
    return merged


def _results_doc(path: str) -> dict[str, Any]:
    """A results.json of ``crossdistil evaluate`` (``ValueError`` naming the file otherwise)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--from-results {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ValueError(f"--from-results {path}: not the results.json of a 'crossdistil evaluate' (it has no list "
                         "of runs)")
    return doc


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil evaluate``."""
    if not args.out:
        print("crossdistil evaluate: --out DIR is required (where results.json, report.md and auc_curve.png go)",
              file=sys.stderr)
        return 2
    try:
        check_output_folder(Path(args.out), "--out")
        doc = merge_results(args.from_results) if args.from_results else run_grid(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"crossdistil evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        write_outputs(doc, Path(args.out), args.title, args.baseline)
    except OSError as exc:  # checked before the grid, so something changed meanwhile (or the disk is full)
        print(f"crossdistil evaluate: the runs are done but the report could not be written to {args.out}: {exc}"
              f"{'' if args.from_results else f' (each run is in {Path(args.out) / RUN_LOG}: --resume writes it)'}",
              file=sys.stderr)
        return 1
    if args.baseline != "mtl" and args.baseline not in {r["config"] for r in doc["runs"]}:
        print(f"crossdistil evaluate: --baseline {args.baseline!r} is not a configuration of these runs (they have "
              f"{sorted({r['config'] for r in doc['runs']})}): the report has no paired differences; rewrite it "
              f"with --from-results {Path(args.out) / 'results.json'} --baseline NAME", file=sys.stderr)
    if not args.from_results:
        (Path(args.out) / RUN_LOG).unlink(missing_ok=True)  # every run is in results.json now
    kept = f", {doc['kept_runs']} of them kept from earlier in --out" if doc.get("kept_runs") else ""
    print(f"wrote {Path(args.out) / 'results.json'}, report.md and auc_curve.png ({len(doc['runs'])} runs{kept})")
    return 0
