"""Acceptance tables of reports/kuairand_pure from results.json: paired differences to mtl, per backbone.

For each task pair, window (split ``test``, prequential ``tail`` and ``all``) and configuration: the paired
difference to ``mtl`` (same backbone and seed) of the mean test AUC over the pair's two tasks, of each task's AUC,
and of the per-user NDCG@10 of the combined score, as mean ± standard error over seeds; ``*`` marks
|mean| > 2 standard errors. The last columns check the issue's bar: mean-AUC gain >= +0.002 and > 2 s.e.
("AUC bar"), or combined NDCG@10 gain >= +0.005 and > 2 s.e. with no task losing more than 0.001 AUC ("NDCG bar").

    python reports/kuairand_pure/summarize.py reports/kuairand_pure/results.json > /tmp/tables.md

With ``--overview`` it prints instead the README's one-table summary: per pair and window, ``mtl``'s AUC (mean of
the backbones) and, per configuration, the paired Δ mean AUC averaged over the backbones (range over backbones)
and the averaged Δ combined NDCG@10. With ``--gauc``, per pair, window, configuration and backbone, each task's
paired Δ AUC beside its Δ GAUC (within-user ranking, which a global AUC gain can hide), in the ``served`` window
too where the runs have it (each user's rows ranked within one published model's scores).
"""

from __future__ import annotations

import json
import math
import sys

WINDOWS = {"split": ("test",), "prequential": ("tail", "all")}


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def cell(values: list[float]) -> str:
    mean, se = mean_se(values)
    if not math.isfinite(mean):
        return "–"
    star = "*" if math.isfinite(se) and se > 0 and abs(mean) > 2 * se else ""
    return f"{mean:+.4f} ± {se:.4f}{star}"


def paired(index: dict, tasks: tuple, mode: str, backbone: str, config: str) -> list[tuple[dict, dict]]:
    return [(index[(tasks, mode, backbone, config, s)], index[(tasks, mode, backbone, "mtl", s)])
            for (t, m, b, c, s) in index if (t, m, b, c) == (tasks, mode, backbone, config)
            and (tasks, mode, backbone, "mtl", s) in index]


def deltas(pairs: list[tuple[dict, dict]], tasks: tuple, window: str) -> tuple[dict, list[float], list[float]]:
    """Paired differences to ``mtl`` in ``window``, one per seed: each task's AUC, the mean AUC over the tasks, and
    the combined score's NDCG@10 (where both runs have it)."""
    auc = {t: [a["metrics"][window][t]["auc"] - b["metrics"][window][t]["auc"] for a, b in pairs] for t in tasks}
    mean_auc = [sum(auc[t][i] for t in tasks) / len(tasks) for i in range(len(pairs))]
    ndcg = [a["combined"][window]["ndcg10"] - b["combined"][window]["ndcg10"] for a, b in pairs
            if a.get("combined") and b.get("combined")]
    return auc, mean_auc, ndcg


def load(path: str) -> tuple[dict, list[str]]:
    """The runs of ``path`` by (tasks, mode, backbone, config, seed), and the configurations other than ``mtl``."""
    runs = json.load(open(path))["runs"]
    index = {(tuple(r["tasks"]), r["mode"], r["backbone"], r["config"], r["seed"]): r for r in runs}
    return index, list(dict.fromkeys(r["config"] for r in runs if r["config"] != "mtl"))


def backbones_of(index: dict, tasks: tuple, mode: str) -> list[str]:
    return [b for b in ("shared_bottom", "mmoe", "ple", "cross_stitch")
            if any(k[:3] == (tasks, mode, b) for k in index)]


def per_task(path: str) -> None:
    """``--gauc``: each task's paired Δ AUC and Δ GAUC to ``mtl``, per configuration and backbone."""
    index, configs = load(path)
    for tasks, mode in dict.fromkeys(k[:2] for k in index):
        runs = [r for k, r in index.items() if k[:2] == (tasks, mode)]
        served = mode == "prequential" and all("served" in r["metrics"] for r in runs)
        for window in WINDOWS[mode] + (("served",) if served else ()):
            print(f"### ({', '.join(tasks)}), {mode}, window `{window}`: AUC and GAUC per task\n")
            print("| config | backbone | seeds | " + " | ".join(f"Δ {m} {t}" for t in tasks for m in ("AUC", "GAUC"))
                  + " |\n|---|---|---|" + "---|" * 2 * len(tasks))
            for config in configs:
                for backbone in backbones_of(index, tasks, mode):
                    pairs = paired(index, tasks, mode, backbone, config)
                    if pairs:
                        cells = [cell([a["metrics"][window][t][m] - b["metrics"][window][t][m] for a, b in pairs])
                                 for t in tasks for m in ("auc", "gauc")]
                        print(f"| {config} | {backbone} | {len(pairs)} | " + " | ".join(cells) + " |")
            print()


