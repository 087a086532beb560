"""Samples/s of a dense backtest (one and two configurations) next to `evaluate`'s prequential pass; one JSON object.

    python bench/backtest_throughput.py                  # KuaiRand-Pure, 100,000 impressions, 3 rounds (~10 min)
    python bench/backtest_throughput.py --impressions 0 --rounds 5 --log /tmp/kuairand_pure.evlog

The same data (the first ``--impressions`` impressions of ``--source`` read through ``--mapping``), the same model
configuration (``--config``, default the KuaiRand-Pure backtest's) and the same batch size (its
``batching.batch_size``), side by side in one run. Variants, each in a fresh process, alternating for ``--rounds``
rounds (median and best reported, because this shared machine's speed changes from minute to minute):

* ``evaluate``: ``models.evaluation.run_prequential`` over the data encoded once (``consumers.tools.evaluate``'s
  ``load_encoded`` and ``seeded_learner``; reading and encoding are not in ``samples_per_s``, they are in
  ``samples_per_s_with_reading``), the ``mtl`` rung;
* ``backtest_one``: ``consumers.tools.backtest.run_backtest(..., batching="dense")`` of the event log written from
  the same rows (``crossdistil stream --to file://``; made once in a temporary folder unless ``--log`` is given)
  with ``--one`` (``mtl``), plus the summary's end-of-run metrics (``summary()``): reading and decoding the log,
  the join, batching, encoding, the steps and the trainer's metrics are all timed. ``--intake`` as the command's
  default (``auto``): the log is read, validated, joined, batched and encoded by an intake process
  (``consumers.tools.intake``) while the timed process trains, so the wall time counts both processes, and the
  intake process's CPU seconds are in the JSON (``intake_cpu_s``);
* ``backtest_two``: the same with ``--two`` (``mtl,crossdistil``), both from one decode of the log (and, as their
  join and batching settings are the same, one join, one batcher and one encoding of each batch); the
  configurations after the first train in learner processes only where the machine has more than two cores;
* ``backtest_one_inline``, ``backtest_two_inline`` (only when named in ``--variants``): the same with ``--intake
  inline``: everything in the timed process, as before the intake process;
* ``backtest_one_cached``, ``backtest_two_cached`` (only when named in ``--variants``): the same read from a replay
  cache (``--replay-cache``, ``consumers.tools.intake.ReplayCache``) that the bench fills once before the rounds,
  untimed (one replay of ``--two``; both variants' groups read the same features, so they share the entry): no intake
  process, the batches read from the file; on two cores a second configuration trains in a learner process;
* ``read_log`` (only when named in ``--variants``): reading the log alone, as the replay reads it
  (``read_event_log_sized``: unpacking and each record's shape) and nothing else, counted per impression: a floor
  under any replay of the log in one process;
* ``evaluate_pair`` (only when named in ``--variants``): two ``evaluate`` workers at once, each in a process of its
  own: how much two busy processes slow each other on this machine in these minutes (on a machine whose two cores
  share one physical core, or a busy host, each runs slower than alone). A dense replay of one configuration is
  two busy processes (the intake and the trainer); ``evaluate``'s pass is one, so this is the context of
  ``backtest_one_to_evaluate``, not a substitute for it. Its ``seconds`` are the slower worker's.

``ratios``: ``backtest_one_to_evaluate`` (median samples/s; the issue asks >= 0.8) and ``backtest_two_cost_to_one``
(median seconds; the issue asks <= 1.8), and ``backtest_two_cpu_cost_to_one`` (the same with the CPU seconds of the
timed process and the intake process: the machine's work rather than the wall time).
``backtest_one_to_evaluate_with_reading`` sets the backtest against ``evaluate``'s whole work instead
(``samples_per_s_with_reading``: reading and encoding the CSV, building the learner and the prequential pass),
since the backtest's figure includes reading its input.
``backtest_one_cached_to_evaluate`` and ``backtest_two_cached_cost_to_one_cached``: the same two ratios with the
replay cache warm.
``backtest_one_intake_process_speedup`` / ``backtest_two_...``: the inline variant's median seconds over the intake
process's. ``two_busy_processes_slowdown`` (with ``evaluate_pair``): per round, the pair's mean seconds over
``evaluate``'s alone in the same round (1.0: the two cores do not slow each other), and its median;
``backtest_one_to_evaluate_pair``: the backtest's samples/s over the slower of the pair's.
``--torch-threads 1`` by default, as ``crossdistil backtest``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

VARIANTS = ("evaluate", "backtest_one", "backtest_two", "backtest_one_inline", "backtest_two_inline",
            "backtest_one_cached", "backtest_two_cached", "read_log", "evaluate_pair")
DATA = REPO_ROOT.parent / "shared" / "data" / "kuairand_pure"


def evaluate_worker(args: argparse.Namespace) -> dict:
    from consumers.tools.backtest import build_configs
    from consumers.tools.evaluate import load_encoded, seeded_learner
    from models.config import ModelConfig
    from models.evaluation import default_partners, run_prequential
    from models.features import FeatureSpec
    from streamer.datasets import open_dataset

    cfg = build_configs([args.config], args.one.split(",")[0], args.set)[args.one.split(",")[0]]
    options = dict(cfg.model.options)
    rung = options.pop("rung")
    backbone = options.pop("backbone", ModelConfig.__dataclass_fields__["backbone"].default)
    spec = FeatureSpec.from_dict(options.pop("features"))
    whole_started = time.perf_counter()  # the whole command's work: reading and encoding the CSV too
    dataset = open_dataset("csv", args.source, mapping=args.mapping)
    data = load_encoded(dataset, cfg.model.tasks, spec, args.impressions)
    learner = seeded_learner(cfg.model.tasks, backbone, rung, cfg.model.seed, spec, options, "cpu")
    started = time.perf_counter()
    result = run_prequential(learner, data, default_partners(data.tasks), batch_size=cfg.batching.batch_size)
    seconds = time.perf_counter() - started
    whole = time.perf_counter() - whole_started
    return {"samples": len(data), "seconds": round(seconds, 3), "samples_per_s": round(len(data) / seconds),
            "seconds_with_reading": round(whole, 3), "samples_per_s_with_reading": round(len(data) / whole),
            "steps": learner.steps, "auc_all": {t: m["auc"] for t, m in result.metrics["all"].items()}}


def backtest_worker(args: argparse.Namespace, rungs: str, intake: str = "auto", cache: str | None = None) -> dict:
    # consumers.runtime and prometheus_client: what run_backtest imports on its first call, imported before the
    # clock starts (evaluate's imports and learner construction are not timed either; the backtest's learners are
    # built inside the timed call, each a few tens of ms).
    import prometheus_client  # noqa: F401

    import consumers.runtime.assembly  # noqa: F401
    import consumers.runtime.telemetry  # noqa: F401
    from consumers.tools.backtest import build_configs, log_records, run_backtest, summary

    configs = build_configs([args.config], rungs, args.set)
    # The first optimizer built imports torch._dynamo (~1.4 s, once per process): built here, untimed, as
    # evaluate's learner is.
    consumers.runtime.assembly.build_pipeline(next(iter(configs.values())), clock=None).close()
    records, desc = log_records(f"file://{args.log}")
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run_backtest(records, configs, batching="dense", intake=intake, replay_cache=cache)
    if cache is not None and result.intake != "cache":
        raise SystemExit(f"the replay cache {cache} was not warm: the bench warms it before the rounds")
    data = summary(result, desc)
    seconds = time.perf_counter() - started
    # CPU seconds of this process and of the intake process (learner processes, where started, are not counted)
    cpu_seconds = time.process_time() - cpu_started + result.processes.get("intake_cpu_s", 0.0)
    samples = {name: c["trained_samples"] for name, c in data["configurations"].items()}
    one = next(iter(samples.values()))
    return {"records": result.records, "samples": samples, "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "samples_per_s": round(one / seconds), "batches": {n: c["batching"] for n, c in
                                                                data["configurations"].items()},
            "seconds_per_configuration": {n: round(r.seconds, 3) for n, r in result.runs.items()},
            "intake": result.intake, **result.processes,
            "auc_all": {n: c["prequential_auc"] for n, c in data["configurations"].items()}}


def read_log_worker(args: argparse.Namespace) -> dict:
    from streamer.eventlog import read_event_log_sized

    started = time.perf_counter()
    records = impressions = 0
    for (topic, _key, _event), _size in read_event_log_sized(args.log):
        records += 1
        impressions += topic == "impressions"
    seconds = time.perf_counter() - started
    return {"records": records, "samples": impressions, "seconds": round(seconds, 3),
            "samples_per_s": round(impressions / seconds)}


def worker(args: argparse.Namespace) -> dict:
    import torch

    from consumers.runtime.processes import tune_gc

    torch.set_num_threads(args.torch_threads)
    tune_gc()  # as crossdistil backtest runs; evaluate gets the same collector
    if args.worker == "evaluate":
        return evaluate_worker(args)
    if args.worker == "read_log":
        return read_log_worker(args)
    rungs = args.one if args.worker.startswith("backtest_one") else args.two
    if args.worker == "warm_cache":
        from consumers.tools.backtest import build_configs, log_records, run_backtest

        records, _ = log_records(f"file://{args.log}")
        result = run_backtest(records, build_configs([args.config], args.two, args.set), batching="dense",
                              replay_cache=args.cache)
        return {"intake": result.intake, **result.processes}
    return backtest_worker(args, rungs, "inline" if args.worker.endswith("_inline") else "auto",
                           args.cache if args.worker.endswith("_cached") else None)


def make_log(args: argparse.Namespace, folder: Path) -> Path:
    from streamer.stream import stream_dataset

    path = folder / "bench.evlog"
    stream_dataset("csv", args.source, f"file://{path}", mapping=args.mapping, limit=args.impressions or None)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DATA / "kuairand_pure_20220425_20220508.csv"))
    parser.add_argument("--mapping", default=str(REPO_ROOT / "mappings" / "kuairand_pure.toml"))
    parser.add_argument("--config", default=str(REPO_ROOT / "reports" / "backtest_kuairand_pure" / "config.toml"))
    parser.add_argument("--set", action="append", default=[], help="configuration override (repeatable)")
    parser.add_argument("--impressions", type=int, default=100_000, help="first N impressions (0: all)")
    parser.add_argument("--log", default=None, help="an event log of exactly those impressions (else made once)")
    parser.add_argument("--one", default="mtl", help="the configuration of backtest_one (and evaluate's rung)")
    parser.add_argument("--two", default="mtl,crossdistil", help="the configurations of backtest_two")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS[:3]), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--worker", choices=(*VARIANTS, "warm_cache"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)  # the replay cache of the *_cached variants
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="backtest-bench-") as folder:
        log = Path(args.log) if args.log else make_log(args, Path(folder))
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        cache = Path(folder) / "replay-cache"
        if any(v.endswith("_cached") for v in variants):  # written once, untimed: the cached variants read it
            print("[backtest_throughput] warming the replay cache", file=sys.stderr, flush=True)
            warm = run_worker(args, "warm_cache", log, cache)
            print(f"[backtest_throughput] replay cache: {warm}", file=sys.stderr, flush=True)
        for round_ in range(args.rounds):
            for variant in variants:
                print(f"[backtest_throughput] round {round_ + 1}/{args.rounds}: {variant}", file=sys.stderr,
                      flush=True)
                load = os.getloadavg()[0]  # the machine is shared: each figure with the load it ran under
                runs[variant].append({**run_worker(args, variant, log, cache), "load_1min_before": round(load, 2)})
    print(json.dumps(report(args, runs), indent=2))
    return 0


def run_worker(args: argparse.Namespace, variant: str, log: Path, cache: Path) -> dict:
    """One variant in a fresh process: its JSON line."""
    command = [sys.executable, __file__, "--worker", variant, "--source", args.source, "--mapping", args.mapping,
               "--config", args.config, "--impressions", str(args.impressions), "--log", str(log), "--one", args.one,
               "--two", args.two, "--torch-threads", str(args.torch_threads), "--cache", str(cache),
               *[a for s in args.set for a in ("--set", s)]]
    if variant == "evaluate_pair":  # two evaluate workers at once
        command[command.index("--worker") + 1] = "evaluate"
        pair = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
        outputs = [(p, *p.communicate()) for p in pair]
        results = [_worker_result(variant, p.returncode, out, err) for p, out, err in outputs]
        slower = max(results, key=lambda r: r["seconds"])
        return {**slower, "pair_seconds": [r["seconds"] for r in results]}
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return _worker_result(variant, done.returncode, done.stdout, done.stderr)


def _worker_result(variant: str, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        print(stderr, file=sys.stderr)
        raise SystemExit(f"{variant} failed with status {returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    """Medians, bests and every round per variant, and the two ratios of the issue."""
    out: dict = {"impressions": args.impressions or "all", "config": str(Path(args.config).relative_to(REPO_ROOT))
                 if Path(args.config).is_relative_to(REPO_ROOT) else args.config, "one": args.one, "two": args.two,
                 "rounds": args.rounds, "torch_threads": args.torch_threads, "variants": {}}
    for variant, results in runs.items():
        rates = [r["samples_per_s"] for r in results]
        seconds = [r["seconds"] for r in results]
        fastest = max(results, key=lambda r: r["samples_per_s"])
        out["variants"][variant] = {"samples_per_s_median": round(statistics.median(rates)),
                                    "samples_per_s_best": max(rates), "seconds_median": statistics.median(seconds),
                                    "rounds_samples_per_s": rates, "rounds_seconds": seconds,
                                    "rounds_load_1min_before": [r.get("load_1min_before") for r in results],
                                    "fastest": fastest}
        if "seconds_with_reading" in results[0]:
            whole = [r["samples_per_s_with_reading"] for r in results]
            out["variants"][variant]["samples_per_s_with_reading_median"] = round(statistics.median(whole))
    variants = out["variants"]
    ratios = {}
    if "evaluate" in variants and "backtest_one" in variants:
        ratios["backtest_one_to_evaluate"] = round(variants["backtest_one"]["samples_per_s_median"]
                                                   / variants["evaluate"]["samples_per_s_median"], 2)
        ratios["per_round_backtest_one_to_evaluate"] = [
            round(b["samples_per_s"] / e["samples_per_s"], 2) for b, e in zip(runs["backtest_one"], runs["evaluate"])]
        ratios["backtest_one_to_evaluate_with_reading"] = round(
            variants["backtest_one"]["samples_per_s_median"]
            / variants["evaluate"]["samples_per_s_with_reading_median"], 2)
    if "backtest_one" in variants and "backtest_two" in variants:
        ratios["backtest_two_cost_to_one"] = round(variants["backtest_two"]["seconds_median"]
                                                   / variants["backtest_one"]["seconds_median"], 2)
        ratios["per_round_backtest_two_cost_to_one"] = [
            round(t["seconds"] / o["seconds"], 2) for t, o in zip(runs["backtest_two"], runs["backtest_one"])]
        ratios["backtest_two_cpu_cost_to_one"] = round(
            statistics.median(r["cpu_seconds"] for r in runs["backtest_two"])
            / statistics.median(r["cpu_seconds"] for r in runs["backtest_one"]), 2)
    if "evaluate" in variants and "backtest_one_cached" in variants:
        ratios["backtest_one_cached_to_evaluate"] = round(variants["backtest_one_cached"]["samples_per_s_median"]
                                                          / variants["evaluate"]["samples_per_s_median"], 2)
        ratios["per_round_backtest_one_cached_to_evaluate"] = [
            round(b["samples_per_s"] / e["samples_per_s"], 2)
            for b, e in zip(runs["backtest_one_cached"], runs["evaluate"])]
    if "backtest_one_cached" in variants and "backtest_two_cached" in variants:
        ratios["backtest_two_cached_cost_to_one_cached"] = round(
            variants["backtest_two_cached"]["seconds_median"] / variants["backtest_one_cached"]["seconds_median"], 2)
        ratios["per_round_backtest_two_cached_cost_to_one_cached"] = [
            round(t["seconds"] / o["seconds"], 2)
            for t, o in zip(runs["backtest_two_cached"], runs["backtest_one_cached"])]
    for inline in ("backtest_one_inline", "backtest_two_inline"):
        if inline in variants and inline.removesuffix("_inline") in variants:
            ratios[f"{inline.removesuffix('_inline')}_intake_process_speedup"] = round(
                variants[inline]["seconds_median"] / variants[inline.removesuffix("_inline")]["seconds_median"], 2)
    if "evaluate" in variants and "read_log" in variants:
        ratios["read_log_to_evaluate"] = round(variants["read_log"]["samples_per_s_median"]
                                               / variants["evaluate"]["samples_per_s_median"], 2)
    if "evaluate" in variants and "evaluate_pair" in variants:
        slowdown = [statistics.fmean(p["pair_seconds"]) / e["seconds"]
                    for p, e in zip(runs["evaluate_pair"], runs["evaluate"])]
        ratios["two_busy_processes_slowdown"] = round(statistics.median(slowdown), 2)
        ratios["per_round_two_busy_processes_slowdown"] = [round(x, 2) for x in slowdown]
        if "backtest_one" in variants:
            ratios["backtest_one_to_evaluate_pair"] = round(variants["backtest_one"]["samples_per_s_median"]
                                                            / variants["evaluate_pair"]["samples_per_s_median"], 2)
    out["ratios"] = ratios
    return out


if __name__ == "__main__":
    raise SystemExit(main())
