"""Run every benchmark in one go; write one JSON with every number and a Markdown summary table.

    python bench/run_all.py                    # all benchmarks, defaults (tens of minutes on 2 cores)
    python bench/run_all.py --quick            # smaller sizes, for a smoke run
    python bench/run_all.py --only train_step,metrics_cost --out bench/results

Each benchmark is a script of this folder that prints one JSON object on stdout; this runner starts them one
after the other (never in parallel: the machine is shared and small), with a timeout each, and keeps going when
one fails (its error is recorded). Writes ``OUT/benchmarks.json`` (the machine, the git commit, every script's
full JSON, its wall time and exit status) and ``OUT/summary.md`` (the headline figures of each script, picked by
the names in ``HEADLINE_WORDS``, then every other numeric leaf in a collapsed table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (script, default args, --quick args, timeout seconds)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], float]] = {
    "kafka_throughput": ("kafka_throughput.py", [], ["--events", "5000"], 600),
    "train_step": ("train_step.py", [], ["--batch-sizes", "256,1024", "--steps", "3", "--rounds", "2"], 900),
    "metrics_cost": ("metrics_cost.py", [], ["--steps", "10", "--river-batches", "50"], 600),
    "pipeline_stages": ("pipeline_stages.py", [], ["--events", "20000", "--rounds", "1"], 900),
    "trainer_throughput": ("trainer_throughput.py", [], ["--events", "20000", "--memory-events", "100000"], 1800),
    "serving_pickup": ("serving_pickup.py", [], [], 600),
    "serving_load": ("serving_load.py", [], [], 600),
    "publish_compression": ("publish_compression.py", [], ["--rounds", "1", "--train-rows", "5000"], 600),
    "peers": ("peers.py", [], ["--limit", "10000"], 1800),
    "backtest_throughput": ("backtest_throughput.py", [], ["--impressions", "20000", "--rounds", "1"], 1800),
    "divergence_check": ("divergence_check.py", [], ["--table-log2", "16,19", "--rounds", "1"], 600),
}

# Headline figures: numeric leaves whose path names one of these (ratios first: they survive a noisy machine).
HEADLINE_WORDS = ("ratio_to", "_to_evaluate", "cost_to_one", "within", "meets_target", "flat", "p99", "percent_of",
                  "auc_tail", "samples_per_s", "events_per_s", "_over_check", "share_of_write")
MAX_HEADLINES = 8


def leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar leaf of a JSON value, with its dotted path."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaves(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from leaves(inner, f"{prefix}[{i}]")
    else:
        yield prefix, value


def run_one(name: str, script: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    path = ROOT / "bench" / script
    if not path.exists():
        return {"status": "missing", "error": f"bench/{script} does not exist"}
    print(f"[bench] {name}: python bench/{script} {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s", "seconds": timeout_s}
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        return {"status": "failed", "exit_code": proc.returncode, "seconds": seconds,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"}
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"status": "failed", "seconds": seconds, "error": "stdout is not one JSON object"}
    return {"status": "ok", "seconds": seconds, "command": f"python bench/{script} {' '.join(args)}".strip(),
            "result": result}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def summary_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Benchmarks ({report['finished']})", "",
             f"Machine: {report['machine']}. Commit: `{report['commit']}`. Command: `{report['command']}`.", "",
             "Ratios measured side by side within one script are the figures to trust; absolute numbers move with "
             "the load of this shared machine.", "",
             "| benchmark | status | seconds | headline figures |", "|---|---|---|---|"]
    for name, entry in report["benchmarks"].items():
        numeric = [(p, v) for p, v in leaves(entry.get("result", {})) if isinstance(v, (int, float))]
        heads = [f"{p} = {_fmt(v)}" for word in HEADLINE_WORDS for p, v in numeric if word in p.lower()]
        heads = list(dict.fromkeys(heads))[:MAX_HEADLINES]
        detail = "; ".join(heads) if entry["status"] == "ok" else entry.get("error", "")
        lines.append(f"| {name} | {entry['status']} | {_fmt(entry.get('seconds', ''))} | {detail} |")
    for name, entry in report["benchmarks"].items():
        if entry["status"] != "ok":
            continue
        lines += ["", f"<details><summary>{name}: every number</summary>", "", "| path | value |", "|---|---|"]
        lines += [f"| `{p}` | {_fmt(v)} |" for p, v in leaves(entry["result"]) if isinstance(v, (int, float, bool))]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for benchmarks.json and summary.md")
    parser.add_argument("--only", default="", help="comma list of benchmark names (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--render", metavar="JSON", help="only re-render summary.md from an earlier benchmarks.json")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        (Path(args.out) / "summary.md").write_text(summary_markdown(report))
        return 0
    chosen = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "commit": commit.stdout.strip() or "unknown",
        "command": "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "benchmarks": {},
    }
    for name in chosen:
        script, default_args, quick_args, timeout_s = BENCHMARKS[name]
        report["benchmarks"][name] = run_one(name, script, quick_args if args.quick else default_args, timeout_s)
        print(f"[bench] {name}: {report['benchmarks'][name]['status']}", file=sys.stderr, flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))
    print(f"[bench] wrote {out / 'benchmarks.json'} and {out / 'summary.md'}", file=sys.stderr)
    return 0 if all(e["status"] == "ok" for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
