"""Training-step benchmark of the default CrossDistil model; prints one JSON object.

    python bench/train_step.py                 # CPU, one thread, about a minute
    python bench/train_step.py --device cuda   # same measurements on a GPU

Measures (all on pre-encoded synthetic batches shaped like KuaiRand: user, item, author, hour, duration):
* ``throughput``: samples/s of ``Learner.step`` at each batch size, sparse (the embedding optimizer on the touched
  rows: per-row AdaGrad by default, SparseAdam with ``embedding_optimizer="adam"``) and dense (the same optimizer
  on the whole table's gradient) side by side; ``sparse_pipelined_samples_per_s``: steps issued back to back with
  ``Learner.step_async``, each read after the next is issued (on a GPU: no synchronisation between steps);
* ``breakdown``: share of a step spent on the embedding side (lookup, its backward, its optimizer) vs the
  dense side (backbone, towers, losses, their backward and optimizer);
* ``table_sizes``: step time at tables of 2^16, 2^19 and 2^22 rows (target: sparse changes <= 20 %);
* ``encode``: ``encode_rows`` rows/s, cold (hash cache empty) and warm;
* ``configs``: step time of each configuration of ``--compare`` (default ``mtl``, the default ``crossdistil``
  and ``crossdistil@paper``) at each batch size, measured in interleaved rounds, and its ratio to ``mtl`` (median
  of the per-round ratios: the machine's load hits every configuration alike). ``--only-compare`` measures this
  alone (about a minute).
* ``embedding_update``: step time with each way of updating the embedding table and the wide part: ``rowwise``
  (``models.rowwise``, the learner's), ``coo`` (torch's sparse Adagrad, or SparseAdam for ``embedding_optimizer=
  "adam"``, on COO gradients, the update before it) and ``dense`` (the table's optimizer on the whole table),
  interleaved, at each batch size.
* ``cuda_graphs`` (``--cuda-graphs``, a CUDA device): samples/s of plain steps and of CUDA-graph replays
  (``Learner.use_cuda_graphs``, models/graphs.py) of the default model at each batch size, both issued back to
  back and read one behind, interleaved, and the median per-round speed-up.

``--against OLD_CHECKOUT`` compares two checkouts side by side instead: each round runs this script's
``--only-compare`` in the old checkout and in this one at the same time (two processes, one thread each), and
reports the samples/s of each configuration and the median of the per-round speed-ups:

    git worktree add /tmp/old <commit>; python bench/train_step.py --against /tmp/old --rounds 5

``--set KEY=VALUE`` (repeatable) sets a ``ModelConfig`` option of every model measured; with ``--against`` it reaches
this checkout only, so both code paths can run one model: the default of the old checkout (e.g. cbfc225's: ``--set
count_features= --set embedding_optimizer=adam --set embedding_lr=0.01``, the options added or changed since).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from models.config import ModelConfig, split_config_name
from models.crossdistil import crossdistil_loss
from models.features import FeatureSpec, encode_rows, hash_bucket
from models.learner import Learner
from models.privileged import teacher_spec

TASKS = ("click", "long_view")
# ``--compare mtl,mtl+aux``: six more tasks learnt beside the two (evaluate --aux-tasks), at KuaiRand-Pure's rates
AUX_TASKS = ("follow", "comment", "forward", "profile_enter", "finish", "like")
AUX = "+aux"
# ``--compare mtl,mtl+counted``: the same six outcomes only counted (ModelConfig.counted_tasks: no tower, no loss)
COUNTED = "+counted"
# ``--compare mtl,mtl+crosses``: online counts of three crosses of the bench's fields beside the user's and the
# item's (ModelConfig.count_features; what a cross costs does not depend on which fields it crosses)
CROSSES = "+crosses"
COUNT_CROSSES = ("user_id*hour", "user_id*author_id", "item_id*hour")
# ``--compare mtl+crosses,mtl+crosses+field``: the crosses with their own smoothing, read against their first
# field's rate (count_cross_smoothing, count_cross_prior = "field": the inputs' other code path)
FIELD = "+field"
SPEC_FIELDS = dict(categorical=("user_id", "item_id", "author_id", "hour"), numeric=("duration_ms",))


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """KuaiRand-like rows: 10k users, 100k items (Zipf-ish popularity), 4 label categories all present."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 10_000, n)
    items = np.minimum(rng.zipf(1.3, n), 100_000)
    hours = rng.integers(0, 24, n)
    duration = rng.exponential(30_000.0, n)
    click = rng.random(n) < 0.65
    long_view = rng.random(n) < np.where(click, 0.7, 0.02)
    play = rng.random(n)  # drawn after the rest: the rows' other fields are those of the bench before it
    aux = rng.random((n, len(AUX_TASKS))) < np.array([0.0013, 0.0025, 0.0009, 0.0185, 0.137, 0.017])  # ... and last
    return [
        {"user_id": str(users[i]), "item_id": str(items[i]),
         "features": {"author_id": str(items[i] // 10), "hour": int(hours[i]), "duration_ms": float(duration[i]),
                      "play_ms": float(duration[i] * play[i])},  # read only by a privileged teacher's spec
         "labels": {"click": int(click[i]), "long_view": int(long_view[i]),
                    **{t: int(aux[i, k]) for k, t in enumerate(AUX_TASKS)}}}  # learnt only by a "+aux" configuration
        for i in range(n)
    ]


# ``--set KEY=VALUE`` options of the model, on every configuration this checkout measures (empty: the defaults).
MODEL_SET: dict = {}


# ``--compare mtl,mtl+privileged``: a configuration with a privileged teacher (models/privileged.py) reading play_ms
PRIVILEGED = "+privileged"


def config(buckets: int, sparse: bool, bf16: bool, name: str = "crossdistil") -> ModelConfig:
    """The bench model of ``name``: RUNG or RUNG@PRESET, then ``+aux`` or ``+counted``, ``+crosses`` and/or
    ``+field`` and/or ``+privileged`` in any order."""
    suffixes = [s for s in (AUX, COUNTED, CROSSES, FIELD, PRIVILEGED) if s in name]
    base = name
    for suffix in suffixes:
        base = base.replace(suffix, "")
    privileged = ("play_ms",) if PRIVILEGED in suffixes else ()
    tasks = TASKS + AUX_TASKS if AUX in suffixes or COUNTED in suffixes else TASKS
    counted = {"aux_tasks": AUX_TASKS, "counted_tasks": AUX_TASKS} if COUNTED in suffixes else {}
    if CROSSES in suffixes:
        counted["count_features"] = ModelConfig().count_features + COUNT_CROSSES
    if FIELD in suffixes:
        counted.update(count_cross_smoothing=50.0, count_cross_prior="field")
    rung, preset = split_config_name(base)
    return ModelConfig(tasks=tasks, features=FeatureSpec(**SPEC_FIELDS, hash_buckets=buckets),
                       sparse_embeddings=sparse, bf16=bf16, rung=rung, **{**preset, **MODEL_SET}, **counted,
                       **({"privileged": privileged} if privileged else {}))


def model_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value as JSON where it parses (numbers, lists), else the string.

    >>> model_setting("embedding_lr=0.01"), model_setting("count_features=")
    (('embedding_lr', 0.01), ('count_features', ''))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def compare_configs(names: list[str], batch_sizes: list[int], rows: list[dict], buckets: int, device: torch.device,
                    rounds: int, steps: int, bf16: bool) -> list[dict]:
    """Step time of each named configuration, interleaved over ``rounds``; ratio to the first, per round."""
    out = []
    for size in batch_sizes:
        learners = {name: Learner(config(buckets, True, bf16, name), device=device) for name in names}
        batches = {name: [encode_rows(rows[i * size:(i + 1) * size], teacher_spec(learner.config),
                                        learner.config.tasks)
                          for i in range(3)] for name, learner in learners.items()}  # (= features, no teacher)
        for name, learner in learners.items():
            time_steps(learner, batches[name], len(batches[name]), 1)  # touch every row once
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name, learner in learners.items():
                times[name].append(time_steps(learner, batches[name], 0, steps))
        base = names[0]
        entry: dict = {"batch": size, "step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
                       f"ratio_to_{base}": {n: statistics.median(a / b for a, b in zip(t, times[base]))
                                            for n, t in times.items()}}
        out.append(entry)
        del learners
    return out


def use_embedding_update(learner: Learner, how: str) -> Learner:
    """``learner`` with the embedding table's and the wide part's optimizers of ``how`` (rowwise, coo, dense)."""
    cfg = learner.config
    embedding = [learner.model.embedding.weight]
    wide = list(learner.model.wide.parameters()) if learner.model.wide is not None else []
    adagrad = cfg.embedding_optimizer == "adagrad"  # the table's optimizer (per-row AdaGrad by default)
    if how == "coo":
        learner.embedding_optimizer = (_CooAdagrad(embedding, lr=cfg.embedding_lr, foreach=False) if adagrad
                                       else torch.optim.SparseAdam(embedding, lr=cfg.embedding_lr))
        if wide:
            learner.wide_optimizer = _CooAdagrad(wide, lr=cfg.wide_lr, foreach=False)
    elif how not in ("rowwise", "dense"):  # rowwise: the learner's own (models.optimizers); dense: sparse=False
        raise ValueError(f"unknown embedding update {how!r}")
    return learner


class _CooAdagrad(torch.optim.Adagrad):
    """torch's Adagrad as the learner ran it before models.rowwise (invariant checks off, as it did)."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            return super().step(closure)


def compare_updates(batch_sizes: list[int], rows: list[dict], buckets: int, device: torch.device, rounds: int,
                    steps: int, name: str) -> list[dict]:
    """Step time of ``name`` with each embedding update, interleaved over ``rounds``; speed-up of rowwise."""
    out = []
    for size in batch_sizes:
        spec = config(buckets, True, False).features
        batches = [encode_rows(rows[i * size:(i + 1) * size], spec, TASKS) for i in range(3)]
        learners = {how: use_embedding_update(Learner(config(buckets, how != "dense", False, name), device=device),
                                              how) for how in ("rowwise", "coo", "dense")}
        for learner in learners.values():
            time_steps(learner, batches, len(batches), 1)
        times: dict[str, list[float]] = {how: [] for how in learners}
        for _ in range(rounds):
            for how, learner in learners.items():
                times[how].append(time_steps(learner, batches, 0, steps))
        out.append({"batch": size, "config": name,
                    "step_ms": {how: 1e3 * statistics.median(t) for how, t in times.items()},
                    "samples_per_s": {how: size / statistics.median(t) for how, t in times.items()},
                    "rowwise_speedup": {how: statistics.median(a / b for a, b in zip(t, times["rowwise"]))
                                        for how, t in times.items() if how != "rowwise"}})
        del learners
    return out


def against(old: Path, args: argparse.Namespace) -> dict:
    """``--only-compare`` of the old checkout and of this one, alternating per round; speed-ups new/old."""
    import subprocess

    here = Path(__file__).resolve().parents[1]
    command = ["--only-compare", "--compare", args.compare, "--batch-sizes", args.batch_sizes, "--rounds", "1",
               "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    if args.bf16:  # (a checkout from before bf16 worked on CPUs ignores it there: its fp32 step is the baseline)
        command.append("--bf16")
    # --set reaches this checkout only: the old one runs its own defaults, which the settings can reproduce here
    new_command = command + [f"--set={key}={json.dumps(value) if not isinstance(value, str) else value}"
                             for key, value in MODEL_SET.items()]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    # Both at once, one core each, the cores swapped every round: the machine's load hits both alike, and a core
    # slower than the other for a while (a VM's vCPUs are) favours neither.
    cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []
    for round_ in range(args.rounds):
        started = {}
        for i, (label, root) in enumerate((("old", old), ("new", here))):
            pin = {cores[(i + round_) % 2]} if len(cores) == 2 else None
            started[label] = subprocess.Popen([sys.executable, str(root / "bench" / "train_step.py"),
                                               *(new_command if label == "new" else command)],
                                              cwd=root, stdout=subprocess.PIPE, text=True,
                                              preexec_fn=(lambda p=pin: os.sched_setaffinity(0, p)) if pin else None)
        for label, process in started.items():
            out, _ = process.communicate()
            if process.returncode:
                raise SystemExit(f"{label} checkout's bench failed (exit {process.returncode})")
            runs[label].append(json.loads(out))
    result: dict = {"old": str(old), "new": str(here), "commits": {}, "rounds": args.rounds, "new_set": MODEL_SET,
                    "cores_swapped_each_round": cores if len(cores) == 2 else None, "configs": []}
    for label, root in (("old", old), ("new", here)):
        result["commits"][label] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip()
    for index, entry in enumerate(runs["new"][0]["configs"]):
        size = entry["batch"]
        for name in entry["step_ms"]:
            old_ms = [run["configs"][index]["step_ms"][name] for run in runs["old"]]
            new_ms = [run["configs"][index]["step_ms"][name] for run in runs["new"]]
            result["configs"].append({
                "batch": size, "config": name,
                "old_samples_per_s": size * 1e3 / statistics.median(old_ms),
                "new_samples_per_s": size * 1e3 / statistics.median(new_ms),
                "speedup_median_of_rounds": statistics.median(o / n for o, n in zip(old_ms, new_ms)),
                "old_step_ms_rounds": old_ms, "new_step_ms_rounds": new_ms,
            })
    return result


def compare_graphs(batch_sizes: list[int], rows: list[dict], buckets: int, device: torch.device, rounds: int,
                   steps: int, bf16: bool) -> list[dict]:
    """Plain steps against CUDA-graph replays (``Learner.use_cuda_graphs``, models/graphs.py) of the default
    crossdistil model, both issued back to back and read one behind (evaluate's loop), the batches already on the
    device; interleaved over ``rounds``, the speed-up the median of the per-round ratios. A capture that fails is
    reported as its error (the rest of the benchmark's numbers still come out)."""
    out = []
    for size in batch_sizes:
        spec = config(buckets, True, False).features
        batches = [encode_rows(rows[i * size:(i + 1) * size], spec, TASKS).to(device) for i in range(3)]
        learners = {"plain": Learner(config(buckets, True, bf16), device=device),
                    "graphs": Learner(config(buckets, True, bf16), device=device)}
        learners["graphs"].use_cuda_graphs()
        try:
            for learner in learners.values():
                time_pipelined(learner, batches, 6)  # the warm-up steps and the capture
        except RuntimeError as error:  # e.g. an operation CUDA cannot capture: say which, measure the rest
            out.append({"batch": size, "error": f"{type(error).__name__}: {error}"})
            del learners
            continue
        times: dict[str, list[float]] = {name: [] for name in learners}
        for _ in range(rounds):
            for name, learner in learners.items():
                times[name].append(time_pipelined(learner, batches, 4 * steps))
        out.append({"batch": size,
                    "samples_per_s": {name: size / statistics.median(t) for name, t in times.items()},
                    "speedup": statistics.median(a / b for a, b in zip(times["plain"], times["graphs"])),
                    "replays": learners["graphs"].graphs.replays})
        del learners
    return out


def make_sync(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_steps(learner: Learner, batches: list, warmup: int, steps: int) -> float:
    """Median seconds per ``Learner.step`` (the real API, including the CPU copy of predictions)."""
    sync = make_sync(learner.device)
    for i in range(warmup):
        learner.step(batches[i % len(batches)])
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        learner.step(batches[(warmup + i) % len(batches)])
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pipelined(learner: Learner, batches: list, steps: int) -> float:
    """Seconds per step over ``steps`` steps issued back to back with ``Learner.step_async``, each step's result read
    after the next is issued (as ``crossdistil evaluate`` runs them): on a GPU no synchronisation between steps; on
    a CPU the same as ``time_steps``' step."""
    sync = make_sync(learner.device)
    learner.step(batches[0])
    sync()
    started = time.perf_counter()
    pending = None
    for i in range(steps):
        issued = learner.step_async(batches[i % len(batches)])
        if pending is not None:
            pending.result()
        pending = issued
    pending.result()
    sync()
    return (time.perf_counter() - started) / steps


def timed_components(learner: Learner, batch) -> dict[str, float]:
    """One training step split into embedding and dense parts, timed separately (same math as Learner.step, less the
    online counts' update after it: O(batch) index adds, models/counts.py)."""
    sync = make_sync(learner.device)
    model = learner.model
    batch = batch.to(learner.device)
    marks = [time.perf_counter()]

    def mark() -> None:
        sync()
        marks.append(time.perf_counter())

    looked_up = model.embedding(batch.categorical)
    leaf = looked_up.detach().requires_grad_()
    mark()  # embedding lookup
    numeric = model.normalizer(batch.numeric)
    counts = [model.counts(batch.categorical).to(numeric.dtype)] if model.counts is not None else []
    x = torch.cat([leaf.flatten(1), numeric, *counts], dim=1)  # the counts' reads are timed with the dense part
    wide = model.wide(batch.categorical, numeric) if model.wide is not None else None  # timed with the dense part
    total, _ = crossdistil_loss(model, model.heads(x, batch.labels, wide), batch, learner.pair_generator)
    learner.dense_optimizer.zero_grad(set_to_none=True)
    learner.embedding_optimizer.zero_grad(set_to_none=True)
    if learner.wide_optimizer is not None:
        learner.wide_optimizer.zero_grad(set_to_none=True)
    total.backward()
    mark()  # dense forward, losses, dense backward
    looked_up.backward(leaf.grad)
    mark()  # embedding backward (sparse or dense gradient)
    learner.dense_optimizer.step()
    if learner.wide_optimizer is not None:
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            learner.wide_optimizer.step()
    mark()
    learner.embedding_optimizer.step()
    mark()
    d = np.diff(marks)
    return {"embedding_s": float(d[0] + d[2] + d[4]), "dense_s": float(d[1] + d[3])}


def breakdown(learner: Learner, batches: list, steps: int) -> dict[str, float]:
    parts = [timed_components(learner, batches[i % len(batches)]) for i in range(steps + 1)][1:]
    emb = statistics.median(p["embedding_s"] for p in parts)
    dense = statistics.median(p["dense_s"] for p in parts)
    return {"embedding_ms": 1e3 * emb, "dense_ms": 1e3 * dense, "embedding_share": emb / (emb + dense)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--batch-sizes", default="256,1024,4096")
    parser.add_argument("--table-log2", default="16,19,22", help="embedding table sizes as powers of two")
    parser.add_argument("--default-log2", type=int, default=20, help="table size for the throughput runs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3 = one pass over the batches)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the table-size sweep")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, or a CPU with bf16 matrix units)")
    parser.add_argument("--compare", default="mtl,crossdistil,crossdistil@paper",
                        help="configurations (RUNG or RUNG@PRESET; +privileged for a privileged teacher, +aux for "
                        "six auxiliary tasks, +counted for the six only counted, +crosses for counts of three "
                        "crosses, +field for their own smoothing and prior) whose step cost is compared, the first "
                        "as base")
    parser.add_argument("--only-compare", action="store_true", help="measure the configuration comparison only")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also plain steps against CUDA-graph replays of the default model (a CUDA device)")
    parser.add_argument("--against", type=Path, default=None, metavar="OLD_CHECKOUT",
                        help="compare --compare's step times with another checkout's, side by side (see above)")
    # One thread by default on CPU: on a shared 2-core machine two OpenMP threads per process oversubscribe
    # the cores and a step gets ~10x slower and noisy (measured: 24 ms vs 241 ms at batch 256).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--set", type=model_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a ModelConfig option of every model measured (repeatable); with --against, of this "
                             "checkout's only: e.g. the model an old checkout had by default")
    args = parser.parse_args(argv)
    MODEL_SET.clear()
    MODEL_SET.update(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device (--device cuda), not {device}")
    started = time.perf_counter()
    if args.against is not None:
        result = against(args.against.resolve(), args)
        result["wall_s"] = time.perf_counter() - started
        print(json.dumps(result, indent=2))
        return 0

    rows = synthetic_rows(max(batch_sizes) * 3, seed=0)
    spec = config(2**args.default_log2, True, False).features
    hash_bucket.cache_clear()
    t0 = time.perf_counter()
    encode_rows(rows[:4096], spec, TASKS)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_rows(rows[:4096], spec, TASKS)
    warm = time.perf_counter() - t0
    result: dict = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "bf16": args.bf16,
        "model": {"backbone": "shared_bottom", "rung": "crossdistil (default options)", **SPEC_FIELDS,
                  "embedding_dim": 16, "hidden_dims": [128], "tower_dims": [64, 32], "set": MODEL_SET},
        "encode": {"rows": 4096, "cold_rows_per_s": 4096 / cold, "warm_rows_per_s": 4096 / warm},
        "throughput": [], "breakdown": [], "table_sizes": [],
    }

    result["configs"] = compare_configs(args.compare.split(","), batch_sizes, rows, 2**args.default_log2, device,
                                        args.rounds, args.steps, args.bf16)
    if args.cuda_graphs:
        result["cuda_graphs"] = compare_graphs(batch_sizes, rows, 2**args.default_log2, device, args.rounds,
                                               args.steps, args.bf16)
    if args.only_compare:
        result["wall_s"] = time.perf_counter() - started
        print(json.dumps(result, indent=2))
        return 0

    result["embedding_update"] = [entry for name in ("mtl", "crossdistil") for entry in compare_updates(
        batch_sizes, rows, 2**args.default_log2, device, args.rounds, args.steps, name)]

    def batches_of(size: int, buckets: int) -> list:
        spec_b = config(buckets, True, False).features
        return [encode_rows(rows[i * size:(i + 1) * size], spec_b, TASKS) for i in range(3)]

    for size in batch_sizes:
        batches = batches_of(size, 2**args.default_log2)
        entry = {"batch": size}
        for sparse in (True, False):
            learner = Learner(config(2**args.default_log2, sparse, args.bf16), device=device)
            step_s = time_steps(learner, batches, args.warmup, args.steps)
            key = "sparse" if sparse else "dense"
            entry[f"{key}_samples_per_s"] = size / step_s
            entry[f"{key}_step_ms"] = 1e3 * step_s
            if sparse:  # steps back to back, read one behind: the throughput of evaluate's loop
                entry["sparse_pipelined_samples_per_s"] = size / time_pipelined(learner, batches, 4 * args.steps)
            result["breakdown"].append({"batch": size, "optimizer": key, **breakdown(learner, batches, args.steps)})
            del learner
        entry["sparse_speedup"] = entry["sparse_samples_per_s"] / entry["dense_samples_per_s"]
        result["throughput"].append(entry)

    # Table sizes: the sparse learners are measured in interleaved rounds, each after one untimed pass that
    # touches all its rows, so machine-load drift (a shared CPU) hits every size alike rather than one of them.
    size = 1024 if 1024 in batch_sizes else batch_sizes[0]
    sweep: dict = {"batch": size, "rounds": args.rounds, "sparse_step_ms": {}, "sparse_embedding_ms": {},
                   "dense_step_ms": {}}
    sizes = [int(v) for v in args.table_log2.split(",")]
    sparse_runs = {}
    for log2 in sizes:
        batches = batches_of(size, 2**log2)
        learner = Learner(config(2**log2, True, args.bf16), device=device)
        time_steps(learner, batches, len(batches), 1)
        sparse_runs[log2] = (learner, batches, [], [])
    for _ in range(args.rounds):
        for _log2, (learner, batches, times, embedding) in sparse_runs.items():
            times.append(time_steps(learner, batches, 0, args.steps))
            embedding.append(breakdown(learner, batches, 2)["embedding_ms"])
    for log2, (_, _, times, embedding) in sparse_runs.items():
        sweep["sparse_step_ms"][f"2^{log2}"] = 1e3 * statistics.median(times)
        sweep["sparse_embedding_ms"][f"2^{log2}"] = statistics.median(embedding)
    del sparse_runs
    for log2 in sizes:  # dense Adam: the O(table) contrast, fewer steps (2^22 takes seconds per step)
        batches = batches_of(size, 2**log2)
        learner = Learner(config(2**log2, False, args.bf16), device=device)
        sweep["dense_step_ms"][f"2^{log2}"] = 1e3 * time_steps(learner, batches, 1, max(2, args.steps // 2))
        del learner
    for key in ("sparse", "dense"):
        values = list(sweep[f"{key}_step_ms"].values())
        sweep[f"{key}_change_max_over_min"] = max(values) / min(values) - 1.0
    sweep["sparse_within_20_percent"] = sweep["sparse_change_max_over_min"] <= 0.20
    result["table_sizes"] = sweep
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
