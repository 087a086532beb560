"""Paired differences of each configuration to ``mtl[aux]`` (same mode, backbone and seed) in a results.json.

    python reports/kuairand_pure/aux_tasks/crossdistil_validation/summary.py \
        reports/kuairand_pure/aux_tasks/crossdistil_validation/results.json

One line per configuration, backbone, mode and window: the number of seeds, then Δ AUC per task and their mean,
mean ± standard error, ``*`` beyond 2 standard errors. (``reports/kuairand_pure/summarize.py`` pairs with plain
``mtl``, which this grid does not have: every configuration here learns the six auxiliary tasks.)
"""

import collections
import json
import sys

import numpy as np


def main(paths: list[str]) -> None:
    runs = [r for path in paths for r in json.load(open(path))["runs"]]
    base = {(r["mode"], r["backbone"], r["seed"]): r for r in runs if r["config"] == "mtl[aux]"}
    groups = collections.defaultdict(list)
    for r in runs:
        if r["config"] == "mtl[aux]":
            continue
        b = base[(r["mode"], r["backbone"], r["seed"])]
        for window in ["test"] if r["mode"] == "split" else ["tail", "all"]:
            d = {t: r["metrics"][window][t]["auc"] - b["metrics"][window][t]["auc"] for t in r["tasks"]}
            d["mean"] = float(np.mean(list(d.values())))
            groups[(r["config"], r["backbone"], r["mode"], window)].append(d)
    for key, deltas in sorted(groups.items()):
        cells = []
        for name in deltas[0]:
            v = np.array([d[name] for d in deltas])
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
            cells.append(f"{name} {v.mean():+.4f}±{se:.4f}{'*' if abs(v.mean()) > 2 * se else ' '}")
        print(len(deltas), *key, " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
