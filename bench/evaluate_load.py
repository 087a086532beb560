"""How long ``crossdistil evaluate`` takes to read and encode a CSV data set, as columns and as rows; prints JSON.

    python bench/evaluate_load.py ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv \
        mappings/kuairand_pure.toml --rounds 3

Each round reads the file both ways (``consumers.tools.evaluate.load_encoded`` with ``columnar`` on and off, the
order alternating), with the hash caches emptied first (a fresh process's cold start), and checks that both give the
same arrays. Reports the seconds of each per round, the medians and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from consumers.tools.evaluate import feature_spec_for, load_encoded
from models import features
from streamer.datasets.tabular import open_tabular


def same(a, b) -> bool:  # noqa: ANN001
    """The same arrays, floats bit for bit (a NaN cell equals itself, -0.0 does not equal 0.0)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32) if t.dtype == torch.float32 else t
    return (all(torch.equal(bits(getattr(a.batch, n)), bits(getattr(b.batch, n)))
                for n in ("categorical", "numeric", "labels", "user"))
            and np.array_equal(a.users, b.users) and np.array_equal(a.ts_ms, b.ts_ms))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="CSV or TSV file")
    parser.add_argument("mapping", help="its column mapping (TOML)")
    parser.add_argument("--tasks", default="", help="tasks to encode (default: the mapping's first two)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    dataset = open_tabular(args.source, args.mapping)
    tasks = tuple(args.tasks.split(",")) if args.tasks else dataset.tasks[:2]
    spec = feature_spec_for(dataset, [])
    seconds: dict[str, list[float]] = {"columns": [], "rows": []}
    for round_ in range(args.rounds):
        results = {}
        for way in (("columns", "rows") if round_ % 2 == 0 else ("rows", "columns")):
            features._ROW_CACHES.clear()  # every round starts cold, as a new evaluate process does
            started = time.perf_counter()
            results[way] = load_encoded(dataset, tasks, spec, columnar=way == "columns")
            seconds[way].append(time.perf_counter() - started)
        if not same(results["columns"], results["rows"]):
            raise SystemExit("the columnar read and the row read disagree")
    print(json.dumps({
        "source": str(args.source), "mapping": str(args.mapping), "tasks": list(tasks),
        "events": len(results["rows"]), "features": len(spec.categorical) + len(spec.numeric), "rounds": args.rounds,
        "seconds": seconds, "median_s": {way: statistics.median(s) for way, s in seconds.items()},
        "speedup_median_of_rounds": statistics.median(r / c for r, c in zip(seconds["rows"], seconds["columns"])),
        "same_arrays": True,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
