"""Wall time of a ``crossdistil evaluate`` grid with ``--jobs 1`` and ``--jobs N`` side by side; prints JSON.

    python bench/evaluate_jobs.py --jobs 2 --rounds 2 -- --dataset csv \
        --source ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv \
        --mapping mappings/kuairand_pure.toml --tasks finish,like --configs mtl --seeds 6 --mode split \
        --hash-buckets 262144 --device cpu

Everything after ``--`` is the grid (``--threads 1`` is added: each run on one core, in both). Each round runs the
grid once with ``--jobs 1`` and once with ``--jobs N`` (the order alternating), checks that both wrote the same runs
(every field but the seconds), and reports each one's wall seconds, the medians and the median of the per-round
speed-ups. The speed-up is bounded by the machine's free cores and by the runs' count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_grid(grid: list[str], jobs: int, out: Path) -> tuple[float, list[dict]]:
    """Wall seconds of ``crossdistil evaluate GRID --jobs JOBS --out OUT`` and its runs without their seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "consumers.cli", "evaluate", *grid, "--threads", "1", "--jobs", str(jobs),
                    "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    runs = json.loads((out / "results.json").read_text())["runs"]
    return seconds, [{k: v for k, v in run.items() if k != "seconds"} for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="N (default: the machine's cores)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("grid", nargs=argparse.REMAINDER, help="-- and the evaluate arguments of the grid")
    args = parser.parse_args(argv)
    grid = args.grid[1:] if args.grid[:1] == ["--"] else args.grid
    if not grid:
        parser.error("give the grid after --, e.g. -- --dataset kuairand --source ../shared/data/kuairand")
    seconds: dict[int, list[float]] = {1: [], args.jobs: []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            runs = {}
            for jobs in ((1, args.jobs) if r % 2 == 0 else (args.jobs, 1)):
                took, runs[jobs] = timed_grid(grid, jobs, Path(tmp) / f"r{r}_j{jobs}")
                seconds[jobs].append(took)
            same = same and runs[1] == runs[args.jobs]
    ratios = [a / b for a, b in zip(seconds[1], seconds[args.jobs])]
    print(json.dumps({"grid": grid, "jobs": args.jobs, "cores": os.cpu_count(), "rounds": args.rounds,
                      "runs": len(runs[1]), "seconds": {str(j): s for j, s in seconds.items()},
                      "median_seconds": {str(j): statistics.median(s) for j, s in seconds.items()},
                      "speedup": statistics.median(ratios), "same_runs": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
