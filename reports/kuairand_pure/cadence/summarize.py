"""How often must a trainer publish? Tables of reports/kuairand_pure/cadence/run.sh's results (README §3i).

Every prequential run of ``results.json`` carries ``cadence`` (``crossdistil evaluate --cadence``): its tail served
by a model published N times over the tail, for each N. Per pair, backbone and N this prints each task's served
AUC (mean over seeds) and the paired differences (same backbone and seed) to N = 1, a model never updated after
the first 80 % of the log, of its AUC and log loss, as mean ± standard error (``*``: |mean| > 2 s.e.); ``kept`` is
the share of the prequential tail's AUC gain over N = 1 (every batch scored by the model of just before it: the
limit of publishing after every step) that N publications keep. The last row per backbone is that limit.

    python reports/kuairand_pure/cadence/summarize.py SOURCE_CSV results.json --json cadence.json > cadence.md

``--against DIR``: also check that each cadence's figures are those of the ``served`` window of a grid run with
``--publications N`` alone (``DIR/p<N>/results.json``, run.sh's step 2); exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

BACKBONES = ("shared_bottom", "mmoe", "ple", "cross_stitch")


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan)


def cell(values: list[float]) -> str:
    mean, se = mean_se(values)
    star = "*" if math.isfinite(se) and se > 0 and abs(mean) > 2 * se else ""
    return f"{mean:+.4f} ± {se:.4f}{star}"


def served(run: dict, n: int, task: str) -> dict:
    """The run's tail served at ``n`` publications: {"auc", "log_loss", "calibration"}."""
    return next(c for c in run["cadence"] if c["publications"] == n)["metrics"][task]


def figures(runs: list[dict], n: int, task: str) -> tuple[list[str], dict]:
    """One task's cells and figures at ``n`` publications, each run paired with its own N = 1."""
    auc = [served(r, n, task)["auc"] for r in runs]
    gain = [served(r, n, task)["auc"] - served(r, 1, task)["auc"] for r in runs]
    limit = [r["metrics"]["tail"][task]["auc"] - served(r, 1, task)["auc"] for r in runs]
    loss = [served(r, n, task)["log_loss"] - served(r, 1, task)["log_loss"] for r in runs]
    kept = mean_se(gain)[0] / mean_se(limit)[0] if mean_se(limit)[0] else math.nan
    return ([f"{mean_se(auc)[0]:.4f}", cell(gain), f"{kept:.0%}", cell(loss)],
            {"served_auc": mean_se(auc), "delta_auc_to_1": mean_se(gain), "tail_gain_over_1": mean_se(limit),
             "kept": kept, "delta_log_loss_to_1": mean_se(loss)})


def limit_cells(runs: list[dict], task: str) -> list[str]:
    """The prequential ``tail`` of the same runs against their N = 1: the limit of publishing after every step."""
    tail = [r["metrics"]["tail"][task] for r in runs]
    return [f"{mean_se([t['auc'] for t in tail])[0]:.4f}",
            cell([t["auc"] - served(r, 1, task)["auc"] for t, r in zip(tail, runs)]), "100%",
            cell([t["log_loss"] - served(r, 1, task)["log_loss"] for t, r in zip(tail, runs)])]


def tail_hours(source: str, n_tail: int) -> float:
    """Hours of event time the last ``n_tail`` rows of ``source`` span (its ``time_ms`` column, sorted)."""
    import pyarrow.csv as pacsv  # evaluate's own CSV reader (streamer/datasets/columnar.py)

    table = pacsv.read_csv(source, convert_options=pacsv.ConvertOptions(include_columns=["time_ms"]))
    times = table["time_ms"].to_numpy()
    return float(times[-1] - times[-n_tail]) / 3.6e6


def summarize(source: str, runs: list[dict]) -> tuple[list[str], list[dict]]:
    lines, rows = [], []
    for tasks in dict.fromkeys(tuple(r["tasks"]) for r in runs):
        pair = [r for r in runs if tuple(r["tasks"]) == tasks]
        counts = sorted({c["publications"] for r in pair for c in r["cadence"]})
        if 1 not in counts:
            raise ValueError(f"({', '.join(tasks)}): no N = 1, the reference of the paired differences")
        n_tail = pair[0]["metrics"]["tail"][tasks[0]]["n"]
        hours = tail_hours(source, n_tail)
        lines += [f"### ({', '.join(tasks)}): the tail's {n_tail:,} events span {hours:.1f} h\n",
                  "| backbone | N | events / publication | hours / publication | seeds | "
                  + " | ".join(f"AUC {t} | Δ AUC {t} to N = 1 | kept {t} | Δ log loss {t}" for t in tasks) + " |",
                  "|---|---|---|---|---|" + "---|---|---|---|" * len(tasks)]
        for backbone in [b for b in BACKBONES if any(r["backbone"] == b for r in pair)]:
            cell_runs = sorted((r for r in pair if r["backbone"] == backbone), key=lambda r: r["seed"])
            for n in counts:
                row = {"pair": list(tasks), "backbone": backbone, "publications": n, "seeds": len(cell_runs),
                       "events_per_publication": round(n_tail / n, 1), "hours_per_publication": round(hours / n, 2)}
                cells = []
                for task in tasks:
                    task_cells, row[task] = figures(cell_runs, n, task)
                    cells += task_cells
                lines.append(f"| {backbone} | {n} | {n_tail / n:,.0f} | {hours / n:.1f} | {len(cell_runs)} | "
                             + " | ".join(cells) + " |")
                rows.append(row)
            lines.append(f"| {backbone} | every step (prequential `tail`) | 256 | – | {len(cell_runs)} | "
                         + " | ".join(c for task in tasks for c in limit_cells(cell_runs, task)) + " |")
        lines.append("")
    return lines, rows


def check_against(runs: list[dict], separate: Path) -> list[str]:
    """Differences between each cadence and the ``served`` window of ``separate/p<N>``'s run of the same
    (tasks, backbone, seed); [] when every figure is equal."""
    problems, checked = [], 0
    for path in sorted(separate.glob("p*/results.json")):
        n = int(path.parent.name[1:])
        for other in json.loads(path.read_text())["runs"]:
            run = next((r for r in runs if (r["tasks"], r["backbone"], r["seed"])
                        == (other["tasks"], other["backbone"], other["seed"])), None)
            if run is None:
                continue
            for task in run["tasks"]:
                ours, theirs = served(run, n, task), other["metrics"]["served"][task]
                checked += 1
                if any(ours[k] != theirs[k] for k in ours):
                    problems.append(f"N = {n}, {run['backbone']} seed {run['seed']} {task}: {ours} != {theirs}")
    print(f"checked {checked} (run, N, task) figures against {separate}: {len(problems)} differ", file=sys.stderr)
    return problems if checked else [f"nothing to check under {separate}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the KuaiRand-Pure CSV the runs read (for the tail's span in hours)")
    parser.add_argument("results", type=Path, help="results.json of `crossdistil evaluate --cadence ...`")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--against", type=Path, help="run.sh's OUT/separate: check the cadences against it")
    args = parser.parse_args(argv)
    runs = [r for r in json.loads(args.results.read_text())["runs"] if r["mode"] == "prequential" and r.get("cadence")]
    if not runs:
        sys.exit(f"{args.results}: no prequential run with a cadence (crossdistil evaluate --cadence)")
    if args.against:
        problems = check_against(runs, args.against)
        if problems:
            sys.exit("\n".join(problems))
    lines, rows = summarize(args.source, runs)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
