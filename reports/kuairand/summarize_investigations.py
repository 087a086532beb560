"""Print the investigation table of README.md: each variant's test AUC and its paired difference to ``mtl``.

Baselines (``mtl``, same task pair, backbone and seed, default options) come from the main grid in
``reports/kuairand/results.json``; variants from ``reports/kuairand/investigations/*/results.json``.
Run from the repository root:  python reports/kuairand/summarize_investigations.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fmt(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.4f} ± {std:.4f}"


def main() -> None:
    base = {}
    for run in json.loads((HERE / "results.json").read_text())["runs"]:
        if run["mode"] == "split":
            base[(tuple(run["tasks"]), run["backbone"], run["config"], run["seed"])] = run
    print("| variant | options | tasks | backbone | config | per task: AUC (ΔAUC vs mtl; ΔMulti-AUC vs mtl) |")
    print("|---|---|---|---|---|---|")
    for path in sorted((HERE / "investigations").glob("*/results.json")):
        doc = json.loads(path.read_text())
        options = dict(doc["protocol"].get("model_options", {}))
        if doc["protocol"].get("epochs", 1) != 1:
            options["epochs"] = doc["protocol"]["epochs"]
        groups: dict[tuple, list] = {}
        for run in doc["runs"]:
            groups.setdefault((tuple(run["tasks"]), run["backbone"], run["config"]), []).append(run)
        for (tasks, backbone, config), runs in groups.items():
            cells = []
            for task in tasks:
                aucs = [r["metrics"]["test"][task]["auc"] for r in runs]
                d_auc = [r["metrics"]["test"][task]["auc"]
                         - base[(tasks, backbone, "mtl", r["seed"])]["metrics"]["test"][task]["auc"] for r in runs]
                d_multi = [r["metrics"]["test"][task]["multi_auc"]
                           - base[(tasks, backbone, "mtl", r["seed"])]["metrics"]["test"][task]["multi_auc"]
                           for r in runs]
                cells.append(f"{task} {statistics.mean(aucs):.4f} ({_fmt(d_auc)}; {_fmt(d_multi)})")
            opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(f"| {path.parent.name} | {opts} | {','.join(tasks)} | {backbone} | {config} | {'<br>'.join(cells)} |")


if __name__ == "__main__":
    main()
