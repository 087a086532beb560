"""Several trainer ranks, one model: throughput and quality of N ranks against one, side by side; prints JSON.

    python bench/scaling.py --log file:///tmp/kuairand_pure.evlog                 # compute + broker, ~10 min
    python bench/scaling.py --log file:///tmp/kuairand_pure.evlog --parts compute --ranks 1,2,4,8 --modes sync,average

(write the event log first: ``crossdistil stream --dataset csv --source ../shared/data/kuairand_pure/\
kuairand_pure_20220425_20220508.csv --mapping mappings/kuairand_pure.toml --to file:///tmp/kuairand_pure.evlog``)

* ``compute``: ranks fed from the event log, no broker (``consumers.tools.rank_replay``): events/s of 1, 2, 4, 8
  ranks (those not above the machine's cores), per mode (``distributed.mode`` sync and average, and sync with
  ``global_batch``), the collective's seconds per step and its share of the replay, and the prequential AUC over
  all samples and the last 20 % against one rank's (the quality side of ``docs/scaling.md``).
* ``broker``: the real trainer (``crossdistil train``, its own processes) on the event log streamed into
  4-partition topics of a local broker, 1 rank and ``--world-size 2`` (torchrun, gloo) back to back: events/s
  from each rank's first assignment to its last event plus the final flush (the trainer's own closing line), the
  ranks' events summed over their slowest time.

``speedup`` = events/s of N ranks / events/s of one; ``efficiency`` = speedup / N (target >= 0.8 up to the cores).
``independent``: N processes replaying the same shares with no collectives at all (N separate models): what the
machine itself allows N ranks, so the ranks' speedup can be read against it.
On a shared machine these are ratios measured in one run, never absolute promises.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

DEFAULT_CONFIG = REPO_ROOT / "reports" / "backtest_kuairand_pure" / "config.toml"
CONSUMED = re.compile(r"consumed (\d+) events in ([\d.]+) s")


def progress(message: str) -> None:
    print(f"[scaling] {message}", file=sys.stderr, flush=True)


VARIANTS = {"sync": ["distributed.mode='sync'"], "average": ["distributed.mode='average'"],
            "sync_global_batch": ["distributed.mode='sync'", "distributed.global_batch=true"]}


def compared(result: dict[str, Any], one: dict[str, Any], n: int) -> dict[str, Any]:
    """``result`` of n ranks with its speedup over one rank and its AUC differences from one rank's."""
    speedup = result["events_per_s"] / one["events_per_s"]
    differences = {f"auc_{part}_minus_one_rank": {t: round(result[f"auc_{part}"][t] - one[f"auc_{part}"][t], 5)
                                                  for t in one[f"auc_{part}"]} for part in ("tail", "all")}
    return {**result, "speedup": round(speedup, 3), "efficiency": round(speedup / n, 3), **differences}


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of 1..N ranks per variant (seed 0), then the paired AUC differences of 2 ranks over seeds."""
    import statistics

    from consumers.runtime.config import load_config
    from consumers.tools.rank_replay import replay_ranks

    def replay(n: int, variant: list[str], seed: int) -> dict[str, Any]:
        cfg = load_config(args.config, env={}, overrides=[*variant, f"model.seed={seed}"])
        return replay_ranks(args.log, cfg, n, partitions=args.partitions)

    cores = os.cpu_count() or 1
    wanted = [int(x) for x in args.ranks.split(",")]
    counts = [n for n in wanted if n <= cores or args.oversubscribe]
    modes = [m for m in args.modes.split(",") if m]
    out: dict[str, Any] = {"ranks": counts, "skipped_above_cores": [n for n in wanted if n not in counts]}
    progress("compute: 1 rank, seed 0")
    one = out["one_rank"] = replay(1, [], 0)
    # The machine's own ceiling: the same shares in as many processes at once, no collectives (N separate models).
    out["independent"] = []
    for n in [c for c in counts if c > 1]:
        progress(f"compute: {n} independent processes (the ceiling)")
        cfg = load_config(args.config, env={})
        result = replay_ranks(args.log, cfg, n, partitions=args.partitions, independent=True)
        out["independent"].append({key: result[key] for key in ("ranks", "events", "seconds", "events_per_s")}
                                  | {"speedup": round(result["events_per_s"] / one["events_per_s"], 3)})
    for mode in modes:
        out[mode] = []
        for n in [c for c in counts if c > 1]:
            progress(f"compute: {n} ranks, {mode}, seed 0")
            out[mode].append(compared(replay(n, VARIANTS[mode], 0), one, n))
    # Quality: 2 ranks against one, paired by seed (seed 0 from above).
    pairs: dict[str, list[dict[str, Any]]] = {m: [r for r in out[m] if r["ranks"] == 2][:1] for m in modes}
    for seed in range(1, args.seeds):
        progress(f"compute: quality, seed {seed}")
        one_seed = replay(1, [], seed)
        for mode in modes:
            pairs[mode].append(compared(replay(2, VARIANTS[mode], seed), one_seed, 2))
    quality = {}
    for mode, rows in pairs.items():
        if not rows:
            continue
        quality[mode] = {}
        for key in ("auc_tail_minus_one_rank", "auc_all_minus_one_rank"):
            quality[mode][key] = {
                t: {"mean": round(statistics.fmean(r[key][t] for r in rows), 5),
                    "stdev": round(statistics.stdev([r[key][t] for r in rows]), 5) if len(rows) > 1 else None,
                    "per_seed": [r[key][t] for r in rows]} for t in rows[0][key]}
    out["quality_two_ranks"] = {"seeds": len(next(iter(pairs.values()), [])), **quality}
    return out


def run_trainer(config: Path, world_size: int, log: Path, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--exit-when-idle", "3",
               "--torch-threads", "1"]
    if world_size > 1:
        command += ["--world-size", str(world_size), "--max-restarts", "0"]
    started = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.run(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}).returncode
    text = log.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"trainer with {world_size} rank(s) exited {rc}:\n{text[-3000:]}")
    found = [(int(e), float(s)) for e, s in CONSUMED.findall(text)]
    if len(found) != world_size:
        raise RuntimeError(f"expected {world_size} 'consumed' lines, found {found}")
    events = sum(e for e, _ in found)
    seconds = max(s for _, s in found)
    return {"ranks": world_size, "events": events, "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds, 1), "per_rank": [{"events": e, "seconds": s} for e, s in found],
            "process_seconds": round(time.monotonic() - started, 1)}


def broker(args: argparse.Namespace) -> dict[str, Any]:
    from consumers.runtime.config import load_config, to_toml
    from consumers.runtime.local_kafka import LocalKafka, free_port
    from streamer.stream import stream_dataset
    from streamer.topics import ensure_topics

    workdir = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    kafka = LocalKafka(port=free_port(), data_dir=workdir / "kafka")
    progress("broker: starting")
    kafka.start(timeout_s=180)
    try:
        tag = uuid.uuid4().hex[:6]
        # The log's own topic names (impressions, feedback) on this private broker, 4 partitions each.
        ensure_topics(kafka.bootstrap, 4)
        progress(f"broker: streaming {args.log}")
        summary = stream_dataset("log", args.log, f"kafka://{kafka.bootstrap}")
        results = {}
        for n in (1, 2):
            cfg = load_config(args.config, env={}, overrides=[
                f"kafka.bootstrap='{kafka.bootstrap}'", f"kafka.group_id='scaling-{tag}-{n}'",
                f"checkpoint.dir='{workdir / f'checkpoints-{n}'}'", "checkpoint.every_steps=0",
                "checkpoint.every_s=30.0", "metrics.port=0", "batching.max_batch_delay_s=5.0",
                "join.idle_timeout_s=600.0"])
            config = workdir / f"trainer-{n}.toml"
            config.write_text(to_toml(cfg))
            progress(f"broker: {n} rank(s)")
            results[n] = run_trainer(config, n, workdir / f"trainer-{n}.log", args.timeout)
        speedup = results[2]["events_per_s"] / results[1]["events_per_s"]
        return {"streamed": summary, "one_rank": results[1], "two_ranks": results[2], "speedup": round(speedup, 3),
                "efficiency": round(speedup / 2, 3)}
    finally:
        kafka.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="event log (file://PATH), e.g. KuaiRand-Pure's")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="trainer configuration (model, join, batching)")
    parser.add_argument("--parts", default="compute,broker", help="compute, broker or both")
    parser.add_argument("--ranks", default="1,2,4,8", help="rank counts of the compute part (above the cores: skipped)")
    parser.add_argument("--modes", default="sync,average,sync_global_batch", help="compute part's variants")
    parser.add_argument("--seeds", type=int, default=5, help="compute part: seeds of the 2-rank quality comparison")
    parser.add_argument("--partitions", type=int, default=8, help="compute part: partitions the log is split into")
    parser.add_argument("--oversubscribe", action="store_true", help="run rank counts above the cores too")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one broker-part trainer run may take")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    import torch

    report: dict[str, Any] = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                              "log": args.log, "config": str(args.config)}
    parts = {p.strip() for p in args.parts.split(",")}
    if "compute" in parts:
        report["compute"] = compute(args)
    if "broker" in parts:
        report["broker"] = broker(args)
    report["environment"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
