"""What pausing partitions that run ahead in event time (``join.max_skew_s``) costs and buys; prints one JSON.

    python bench/partition_pausing.py                  # own broker; ~5 minutes on 2 busy cores
    python bench/partition_pausing.py --events 100000 --rounds 3 --memory-events 1000000

For single-event messages and for envelopes of ``--envelope`` events, one synthetic stream each (``--events``
impressions plus feedback) is read by the real trainer (learner in process) with pausing off
(``join.max_skew_s = 0``, the default) and on (``-1``: the longest attribution window), alternating for
``--rounds`` rounds on the same topics: events/s of each run and the median of each setting. Then a stream of
``--memory-events`` events in envelopes is read once per setting while RSS and the join's held feedback are
sampled (``bench/trainer_throughput.py``'s memory run): the largest number of early feedback events the join
held, and RSS after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

SETTINGS = {"off": 0.0, "on": -1.0}


def run(bootstrap: str, tag: str, workdir: Path, batch_size: int, setting: str, round_: int,
        sample_rss: bool = False) -> dict:
    import trainer_throughput as tt

    cfg = tt.make_config(bootstrap, tag, workdir, batch_size, 1.0, round_=round_ * 10 + (setting == "on"))
    cfg.join.max_skew_s = SETTINGS[setting]
    with contextlib.redirect_stdout(sys.stderr):
        return tt.run_trainer(cfg, 2.0, sample_rss=sample_rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="impressions per throughput stream")
    parser.add_argument("--envelope", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-events", type=int, default=1_000_000, help="0 = skip the memory runs")
    args = parser.parse_args()

    import logging
    import statistics

    import torch
    import trainer_throughput as tt

    from consumers.runtime.local_kafka import LocalKafka, free_port
    from consumers.runtime.processes import tune_gc

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    tune_gc()
    workdir = Path(tempfile.mkdtemp(prefix="pausing-bench-"))
    broker = LocalKafka(port=free_port(), data_dir=workdir / "kafka")
    tt.progress("starting a broker")
    broker.start(timeout_s=180)
    report: dict = {"batch_size": args.batch_size,
                    "settings": {k: f"join.max_skew_s = {v:g}" for k, v in SETTINGS.items()}}
    try:
        for mode, envelope in (("single", 1), ("envelope", args.envelope)):
            tag = f"pause-{mode}-{uuid.uuid4().hex[:6]}"
            tt.progress(f"{mode}: streaming {args.events} impressions")
            tt.stream(broker.bootstrap, tag, args.events, envelope)
            rates: dict[str, list[int]] = {name: [] for name in SETTINGS}
            for round_ in range(args.rounds):
                for setting in SETTINGS:
                    tt.progress(f"{mode}: round {round_ + 1}, pausing {setting}")
                    rates[setting].append(
                        run(broker.bootstrap, tag, workdir, args.batch_size, setting, round_)["events_per_s"])
            medians = {name: round(statistics.median(values)) for name, values in rates.items()}
            report[mode] = {"rounds_events_per_s": rates, "median_events_per_s": medians,
                            "on_to_off": round(medians["on"] / medians["off"], 3)}
        if args.memory_events:
            tag = f"pause-memory-{uuid.uuid4().hex[:6]}"
            tt.progress(f"memory: streaming ~{args.memory_events} events")
            tt.stream(broker.bootstrap, tag, args.memory_events // 2, args.envelope)
            report["memory"] = {}
            for setting in SETTINGS:
                tt.progress(f"memory: pausing {setting}")
                result = run(broker.bootstrap, tag, workdir, args.batch_size, setting, 0, sample_rss=True)
                rss = result["rss_mb"]
                report["memory"][setting] = {
                    "events_per_s": result["events_per_s"], "samples": result["samples"],
                    "rss_after_warmup_mb": [rss["after_warmup_min"], rss["after_warmup_max"]],
                    "flat_within_10pct": rss["flat_within_10pct"],
                    "early_feedback_held_max_sampled": max(point[3] for point in rss["series"]),
                    "pending_impressions_max_sampled": max(point[2] for point in rss["series"])}
    finally:
        broker.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
