"""Prequential events/s of each learner on KuaiRand (one pass, mini-batches of 256, 1 torch thread).

Run from the repository root: ``python3 reports/kuairand_river/throughput.py [--tasks click,long_view]``.
Prints one JSON line per learner: config, events, seconds, events_per_s, and the 1-minute load average at the
start (the machine is shared, so the numbers are only comparable within one run of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="click,long_view")
    parser.add_argument("--configs", default="mtl,crossdistil,river_lr,river_fm")
    parser.add_argument("--source", default="../shared/data/kuairand")
    args = parser.parse_args()

    import torch

    from consumers.evaluate import feature_spec_for, load_encoded, make_learner
    from models.evaluation import default_partners, run_prequential
    from streamer.datasets import open_dataset

    torch.set_num_threads(1)
    dataset = open_dataset("kuairand", args.source)
    spec = feature_spec_for(dataset, [], 262144)
    tasks = args.tasks.split(",")
    data = load_encoded(dataset, tasks, spec)
    for config in args.configs.split(","):
        learner = make_learner(tasks, "shared_bottom", config, 0, spec, {}, "cpu")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = run_prequential(learner, data, default_partners(tasks), batch_size=256)
        seconds = time.perf_counter() - started
        print(json.dumps({"config": config, "tasks": tasks, "events": len(data), "seconds": round(seconds, 2),
                          "events_per_s": round(len(data) / seconds), "load_1min": round(load, 1),
                          "tail_auc": {t: round(m["auc"], 4) for t, m in result.metrics["tail"].items()}}),
              flush=True)


if __name__ == "__main__":
    main()
