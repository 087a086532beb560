"""Paired differences to mtl of the probe lines (reports/kuairand_pure/aux_tasks/probe/README.md).

    python reports/kuairand_pure/aux_tasks/probe/summary.py reports/kuairand_pure/aux_tasks/probe/*.jsonl
"""

import collections
import json
import sys

import numpy as np


def key(r: dict) -> tuple:
    return r["backbone"], r["seed"], r["mode"], r["test"], tuple(r["tasks"]), r.get("extra", "")


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in open(path)]
    base = {key(r): r["student"] for r in rows
            if not r["aux"] and all(v == 0 for v in r["lam"].values()) and not r.get("warmup")}
    groups = collections.defaultdict(list)
    for r in rows:
        if key(r) not in base:
            continue
        name = (r["backbone"], r["mode"], "test" if r["test"] else "val", ",".join(r["aux"]) or "-",
                json.dumps(r["lam"]), r.get("warmup", 0), r.get("extra", ""))
        groups[name].append({t: r["student"][t] - base[key(r)][t] for t in r["tasks"]})
    for name, deltas in sorted(groups.items()):
        tasks = list(deltas[0])
        cells = []
        for t in tasks + ["mean"]:
            v = np.array([d[t] if t != "mean" else np.mean([d[x] for x in tasks]) for d in deltas])
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
            cells.append(f"{t} {v.mean():+.4f}±{se:.4f}{'*' if abs(v.mean()) > 2 * se else ' '}")
        print(len(deltas), *name, " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