def overview(path: str) -> None:
    index, configs = load(path)
    backbones = [b for b in ("shared_bottom", "mmoe", "ple", "cross_stitch") if any(k[2] == b for k in index)]
    print("| pair | window | `mtl` AUC (mean of backbones) | " + " | ".join(f"`{c}`" for c in configs) + " |")
    print("|---|---|---|" + "---|" * len(configs))
    for tasks in dict.fromkeys(k[0] for k in index):
        for mode, windows in WINDOWS.items():
            for window in windows:
                base = [r for k, r in index.items() if k[0] == tasks and k[1] == mode and k[3] == "mtl"]
                if not base:
                    continue
                mtl = " / ".join(f"{sum(r['metrics'][window][t]['auc'] for r in base) / len(base):.4f}"
                                 for t in tasks)
                cells = []
                for config in configs:
                    per_backbone, ndcg = [], []
                    for backbone in backbones:
                        pairs = paired(index, tasks, mode, backbone, config)
                        if not pairs:
                            continue
                        _, mean_auc, ndcg_deltas = deltas(pairs, tasks, window)
                        per_backbone.append(mean_se(mean_auc)[0])
                        ndcg.append(mean_se(ndcg_deltas)[0])
                    if not per_backbone:
                        cells.append("–")
                        continue
                    cells.append(f"{sum(per_backbone) / len(per_backbone):+.4f} ({min(per_backbone):+.4f}.."
                                 f"{max(per_backbone):+.4f}); NDCG {sum(ndcg) / len(ndcg):+.4f}")
                print(f"| {', '.join(tasks)} | {mode} `{window}` | {mtl} | " + " | ".join(cells) + " |")


def main(path: str) -> None:
    index, configs = load(path)
    for tasks, mode in dict.fromkeys(k[:2] for k in index):
        backbones = backbones_of(index, tasks, mode)
        for window in WINDOWS[mode]:
            print(f"### ({', '.join(tasks)}), {mode}, window `{window}`\n")
            print(f"| config | backbone | Δ mean AUC | Δ AUC {tasks[0]} | Δ AUC {tasks[1]} | Δ combined NDCG@10 "
                  "| AUC bar | NDCG bar |")
            print("|---|---|---|---|---|---|---|---|")
            for config in configs:
                passes_auc = passes_ndcg = 0
                for backbone in backbones:
                    pairs = paired(index, tasks, mode, backbone, config)
                    if not pairs:
                        continue
                    auc, mean_auc, ndcg = deltas(pairs, tasks, window)
                    m, se = mean_se(mean_auc)
                    auc_ok = math.isfinite(se) and m >= 0.002 and m > 2 * se
                    n, nse = mean_se(ndcg)
                    worst = min(mean_se(auc[t])[0] for t in tasks)
                    ndcg_ok = math.isfinite(nse) and n >= 0.005 and n > 2 * nse and worst >= -0.001
                    passes_auc += auc_ok
                    passes_ndcg += ndcg_ok
                    print(f"| {config} | {backbone} | {cell(mean_auc)} | {cell(auc[tasks[0]])} | "
                          f"{cell(auc[tasks[1]])} | {cell(ndcg)} | {'yes' if auc_ok else 'no'} | "
                          f"{'yes' if ndcg_ok else 'no'} |")
                print(f"| **{config}** | **backbones passing** | | | | | **{passes_auc}/{len(backbones)}** | "
                      f"**{passes_ndcg}/{len(backbones)}** |")
            print()


if __name__ == "__main__":
    mode = next((a for a in sys.argv[1:] if a.startswith("--")), "")
    {"": main, "--overview": overview, "--gauc": per_task}[mode](next(a for a in sys.argv[1:] if a != mode))
