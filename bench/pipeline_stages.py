"""Where the trainer's time goes without Kafka, and what the collector settings cost; prints one JSON object.

    python bench/pipeline_stages.py                               # ~2-3 minutes on 2 busy cores
    python bench/pipeline_stages.py --events 100000 --envelope 1 --rounds 5 --variants gc_default,gc_tuned

A synthetic stream (``--events`` impressions plus their feedback, 4 partitions per topic by a crc32 of the
key, so a user's events share a partition number across topics as with Kafka's own partitioner) is encoded
in messages of ``--envelope`` events and fed, message by message, through the trainer's own core:
``decode_record`` -> ``Pipeline.ingest`` (validation is in the decoder, the join in ingest) ->
``Pipeline.train_ready`` every 20 messages (batcher, ``encode_rows`` + ``Learner.step``, metrics) -> ``flush``.
No broker: this is the bound the daemon's Python sets, and a profile of it by stage (microseconds per event).

Variants, each in a fresh process, alternating for ``--rounds`` rounds (best and median reported, because
this shared machine's speed changes from minute to minute):

* ``gc_default``: CPython's collector thresholds (700, 10, 10);
* ``gc_tuned``: ``consumers.runtime.processes.tune_gc()``, what ``crossdistil train`` and ``backtest`` run with;
* ``separate``: ``gc_tuned`` with ``model.separate_process = true`` (the learner in a child process).

``ratio_to_gc_default`` divides each variant's median events/s by ``gc_default``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "bench"))

VARIANTS = ("gc_default", "gc_tuned", "separate")


def messages(impressions: int, envelope: int) -> tuple[list[tuple[tuple[str, int], bytes]], int]:
    """The synthetic stream as (source, message bytes), partitions interleaved as one poll would hand them out."""
    import zlib

    from streamer.datasets import open_dataset
    from streamer.events import encode, encode_batch
    from streamer.stream import merge_events

    data = open_dataset("synthetic", None, None, n_events=impressions, tasks="click,like")
    per_source: dict[tuple[str, int], list[dict]] = {}
    count = 0
    for routed in merge_events(data.interactions(), impression_topic="impressions", feedback_topic="feedback"):
        source = (routed.topic, zlib.crc32(routed.key.encode()) % 4)
        per_source.setdefault(source, []).append(routed.event)
        count += 1
    queues = {source: [encode_batch(events[i:i + envelope]) if envelope > 1 else encode(events[i])
                       for i in range(0, len(events), envelope)] for source, events in per_source.items()}
    out: list[tuple[tuple[str, int], bytes]] = []
    position = dict.fromkeys(queues, 0)
    while any(position[s] < len(q) for s, q in queues.items()):
        for source, queue in queues.items():  # up to 5 messages of each partition in turn
            out += [(source, value) for value in queue[position[source]:position[source] + 5]]
            position[source] += 5
    return out, count


def worker(args: argparse.Namespace) -> dict:
    import gc

    import torch
    from trainer_throughput import make_config

    from consumers.core.pipeline import decode_record
    from consumers.runtime.assembly import build_pipeline
    from consumers.runtime.processes import tune_gc

    torch.set_num_threads(args.torch_threads)
    stream, events = messages(args.events, args.envelope)
    cfg = make_config("127.0.0.1:9", "stages", Path("/nonexistent"), args.batch_size, 1.0,
                      separate_process=args.worker == "separate")
    pipeline = build_pipeline(cfg, clock=None)
    if args.worker == "gc_default":
        gc.set_threshold(700, 10, 10)
    else:
        tune_gc()
    clock = time.perf_counter
    decode_s = ingest_s = train_s = 0.0
    collections_before = sum(s["collections"] for s in gc.get_stats())
    started = clock()
    for n, (source, value) in enumerate(stream):
        a = clock()
        decoded = decode_record(value)
        b = clock()
        pipeline.ingest(decoded, source)
        c = clock()
        decode_s += b - a
        ingest_s += c - b
        if n % 20 == 0:
            pipeline.train_ready()
            train_s += clock() - c
    a = clock()
    pipeline.flush()
    train_s += clock() - a
    total_s = clock() - started
    pipeline.close()

    def per_event(s: float) -> float:
        return round(s / events * 1e6, 2)

    return {"events": events, "samples": pipeline.trained_samples, "seconds": round(total_s, 3),
            "events_per_s": round(events / total_s),
            "us_per_event": {"decode_validate": per_event(decode_s), "join": per_event(ingest_s),
                             "batch_train_metrics": per_event(train_s)},
            "gc_collections": sum(s["collections"] for s in gc.get_stats()) - collections_before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="impressions in the stream")
    parser.add_argument("--envelope", type=int, default=100, help="events per message (1: single events)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5,
                        help="default %(default)s: fewer are not enough on a noisy machine")
    parser.add_argument("--variants", default="gc_default,gc_tuned", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            print(f"[pipeline_stages] round {round_ + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--worker", variant, "--events", str(args.events),
                       "--envelope", str(args.envelope), "--batch-size", str(args.batch_size),
                       "--torch-threads", str(args.torch_threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"{variant} failed with status {done.returncode}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    report: dict = {"events": args.events, "envelope": args.envelope, "batch_size": args.batch_size,
                    "rounds": args.rounds, "variants": {}}
    for variant, results in runs.items():
        rates = [r["events_per_s"] for r in results]
        fastest = max(results, key=lambda r: r["events_per_s"])
        report["variants"][variant] = {"events_per_s_best": max(rates),
                                       "events_per_s_median": round(statistics.median(rates)),
                                       "rounds_events_per_s": rates, "us_per_event_fastest": fastest["us_per_event"],
                                       "gc_collections": fastest["gc_collections"], "samples": fastest["samples"]}
    if "gc_default" in report["variants"]:
        base = report["variants"]["gc_default"]["events_per_s_median"]
        for entry in report["variants"].values():
            entry["ratio_to_gc_default"] = round(entry["events_per_s_median"] / base, 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
