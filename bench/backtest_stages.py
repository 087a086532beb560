"""Where a dense backtest's time goes: microseconds a sample by stage, as one JSON object.

    python bench/backtest_stages.py --log /tmp/kuairand_pure.evlog            # mtl, every record
    python bench/backtest_stages.py --log /tmp/kuairand_pure.evlog --configs mtl,crossdistil --limit 100000

Replays ``--log`` once (``run_backtest(..., batching="dense", intake="inline")`` and ``summary()``: every stage in
this process, where the timers see it; by default a dense replay reads, joins and encodes in an intake process)
with a timer around each stage (the timers cost about a microsecond a call, so the stages add up to a little more
than a run without them):

* ``validate``: ``LoggedRecord.events`` (the trainer's validator on each record, shared by every configuration);
* ``ingest``: ``Pipeline.ingest_each`` (dense) of the group's leader, of which ``join`` is
  ``AttributionJoin.add_events``;
* ``train``: ``Pipeline.train_ready`` and ``flush`` (every configuration's training, forwarded from the leader),
  of which ``encode`` (``SharedEncoding``), ``step`` (``Learner.step``), ``metrics`` (``TrainerMetrics.observe``)
  and ``record`` (``ConfigRun.on_batch``: the predictions kept and the series), of which ``series``
  (``ConfigRun.add_point``);
* ``summary``: the end-of-run metrics;
* ``read``: the rest: reading and unpacking the log, the replay loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

# (stage, owner, attribute): the function timed as that stage
STAGES = (
    ("validate", "consumers.tools.intake:LoggedRecord", "events"),
    ("ingest", "consumers.core.pipeline:Pipeline", "ingest"),
    ("ingest", "consumers.core.pipeline:Pipeline", "ingest_each"),
    ("join", "consumers.core.join:AttributionJoin", "add_events"),
    ("train", "consumers.core.pipeline:Pipeline", "train_ready"),
    ("train", "consumers.core.pipeline:Pipeline", "flush"),
    ("encode", "consumers.tools.backtest:SharedEncoding", "__call__"),
    ("step", "models.learner:Learner", "step"),
    ("metrics", "consumers.runtime.telemetry:TrainerMetrics", "observe"),
    ("record", "consumers.tools.backtest:ConfigRun", "on_batch"),
    ("series", "consumers.tools.backtest:ConfigRun", "add_point"),
)
TOP_LEVEL = ("validate", "ingest", "train", "summary")


def timed(seconds: Counter, stage: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[stage] += time.perf_counter() - started
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="an event log (crossdistil stream --to file://PATH)")
    parser.add_argument("--config", default=str(REPO_ROOT / "reports" / "backtest_kuairand_pure" / "config.toml"))
    parser.add_argument("--configs", default="mtl", help="rungs on --config, e.g. mtl,crossdistil")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    import importlib

    import torch

    import consumers.runtime.assembly
    from consumers.runtime.processes import tune_gc
    from consumers.tools.backtest import build_configs, log_records, run_backtest, summary

    torch.set_num_threads(args.torch_threads)
    tune_gc()
    seconds: Counter = Counter()
    for stage, owner, attribute in STAGES:
        module, name = owner.split(":")
        cls = getattr(importlib.import_module(module), name)
        setattr(cls, attribute, timed(seconds, stage, getattr(cls, attribute)))
    configs = build_configs([args.config], args.configs, [])
    consumers.runtime.assembly.build_pipeline(next(iter(configs.values())), clock=None).close()  # imports, untimed
    records, desc = log_records(f"file://{args.log}", limit=args.limit)
    started = time.perf_counter()
    result = run_backtest(records, configs, batching="dense", intake="inline")
    t0 = time.perf_counter()
    summary(result, desc)
    seconds["summary"] += time.perf_counter() - t0
    wall = time.perf_counter() - started
    seconds["read"] = wall - sum(seconds[s] for s in TOP_LEVEL)
    samples = next(iter(result.runs.values())).pipeline.trained_samples
    print(json.dumps({
        "log": args.log, "configs": args.configs, "records": result.records, "samples": samples,
        "seconds": round(wall, 3), "samples_per_s": round(samples / wall),
        "us_per_sample": {stage: round(seconds[stage] / samples * 1e6, 1)
                          for stage in ("read", *dict.fromkeys(s for s, _, _ in STAGES), "summary")},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
