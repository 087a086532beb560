"""CrossDistil against the river baseline on the KuaiRand stream: prequential AUC per task and events/s.

    python bench/crossdistil_vs_river.py                       # all four learners, (click, long_view)
    python bench/crossdistil_vs_river.py --tasks long_view,like --configs crossdistil,river_lr --limit 10000

One pass over the stream in time order, mini-batches of 256, one torch thread; every batch is scored before the
learner updates on it (the same ``models.evaluation.run_prequential`` as ``crossdistil evaluate``). All learners
run one after the other in one process, so their events/s are comparable as ratios within one run (the machine
is shared). Prints one JSON object: per learner the events, seconds, events/s, its ratio to crossdistil's, and the
prequential AUC per task over all events and over the last 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="click,long_view")
    parser.add_argument("--configs", default="mtl,crossdistil,river_lr,river_fm")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "kuairand"))
    parser.add_argument("--limit", type=int, default=0, help="first N events only (0 = all)")
    args = parser.parse_args(argv)

    import torch

    from consumers.tools.evaluate import feature_spec_for, load_encoded, seeded_learner
    from models.evaluation import default_partners, run_prequential
    from streamer.datasets import open_dataset

    torch.set_num_threads(1)
    dataset = open_dataset("kuairand", args.source)
    spec = feature_spec_for(dataset, [], 262144)
    tasks = args.tasks.split(",")
    load_at_start = os.getloadavg()[0]
    data = load_encoded(dataset, tasks, spec, limit=args.limit)
    learners: dict[str, dict] = {}
    for config in args.configs.split(","):
        learner = seeded_learner(tasks, "shared_bottom", config, 0, spec, {}, "cpu")
        print(f"[bench] {config} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = run_prequential(learner, data, default_partners(tasks), batch_size=256)
        seconds = time.perf_counter() - started
        learners[config] = {
            "events": len(data), "seconds": round(seconds, 2), "events_per_s": round(len(data) / seconds),
            "auc_all": {t: round(m["auc"], 4) for t, m in result.metrics["all"].items()},
            "auc_tail": {t: round(m["auc"], 4) for t, m in result.metrics["tail"].items()},
        }
    if "crossdistil" in learners:
        base = learners["crossdistil"]["events_per_s"]
        for entry in learners.values():
            entry["events_per_s_ratio_to_crossdistil"] = round(entry["events_per_s"] / base, 3)
    print(json.dumps({"benchmark": "crossdistil_vs_river", "dataset": "kuairand", "tasks": tasks,
                      "batch_size": 256, "torch_threads": 1, "load_1min_at_start": round(load_at_start, 1),
                      "learners": learners}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
