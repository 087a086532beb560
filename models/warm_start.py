"""Warm start: a new model initialised from an older model's tensors wherever they still mean the same thing.

A structural change of ``ModelConfig`` (``models.config.STRUCTURAL_OPTIONS``: a task or a feature added, another
backbone, wider layers) makes a new model, which a restore refuses. ``carry_over(saved_config, saved, config, model)``
initialises the new ``model`` from the old one's ``state_dict`` tensors instead: every tensor of the new model with
a counterpart of the same *meaning* in the old one takes its values, whole or in part; the rest keeps its fresh
initialisation. ``Learner.warm_start`` is the learner's entry point (its optimizers, step count, trust gates and
pair-sampling generator stay those of a new learner).

Meaning, not position:

* a task's towers, its gates (MMoE, PLE) and its cross-stitch column are named by the task, not by their index, so
  a task inserted before another does not hand its tower to the wrong task (``student_towers.1`` of a model of
  tasks ``(click, long_view)`` is ``student_towers.<long_view>``; a gate is ``<student:click>`` or
  ``<teacher:click>``);
* an axis that runs over tasks (the wide part's and the calibrators' columns, the counts' label sums, the
  cross-stitch matrices), over the backbone's inputs (the first layers' columns: each categorical field's embedding,
  each numeric field, each counted field's count and rates), over the counted fields (the counts' tables) or over
  the experts a PLE shared gate weighs is matched entry by entry: the entries of the tasks and features kept are
  copied, those of a new task or feature stay fresh;
* every other axis must have the same size (a wider layer is a new layer), and some tensors go whole or not at
  all: the numeric normaliser's statistics (one count for all fields) only with the same numeric fields; the
  embedding table and the wide table only with the same ``hash_buckets`` (a value's row depends on it); the wide
  table's cross rows only while the old crosses are the first of the new ones (a cross's rows depend on its place).

Everything else (a tower of a changed backbone, whose input width is unchanged, included) is matched by name and
shape, as a plain ``load_state_dict`` of the matching subset would.

>>> from models.crossdistil import CrossDistilModel
>>> small = {"rung": "mtl", "hidden_dims": (8,), "tower_dims": (4,), "features": {"hash_buckets": 1024}}
>>> old_config, new_config = ModelConfig(tasks=("click",), **small), ModelConfig(tasks=("like", "click"), **small)
>>> old, new = CrossDistilModel(old_config), CrossDistilModel(new_config)
>>> report = carry_over(old_config, old.state_dict(), new_config, new)
>>> bool(torch.equal(new.student_towers[1][1].weight, old.student_towers[0][1].weight))  # click's tower
True
>>> report["new"][:2], report["partly"]["wide.bias"]  # like's tower is new; the wide bias of click is carried
(['student_towers.0.0.0.weight', 'student_towers.0.0.0.bias'], [1, 2])
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.wide import parse_cross

# One labelled axis: its entries in runs, (what they mean, how many); entries match where the meanings do. None: an
# axis whose entries mean their position only (equal sizes copy whole, other sizes nothing).
Segment = tuple[Any, int]
Axis = tuple[Segment, ...] | None


@dataclass(frozen=True)
class Layout:
    """What a tensor of a model means: its name with tasks for indices (``meaning``), its axes, and what must be equal
    in the two models for any of it to be copied (``requires``)."""

    meaning: str
    axes: tuple[Axis, ...]
    requires: Any = None


def carry_over(saved_config: ModelConfig, saved: Mapping[str, torch.Tensor], config: ModelConfig,
               model: nn.Module) -> dict[str, Any]:
    """Copy into ``model`` (a ``CrossDistilModel`` of ``config``) the values of ``saved`` (the ``state_dict`` of one
    of ``saved_config``) that mean the same thing in both (module docstring). Returns a report of plain values:
    ``carried`` (names of the tensors copied whole), ``partly`` ({name: [values copied, values]}), ``new`` (names of
    the tensors left as initialised), ``unused`` (names of the saved tensors nothing was copied from), and
    ``values`` ({"carried", "new", "unused"}: how many numbers each of those holds, a partly copied tensor's shared
    between carried and new)."""
    target = model.state_dict()  # references to the live tensors
    old = layouts(saved_config, {name: tuple(t.shape) for name, t in saved.items()})
    new = layouts(config, {name: tuple(t.shape) for name, t in target.items()})
    source_of = {layout.meaning: name for name, layout in old.items()}
    report: dict[str, Any] = {"carried": [], "partly": {}, "new": [], "unused": [],
                              "values": {"carried": 0, "new": 0, "unused": 0}}
    used: set[str] = set()
    with torch.no_grad():
        for name, tensor in target.items():
            layout = new[name]
            source = source_of.get(layout.meaning)
            copied = 0
            if source is not None and old[source].requires == layout.requires:
                copied = _copy(saved[source], old[source].axes, tensor, layout.axes)
            total = tensor.numel()
            if copied:
                used.add(source)
            if copied == total and saved[source].numel() == total:
                report["carried"].append(name)
            elif copied:
                report["partly"][name] = [copied, total]
            else:
                report["new"].append(name)
            report["values"]["carried"] += copied
            report["values"]["new"] += total - copied
        stamp, clock = target.get("counts.stamp"), target.get("counts.clock")
        if stamp is not None and "counts.stamp" in report["new"] and clock is not None:
            stamp.fill_(int(clock))  # counts kept without forgetting before: as of now, not aged from row 0
    report["unused"] = [name for name in saved if name not in used]
    report["values"]["unused"] = sum(saved[name].numel() for name in report["unused"])
    return report


def describe(report: Mapping[str, Any], limit: int = 12) -> str:
    """``carry_over``'s report in a few lines: counts of tensors and values, then the names of the new, partly
    copied and unused tensors (the first ``limit`` of each).

    >>> print(describe({"carried": ["a", "b"], "partly": {"c": [3, 4]}, "new": ["d"], "unused": [],
    ...                 "values": {"carried": 7, "new": 2, "unused": 0}}))
    carried over 2 tensors whole and 1 in part (7 values); 1 tensors new; 2 values freshly initialised (the new
    tensors' and the new entries of those in part);
    0 tensors of the old model unused (0 values)
      in part: c (3 of 4 values)
      new: d
    """
    values = report["values"]
    lines = [f"carried over {len(report['carried'])} tensors whole and {len(report['partly'])} in part "
             f"({values['carried']:,} values); {len(report['new'])} tensors new; {values['new']:,} values freshly "
             f"initialised (the new tensors' and the new entries of those in part);\n{len(report['unused'])} tensors "
             f"of the old model unused ({values['unused']:,} values)"]

    def names(items: Sequence[str]) -> str:
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    if report["partly"]:
        lines.append("  in part: " + names([f"{name} ({copied:,} of {total:,} values)"
                                            for name, (copied, total) in report["partly"].items()]))
    for key, what in (("new", "new"), ("unused", "unused")):
        if report[key]:
            lines.append(f"  {what}: {names(report[key])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ layouts


def layouts(config: ModelConfig, shapes: Mapping[str, Sequence[int]]) -> dict[str, Layout]:
    """The ``Layout`` of each tensor ``name -> shape`` of the ``state_dict`` of a ``CrossDistilModel`` of
    ``config``. An axis whose labels do not add up to its size (a layout this function does not know) is left
    unlabelled: copied only whole, at equal sizes."""
    spec = config.features
    learnt, tasks = config.learnt_tasks, config.tasks
    heads = [("student", t) for t in learnt] + ([("teacher", t) for t in learnt] if config.has_teachers else [])
    per_learnt = tuple((("task", t), 1) for t in learnt)
    per_task = tuple((("task", t), 1) for t in tasks)
    numeric = tuple((("numeric", x), 1) for x in spec.numeric)
    singles, crosses = _count_fields(config)
    count_columns = ((("rows counted",), 1),) + per_task
    inputs = (tuple((("embedding", f, spec.hash_buckets, config.embedding_dim), config.embedding_dim)
                    for f in spec.categorical)
              + numeric
              + tuple(((("count input", f, "rows counted") if task is None else ("count input", f, "rate", task)), 1)
                      for f in singles + crosses for task in (None, *tasks)))
    fields = (tuple((("count", f), 1) for f in singles)
              + tuple((("count cross", f, j), 1) for j, f in enumerate(crosses)))
    wide_crosses = tuple(pair for pair in map(parse_cross, config.wide_crosses)
                         if pair[0] in spec.categorical and pair[1] in spec.categorical)
    first = _FIRST_LAYERS[config.backbone]

    out: dict[str, Layout] = {}
    for name, shape in shapes.items():
        meaning, axes, requires = _named_by_task(name, config, learnt, heads), [None] * len(shape), None
        if name in ("normalizer.count", "normalizer.mean", "normalizer.m2"):
            requires = ("numeric", spec.numeric)  # one count for every field: the statistics go whole or not at all
        elif name == "embedding.weight":
            axes[0] = ((("rows", spec.hash_buckets), spec.hash_buckets),)
        elif name == "wide.weight.weight":
            cross_rows = shape[0] - spec.hash_buckets
            axes[0] = ((("rows", spec.hash_buckets), spec.hash_buckets),) + (
                ((("cross rows", spec.hash_buckets, wide_crosses), cross_rows),) if cross_rows > 0 else ())
            axes[1] = per_learnt
        elif name == "wide.numeric":
            axes = [numeric, per_learnt]
        elif name == "wide.bias":
            axes = [per_learnt]
        elif name in ("calibrator_alpha", "calibrator_bias"):
            axes = [per_task]
        elif name == "counts.table":
            axes = [fields, None, count_columns]
        elif name == "counts.totals":
            axes = [count_columns]
        elif name == "counts.stamp":
            axes = [fields, None]
        elif re.fullmatch(r"backbone\.stitches\.\d+", name):
            axes = [per_learnt, per_learnt]
        elif re.fullmatch(r"backbone\.levels\.\d+\.shared_gate\.(weight|bias)", name):
            axes[0] = (tuple((("shared expert", s), 1) for s in range(config.ple_shared_experts))
                       + tuple((("specific expert", head, j), 1) for head in heads
                               for j in range(config.ple_specific_experts)))
        if first.fullmatch(name) and len(shape) == 2:
            axes[1] = inputs
        out[name] = Layout(meaning, tuple(_checked(axis, size) for axis, size in zip(axes, shape)), requires)
    return out


# The backbone's first layers, whose input columns are the embeddings, numerics and counts (CrossDistilModel._inputs).
_FIRST_LAYERS = {
    "shared_bottom": re.compile(r"backbone\.bottom\.0\.weight"),
    "mmoe": re.compile(r"backbone\.(experts\.\d+\.0|gates\.\d+)\.weight"),
    "ple": re.compile(r"backbone\.levels\.0\.(shared\.\d+\.0|specific\.\d+\.\d+\.0|gates\.\d+|shared_gate)\.weight"),
    "cross_stitch": re.compile(r"backbone\.columns\.\d+\.0\.0\.weight"),
}


def _named_by_task(name: str, config: ModelConfig, learnt: Sequence[str], heads: Sequence[tuple[str, str]]) -> str:
    """``name`` with each index of a task's module replaced by the task (``student_towers.<click>.1.weight``)."""
    match = re.fullmatch(r"(student_towers|teacher_towers)\.(\d+)\.(.*)", name)
    if match and int(match.group(2)) < len(learnt):
        return f"{match.group(1)}.<{learnt[int(match.group(2))]}>.{match.group(3)}"
    if config.backbone == "cross_stitch":
        match = re.fullmatch(r"backbone\.columns\.(\d+)\.(.*)", name)
        if match and int(match.group(1)) < len(learnt):
            return f"backbone.columns.<{learnt[int(match.group(1))]}>.{match.group(2)}"
    elif config.backbone in ("mmoe", "ple"):
        match = re.fullmatch(r"(backbone\.gates|backbone\.levels\.\d+\.(?:gates|specific))\.(\d+)\.(.*)", name)
        if match and int(match.group(2)) < len(heads):
            kind, task = heads[int(match.group(2))]
            return f"{match.group(1)}.<{kind}:{task}>.{match.group(3)}"
    return name


def _count_fields(config: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The counted single fields and crosses in the order of the counts' table (``models.counts.CountFeatures``:
    those of absent fields left out)."""
    known = set(config.features.categorical)
    singles = tuple(f for f in config.count_features if "*" not in f and f in known)
    crosses = tuple(f for f in config.count_features
                    if "*" in f and set(parse_cross(f, "count_features")) <= known)
    return singles, crosses


def _checked(axis: Axis, size: int) -> Axis:
    """``axis``, or None where its segments do not add up to ``size``."""
    if axis is None or sum(length for _, length in axis) != size:
        return None
    return axis


# ------------------------------------------------------------------------------------------------ copying


def _copy(source: torch.Tensor, source_axes: Sequence[Axis], target: torch.Tensor, target_axes: Sequence[Axis]) -> int:
    """Copy the entries of ``source`` that mean the same as entries of ``target``; how many values were copied."""
    if source.dim() != target.dim():
        return 0
    if target.dim() == 0:
        target.copy_(source)
        return 1
    runs = [_runs(a, b, s, t) for a, b, s, t in zip(source_axes, target_axes, source.shape, target.shape)]
    if not all(runs):
        return 0
    copied = 0
    for combination in itertools.product(*runs):
        target[tuple(slice(new, new + n) for _, new, n in combination)].copy_(
            source[tuple(slice(old, old + n) for old, _, n in combination)])
        copied += math.prod(n for _, _, n in combination)
    return copied


def _runs(old: Axis, new: Axis, old_size: int, new_size: int) -> list[tuple[int, int, int]]:
    """(old start, new start, length) of the entries two axes share, adjacent ones merged into one run."""
    if old is None or new is None:
        return [(0, 0, new_size)] if old is None and new is None and old_size == new_size else []
    runs: list[tuple[int, int, int]] = []
    new_at = 0
    for key, length in new:
        old_at = 0
        for old_key, old_length in old:
            if old_length == length and _same_meaning(old_key, key):
                last = runs[-1] if runs else None
                if last is not None and last[0] + last[2] == old_at and last[1] + last[2] == new_at:
                    runs[-1] = (last[0], last[1], last[2] + length)
                else:
                    runs.append((old_at, new_at, length))
                break
            old_at += old_length
        new_at += length
    return runs


def _same_meaning(old: Any, new: Any) -> bool:
    """Whether two entries' labels mean the same: equal, or the wide table's cross rows of crosses that start with
    the old ones (a cross's rows depend on its place among the crosses: appended ones leave them where they were)."""
    if old == new:
        return True
    return (isinstance(old, tuple) and isinstance(new, tuple) and old[:1] == new[:1] == ("cross rows",)
            and old[1] == new[1] and new[2][:len(old[2])] == old[2])
