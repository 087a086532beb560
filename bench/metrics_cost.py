"""Cost of the trainer's metrics against a training step; prints one JSON object.

    python bench/metrics_cost.py            # CPU, one torch thread, about a minute

Measures, in one run:
* ``train_step_ms``: median ``models.learner.Learner.step`` on a default-size batch (256 samples, the default
  model, as in bench/train_step.py);
* ``observe``: median ``TrainerMetrics.observe`` per batch, for the student alone and student + teacher, for
  several ``drift_chunk`` values (how many per-sample losses are averaged before river's detectors see them),
  as ms per batch, µs per sample and percent of the training step (target: < 5 %);
* ``pipeline_ms``: the per-batch pipeline calls (events_consumed, join_counters, batch_trained, watermark,
  samples_emitted) together;
* ``read``: one scrape (exposition of the whole registry: every window's exact AUC, GAUC, ...) and one
  ``snapshot()``, once the windows are full; this cost is paid by the scraping thread, not per batch;
* ``windowed_auc_vs_river``: our ring-buffer AUC against river's RollingROCAUC over the same stream: the
  largest absolute difference of the values read after every batch, and the cost of update + read per batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def train_step_ms(batch_size: int, steps: int) -> float:
    """Median Learner.step on the default model, KuaiRand-shaped rows (bench/train_step.py's set-up)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import TASKS, config, synthetic_rows, time_steps

    from models.features import encode_rows
    from models.learner import Learner

    rows = synthetic_rows(batch_size * 3, seed=0)
    cfg = config(2**20, True, False)
    batches = [encode_rows(rows[i * batch_size:(i + 1) * batch_size], cfg.features, TASKS) for i in range(3)]
    learner = Learner(cfg, device=torch.device("cpu"))
    return 1e3 * time_steps(learner, batches, warmup=2, steps=steps)


def stream(rng: np.random.Generator, batches: int, batch_size: int, tasks: tuple[str, ...]):
    """Labels, informative predictions and user ids, one dict per batch."""
    out = []
    for _ in range(batches):
        users = rng.integers(0, 10_000, batch_size)
        labels, predictions = {}, {}
        for task in tasks:
            logit = rng.normal(0, 1.5, batch_size)
            labels[task] = (rng.random(batch_size) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            predictions[task] = (1 / (1 + np.exp(-(logit + rng.normal(0, 1, batch_size))))).astype(np.float32)
        out.append((labels, predictions, users))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--windows", default="10000,100000")
    parser.add_argument("--chunks", default="1,4,8,16", help="drift_chunk values to measure")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (median reported)")
    parser.add_argument("--river-window", type=int, default=10_000)
    parser.add_argument("--river-batches", type=int, default=200)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as bench/train_step.py: a shared 2-core machine
    from prometheus_client import generate_latest

    from consumers.core.quality import StreamQuality
    from consumers.runtime.telemetry import TrainerMetrics

    tasks = ("click", "long_view")
    windows = tuple(int(w) for w in args.windows.split(","))
    b = args.batch_size
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    result: dict = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "batch_size": b, "tasks": list(tasks), "windows": list(windows)}
    step_ms = train_step_ms(b, args.steps)
    result["train_step_ms"] = step_ms

    # Fill past the baseline window so ring buffers wrap and every read covers full windows.
    baseline = 10 * max(windows)
    n_fill = baseline // b + 10
    data = stream(rng, 400, b, tasks)
    observe = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        for roles in (("student",), ("student", "teacher")):
            m = TrainerMetrics(tasks, windows=windows, drift_chunk=chunk)
            for i in range(n_fill if chunk == 8 and len(roles) == 2 else 50):
                labels, predictions, users = data[i % len(data)]
                for role in roles:
                    m.observe(labels, predictions, role=role, users=users)
            it = iter(range(10**9))

            def one_batch(it=it, roles=roles, m=m) -> None:  # bind this round's iterator, roles and metrics
                labels, predictions, users = data[next(it) % len(data)]
                for role in roles:
                    m.observe(labels, predictions, role=role, users=users)

            ms = median_ms(one_batch, 300)
            entry = {"drift_chunk": chunk, "roles": list(roles), "ms_per_batch": ms,
                     "us_per_sample": 1e3 * ms / b, "percent_of_train_step": 100 * ms / step_ms}
            observe.append(entry)
            if chunk == 8 and len(roles) == 2:
                read_metrics = m
    result["observe"] = observe

    m = read_metrics
    counters = {"impressions": 0, "emitted": 0, "late_feedback": 0}

    def pipeline() -> None:
        for key in counters:
            counters[key] += 100
        m.events_consumed("impressions", b)
        m.events_consumed("feedback", b)
        m.join_counters(counters)
        m.samples_emitted(b)
        m.batch_trained(b, 0.02)
        m.watermark(1_700_000_000_000)

    pipeline_ms = median_ms(pipeline, 300)
    result["pipeline_ms"] = pipeline_ms
    result["pipeline_percent_of_train_step"] = 100 * pipeline_ms / step_ms
    scrape_ms = median_ms(lambda: (m.observe(*data[0][:2], users=data[0][2]), generate_latest(m.registry)), 5)
    snapshot_ms = median_ms(lambda: (m.observe(*data[0][:2], users=data[0][2]), m.snapshot()), 5)
    result["read"] = {"windows": list(windows), "baseline_window": m.baseline_window,
                      "roles": ["student", "teacher"], "scrape_ms": scrape_ms, "snapshot_ms": snapshot_ms,
                      "scrape_body_bytes": len(generate_latest(m.registry))}
    # The recommended configuration: chunk 8, student + teacher.
    chosen = next(e for e in observe if e["drift_chunk"] == 8 and len(e["roles"]) == 2)
    result["per_batch_total_percent_of_train_step"] = (chosen["percent_of_train_step"]
                                                       + result["pipeline_percent_of_train_step"])
    result["under_5_percent"] = result["per_batch_total_percent_of_train_step"] < 5.0

    # Exactness and speed against river's RollingROCAUC.
    from river.metrics import RollingROCAUC

    w = args.river_window
    river_auc = RollingROCAUC(window_size=w)
    ours = StreamQuality(windows=(w,))
    max_diff = 0.0
    river_s = ours_s = 0.0
    for i in range(args.river_batches):
        y = data[i % len(data)][0]["click"]
        p = rng.random(b)  # continuous scores: no ties (river and we both count ties 1/2, but keep it plain)
        t0 = time.perf_counter()
        for yi, pi in zip(y.tolist(), p.tolist()):
            river_auc.update(yi, pi)
        r = river_auc.get()
        t1 = time.perf_counter()
        ours.update(y, p)
        o = ours.auc(w)
        t2 = time.perf_counter()
        river_s += t1 - t0
        ours_s += t2 - t1
        max_diff = max(max_diff, abs(r - o))
    result["windowed_auc_vs_river"] = {
        "window": w, "batches": args.river_batches, "batch_size": b, "max_abs_difference": max_diff,
        "river_ms_per_batch_update_and_read": 1e3 * river_s / args.river_batches,
        "ours_ms_per_batch_update_and_read": 1e3 * ours_s / args.river_batches,
    }
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
