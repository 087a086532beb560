"""What a replay's trainer metrics cost, this checkout against another, side by side; prints one JSON object.

    python bench/replay_metrics.py --against /tmp/old --rounds 5      # ~2 minutes

A backtest's training process scores every batch (``TrainerMetrics.observe``: the windows' rings, the lifetime
histograms, the drift detectors) and, every ``--sample-every`` samples, takes a series point (``snapshot`` of AUC and
log loss: every window's exact AUC, the lifetime AUC, the AUC drift against the baseline window). This times both over
a stream of ``--samples`` samples in batches of ``--batch-size`` with the metrics of ``--config`` (default the
KuaiRand-Pure backtest's: windows 10,000 and 50,000, the 500,000-sample baseline), the sizes of a KuaiRand-Pure replay
(228,329 samples, 892 batches, 91 points). Synthetic labels and scores (float32 probabilities, as a model gives), the
same in both checkouts (seeded).

Each round runs both checkouts, each in a fresh process, alternately (this shared machine's speed changes from
minute to minute, so only side-by-side ratios mean something): ``observe_s`` and ``points_s`` per checkout, their
medians, and ``speedup`` (old / new seconds, the median of the per-round ratios). ``values_equal``: both checkouts
read the same last point (every AUC and log loss equal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))  # git_commit, from a checkout without installing


def worker(args: argparse.Namespace) -> dict:
    """One checkout's timing (run in that checkout's process)."""
    import numpy as np
    from prometheus_client import CollectorRegistry

    from consumers.runtime.config import load_config
    from consumers.runtime.telemetry import TrainerMetrics

    cfg = load_config(args.config)
    tasks = tuple(cfg.model.tasks)
    rng = np.random.default_rng(0)
    n, b = args.samples, args.batch_size
    # positive rates 0.3, 0.2, 0.1, 0.05, then 0.05 for any further task
    rates = [(0.3, 0.2, 0.1)[k] if k < 3 else 0.05 for k in range(len(tasks))]
    labels = {task: rng.random(n) < rate for task, rate in zip(tasks, rates)}
    scores = {task: (1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + 1.2 * labels[task])))).astype(np.float32)
              for task in tasks}
    users = rng.integers(0, 25_000, n)
    metrics = TrainerMetrics.from_config(cfg, registry=CollectorRegistry())
    observe_s = points_s = 0.0
    next_point, points, point = args.sample_every, 0, {}
    for start in range(0, n, b):
        end = min(n, start + b)
        t0 = time.perf_counter()
        metrics.observe({t: labels[t][start:end] for t in tasks}, {t: scores[t][start:end] for t in tasks},
                        "student", users[start:end])
        t1 = time.perf_counter()
        observe_s += t1 - t0
        if end >= next_point or end == n:  # as ConfigRun.add_point: the same reads, and the last state always
            point = metrics.snapshot(gauc=False, metrics=("auc", "log_loss"))
            next_point = (end // args.sample_every + 1) * args.sample_every
            points += 1
            points_s += time.perf_counter() - t1
    last = {task: {metric: point[task]["student"][metric] for metric in ("auc", "log_loss", "auc_drift")}
            for task in tasks}
    return {"observe_s": round(observe_s, 4), "points_s": round(points_s, 4), "points": points, "last": last}


def run_in(root: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(root / "bench" / "replay_metrics.py"), "--worker", "--config", str(args.config),
               "--samples", str(args.samples), "--batch-size", str(args.batch_size),
               "--sample-every", str(args.sample_every)]
    if not (root / "bench" / "replay_metrics.py").exists():  # a checkout from before this script: run ours there
        command[1] = str(Path(__file__).resolve())
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if done.returncode != 0:
        raise SystemExit(f"the worker in {root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="the other checkout (a git worktree); without: this one alone")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "reports" / "backtest_kuairand_pure" / "config.toml")
    parser.add_argument("--samples", type=int, default=228_329, help="samples replayed (KuaiRand-Pure's impressions)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sample-every", type=int, default=2_500, help="samples between two series points")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from serving_pickup import git_commit

    roots = {"new": REPO_ROOT} if args.against is None else {"old": args.against.resolve(), "new": REPO_ROOT}
    rounds: dict[str, list[dict]] = {name: [] for name in roots}
    for round_ in range(args.rounds):
        for name, root in roots.items():
            print(f"[replay_metrics] round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(run_in(root, args))
    out: dict = {"samples": args.samples, "batch_size": args.batch_size, "sample_every": args.sample_every,
                 "config": str(args.config), "rounds": args.rounds}
    for name, root in roots.items():
        results = rounds[name]
        out[name] = {"commit": git_commit(root), "points": results[0]["points"],
                     "observe_s_median": statistics.median(r["observe_s"] for r in results),
                     "points_s_median": statistics.median(r["points_s"] for r in results),
                     "rounds_observe_s": [r["observe_s"] for r in results],
                     "rounds_points_s": [r["points_s"] for r in results]}
    if "old" in roots:
        pairs = list(zip(rounds["old"], rounds["new"]))
        out["speedup"] = {
            key: round(statistics.median(o[key] / n[key] for o, n in pairs), 3) for key in ("observe_s", "points_s")}
        out["speedup"]["both"] = round(statistics.median(
            (o["observe_s"] + o["points_s"]) / (n["observe_s"] + n["points_s"]) for o, n in pairs), 3)
        out["values_equal"] = all(o["last"] == n["last"] for o, n in pairs)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
