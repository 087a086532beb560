"""Paired differences of probe.py's runs: each setting's student against lam = 0 of the same seed, per task and as
the mean over the pair's tasks (mean +- standard error over seeds; * where |mean| > 2 s.e.).

    python reports/kuairand_pure/privileged/summary.py runs.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{mean:+.4f} ± {se:.4f}{'*' if abs(mean) > 2 * se else ''}"


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for path in paths for line in open(path) if line.startswith("{")]
    groups = defaultdict(dict)
    for r in runs:
        key = (tuple(r["tasks"]), r["backbone"], r.get("mode", "split"), tuple(r["privileged"]), r.get("after", False),
               r.get("test", False))
        groups[key][(json.dumps(r["lam"], sort_keys=True) if isinstance(r["lam"], dict) else
                     json.dumps({t: r["lam"] for t in r["tasks"]}, sort_keys=True), r["seed"])] = r
    for key, by in groups.items():
        tasks = key[0]
        print(f"\n{','.join(tasks)} {key[1]} {key[2]} privileged={','.join(key[3])}{' after' if key[4] else ''}"
              f"{' TEST SPLIT' if key[5] else ' validation'}")
        base = {seed: r for (lam, seed), r in by.items() if all(v == 0 for v in json.loads(lam).values())}
        base_auc = {t: round(statistics.fmean(r["student"][t] for r in base.values()), 4) for t in tasks}
        teacher = {t: round(statistics.fmean(r["teacher"][t] for r in base.values()), 4) for t in tasks}
        print(f"  mtl AUC {base_auc}; teacher AUC {teacher}")
        for lam in sorted({lam for lam, _ in by}):
            seeds = sorted(s for other, s in by if other == lam and s in base)
            if all(v == 0 for v in json.loads(lam).values()) or not seeds:
                continue
            deltas = {t: [by[(lam, s)]["student"][t] - base[s]["student"][t] for s in seeds] for t in tasks}
            mean = [statistics.fmean(deltas[t][i] for t in tasks) for i in range(len(seeds))]
            print(f"  lam {lam} ({len(seeds)} seeds): " + "  ".join(f"{t} {cell(deltas[t])}" for t in tasks)
                  + f"  mean {cell(mean)}")


if __name__ == "__main__":
    main(sys.argv[1:])
