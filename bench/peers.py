"""The product's models against the peers a user would pick (Vowpal Wabbit, river): prequential AUC and events/s.

    python bench/peers.py       # mtl, mtl:wide=none (deep model alone), crossdistil, river_lr, river_fm, vw, vw_q
    python bench/peers.py --tasks long_view,like --configs crossdistil,river_lr,vw_q --limit 10000
    python bench/peers.py --dataset csv --source ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv \
        --mapping mappings/kuairand_pure.toml                  # the data set on which a gain must be shown

One pass over the stream in time order, mini-batches of 256, one torch thread; every batch is scored before the
learner updates on it (the same ``models.evaluation.run_prequential`` as ``crossdistil evaluate``, the same
encoded features for every learner). All learners run one after the other in one process, so their events/s are
comparable as ratios within one run (the machine is shared). The VW peers need the ``peers`` extra
(``deploy/setup.sh`` installs it); without it they are left out with a note. Prints one JSON object: per learner
the events, seconds, events/s, its ratio to ``mtl``'s (the product's default), and the prequential AUC per task
over all events and over the last 20 %. The quality comparison with the declared settings and several seeds is
``reports/peers_kuairand_pure``.
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
    parser.add_argument("--configs", default="mtl,mtl:wide=none,crossdistil,river_lr,river_fm,vw,vw_q",
                        help="comma-separated configurations of crossdistil evaluate; CONFIG:KEY=VALUE[;KEY=VALUE] "
                             "sets model options of one (mtl:wide=none is the deep model without its wide part)")
    parser.add_argument("--dataset", default="kuairand", help="a data set of streamer.datasets (csv needs --mapping)")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "kuairand"))
    parser.add_argument("--mapping", default=None, help="--dataset csv: the column mapping (mappings/*.toml)")
    parser.add_argument("--limit", type=int, default=0, help="first N events only (0 = all)")
    args = parser.parse_args(argv)

    import torch

    from consumers.tools.evaluate import feature_spec_for, load_encoded, parse_pairs, seeded_learner
    from models.evaluation import default_partners, run_prequential
    from models.vw_baseline import VW_CONFIGS, require_vowpalwabbit
    from streamer.datasets import open_dataset

    torch.set_num_threads(1)
    configs = args.configs.split(",")
    skipped = {}
    if {c.partition(":")[0] for c in configs} & set(VW_CONFIGS):
        try:
            require_vowpalwabbit()
        except ImportError as exc:
            skipped = {c: str(exc) for c in configs if c.partition(":")[0] in VW_CONFIGS}
            configs = [c for c in configs if c not in skipped]
    dataset = open_dataset(args.dataset, args.source, mapping=args.mapping)
    spec = feature_spec_for(dataset, [], 262144)
    tasks = args.tasks.split(",")
    load_at_start = os.getloadavg()[0]
    data = load_encoded(dataset, tasks, spec, limit=args.limit)
    learners: dict[str, dict] = {}
    for config in configs:
        rung, _, options = config.partition(":")
        learner = seeded_learner(tasks, "shared_bottom", rung, 0, spec,
                                 parse_pairs([o for o in options.split(";") if o], "--configs"), "cpu")
        print(f"[bench] {config} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = run_prequential(learner, data, default_partners(tasks), batch_size=256)
        seconds = time.perf_counter() - started
        learners[config] = {
            "events": len(data), "seconds": round(seconds, 2), "events_per_s": round(len(data) / seconds),
            "auc_all": {t: round(m["auc"], 4) for t, m in result.metrics["all"].items()},
            "auc_tail": {t: round(m["auc"], 4) for t, m in result.metrics["tail"].items()},
        }
    if "mtl" in learners:
        base = learners["mtl"]["events_per_s"]
        for entry in learners.values():
            entry["events_per_s_ratio_to_mtl"] = round(entry["events_per_s"] / base, 3)
    print(json.dumps({"benchmark": "peers", "dataset": dataset.name, "tasks": tasks, "batch_size": 256,
                      "torch_threads": 1, "load_1min_at_start": round(load_at_start, 1), "learners": learners,
                      "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
