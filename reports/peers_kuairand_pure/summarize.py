"""The README's tables from results.json: mean AUC over seeds per config, window and task, and rows per second;
then each config's AUC minus a reference's (``--against``, default vw_q: deterministic, so every seed of a deep
model is compared with its one run), mean ± std over seeds and the smallest difference.

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


def differences(path: str, against: str = "vw_q") -> str:
    runs = json.load(open(path))["runs"]
    reference = [r for r in runs if r["config"] == against]
    if not reference:
        return f"(no {against} run in {path})"
    tasks = runs[0]["tasks"]
    header = ["config", "seeds"] + [f"Δ {w} {t}" for w in ("tail", "all") for t in tasks]
    lines = [f"AUC minus {against}'s: mean ± std over seeds (smallest)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_config: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run["config"] != against:
            by_config[run["config"]].append(run)
    for config, group in by_config.items():
        cells = [config, str(len(group))]
        for window in ("tail", "all"):
            for task in tasks:
                base = reference[0]["metrics"][window][task]["auc"]
                d = np.array([r["metrics"][window][task]["auc"] - base for r in group])
                spread = f" ± {d.std(ddof=1):.4f}" if len(d) > 1 else ""
                cells.append(f"{d.mean():+.4f}{spread} ({d.min():+.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    against = "vw_q"
    if "--against" in args:
        i = args.index("--against")
        against = args[i + 1]
        del args[i:i + 2]
    for name in args:
        print(table(name))
        print()
        print(differences(name, against))
