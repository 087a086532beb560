"""End-to-end throughput, freshness and memory of the trainer daemon; prints one JSON object.

    python bench/trainer_throughput.py                      # own broker; a few minutes on 2 busy cores
    python bench/trainer_throughput.py --events 300000 --memory-events 1000000 --torch-threads 1

For single-event messages and for batch envelopes of ``--envelope`` events, a synthetic stream (``--events``
impressions plus their feedback) is produced to fresh topics, then:

* ``consume_decode``: a plain kafka-python consumer reads both topics and runs ``decode_events`` (the intake
  bound);
* ``trainer``: the real daemon (``consumers.trainer.daemon.Trainer``, in this process) consumes everything with
  ``exit_when_idle``; events/s over the time from its partition assignment to the end of the stream (the idle
  wait is not counted);
* ``trainer_separate_process``: the same daemon on the same topics (its own group and checkpoints) with
  ``model.separate_process = true``: the learner trains in a child process while this one ingests;
* ``train_step``: ``encode_rows`` + ``Learner.step`` alone on the same model, as samples/s and as the events/s
  it sustains (samples/s x events per impression of the stream); the median of five rounds.

Each of ``--rounds`` rounds reads the topics raw and then runs the trainer in both modes, back to back.
``ratio`` = trainer / min(consume_decode, train_step) within a round; the median over rounds is reported
(every round's in ``rounds_ratio_to_bound``), and the events/s figures are each kind's fastest run.
Target ratio >= 0.8. Freshness: seconds from a sample's
emission by the join (its windows closed in event time) to the step that trains it (median, p99; target p99
<= max_batch_delay + one step), and from a checkpoint to its acknowledged publication. Memory: RSS sampled every
0.5 s (the trainer's plus its learner process's) while the trainer consumes a stream of ``--memory-events``
events in envelopes; ``flat`` compares the
largest and smallest RSS after warm-up (the first 20 % of the run), target within +-10 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

TASKS = ("click", "like")
MODEL = {"embedding_dim": 8, "hidden_dims": [32], "tower_dims": [16],
         "features": {"categorical": ["user_id", "item_id", "item_category", "hour"], "numeric": [],
                      "hash_buckets": 65536}}


def progress(message: str) -> None:
    print(f"[trainer_throughput] {message}", file=sys.stderr, flush=True)


def make_config(bootstrap: str, tag: str, directory: Path, batch_size: int, max_batch_delay_s: float,
                separate_process: bool = False, round_: int = 0):
    """The trainer configuration of one run over the topics of ``tag`` (its own group and checkpoints)."""
    from consumers.runtime.config import load_config, toml_value

    run = f"{tag}-{'separate' if separate_process else 'inline'}-{round_}"
    overrides = [
        f"kafka.bootstrap={json.dumps(bootstrap)}", f"kafka.group_id={json.dumps('bench-' + run)}",
        f"kafka.impressions_topic={json.dumps('imp-' + tag)}", f"kafka.feedback_topic={json.dumps('fb-' + tag)}",
        f"kafka.dead_letter_topic={json.dumps('dl-' + tag)}", f"kafka.model_topic={json.dumps('model-' + tag)}",
        "join.attribution_window_s={click = 10, like = 60}", "join.idle_timeout_s=600.0",
        f"batching.batch_size={batch_size}", f"batching.max_batch_delay_s={max_batch_delay_s}",
        f"model.tasks={json.dumps(list(TASKS))}", "model.device=\"cpu\"",
        "model.options=" + toml_value(MODEL), f"model.separate_process={toml_value(separate_process)}",
        f"checkpoint.dir={json.dumps(str(directory / run))}", "checkpoint.every_steps=0", "checkpoint.every_s=10.0",
        "metrics.port=0",
    ]
    return load_config(None, env={}, overrides=overrides)


def stream(bootstrap: str, tag: str, impressions: int, envelope: int) -> dict:
    from streamer.stream import stream_dataset
    from streamer.topics import ensure_topics

    ensure_topics(bootstrap, 4, impression_topic=f"imp-{tag}", feedback_topic=f"fb-{tag}",
                  dead_letter_topic=f"dl-{tag}", model_topic=f"model-{tag}")
    return stream_dataset("synthetic", None, f"kafka://{bootstrap}", envelope=envelope,
                          options={"n_events": impressions, "tasks": ",".join(TASKS)},
                          impression_topic=f"imp-{tag}", feedback_topic=f"fb-{tag}")


def consume_decode(bootstrap: str, tag: str) -> dict:
    """Plain kafka-python poll + decode_events over both topics, to their end offsets."""
    from kafka import KafkaConsumer, TopicPartition

    from streamer.events import decode_events

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             max_poll_records=2000)
    try:
        partitions = [TopicPartition(t, p) for t in (f"imp-{tag}", f"fb-{tag}")
                      for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        events = 0
        started = time.perf_counter()
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    events += len(decode_events(record.value))
        seconds = time.perf_counter() - started
        return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(events / seconds)}
    finally:
        consumer.close()


def train_step_rate(cfg, steps: int) -> dict:
    """Samples/s of encode_rows + Learner.step on rows shaped like the synthetic stream's impressions."""
    import numpy as np

    from consumers.runtime.assembly import model_config
    from models.features import encode_rows
    from models.learner import Learner

    learner = Learner(model_config(cfg))
    rng = np.random.default_rng(0)
    size = cfg.batching.batch_size
    rows = [[{"user_id": str(rng.integers(1000)), "item_id": str(rng.integers(5000)),
              "features": {"item_category": str(rng.integers(20)), "hour": int(rng.integers(24))},
              "labels": {t: int(rng.random() < 0.3) for t in TASKS}} for _ in range(size)] for _ in range(4)]
    for i in range(3):
        learner.step(encode_rows(rows[i % 4], learner.config.features, TASKS))
    rounds = []  # the median of five rounds: one busy moment of this shared machine must not set the bound
    for _ in range(5):
        started = time.perf_counter()
        for i in range(steps):
            learner.step(encode_rows(rows[i % 4], learner.config.features, TASKS))
        rounds.append((time.perf_counter() - started) / steps)
    step_s = sorted(rounds)[len(rounds) // 2]
    return {"batch_size": size, "step_seconds": round(step_s, 5), "samples_per_s": round(size / step_s),
            "rounds_samples_per_s": [round(size / r) for r in rounds]}


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # the learner process is not started yet, or gone
        return 0


def run_trainer(cfg, idle_s: float, sample_rss: bool = False) -> dict:
    from consumers.trainer.daemon import Trainer

    trainer = Trainer(cfg, exit_when_idle_s=idle_s)
    # (time, trainer RSS, learner process RSS, join: pending impressions, early feedback)
    samples: list[tuple[float, int, int, int, int]] = []
    done = threading.Event()

    def sampler() -> None:  # the trainer's RSS plus its learner process's, when it has one
        process = getattr(trainer.learner, "process", None)  # a RemoteLearner's child
        join = trainer.pipeline.join
        while not done.wait(0.5):
            samples.append((time.monotonic(), rss_bytes(), rss_bytes(process.pid) if process else 0,
                            join.pending_impressions, join.early_feedback))

    thread = threading.Thread(target=sampler, daemon=True)
    if sample_rss:
        thread.start()
    with contextlib.redirect_stdout(sys.stderr):  # the daemon's own lines: stdout is the JSON report
        rc = trainer.run()
    finished = time.monotonic()
    done.set()
    if rc != 0:
        raise RuntimeError(f"trainer exited with {rc}")
    # Consuming (assignment -> last event) plus training what the end-of-stream flush released; not the idle wait.
    seconds = ((trainer.last_event_at - trainer.kafka.first_assigned_at)
               + (trainer.drained_at - trainer.flush_started_at))
    out = {"events": trainer.events_consumed, "samples": trainer.trained_samples, "steps": trainer.learner.steps,
           "seconds": round(seconds, 3), "events_per_s": round(trainer.events_consumed / max(seconds, 1e-9)),
           "final_flush_seconds": round(trainer.drained_at - trainer.flush_started_at, 3),
           "final_checkpoint_seconds": round(finished - trainer.drained_at, 3)}
    fresh = trainer.freshness.percentiles((0.5, 0.99, 1.0))
    if fresh:
        out["freshness_s"] = {"median": round(fresh[0.5], 4), "p99": round(fresh[0.99], 4), "max": round(fresh[1.0], 4)}
    if trainer.publisher.delays_s:
        delays = sorted(trainer.publisher.delays_s)
        out["checkpoint_to_publication_s"] = {"median": round(delays[len(delays) // 2], 4), "max": round(delays[-1], 4),
                                              "publications": len(delays)}
    if sample_rss and samples:
        start, end = samples[0][0], samples[-1][0]
        warm = [(own, learner) for t, own, learner, *_ in samples if t >= start + 0.2 * (end - start)]
        totals = [own + learner for own, learner in warm]
        out["rss_mb"] = {"samples": len(samples), "after_warmup_min": round(min(totals) / 2**20, 1),
                         "after_warmup_max": round(max(totals) / 2**20, 1),
                         "end": round((samples[-1][1] + samples[-1][2]) / 2**20, 1),
                         "flat_within_10pct": max(totals) <= 1.10 * min(totals),
                         "trainer_min_max": [round(min(o for o, _ in warm) / 2**20, 1),
                                             round(max(o for o, _ in warm) / 2**20, 1)],
                         "learner_process_min_max": [round(min(x for _, x in warm) / 2**20, 1),
                                                     round(max(x for _, x in warm) / 2**20, 1)],
                         # At most 20 points of (seconds since the first sample, total MB, impressions and
                         # feedback the join holds): growth or a plateau, and whether the join explains it.
                         "series": [[round(t - start, 1), round((own + learner) / 2**20, 1), pending, early]
                                    for t, own, learner, pending, early in samples[::max(1, len(samples) // 20)]]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--events", type=int, default=100_000, help="impressions per throughput stream")
    parser.add_argument("--envelope", type=int, default=100, help="events per batch envelope")
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="samples per step (default %(default)s: the step's fixed cost, ~10 ms, is then shared "
                             "by enough samples that training is not the bound)")
    parser.add_argument("--max-batch-delay", type=float, default=1.0)
    parser.add_argument("--memory-events", type=int, default=1_000_000,
                        help="events (impressions + feedback, approximately) of the memory run; 0 = skip")
    parser.add_argument("--memory-separate-process", action=argparse.BooleanOptionalAction, default=False,
                        help="the memory run with a learner process (RSS of both processes summed; default: the "
                             "default mode, the learner in process)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per stream, each a raw read and one trainer run per mode (median ratio reported)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--idle", type=float, default=2.0, help="exit_when_idle of the trainer runs")
    parser.add_argument("--modes", default="single,envelope,memory",
                        help="comma-separated subset of single, envelope, memory (default: all three)")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    from consumers.runtime.processes import tune_gc

    tune_gc()  # the trainer runs (in this process) set it anyway: the bounds are measured under the same setting
    from consumers.runtime.local_kafka import LocalKafka, free_port

    workdir = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = LocalKafka(port=free_port(), data_dir=workdir / "kafka")
        progress("starting a broker")
        broker.start(timeout_s=180)
        bootstrap = broker.bootstrap
    report: dict[str, Any] = {
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "torch_threads": args.torch_threads, "load_avg": os.getloadavg()},
        "model": {"tasks": list(TASKS), **MODEL, "rung": "crossdistil", "backbone": "shared_bottom"},
        "batch_size": args.batch_size, "max_batch_delay_s": args.max_batch_delay,
    }
    try:
        cfg = make_config(bootstrap, "step", workdir, args.batch_size, args.max_batch_delay)
        progress("pure training step")
        step = train_step_rate(cfg, steps=20)
        report["train_step"] = step
        modes = {m.strip() for m in args.modes.split(",") if m.strip()}
        unknown = modes - {"single", "envelope", "memory"}
        if unknown:
            parser.error(f"--modes: unknown mode(s) {sorted(unknown)}; choose from single, envelope, memory")
        events_per_impression = 2.0  # the synthetic stream's ratio, until a throughput run measures it
        for mode, envelope in (("single", 1), ("envelope", args.envelope)):
            if mode not in modes:
                continue
            tag = f"{mode}-{uuid.uuid4().hex[:6]}"
            progress(f"{mode}: streaming {args.events} impressions")
            summary = stream(bootstrap, tag, args.events, envelope)
            events_per_impression = summary["events"] / max(1, summary["impressions"])
            step_events = step["samples_per_s"] * events_per_impression
            # Each round reads the topics raw, then runs the trainer with the learner in process and in its own
            # process, back to back: a round's ratios compare runs a few seconds apart, whatever the machine's
            # load does between rounds. The headline ratio is the median of the rounds'.
            intakes: list[dict] = []
            rounds: dict[bool, list[dict]] = {False: [], True: []}
            ratios: dict[bool, list[float]] = {False: [], True: []}
            for round_ in range(args.rounds):
                progress(f"{mode}: round {round_ + 1}: consume + decode")
                intakes.append(consume_decode(bootstrap, tag))
                bound = min(intakes[-1]["events_per_s"], step_events)
                for separate in (False, True):
                    progress(f"{mode}: round {round_ + 1}: trainer "
                             f"({'separate learner process' if separate else 'learner in process'})")
                    run = run_trainer(make_config(bootstrap, tag, workdir, args.batch_size, args.max_batch_delay,
                                                  separate, round_), args.idle)
                    rounds[separate].append(run)
                    ratios[separate].append(round(run["events_per_s"] / bound, 3))
            # The faster run of each kind for the figures in events/s: one busy moment must not decide them.
            intake = dict(max(intakes, key=lambda r: r["events_per_s"]),
                          rounds_events_per_s=[r["events_per_s"] for r in intakes])
            runs = {separate: dict(max(rs, key=lambda r: r["events_per_s"]),
                                   rounds_events_per_s=[r["events_per_s"] for r in rs])
                    for separate, rs in rounds.items()}

            def median(values):
                return sorted(values)[len(values) // 2]

            report[mode] = {"stream": {k: summary[k] for k in ("events", "impressions", "messages")},
                            "consume_decode": intake, "train_step_events_per_s": round(step_events),
                            "trainer": runs[False], "ratio_to_bound": median(ratios[False]),
                            "rounds_ratio_to_bound": ratios[False],
                            "trainer_separate_process": runs[True],
                            "separate_process_ratio_to_bound": median(ratios[True]),
                            "separate_process_rounds_ratio_to_bound": ratios[True],
                            "separate_process_speedup": round(median(ratios[True]) / median(ratios[False]), 3),
                            "target_ratio": 0.8}
        if args.memory_events and "memory" in modes:
            tag = f"memory-{uuid.uuid4().hex[:6]}"
            impressions = max(1, args.memory_events // max(1.0, events_per_impression))
            progress(f"memory: streaming ~{args.memory_events} events ({int(impressions)} impressions)")
            summary = stream(bootstrap, tag, int(impressions), args.envelope)
            progress("memory: trainer")
            report["memory"] = {"events": summary["events"], "separate_process": args.memory_separate_process,
                                "trainer": run_trainer(make_config(bootstrap, tag, workdir, args.batch_size,
                                                                   args.max_batch_delay, args.memory_separate_process),
                                                       args.idle, sample_rss=True)}
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
