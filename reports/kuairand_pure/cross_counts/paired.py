"""Paired AUC and GAUC differences of configurations against a baseline, per backbone: split (window ``test``) and
prequential (window ``tail``), mean ± standard error over the seeds both ran, * where |mean| > 2 se.

    python reports/kuairand_pure/cross_counts/paired.py RESULTS.json BASELINE CONFIG [CONFIG ...]

RESULTS.json is a merged `crossdistil evaluate` report; runs pair on (tasks, backbone, seed, mode).
"""

from __future__ import annotations

import json
import statistics
import sys


def cell(diffs: list[float]) -> str:
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return f"{mean:+.4f} ± {se:.4f}{'*' if abs(mean) > 2 * se else ''}"


def main(path: str, baseline: str, configs: list[str]) -> None:
    runs = json.load(open(path))["runs"]
    index = {(r["config"], tuple(r["tasks"]), r["backbone"], r["seed"], r["mode"]): r for r in runs}
    for tasks in sorted({tuple(r["tasks"]) for r in runs}):
        for mode, window in (("split", "test"), ("prequential", "tail")):
            head = " | ".join(f"Δ {m} {t}" for t in tasks for m in ("AUC", "GAUC"))
            print(f"\n### ({', '.join(tasks)}), {mode}, window `{window}`: against `{baseline}`\n")
            print(f"| config | backbone | seeds | {head} |\n|---|---|---|" + "---|" * 2 * len(tasks))
            for config in configs:
                for backbone in sorted({r["backbone"] for r in runs}):
                    keys = [k for k in index if k[0] == config and k[1:3] == (tasks, backbone) and k[4] == mode
                            and (baseline, *k[1:]) in index]
                    if not keys:
                        continue
                    pairs = [(index[k]["metrics"][window], index[(baseline, *k[1:])]["metrics"][window]) for k in keys]
                    cells = [cell([ours[t][m] - theirs[t][m] for ours, theirs in pairs])
                             for t in tasks for m in ("auc", "gauc")]
                    print(f"| {config} | {backbone} | {len(keys)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
