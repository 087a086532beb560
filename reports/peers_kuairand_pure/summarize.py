"""The README's tables from results.json: mean AUC over seeds per config, window and task, and rows per second.

    python reports/peers_kuairand_pure/summarize.py reports/peers_kuairand_pure/results.json
    python reports/peers_kuairand_pure/summarize.py reports/peers_kuairand_pure/validation/results.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def table(path: str) -> str:
    runs = json.load(open(path))["runs"]
    by_config: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_config[run["config"]].append(run)
    tasks = runs[0]["tasks"]
    header = ["config", "seeds"] + [f"{w} {t}" for w in ("tail", "all") for t in tasks] + ["rows/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config, group in by_config.items():
        cells = [config, str(len(group))]
        for window in ("tail", "all"):
            for task in tasks:
                values = np.array([r["metrics"][window][task]["auc"] for r in group])
                cell = f"{values.mean():.4f}"
                cells.append(cell + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""))
        cells.append(f"{np.mean([r['train_events'] / r['seconds'] for r in group]):,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(table(name))
